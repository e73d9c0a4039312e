"""Benchmark: tokenlab flash attention (Triton) vs SDPA flash vs compiled flex_attention vs reference.

    python benchmarks/attention.py            # full sizes (GPU): bf16, hd 64/128, T = 1k..16k
    python benchmarks/attention.py --quick    # tiny sizes, interpreter on CPU, checks kernel == reference

Full mode prints, per head dim, causality, length and pass (fwd, bwd, fwd+bwd), the time and TFLOP/s
of every peer side by side with the ratios tokenlab/SDPA and tokenlab/flex (> 1 = tokenlab faster);
then the variants (sinks, softcap, sliding window, sigmoid) against flex_attention expressing the
same function (sinks as an extra key of logit ``sink_h`` and value 0; sigmoid as flex with score
``log σ(s + b)`` times ``exp(LSE)``, which undoes the normalisation). Batch × length = 16k tokens and
heads = 2048 / head dim, as in the FlashAttention-2 benchmarks. FLOPs: forward 4·B·H·T·S·D (halved
when causal), backward 2.5× forward. Every configuration is first checked against a peer.
"""

from __future__ import annotations

import harness

harness.enable_interpreter_if_cpu()

import math  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

from tokenlab.attention import flash_attention  # noqa: E402
from tokenlab.testing import assert_relative_error  # noqa: E402

PASSES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def _flex_fn(device: torch.device):
    if device.type == "cuda":
        # Every shape and score/mask closure recompiles (dynamic=False): well over dynamo's default
        # limit of 8, past which dynamo runs flex eagerly: an unfused path that materialises the scores.
        torch._dynamo.config.recompile_limit = 256
        return torch.compile(flex_attention, dynamic=False)
    return flex_attention  # eager on CPU (correctness only)


def flex_variant(name: str, q, k, v, causal: bool, window: int, sinks, softcap: float, bias, flex):
    """A closure running flex_attention so that it computes tokenlab's ``name`` variant, plus the
    tokenlab keyword arguments of that variant."""
    B, T, S = q.shape[0], q.shape[2], k.shape[2]
    off = S - T
    compile_mask = q.device.type == "cuda"

    def causal_mod(b, h, qi, kj):
        return kj <= qi + off

    kwargs: dict = {"causal": causal}
    score_mod, mask_mod, kk, vv, post = None, causal_mod if causal else None, k, v, None
    if name == "sinks":
        kwargs["sinks"] = sinks
        sink_logits = sinks.detach()
        kk = torch.cat([k, torch.zeros_like(k[:, :, :1])], dim=2)
        vv = torch.cat([v, torch.zeros_like(v[:, :, :1])], dim=2)

        def score_mod(s, b, h, qi, kj):
            return torch.where(kj == S, sink_logits[h].to(s.dtype), s)

        def mask_mod(b, h, qi, kj):
            return (kj == S) | (kj <= qi + off) if causal else kj >= 0

    elif name == "softcap":
        kwargs["softcap"] = softcap

        def score_mod(s, b, h, qi, kj):
            return softcap * torch.tanh(s / softcap)

    elif name == "window":
        kwargs["window"] = window

        def mask_mod(b, h, qi, kj):
            return (kj <= qi + off) & (kj > qi + off - window)

    elif name == "sigmoid":
        kwargs.update(score_fn="sigmoid", sigmoid_bias=bias)

        def score_mod(s, b, h, qi, kj):
            return F.logsigmoid(s + bias[h].to(s.dtype))

        def post(out, lse):  # flex normalises by Σσ = exp(LSE): multiply it back
            return out * lse.exp()[..., None].to(out.dtype)

    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(
            mask_mod, B, None, T, kk.shape[2], device=q.device, _compile=compile_mask
        )

    def run():
        out, lse = flex(
            q, kk, vv, score_mod=score_mod, block_mask=block_mask, return_lse=True, enable_gqa=True
        )
        return out if post is None else post(out, lse)

    return run, kwargs


