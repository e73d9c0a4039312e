"""Reference: softmax of logits divided by a temperature, the specification of the kernel."""

from __future__ import annotations

import torch


def temperature_softmax_reference(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / temperature, dim=-1)``, accumulated in at least float32.

    Shapes: ``logits [..., V]`` → probabilities ``[..., V]`` in the dtype of ``logits``.
    """
    acc = torch.promote_types(logits.dtype, torch.float32)
    return torch.softmax(logits.to(acc) / temperature, dim=-1).to(logits.dtype)
