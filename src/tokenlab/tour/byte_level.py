"""Experiments for the byte-level engine on the toy world: a second model with its own tokenizer, and
held-out bits per byte of exact byte-level models and of their ensembles.

Run by ``benchmarks/byte_level.py`` (default toy world; ``tiny`` with ``--quick``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from tokenlab.tokenization.byte_level import ByteLevelBPE, ByteLevelEnsemble, ByteLevelLM
from tokenlab.tour.toy import ToyModelSize, ToyWorld, load_toy_world


def second_world(world: ToyWorld, *, progress: bool = True) -> ToyWorld:
    """A toy world on the same corpus with another tokenizer (half the vocabulary) and a smaller
    target (3/4 of the width, one layer fewer, 2/3 of the steps), cached like every toy world."""
    c = world.config
    size = c.target
    config = dataclasses.replace(
        c,
        vocab_size=max(320, c.vocab_size // 2),
        target=ToyModelSize(
            size.hidden_size * 3 // 4,
            max(1, size.num_layers - 1),
            size.num_heads,
            size.num_kv_heads,
            size.intermediate_size * 3 // 4,
        ),
        draft=ToyModelSize(16, 1, 1, 1, 32),
        train_steps=c.train_steps * 2 // 3,
        seed=c.seed + 1,
    )
    return load_toy_world(config, cache=world.path.parent, device=world.target.device, progress=progress)


@dataclasses.dataclass
class ByteScore:
    """Held-out bits per byte of a byte-level model or ensemble."""

    model: str
    bits_per_byte: float
    mean_weight_first: float | None = None  # ensembles: mean weight of the first member


def score_bytes(
    members: dict[str, ByteLevelLM],
    ensembles: dict[str, ByteLevelEnsemble],
    texts: Sequence[bytes],
    *,
    progress: bool = True,
) -> tuple[list[ByteScore], float]:
    """``−mean log2 P(b_k | x_<k)`` over every byte of ``texts`` (each scored from its start) from the
    exact next-byte laws, for each member and each ensemble of those members (each member's law is
    computed once per byte and combined by every ensemble). Returns the scores and the seconds per
    byte of computing all member laws."""
    total = sum(len(t) for t in texts)
    nll = {name: 0.0 for name in [*members, *ensembles]}
    weights: dict[str, list[float]] = {name: [] for name in ensembles}
    index = {id(m): k for k, m in enumerate(members.values())}
    seconds = 0.0
    bar = tqdm(total=total, desc="bits/byte", disable=not progress, leave=False)
    for text in texts:
        for k in range(len(text)):
            start = time.perf_counter()
            laws = torch.stack([m.next_byte_distribution(text[:k]) for m in members.values()])
            seconds += time.perf_counter() - start
            for name, law in zip(members, laws):
                nll[name] -= math.log2(max(law[text[k]].item(), 1e-300))
            for name, ens in ensembles.items():
                law = ens.combine(laws[[index[id(m)] for m in ens.members]])
                nll[name] -= math.log2(max(law[text[k]].item(), 1e-300))
                weights[name].append(ens.last_weights[0].item())
            bar.update()
    bar.close()
    rows = [ByteScore(name, nll[name] / total) for name in members]
    rows += [
        ByteScore(name, nll[name] / total, sum(weights[name]) / len(weights[name])) for name in ensembles
    ]
    return rows, seconds / total


def token_bits_per_byte(model: torch.nn.Module, tokenizer, texts: Sequence[bytes]) -> float:
    """The usual token-level score for comparison: ``−log2 P(τ(x))`` of the canonical encoding of each
    text after BOS (no EOS), per byte. The exact byte-level score is never worse: ``P(x)`` sums
    every cover encoding of ``x``, one of which is ``τ(x)``."""
    nll, total = 0.0, 0
    device = next(model.parameters()).device
    bpe = ByteLevelBPE(tokenizer)
    with torch.no_grad():
        for text in texts:
            ids = [tokenizer.bos_token_id, *bpe.encode(text)]
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].double()
            nll -= torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), ids[1:]].sum().item()
            total += len(text)
    return nll / math.log(2) / total
