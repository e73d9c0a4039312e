"""Policy-gradient losses on sampled groups: GRPO, GTPO, IcePop.

All three share the PPO clipped surrogate on the token ratio ``ρ_t = π_θ(y_t) / π_old(y_t)``::

    ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A)

and one of the length normalisations of TRL (:data:`NORMALIZATIONS`): ``"sequence"`` (mean over each
completion, then over completions — GRPO), ``"token"`` (sum over all tokens / number of tokens — BNPO,
DAPO-style) and ``"dr_grpo"`` (sum / (B · max completion length) — *Understanding R1-Zero-Like
Training*).

* GRPO (*DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models*):
  group-normalised advantages (:func:`group_advantages`) and the k3 KL estimator
  ``exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1`` with weight β.
* GTPO (*GTPO: Trajectory-Based Policy Optimization in Large Language Models*): no reference model;
  conflict tokens — the runs of tokens, from the start and from the end, that completions of one group
  with advantages of opposite sign share position by position (:func:`gtpo_conflict_tokens`) — get no
  update from negative completions and an amplified update from positive ones; completions whose mean
  entropy exceeds a threshold are dropped and the others' advantages lowered by their entropy.
* IcePop (*Every Step Evolves: Scaling Reinforcement Learning for Trillion-Scale Thinking Model*):
  tokens whose training/inference probability ratio ``k_t = π_train(y_t) / π_infer(y_t)`` (both at the
  sampling parameters) leaves ``[α, β]`` are masked; inside the band the surrogate is weighted by
  ``k_t``, so the gradient outside the band is exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tokenlab._checks import (
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_number,
    check_positive,
    check_tensor,
)
from tokenlab.alignment.common import LossOutput, TokenLogps, check_weights, token_loss


def _by_sequence(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    return ((per_token * mask).sum(-1) / mask.sum(-1)).mean()


def _by_token(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    return (per_token * mask).sum() / mask.sum()


def _dr_grpo(per_token: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    return (per_token * mask).sum() / (per_token.shape[0] * (max_len or per_token.shape[1]))


NORMALIZATIONS: dict[str, Callable[[Tensor, Tensor, int | None], Tensor]] = {
    "sequence": _by_sequence,
    "token": _by_token,
    "dr_grpo": _dr_grpo,
}


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO advantages ``(r − mean_group(r)) / (std + eps)`` for rewards ``[B]`` laid out as consecutive
    groups of ``group_size`` completions of one prompt. ``scale``: ``"group"`` (std within the group),
    ``"batch"`` (std over the batch) or ``"none"`` (no division). Std is unbiased, as in TRL."""
    check_tensor("rewards", rewards)
    check_finite("rewards", rewards)
    check_int("group_size", group_size, low=2)
    check_choice("scale", scale, ("group", "batch", "none"))
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"`rewards` [B] must split into groups of `group_size`, got {tuple(rewards.shape)}, {group_size}"
        )
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(-1, keepdim=True)).reshape(-1)
    if scale == "group":
        advantages = advantages / (grouped.std(-1).repeat_interleave(group_size) + eps)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + eps)
    return advantages


def _check_policy_inputs(
    tokens: TokenLogps, advantages: Tensor, normalization: str, **others: Tensor | None
) -> Tensor:
    check_choice("normalization", normalization, sorted(NORMALIZATIONS))
    check_tensor("advantages", advantages)
    check_finite("advantages", advantages)
    B = tokens.logps.shape[0]
    if advantages.shape not in ((B,), tokens.logps.shape):
        raise ValueError(f"`advantages` must be [B] or [B, T], got {tuple(advantages.shape)}")
    for name, value in others.items():
        check_weights(name, value, tokens)  # same [B, T] shape and finite
    return advantages.unsqueeze(-1) if advantages.ndim == 1 else advantages


