"""Tour section: set-based prompting's order invariance on the toy target, and CARoPE reducing to RoPE."""

from __future__ import annotations

import itertools

import torch

from tokenlab.attention.rope import ContextAwareRotaryEmbedding, apply_rope
from tokenlab.attention.set_based_prompting import set_based_generate, set_based_inputs
from tokenlab.testing import relative_error
from tokenlab.toy import ToyWorld

PREFIX = "# settings\n"
PARTS = ("DEBUG = False\n", "import sys\n", "MAX_SIZE = 1024\n", "names = []\n")
SUFFIX = "def main("


def _spread(rows: list[torch.Tensor]) -> float:
    return max(float((r - rows[0]).abs().max()) for r in rows)


@torch.no_grad()
def tour_lines(world: ToyWorld) -> list[str]:
    """Max next-token logit difference over all 24 orders of 4 parts, set-based vs concatenated;
    greedy continuations; and CARoPE (W = 0) against RoPE."""
    model, tokenizer = world.target.eval(), world.tokenizer
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
    carope = ContextAwareRotaryEmbedding(64, 4, 16)  # initialised from RoPE: W = 0
    x, q, k = torch.randn(1, 32, 64), torch.randn(1, 4, 32, 16), torch.randn(1, 4, 32, 16)
    theta_1 = float(carope.frequencies(x)[0, 0, 0])
    rope = apply_rope(q, positions=torch.arange(1, 33), base=theta_1 ** (-16 / 2))
    error = relative_error(carope(x, q, k)[0], rope)
    return [
        f"set-based prompting, 4 parts × 24 orders: next-token logits differ by at most "
        f"{_spread(set_based):.1e} (plain concatenation: {_spread(concatenated):.2f})",
        f"greedy continuations over the 24 orders: {len(continuations)} distinct ({text!r})",
        f"CARoPE with W = 0 vs RoPE (θ_1 = {theta_1:.4f}, 32 tokens × 4 heads × 16 dims): "
        f"relative error {error:.1e}",
    ]
