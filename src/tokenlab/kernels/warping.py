"""Logit warping — temperature, top-k, top-p — in one home, shared by sampling loops and kernels.

The warped distribution is the one Hugging Face ``generate`` samples from with
``TemperatureLogitsWarper`` → ``TopKLogitsWarper`` → ``TopPLogitsWarper`` (in that order):

    z = logits / T
    top-k keeps tokens with z ≥ (k-th largest z)
    top-p (nucleus, *The Curious Case of Neural Text Degeneration*) keeps the smallest set of
          most-likely tokens whose probability under softmax(z restricted to top-k) reaches p
          (at least one token)
    p_warped = softmax(z over the kept tokens), 0 elsewhere

Both filters keep an *upper set* of the logits, so the kept set is always
``{v : logits_v ≥ cutoff}`` for one number per row, the **cutoff** (a raw logit, so comparing
against it needs no division and is bit-exact everywhere). :meth:`Warping.cutoff` computes it,
:meth:`Warping.logits` applies it; the speculative verification kernel takes the temperature and
this cutoff and so computes the same function in one pass. One difference from HF: where several
tokens tie exactly at the top-p boundary HF keeps some of them (by sort order) and tokenlab keeps
all of them; for top-k both keep all ties.

:class:`Warping` holds the arguments, validated once when it is built; sampling loops build one at
their public entry and reuse it every step. :func:`warp_cutoff`, :func:`warp_logits` and
:func:`warped_probs` are the one-call forms (public in :mod:`tokenlab.decoding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenlab._checks import check_bool, check_int, check_number, check_positive, check_tensor
from tokenlab.backend import Backend
from tokenlab.kernels.temperature_softmax import temperature_softmax


@dataclass(frozen=True)
class Warping:
    """Validated warping arguments. ``temperature`` must be finite, and > 0 when ``do_sample``
    (greedy decoding ignores it); ``top_k`` an int ≥ 1 or ``None``; ``top_p`` in (0, 1] or ``None``."""

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        check_bool("do_sample", self.do_sample)
        set_ = object.__setattr__
        if self.do_sample:
            set_(self, "temperature", check_positive("temperature", self.temperature))
        else:
            set_(self, "temperature", check_number("temperature", self.temperature))
        if self.top_k is not None:
            set_(self, "top_k", check_int("top_k", self.top_k, low=1))
        if self.top_p is not None:
            set_(self, "top_p", check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True))

    def cutoff(self, logits: torch.Tensor) -> torch.Tensor:
        """The raw-logit cutoff of top-k/top-p: tokens with ``logits ≥ cutoff`` are kept.

        Shapes: ``logits [..., V]`` → ``cutoff [...]`` in the dtype of ``logits`` (``-inf`` when
        neither filter is set, or when ``top_k ≥ V`` and ``top_p = 1``).
        """
        cutoff = torch.full(logits.shape[:-1], float("-inf"), dtype=logits.dtype, device=logits.device)
        top_k, top_p = self.top_k, self.top_p
        if top_k is None and (top_p is None or top_p >= 1):
            return cutoff
        z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        z = z / self.temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        if top_p is not None and top_p < 1:
            sorted_z, order = torch.sort(z, dim=-1)
            cumulative = sorted_z.softmax(dim=-1).cumsum(dim=-1)
            removed = cumulative <= 1 - top_p
            removed[..., -1] = False
            z = z.masked_fill(removed.scatter(-1, order, removed), float("-inf"))
        return logits.masked_fill(z == float("-inf"), float("inf")).amin(dim=-1)

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped logits ``logits / T`` where ``logits ≥ cutoff``, ``-inf`` elsewhere. ``[..., V]``."""
        return apply_cutoff(logits, self.cutoff(logits), self.temperature)

    def probs(self, logits: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
        """The warped distribution ``softmax(self.logits(logits))`` over the last dimension. ``[..., V]``."""
        masked = logits.masked_fill(logits < self.cutoff(logits).unsqueeze(-1), float("-inf"))
        return temperature_softmax(masked, self.temperature, backend=backend)


def check_sampling_inputs(inputs: dict[str, torch.Tensor | None], shapes: dict[str, tuple[int, ...]]) -> None:
    """The inputs a sampling step needs (draft probabilities, uniforms, exponentials — named as in
    ``shapes``): each given, floating point, of its shape. Raises ``ValueError`` naming the argument."""
    for name, shape in shapes.items():
        value = inputs[name]
        if value is None:
            raise ValueError(f"`{name}` of shape {shape} is required when do_sample=True")
        if tuple(value.shape) != shape or not value.is_floating_point():
            raise ValueError(
                f"`{name}` must be a floating-point tensor of shape {shape}, got {tuple(value.shape)}"
            )


def apply_cutoff(logits: torch.Tensor, cutoff: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T`` where ``logits ≥ cutoff`` (cutoff ``[...]`` broadcast over ``V``), else ``-inf``."""
    return torch.where(logits >= cutoff.unsqueeze(-1), logits / temperature, float("-inf"))


def warp_cutoff(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """:meth:`Warping.cutoff`: ``logits [..., V]`` → ``cutoff [...]``. Raises on a bad warping argument
    (e.g. ``temperature ≤ 0``, which would divide by zero) before computing."""
    warping = Warping(True, temperature, top_k, top_p)
    return warping.cutoff(check_tensor("logits", logits, floating=True))


def warp_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """:meth:`Warping.logits`: warped logits ``logits / T`` where kept, ``-inf`` elsewhere. ``[..., V]``."""
    warping = Warping(True, temperature, top_k, top_p)
    return warping.logits(check_tensor("logits", logits, floating=True))


def warped_probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """:meth:`Warping.probs`: the warped distribution over the last dimension. ``[..., V]``."""
    warping = Warping(True, temperature, top_k, top_p)
    return warping.probs(check_tensor("logits", logits, floating=True), backend=backend)
