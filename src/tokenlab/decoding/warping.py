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
against it needs no division and is bit-exact everywhere). :func:`warp_cutoff` computes it,
:func:`warp_logits` applies it; the speculative verification kernel takes the temperature and
this cutoff and so computes the same function in one pass. One difference from HF: where several
tokens tie exactly at the top-p boundary HF keeps some of them (by sort order) and tokenlab keeps
all of them; for top-k both keep all ties.
"""

from __future__ import annotations

import math

import torch

from tokenlab._checks import check_tensor
from tokenlab.backend import Backend
from tokenlab.kernels.temperature_softmax import temperature_softmax


def check_warping(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Validate warping arguments; raise ``TypeError``/``ValueError`` naming the bad one."""
    if not isinstance(do_sample, bool):
        raise TypeError(f"`do_sample` must be a bool, got {type(do_sample).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"`temperature` must be a number, got {type(temperature).__name__}")
    if do_sample and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"`temperature` must be finite and > 0 when sampling, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"`top_k` must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
    ):
        raise ValueError(f"`top_p` must be None or a number in (0, 1], got {top_p!r}")


def warp_cutoff(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The raw-logit cutoff of top-k/top-p: tokens with ``logits ≥ cutoff`` are kept.

    Shapes: ``logits [..., V]`` → ``cutoff [...]`` in the dtype of ``logits`` (``-inf`` when
    neither filter is set, or when ``top_k ≥ V`` and ``top_p = 1``). Raises on a bad warping argument
    (e.g. ``temperature ≤ 0``, which would divide by zero) before computing.
    """
    check_tensor("logits", logits)
    check_warping(True, temperature, top_k, top_p)
    cutoff = torch.full(logits.shape[:-1], float("-inf"), dtype=logits.dtype, device=logits.device)
    if top_k is None and (top_p is None or top_p >= 1):
        return cutoff
    z = (
        logits.float() / temperature
        if logits.dtype in (torch.float16, torch.bfloat16)
        else logits / temperature
    )
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


def warp_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Warped logits ``logits / T`` where ``logits ≥ cutoff``, ``-inf`` elsewhere. ``[..., V]``."""
    return apply_cutoff(logits, warp_cutoff(logits, temperature, top_k, top_p), temperature)


def apply_cutoff(logits: torch.Tensor, cutoff: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T`` where ``logits ≥ cutoff`` (cutoff ``[...]`` broadcast over ``V``), else ``-inf``."""
    return torch.where(logits >= cutoff.unsqueeze(-1), logits / temperature, float("-inf"))


def warped_probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """The warped distribution ``softmax(warp_logits(...))`` over the last dimension. ``[..., V]``."""
    cutoff = warp_cutoff(logits, temperature, top_k, top_p)
    masked = logits.masked_fill(logits < cutoff.unsqueeze(-1), float("-inf"))
    return temperature_softmax(masked, temperature, backend=backend)
