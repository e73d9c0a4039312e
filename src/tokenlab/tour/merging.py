"""Tour section: a TIES merge of two fine-tunes on different domains, scored on both domains.

The toy world's target learned the standard library's modules (its ``.py`` sources, tests excluded).
Two copies of it are fine-tuned on text it never saw, one domain each:

* ``"tests"`` — the stdlib's unit tests: ``.py`` files under ``test``/``tests``/``idle_test``;
* ``"data"`` — the stdlib's text and data files (:data:`DATA_SUFFIXES`: decimal-arithmetic test
  cases, ``.txt`` notes and test data, HTML, XML, JSON, TOML, reStructuredText).

Each fine-tune lowers the held-out loss on its own domain; the two are merged with TIES, and the
report gives the held-out loss of the base, of each fine-tune and of the merge on both domains, and
the share of each fine-tune's gain that the merge keeps. Files are split into train and held-out as
:func:`tokenlab.tour.toy.stdlib_documents` splits them (every tenth in SHA-1 order is held out).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from pathlib import Path

import torch
from transformers import PreTrainedModel

from tokenlab.merging.methods import merge_state_dicts
from tokenlab.tour.toy import ToyWorld, encode_documents, heldout_loss, stdlib_root, train_causal_lm

DOMAINS = ("tests", "data")
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
DATA_SUFFIXES = frozenset({".decTest", ".txt", ".html", ".xml", ".json", ".toml", ".rst"})
DOCUMENT_BYTES = 8_000  # the head of each file: many files in little text


def _domain(rel: Path) -> str | None:
    if rel.suffix == ".py":
        return "tests" if TEST_DIRS & set(rel.parts[:-1]) else None
    return "data" if rel.suffix in DATA_SUFFIXES else None


@functools.lru_cache(maxsize=4)
def domain_texts(split: str, max_bytes: int, root: Path | None = None) -> dict[str, tuple[str, ...]]:
    """The ``split`` (``"train"`` or ``"heldout"``) documents of each domain, up to about ``max_bytes``
    of text each: the first :data:`DOCUMENT_BYTES` of each file (UTF-8; undecodable files skipped), in
    SHA-1 order of their path relative to ``root`` (default: the stdlib), every tenth held out."""
    if split not in ("train", "heldout"):
        raise ValueError(f"`split` must be 'train' or 'heldout', got {split!r}")
    root = Path(root) if root is not None else stdlib_root()
    found: dict[str, list[str]] = {d: [] for d in DOMAINS}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__")]
        for name in files:
            rel = (Path(folder) / name).relative_to(root)
            if (domain := _domain(rel)) is not None:
                found[domain].append(rel.as_posix())
    texts: dict[str, list[str]] = {d: [] for d in DOMAINS}
    for domain, paths in found.items():
        paths.sort(key=lambda rel: hashlib.sha1(rel.encode()).hexdigest())
        total = 0
        for index, rel in enumerate(paths):
            if (index % 10 == 0) != (split == "heldout") or total >= max_bytes:
                continue
            try:
                text = (root / rel).read_bytes()[:DOCUMENT_BYTES].decode("utf-8")
            except UnicodeDecodeError:
                continue  # binary data or another encoding
            texts[domain].append(text)
            total += len(text.encode())
    return {d: tuple(t) for d, t in texts.items()}


def domain_ids(world: ToyWorld, split: str, domain: str, max_bytes: int) -> torch.Tensor:
    """Token ids (world tokenizer) of :func:`domain_texts` ``(split, max_bytes)[domain]``."""
    if domain not in DOMAINS:
        raise ValueError(f"`domain` must be one of {DOMAINS}, got {domain!r}")
    return encode_documents(world.tokenizer, domain_texts(split, max_bytes)[domain])


def toy_finetunes(
    world: ToyWorld,
    *,
    steps: int = 60,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    max_bytes: int = 300_000,
) -> tuple[dict[str, PreTrainedModel], dict[str, torch.Tensor]]:
    """Fine-tune a copy of ``world.target`` on each domain; returns the models and the held-out ids
    of each domain (at most ``max_bytes // 4`` bytes of held-out text per domain)."""
    models, heldout = {}, {}
    for i, domain in enumerate(DOMAINS):
        model = copy.deepcopy(world.target)
        train_causal_lm(
            model,
            domain_ids(world, "train", domain, max_bytes),
            steps=steps,
            batch_size=batch_size,
            context_length=world.config.context_length,
            learning_rate=learning_rate,
            seed=i,
            progress=False,
        )
        models[domain] = model
        heldout[domain] = domain_ids(world, "heldout", domain, max_bytes // 4)
    return models, heldout


def tour_section(world: ToyWorld) -> list[str]:
    """Held-out loss of the base, the two fine-tunes and their TIES merge on both domains, and the
    share of each fine-tune's gain on its own domain that the merge keeps."""
    short = {d: len(domain_texts("heldout", 1)[d]) == 0 for d in DOMAINS}
    if any(short.values()):
        missing = ", ".join(d for d, s in short.items() if s)
        return [f"skipped: this Python ships no {missing} files in its standard library (e.g. no Lib/test)"]
    finetunes, heldout = toy_finetunes(world)
    merged = copy.deepcopy(world.target)
    merged.load_state_dict(
        merge_state_dicts(
            "ties", world.target.state_dict(), [m.state_dict() for m in finetunes.values()], density=0.5
        )
    )
    ctx, max_tokens = world.config.context_length, 8192
    rows = {"base": world.target, **{f"tuned on {d}": m for d, m in finetunes.items()}, "TIES merge": merged}
    losses = {
        label: {d: heldout_loss(model, heldout[d], ctx, max_tokens) for d in DOMAINS}
        for label, model in rows.items()
    }
    kept = {
        d: (losses["base"][d] - losses["TIES merge"][d]) / (losses["base"][d] - losses[f"tuned on {d}"][d])
        for d in DOMAINS
    }
    lines = [
        "TIES (density 0.5, weights 1) of two fine-tunes of the target "
        f"({sum(p.numel() for p in merged.parameters()) / 1e6:.2f} M params), one on the stdlib's unit",
        "tests and one on its text/data files (.decTest, .txt, .html, ...), text the target never saw;",
        "held-out loss in nats/token:",
        f"{'model':<20}" + "".join(f"{d:>12}" for d in DOMAINS),
    ]
    for label, by_domain in losses.items():
        lines.append(f"{label:<20}" + "".join(f"{by_domain[d]:>12.3f}" for d in DOMAINS))
    lines.append(
        "the merge keeps " + " and ".join(f"{100 * kept[d]:.0f}% of the {d} gain" for d in DOMAINS) + " in one model"
    )
    return lines
