"""PRIOR (*Prioritizing Image-Related Tokens Enhances Vision-Language Pre-Training*, Chen et al.): a
next-token loss whose tokens are weighted by how *unlikely* a reference model finds them.

The reference (in the paper a text-only LM, blind to the image) scores each target token ``y_t`` of a
sequence of ``k`` tokens; tokens it predicts poorly carry information the reference lacks and get more
weight::

    w_t = (1 − π_ref(y_t | y<t))^α                        (α = 1 in the paper)
    c_t = k · w_t / Σ_{j=1}^{k} w_j                          (weights renormalised to mean 1 per sequence)
    L   = −Σ_sequences Σ_t c_t log π_θ(y_t | y<t) / Σ_sequences k

The weights carry no gradient. With ``α = 0`` (or any reference that is equally sure of every token) every
``c_t = 1`` and ``L`` is the token-mean cross-entropy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenlab._checks import check_finite, check_number, check_tensor
from tokenlab.alignment.common import LossOutput, TokenLogps, check_shape_like_logps, token_loss


def prior_weights(ref_logps: Tensor, mask: Tensor, *, alpha: float = 1.0) -> Tensor:
    """PRIOR's token weights ``c_t = k · w_t / Σ_j w_j`` with ``w_t = (1 − exp(ref_logps_t))^α`` ``[B, T]``,
    0 outside ``mask``; a sequence whose every ``w_t`` is 0 (the reference is certain of all its tokens)
    gets weight 0 throughout. No gradient flows into the weights."""
    check_number("alpha", alpha, low=0.0)
    check_finite("ref_logps", check_tensor("ref_logps", ref_logps, floating=True))
    check_shape_like_logps("mask", mask, ref_logps)
    mask = mask.to(ref_logps.dtype)
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("`mask` must hold only 0 and 1")
    w = (-torch.expm1(ref_logps.detach())).clamp(min=0) ** alpha * mask
    total = w.sum(-1, keepdim=True)
    scaled = mask.sum(-1, keepdim=True) * w / total.clamp(min=torch.finfo(w.dtype).tiny)
    return torch.where(total > 0, scaled, 0)


@token_loss(sum_over="sequences")
def prior_loss(tokens: TokenLogps, *, alpha: float = 1.0) -> LossOutput:
    """*PRIOR* token-weighted next-token loss ``−Σ c_t log π_θ(y_t) / Σ k`` (module docstring), ``[B, T]``
    records with ``ref_logps`` from the reference model. Metrics: ``nll`` (the unweighted token-mean
    cross-entropy) and ``weights/max`` (the largest ``c_t``)."""
    tokens.require("ref_logps")
    weights = prior_weights(tokens.ref_logps, tokens.mask, alpha=alpha)
    count = tokens.mask.sum()
    loss = -(weights * tokens.logps).sum() / count
    nll = -(tokens.logps * tokens.mask).sum().detach() / count
    return LossOutput(loss, {"nll": nll, "weights/max": weights.max()})
