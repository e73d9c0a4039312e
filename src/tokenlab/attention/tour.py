"""Tour section for the fused attention kernel: kernel vs reference, and the toy target running on it."""

from __future__ import annotations

import copy
import os

import torch

from tokenlab.kernels.attention import flash_attention
from tokenlab.testing import relative_error
from tokenlab.toy import ToyWorld


def _kernel_vs_reference(device: torch.device) -> str:
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, S, D = 1, 4, 2, 45, 70, 80
    q, k, v = (
        torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for H, L in ((Hq, T), (Hkv, S), (Hkv, S))
    )
    sinks = torch.randn(Hq, generator=g, dtype=torch.float64)
    results = {}
    for backend in ("reference", "triton"):
        inputs = [t.to(device).requires_grad_() for t in (q, k, v, sinks)]
        out = flash_attention(
            *inputs[:3], causal=True, window=48, sinks=inputs[3], softcap=20.0, backend=backend
        )
        results[backend] = (out, torch.autograd.grad(out.square().sum(), inputs))
    fwd = relative_error(results["triton"][0], results["reference"][0])
    bwd = max(relative_error(a, b) for a, b in zip(results["triton"][1], results["reference"][1]))
    return (
        f"kernel vs reference, float64, q [1,4,45,80] k/v [1,2,70,80], causal+window+sinks+softcap: "
        f"rel. error fwd {fwd:.1e}, bwd (q,k,v,sinks) {bwd:.1e}"
    )


def tour_section(world: ToyWorld) -> list[str]:
    """Kernel vs reference on a random case; the toy target on ``attn_implementation="tokenlab"``
    (reference and Triton paths) vs eager attention: logits and greedy continuation."""
    from tokenlab.attention.hf import ATTN_IMPLEMENTATION, configure_attention

    device = world.target.device
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is first imported
    where = "compiled on GPU" if device.type == "cuda" else "Triton interpreter on CPU"
    lines = [_kernel_vs_reference(device) + f" [{where}]"]

    eager = copy.deepcopy(world.target).eval()
    eager.set_attn_implementation("eager")
    ours = copy.deepcopy(world.target).eval()
    ours.set_attn_implementation(ATTN_IMPLEMENTATION)
    ids = world.heldout_ids[: 2 * 48].reshape(2, 48).to(device)
    with torch.no_grad():
        expected = eager(ids).logits
        greedy = eager.generate(ids[:1, :16], max_new_tokens=8, do_sample=False)
        for backend in ("reference", "triton"):
            configure_attention(ours, backend=backend)
            diff = (ours(ids).logits - expected).abs().max().item()
            same = torch.equal(ours.generate(ids[:1, :16], max_new_tokens=8, do_sample=False), greedy)
            lines.append(
                f"toy target, attn_implementation='{ATTN_IMPLEMENTATION}' ({backend}): max |Δ logit| vs "
                f"eager {diff:.1e} on 2×48 held-out tokens; 8-token greedy continuation identical: {same}"
            )
    return lines
