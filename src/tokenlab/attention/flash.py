"""The public fused attention op: :func:`flash_attention` validates its arguments once, applies the
dispatch rule of :mod:`tokenlab.backend` and runs the kernel package's Triton kernel or reference."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tokenlab._checks import check_bool
from tokenlab.backend import Backend, resolve_backend
from tokenlab.kernels.attention import (
    AttentionVariant,
    attention_reference,
    attention_triton,
    key_scores_triton,
)

__all__ = ["flash_attention"]


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    variant: AttentionVariant | None = None,
    *,
    return_lse: bool = False,
    return_key_scores: bool = False,
    backend: Backend = "auto",
    **flags: Any,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Exact attention with variant flags, fused in one Triton kernel (forward and backward).

    Kernel after *FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness* and
    *FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning*. The flags,
    their formulas and their papers are documented on
    :class:`~tokenlab.kernels.attention.AttentionVariant`; pass them as a variant, as keywords
    (``flash_attention(q, k, v, causal=True, sinks=s)``), or both (the keywords replace the variant's
    fields).

    Shapes: ``q [B, Hq, T, D]``, ``k``/``v`` ``[B, Hkv, S, D]`` with ``Hq % Hkv == 0`` (GQA: query head
    ``h`` reads key/value head ``h // (Hq / Hkv)``). Query ``i`` sits at key position ``p_i = i + S − T``
    (bottom-right alignment, as in prefill or decoding with a KV cache).

    With scores ``s_ij = scale · q_i·k_j`` (``scale`` defaults to ``D^-1/2``; softcap and initial-token
    scale apply to them) and the keys ``j`` visible to query ``i`` (causal, window, segment ids), the
    softmax output is ``out_i = Σ_j P_ij v_j``, ``P_ij = exp(s_ij − L_i)``, where
    ``L_i = log(Σ_j exp s_ij + exp sink_h)`` is the log-sum-exp (the sink term only with ``sinks``).
    Sigmoid and ReLU scores replace ``P`` by unnormalised weights. A row with no visible key outputs 0
    and has ``L_i = sink_h`` (``−inf`` without sinks).

    Args:
        variant: the flags; ``None`` means the default :class:`AttentionVariant` (plain attention).
        return_lse: also return ``L [B, Hq, T]`` (softmax only) in float32 (float64 for float64 inputs).
        return_key_scores: also return the per-key scores ``[B, Hq, S]``, ``Σ_i P_ij``: the attention
            each key receives summed over the queries (softmax only; same dtype as the LSE; no
            gradient). The Triton path computes them from the forward's LSE in a pass over key
            blocks, without materialising ``[T, S]`` — the statistic of H2O's heavy hitters
            (*H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models*).
        backend: ``"auto"`` (Triton on CUDA, reference otherwise), ``"triton"`` or ``"reference"``.
        **flags: fields of :class:`AttentionVariant` by name.

    Returns:
        ``out [B, Hq, T, D]`` in ``q``'s dtype, or the tuple ``(out, lse)``, ``(out, key_scores)`` or
        ``(out, lse, key_scores)`` as requested. Both backends are differentiable in
        ``q``, ``k``, ``v``, ``sinks``, ``sigmoid_bias`` (and the LSE); ``initial_token_scale`` is a
        constant on the Triton path (ZeroTuning tunes it without training; use the reference for its
        gradient). The Triton backward is deterministic (no atomics).

    Raises:
        ValueError / TypeError naming the argument, before any work: shapes, dtypes, devices, head
        counts, flag values (``window ≤ 0``, ``softcap ≤ 0``, …), per-head tensors not ``[Hq]``,
        ``segment_ids`` not ``[B, S]``, flags that do not apply to ``score_fn``, and (Triton) head dims
        outside [16, 256].
    """
    if variant is None:
        variant = AttentionVariant(**flags)
    elif not isinstance(variant, AttentionVariant):
        raise TypeError(f"`variant` must be an AttentionVariant or None, got {type(variant).__name__}")
    elif flags:
        variant = dataclasses.replace(variant, **flags)
    impl = resolve_backend(backend, q=q, k=k, v=v, **variant.tensors())
    variant.validate(q, k, v)
    for name, wanted in (("return_lse", return_lse), ("return_key_scores", return_key_scores)):
        check_bool(name, wanted)
        if wanted:
            variant.require_score_fn(name, "softmax")
    if impl == "triton":
        out, lse = attention_triton(q, k, v, variant)
        scores = key_scores_triton(q, k, lse, variant) if return_key_scores else None
    else:
        out, lse, *scores = attention_reference(q, k, v, variant, return_key_scores=return_key_scores)
        scores = scores[0] if scores else None
    extras = [t for t, wanted in ((lse, return_lse), (scores, return_key_scores)) if wanted]
    return (out, *extras) if extras else out