def clipped_surrogate(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO loss ``−min(ρA, clip(ρ)A)`` and the clip-fraction metrics (unmasked)."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return per_token, {"clip_ratio/low": low.float(), "clip_ratio/high": high.float()}


def _finish(
    per_token: Tensor, mask: Tensor, normalization: str, max_len: int | None, token_metrics: dict
) -> LossOutput:
    loss = NORMALIZATIONS[normalization](per_token, mask, max_len)
    n = mask.sum()
    metrics = {k: ((v.detach() * mask).sum() / n) for k, v in token_metrics.items()}
    return LossOutput(loss, metrics)


def _check_clip(epsilon_low: float, epsilon_high: float | None) -> float:
    check_positive("epsilon_low", epsilon_low)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    check_positive("epsilon_high", epsilon_high)
    return epsilon_high


@token_loss(sum_over="tokens")
def grpo_loss(
    tokens: TokenLogps,
    advantages: Tensor,
    *,
    old_logps: Tensor | None = None,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    normalization: str = "sequence",
    max_completion_length: int | None = None,
    kl_importance_weight: bool = False,
) -> LossOutput:
    """GRPO loss: clipped surrogate + β·k3 KL to the reference, length-normalised.

    Args:
        tokens: policy ``logps``, completion ``mask`` and (when ``beta > 0``) ``ref_logps``, ``[B, T]``.
        advantages: ``[B]`` (e.g. :func:`group_advantages`) or per-token ``[B, T]``.
        old_logps: log-probs at sampling time; default ``logps.detach()`` (one update per batch).
        beta: KL weight ≥ 0 (0: no reference needed).
        normalization: a key of :data:`NORMALIZATIONS`; ``max_completion_length`` is dr_grpo's constant.
        kl_importance_weight: weight the k3 term by the token ratio ``ρ_t`` (with its gradient), the
            importance-sampling-corrected KL estimate of *DeepSeek-V3.2* (TRL's ``use_bias_correction_kl``).
    """
    check_number("beta", beta, low=0.0)
    check_bool("kl_importance_weight", kl_importance_weight)
    epsilon_high = _check_clip(epsilon_low, epsilon_high)
    adv = _check_policy_inputs(tokens, advantages, normalization, old_logps=old_logps)
    old = tokens.logps.detach() if old_logps is None else old_logps
    per_token, token_metrics = clipped_surrogate(tokens.logps, old, adv, epsilon_low, epsilon_high)
    if beta > 0:
        tokens.require("ref_logps")
        d = tokens.ref_logps - tokens.logps
        kl = torch.exp(d) - d - 1
        token_metrics["kl"] = kl
        if kl_importance_weight:
            kl = kl * torch.exp(tokens.logps - old)
        per_token = per_token + beta * kl
    return _finish(per_token, tokens.mask, normalization, max_completion_length, token_metrics)


GTPO_CONFLICT_RULES: tuple[str, ...] = ("runs", "anywhere")


def _opposite_match(ids: Tensor, valid: Tensor, sign: Tensor) -> Tensor:
    """``[G, g, T]`` bool: token ``t`` of completion ``i`` also stands at position ``t`` of a completion
    of the same group whose advantage has the opposite sign (zero advantages never match)."""
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)  # [G, i, j, T]
    opposite = (sign.unsqueeze(2) * sign.unsqueeze(1)) < 0  # [G, i, j]
    return (same & opposite.unsqueeze(-1)).any(2)


def _gtpo_conflicts(
    completion_ids: Tensor, mask: Tensor, advantages: Tensor, group_size: int, rule: str
) -> tuple[Tensor, Tensor]:
    """Conflict tokens ``[B, T]`` as two masks ``(from_start, from_end)`` (for ``"anywhere"`` the second
    is all False). Inputs are checked by the callers."""
    B, T = completion_ids.shape
    ids = completion_ids.view(-1, group_size, T)
    valid = (mask > 0).view(-1, group_size, T)
    sign = torch.sign(advantages).view(-1, group_size)
    if rule == "anywhere":
        return _opposite_match(ids, valid, sign).view(B, T), torch.zeros(B, T, dtype=torch.bool)
    # From the start: the unbroken run of matches at positions 0, 1, … (cumprod stops at the first miss).
    from_start = _opposite_match(ids, valid, sign).long().cumprod(-1).bool() & valid
    # From the end: align the completions at their last valid token (``back = last − column``), then the
    # unbroken run of matches at back = 0, 1, … ; map the run back to the columns.
    columns = torch.arange(T, device=ids.device)
    last = torch.where(valid, columns, -1).amax(-1, keepdim=True)  # [G, g, 1]
    source = last - columns  # column of the token `back` places before the last one
    rev_ids = ids.gather(-1, source.clamp(min=0))
    rev_valid = valid.gather(-1, source.clamp(min=0)) & (source >= 0)
    run = _opposite_match(rev_ids, rev_valid, sign).long().cumprod(-1).bool() & rev_valid
    from_end = run.gather(-1, source.clamp(0, T - 1)) & valid & (source >= 0)
    return from_start.view(B, T), (from_end & valid).view(B, T)


