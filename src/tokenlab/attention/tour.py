"""Tour section for the fused attention kernel: kernel vs reference, and the toy target running on it."""

from __future__ import annotations

import copy
import os
import sys

import torch

from tokenlab.backend import triton_interpreter_enabled
from tokenlab.kernels.attention import flash_attention
from tokenlab.testing import relative_error
from tokenlab.toy import ToyWorld


def _kernel_vs_reference(device: torch.device) -> str:
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, S, D = 1, 2, 1, 40, 50, 80
    q, k, v = (
        torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for H, L in ((Hq, T), (Hkv, S), (Hkv, S))
    )
    sinks = torch.randn(Hq, generator=g, dtype=torch.float64)
    results = {}
    for backend in ("reference", "triton"):
        inputs = [t.to(device).requires_grad_() for t in (q, k, v, sinks)]
        out = flash_attention(
            *inputs[:3], causal=True, window=24, sinks=inputs[3], softcap=20.0, backend=backend
        )
        results[backend] = (out, torch.autograd.grad(out.square().sum(), inputs))
    fwd = relative_error(results["triton"][0], results["reference"][0])
    bwd = max(relative_error(a, b) for a, b in zip(results["triton"][1], results["reference"][1]))
    return (
        f"kernel vs reference, float64, q [1,2,40,80] k/v [1,1,50,80], causal+window+sinks+softcap: "
        f"rel. error fwd {fwd:.1e}, bwd (q,k,v,sinks) {bwd:.1e}"
    )


def _triton_runnable(device: torch.device) -> bool:
    """Whether the kernel can run here; on CPU this switches the interpreter on if still possible.

    Under the interpreter, ``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported
    (``triton.language``'s own jit helpers are created at import), not merely before tokenlab's kernel.
    """
    if device.type == "cuda" or triton_interpreter_enabled():
        return True
    if "triton" in sys.modules:
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def tour_section(world: ToyWorld) -> list[str]:
    """Kernel vs reference on a random case; the toy target on ``attn_implementation="tokenlab"``
    (reference and Triton paths) vs eager attention: logits and greedy continuation."""
    from tokenlab.attention.hf import ATTN_IMPLEMENTATION, configure_attention

    device = world.target.device
    backends = ["reference"]
    if _triton_runnable(device):
        where = "compiled on GPU" if device.type == "cuda" else "Triton interpreter on CPU"
        lines = [_kernel_vs_reference(device) + f" [{where}]"]
        backends.append("triton")
    else:
        lines = ["Triton kernel skipped: triton was imported before TRITON_INTERPRET=1 was set "
                 "(run `TRITON_INTERPRET=1 python -m tokenlab.tour` to include it on CPU)"]  # fmt: skip

    eager = copy.deepcopy(world.target).eval()
    eager.set_attn_implementation("eager")
    ours = copy.deepcopy(world.target).eval()
    ours.set_attn_implementation(ATTN_IMPLEMENTATION)
    ids = world.heldout_ids[:48][None].to(device)
    with torch.no_grad():
        expected = eager(ids).logits
        greedy = eager.generate(ids[:, :12], max_new_tokens=4, do_sample=False)
        for backend in backends:
            configure_attention(ours, backend=backend)
            diff = (ours(ids).logits - expected).abs().max().item()
            line = f"toy target on attn_implementation='{ATTN_IMPLEMENTATION}' ({backend}): "
            line += f"max |Δ logit| vs eager {diff:.1e} on 48 held-out tokens"
            if backend == "reference" or device.type == "cuda":  # the interpreter is too slow to decode
                same = torch.equal(ours.generate(ids[:, :12], max_new_tokens=4, do_sample=False), greedy)
                line += f"; 4-token greedy continuation with KV cache identical: {same}"
            lines.append(line)
    return lines
