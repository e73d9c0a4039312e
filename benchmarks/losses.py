"""Benchmark: DPO and GRPO from hidden states — tokenlab chunked vs naive (materialised logits) vs TRL.

    python benchmarks/losses.py                  # full sizes: V ∈ {32k, 128k} × N ∈ {4k, 16k} (GPU)
    python benchmarks/losses.py --quick          # tiny sizes on CPU; asserts values and gradients agree
    python benchmarks/losses.py --device cpu --shapes 2048x32768 --hidden 256   # CPU memory figures

Each candidate computes per-token log-probs of N tokens from hidden states [N, H] and an LM head [V, H],
the loss on them, and the gradients w.r.t. hidden states and head (forward + backward):

* ``chunked`` — :func:`tokenlab.alignment.token_stats` (``backend="chunked"``) + tokenlab's loss;
* ``naive`` — the same with ``backend="reference"`` (``[N, V]`` logits and ``log_softmax``);
* ``trl`` — TRL's chunked LM-head kernel (``trl.kernels.ChunkedLogProbFunction``) + TRL's trainer loss code.

Reports time (median) and peak memory (above the inputs) per candidate, and the ratios to naive.
"""

from __future__ import annotations

import harness

harness.enable_interpreter_if_cpu()

import torch  # noqa: E402

from tokenlab.alignment import LinearHead, TokenLogps, dpo_loss, group_advantages, grpo_loss, token_stats  # noqa: E402
from tokenlab.testing import assert_relative_error  # noqa: E402
from tokenlab.testing.trl import trl_chunked_logps, trl_dpo_loss, trl_grpo_loss  # noqa: E402

BETA = 0.1


def make_inputs(N: int, V: int, H: int, T: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    ref_logps = (-torch.rand(N // T, T, generator=g) * 8).to(device)
    mask = torch.ones(N // T, T, device=device)
    rewards = torch.randn(N // T, generator=g).to(device)
    return hidden, weight, labels, ref_logps, mask, rewards


def per_token_logps(impl: str, hidden, weight, labels, chunk_size: int) -> torch.Tensor:
    if impl == "trl":
        return trl_chunked_logps(hidden, weight, None, labels)
    backend = "reference" if impl == "naive" else impl
    return token_stats(LinearHead(hidden, weight), labels, chunk_size=chunk_size, backend=backend).logps


def loss_fn(loss: str, impl: str, inputs, chunk_size: int):
    """A closure computing ``(loss, grad_hidden, grad_weight)`` for one candidate."""
    hidden, weight, labels, ref_logps, mask, rewards = inputs
    S, T = mask.shape

    def run():
        lp = per_token_logps(impl, hidden, weight, labels, chunk_size).view(S, T)
        if loss == "dpo":
            half = S // 2
            chosen = TokenLogps(lp[:half], mask[:half], ref_logps=ref_logps[:half])
            rejected = TokenLogps(lp[half:], mask[half:], ref_logps=ref_logps[half:])
            value = (
                trl_dpo_loss(chosen, rejected, beta=BETA)
                if impl == "trl"
                else dpo_loss(chosen, rejected, beta=BETA).loss
            )
        else:
            tokens = TokenLogps(lp, mask, ref_logps=ref_logps)
            advantages = group_advantages(rewards, 4)
            old = lp.detach()
            value = (
                trl_grpo_loss(tokens, advantages, old_logps=old, beta=0.04)
                if impl == "trl"
                else grpo_loss(tokens, advantages, old_logps=old, beta=0.04).loss
            )
        return (value, *torch.autograd.grad(value, (hidden, weight)))

    return run


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=None, help="NxV pairs (default: the full grid)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size H (default 4096; quick 32)")
    p.add_argument("--chunk-size", type=int, default=None, help="tokenlab chunk size (default 512; quick 24)")
    args = p.parse_args()
    device = harness.device_from(args)
    repeats = args.repeats or (2 if args.quick else 10)
    if args.quick:
        shapes, H, T, dtype, chunk = [(256, 1000)], 32, 32, torch.float32, 24  # 24 does not divide 256
    else:
        shapes = [(4096, 32768), (16384, 32768), (4096, 131072), (16384, 131072)]
        H, T, chunk = 4096, 512, 512
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.shapes:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    H = args.hidden or H
    chunk = args.chunk_size or chunk

    rows = []
    for N, V in shapes:
        inputs = make_inputs(N, V, H, T, dtype, device)
        for loss in ("dpo", "grpo"):
            fns = {impl: loss_fn(loss, impl, inputs, chunk) for impl in ("chunked", "naive", "trl")}
            results = {impl: fn() for impl, fn in fns.items()}
            errors = {}
            for impl in ("chunked", "trl"):
                errors[impl] = max(
                    assert_relative_error(
                        a, b, 1e-4 if dtype == torch.float32 else 3e-2, f"{loss} {impl} vs naive"
                    )
                    for a, b in zip(results[impl], results["naive"])
                )
            del results
            ms = {impl: harness.time_fn(fn, device, warmup=1, repeats=repeats) for impl, fn in fns.items()}
            mem = {impl: harness.peak_memory(fn, device) / 2**20 for impl, fn in fns.items()}
            rows.append(
                {
                    "loss": loss,
                    "N": N,
                    "V": V,
                    "H": H,
                    "dtype": str(dtype).removeprefix("torch."),
                    "chunked_ms": ms["chunked"],
                    "naive_ms": ms["naive"],
                    "trl_ms": ms["trl"],
                    "chunked_MiB": mem["chunked"],
                    "naive_MiB": mem["naive"],
                    "trl_MiB": mem["trl"],
                    "mem_chunked/naive": mem["chunked"] / max(mem["naive"], 1e-9),
                    "time_chunked/naive": ms["chunked"] / ms["naive"],
                    "err_chunked": errors["chunked"],
                    "err_trl": errors["trl"],
                }
            )
        del inputs
    harness.print_table(rows, list(rows[0]))
    harness.finish(args, device, "losses", rows)


if __name__ == "__main__":
    main()
