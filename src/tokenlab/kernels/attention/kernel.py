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

The :class:`~tokenlab.kernels.attention.variant.AttentionVariant` reaches the kernels as one set of
keyword arguments, built once by ``_kernel_args``; each kernel takes the ones its signature names.
Flags are ``tl.constexpr``: each combination compiles to its own specialised kernel. Head dims are
padded to a power of two (≥ 16) inside the kernel with load/store masks. Accumulation is float32
(float64 for float64 inputs); float32 and float64 ``tl.dot`` run with ``input_precision="ieee"``
(no TF32), half-precision inputs use the tensor cores with ``P`` rounded to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenlab.kernels.attention.variant import AttentionVariant

SCORE_FN_IDS = {"softmax": 0, "sigmoid": 1, "relu": 2}
_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # head dims are padded to a power of two in [16, 256]
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
    TREE,
    b,
    tree_n,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    HAS_TREE: tl.constexpr,
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
    if HAS_TREE:
        # Query rows before the tree read all bits set (-1): the tree does not restrict them.
        node_q = rows - T + tree_n
        ancestors = tl.load(TREE + b * tree_n + node_q, mask=(node_q >= 0) & (rows < T), other=-1)
        node_k = cols - S + tree_n
        bit = (ancestors[:, None] >> tl.where(node_k >= 0, node_k, 0)[None, :]) & 1
        visible = visible & ((node_k[None, :] < 0) | (bit != 0))
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
    T,
    S,
    H_Q,
    GROUP,
    SINKS,
    LOG_GAMMA,
    BIAS,
    SEG,
    TREE,
    scale,
    softcap,
    window,
    tree_n,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    HAS_TREE: tl.constexpr,
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
            q, k, rows, cols, T, S, seg_q, seg_k, scale, softcap, log_gamma, window, TREE, b, tree_n,
            IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_GAMMA, HAS_SEGMENTS, HAS_TREE, ACC, DOT_DTYPE, PRECISION,
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
    T,
    S,
    H_Q,
    GROUP,
    LOG_GAMMA,
    BIAS,
    SEG,
    TREE,
    scale,
    softcap,
    window,
    tree_n,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    HAS_TREE: tl.constexpr,
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
                q, k, rows, cols, T, S, seg_q, seg_k, scale, softcap, log_gamma, window, TREE, b, tree_n,
                IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_GAMMA, HAS_SEGMENTS, HAS_TREE, ACC, DOT_DTYPE,
                PRECISION,
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
    T,
    S,
    H_Q,
    GROUP,
    LOG_GAMMA,
    BIAS,
    SEG,
    TREE,
    scale,
    softcap,
    window,
    tree_n,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    HAS_TREE: tl.constexpr,
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
            q, k, rows, cols, T, S, seg_q, seg_k, scale, softcap, log_gamma, window, TREE, b, tree_n,
            IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_GAMMA, HAS_SEGMENTS, HAS_TREE, ACC, DOT_DTYPE, PRECISION,
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


