"""The alignment section of ``python -m tokenlab.tour``: memory the chunked path saves on a DPO loss over the
toy target's real hidden states, and the held-out DPO margin before/after a few training steps."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenlab.alignment.common import TokenLogps
from tokenlab.alignment.fused_linear import LinearHead, token_stats
from tokenlab.alignment.hf import causal_lm_head, shift_for_next_token
from tokenlab.alignment.preference import dpo_loss
from tokenlab.tour.preference import preference_margin, shuffled_continuation_pairs, train_preference
from tokenlab.tour.toy import ToyWorld


def saved_for_backward_bytes(fn: Callable[[], torch.Tensor], *inputs: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps between ``fn()``'s forward and backward, not counting storage
    shared with ``inputs`` (hidden states, weights). This is the activation memory chunking removes."""
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def tour_section(world: ToyWorld) -> list[str]:
    """Report lines: chunked-vs-naive memory on one DPO loss; DPO margin before/after a few steps."""
    target = world.target
    pairs = shuffled_continuation_pairs(world.train_ids, 16, prompt_len=24, completion_len=16, seed=0)
    heads = []
    for ids in (pairs.chosen_ids, pairs.rejected_ids):
        with torch.no_grad():
            head, labels = shift_for_next_token(causal_lm_head(target, ids), ids, pairs.completion_mask)
        heads.append((LinearHead(head.hidden.detach().requires_grad_(True), head.weight), labels))
    mask = pairs.completion_mask[:, 1:].float()
    V = target.get_output_embeddings().weight.shape[0]
    n_tokens = 2 * mask.numel()

    def loss(backend: str) -> torch.Tensor:
        chosen, rejected = (token_stats(h, y, chunk_size=128, backend=backend).logps for h, y in heads)
        ref = [t.detach() for t in (chosen, rejected)]
        return dpo_loss(
            TokenLogps(chosen, mask, ref_logps=ref[0]), TokenLogps(rejected, mask, ref_logps=ref[1]), beta=0.1
        ).loss

    inputs = [t for h, _ in heads for t in (h.hidden, h.weight)]
    naive = saved_for_backward_bytes(lambda: loss("reference"), *inputs)
    chunked = saved_for_backward_bytes(lambda: loss("chunked"), *inputs)
    lines = [
        f"DPO on {n_tokens} tokens, V={V} (CPU, activation memory kept for backward): "
        f"naive {naive / 2**20:.2f} MiB, chunked {chunked / 2**20:.3f} MiB ({chunked / naive:.3f}x)"
    ]
    heldout = shuffled_continuation_pairs(world.heldout_ids, 8, prompt_len=16, completion_len=12, seed=1)
    train = shuffled_continuation_pairs(world.train_ids, 32, prompt_len=16, completion_len=12, seed=2)
    before = preference_margin(target, target, heldout)
    policy, losses = train_preference(target, train, steps=3, batch_size=8, learning_rate=1e-3)
    after = preference_margin(policy, target, heldout)
    lines.append(
        f"DPO (β=0.1) on real-vs-shuffled stdlib continuations, 3 steps: "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, held-out margin {before:.3f} -> {after:.3f} nats"
    )
    return lines
