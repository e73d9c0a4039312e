"""Benchmark: DPO and GRPO from hidden states — tokenlab chunked vs naive (materialised logits), Liger, TRL.

    python benchmarks/losses.py                  # full sizes: V ∈ {32k, 128k} × N ∈ {4k, 16k} (GPU)
    python benchmarks/losses.py --quick          # tiny sizes on CPU; asserts values and gradients agree
    python benchmarks/losses.py --device cpu --shapes 2048x32768 --hidden 128 512 --chunk-size 256 1024

Each candidate computes the loss of N tokens (sequences of T tokens) from policy hidden states [N, H] and
an LM head [V, H], and the gradients w.r.t. hidden states and head (forward + backward). DPO takes its
reference log-probs from a reference head (hidden [N, H], weight [V, H], no gradient); GRPO takes them
precomputed, as trainers pass them. Candidates (``--impls``; tokenlab's run at each ``--chunk-size``):

* ``chunked`` — :func:`tokenlab.alignment.chunked_loss` (head gradients during the forward pass);
* ``compiled`` — the same with ``compile=True`` (``torch.compile`` of the per-chunk formulas);
* ``token_stats`` — :func:`tokenlab.alignment.token_stats` (recomputes logits in backward) + the loss;
* ``naive`` — ``token_stats(backend="reference")``: ``[N, V]`` logits, ``log_softmax``, autograd;
* ``liger`` — Liger-Kernel's ``LigerFusedLinearDPOLoss`` / ``LigerFusedLinearGRPOLoss`` (``compiled=False``
  off GPU), one pair / one sequence per chunk;
* ``trl`` — TRL's chunked LM-head kernel (``trl.kernels.ChunkedLogProbFunction``) + TRL's trainer loss code.

Every candidate first runs once and is checked against ``naive`` (this run also warms up and compiles);
then time (median over ``--repeats`` rounds, each running every candidate once in turn, so that load from
other work falls on all alike) and peak memory (above the inputs) are measured, with ratios to naive and
Liger.
"""

from __future__ import annotations

import harness

harness.enable_interpreter_if_cpu()

import importlib.util  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402

from tokenlab.alignment import (  # noqa: E402
    Completions,
    LinearHead,
    TokenLogps,
    chunked_loss,
    dpo_loss,
    group_advantages,
    grpo_loss,
    token_stats,
)
from tokenlab.testing import assert_relative_error  # noqa: E402
from tokenlab.testing.liger import liger_dpo_loss, liger_grpo_loss  # noqa: E402
from tokenlab.testing.trl import trl_chunked_logps, trl_dpo_loss, trl_grpo_loss  # noqa: E402

BETA_DPO, BETA_GRPO, GROUP = 0.1, 0.04, 4


