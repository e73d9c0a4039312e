"""Benchmark: our BPE trainer vs HF ``BpeTrainer``, and superword vs subword compression (CPU).

    python benchmarks/tokenization.py            # full: stdlib train split (~11 MB), vocab 8192
    python benchmarks/tokenization.py --quick    # 200 KB, small vocabularies, checks

Both trainers run single-threaded (``RAYON_NUM_THREADS=1`` is set before HF ``tokenizers`` loads)
on the same corpus with the same pre-tokeniser (GPT-2 regex) and vocabulary size; times are wall
and process CPU seconds of one training run. Compression is bytes per token on the held-out stdlib
split (more is better), measured with the HF export of each tokenizer; the superword tokenizer
(two-stage curriculum) is compared with plain BPE at the same vocabulary size.
Checks: the export encodes exactly as our encoder; our merges equal HF's up to the first count tie;
equal bytes/token to HF within 1 %; the superword tokenizer needs fewer tokens.
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # HF tokenizers reads it when its thread pool starts

import json
import time
from collections.abc import Callable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import harness
from tokenlab.tokenization import (
    bytes_to_unicode,
    make_pre_tokenizer,
    train_bpe,
    train_superword_bpe,
)
from tokenlab.tour.toy import stdlib_documents


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """``fn()``, its wall seconds and its process CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def train_hf(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = make_pre_tokenizer("gpt2").to_hf()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def count_tokens(tokenizer: PreTrainedTokenizerFast | Tokenizer, texts: list[str]) -> int:
    if isinstance(tokenizer, Tokenizer):
        return sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def hf_merges_as_bytes(tokenizer: Tokenizer) -> list[tuple[bytes, bytes]]:
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return [
        (bytes(byte_of[c] for c in a), bytes(byte_of[c] for c in b))
        for a, b in json.loads(tokenizer.to_str())["model"]["merges"]
    ]


def main() -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args()
    device = harness.device_from(args)
    corpus_bytes = 200_000 if args.quick else None
    vocab, super_vocab, transitions = (512, 1024, [400]) if args.quick else (8192, 8192, [4224, 6605])
    train = [t for _, t in stdlib_documents("train", max_bytes=corpus_bytes)]
    heldout = [t for _, t in stdlib_documents("heldout", max_bytes=60_000 if args.quick else None)]
    train_mb = sum(len(t.encode()) for t in train) / 1e6
    heldout_bytes = sum(len(t.encode()) for t in heldout)
    print(f"corpus: {train_mb:.2f} MB train, {heldout_bytes / 1e6:.2f} MB held-out (stdlib sources)")

    ours, ours_wall, ours_cpu = timed(lambda: train_bpe(train, vocab, progress=not args.quick))
    hf, hf_wall, hf_cpu = timed(lambda: train_hf(train, vocab))
    ours_hf = ours.to_hf()
    for text in heldout[:3]:
        assert ours.encode(text) == ours_hf.encode(text, add_special_tokens=False), "export != encoder"
    our_merges = [(ours.tokens[a], ours.tokens[b]) for a, b in ours.merges]
    hf_merges = hf_merges_as_bytes(hf)
    equal_prefix = next((i for i, (x, y) in enumerate(zip(our_merges, hf_merges)) if x != y), len(hf_merges))
    ours_bpt = heldout_bytes / count_tokens(ours_hf, heldout)
    hf_bpt = heldout_bytes / count_tokens(hf, heldout)
    assert abs(ours_bpt / hf_bpt - 1) < 0.01, (ours_bpt, hf_bpt)
    rows = [
        {
            "what": "trainer",
            "train_MB": train_mb,
            "vocab": vocab,
            "ours_wall_s": ours_wall,
            "ours_cpu_s": ours_cpu,
            "hf_wall_s": hf_wall,
            "hf_cpu_s": hf_cpu,
            "cpu_ratio_ours/hf": ours_cpu / hf_cpu,
            "ours_bytes/tok": ours_bpt,
            "hf_bytes/tok": hf_bpt,
            "merges_equal_to_first_tie": equal_prefix,
        }
    ]
    harness.print_table(rows, list(rows[0]))

    subword = train_bpe(train, super_vocab, progress=False).to_hf() if super_vocab != vocab else ours_hf
    sub_tokens = count_tokens(subword, heldout)
    super_rows = []
    for stage2 in ("superbpe", "lines"):
        for transition in transitions:
            sw, sw_wall, sw_cpu = timed(
                lambda t=transition, s=stage2: train_superword_bpe(
                    train, super_vocab, t, superword_pre_tokenizer=make_pre_tokenizer(s),
                    progress=not args.quick,
                )
            )  # fmt: skip
            sw_hf = sw.to_hf()
            for text in heldout[:3]:
                assert sw.encode(text) == sw_hf.encode(text, add_special_tokens=False), "export != encoder"
            sw_tokens = count_tokens(sw_hf, heldout)
            if stage2 == "lines":  # whole lines compress held-out code even at the quick scale
                assert sw_tokens < sub_tokens, (sw_tokens, sub_tokens)
            super_rows.append(
                {
                    "what": "superword",
                    "stage2": stage2,
                    "vocab": super_vocab,
                    "transition": transition,
                    "subword_bytes/tok": heldout_bytes / sub_tokens,
                    "superword_bytes/tok": heldout_bytes / sw_tokens,
                    "fewer_tokens_%": 100 * (1 - sw_tokens / sub_tokens),
                    "train_wall_s": sw_wall,
                    "train_cpu_s": sw_cpu,
                }
            )
    harness.print_table(super_rows, list(super_rows[0]))
    harness.finish(args, device, "tokenization", rows + super_rows)


if __name__ == "__main__":
    main()