def gtpo_conflict_tokens(
    completion_ids: Tensor, mask: Tensor, advantages: Tensor, group_size: int, *, rule: str = "runs"
) -> Tensor:
    """GTPO's conflict tokens ``[B, T]`` (bool).

    A token *matches* when the same token stands at the same position of another completion of its group
    whose advantage has the opposite sign (zero advantages never match). *GTPO: Trajectory-Based Policy
    Optimization in Large Language Models* protects the tokens completions share with opposite rewards;
    the authors' code (``build_conflict_mask`` in ``gtpo/gtpo_training.py``) marks as conflicts only

    * ``rule="runs"`` (default, the authors' rule): the unbroken run of matching tokens counted from the
      completion's start (a ``cumprod`` of the match indicator), plus the unbroken run counted back from
      its end, with the completions aligned at their last token — a coincidence in the middle of the
      text, after a first mismatch, is not a conflict;
    * ``rule="anywhere"``: every matching position (the literal "same token, same position" reading).

    ``completion_ids``/``mask``: ``[B, T]`` in consecutive groups of ``group_size``; ``advantages``: ``[B]``.
    """
    _check_conflict_inputs(completion_ids, mask, advantages, group_size, rule)
    from_start, from_end = _gtpo_conflicts(completion_ids, mask, advantages, group_size, rule)
    return from_start | from_end


def _check_conflict_inputs(completion_ids, mask, advantages, group_size, rule) -> None:
    check_tensor("completion_ids", completion_ids)
    check_tensor("mask", mask)
    check_tensor("advantages", advantages)
    check_int("group_size", group_size, low=1)
    check_choice("rule", rule, GTPO_CONFLICT_RULES)
    if completion_ids.ndim != 2:
        raise ValueError(f"`completion_ids` must be [B, T], got shape {tuple(completion_ids.shape)}")
    B, T = completion_ids.shape
    if B % group_size or advantages.shape != (B,) or mask.shape != (B, T):
        raise ValueError(
            "`completion_ids`/`mask` [B, T] and `advantages` [B] must split into groups of `group_size`"
        )


