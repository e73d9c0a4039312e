"""Tour section: superword vs subword BPE compression on held-out stdlib text at equal vocabulary."""

from __future__ import annotations

import time

from tokenlab.tokenization.bpe import train_bpe, train_superword_bpe
from tokenlab.toy import ToyWorld, stdlib_documents

TRAIN_BYTES = 400_000
HELDOUT_BYTES = 100_000


def tour_lines(world: ToyWorld) -> list[str]:
    """Train a subword and a superword tokenizer (vocabulary of the world's tokenizer, at most 1024;
    transition at 60 %) on 400 KB of stdlib text and compare tokens on 100 KB of held-out text."""
    start = time.perf_counter()
    vocab = min(len(world.tokenizer), 1024)
    transition = 257 + (vocab - 257) * 3 // 5
    train = [t for _, t in stdlib_documents("train", max_bytes=TRAIN_BYTES)]
    heldout = [t for _, t in stdlib_documents("heldout", max_bytes=HELDOUT_BYTES)]
    n_bytes = sum(len(t.encode()) for t in heldout)
    counts = {}
    for name, tokenizer in (
        ("subword BPE", train_bpe(train, vocab, progress=False)),
        ("superword BPE", train_superword_bpe(train, vocab, transition, progress=False)),
    ):
        hf = tokenizer.to_hf()
        counts[name] = sum(len(ids) for ids in hf(heldout, add_special_tokens=False)["input_ids"])
        assert tokenizer.encode(heldout[0]) == hf.encode(heldout[0], add_special_tokens=False)
    sub, sup = counts["subword BPE"], counts["superword BPE"]
    return [
        f"BPE trained here on {TRAIN_BYTES // 1000} KB of stdlib text, vocab {vocab}, "
        f"held-out {n_bytes // 1000} KB; HF export encodes as our encoder",
        *(f"  {name:14s} {n:7d} tokens  {n_bytes / n:.2f} bytes/token" for name, n in counts.items()),
        f"  superword (transition at {transition}): {100 * (1 - sup / sub):.1f}% fewer tokens "
        f"({time.perf_counter() - start:.1f} s)",
    ]
