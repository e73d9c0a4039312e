"""Triton kernel: speculative verification, one program per (sequence, position).

Program ``(b, j)`` streams the row ``target_logits[b, j, :]`` once, block by block, keeping

* greedy: the running maximum and its first index (the argmax);
* sampling: the online maximum ``m`` and rescaled sum ``s`` of the warped logits
  ``x = logits / T`` where ``logits ≥ cutoff`` (the softmax normaliser), and at the bonus
  position ``j = k`` the exponential race ``argmax_v x_v − log E_v`` (= ``argmax p_v / E_v``).

After the pass, ``p(d_j) = exp(x_{d_j} − m) / s`` comes from one scalar load, and the acceptance
test ``u_j < p(d_j) / q_j(d_j)`` is decided. Only a *rejected* position streams its row a second
time, for the residual race ``argmax_v max(0, p_v − q_v) / E_v`` (which needs the final
normaliser); with acceptance rates around 0.7 most positions read their logits once. The per-
position decisions are combined by :func:`~tokenlab.kernels.speculative_verify.reference.assemble`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenlab.kernels.speculative_verify.reference import assemble


@triton.jit
def _track_max(key, index, best, best_index):
    """Per-lane running maximum of ``key`` and its first index (strictly greater replaces)."""
    better = key > best
    return tl.where(better, key, best), tl.where(better, index, best_index)


@triton.jit
def _first_argmax(best, best_index, V):
    """Maximum over the lanes and its smallest index (``torch.argmax`` tie-breaking)."""
    top = tl.max(best, axis=0)
    return top, tl.min(tl.where(best == top, best_index, V), axis=0)


@triton.jit
def _row_argmax(row, V, BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """First index of the maximum of the row ``row[0:V]``, streamed block by block (0 for an all
    ``-inf`` row, as ``torch.argmax``)."""
    offs = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_V], float("-inf"), ACC_DTYPE)
    best_idx = tl.full([BLOCK_V], V, tl.int32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(row + start + offs, mask=start + offs < V, other=float("-inf")).to(ACC_DTYPE)
        best, best_idx = _track_max(x, start + offs, best, best_idx)
    _, idx = _first_argmax(best, best_idx, V)
    return tl.where(idx == V, 0, idx)


@triton.jit
def _verify_kernel(
    logits_ptr,
    q_ptr,
    tokens_ptr,
    cutoff_ptr,
    u_ptr,
    e_ptr,
    accepted_ptr,
    replacement_ptr,
    K,
    V,
    temperature,
    DO_SAMPLE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1)
    row = logits_ptr + (b * (K + 1) + j).to(tl.int64) * V
    offs = tl.arange(0, BLOCK_V)
    if not DO_SAMPLE:
        idx = _row_argmax(row, V, BLOCK_V, ACC_DTYPE)
        tl.store(replacement_ptr + b * (K + 1) + j, idx.to(tl.int64))
        if j < K:
            d = tl.load(tokens_ptr + b * K + j)
            tl.store(accepted_ptr + b * K + j, (d == idx).to(tl.int8))
    else:
        cut = tl.load(cutoff_ptr + b * (K + 1) + j).to(ACC_DTYPE)
        e_row = e_ptr + (b * (K + 1) + j).to(tl.int64) * V
        is_bonus = j == K
        bonus_end = tl.where(is_bonus, V, 0)  # the noise is read at the bonus position only
        m = tl.full([BLOCK_V], float("-inf"), ACC_DTYPE)
        s = tl.zeros([BLOCK_V], ACC_DTYPE)
        race = tl.full([BLOCK_V], float("-inf"), ACC_DTYPE)
        race_idx = tl.full([BLOCK_V], V, tl.int32)
        for start in range(0, V, BLOCK_V):
            mask = start + offs < V
            raw = tl.load(row + start + offs, mask=mask, other=float("-inf")).to(ACC_DTYPE)
            x = tl.where(raw >= cut, raw / temperature, float("-inf"))
            m_new = tl.maximum(m, x)
            # Lanes that have only seen -inf subtract 0 instead, so exp(-inf - -inf) = nan never occurs.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
            m = m_new
            # Bonus position: exponential race on p, in log space (no normaliser needed).
            e = tl.load(e_row + start + offs, mask=start + offs < bonus_end, other=1.0).to(ACC_DTYPE)
            race, race_idx = _track_max(x - tl.log(e), start + offs, race, race_idx)
        m_row = tl.max(m, axis=0)
        s_row = tl.sum(s * tl.exp(m - tl.where(m_row == float("-inf"), 0.0, m_row)), axis=0)
        if is_bonus:
            _, idx = _first_argmax(race, race_idx, V)
            tl.store(replacement_ptr + b * (K + 1) + j, idx.to(tl.int64))
        else:
            d = tl.load(tokens_ptr + b * K + j)
            raw_d = tl.load(row + d).to(ACC_DTYPE)
            x_d = tl.where(raw_d >= cut, raw_d / temperature, float("-inf"))
            p_d = tl.exp(x_d - m_row) / s_row
            q_row = q_ptr + (b * K + j).to(tl.int64) * V
            q_d = tl.load(q_row + d).to(ACC_DTYPE)
            u = tl.load(u_ptr + b * K + j).to(ACC_DTYPE)
            accept = u < p_d / q_d
            tl.store(accepted_ptr + b * K + j, accept.to(tl.int8))
            if accept:
                tl.store(replacement_ptr + b * (K + 1) + j, -1)
            else:
                # Residual race argmax max(0, p − q) / E, and the race on p as the fallback for an
                # empty residual.
                r_best = tl.full([BLOCK_V], -1.0, ACC_DTYPE)
                r_idx = tl.full([BLOCK_V], V, tl.int32)
                p_best = tl.full([BLOCK_V], -1.0, ACC_DTYPE)
                p_idx = tl.full([BLOCK_V], V, tl.int32)
                for start in range(0, V, BLOCK_V):
                    mask = start + offs < V
                    raw = tl.load(row + start + offs, mask=mask, other=float("-inf")).to(ACC_DTYPE)
                    x = tl.where(raw >= cut, raw / temperature, float("-inf"))
                    p = tl.exp(x - m_row) / s_row
                    q = tl.load(q_row + start + offs, mask=mask, other=0.0).to(ACC_DTYPE)
                    e = tl.load(e_row + start + offs, mask=mask, other=1.0).to(ACC_DTYPE)
                    r_key = tl.where(mask, tl.maximum(p - q, 0.0) / e, -1.0)
                    r_best, r_idx = _track_max(r_key, start + offs, r_best, r_idx)
                    p_best, p_idx = _track_max(tl.where(mask, p / e, -1.0), start + offs, p_best, p_idx)
                r_top, r_first = _first_argmax(r_best, r_idx, V)
                _, p_first = _first_argmax(p_best, p_idx, V)
                idx = tl.where(r_top > 0, r_first, p_first)
                tl.store(replacement_ptr + b * (K + 1) + j, idx.to(tl.int64))


def verify_triton(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float,
    cutoff: torch.Tensor,
    uniforms: torch.Tensor | None,
    exponentials: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel (same arguments and result as ``verify_reference``)."""
    B, k1, V = target_logits.shape
    k = k1 - 1
    logits = target_logits.contiguous()
    tokens = draft_tokens.contiguous()
    accepted = torch.empty(B, k, dtype=torch.int8, device=logits.device)
    replacement = torch.empty(B, k1, dtype=torch.long, device=logits.device)
    if do_sample:
        q, cut, u, e = (
            draft_probs.contiguous(),
            cutoff.contiguous(),
            uniforms.contiguous(),
            exponentials.contiguous(),
        )
    else:  # unused pointers: any valid tensor
        q = cut = u = e = logits
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    if B > 0:
        _verify_kernel[(B, k1)](
            logits,
            q,
            tokens,
            cut,
            u,
            e,
            accepted,
            replacement,
            k,
            V,
            float(temperature),
            DO_SAMPLE=do_sample,
            BLOCK_V=min(1024, triton.next_power_of_2(V)),  # ~8 live [BLOCK_V] vectors: no spills
            ACC_DTYPE=acc,
        )
    return assemble(accepted.bool(), replacement, tokens)
