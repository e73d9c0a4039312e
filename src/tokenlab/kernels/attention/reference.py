"""Reference attention: the specification of the fused kernel, written to be read.

It materialises the ``[B, Hq, T, S]`` score matrix, so it costs O(T·S) memory; it supports every
flag of :class:`~tokenlab.kernels.attention.variant.AttentionVariant` and is differentiable by autograd
(for ``q``, ``k``, ``v``, ``sinks``, ``sigmoid_bias`` and ``initial_token_scale``).
"""

from __future__ import annotations

import torch

from tokenlab.kernels.attention.variant import AttentionVariant


def visible_keys(variant: AttentionVariant, T: int, S: int, *, device: torch.device) -> torch.Tensor:
    """Boolean ``[B or 1, 1, T, S]``: whether query ``i`` may attend to key ``j`` under the variant's
    ``causal``, ``window``, ``segment_ids`` and ``tree``.

    Query ``i`` sits at key position ``p = i + S − T`` (bottom-right alignment). ``causal``: ``j ≤ p``.
    ``window`` ``w``: ``p − w < j`` when causal (the ``w`` most recent keys, itself included), else
    ``|j − p| < w``. ``segment_ids [B, S]``: query ``i`` has segment ``segment_ids[:, p]``; ``i`` sees
    ``j`` when either segment is 0 or both are equal. ``tree [B, n]``: the last ``n`` keys are tree
    nodes; query ``i`` is node ``a = i − T + n`` (when ``a ≥ 0``) and sees tree key ``b = j − S + n`` only
    if bit ``b`` of ``tree[:, a]`` is set.
    """
    p = torch.arange(T, device=device)[:, None] + (S - T)
    j = torch.arange(S, device=device)[None, :]
    visible = torch.ones(T, S, dtype=torch.bool, device=device)
    if variant.causal:
        visible &= j <= p
    if variant.window is not None:
        visible &= (j > p - variant.window) if variant.causal else ((j - p).abs() < variant.window)
    visible = visible[None, None]
    if variant.segment_ids is not None:
        seg_k = variant.segment_ids[:, None, None, :]
        seg_q = variant.segment_ids[:, S - T :][:, None, :, None]
        visible = visible & ((seg_q == 0) | (seg_k == 0) | (seg_q == seg_k))
    if variant.tree is not None:
        n = variant.tree.shape[1]
        node_q = torch.arange(T, device=device) - T + n  # tree node of each query (< 0: before the tree)
        node_k = torch.arange(S, device=device) - S + n  # tree node of each key
        bits = variant.tree[:, node_q.clamp(min=0), None] >> node_k.clamp(min=0)  # [B, T, S]
        in_tree = (node_q[:, None] >= 0) & (node_k[None, :] >= 0)
        visible = visible & (~in_tree | (bits & 1).bool())[:, None]
    return visible


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    variant: AttentionVariant | None = None,
    mask: torch.Tensor | None = None,
    *,
    return_key_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Attention output ``[B, Hq, T, D]`` and log-sum-exp ``[B, Hq, T]`` (``None`` unless softmax), and
    with ``return_key_scores`` the per-key scores ``[B, Hq, S]`` (see below).

    Computed in at least float32 (float64 inputs stay float64); the output is cast back to ``q``'s
    dtype, the LSE stays in the accumulation dtype. Inputs are assumed validated by the caller
    (:meth:`AttentionVariant.validate`); ``variant=None`` is plain attention.

    1. scores ``s_ij = scale · q_i·k_j`` (key/value head ``h // (Hq/Hkv)`` for query head ``h``);
    2. ``softcap`` ``c``: ``s ← c·tanh(s/c)``;
    3. ``initial_token_scale`` ``γ``: ``s_i0 ← s_i0 + log γ_h``;
    4. keys outside :func:`visible_keys` (and outside the optional extra boolean ``mask``, broadcast
       to ``[B, Hq, T, S]``; used by the Hugging Face fallback) are dropped;
    5. ``softmax``: ``P_ij = exp(s_ij − L_i)``, ``L_i = log(Σ_j exp s_ij + exp sink_h)``; ``out = P v``;
       ``sigmoid``: ``out_i = Σ_j σ(s_ij + b_h) v_j``; ``relu``: ``out_i = Σ_j max(s_ij, 0) v_j``.

    A row with no visible key gets output 0 and ``L = sink_h`` (``−inf`` without sinks).

    The per-key score of key ``j`` is the attention it receives summed over the queries,
    ``Σ_i P_ij`` (the column sums of ``P``; the sink, which is no key, is not included), in the
    accumulation dtype and without gradient: the statistic of H2O's heavy hitters (*H2O:
    Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models*) and of the
    attention-sink metrics.
    """
    variant = AttentionVariant() if variant is None else variant
    B, Hq, T, D = q.shape
    S, Hkv = k.shape[2], k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    group = Hq // Hkv
    kk = k.to(acc).repeat_interleave(group, dim=1)
    vv = v.to(acc).repeat_interleave(group, dim=1)
    s = torch.einsum("bhtd,bhsd->bhts", q.to(acc), kk) * variant.scale_for(D)
    if variant.softcap is not None:
        s = variant.softcap * torch.tanh(s / variant.softcap)
    if variant.initial_token_scale is not None:
        first = torch.zeros(S, dtype=acc, device=q.device)
        first[0] = 1.0
        s = s + torch.log(variant.initial_token_scale.to(acc))[None, :, None, None] * first
    visible = visible_keys(variant, T, S, device=q.device)
    if mask is not None:
        visible = visible & mask
    visible = visible.expand(B, Hq, T, S)
    lse = None
    if variant.score_fn == "softmax":
        s = s.masked_fill(~visible, float("-inf"))
        empty = ~visible.any(dim=-1)
        if variant.sinks is not None:
            sink = variant.sinks.to(acc)[None, :, None, None].expand(B, Hq, T, 1)
            s = torch.cat([s, sink], dim=-1)
            empty = torch.zeros_like(empty)
        # Rows without any visible key take logsumexp over zeros so that no NaN reaches the backward.
        lse = torch.logsumexp(s.masked_fill(empty[..., None], 0.0), dim=-1)
        p = torch.exp(s - lse[..., None])[..., :S]
        lse = lse.masked_fill(empty, float("-inf"))
    elif variant.score_fn == "sigmoid":
        bias = 0.0 if variant.sigmoid_bias is None else variant.sigmoid_bias
        if isinstance(bias, torch.Tensor):
            bias = bias.to(acc)[None, :, None, None]
        p = torch.sigmoid(s + bias).masked_fill(~visible, 0.0)
    else:  # "relu"
        p = torch.relu(s).masked_fill(~visible, 0.0)
    out = torch.einsum("bhts,bhsd->bhtd", p, vv)
    if return_key_scores:
        return out.to(q.dtype), lse, p.detach().sum(dim=2)
    return out.to(q.dtype), lse
