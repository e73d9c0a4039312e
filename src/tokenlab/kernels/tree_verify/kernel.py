"""Triton kernel: draft-tree verification, one program per sequence.

Program ``b`` walks its tree from the root. At each node it streams the row of target logits once
(greedy: the argmax; sampling: the online max ``m`` and sum ``s`` of the warped logits
``x = logits / T`` where ``logits ≥ cutoff``, so ``p_v = exp(x_v − m) / s`` is one load away), then
tests the children in order: ``p(x)`` (or the current residual at ``x``) and ``q(x)`` are scalar
loads. Only a *rejected* child streams the row again, to write the next residual
``max(0, r − q_i)`` into a two-row scratch (ping-pong, so that an all-zero residual can keep the
previous one) and to sum its normaliser. Removed siblings need no masking (a rejected ``x`` has
``r(x) < q_i(x)``, hence residual 0 there); the scalar removed mass renormalises ``q_i``. When no
child is accepted, one more pass runs the exponential race ``argmax_v r_v / E_v``. Walks are short
(the accepted depth), and the grid has ``B`` programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenlab.kernels.speculative_verify.kernel import _first_argmax, _row_argmax, _track_max


@triton.jit
def _target_prob(row, index, cut, m, s, temperature, ACC_DTYPE: tl.constexpr):
    """``p_index`` of the warped target row with normaliser ``(m, s)`` (one scalar load)."""
    raw = tl.load(row + index).to(ACC_DTYPE)
    return tl.exp(tl.where(raw >= cut, raw / temperature, float("-inf")) - m) / s


@triton.jit
def _target_block(row, start, offs, V, cut, m, s, temperature, ACC_DTYPE: tl.constexpr):
    """``p`` over the block ``start + offs`` of the warped target row (0 outside the vocabulary)."""
    raw = tl.load(row + start + offs, mask=start + offs < V, other=float("-inf")).to(ACC_DTYPE)
    return tl.exp(tl.where(raw >= cut, raw / temperature, float("-inf")) - m) / s


@triton.jit
def _tree_verify_kernel(
    logits_ptr,
    q_ptr,
    tokens_ptr,
    first_ptr,
    next_ptr,
    cutoff_ptr,
    u_ptr,
    e_ptr,
    scratch_ptr,
    path_ptr,
    out_ptr,
    count_ptr,
    N1,
    V,
    temperature,
    DO_SAMPLE: tl.constexpr,
    REPLACEMENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    scratch = scratch_ptr + b * 2 * V
    node = tl.zeros((), tl.int64)
    depth = tl.zeros((), tl.int64)
    done = tl.zeros((), tl.int32)
    while done == 0:
        row = logits_ptr + (b * N1 + node) * V
        child = tl.load(first_ptr + b * N1 + node)
        chosen = tl.full((), -1, tl.int64)
        if not DO_SAMPLE:
            emitted = _row_argmax(row, V, BLOCK_V, ACC_DTYPE).to(tl.int64)
            while (child >= 0) & (chosen < 0):
                chosen = tl.where(tl.load(tokens_ptr + b * N1 + child) == emitted, child, chosen)
                child = tl.load(next_ptr + b * N1 + child)
        else:
            cut = tl.load(cutoff_ptr + b * N1 + node).to(ACC_DTYPE)
            m_vec = tl.full([BLOCK_V], float("-inf"), ACC_DTYPE)
            s_vec = tl.zeros([BLOCK_V], ACC_DTYPE)
            for start in range(0, V, BLOCK_V):
                raw = tl.load(row + start + offs, mask=start + offs < V, other=float("-inf")).to(ACC_DTYPE)
                x = tl.where(raw >= cut, raw / temperature, float("-inf"))
                m_new = tl.maximum(m_vec, x)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s_vec = s_vec * tl.exp(m_vec - m_safe) + tl.exp(x - m_safe)
                m_vec = m_new
            m = tl.max(m_vec, axis=0)
            s = tl.sum(s_vec * tl.exp(m_vec - tl.where(m == float("-inf"), 0.0, m)), axis=0)
            q_row = q_ptr + (b * N1 + node) * V
            resid = tl.zeros((), tl.int32)  # 0: r is p; 1: r is scratch[cur] / z
            cur = tl.zeros((), tl.int64)
            z = tl.full((), 1.0, ACC_DTYPE)
            removed = tl.zeros((), ACC_DTYPE)
            while (child >= 0) & (chosen < 0):
                x_tok = tl.load(tokens_ptr + b * N1 + child)
                if resid == 0:
                    r_x = _target_prob(row, x_tok, cut, m, s, temperature, ACC_DTYPE)
                else:
                    r_x = tl.load(scratch + cur * V + x_tok).to(ACC_DTYPE) / z
                q_x = tl.load(q_row + x_tok).to(ACC_DTYPE) / (1 - removed)
                u = tl.load(u_ptr + b * N1 + child).to(ACC_DTYPE)
                chosen = tl.where(u < r_x / q_x, child, chosen)
                if chosen < 0:  # rejected: r <- norm(max(0, r - q_i)) into the other scratch row
                    z_vec = tl.zeros([BLOCK_V], ACC_DTYPE)
                    for start in range(0, V, BLOCK_V):
                        mask = start + offs < V
                        if resid == 0:
                            r = _target_block(row, start, offs, V, cut, m, s, temperature, ACC_DTYPE)
                        else:
                            r = (
                                tl.load(scratch + cur * V + start + offs, mask=mask, other=0.0).to(ACC_DTYPE)
                                / z
                            )
                        q = tl.load(q_row + start + offs, mask=mask, other=0.0).to(ACC_DTYPE) / (1 - removed)
                        w = tl.where(mask, tl.maximum(r - q, 0.0), 0.0)
                        tl.store(scratch + (1 - cur) * V + start + offs, w, mask=mask)
                        z_vec += w
                    z_new = tl.sum(z_vec, axis=0)
                    if z_new > 0:
                        cur = 1 - cur
                        z = z_new
                        resid = tl.full((), 1, tl.int32)
                    if not REPLACEMENT:
                        removed += tl.load(q_row + x_tok).to(ACC_DTYPE)
                child = tl.load(next_ptr + b * N1 + child)
            emitted = tl.zeros((), tl.int64)
            if chosen < 0:  # the exponential race on the last r
                e_row = e_ptr + b * V
                best = tl.full([BLOCK_V], -1.0, ACC_DTYPE)
                best_idx = tl.full([BLOCK_V], V, tl.int32)
                for start in range(0, V, BLOCK_V):
                    mask = start + offs < V
                    if resid == 0:
                        r = _target_block(row, start, offs, V, cut, m, s, temperature, ACC_DTYPE)
                    else:
                        r = tl.load(scratch + cur * V + start + offs, mask=mask, other=0.0).to(ACC_DTYPE) / z
                    e = tl.load(e_row + start + offs, mask=mask, other=1.0).to(ACC_DTYPE)
                    best, best_idx = _track_max(tl.where(mask, r / e, -1.0), start + offs, best, best_idx)
                _, idx = _first_argmax(best, best_idx, V)
                emitted = idx.to(tl.int64)
        if chosen >= 0:
            tl.store(path_ptr + b * (N1 - 1) + depth, chosen)
            tl.store(out_ptr + b * N1 + depth, tl.load(tokens_ptr + b * N1 + chosen))
            node = chosen
            depth += 1
        else:
            tl.store(out_ptr + b * N1 + depth, emitted)
            done = tl.full((), 1, tl.int32)
    tl.store(count_ptr + b, depth)


def tree_verify_triton(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    tokens: torch.Tensor,
    first_child: torch.Tensor,
    next_sibling: torch.Tensor,
    *,
    do_sample: bool,
    replacement: bool,
    temperature: float,
    cutoff: torch.Tensor | None,
    uniforms: torch.Tensor | None,
    exponentials: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernel (same arguments and result as ``tree_verify_reference``)."""
    B, n1, V = target_logits.shape
    device = target_logits.device
    logits = target_logits.contiguous()
    acc = torch.promote_types(logits.dtype, torch.float32)
    path = torch.full((B, n1 - 1), -1, dtype=torch.long, device=device)
    next_tokens = torch.full((B, n1), -1, dtype=torch.long, device=device)
    num_accepted = torch.zeros(B, dtype=torch.long, device=device)
    if do_sample:
        q, cut, u, e = (t.contiguous() for t in (draft_probs, cutoff, uniforms, exponentials))
        scratch = torch.empty(B, 2, V, dtype=acc, device=device)
    else:  # unused pointers: any valid tensor
        q = cut = u = e = scratch = logits
    if B > 0:
        _tree_verify_kernel[(B,)](
            logits,
            q,
            tokens.contiguous(),
            first_child.contiguous(),
            next_sibling.contiguous(),
            cut,
            u,
            e,
            scratch,
            path,
            next_tokens,
            num_accepted,
            n1,
            V,
            float(temperature),
            DO_SAMPLE=do_sample,
            REPLACEMENT=replacement,
            BLOCK_V=min(1024, triton.next_power_of_2(V)),
            ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
        )
    return num_accepted, path, next_tokens