def make_inputs(N: int, V: int, H: int, T: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = N // T

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    return {
        "hidden": randn(S, T, H).requires_grad_(True),
        "weight": randn(V, H, scale=H**-0.5).requires_grad_(True),
        "ref_hidden": randn(S, T, H),
        "ref_weight": randn(V, H, scale=H**-0.5),
        "labels": torch.randint(0, V, (S, T), generator=g).to(device),
        "ref_logps": (-torch.rand(S, T, generator=g) * 8).to(device),
        "mask": torch.ones(S, T, device=device),
        "rewards": torch.randn(S, generator=g).to(device),
    }


def _logps(impl: str, hidden, weight, labels, chunk_size: int) -> torch.Tensor:
    if impl == "trl":
        return trl_chunked_logps(hidden.flatten(0, 1), weight, None, labels.flatten()).view(labels.shape)
    if impl == "naive":
        return token_stats(LinearHead(hidden, weight), labels, backend="reference").logps
    return token_stats(LinearHead(hidden, weight), labels, chunk_size=chunk_size).logps


def _completions(x: dict, rows: slice, reference: bool) -> Completions:
    ref = LinearHead(x["ref_hidden"][rows], x["ref_weight"]) if reference else None
    ref_logps = None if reference else x["ref_logps"][rows]
    return Completions(LinearHead(x["hidden"][rows], x["weight"]), x["labels"][rows], ref, ref_logps)


def dpo_value(impl: str, x: dict, chunk_size: int) -> torch.Tensor:
    h, w, labels = x["hidden"], x["weight"], x["labels"]
    if impl == "liger":
        return liger_dpo_loss(h, w, labels, x["ref_hidden"], x["ref_weight"], beta=BETA_DPO)
    if impl in ("chunked", "compiled"):
        half = labels.shape[0] // 2
        pair = _completions(x, slice(None, half), True), _completions(x, slice(half, None), True)
        return chunked_loss(
            dpo_loss, *pair, chunk_size=chunk_size, compile=impl == "compiled", beta=BETA_DPO
        ).loss
    with torch.no_grad():
        ref = _logps(impl, x["ref_hidden"], x["ref_weight"], labels, chunk_size)
    lp = _logps(impl, h, w, labels, chunk_size)
    half, mask = labels.shape[0] // 2, x["mask"]
    chosen = TokenLogps(lp[:half], mask[:half], ref_logps=ref[:half])
    rejected = TokenLogps(lp[half:], mask[half:], ref_logps=ref[half:])
    if impl == "trl":
        return trl_dpo_loss(chosen, rejected, beta=BETA_DPO)
    return dpo_loss(chosen, rejected, beta=BETA_DPO).loss


def grpo_value(impl: str, x: dict, chunk_size: int) -> torch.Tensor:
    h, w, labels, mask, ref = x["hidden"], x["weight"], x["labels"], x["mask"], x["ref_logps"]
    advantages = group_advantages(x["rewards"], GROUP)
    if impl == "liger":
        return liger_grpo_loss(
            h, w, labels, mask, advantages, ref_logps=ref, old_logps=None, beta=BETA_GRPO, loss_type="grpo"
        )
    if impl in ("chunked", "compiled"):
        sequences = _completions(x, slice(None), False)
        compile = impl == "compiled"
        return chunked_loss(
            grpo_loss,
            sequences,
            chunk_size=chunk_size,
            compile=compile,
            advantages=advantages,
            beta=BETA_GRPO,
        ).loss
    lp = _logps(impl, h, w, labels, chunk_size)
    tokens = TokenLogps(lp, mask, ref_logps=ref)
    if impl == "trl":
        return trl_grpo_loss(tokens, advantages, old_logps=lp.detach(), beta=BETA_GRPO)
    return grpo_loss(tokens, advantages, beta=BETA_GRPO).loss


LOSSES = {"dpo": dpo_value, "grpo": grpo_value}
TOKENLAB = ("chunked", "compiled", "token_stats")  # candidates with a chunk size


def candidate(loss: str, impl: str, x: dict):
    """A closure computing ``(loss, grad_hidden, grad_weight)`` for one candidate, named ``name[@chunk]``."""
    name, _, chunk = impl.partition("@")

    def run():
        value = LOSSES[loss](name, x, int(chunk or 0))
        return (value.detach(), *torch.autograd.grad(value, (x["hidden"], x["weight"])))

    return run


def round_robin_ms(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each candidate over ``repeats`` rounds that run every candidate once in turn,
    so that load from other work on a shared machine falls on all of them alike."""
    times = {impl: [] for impl in fns}
    for _ in range(repeats):
        for impl, fn in fns.items():
            times[impl].append(harness.timed(fn, device)[1] * 1e3)
    return {impl: statistics.median(t) for impl, t in times.items()}


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=None, help="NxV pairs (default: the full grid)")
    p.add_argument("--hidden", type=int, nargs="*", default=None, help="hidden sizes H (default 4096)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence T (default 512)")
    p.add_argument(
        "--chunk-size", type=int, nargs="*", default=None, help="tokenlab chunk sizes (default 1024)"
    )
    p.add_argument(
        "--impls", nargs="*", default=None, help="candidates (default: chunked token_stats naive liger trl)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads or args.quick:  # tiny sizes: extra threads only contend
        torch.set_num_threads(args.threads or 1)
    device = harness.device_from(args)
    repeats = args.repeats or (1 if args.quick else 10)
    if args.quick:  # chunk 24 does not divide the 32-token sequences
        shapes, hiddens, T, dtype, chunks = [(256, 1000)], [32], 32, torch.float32, [24]
    else:
        shapes = [(4096, 32768), (16384, 32768), (4096, 131072), (16384, 131072)]
        hiddens, T, chunks = [4096], 512, [1024]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    hiddens, T, chunks = args.hidden or hiddens, args.seq_len or T, args.chunk_size or chunks
    names = args.impls or ["chunked", "token_stats", "naive", "liger", "trl"]
    names = [i for i in names if i != "liger" or importlib.util.find_spec("liger_kernel")]
    impls = [f"{n}@{c}" if n in TOKENLAB else n for n in names for c in (chunks if n in TOKENLAB else [0])]
    tol = 1e-4 if dtype == torch.float32 else 3e-2

    rows = []
    for H in hiddens:
        for N, V in shapes:
            x = make_inputs(N, V, H, T, dtype, device)
            for loss in LOSSES:
                fns = {impl: candidate(loss, impl, x) for impl in impls}
                want = fns["naive"]() if "naive" in fns else None
                errors = {}
                for impl, fn in fns.items():  # also the warm-up (and compilation) run
                    got = fn() if impl != "naive" else None
                    if want is not None and got is not None:
                        errors[impl] = max(
                            assert_relative_error(a, b, tol, f"{loss} {impl} vs naive")
                            for a, b in zip(got, want)
                        )
                    del got
                del want
                ms = round_robin_ms(fns, device, repeats)
                mem = {impl: harness.peak_memory(fn, device) / 2**20 for impl, fn in fns.items()}
                for impl in impls:
                    row = {"loss": loss, "N": N, "V": V, "H": H, "dtype": str(dtype).removeprefix("torch.")}
                    row |= {"impl": impl, "ms": ms[impl], "MiB": mem[impl]}
                    for ref in ("naive", "liger"):
                        if ref in impls:
                            row[f"time/{ref}"] = ms[impl] / ms[ref]
                            row[f"mem/{ref}"] = mem[impl] / max(mem[ref], 1e-9)
                    row["rel_err"] = errors.get(impl, 0.0)
                    rows.append(row)
                    print(row, flush=True)
            del x
    harness.print_table(rows, list(rows[0]))
    harness.finish(args, device, "losses", rows)


if __name__ == "__main__":
    main()
