"""Softmax with temperature: the demonstration kernel of the dispatch path (used by the logit warping).

``reference.py`` is the specification; ``kernel.py`` the fused Triton kernel, imported lazily (on
first use), so importing tokenlab never imports triton.
"""

from __future__ import annotations

import torch

from tokenlab._checks import check_positive, check_tensor
from tokenlab.backend import Backend, resolve_backend
from tokenlab.kernels.temperature_softmax.reference import temperature_softmax_reference


def temperature_softmax(
    logits: torch.Tensor, temperature: float = 1.0, *, backend: Backend = "auto"
) -> torch.Tensor:
    """Probabilities ``softmax(logits / temperature)`` over the last dimension.

    Args:
        logits: ``[..., V]`` floating-point scores; ``-inf`` entries get probability 0.
        temperature: a finite number > 0.
        backend: ``"auto"`` (Triton on CUDA, reference otherwise), ``"triton"`` or ``"reference"``.

    Returns:
        ``[..., V]`` probabilities in the dtype of ``logits``. The Triton path has no backward:
        use ``backend="reference"`` when gradients are needed.
    """
    impl = resolve_backend(backend, logits=logits)
    check_tensor("logits", logits, floating=True)
    if logits.dim() == 0:
        raise ValueError("`logits` must have at least one dimension (the vocabulary)")
    temperature = check_positive("temperature", temperature)
    if impl == "reference":
        return temperature_softmax_reference(logits, temperature)
    if logits.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "the Triton temperature_softmax has no backward; use backend='reference' for gradients"
        )
    from tokenlab.kernels.temperature_softmax.kernel import temperature_softmax_triton

    return temperature_softmax_triton(logits, temperature)
