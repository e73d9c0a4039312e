"""Paired preference losses: DPO, IPO, token-weighted DPO and the token-level family.

All losses take a ``chosen`` and a ``rejected`` :class:`~tokenlab.alignment.common.TokenLogps` (``[B, T]``
per-token log-probs of policy and reference, completion mask, optionally per-token KL) and return a
:class:`~tokenlab.alignment.common.LossOutput`. Every one of them is an instance of one token-level
margin (:func:`token_level_margin`)::

    u = β (Σ_t w⁺_t Δ⁺_t − Σ_t w⁻_t Δ⁻_t)                     Δ_t = log π_θ(y_t) − log π_ref(y_t)
    δ = β (Σ_t m⁻_t KL⁻_t − Σ_t m⁺_t KL⁺_t)                   KL_t = KL(π_ref(·|y_<t) ‖ π_θ(·|y_<t))
    loss = mean −log σ(u − γ δ)

* DPO (*Direct Preference Optimization: Your Language Model is Secretly a Reward Model*): w = 1, γ = 0.
* token-weighted DPO: any ``w`` (critical-token DPO and T-REG supply them), γ = 0.
* TDPO1 / TDPO2 (*Token-level Direct Preference Optimization*): w = m = 1; γ = 1, or γ = α with a
  stop-gradient on the chosen KL (TDPO2).
* SparsePO (*SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks*): reward masks
  ``w`` and KL masks ``m``, γ = 1.
* IPO (*A General Theoretical Paradigm to Understand Learning from Human Preferences*) is the squared
  loss ``(h − 1/(2τ))²`` on the length-averaged log-ratio difference ``h`` (as in TRL).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenlab._checks import check_positive, check_tensor
from tokenlab.alignment.common import (
    LossOutput,
    TokenLogps,
    check_pair,
    check_weights,
    masked_sum,
    preference_metrics,
    sequence_kl,
    sequence_logratio,
    sigmoid_preference_loss,
    token_loss,
)


def token_level_margin(
    chosen: TokenLogps,
    rejected: TokenLogps,
    *,
    beta: float,
    chosen_weights: Tensor | None = None,
    rejected_weights: Tensor | None = None,
    kl_coef: float = 0.0,
    chosen_kl_weights: Tensor | None = None,
    rejected_kl_weights: Tensor | None = None,
    detach_chosen_kl: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The shared margin ``u − γ δ`` ``[B]`` (see the module docstring) and its reward metrics."""
    check_positive("beta", beta)
    check_pair(chosen, rejected)
    for name, w, like in (
        ("chosen_weights", chosen_weights, chosen),
        ("rejected_weights", rejected_weights, rejected),
        ("chosen_kl_weights", chosen_kl_weights, chosen),
        ("rejected_kl_weights", rejected_kl_weights, rejected),
    ):
        check_weights(name, w, like)
    chosen_rewards = beta * sequence_logratio(chosen, chosen_weights)
    rejected_rewards = beta * sequence_logratio(rejected, rejected_weights)
    margin = chosen_rewards - rejected_rewards
    extra: dict[str, Tensor] = {}
    if kl_coef:
        chosen_kl = beta * sequence_kl(chosen, chosen_kl_weights)
        rejected_kl = beta * sequence_kl(rejected, rejected_kl_weights)
        if detach_chosen_kl:
            chosen_kl = chosen_kl.detach()
        margin = margin - kl_coef * (rejected_kl - chosen_kl)
        extra = {"kl/chosen": chosen_kl.mean() / beta, "kl/rejected": rejected_kl.mean() / beta}
    return margin, preference_metrics(chosen_rewards, rejected_rewards, **extra)


@token_loss(sum_over="sequences")
def token_weighted_dpo_loss(
    chosen: TokenLogps,
    rejected: TokenLogps,
    *,
    beta: float = 0.1,
    chosen_weights: Tensor | None = None,
    rejected_weights: Tensor | None = None,
) -> LossOutput:
    """Token-weighted DPO: ``−log σ(β Σ w⁺Δ⁺ − β Σ w⁻Δ⁻)``; uniform weights give DPO exactly."""
    margin, metrics = token_level_margin(
        chosen, rejected, beta=beta, chosen_weights=chosen_weights, rejected_weights=rejected_weights
    )
    return LossOutput(sigmoid_preference_loss(margin), metrics)