@triton.jit
def _attn_key_scores(
    Q,
    K,
    LSE,
    SCORES,
    T,
    S,
    H_Q,
    GROUP,
    LOG_GAMMA,
    SEG,
    TREE,
    scale,
    softcap,
    window,
    tree_n,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    HAS_TREE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Per-key scores ``Σ_i P_ij`` of one key block of one query head: like the dK/dV pass, it walks
    the visible query blocks and recomputes ``P = exp(s − LSE)`` from the forward's LSE (softmax)."""
    start_n = tl.program_id(1) * BLOCK_N
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H_Q
    h = bh % H_Q
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    col_ok = cols < S

    kv_ptrs, kv_mask = _tile((b * (H_Q // GROUP) + h // GROUP) * S * HEAD_DIM, cols, S, offs_d, HEAD_DIM)
    k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
    seg_k = tl.load(SEG + b * S + cols, mask=col_ok, other=0) if HAS_SEGMENTS else 0
    log_gamma = tl.load(LOG_GAMMA + h).to(ACC) if HAS_GAMMA else 0.0
    scores = tl.zeros([BLOCK_N], ACC)

    lo, hi = _query_range(start_n, T, S, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < T
        q_ptrs, q_mask = _tile(bh * T * HEAD_DIM, rows, T, offs_d, HEAD_DIM)
        q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)
        seg_q = tl.load(SEG + b * S + (S - T) + rows, mask=row_ok, other=0) if HAS_SEGMENTS else 0
        s, visible, _cap_grad = _scores(
            q, k, rows, cols, T, S, seg_q, seg_k, scale, softcap, log_gamma, window, TREE, b, tree_n,
            IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_GAMMA, HAS_SEGMENTS, HAS_TREE, ACC, DOT_DTYPE, PRECISION,
        )  # fmt: skip
        lse, _delta = _row_stats(LSE, LSE, bh * T + rows, row_ok, 0)  # no Δ here: LSE stands in
        scores += tl.sum(tl.where(visible, tl.exp(s - lse[:, None]), 0.0), 0)

    tl.store(SCORES + bh * S + cols, scores, mask=col_ok)


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

_attn_key_scores_tuned = triton.autotune(  # softmax only: no SCORE_FN in its key
    _gpu_configs([(64, 128), (128, 128), (64, 64), (32, 128)]),
    key=[name for name in _TUNE_KEY if name != "SCORE_FN"],
    prune_configs_by=_PRUNE,
)(_attn_key_scores)


def _kernel_args(variant: AttentionVariant, q: torch.Tensor) -> dict[str, object]:
    """The variant as the kernels' flag arguments, by jit parameter name: runtime scalars, contiguous
    tensors (per-head ones in the accumulation dtype; ``None`` when the flag is off) and the
    constexprs that specialise the kernels. Each kernel receives those its signature names."""
    acc = torch.promote_types(q.dtype, torch.float32)
    bias = variant.sigmoid_bias
    if not isinstance(bias, torch.Tensor):
        bias = torch.full((q.shape[1],), 0.0 if bias is None else bias, dtype=acc, device=q.device)
    gamma = variant.initial_token_scale
    return {
        "scale": variant.scale_for(q.shape[-1]),
        "IS_CAUSAL": variant.causal,
        "window": 1 if variant.window is None else variant.window,
        "HAS_WINDOW": variant.window is not None,
        "softcap": 1.0 if variant.softcap is None else variant.softcap,
        "HAS_SOFTCAP": variant.softcap is not None,
        "SINKS": None if variant.sinks is None else variant.sinks.to(acc).contiguous(),
        "HAS_SINKS": variant.sinks is not None,
        "SCORE_FN": SCORE_FN_IDS[variant.score_fn],
        "BIAS": bias.to(acc).contiguous(),
        "LOG_GAMMA": None if gamma is None else gamma.detach().to(acc).log().contiguous(),
        "HAS_GAMMA": gamma is not None,
        "SEG": None if variant.segment_ids is None else variant.segment_ids.to(torch.int32).contiguous(),
        "HAS_SEGMENTS": variant.segment_ids is not None,
        "TREE": None if variant.tree is None else variant.tree.contiguous(),
        "tree_n": 1 if variant.tree is None else variant.tree.shape[1],
        "HAS_TREE": variant.tree is not None,
    }


def _dtype_constexprs(q: torch.Tensor) -> dict[str, object]:
    """The constexprs that come from ``q``'s head dim, dtype and device (not from the variant)."""
    return {
        "HEAD_DIM": q.shape[-1],
        "HEAD_DIM_PAD": max(16, triton.next_power_of_2(q.shape[-1])),
        "ACC": tl.float64 if q.dtype == torch.float64 else tl.float32,
        "DOT_DTYPE": tl.float32 if q.dtype == torch.bfloat16 and not q.is_cuda else _TL_DTYPES[q.dtype],
        "PRECISION": "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
    }


def _launch(kernel, tuned, grid, args: dict[str, object], q: torch.Tensor, *positional) -> None:
    """Run ``kernel`` on ``(q, *positional)`` plus the flag arguments ``args`` its signature names (a
    ``None`` tensor, a flag that is off, becomes a pointer its constexpr never lets the kernel read):
    ``tuned`` (autotuned per head dim) on CUDA, ``kernel`` with fixed blocks in the interpreter."""
    flags = {name: q if a is None else a for name, a in args.items() if name in kernel.arg_names}
    kwargs = {**flags, **_dtype_constexprs(q)}
    if q.is_cuda:
        tuned[grid](q, *positional, **kwargs)
    else:
        blocks = {"BLOCK_M": _INTERPRETER_BLOCK, "BLOCK_N": _INTERPRETER_BLOCK}
        kernel[grid(blocks)](q, *positional, **kwargs, **blocks)


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: dict[str, object]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of contiguous ``q [B,Hq,T,D]``, ``k/v [B,Hkv,S,D]``; ``lse`` is ``[B,Hq,T]`` in the
    accumulation dtype (uninitialised for sigmoid/ReLU scores)."""
    B, Hq, T, _D = q.shape
    S = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
    if B * Hq * T == 0:
        return out, lse
    grid = lambda meta: (B * Hq, triton.cdiv(T, meta["BLOCK_M"]))
    _launch(_attn_fwd, _attn_fwd_tuned, grid, args, q, k, v, out, lse, T, S, Hq, Hq // k.shape[1])
    return out, lse


def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    args: dict[str, object],
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
    sigmoid = args["SCORE_FN"] == SCORE_FN_IDS["sigmoid"]
    dbias = torch.empty(B, Hq, T, device=q.device, dtype=acc_dtype) if sigmoid else None
    if B * Hq * T == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), delta, None if dbias is None else dbias.zero_()
    shapes = (T, S, Hq, Hq // Hkv)
    grid_kv = lambda meta: (B * Hkv, triton.cdiv(S, meta["BLOCK_N"]))
    _launch(_attn_bwd_dkdv, _attn_bwd_dkdv_tuned, grid_kv, args, q, k, v, dout, lse, delta, dk, dv, *shapes)
    grid_q = lambda meta: (B * Hq, triton.cdiv(T, meta["BLOCK_M"]))
    dbias_ptr = lse if dbias is None else dbias  # written only for sigmoid scores
    _launch(_attn_bwd_dq, _attn_bwd_dq_tuned, grid_q, args, q, k, v, dout, lse, delta, dq, dbias_ptr, *shapes)
    return dq, dk, dv, delta, dbias


class _FlashAttentionFn(torch.autograd.Function):
    """Autograd around the kernels: gradients for ``q``, ``k``, ``v``, ``sinks`` and ``sigmoid_bias``
    (and through the returned LSE). ``consts`` are the non-tensor kernel arguments; the tensor ones
    come as inputs named by ``names``, so that autograd reaches the variant's tensors through them."""

    @staticmethod
    def forward(ctx, q, k, v, consts, names, *tensors):
        args = {**consts, **dict(zip(names, tensors))}
        out, lse = _forward(q, k, v, args)
        ctx.save_for_backward(q, k, v, out, lse, *tensors)
        ctx.consts, ctx.names = consts, names
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        args = {**ctx.consts, **dict(zip(ctx.names, tensors))}
        softmax = args["SCORE_FN"] == SCORE_FN_IDS["softmax"]
        dq, dk, dv, delta, dbias_rows = _backward(q, k, v, out, lse, dout, dlse if softmax else None, args)
        needs = dict(zip(ctx.names, ctx.needs_input_grad[5:]))
        grads = dict.fromkeys(ctx.names)
        if needs.get("SINKS"):
            # The sink is a key with logit sink_h and no value: dS_sink = P_sink · (0 − Δ), where Δ
            # already includes the LSE's own gradient (Δ − dlse).
            p_sink = torch.exp(args["SINKS"][None, :, None] - lse)
            grads["SINKS"] = -(p_sink * delta).sum(dim=(0, 2))
        if needs.get("BIAS"):
            grads["BIAS"] = dbias_rows.sum(dim=(0, 2))
        return dq, dk, dv, None, None, *grads.values()


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: AttentionVariant
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton forward, with its backward through autograd, on validated inputs: ``(out, lse)`` as
    :func:`~tokenlab.kernels.attention.reference.attention_reference` returns them.

    Raises:
        ValueError: a head dim outside [16, 256]; an ``initial_token_scale`` that requires grad (it is
            a constant here) while grad is enabled.
    """
    D = q.shape[-1]
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dim D={D} is not supported by the Triton kernel (needs {MIN_HEAD_DIM}..{MAX_HEAD_DIM})"
        )
    gamma = variant.initial_token_scale
    if gamma is not None and gamma.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "`initial_token_scale` has no gradient on the Triton path; detach it or use backend='reference'"
        )
    args = _kernel_args(variant, q)
    tensors = {name: a for name, a in args.items() if isinstance(a, torch.Tensor)}
    consts = {name: a for name, a in args.items() if name not in tensors}
    out, lse = _FlashAttentionFn.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), consts, tuple(tensors), *tensors.values()
    )
    return out, lse if variant.score_fn == "softmax" else None


def fused_key_scores(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, variant: AttentionVariant
) -> torch.Tensor:
    """Per-key scores ``[B, Hq, S]``: ``Σ_i P_ij``, the softmax attention each key receives summed over
    the queries, from the LSE ``[B, Hq, T]`` of :func:`fused_attention` on the same validated inputs.

    One program per (batch·query head, key block) walks the visible query blocks, as the dK/dV pass
    does, so the ``[T, S]`` probabilities are never materialised: O(S) extra memory. Each score is
    written by one program (deterministic). No gradient (a statistic for eviction and analysis).
    """
    B, Hq, T, _D = q.shape
    S = k.shape[2]
    scores = torch.zeros(B, Hq, S, device=q.device, dtype=lse.dtype)
    if B * Hq * S == 0 or T == 0:
        return scores
    grid = lambda meta: (B * Hq, triton.cdiv(S, meta["BLOCK_N"]))
    q, k = q.detach().contiguous(), k.detach().contiguous()
    args = _kernel_args(variant, q)
    _launch(
        _attn_key_scores, _attn_key_scores_tuned, grid, args, q, k, lse.detach().contiguous(), scores,
        T, S, Hq, Hq // k.shape[1],
    )  # fmt: skip
    return scores
