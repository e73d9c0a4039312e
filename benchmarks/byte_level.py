"""Benchmark: exact byte-level generation speed (KV cache), byte-level ensembles, genlm-bytes.

    python benchmarks/byte_level.py               # default toy world (CPU: tens of minutes, first run
                                                  # trains the second model)
    python benchmarks/byte_level.py --quick       # tiny toy world, checks
    python benchmarks/byte_level.py --speed-only  # part 1 only (generation speed)

Part 1 — greedy ``generate_bytes`` of N bytes (200; quick: 24) after a held-out prompt: bytes/s and
ms/byte with the KV cache (``kv_cache=True``), without it (every new branch evaluated from its first
token) and — with ``--before REV``, default the commit before the KV cache — the engine of that git
revision, interleaved in chunks of 10 bytes so that the three see the same machine load; branch
forwards per byte; token-level ``model.generate`` for the same number of bytes (tokens/s, bytes/s)
and the slowdown per byte and per token. All byte-level outputs must agree.

Part 2 — held-out bits/byte (exact byte-level laws) of the toy target, a second model with its own
tokenizer (:func:`tokenlab.tour.byte_level.second_world`), their 50/50 mixture (the paper's
ensemble) and the CoRE ensemble; the token-level bits/byte of each model for reference.

Part 3 — genlm-bytes (beam-approximate byte-level probabilities, all tokenizations) when it imports:
its log P(prefix) vs the exact one on held-out text, and the time per byte of each.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import harness
from tokenlab.tokenization import ByteLevelEnsemble, ByteLevelLM, generate_bytes
from tokenlab.tour.byte_level import score_bytes, second_world, token_bits_per_byte
from tokenlab.tour.toy import load_toy_world, stdlib_documents

BEFORE = "f18d3c4"  # the last commit whose ByteLevelLM re-encodes the prompt for every byte


def engine_at(revision: str):
    """The ``byte_level`` module of a git revision, loaded beside the current one (or ``None``)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{revision}:src/tokenlab/tokenization/byte_level.py"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "byte_level_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("byte_level_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["byte_level_before"] = module
    spec.loader.exec_module(module)
    return module


def generation_speed(world, prompt: bytes, n: int, before) -> list[dict]:
    engines = {
        "kv cache": (ByteLevelLM(world.target, world.tokenizer), generate_bytes),
        "no kv cache": (ByteLevelLM(world.target, world.tokenizer, kv_cache=False), generate_bytes),
    }
    if before is not None:
        engines[f"before ({BEFORE})"] = (
            before.ByteLevelLM(world.target, world.tokenizer),
            before.generate_bytes,
        )
    seconds = dict.fromkeys(engines, 0.0)
    outs = dict.fromkeys(engines, b"")
    for _ in range(0, n, 10):
        for name, (lm, generate) in engines.items():
            start = time.perf_counter()
            outs[name] += generate(lm, prompt + outs[name], min(10, n - len(outs[name])))
            seconds[name] += time.perf_counter() - start
    first = next(iter(outs.values()))
    assert all(out == first for out in outs.values()), "byte-level engines disagree"
    ids = world.tokenizer(prompt.decode(errors="replace"), return_tensors="pt").input_ids
    ids = torch.cat([torch.tensor([[world.tokenizer.bos_token_id]]), ids], 1).to(world.target.device)
    new_tokens = max(1, len(world.tokenizer(first.decode(errors="replace")).input_ids))
    start = time.perf_counter()
    with torch.no_grad():
        out = world.target.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    token_seconds = time.perf_counter() - start
    token_bytes = len(world.tokenizer.decode(out[0, ids.shape[1] :]).encode())
    reference = seconds.get(f"before ({BEFORE})", seconds["no kv cache"])
    rows = []
    for name, (lm, _) in engines.items():
        per_byte = seconds[name] / len(first)
        rows.append(
            {
                "engine": name,
                "bytes": len(first),
                "bytes/s": 1 / per_byte,
                "ms/byte": 1e3 * per_byte,
                "model ms/byte": 1e3 * lm.cost.seconds / len(first),
                "branch forwards/byte": lm.cost.sequences / len(first),
                "speed-up": reference / seconds[name],
                "× token-level per byte": per_byte / (token_seconds / token_bytes),
                "× token-level per token": per_byte / (token_seconds / new_tokens) * len(first) / new_tokens,
            }
        )
    rows.append(
        {
            "engine": "token-level generate",
            "bytes": token_bytes,
            "bytes/s": token_bytes / token_seconds,
            "ms/byte": 1e3 * token_seconds / token_bytes,
            "tokens/s": new_tokens / token_seconds,
        }
    )
    return rows


def genlm_comparison(world, texts: list[bytes], beam: int) -> list[dict] | str:
    """genlm-bytes' beam estimate of log P(prefix) vs the exact value at every byte of ``texts``."""
    try:
        from genlm.backend.llm import AsyncTransformer
        from genlm.bytes import BeamParams, ByteBeamState
    except ImportError as err:
        return f"genlm-bytes is not importable here ({err})"
    lm = ByteLevelLM(world.target, world.tokenizer)
    exact, approx = [], []
    start = time.perf_counter()
    for text in texts:
        exact += [lm.prefix_log_probability(text[: k + 1]) for k in range(len(text))]
    ours = time.perf_counter() - start

    async def run() -> None:
        llm = AsyncTransformer(world.target, world.tokenizer)
        for text in texts:
            state = await ByteBeamState.initial(llm, BeamParams(K=beam, heal=False))
            for b in text:
                state = await (state.prune() << b)  # keep the K most likely candidates
                approx.append(float(state.logZ))
            await state.cleanup()

    start = time.perf_counter()
    asyncio.run(run())
    theirs = time.perf_counter() - start
    n = len(exact)
    ours_total = sum(exact[k] for k in _ends(texts))
    theirs_total = sum(approx[k] for k in _ends(texts))
    return [
        {
            "method": "tokenlab exact (canonical covers)",
            "bytes": n,
            "ms/byte": 1e3 * ours / n,
            "Σ log P(text)": ours_total,
        },
        {
            "method": f"genlm-bytes beam K={beam} (all tokenizations)",
            "bytes": n,
            "ms/byte": 1e3 * theirs / n,
            "Σ log P(text)": theirs_total,
            "gap nats/byte": (theirs_total - ours_total) / n,
            "max |gap| at a prefix": max(abs(a - e) for a, e in zip(approx, exact)),
        },
    ]


def _ends(texts: list[bytes]) -> list[int]:
    ends, total = [], 0
    for text in texts:
        total += len(text)
        ends.append(total - 1)
    return ends


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--before", default=None, help=f"git revision of the engine to compare (default {BEFORE})")
    p.add_argument("--bytes", type=int, default=None, help="bytes to generate (default 200; quick 24)")
    p.add_argument("--speed-only", action="store_true", help="part 1 only: generation speed")
    args = p.parse_args()
    device = harness.device_from(args)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: intra-op threads only contend on shared CPUs
    world = load_toy_world("tiny" if args.quick else "default", device=device, progress=not args.quick)
    heldout = "".join(t for _, t in stdlib_documents("heldout", max_bytes=60_000)).encode()

    n = args.bytes or (24 if args.quick else 200)
    before = engine_at(args.before or BEFORE) if not args.quick or args.before else None
    speed = generation_speed(world, heldout[1000:1300], n, before)
    print(f"greedy generate_bytes, {n} bytes after a 300-byte held-out prompt:")
    harness.print_table(speed, list({k: None for r in speed for k in r}))
    cached = speed[0]
    if not args.quick:
        print(
            f"goal (≤ 3 branch forwards/byte, ≥ 10× faster than before): "
            f"{cached['branch forwards/byte']:.2f} forwards/byte, {cached['speed-up']:.1f}×"
        )
    assert cached["branch forwards/byte"] <= 3.0
    if args.speed_only:
        harness.finish(args, device, "byte_level", speed)
        return

    other = second_world(world, progress=not args.quick)
    a = ByteLevelLM(world.target, world.tokenizer)
    b = ByteLevelLM(other.target, other.tokenizer)
    count, size = (2, 40) if args.quick else (8, 250)
    texts = [heldout[5000 + 3000 * k : 5000 + 3000 * k + size] for k in range(count)]
    scores, seconds = score_bytes(
        {f"target (vocab {len(world.tokenizer)})": a, f"second (vocab {len(other.tokenizer)})": b},
        {"mixture 50/50": ByteLevelEnsemble([a, b]), "CoRE": ByteLevelEnsemble([a, b], method="core")},
        texts,
        progress=not args.quick,
    )
    rows = [vars(s) for s in scores]
    rows[0]["token-level bits/byte"] = token_bits_per_byte(world.target, world.tokenizer, texts)
    rows[1]["token-level bits/byte"] = token_bits_per_byte(other.target, other.tokenizer, texts)
    print(
        f"\nheld-out bits/byte over {sum(map(len, texts))} bytes ({count} texts), "
        f"members' laws {1e3 * seconds:.0f} ms/byte:"
    )
    harness.print_table(rows, ["model", "bits_per_byte", "token-level bits/byte", "mean_weight_first"])
    for row in rows[:2]:
        assert row["bits_per_byte"] <= row["token-level bits/byte"] + 1e-9, "P(x) ≥ P(τ(x)) violated"
    assert all(math.isfinite(r["bits_per_byte"]) for r in rows)

    peer = genlm_comparison(world, texts[:1] if args.quick else texts[:3], beam=8)
    if isinstance(peer, str):
        print(f"\ngenlm-bytes: skipped — {peer}")
        peer = []
    else:
        print("\nlog P(prefix) at every byte, genlm-bytes (beam) vs exact:")
        harness.print_table(peer, list({k: None for r in peer for k in r}))
    harness.finish(args, device, "byte_level", speed + rows + peer)


if __name__ == "__main__":
    main()
