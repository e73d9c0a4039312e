"""Benchmark: bytes/token and fertility of tokenlab BPE, superword BPE (both stage-2 rules) and HF BPE
on Python code and on English documentation prose (CPU), with the comparison plot of docs/tokenization.md.

    python benchmarks/tokenizer_comparison.py --plot docs/tokenizer_comparison.png   # full: vocab 8192
    python benchmarks/tokenizer_comparison.py --quick                                 # 150 KB, vocab 512

All tokenizers are trained on the stdlib train split without ``pydoc_data`` (whose ``topics.py`` is
the Python reference documentation as strings) at the same vocabulary size. Evaluation corpora:
held-out stdlib code, and the prose of ``pydoc_data.topics`` (never seen in training). Fertility is
tokens per whitespace-separated word. Checks (``--quick``): tokenlab BPE within 2 % of HF BPE in
bytes/token on code; the whole-lines superword tokenizer compresses its training text more than BPE.
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # HF tokenizers reads it when its thread pool starts

import pydoc_data.topics
import tempfile
from pathlib import Path

import harness
from tokenization import train_hf  # the HF BpeTrainer setup of benchmarks/tokenization.py
from tokenlab.tokenization import (
    bytes_per_token,
    compare_tokenizers,
    make_pre_tokenizer,
    plot_tokenizer_comparison,
    train_bpe,
    train_superword_bpe,
)
from tokenlab.tour.toy import stdlib_documents


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--plot", type=Path, default=None, help="write the comparison plot (PNG) here")
    args = p.parse_args()
    device = harness.device_from(args)
    vocab, transition = (512, 384) if args.quick else (8192, 4224)
    limit = 150_000 if args.quick else None
    train = [
        t for path, t in stdlib_documents("train", max_bytes=limit) if not path.startswith("pydoc_data/")
    ]
    code = [t for _, t in stdlib_documents("heldout", max_bytes=60_000 if args.quick else None)]
    prose = list(pydoc_data.topics.topics.values())
    if args.quick:
        prose = prose[:10]
    print(
        f"train {sum(map(len, train)) / 1e6:.2f} M chars; held-out code {sum(map(len, code)) / 1e6:.2f} M, "
        f"prose {sum(map(len, prose)) / 1e6:.2f} M"
    )
    quiet = {"progress": False}
    tokenizers = {
        "tokenlab BPE": train_bpe(train, vocab, **quiet),
        "HF BPE": train_hf(train, vocab),
        "superword (SuperBPE stage 2)": train_superword_bpe(train, vocab, transition, **quiet),
        "superword (whole lines)": train_superword_bpe(
            train, vocab, transition, superword_pre_tokenizer=make_pre_tokenizer("lines"), **quiet
        ),
    }
    rows = compare_tokenizers(
        tokenizers, {"Python code (held out)": code, "docs prose (pydoc topics)": prose}
    )
    for row in rows:
        row["vocab"] = vocab
    harness.print_table(rows, ["tokenizer", "corpus", "vocab", "tokens", "bytes_per_token", "fertility",
                               "vocabulary_utilisation"])  # fmt: skip
    ours, hf = (
        next(r["bytes_per_token"] for r in rows if r["tokenizer"] == name)
        for name in ("tokenlab BPE", "HF BPE")
    )
    assert abs(ours / hf - 1) < 0.02, (ours, hf)
    if args.quick:
        lines = tokenizers["superword (whole lines)"]
        assert bytes_per_token(lines, train) > bytes_per_token(tokenizers["tokenlab BPE"], train)
    plot = args.plot or (Path(tempfile.mkdtemp()) / "tokenizer_comparison.png" if args.quick else None)
    if plot is not None:
        try:
            title = f"stdlib-trained tokenizers, vocab {vocab} (bytes/token ↑, tokens/word ↓)"
            print("plot:", plot_tokenizer_comparison(rows, plot, title=title, overwrite=True))
        except ImportError as err:
            print(f"no plot: {err}")
    harness.finish(args, device, "tokenizer_comparison", rows)


if __name__ == "__main__":
    main()
