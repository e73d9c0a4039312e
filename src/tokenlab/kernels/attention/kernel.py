"""Triton flash attention: forward, and a backward in two passes (dK/dV, then dQ) without atomics.

Forward (*FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness*, and the
work partitioning of *FlashAttention-2*): one program per ``(batch·query head, query block)`` keeps
the running maximum ``m``, the rescaled denominator ``l`` and the unnormalised output in registers
while it walks the key blocks, and writes the output and ``LSE = m + log l`` (O(T) extra memory).
Key blocks that the causal or sliding-window mask hides entirely are never visited. A learned sink
starts the online softmax as ``m = sink, l = 1`` (a denominator term with no value). Sigmoid and
ReLU scores need no normalisation and simply accumulate ``f(s) v``.

Backward recomputes ``P`` from the saved LSE. The dK/dV pass runs one program per
``(batch·key/value head, key block)`` and loops over the query heads of its GQA group and the
visible query blocks; the dQ pass runs one program per ``(batch·query head, query block)`` over the
visible key blocks. Every output element is written by exactly one program, so results are
deterministic run to run. ``Δ_i = Σ_d dO_id·O_id`` and the sink gradient are O(T) and computed in
PyTorch.

Flags are ``tl.constexpr``: each combination compiles to its own specialised kernel. Head dims are
padded to a power of two (≥ 16) inside the kernel with load/store masks. Accumulation is float32
(float64 for float64 inputs); float32 and float64 ``tl.dot`` run with ``input_precision="ieee"``
(no TF32), half-precision inputs use the tensor cores with ``P`` rounded to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SCORE_FN_IDS = {"softmax": 0, "sigmoid": 1, "relu": 2}
_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

# Interpreter (CPU) block sizes: small enough that tests of T ≈ 70 cross several blocks.
_INTERPRETER_BLOCK = 32


@triton.jit
def _mm(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """``a @ b`` with operands in ``DOT_DTYPE`` (the input dtype; float32 for bfloat16 under the
    Triton 3.9 interpreter, whose bfloat16 ``tl.dot`` is wrong) accumulated in ``ACC``."""
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _scores(
    q,
    k,
    rows,
    cols,
    T,
    S,
    seg_q,
    seg_k,
    scale,
    softcap,
    log_gamma,
    window,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Score tile ``[BLOCK_M, BLOCK_N]`` after softcap and initial-token scale, its visibility mask and
    the softcap derivative ``ds/ds_raw`` (1 without softcap)."""
    s = _mm(q, tl.trans(k), DOT_DTYPE, PRECISION, ACC) * scale
    if HAS_SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
        cap_grad = 1.0 - t * t
    else:
        cap_grad = 1.0
    if HAS_GAMMA:
        s = s + tl.where(cols[None, :] == 0, log_gamma, 0.0)
    pos = rows[:, None] + (S - T)
    visible = (rows[:, None] < T) & (cols[None, :] < S)
    if IS_CAUSAL:
        visible = visible & (cols[None, :] <= pos)
    if HAS_WINDOW:
        if IS_CAUSAL:
            visible = visible & (cols[None, :] > pos - window)
        else:
            visible = visible & (tl.abs(cols[None, :] - pos) < window)
    if HAS_SEGMENTS:
        sq = seg_q[:, None]
        sk = seg_k[None, :]
        visible = visible & ((sq == 0) | (sk == 0) | (sq == sk))
    return s, visible, cap_grad


