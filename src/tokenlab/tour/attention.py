"""Tour section for attention: the fused kernel vs its reference, the toy target running on it, set-based
prompting's order invariance, and CARoPE reducing to RoPE."""

from __future__ import annotations

import copy
import itertools

import torch

from tokenlab.attention.flash import flash_attention
from tokenlab.attention.rope import ContextAwareRotaryEmbedding, apply_rope
from tokenlab.attention.set_based_prompting import set_based_generate, set_based_inputs
from tokenlab.backend import triton_interpreter_enabled
from tokenlab.testing import relative_error
from tokenlab.tour.toy import ToyWorld


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


PREFIX = "# settings\n"
PARTS = ("DEBUG = False\n", "import sys\n", "MAX_SIZE = 1024\n", "names = []\n")
SUFFIX = "def main("


def _spread(rows: list[torch.Tensor]) -> float:
    return max(float((r - rows[0]).abs().max()) for r in rows)


@torch.no_grad()
def _set_based_and_carope(world: ToyWorld) -> list[str]:
    """Max next-token logit difference over all 24 orders of 4 parts, set-based vs concatenated;
    greedy continuations; and CARoPE (W = 0) against RoPE."""
    model, tokenizer = world.target, world.tokenizer
    device = next(model.parameters()).device
    set_based, concatenated, continuations = [], [], set()
    for order in itertools.permutations(PARTS):
        inputs = set_based_inputs(tokenizer, PREFIX, order, SUFFIX, dtype=model.dtype, device=device)
        set_based.append(model(**inputs.model_inputs()).logits[0, -1])
        ids = tokenizer(PREFIX + "".join(order) + SUFFIX, return_tensors="pt").input_ids.to(device)
        concatenated.append(model(ids).logits[0, -1])
        continuations.add(tuple(set_based_generate(model, tokenizer, PREFIX, order, SUFFIX, 6)[0].tolist()))
    text = tokenizer.decode(next(iter(continuations)))

    torch.manual_seed(0)
    carope = ContextAwareRotaryEmbedding(64, 4, 16)  # initialised from RoPE: W = 0, the paper's exponents
    x, q, k = torch.randn(1, 32, 64), torch.randn(1, 4, 32, 16), torch.randn(1, 4, 32, 16)
    theta_1 = float(carope.frequencies(x)[0, 0, 0])
    # exponents i = 1 … D/2: m·θ_1^i is RoPE at the positions θ_1·m
    rope = apply_rope(q, positions=theta_1 * torch.arange(1, 33), base=theta_1 ** (-16 / 2))
    error = relative_error(carope(x, q, k)[0], rope)
    return [
        f"set-based prompting, 4 parts × 24 orders: next-token logits differ by at most "
        f"{_spread(set_based):.1e} (plain concatenation: {_spread(concatenated):.2f})",
        f"greedy continuations over the 24 orders: {len(continuations)} distinct ({text!r})",
        f"CARoPE with W = 0 vs RoPE (θ_1 = {theta_1:.4f}, 32 tokens × 4 heads × 16 dims): "
        f"relative error {error:.1e}",
    ]


def tour_section(world: ToyWorld) -> list[str]:
    """Kernel vs reference on a random case; the toy target on ``attn_implementation="tokenlab"``
    (reference and Triton paths) vs eager attention: logits and greedy continuation."""
    from tokenlab.attention.hf import ATTN_IMPLEMENTATION, configure_attention, register_attention

    register_attention()

    device = world.target.device
    backends = ["reference"]
    if device.type == "cuda" or triton_interpreter_enabled():
        where = "compiled on GPU" if device.type == "cuda" else "Triton interpreter on CPU"
        lines = [_kernel_vs_reference(device) + f" [{where}]"]
        backends.append("triton")
    else:
        lines = ["Triton kernel skipped: on CPU it needs TRITON_INTERPRET=1 set before triton is imported"]

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
    return lines + _set_based_and_carope(world)
