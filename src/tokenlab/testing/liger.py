"""Liger-Kernel as a peer: its fused-linear DPO and GRPO losses on the same hidden states and LM head.

Liger-Kernel (``pip install liger-kernel --no-deps``, an optional test/benchmark dependency) computes
each chunk's input and weight gradients during the forward pass (``torch.func.grad_and_value`` for DPO,
``torch.autograd.grad`` for GRPO). On CPU its losses must run with ``compiled=False``. These adapters
only call its public ``torch.nn.Module`` losses; nothing of Liger's is copied here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def liger_dpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    *,
    beta: float,
    chunk_size: int = 1,
    compiled: bool = False,
) -> Tensor:
    """``LigerFusedLinearDPOLoss`` (sigmoid DPO, summed log-probs, reference logits from ``ref_hidden``).

    ``hidden``/``ref_hidden`` ``[2B, T, H]`` hold the B chosen completions, then the B rejected ones;
    ``labels`` ``[2B, T]`` with ``-100`` for ignored tokens; ``chunk_size`` counts pairs."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(
        beta=beta, compiled=compiled, use_ref_model=True, average_log_prob=False, chunk_size=chunk_size
    )
    return loss_fn(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)[0]


def liger_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    mask: Tensor,
    advantages: Tensor,
    *,
    ref_logps: Tensor | None,
    old_logps: Tensor | None,
    beta: float,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    chunk_size: int = 1,
    compiled: bool = False,
) -> Tensor:
    """``LigerFusedLinearGRPOLoss`` on hidden states ``[B, T, H]``; ``labels`` ``[B, T]`` are the sampled
    tokens, ``mask`` ``[B, T]`` the completion mask, ``advantages`` ``[B]``; ``chunk_size`` counts rows."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(
        beta=beta,
        compiled=compiled,
        use_ref_model=beta > 0,
        chunk_size=chunk_size,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        max_completion_length=labels.shape[1],
    )
    return loss_fn(
        hidden,
        weight,
        labels.clamp(min=0),
        mask.to(torch.long),
        advantages,
        ref_per_token_logps=ref_logps,
        old_per_token_logps=old_logps,
    )[0]
