"""Tour section: a TIES merge of two fine-tunes on different domains, scored on both domains.

The toy world's target learned the standard library's modules (its ``.py`` sources, tests excluded).
Two copies of it are fine-tuned on text it never saw, one domain each:

* ``"tests"`` — the stdlib's unit tests: ``.py`` files under ``test``/``tests``/``idle_test``;
* ``"data"`` — the stdlib's text and data files (:data:`DATA_SUFFIXES`: decimal-arithmetic test
  cases, ``.txt`` notes and test data, HTML, XML, JSON, TOML, reStructuredText).

Each fine-tune lowers the held-out loss on its own domain; the two are merged with TIES at the
paper's default density (``k = 20 %``) and its scaling ``λ`` chosen on validation files, as the
paper chooses it. The report gives the held-out loss of the base, of each fine-tune and of the merge
on both domains, and the share of each fine-tune's gain that the merge keeps. Files are ordered by
the SHA-1 of their path (as :func:`tokenlab.tour.toy.stdlib_documents` orders them); of every ten,
the first is held out, the sixth is for validation, the rest are for training.
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
SPLITS = {"heldout": 0, "validation": 5}  # position in each run of ten files; the others are "train"
DENSITY = 0.2  # TIES' default top-k without validation data
SCALINGS = (1.0, 1.5, 2.0)  # λ candidates, chosen on the validation files


def _domain(rel: Path) -> str | None:
    if rel.suffix == ".py":
        return "tests" if TEST_DIRS & set(rel.parts[:-1]) else None
    return "data" if rel.suffix in DATA_SUFFIXES else None


@functools.lru_cache(maxsize=4)
def domain_texts(split: str, max_bytes: int, root: Path | None = None) -> dict[str, tuple[str, ...]]:
    """The ``split`` (``"train"``, ``"validation"`` or ``"heldout"``) documents of each domain, up to
    about ``max_bytes`` of text each: the first :data:`DOCUMENT_BYTES` of each file (UTF-8; undecodable
    files skipped), in SHA-1 order of their path relative to ``root`` (default: the stdlib), split by
    position as :data:`SPLITS` says."""
    if split not in ("train", *SPLITS):
        raise ValueError(f"`split` must be 'train', 'validation' or 'heldout', got {split!r}")
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
            if next((name for name, at in SPLITS.items() if at == index % 10), "train") != split:
                continue
            if total >= max_bytes:
                break
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
    steps: int = 100,
    batch_size: int = 8,
    learning_rate: float = 1e-4,
    max_bytes: int = 300_000,
) -> dict[str, PreTrainedModel]:
    """Fine-tune a copy of ``world.target`` on each domain's training files (``max_bytes`` of each)."""
    models = {}
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
    return models


def _losses(world: ToyWorld, model: PreTrainedModel, ids: dict[str, torch.Tensor]) -> dict[str, float]:
    tokens = 2048 if world.config.vocab_size < 1024 else 8192  # the tiny world (tests): less
    return {d: heldout_loss(model, ids[d], world.config.context_length, tokens) for d in DOMAINS}


def tour_section(world: ToyWorld) -> list[str]:
    """Held-out loss of the base, the two fine-tunes and their TIES merge on both domains, and the
    share of each fine-tune's gain on its own domain that the merge keeps."""
    if missing := [d for d, texts in domain_texts("heldout", 1).items() if not texts]:
        return [
            f"skipped: this Python's standard library ships no {' or '.join(missing)} files (no Lib/test)"
        ]
    finetunes = toy_finetunes(world, steps=40 if world.config.vocab_size < 1024 else 100)
    base = world.target.state_dict()
    task_models = [m.state_dict() for m in finetunes.values()]

    def ties(scaling: float) -> PreTrainedModel:
        merged = copy.deepcopy(world.target)
        merged.load_state_dict(merge_state_dicts("ties", base, task_models, density=DENSITY, scaling=scaling))
        return merged

    validation = {d: domain_ids(world, "validation", d, 75_000) for d in DOMAINS}
    scaling = min(SCALINGS, key=lambda lam: sum(_losses(world, ties(lam), validation).values()))
    heldout = {d: domain_ids(world, "heldout", d, 75_000) for d in DOMAINS}
    rows = {
        "base": world.target,
        **{f"tuned on {d}": m for d, m in finetunes.items()},
        "TIES merge": ties(scaling),
    }
    losses = {label: _losses(world, model, heldout) for label, model in rows.items()}
    kept = {
        d: (losses["base"][d] - losses["TIES merge"][d]) / (losses["base"][d] - losses[f"tuned on {d}"][d])
        for d in DOMAINS
    }
    lines = [
        f"TIES (density {DENSITY}, λ = {scaling:g} chosen on validation files from {SCALINGS}) of two",
        f"fine-tunes of the target ({sum(p.numel() for p in world.target.parameters()) / 1e6:.2f} M params) "
        "on text it never saw, one on the stdlib's unit",
        "tests, one on its text/data files (.decTest, .txt, .html, ...); held-out loss in nats/token:",
        f"{'model':<20}" + "".join(f"{d:>12}" for d in DOMAINS),
    ]
    for label, by_domain in losses.items():
        lines.append(f"{label:<20}" + "".join(f"{by_domain[d]:>12.3f}" for d in DOMAINS))
    gains = " and ".join(f"{100 * kept[d]:.0f}% of the {d} gain" for d in DOMAINS)
    lines.append(f"the merge keeps {gains} in one model")
    return lines
