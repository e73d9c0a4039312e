"""Tour section: a TIES merge of two toy fine-tunes, scored on both fine-tuning subsets.

The toy world's target is fine-tuned twice on two different parts of the standard library —
*packages* (files inside a package directory, such as ``email/`` or ``asyncio/``) and *modules*
(top-level files such as ``tempfile.py``) — and the two fine-tunes are merged with TIES. The
report gives the held-out loss of the base, of each fine-tune and of the merge on both subsets.
"""

from __future__ import annotations

import copy
import functools

import torch
from transformers import PreTrainedModel

from tokenlab.merging.methods import merge_state_dicts
from tokenlab.tour.toy import ToyWorld, encode_documents, heldout_loss, stdlib_documents, train_causal_lm

SUBSETS = ("packages", "modules")


@functools.lru_cache(maxsize=4)
def subset_texts(split: str, max_bytes: int) -> dict[str, tuple[str, ...]]:
    """The ``split`` documents of each subset (``"packages"``: inside a package directory;
    ``"modules"``: top-level files), up to about ``max_bytes`` of text each (one corpus scan)."""
    texts: dict[str, list[str]] = {s: [] for s in SUBSETS}
    for rel, text in stdlib_documents(split, max_bytes=10 * max_bytes):
        subset = "packages" if "/" in rel else "modules"
        if sum(map(len, texts[subset])) < max_bytes:
            texts[subset].append(text)
    return {s: tuple(t) for s, t in texts.items()}


def subset_ids(world: ToyWorld, split: str, subset: str, max_bytes: int) -> torch.Tensor:
    """Token ids (world tokenizer) of :func:`subset_texts` ``(split, max_bytes)[subset]``."""
    if subset not in SUBSETS:
        raise ValueError(f"`subset` must be one of {SUBSETS}, got {subset!r}")
    return encode_documents(world.tokenizer, subset_texts(split, max_bytes)[subset])


def toy_finetunes(
    world: ToyWorld, *, steps: int = 24, batch_size: int = 8, max_bytes: int = 100_000
) -> tuple[dict[str, PreTrainedModel], dict[str, torch.Tensor]]:
    """Fine-tune copies of ``world.target`` on each subset; returns the models and held-out ids by subset."""
    models, heldout = {}, {}
    for i, subset in enumerate(SUBSETS):
        model = copy.deepcopy(world.target)
        train_causal_lm(
            model,
            subset_ids(world, "train", subset, max_bytes),
            steps=steps,
            batch_size=batch_size,
            context_length=world.config.context_length,
            learning_rate=1e-4,
            seed=i,
            progress=False,
        )
        models[subset] = model
        heldout[subset] = subset_ids(world, "heldout", subset, max_bytes // 4)
    return models, heldout


def tour_section(world: ToyWorld) -> list[str]:
    """Held-out loss of the base, the two fine-tunes and their TIES merge on both subsets."""
    finetunes, heldout = toy_finetunes(world)
    base_sd = world.target.state_dict()
    merged = copy.deepcopy(world.target)
    merged.load_state_dict(
        merge_state_dicts("ties", base_sd, [m.state_dict() for m in finetunes.values()], density=0.5)
    )
    ctx, max_tokens = world.config.context_length, 4096
    rows = {"base": world.target, **{f"tuned on {s}": m for s, m in finetunes.items()}, "TIES merge": merged}
    lines = [
        "TIES (density 0.5, weights 1) of two fine-tunes of the target "
        f"({sum(p.numel() for p in merged.parameters()) / 1e6:.2f} M params), each on one subset of",
        "the target's own training files (so gains on held-out files are small); held-out loss in nats:",
        f"{'model':<20}" + "".join(f"{s:>12}" for s in SUBSETS),
    ]
    for label, model in rows.items():
        losses = [heldout_loss(model, heldout[s], ctx, max_tokens) for s in SUBSETS]
        lines.append(f"{label:<20}" + "".join(f"{v:>12.3f}" for v in losses))
    return lines