@triton.jit
def _key_range(start_m, T, S, window, BLOCK_M, BLOCK_N, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key blocks ``[lo, hi)`` that a query block may see; fully masked blocks are skipped."""
    first = start_m + S - T  # key position of the block's first query
    lo = 0
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, first + BLOCK_M)
    if HAS_WINDOW:
        lo = tl.maximum(0, first - window + 1)
        if not IS_CAUSAL:
            hi = tl.minimum(S, first + BLOCK_M - 1 + window)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _query_range(start_n, T, S, window, BLOCK_M, BLOCK_N, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query blocks ``[lo, hi)`` that may see a key block; fully masked blocks are skipped."""
    first = start_n - (S - T)  # query index at the key block's first key position
    lo = 0
    hi = T
    if IS_CAUSAL:
        lo = tl.maximum(0, first)
    if HAS_WINDOW:
        hi = tl.minimum(T, first + BLOCK_N - 1 + window)
        if not IS_CAUSAL:
            lo = tl.maximum(0, first - window + 1)
    return (lo // BLOCK_M) * BLOCK_M, hi


@triton.jit
def _tile(base, idx, n, offs_d, HEAD_DIM: tl.constexpr):
    """Offsets and mask of the ``[len(idx), HEAD_DIM_PAD]`` tile of rows ``idx`` (< ``n``) of a
    contiguous ``[n, HEAD_DIM]`` matrix starting at ``base``; padded head-dim lanes are masked."""
    return base + idx[:, None] * HEAD_DIM + offs_d[None, :], (idx[:, None] < n) & (offs_d[None, :] < HEAD_DIM)


@triton.jit
def _row_stats(LSE, DELTA, offs, row_ok, SCORE_FN: tl.constexpr):
    """Saved ``LSE`` (−inf, a row with no visible key, read as 0: its ``P`` is masked to 0 anyway) and
    ``Δ`` of a block of rows; unused (0) for sigmoid/ReLU scores."""
    if SCORE_FN == 0:
        lse = tl.load(LSE + offs, mask=row_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        delta = tl.load(DELTA + offs, mask=row_ok, other=0.0)
    else:
        lse = 0.0
        delta = 0.0
    return lse, delta


@triton.jit
def _probs_and_grads(s, visible, dp, lse, delta, bias, SCORE_FN: tl.constexpr):
    """Attention weights ``P`` of a tile and the gradient ``dS`` w.r.t. the scores after softcap and
    initial-token scale (for sigmoid scores this is also the gradient w.r.t. the bias)."""
    if SCORE_FN == 0:
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
    elif SCORE_FN == 1:
        p = tl.where(visible, tl.sigmoid(s + bias), 0.0)
        ds = dp * p * (1.0 - p)
    else:
        p = tl.where(visible, tl.maximum(s, 0.0), 0.0)
        ds = tl.where(visible & (s > 0), dp, 0.0)
    return p, ds


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    SINKS,
    LOG_GAMMA,
    BIAS,
    SEG,
    scale,
    softcap,
    window,
    T,
    S,
    H_Q,
    GROUP,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    SCORE_FN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(1) * BLOCK_M
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H_Q
    h = bh % H_Q
    kv_base = (b * (H_Q // GROUP) + h // GROUP) * S * HEAD_DIM
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = rows < T

    q_ptrs, q_mask = _tile(bh * T * HEAD_DIM, rows, T, offs_d, HEAD_DIM)
    q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)
    seg_q = tl.load(SEG + b * S + (S - T) + rows, mask=row_ok, other=0) if HAS_SEGMENTS else 0
    log_gamma = tl.load(LOG_GAMMA + h).to(ACC) if HAS_GAMMA else 0.0
    bias = tl.load(BIAS + h).to(ACC) if SCORE_FN == 1 else 0.0

    if HAS_SINKS:
        m_i = tl.full([BLOCK_M], 0.0, ACC) + tl.load(SINKS + h).to(ACC)
        l_i = tl.full([BLOCK_M], 1.0, ACC)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), ACC)
        l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], ACC)

    lo, hi = _key_range(start_m, T, S, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ptrs, kv_mask = _tile(kv_base, cols, S, offs_d, HEAD_DIM)
        k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
        seg_k = tl.load(SEG + b * S + cols, mask=cols < S, other=0) if HAS_SEGMENTS else 0
        s, visible, _cap_grad = _scores(
            q, k, rows, cols, T, S, seg_q, seg_k, scale, softcap, log_gamma, window,
            IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_GAMMA, HAS_SEGMENTS, ACC, DOT_DTYPE, PRECISION,
        )  # fmt: skip
        if SCORE_FN == 0:
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows that have seen no visible key yet subtract 0 instead of -inf: no inf - inf = NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            m_i = m_new
        elif SCORE_FN == 1:
            p = tl.where(visible, tl.sigmoid(s + bias), 0.0)
        else:
            p = tl.where(visible, tl.maximum(s, 0.0), 0.0)
        acc += _mm(p.to(v.dtype), v, DOT_DTYPE, PRECISION, ACC)

    if SCORE_FN == 0:
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        acc = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
        tl.store(LSE + bh * T + rows, lse, mask=row_ok)
    tl.store(O + q_ptrs, acc.to(O.dtype.element_ty), mask=q_mask)


@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    LOG_GAMMA,
    BIAS,
    SEG,
    scale,
    softcap,
    window,
    T,
    S,
    H_Q,
    GROUP,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    SCORE_FN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(1) * BLOCK_N
    bhk = tl.program_id(0).to(tl.int64)
    H_KV = H_Q // GROUP
    b = bhk // H_KV
    hk = bhk % H_KV
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    col_ok = cols < S

    kv_ptrs, kv_mask = _tile(bhk * S * HEAD_DIM, cols, S, offs_d, HEAD_DIM)
    k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
    seg_k = tl.load(SEG + b * S + cols, mask=col_ok, other=0) if HAS_SEGMENTS else 0
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], ACC)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], ACC)

    lo, hi = _query_range(start_n, T, S, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H_Q + h
        log_gamma = tl.load(LOG_GAMMA + h).to(ACC) if HAS_GAMMA else 0.0
        bias = tl.load(BIAS + h).to(ACC) if SCORE_FN == 1 else 0.0
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < T
            q_ptrs, q_mask = _tile(bh * T * HEAD_DIM, rows, T, offs_d, HEAD_DIM)
            q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)
            do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0)
            seg_q = tl.load(SEG + b * S + (S - T) + rows, mask=row_ok, other=0) if HAS_SEGMENTS else 0
            s, visible, cap_grad = _scores(
                q, k, rows, cols, T, S, seg_q, seg_k, scale, softcap, log_gamma, window,
                IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_GAMMA, HAS_SEGMENTS, ACC, DOT_DTYPE, PRECISION,
            )  # fmt: skip
            lse, delta = _row_stats(LSE, DELTA, bh * T + rows, row_ok, SCORE_FN)
            dp = _mm(do, tl.trans(v), DOT_DTYPE, PRECISION, ACC)
            p, ds = _probs_and_grads(s, visible, dp, lse, delta, bias, SCORE_FN)
            if HAS_SOFTCAP:
                ds = ds * cap_grad
            dv += _mm(tl.trans(p.to(do.dtype)), do, DOT_DTYPE, PRECISION, ACC)
            dk += _mm(tl.trans(ds.to(q.dtype)), q, DOT_DTYPE, PRECISION, ACC)

    tl.store(DK + kv_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    DBIAS,
    LOG_GAMMA,
    BIAS,
    SEG,
    scale,
    softcap,
    window,
    T,
    S,
    H_Q,
    GROUP,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    SCORE_FN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(1) * BLOCK_M
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H_Q
    h = bh % H_Q
    kv_base = (b * (H_Q // GROUP) + h // GROUP) * S * HEAD_DIM
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = rows < T

    q_ptrs, q_mask = _tile(bh * T * HEAD_DIM, rows, T, offs_d, HEAD_DIM)
    q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0)
    seg_q = tl.load(SEG + b * S + (S - T) + rows, mask=row_ok, other=0) if HAS_SEGMENTS else 0
    log_gamma = tl.load(LOG_GAMMA + h).to(ACC) if HAS_GAMMA else 0.0
    bias = tl.load(BIAS + h).to(ACC) if SCORE_FN == 1 else 0.0
    lse, delta = _row_stats(LSE, DELTA, bh * T + rows, row_ok, SCORE_FN)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], ACC)
    dbias = tl.zeros([BLOCK_M], ACC)

    lo, hi = _key_range(start_m, T, S, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ptrs, kv_mask = _tile(kv_base, cols, S, offs_d, HEAD_DIM)
        k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
        seg_k = tl.load(SEG + b * S + cols, mask=cols < S, other=0) if HAS_SEGMENTS else 0
        s, visible, cap_grad = _scores(
            q, k, rows, cols, T, S, seg_q, seg_k, scale, softcap, log_gamma, window,
            IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_GAMMA, HAS_SEGMENTS, ACC, DOT_DTYPE, PRECISION,
        )  # fmt: skip
        dp = _mm(do, tl.trans(v), DOT_DTYPE, PRECISION, ACC)
        _p, ds = _probs_and_grads(s, visible, dp, lse, delta, bias, SCORE_FN)
        if SCORE_FN == 1:
            dbias += tl.sum(ds, 1)
        if HAS_SOFTCAP:
            ds = ds * cap_grad
        dq += _mm(ds.to(k.dtype), k, DOT_DTYPE, PRECISION, ACC)

    tl.store(DQ + q_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)
    if SCORE_FN == 1:
        tl.store(DBIAS + bh * T + rows, dbias, mask=row_ok)


def _gpu_configs(block_pairs: list[tuple[int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn in block_pairs
        for w in (4, 8)
        for st in (2, 3)
    ]


def _fits_shared_memory(configs, named_args, **kwargs):
    """Drop configs whose staged tiles (q + k + v blocks) exceed ~200 KB of shared memory; if none
    fits (float32/float64 at large head dims), keep the smallest, the only one that may still fit."""
    d = kwargs["HEAD_DIM_PAD"]
    itemsize = named_args["Q"].element_size()

    def staged_bytes(c):
        return (c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"]) * d * itemsize * c.num_stages

    kept = [c for c in configs if staged_bytes(c) <= 200 * 1024]
    return kept or [min(configs, key=staged_bytes)]


_TUNE_KEY = ["HEAD_DIM_PAD", "IS_CAUSAL", "SCORE_FN", "ACC"]
_PRUNE = {"early_config_prune": _fits_shared_memory}
_attn_fwd_tuned = triton.autotune(
    _gpu_configs([(128, 64), (128, 128), (64, 64), (64, 128)]), key=_TUNE_KEY, prune_configs_by=_PRUNE
)(_attn_fwd)
_attn_bwd_dkdv_tuned = triton.autotune(
    _gpu_configs([(32, 128), (64, 128), (64, 64), (32, 64)]), key=_TUNE_KEY, prune_configs_by=_PRUNE
)(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(
    _gpu_configs([(128, 32), (128, 64), (64, 64), (64, 32)]), key=_TUNE_KEY, prune_configs_by=_PRUNE
)(_attn_bwd_dq)


def _launch(kernel, tuned, grid, q: torch.Tensor, *args, **kwargs) -> None:
    """Run ``tuned`` (autotuned per head dim) on CUDA; ``kernel`` with fixed blocks in the interpreter."""
    if q.is_cuda:
        tuned[grid](*args, **kwargs)
    else:
        blocks = {"BLOCK_M": _INTERPRETER_BLOCK, "BLOCK_N": _INTERPRETER_BLOCK}
        kernel[grid(blocks)](*args, **kwargs, **blocks)


def _constexprs(q: torch.Tensor, *, causal, window, softcap, log_gamma, segment_ids, score_fn) -> dict:
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    return {
        "IS_CAUSAL": causal,
        "HAS_WINDOW": window is not None,
        "HAS_SOFTCAP": softcap is not None,
        "HAS_GAMMA": log_gamma is not None,
        "HAS_SEGMENTS": segment_ids is not None,
        "SCORE_FN": SCORE_FN_IDS[score_fn],
        "HEAD_DIM": q.shape[-1],
        "HEAD_DIM_PAD": max(16, triton.next_power_of_2(q.shape[-1])),
        "ACC": acc,
        "DOT_DTYPE": tl.float32 if q.dtype == torch.bfloat16 and not q.is_cuda else _TL_DTYPES[q.dtype],
        "PRECISION": "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
    }


def attention_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    scale: float,
    sinks: torch.Tensor | None,
    softcap: float | None,
    score_fn: str,
    sigmoid_bias: torch.Tensor,
    log_gamma: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on contiguous ``q [B,Hq,T,D]``, ``k/v [B,Hkv,S,D]``; per-head tensors ``[Hq]``
    in the accumulation dtype, ``segment_ids`` int32 ``[B,S]``. Returns ``(out, lse)``; ``lse`` is
    ``[B,Hq,T]`` in the accumulation dtype (uninitialised for sigmoid/ReLU scores)."""
    B, Hq, T, _D = q.shape
    S = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
    flags = _constexprs(
        q, causal=causal, window=window, softcap=softcap, log_gamma=log_gamma,
        segment_ids=segment_ids, score_fn=score_fn,
    )  # fmt: skip
    if B * Hq * T == 0:
        return out, lse
    dummy = lse
    _launch(
        _attn_fwd, _attn_fwd_tuned, lambda meta: (B * Hq, triton.cdiv(T, meta["BLOCK_M"])), q,
        q, k, v, out, lse,
        dummy if sinks is None else sinks,
        dummy if log_gamma is None else log_gamma,
        sigmoid_bias,
        dummy if segment_ids is None else segment_ids,
        scale, 1.0 if softcap is None else softcap, 1 if window is None else window,
        T, S, Hq, Hq // k.shape[1],
        HAS_SINKS=sinks is not None, **flags,
    )  # fmt: skip
    return out, lse


def attention_backward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    *,
    causal: bool,
    window: int | None,
    scale: float,
    softcap: float | None,
    score_fn: str,
    sigmoid_bias: torch.Tensor,
    log_gamma: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients ``(dq, dk, dv, delta, dbias_rows)`` for the contiguous inputs of the forward.

    ``delta [B,Hq,T] = Σ_d dout·out − dlse`` (softmax only; ``dlse`` is the gradient reaching the
    returned LSE, which adds ``dlse_i·P_ij`` to ``dS_ij``) is returned for the sink gradient;
    ``dbias_rows [B,Hq,T]`` (sigmoid only) holds ``Σ_j dS_ij``, to be summed into ``d sigmoid_bias``.
    """
    B, Hq, T, _D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc_dtype = lse.dtype
    dout = dout.contiguous()
    delta = (dout.to(acc_dtype) * out.to(acc_dtype)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc_dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = torch.empty(B, Hq, T, device=q.device, dtype=acc_dtype) if score_fn == "sigmoid" else None
    if B * Hq * T == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), delta, None if dbias is None else dbias.zero_()
    flags = _constexprs(
        q, causal=causal, window=window, softcap=softcap, log_gamma=log_gamma,
        segment_ids=segment_ids, score_fn=score_fn,
    )  # fmt: skip
    dummy = lse
    gamma = dummy if log_gamma is None else log_gamma
    common = (
        sigmoid_bias,
        dummy if segment_ids is None else segment_ids,
        scale, 1.0 if softcap is None else softcap, 1 if window is None else window,
        T, S, Hq, Hq // Hkv,
    )  # fmt: skip
    _launch(
        _attn_bwd_dkdv, _attn_bwd_dkdv_tuned, lambda meta: (B * Hkv, triton.cdiv(S, meta["BLOCK_N"])), q,
        q, k, v, dout, lse, delta, dk, dv, gamma, *common, **flags,
    )  # fmt: skip
    _launch(
        _attn_bwd_dq, _attn_bwd_dq_tuned, lambda meta: (B * Hq, triton.cdiv(T, meta["BLOCK_M"])), q,
        q, k, v, dout, lse, delta, dq, dummy if dbias is None else dbias, gamma, *common, **flags,
    )  # fmt: skip
    return dq, dk, dv, delta, dbias
