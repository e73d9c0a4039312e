"""Reference attention: the specification of the fused kernel, written to be read.

It materialises the ``[B, Hq, T, S]`` score matrix, so it costs O(T·S) memory; it supports every
flag of :func:`tokenlab.attention.flash_attention` and is differentiable by autograd (for ``q``, ``k``,
``v``, ``sinks``, ``sigmoid_bias`` and ``initial_token_scale``).
"""

from __future__ import annotations

import torch

SCORE_FNS: tuple[str, ...] = ("softmax", "sigmoid", "relu")


def visible_keys(
    T: int,
    S: int,
    *,
    causal: bool,
    window: int | None,
    segment_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean ``[B or 1, 1, T, S]``: whether query ``i`` may attend to key ``j``.

    Query ``i`` sits at key position ``p = i + S − T`` (bottom-right alignment). ``causal``: ``j ≤ p``.
    ``window`` ``w``: ``p − w < j`` when causal (the ``w`` most recent keys, itself included), else
    ``|j − p| < w``. ``segment_ids [B, S]``: query ``i`` has segment ``segment_ids[:, p]``; ``i`` sees
    ``j`` when either segment is 0 or both are equal.
    """
    p = torch.arange(T, device=device)[:, None] + (S - T)
    j = torch.arange(S, device=device)[None, :]
    visible = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        visible &= j <= p
    if window is not None:
        visible &= (j > p - window) if causal else ((j - p).abs() < window)
    visible = visible[None, None]
    if segment_ids is not None:
        seg_k = segment_ids[:, None, None, :]
        seg_q = segment_ids[:, S - T :][:, None, :, None]
        visible = visible & ((seg_q == 0) | (seg_k == 0) | (seg_q == seg_k))
    return visible


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    score_fn: str = "softmax",
    sigmoid_bias: torch.Tensor | float | None = None,
    initial_token_scale: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention output ``[B, Hq, T, D]`` and log-sum-exp ``[B, Hq, T]`` (``None`` unless softmax).

    Computed in at least float32 (float64 inputs stay float64); the output is cast back to ``q``'s
    dtype, the LSE stays in the accumulation dtype. Inputs are assumed validated by the caller.

    1. scores ``s_ij = scale · q_i·k_j`` (key/value head ``h // (Hq/Hkv)`` for query head ``h``);
    2. ``softcap`` ``c``: ``s ← c·tanh(s/c)``;
    3. ``initial_token_scale`` ``γ``: ``s_i0 ← s_i0 + log γ_h``;
    4. keys outside :func:`visible_keys` (and outside the optional extra boolean ``mask``, broadcast
       to ``[B, Hq, T, S]``; used by the Hugging Face fallback) are dropped;
    5. ``softmax``: ``P_ij = exp(s_ij − L_i)``, ``L_i = log(Σ_j exp s_ij + exp sink_h)``; ``out = P v``;
       ``sigmoid``: ``out_i = Σ_j σ(s_ij + b_h) v_j``; ``relu``: ``out_i = Σ_j max(s_ij, 0) v_j``.

    A row with no visible key gets output 0 and ``L = sink_h`` (``−inf`` without sinks).
    """
    B, Hq, T, D = q.shape
    S, Hkv = k.shape[2], k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    group = Hq // Hkv
    kk = k.to(acc).repeat_interleave(group, dim=1)
    vv = v.to(acc).repeat_interleave(group, dim=1)
    s = torch.einsum("bhtd,bhsd->bhts", q.to(acc), kk) * (D**-0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if initial_token_scale is not None:
        first = torch.zeros(S, dtype=acc, device=q.device)
        first[0] = 1.0
        s = s + torch.log(initial_token_scale.to(acc))[None, :, None, None] * first
    visible = visible_keys(T, S, causal=causal, window=window, segment_ids=segment_ids, device=q.device)
    if mask is not None:
        visible = visible & mask
    visible = visible.expand(B, Hq, T, S)
    lse = None
    if score_fn == "softmax":
        s = s.masked_fill(~visible, float("-inf"))
        empty = ~visible.any(dim=-1)
        if sinks is not None:
            sink = sinks.to(acc)[None, :, None, None].expand(B, Hq, T, 1)
            s = torch.cat([s, sink], dim=-1)
            empty = torch.zeros_like(empty)
        # Rows without any visible key take logsumexp over zeros so that no NaN reaches the backward.
        lse = torch.logsumexp(s.masked_fill(empty[..., None], 0.0), dim=-1)
        p = torch.exp(s - lse[..., None])[..., :S]
        lse = lse.masked_fill(empty, float("-inf"))
    elif score_fn == "sigmoid":
        bias = 0.0 if sigmoid_bias is None else sigmoid_bias
        if isinstance(bias, torch.Tensor):
            bias = bias.to(acc)[None, :, None, None]
        p = torch.sigmoid(s + bias).masked_fill(~visible, 0.0)
    elif score_fn == "relu":
        p = torch.relu(s).masked_fill(~visible, 0.0)
    else:
        raise ValueError(f"`score_fn` must be one of {SCORE_FNS}, got {score_fn!r}")
    out = torch.einsum("bhts,bhsd->bhtd", p, vv)
    return out.to(q.dtype), lse
