"""Fused attention with variant flags: the public :func:`flash_attention` and its dispatch.

``reference.py`` is the specification; ``kernel.py`` the Triton forward/backward, imported lazily (on
first use).
"""

from __future__ import annotations

import math
import numbers

import torch

from tokenlab.backend import Backend, resolve_backend
from tokenlab.kernels.attention.reference import SCORE_FNS, attention_reference, visible_keys

__all__ = ["SCORE_FNS", "attention_reference", "flash_attention", "visible_keys"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # Triton path: head dims padded to a power of two in [16, 256]


def _check_number(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"`{name}` must be finite{' and > 0' if positive else ''}, got {value}")
    return float(value)


def _check_per_head(name: str, value: torch.Tensor, heads: int) -> None:
    if not value.is_floating_point() or value.shape != (heads,):
        raise ValueError(
            f"`{name}` must be a floating-point tensor of shape [Hq] = [{heads}], "
            f"got {value.dtype} {tuple(value.shape)}"
        )


def _validate(q, k, v, *, causal, window, scale, sinks, softcap, score_fn, sigmoid_bias,
              initial_token_scale, segment_ids, return_lse):  # fmt: skip
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"`{name}` must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"`{name}` must be float16/bfloat16/float32/float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"`q`, `k`, `v` must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"`k` and `v` must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, _T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"`k` must be [B={B}, Hkv, S, D={D}] to match `q`, got {tuple(k.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"`q` heads ({Hq}) must be a multiple of `k`/`v` heads ({k.shape[1]})")
    if not isinstance(causal, bool):
        raise TypeError(f"`causal` must be a bool, got {type(causal).__name__}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral):
            raise TypeError(f"`window` must be an int or None, got {type(window).__name__}")
        if window <= 0:
            raise ValueError(f"`window` must be > 0, got {window}")
    if scale is not None:
        _check_number("scale", scale, positive=False)
    if softcap is not None:
        _check_number("softcap", softcap, positive=True)
    if score_fn not in SCORE_FNS:
        raise ValueError(f"`score_fn` must be one of {SCORE_FNS}, got {score_fn!r}")
    softmax_only = {"sinks": sinks, "initial_token_scale": initial_token_scale}
    if return_lse:
        softmax_only["return_lse"] = True
    for name, value in softmax_only.items():
        if value is not None and score_fn != "softmax":
            raise ValueError(f"`{name}` is defined for score_fn='softmax' only, got {score_fn!r}")
    if sigmoid_bias is not None and score_fn != "sigmoid":
        raise ValueError(f"`sigmoid_bias` is defined for score_fn='sigmoid' only, got {score_fn!r}")
    if sinks is not None:
        _check_per_head("sinks", sinks, Hq)
    if isinstance(sigmoid_bias, torch.Tensor):
        _check_per_head("sigmoid_bias", sigmoid_bias, Hq)
    elif sigmoid_bias is not None:
        _check_number("sigmoid_bias", sigmoid_bias, positive=False)
    if initial_token_scale is not None:
        _check_per_head("initial_token_scale", initial_token_scale, Hq)
        if not bool((initial_token_scale > 0).all()):
            raise ValueError("`initial_token_scale` must be > 0 (it multiplies the weight of key 0)")
    if segment_ids is not None:
        if segment_ids.is_floating_point() or segment_ids.is_complex() or segment_ids.dtype == torch.bool:
            raise TypeError(f"`segment_ids` must be an integer tensor, got {segment_ids.dtype}")
        if segment_ids.shape != (B, k.shape[2]):
            raise ValueError(
                f"`segment_ids` must be [B, S] = [{B}, {k.shape[2]}] (one id per key), "
                f"got {tuple(segment_ids.shape)}"
            )
        if q.shape[2] > k.shape[2]:
            raise ValueError(
                f"`segment_ids` needs T <= S (query i takes the id of key position i + S - T), "
                f"got T={q.shape[2]}, S={k.shape[2]}"
            )


class _FlashAttentionFn(torch.autograd.Function):
    """Autograd around the Triton kernels: grads for ``q``, ``k``, ``v``, ``sinks``, ``sigmoid_bias``
    (and through the returned LSE)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, sigmoid_bias, log_gamma, segment_ids, options):
        from tokenlab.kernels.attention.kernel import attention_forward_triton

        out, lse = attention_forward_triton(
            q, k, v, sinks=sinks, sigmoid_bias=sigmoid_bias, log_gamma=log_gamma,
            segment_ids=segment_ids, **options,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, sinks, sigmoid_bias, log_gamma, segment_ids)
        ctx.options = options
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from tokenlab.kernels.attention.kernel import attention_backward_triton

        q, k, v, out, lse, sinks, sigmoid_bias, log_gamma, segment_ids = ctx.saved_tensors
        dq, dk, dv, delta, dbias_rows = attention_backward_triton(
            q, k, v, out, lse, dout, dlse if ctx.options["score_fn"] == "softmax" else None,
            sigmoid_bias=sigmoid_bias, log_gamma=log_gamma, segment_ids=segment_ids, **ctx.options,
        )  # fmt: skip
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            # The sink is a key with logit sink_h and no value: dS_sink = P_sink · (0 − Δ), where Δ
            # already includes the LSE's own gradient (Δ − dlse).
            p_sink = torch.exp(sinks[None, :, None] - lse)
            dsinks = -(p_sink * delta).sum(dim=(0, 2))
        dbias = dbias_rows.sum(dim=(0, 2)) if ctx.needs_input_grad[4] else None
        return dq, dk, dv, dsinks, dbias, None, None, None


def flash_attention(
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
    return_lse: bool = False,
    backend: Backend = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention with variant flags, fused in one Triton kernel (forward and backward).

    Kernel after *FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness* and
    *FlashAttention-2*; flags after *When Attention Sink Emerges in Language Models* (``sinks``,
    ``score_fn="sigmoid"``), *Active-Dormant Attention Heads* (``score_fn="relu"``), ZeroTuning
    (``initial_token_scale``) and set-based prompting (``segment_ids``).

    Shapes: ``q [B, Hq, T, D]``, ``k``/``v`` ``[B, Hkv, S, D]`` with ``Hq % Hkv == 0`` (GQA: query head
    ``h`` reads key/value head ``h // (Hq / Hkv)``). Query ``i`` sits at key position ``p_i = i + S − T``
    (bottom-right alignment, as in prefill or decoding with a KV cache).

    Scores ``s_ij = scale · q_i·k_j`` (``scale`` defaults to ``D^-1/2``), then

    * ``softcap`` ``c``: ``s ← c·tanh(s/c)``;
    * ``initial_token_scale`` ``γ [Hq]`` (> 0): ``s_i0 ← s_i0 + log γ_h`` (softmax weight of key 0
      multiplied by ``γ_h``, rows renormalised);
    * visibility: ``causal``: ``j ≤ p_i``; ``window`` ``w`` (> 0): with ``causal``, ``p_i − w < j ≤ p_i``
      (the ``w`` most recent keys, the query's own included, as in Mistral/Qwen2 sliding windows),
      without it ``|j − p_i| < w``; ``segment_ids [B, S]``: query ``i`` has id ``segment_ids[:, p_i]``
      (the last ``T`` ids; needs ``T ≤ S``) and sees key ``j`` iff either id is 0 (shared) or both are
      equal.

    ``score_fn="softmax"``: ``out_i = Σ_j P_ij v_j`` with ``P_ij = exp(s_ij − L_i)`` over visible ``j``,
    where ``L_i = log(Σ_j exp s_ij + exp sink_h)`` is the log-sum-exp (``sinks [Hq]``: a logit in
    every denominator with no value; absent, the term is dropped). ``score_fn="sigmoid"``:
    ``out_i = Σ_j σ(s_ij + b_h) v_j`` (``sigmoid_bias`` ``b``: number or ``[Hq]``, default 0);
    ``score_fn="relu"``: ``out_i = Σ_j max(s_ij, 0) v_j``; neither is normalised.

    A row with no visible key outputs 0 and has ``L_i = sink_h`` (``−inf`` without sinks).

    Args:
        return_lse: also return ``L [B, Hq, T]`` (softmax only) in float32 (float64 for float64 inputs).
        backend: ``"auto"`` (Triton on CUDA, reference otherwise), ``"triton"`` or ``"reference"``.

    Returns:
        ``out [B, Hq, T, D]`` in ``q``'s dtype, or ``(out, lse)``. Both backends are differentiable in
        ``q``, ``k``, ``v``, ``sinks``, ``sigmoid_bias`` (and the LSE); ``initial_token_scale`` is a
        constant on the Triton path (ZeroTuning tunes it without training; use the reference for its
        gradient). The Triton backward is deterministic (no atomics).

    Raises:
        ValueError / TypeError naming the argument, before any work: shapes, dtypes, devices, head
        counts, ``window ≤ 0``, per-head tensors not ``[Hq]``, ``segment_ids`` not ``[B, S]``, flags
        that do not apply to ``score_fn``, and (Triton) head dims outside [16, 256].
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    impl = resolve_backend(
        backend, q=q, k=k, v=v, sinks=sinks, initial_token_scale=initial_token_scale,
        segment_ids=segment_ids,
        sigmoid_bias=sigmoid_bias if isinstance(sigmoid_bias, torch.Tensor) else None,
    )  # fmt: skip
    _validate(
        q, k, v, causal=causal, window=window, scale=scale, sinks=sinks, softcap=softcap,
        score_fn=score_fn, sigmoid_bias=sigmoid_bias, initial_token_scale=initial_token_scale,
        segment_ids=segment_ids, return_lse=return_lse,
    )  # fmt: skip
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    if impl == "reference":
        out, lse = attention_reference(
            q, k, v, causal=causal, window=window, scale=scale, sinks=sinks, softcap=softcap,
            score_fn=score_fn, sigmoid_bias=sigmoid_bias, initial_token_scale=initial_token_scale,
            segment_ids=segment_ids,
        )  # fmt: skip
        return (out, lse) if return_lse else out

    D = q.shape[-1]
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dim D={D} is not supported by the Triton kernel (needs {MIN_HEAD_DIM}..{MAX_HEAD_DIM})"
        )
    if initial_token_scale is not None and initial_token_scale.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "`initial_token_scale` has no gradient on the Triton path; detach it or use backend='reference'"
        )
    acc = torch.promote_types(q.dtype, torch.float32)
    if isinstance(sigmoid_bias, torch.Tensor):
        bias = sigmoid_bias.to(acc).contiguous()
    else:
        bias = torch.full(
            (q.shape[1],), 0.0 if sigmoid_bias is None else sigmoid_bias, dtype=acc, device=q.device
        )
    out, lse = _FlashAttentionFn.apply(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        None if sinks is None else sinks.to(acc).contiguous(),
        bias,
        None if initial_token_scale is None else initial_token_scale.detach().to(acc).log().contiguous(),
        None if segment_ids is None else segment_ids.to(torch.int32).contiguous(),
        {"causal": causal, "window": window, "scale": scale, "softcap": softcap, "score_fn": score_fn},
    )
    return (out, lse) if return_lse else out