@token_loss(sum_over="sequences", needs=("entropy",))
def gtpo_loss(
    tokens: TokenLogps,
    advantages: Tensor,
    completion_ids: Tensor,
    group_size: int,
    *,
    entropy_threshold: float = 0.7,
    entropy_penalty: float = 0.1,
    amplify: float = 2.0,
    rule: str = "runs",
    conflict_normalization: bool = True,
    old_logps: Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    normalization: str = "sequence",
) -> LossOutput:
    """GTPO loss (*GTPO: Trajectory-Based Policy Optimization in Large Language Models*), no reference
    model. With ``A_i`` the completion's advantage, ``H̄_i`` its mean token entropy (``tokens.entropy``,
    nats) and the conflict runs of :func:`gtpo_conflict_tokens`::

        Â_i   = A_i − λ_H · H̄_i   if H̄_i ≤ τ,  else 0          (entropy shaping and filter)
        w_t   = c(start_t) · c(end_t),   c(x) = amplify if x and A_i > 0, 0 if x and A_i < 0, else 1
        ℓ_i,t = w_t · clipped_surrogate(ρ_t, Â_i) / max(1, |C_i|)

    where ``start_t``/``end_t`` say whether token ``t`` is in the conflict run from the start/end and
    ``|C_i|`` counts the tokens in either run; the per-token losses are then length-normalised
    (``normalization``, default ``"sequence"``: mean over each completion, then over completions).

    Defaults follow the authors' code (``gtpo/gtpo_training.py``): ``τ = 0.7`` (``ENT_THRESHOLD``),
    ``λ_H = 0.1`` (``ENT_SCALE``: kept completions' advantages are lowered by 0.1·entropy), conflict
    weight 2 (``W_RAW``), the conflict flags taken from the advantages *before* entropy shaping, the
    two runs' weights multiplied, and each completion's loss divided by its number of conflict tokens
    (``conflict_normalization``). ``rule="anywhere"``, ``entropy_penalty=0``,
    ``conflict_normalization=False`` and ``normalization="token"`` give the plain reading of the
    paper's text (every same-position match conflicts; filter only).
    """
    check_positive("entropy_threshold", entropy_threshold)
    check_number("entropy_penalty", entropy_penalty, low=0.0)
    check_positive("amplify", amplify)
    check_bool("conflict_normalization", conflict_normalization)
    epsilon_high = _check_clip(epsilon_low, epsilon_high)
    tokens.require("entropy")
    adv = _check_policy_inputs(tokens, advantages, normalization, old_logps=old_logps)
    if advantages.ndim != 1:
        raise ValueError("GTPO needs one advantage per completion: `advantages` [B]")
    _check_conflict_inputs(completion_ids, tokens.mask, advantages, group_size, rule)
    from_start, from_end = _gtpo_conflicts(completion_ids, tokens.mask, advantages, group_size, rule)
    valid = tokens.mask > 0
    from_start, from_end = from_start.to(valid.device) & valid, from_end.to(valid.device) & valid

    def run_weight(in_run: Tensor) -> Tensor:
        weight = torch.where(in_run & (adv > 0), amplify, 1.0)
        return torch.where(in_run & (adv < 0), 0.0, weight).to(tokens.logps.dtype)

    weights = run_weight(from_start) * run_weight(from_end)
    conflict = from_start | from_end
    if conflict_normalization:
        weights = weights / conflict.sum(-1, keepdim=True).clamp(min=1).to(weights.dtype)
    mean_entropy = (tokens.entropy.detach() * tokens.mask).sum(-1) / tokens.mask.sum(-1)
    kept = mean_entropy <= entropy_threshold
    shaped = torch.where(kept, advantages - entropy_penalty * mean_entropy, 0.0).unsqueeze(-1)
    old = tokens.logps.detach() if old_logps is None else old_logps
    per_token, token_metrics = clipped_surrogate(tokens.logps, old, shaped, epsilon_low, epsilon_high)
    token_metrics.update({"conflict_fraction": conflict.to(tokens.logps.dtype), "entropy": tokens.entropy})
    out = _finish(per_token * weights, tokens.mask, normalization, None, token_metrics)
    out.metrics["filtered_fraction"] = (~kept).float().mean()
    return out


@token_loss(sum_over="tokens")
def icepop_loss(
    tokens: TokenLogps,
    advantages: Tensor,
    *,
    inference_logps: Tensor,
    old_logps: Tensor | None = None,
    alpha: float = 0.5,
    beta: float = 5.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    normalization: str = "token",
) -> LossOutput:
    """IcePop loss: ``Σ_t M(k_t) ℓ_t`` with ``k_t = π_old(y_t) / π_infer(y_t)`` and ``M(k) = k`` for
    ``α ≤ k ≤ β``, else 0.

    Args:
        inference_logps: ``[B, T]`` log-probs the inference engine (e.g. vLLM) reported when sampling.
        old_logps: the training engine's log-probs at the sampling parameters; default
            ``tokens.logps.detach()`` (on-policy step).
        alpha, beta: the band, ``0 < α < 1 < β``.
    """
    if not (isinstance(alpha, (int, float)) and isinstance(beta, (int, float)) and 0 < alpha < 1 < beta):
        raise ValueError(f"IcePop needs 0 < `alpha` < 1 < `beta`, got alpha={alpha!r}, beta={beta!r}")
    epsilon_high = _check_clip(epsilon_low, epsilon_high)
    adv = _check_policy_inputs(
        tokens, advantages, normalization, old_logps=old_logps, inference_logps=inference_logps
    )
    old = tokens.logps.detach() if old_logps is None else old_logps
    k = torch.exp(old.detach() - inference_logps)
    in_band = (k >= alpha) & (k <= beta)
    weight = torch.where(in_band, k, torch.zeros_like(k))
    per_token, token_metrics = clipped_surrogate(tokens.logps, old, adv, epsilon_low, epsilon_high)
    token_metrics["masked_fraction"] = (~in_band).float()
    return _finish(per_token * weight, tokens.mask, normalization, None, token_metrics)
