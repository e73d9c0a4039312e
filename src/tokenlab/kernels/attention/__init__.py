"""Fused attention kernels beside their specification, for trusted (validated) inputs.

``variant.py`` holds :class:`AttentionVariant`, every flag in one validated structure;
``reference.py`` the specification (:func:`attention_reference`); ``kernel.py`` the Triton forward and
backward (:func:`attention_triton`) and the per-key score pass (:func:`key_scores_triton`), imported
lazily, on first use, so that importing tokenlab never imports triton. Validation and the backend
choice belong to the public op, :func:`tokenlab.attention.flash_attention`.
"""

from __future__ import annotations

import torch

from tokenlab.kernels.attention.reference import attention_reference, visible_keys
from tokenlab.kernels.attention.variant import (
    FLAGS,
    MAX_TREE_NODES,
    PER_HEAD_FLAGS,
    SCORE_FNS,
    AttentionVariant,
)

__all__ = [
    "FLAGS",
    "MAX_TREE_NODES",
    "PER_HEAD_FLAGS",
    "SCORE_FNS",
    "AttentionVariant",
    "attention_reference",
    "attention_triton",
    "key_scores_triton",
    "visible_keys",
]


def attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: AttentionVariant
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton kernel (forward; backward through autograd) on validated inputs: output ``[B, Hq, T,
    D]`` in ``q``'s dtype and the log-sum-exp ``[B, Hq, T]`` in float32 (float64 for float64 inputs),
    ``None`` unless softmax — as :func:`attention_reference` returns them.

    Differentiable in ``q``, ``k``, ``v``, ``sinks``, ``sigmoid_bias`` (and through the LSE);
    ``initial_token_scale`` is a constant. The backward is deterministic (no atomics).

    Raises:
        ValueError: a head dim outside [16, 256]; an ``initial_token_scale`` that requires grad while
            grad is enabled.
    """
    from tokenlab.kernels.attention.kernel import fused_attention

    return fused_attention(q, k, v, variant)


def key_scores_triton(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, variant: AttentionVariant
) -> torch.Tensor:
    """Per-key scores ``Σ_i P_ij`` ``[B, Hq, S]`` (softmax; accumulation dtype, no gradient) from the
    log-sum-exp ``[B, Hq, T]`` that :func:`attention_triton` returned for the same validated inputs,
    computed by a Triton pass over key blocks without materialising ``[T, S]``; equal to the
    ``return_key_scores`` output of :func:`attention_reference`."""
    from tokenlab.kernels.attention.kernel import fused_key_scores

    return fused_key_scores(q, k, lse, variant)
