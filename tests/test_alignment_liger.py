"""Liger-Kernel as an oracle: tokenlab's ``chunked_loss`` DPO and GRPO equal Liger-Kernel's fused-linear
losses (``LigerFusedLinearDPOLoss``, ``LigerFusedLinearGRPOLoss``, ``compiled=False`` on CPU) in value and in
the gradients of the hidden states and the LM head, on the same inputs: ragged completions, a chunk size that
splits sequences.

Liger computes its log-softmax in float32 whatever the input dtype, so float64 inputs agree to float32
rounding (measured ≈ 1e-7 relative); the tolerance is 1e-5. tokenlab itself equals the float64 reference to
1e-12 (``test_alignment_fused.py``).
"""

from __future__ import annotations

import pytest
import torch

from tokenlab.alignment import Completions, LinearHead, chunked_loss, dpo_loss, group_advantages, grpo_loss
from tokenlab.testing import relative_error
from tokenlab.testing.liger import liger_dpo_loss, liger_grpo_loss

pytest.importorskip("liger_kernel.chunked_loss")

B, T, H, V = 4, 7, 8, 37
TOL = 1e-5


def _inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100  # prompt tokens
    labels[1, 5:] = -100  # a shorter completion
    return {
        "hidden": randn(B, T, H),
        "weight": randn(V, H, scale=0.5),
        "ref_hidden": randn(B, T, H),
        "ref_weight": randn(V, H, scale=0.5),
        "labels": labels,
    }


def _leaves(x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()


def _assert_close(ours, theirs) -> None:
    """Loss values absolutely (GRPO's is ≈ 0 at β = 0: advantages centred per group), gradients relatively."""
    (value, *grads), (value_ref, *grads_ref) = ours, theirs
    assert abs(value.item() - value_ref.item()) < TOL * max(1.0, abs(value_ref.item()))
    for a, b in zip(grads, grads_ref):
        assert relative_error(a, b) < TOL


@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_dpo_equals_liger(seed):
    x = _inputs(seed)
    labels = x["labels"]
    hidden, weight = _leaves(x)

    def side(rows):
        reference = LinearHead(x["ref_hidden"][rows], x["ref_weight"])
        return Completions(LinearHead(hidden[rows], weight), labels[rows], reference, None)

    ours = chunked_loss(dpo_loss, side(slice(0, 2)), side(slice(2, 4)), beta=0.1, chunk_size=5).loss
    ours_grads = torch.autograd.grad(ours, (hidden, weight))

    hidden_l, weight_l = _leaves(x)
    theirs = liger_dpo_loss(hidden_l, weight_l, labels, x["ref_hidden"], x["ref_weight"], beta=0.1)
    theirs_grads = torch.autograd.grad(theirs, (hidden_l, weight_l))
    _assert_close((ours, *ours_grads), (theirs.to(ours.dtype), *theirs_grads))


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_chunked_grpo_equals_liger(beta):
    x = _inputs(2)
    labels = x["labels"]
    mask = (labels != -100).long()
    advantages = group_advantages(torch.randn(B, generator=torch.Generator().manual_seed(3)).double(), 2)
    ref_logits = x["ref_hidden"] @ x["ref_weight"].T
    ref_logps = torch.log_softmax(ref_logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    hidden, weight = _leaves(x)
    sequences = Completions(LinearHead(hidden, weight), labels, None, ref_logps)
    ours = chunked_loss(grpo_loss, sequences, chunk_size=5, advantages=advantages, beta=beta).loss
    ours_grads = torch.autograd.grad(ours, (hidden, weight))

    hidden_l, weight_l = _leaves(x)
    theirs = liger_grpo_loss(
        hidden_l,
        weight_l,
        labels,
        mask,
        advantages,
        ref_logps=ref_logps if beta else None,
        old_logps=None,
        beta=beta,
    )
    theirs_grads = torch.autograd.grad(theirs, (hidden_l, weight_l))
    _assert_close((ours, *ours_grads), (theirs.to(ours.dtype), *theirs_grads))