def timed_passes(fn, inputs, device, repeats) -> dict[str, float]:
    """Median ms of the forward, the backward alone (graph kept) and forward + backward."""
    out = fn()
    dout = torch.randn_like(out)
    ms = {"fwd": harness.time_fn(lambda: fn(), device, repeats=repeats)}
    ms["bwd"] = harness.time_fn(
        lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True), device, repeats=repeats
    )
    ms["fwd+bwd"] = harness.time_fn(lambda: torch.autograd.grad(fn(), inputs, dout), device, repeats=repeats)
    return ms


def check(fn, ref_fn, inputs, ref_inputs, tol, what):
    """Forward and input gradients of ``fn`` against ``ref_fn``; returns (fwd error, max bwd error)."""
    out, ref = fn(), ref_fn()
    dout = torch.randn_like(ref)
    err = assert_relative_error(out, ref, tol, f"{what} forward")
    grads = torch.autograd.grad(out, inputs, dout.to(out.dtype))
    grads_ref = torch.autograd.grad(ref, ref_inputs, dout)
    gerr = max(assert_relative_error(g, r, tol, f"{what} backward") for g, r in zip(grads, grads_ref))
    return err, gerr


def make_inputs(B, Hq, Hkv, T, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [
        torch.randn(B, H, T, D, generator=g, device=device, dtype=dtype).requires_grad_()
        for H in (Hq, Hkv, Hkv)
    ]


def quick_case(name: str, T: int, D: int, device, repeats: int) -> dict:
    """One tiny case: tokenlab Triton (interpreter) vs the float64 reference, flex (eager) vs reference."""
    q, k, v = make_inputs(1, 2, 1, T, D, torch.float32, device, seed=T + D)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    sinks, bias = torch.randn(2, device=device), torch.full((2,), -2.0, device=device)
    causal = name != "plain"
    flex_run, kwargs = flex_variant(
        name,
        *(t.detach() for t in ref_inputs),
        causal,
        16,
        sinks.double(),
        5.0,
        bias.double(),
        flex_attention,
    )
    err, gerr = check(
        lambda: flash_attention(q, k, v, backend="triton", **kwargs),
        lambda: flash_attention(*ref_inputs, backend="reference", **kwargs),
        (q, k, v), ref_inputs, 1e-5, f"triton {name} T={T} D={D}",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is not compiled
        ref = flash_attention(*(t.detach() for t in ref_inputs), backend="reference", **kwargs)
        flex_err = assert_relative_error(flex_run(), ref, 1e-10, f"flex {name}")
    ms = harness.time_fn(
        lambda: flash_attention(q, k, v, backend="triton", **kwargs), device, warmup=0, repeats=repeats
    )
    return {
        "case": name, "T": T, "D": D, "triton_fwd_err": err, "triton_bwd_err": gerr,
        "flex_vs_ref_err": flex_err, "triton_interp_ms": ms,
    }  # fmt: skip


def quick(args, device) -> list[dict]:
    """CPU/interpreter: tiny shapes, every variant, checked against the float64 reference."""
    cases = [("plain", 48, 64), ("causal", 70, 80), ("sinks", 48, 64), ("softcap", 70, 80)]
    cases += [("window", 70, 64), ("sigmoid", 48, 80)]
    return [quick_case(name, T, D, device, args.repeats or 1) for name, T, D in cases]


def full(
    device,
    repeats,
    lengths=(1024, 2048, 4096, 8192, 16384),
    head_dims=(64, 128),
    tokens=16384,
    dtype=torch.bfloat16,
) -> list[dict]:
    """GPU: timings of every peer (bf16), then the variants against flex_attention."""
    flex = _flex_fn(device)
    rows = []
    for D in head_dims:
        H = 2048 // D
        for causal in (False, True):
            for T in lengths:
                B = max(1, tokens // T)
                q, k, v = make_inputs(B, H, H, T, D, dtype, device)
                inputs = (q, k, v)
                flex_run, _ = flex_variant(
                    "causal" if causal else "plain", q, k, v, causal, 0, None, 0.0, None, flex
                )

                def sdpa(q=q, k=k, v=v, causal=causal):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                peers = {
                    "tokenlab": lambda q=q, k=k, v=v, c=causal: flash_attention(
                        q, k, v, causal=c, backend="triton"
                    ),
                    "sdpa_flash": sdpa,
                    "flex": flex_run,
                }
                if T <= 2048:  # the reference materialises [B, H, T, T] scores in float32
                    peers["reference"] = lambda q=q, k=k, v=v, c=causal: flash_attention(
                        q, k, v, causal=c, backend="reference"
                    )
                err = assert_relative_error(
                    peers["tokenlab"](), sdpa(), 2e-2, f"tokenlab vs SDPA T={T} D={D}"
                )
                flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
                timings = {name: timed_passes(fn, inputs, device, repeats) for name, fn in peers.items()}
                for p in PASSES:
                    row = {"D": D, "causal": causal, "T": T, "B": B, "H": H, "pass": p, "err_vs_sdpa": err}
                    for name, ms in timings.items():
                        row[f"{name}_ms"] = ms[p]
                        row[f"{name}_TFLOPs"] = flops * FLOP_FACTOR[p] / (ms[p] * 1e-3) / 1e12
                    row["tokenlab/sdpa"] = timings["sdpa_flash"][p] / timings["tokenlab"][p]
                    row["tokenlab/flex"] = timings["flex"][p] / timings["tokenlab"][p]
                    rows.append(row)
                del q, k, v, inputs, peers, timings
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    harness.print_table(rows, list(rows[0]))
    return rows + variants(
        device,
        dtype,
        flex,
        repeats,
        lengths=[T for T in lengths if T in (4096, 8192)] or lengths[:1],
        tokens=tokens,
    )


def variants(device, dtype, flex, repeats, lengths=(4096, 8192), tokens=16384, D=128) -> list[dict]:
    """sinks, softcap, sliding window (causal) and sigmoid at hd 128, T = 4k/8k: tokenlab vs flex."""
    rows = []
    H = 2048 // D
    for T in lengths:
        B = max(1, tokens // T)
        q, k, v = make_inputs(B, H, H, T, D, dtype, device)
        sinks = torch.randn(H, device=device, dtype=torch.float32, requires_grad=True)
        bias = torch.full((H,), -math.log(T), device=device, dtype=torch.float32)
        for name in ("sinks", "softcap", "window", "sigmoid"):
            rows += variant_rows(name, q, k, v, sinks, bias, flex, device, repeats)
    harness.print_table(rows, list(rows[0]))
    return rows


def variant_rows(name, q, k, v, sinks, bias, flex, device, repeats) -> list[dict]:
    T, D = q.shape[2], q.shape[3]
    flex_run, kwargs = flex_variant(name, q, k, v, True, 1024, sinks, 30.0, bias, flex)

    def ours():
        return flash_attention(q, k, v, backend="triton", **kwargs)

    err = assert_relative_error(ours(), flex_run(), 3e-2, f"tokenlab vs flex {name} T={T}")
    timings = {
        n: timed_passes(fn, (q, k, v), device, repeats) for n, fn in (("tokenlab", ours), ("flex", flex_run))
    }
    return [
        {
            "variant": name,
            "T": T,
            "D": D,
            "pass": p,
            "err_vs_flex": err,
            "tokenlab_ms": timings["tokenlab"][p],
            "flex_ms": timings["flex"][p],
            "tokenlab/flex": timings["flex"][p] / timings["tokenlab"][p],
        }
        for p in PASSES
    ]


def main() -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args()
    device = harness.device_from(args)
    if args.quick:
        rows = quick(args, device)
        harness.print_table(rows, list(rows[-1]))
    else:
        if device.type != "cuda":
            raise SystemExit("full mode needs a CUDA device; use --quick on CPU")
        rows = full(device, args.repeats or 20)
    harness.finish(args, device, "attention", rows)


if __name__ == "__main__":
    main()
