"""A tour of tokenlab: every family on the toy world, printed as a short report.

    python -m tokenlab.tour                 # the default toy world (trained once, then cached)
    python -m tokenlab.tour --preset tiny   # seconds instead of minutes

Each family contributes one section: a function ``(world) -> list[str]`` of report lines, listed in
:data:`SECTIONS` in the order the report prints them.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

# Kernels run on CPU tensors under the Triton interpreter, which must be switched on before triton is
# first imported (transformers' model modules import it), so this happens before the imports below.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tokenlab.tour.alignment import tour_section as alignment_section
from tokenlab.tour.attention import tour_section as attention_section
from tokenlab.tour.context_conflict import tour_section as context_aware_section
from tokenlab.tour.decoding import tour_section as decoding_section
from tokenlab.tour.merging import tour_section as merging_section
from tokenlab.tour.tokenization import tour_section as tokenization_section
from tokenlab.tour.toy import PRESETS, ToyWorld, load_toy_world


def toy_world_section(world: ToyWorld) -> list[str]:
    """Corpus, tokenizer and model sizes, and held-out loss of both models vs the unigram baseline."""
    m = world.metrics
    unigram = m["unigram_heldout_loss"]
    lines = [
        f"corpus: Python {platform.python_version()} stdlib sources, "
        f"{m['train_bytes'] / 1e6:.2f} MB train / {m['heldout_bytes'] / 1e6:.2f} MB held out",
        f"tokenizer: byte-level BPE, vocab {m['vocab_size']}, {m['bytes_per_token']:.2f} bytes/token",
        f"unigram baseline held-out loss: {unigram:.3f} nats (ppl {torch.tensor(unigram).exp():.1f})",
    ]
    for role in ("target", "draft"):
        loss = m[f"{role}_heldout_loss"]
        lines.append(
            f"{role}: Llama, {m[f'{role}_parameters'] / 1e6:.2f} M params, held-out loss {loss:.3f} nats "
            f"(ppl {torch.tensor(loss).exp():.1f}, {unigram - loss:+.3f} vs unigram)"
        )
    lines.append(f"built in {m['build_seconds']:.0f} s on {m['device']} (cached at {world.path})")
    return lines


SECTIONS: list[tuple[str, Callable[[ToyWorld], list[str]]]] = [
    ("toy world", toy_world_section),
    ("attention", attention_section),
    ("tokenization", tokenization_section),
    ("decoding", decoding_section),
    ("context-aware decoding", context_aware_section),
    ("alignment", alignment_section),
    ("merging", merging_section),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenlab.tour", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="toy world size")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    world = load_toy_world(args.preset, device=args.device)
    if world.target.device.type == "cpu":
        # The toy models are tiny: one intra-op thread is fastest for them and keeps timings stable.
        torch.set_num_threads(1)
    print(f"tokenlab tour — toy world '{args.preset}' on {world.target.device}\n")
    for title, section in SECTIONS:
        t0 = time.perf_counter()
        lines = section(world)
        print(f"== {title} ({time.perf_counter() - t0:.1f} s)")
        for line in lines:
            print(f"   {line}")
        print()
    print(f"tour finished in {time.perf_counter() - start:.1f} s")