@token_loss(sum_over="sequences")
def dpo_loss(chosen: TokenLogps, rejected: TokenLogps, *, beta: float = 0.1) -> LossOutput:
    """*Direct Preference Optimization*: ``−log σ(β (log π_θ/π_ref)(y⁺) − β (log π_θ/π_ref)(y⁻))``."""
    return token_weighted_dpo_loss(chosen, rejected, beta=beta)


@token_loss(sum_over="sequences")
def ipo_loss(chosen: TokenLogps, rejected: TokenLogps, *, beta: float = 0.1) -> LossOutput:
    """IPO (*A General Theoretical Paradigm to Understand Learning from Human Preferences*, Eq. 17):
    ``(h − 1/(2τ))²`` with ``τ = beta`` and ``h`` the difference of length-averaged log-ratios (the
    normalisation TRL uses, confirmed with the IPO authors)."""
    check_positive("beta", beta)
    check_pair(chosen, rejected)
    chosen_avg = sequence_logratio(chosen) / chosen.mask.sum(-1)
    rejected_avg = sequence_logratio(rejected) / rejected.mask.sum(-1)
    loss = ((chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2).mean()
    metrics = preference_metrics(beta * sequence_logratio(chosen), beta * sequence_logratio(rejected))
    return LossOutput(loss, metrics)


@token_loss(sum_over="sequences", needs=("kl",))
def tdpo_loss(
    chosen: TokenLogps, rejected: TokenLogps, *, beta: float = 0.1, alpha: float = 0.5, variant: str = "tdpo2"
) -> LossOutput:
    """*Token-level Direct Preference Optimization*: ``−log σ(u − δ)`` (TDPO1) or ``−log σ(u − α δ₂)``
    (TDPO2, chosen-side sequential KL under stop-gradient). Needs ``kl`` on both sides (from
    :func:`~tokenlab.alignment.fused_linear.token_stats` with a reference head)."""
    if variant not in ("tdpo1", "tdpo2"):
        raise ValueError(f"`variant` must be 'tdpo1' or 'tdpo2', got {variant!r}")
    if variant == "tdpo2":
        check_positive("alpha", alpha)
    margin, metrics = token_level_margin(
        chosen,
        rejected,
        beta=beta,
        kl_coef=1.0 if variant == "tdpo1" else alpha,
        detach_chosen_kl=variant == "tdpo2",
    )
    return LossOutput(sigmoid_preference_loss(margin), metrics)


@token_loss(sum_over="sequences", needs=("kl",))
def sparsepo_loss(
    chosen: TokenLogps,
    rejected: TokenLogps,
    *,
    beta: float = 0.1,
    chosen_reward_mask: Tensor,
    rejected_reward_mask: Tensor,
    chosen_kl_mask: Tensor | None = None,
    rejected_kl_mask: Tensor | None = None,
) -> LossOutput:
    """*SparsePO*: token masks on the reward (``m_u``) and on the sequential KL (``m_d``; the reward masks
    when not given — the "common mask" setting). Masks come from :func:`activation_token_mask`
    (reference-derived) or a :class:`SparseTokenMask` (learned)."""
    margin, metrics = token_level_margin(
        chosen,
        rejected,
        beta=beta,
        chosen_weights=chosen_reward_mask,
        rejected_weights=rejected_reward_mask,
        kl_coef=1.0,
        chosen_kl_weights=chosen_reward_mask if chosen_kl_mask is None else chosen_kl_mask,
        rejected_kl_weights=rejected_reward_mask if rejected_kl_mask is None else rejected_kl_mask,
    )
    active = torch.cat([chosen_reward_mask[chosen.mask > 0], rejected_reward_mask[rejected.mask > 0]])
    metrics["mask/nonzero_fraction"] = (active != 0).float().mean().detach()
    return LossOutput(sigmoid_preference_loss(margin), metrics)


def activation_token_mask(hidden_states: tuple[Tensor, ...] | list[Tensor], mask: Tensor) -> Tensor:
    """SparsePO's reference-derived mask: per token, the mean over layers and features of the reference
    model's activations (``output_hidden_states``), min–max normalised to [0, 1] within each sequence's
    completion tokens. ``hidden_states``: L tensors ``[B, T, H]``; ``mask``: ``[B, T]``. No gradient."""
    with torch.no_grad():
        act = torch.stack([h.float().mean(-1) for h in hidden_states]).mean(0)
        m = mask > 0
        lo = act.masked_fill(~m, float("inf")).amin(-1, keepdim=True)
        hi = act.masked_fill(~m, float("-inf")).amax(-1, keepdim=True)
        return ((act - lo) / (hi - lo).clamp_min(1e-12)).masked_fill(~m, 0.0)


class SparseTokenMask(nn.Module):
    """SparsePO's learned masks: ``m = ReLU(h Wᵀ + b)`` on the policy's hidden states ``[B, T, H]``, one
    output for the reward mask and (``independent=True``) one for the KL mask; ReLU makes them sparse."""

    def __init__(self, hidden_size: int, independent: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 2 if independent else 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.ones_(self.proj.bias)  # starts as the all-ones mask, i.e. TDPO1

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        m = torch.relu(self.proj(hidden))
        return m[..., 0], m[..., -1]


def critical_token_weights(positive_logps: Tensor, negative_logps: Tensor, *, ce_beta: float = 1.0) -> Tensor:
    """Token weights of *Critical Tokens Matter* (cDPO) for a rejected (incorrect) completion, by contrastive
    estimation between a model fine-tuned on correct trajectories (positive) and one on incorrect ones
    (negative): the score ``s_t = exp(min(0, (1+β) log p_pos(y_t) − β log p_neg(y_t)))`` ∈ (0, 1] is high
    where the positive model agrees with the token; the weight is ``1 − s_t``, largest on critical tokens
    that only the negative model favours. Inputs ``[B, T]``; the output carries no gradient."""
    check_positive("ce_beta", ce_beta)
    check_tensor("positive_logps", positive_logps)
    check_tensor("negative_logps", negative_logps)
    if positive_logps.shape != negative_logps.shape:
        raise ValueError(
            f"`positive_logps` {tuple(positive_logps.shape)} and `negative_logps` "
            f"{tuple(negative_logps.shape)} must have the same shape"
        )
    score = (1 + ce_beta) * positive_logps.detach() - ce_beta * negative_logps.detach()
    return 1 - score.clamp(max=0).exp()


@token_loss(sum_over="sequences")
def cdpo_loss(
    chosen: TokenLogps,
    rejected: TokenLogps,
    *,
    beta: float = 0.1,
    positive_logps: Tensor,
    negative_logps: Tensor,
    ce_beta: float = 1.0,
) -> LossOutput:
    """cDPO: token-weighted DPO whose rejected-side weights are :func:`critical_token_weights` of the
    rejected completion (``positive_logps``/``negative_logps`` ``[B, T]`` on the rejected tokens)."""
    check_weights("positive_logps", positive_logps, rejected)  # [B, T] like `rejected`, finite
    check_weights("negative_logps", negative_logps, rejected)
    weights = critical_token_weights(positive_logps, negative_logps, ce_beta=ce_beta)
    out = token_weighted_dpo_loss(chosen, rejected, beta=beta, rejected_weights=weights)
    out.metrics["weights/rejected_mean"] = masked_sum(weights, rejected.mask).sum() / rejected.mask.sum()
    return out


@token_loss(sum_over="sequences")
def treg_loss(
    chosen: TokenLogps,
    rejected: TokenLogps,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    chosen_token_rewards: Tensor,
    rejected_token_rewards: Tensor,
) -> LossOutput:
    """*T-REG: Preference Optimization with Token-Level Reward Regularization*: DPO plus ``α`` times a
    token-level regulariser that asks the implicit token rewards ``βΔ_t``, weighted by self-generated
    token rewards ``r_t`` ∈ (−1, 1) (:func:`~tokenlab.alignment.hf.contrastive_token_rewards`), to
    agree in sign on each sequence: ``L_reg = −½ [log σ(β Σ r⁺_t Δ⁺_t) + log σ(β Σ r⁻_t Δ⁻_t)]``."""
    check_positive("alpha", alpha)
    margin, metrics = token_level_margin(chosen, rejected, beta=beta)
    check_weights("chosen_token_rewards", chosen_token_rewards, chosen)
    check_weights("rejected_token_rewards", rejected_token_rewards, rejected)
    reg = 0.5 * (
        sigmoid_preference_loss(beta * sequence_logratio(chosen, chosen_token_rewards))
        + sigmoid_preference_loss(beta * sequence_logratio(rejected, rejected_token_rewards))
    )
    dpo = sigmoid_preference_loss(margin)
    metrics.update({"loss/dpo": dpo.detach(), "loss/token_reg": reg.detach()})
    return LossOutput(dpo + alpha * reg, metrics)
