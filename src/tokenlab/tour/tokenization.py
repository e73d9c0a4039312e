"""Tour section of the tokenization family: superword vs subword compression, exact next-byte laws
for a mid-token prompt, and tokenizer transplant losses."""

from __future__ import annotations

import time

from tokenlab.tokenization.bpe import train_bpe, train_superword_bpe
from tokenlab.tour.toy import ToyWorld, stdlib_documents
from tokenlab.tour.transplant import byte_level_and_transplant_lines

SLICE_CHARS = 400  # a slice from the middle of every file: many files in little text
MAX_VOCAB = 1024


def _middle_slices(split: str) -> list[str]:
    return [t[len(t) // 2 : len(t) // 2 + SLICE_CHARS] for _, t in stdlib_documents(split)]


def _superword_lines(world: ToyWorld) -> list[str]:
    """Train a subword and a superword BPE tokenizer (our trainer; the world tokenizer's vocabulary
    size, at most 1024; superword transition at 30 % of the merges) on a 400-character slice of
    every training file, and count their tokens on the same slices of the held-out files."""
    start = time.perf_counter()
    vocab = min(len(world.tokenizer), MAX_VOCAB)
    transition = 257 + (vocab - 257) * 3 // 10
    train, heldout = _middle_slices("train"), _middle_slices("heldout")
    n_bytes = sum(len(t.encode()) for t in heldout)
    counts, exact = {}, True
    for name, tokenizer in (
        ("subword BPE", train_bpe(train, vocab, progress=False)),
        ("superword BPE", train_superword_bpe(train, vocab, transition, progress=False)),
    ):
        hf = tokenizer.to_hf()
        ids = hf(heldout, add_special_tokens=False)["input_ids"]
        counts[name] = sum(map(len, ids))
        exact &= all(tokenizer.encode(t) == i for t, i in zip(heldout[:10], ids))
    sub, sup = counts["subword BPE"], counts["superword BPE"]
    return [
        f"trained on {sum(len(t.encode()) for t in train) // 1000} KB of stdlib text (slices of "
        f"{len(train)} files), vocab {vocab}; held-out {n_bytes // 1000} KB ({len(heldout)} files)",
        *(f"  {name:14s} {n:6d} tokens  {n_bytes / n:.2f} bytes/token" for name, n in counts.items()),
        f"  superword (transition at {transition}): {100 * (1 - sup / sub):.1f}% fewer tokens; "
        f"HF export = our encoder: {'yes' if exact else 'NO'} ({time.perf_counter() - start:.1f} s)",
    ]


def tour_section(world: ToyWorld) -> list[str]:
    """Superword vs subword BPE on held-out stdlib text; byte-level probabilities and transplant."""
    return _superword_lines(world) + byte_level_and_transplant_lines(world)
