"""Triton kernel: row-wise softmax of ``logits / temperature`` in two passes over the vocabulary.

Pass one keeps an online maximum ``m`` and rescaled sum ``s = Σ exp(x/T − m)`` block by block;
pass two writes ``exp(x/T − m) / s``. One program per row; memory traffic is two reads and one
write of the row, with no ``[rows, V]`` intermediate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _temperature_softmax_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_out,
    V,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 past 2^31 elements
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    offs = tl.arange(0, BLOCK_V)

    m = tl.full([BLOCK_V], float("-inf"), ACC_DTYPE)
    s = tl.zeros([BLOCK_V], ACC_DTYPE)
    for start in range(0, V, BLOCK_V):
        mask = start + offs < V
        x = tl.load(x_row + start + offs, mask=mask, other=float("-inf")).to(ACC_DTYPE) * inv_temperature
        m_new = tl.maximum(m, x)
        # Lanes that have only seen -inf subtract 0 instead, so exp(-inf - -inf) = nan never occurs.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.exp(m - m_row), axis=0)

    for start in range(0, V, BLOCK_V):
        mask = start + offs < V
        x = tl.load(x_row + start + offs, mask=mask, other=float("-inf")).to(ACC_DTYPE) * inv_temperature
        p = tl.exp(x - m_row) / s_row
        tl.store(out_row + start + offs, p.to(out_ptr.dtype.element_ty), mask=mask)


def temperature_softmax_triton(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Launch the kernel on ``logits [..., V]`` (any leading shape; made contiguous)."""
    V = logits.shape[-1]
    x = logits.reshape(-1, V).contiguous()
    out = torch.empty_like(x)
    block_v = min(4096, triton.next_power_of_2(V))
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    if x.shape[0] > 0:
        _temperature_softmax_kernel[(x.shape[0],)](
            x, out, x.stride(0), out.stride(0), V, 1.0 / temperature, BLOCK_V=block_v, ACC_DTYPE=acc
        )
    return out.reshape(logits.shape)
