"""Unpaired losses: each completion is labelled desirable or undesirable on its own.

* KTO (*KTO: Model Alignment as Prospect Theoretic Optimization*, Eq. 7): with ``r = log π_θ/π_ref``
  of a completion and the reference point ``z₀ = max(0, mean KL estimate)`` (no gradient)::

      desirable:   λ_D (1 − σ(β (r − z₀)))        undesirable:   λ_U (1 − σ(β (z₀ − r)))

  The KL estimate is the mean log-ratio of mismatched (prompt, other completion) pairs, as in TRL.
* BCO (*Binary Classifier Optimization for Large Language Model Alignment*): a binary classifier with
  logit ``β r − δ``, where the reward shift ``δ`` is a running mean of rewards (:class:`RewardShift`)::

      desirable:   −log σ(β r − δ)                 undesirable:   −log σ(−(β r − δ))

  Density-ratio matching (the paper's optional prompt-distribution reweighting) enters through
  per-sample ``weights``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenlab._checks import check_finite, check_positive, check_tensor
from tokenlab.alignment.common import LossOutput, TokenLogps, sequence_logratio, token_loss


def _check_labels(desirable: Tensor, tokens: TokenLogps) -> Tensor:
    check_tensor("desirable", desirable)
    if tuple(desirable.shape) != (tokens.logps.shape[0],):
        raise ValueError(f"`desirable` must be [B] = [{tokens.logps.shape[0]}], got {tuple(desirable.shape)}")
    return desirable.bool()


def _unpaired_metrics(rewards: Tensor, desirable: Tensor, **extra: Tensor) -> dict[str, Tensor]:
    rewards = rewards.detach()
    nan = rewards.new_tensor(float("nan"))
    chosen = rewards[desirable].mean() if desirable.any() else nan
    rejected = rewards[~desirable].mean() if (~desirable).any() else nan
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        **extra,
    }


@token_loss(sum_over="sequences")
def kto_loss(
    tokens: TokenLogps,
    desirable: Tensor,
    *,
    kl_logratios: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO loss over a batch of ``B`` completions.

    Args:
        tokens: per-token policy and reference log-probs of the completions.
        desirable: bool ``[B]``.
        kl_logratios: ``[K]`` sequence log-ratios ``log π_θ/π_ref`` of mismatched pairs (e.g. each prompt
            with another example's completion); their clamped mean is the reference point ``z₀``.
    """
    check_positive("beta", beta)
    check_positive("desirable_weight", desirable_weight)
    check_positive("undesirable_weight", undesirable_weight)
    desirable = _check_labels(desirable, tokens)
    check_tensor("kl_logratios", kl_logratios)
    check_finite("kl_logratios", kl_logratios)
    if kl_logratios.numel() == 0:
        raise ValueError("`kl_logratios` is empty; KTO's reference point needs at least one mismatched pair")
    z0 = kl_logratios.detach().mean().clamp(min=0)
    logratio = sequence_logratio(tokens)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio))),
    )
    return LossOutput(losses.mean(), _unpaired_metrics(beta * logratio, desirable, kl=z0))


class RewardShift:
    """BCO's reward shift ``δ``: the running mean of all rewards seen so far (or an exponential moving
    average with ``momentum``). Plain state held by the caller — no globals; under data parallelism,
    all-reduce the rewards before :meth:`update` so every rank holds the same ``δ``."""

    def __init__(self, momentum: float | None = None) -> None:
        if momentum is not None and not 0 < momentum < 1:
            raise ValueError(f"`momentum` must lie in (0, 1) or be None, got {momentum!r}")
        self.momentum = momentum
        self.value = 0.0
        self.count = 0

    def update(self, rewards: Tensor) -> float:
        """Fold a batch of rewards ``[n]`` into ``δ`` and return the new value."""
        check_tensor("rewards", rewards)
        if rewards.numel() == 0:
            raise ValueError("`rewards` is empty: nothing to fold into the reward shift")
        check_finite("rewards", rewards)  # one NaN would poison δ for the rest of training
        r = rewards.detach().double()
        if self.momentum is None or self.count == 0:
            self.value = (self.value * self.count + r.sum().item()) / (self.count + r.numel())
        else:
            self.value = self.momentum * self.value + (1 - self.momentum) * r.mean().item()
        self.count += r.numel()
        return self.value


@token_loss(sum_over="sequences")
def bco_loss(
    tokens: TokenLogps,
    desirable: Tensor,
    *,
    reward_shift: float,
    beta: float = 0.1,
    weights: Tensor | None = None,
) -> LossOutput:
    """BCO loss: mean over completions of the binary cross-entropy with logit ``β r − δ``.

    Args:
        reward_shift: ``δ`` (e.g. :attr:`RewardShift.value` before this batch's update).
        weights: optional per-completion weights ``[B]`` (density-ratio matching); default 1.
    """
    check_positive("beta", beta)
    desirable = _check_labels(desirable, tokens)
    if (
        isinstance(reward_shift, bool)
        or not isinstance(reward_shift, (int, float))
        or not math.isfinite(reward_shift)
    ):
        raise ValueError(f"`reward_shift` must be a finite number, got {reward_shift!r}")
    rewards = beta * sequence_logratio(tokens)
    logit = rewards - reward_shift
    losses = -F.logsigmoid(torch.where(desirable, logit, -logit))
    if weights is not None:
        check_tensor("weights", weights)
        if weights.shape != losses.shape:
            raise ValueError(f"`weights` must be [B] = {tuple(losses.shape)}, got {tuple(weights.shape)}")
        check_finite("weights", weights)
        losses = losses * weights
    accuracy = ((logit.detach() > 0) == desirable).float().mean()
    metrics = _unpaired_metrics(
        rewards, desirable, reward_shift=rewards.new_tensor(reward_shift), accuracy=accuracy
    )
    return LossOutput(losses.mean(), metrics)
