"""AlignDistil (*AlignDistil: Token-Level Language Model Alignment as Adaptive Policy Distillation*, Zhang et
al., ACL 2025): RLHF with a DPO reward, rewritten as token-level distillation from a teacher distribution
composed from a DPO model and a second model — the reference, or a *reverse* DPO model trained on the same
pairs with chosen and rejected swapped (the contrastive DPO reward).

Theorem 1 of the paper: maximising ``E_{π_θ}[Σ_t β₀ log(π_dpo/π_ref)(y_t)] − β KL(π_θ ‖ π_ref)`` is, token by
token, minimising ``β KL(π_θ(·|s_t) ‖ π*(·|s_t))`` with the teacher

    z* = z_ref + w (z_dpo − z_ref),          w = β₀/β           (logits; π* = softmax(z*))

— a linear combination of DPO-model and reference logits (an extrapolation when ``w > 1``). With the
contrastive reward ``β₀ log(π_dpo/π_rdpo)`` the teacher becomes ``z* = z_dpo + w (z_dpo − z_rdpo)``. The
token-adaptive version makes the weight per token from the two models' disagreement, and scales each token's
KL so that ``β_t = β₀ / w_t``::

    w_t   = s · ‖π_dpo(·|s_t) − π_neg(·|s_t)‖₁ + ε           (s = 10, ε = 1e-3 in the authors' code)
    loss  = mean_sequences  Σ_t m_t (β₀ / w_t) KL(π_θ(·|s_t) ‖ π*_t(·|s_t)) / Σ_t m_t

(``π_neg`` is the reverse DPO model, or the reference for the non-contrastive teacher). Read from the
authors' code (songmzhang/AlignDistil, ``aligndistil_offpolicy_trainer.py``): the distance is the L1 norm
(twice the total variation), the KL is the reverse ``KL(π_θ ‖ π*)``, sequences are length-normalised.

On the chunked path the teacher's logits come from two extra frozen heads per chunk
(:attr:`~tokenlab.alignment.fused_linear.Completions.teachers` = (DPO head, reverse-DPO or reference head))
and :class:`AlignDistilTeacher` composes them; :func:`aligndistil_loss` reads the per-token ``teacher_kl`` and
``teacher_weight`` (``w_t``) of the records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenlab._checks import check_bool, check_positive
from tokenlab.alignment.common import LossOutput, TokenLogps, masked_sum, token_loss


@dataclass(frozen=True)
class AlignDistilTeacher:
    """AlignDistil's teacher, a :data:`~tokenlab.alignment.fused_linear.Teacher` for ``chunked_loss``.

    Called with the logits ``[z_dpo, z_neg]`` (``[n, V]`` each) of the DPO model and of the reverse DPO model
    (``contrastive=True``) or the reference (``contrastive=False``), it returns ``log softmax(z*)`` and the
    per-token weight ``w_t`` ``[n]``::

        contrastive:        z* = z_dpo + w_t (z_dpo − z_neg)
        plain (Theorem 1):  z* = z_neg + w_t (z_dpo − z_neg)

    Attributes:
        weight: a fixed ``w`` (= β₀/β of Theorem 1) for every token; None: the token-adaptive
            ``w_t = scale · ‖softmax(z_dpo) − softmax(z_neg)‖₁ + eps``.
        scale: ``s`` of the adaptive weight (the authors' ``beta2``, 10 in their scripts).
        eps: the adaptive weight's floor (1e-3 in the authors' code).
        contrastive: the second model is a reverse DPO model (the paper's contrastive DPO reward).
    """

    weight: float | None = None
    scale: float = 10.0
    eps: float = 1e-3
    contrastive: bool = True

    def __post_init__(self) -> None:
        if self.weight is not None:
            check_positive("weight", self.weight)
        check_positive("scale", self.scale)
        check_positive("eps", self.eps)
        check_bool("contrastive", self.contrastive)

    def __call__(self, logits: list[Tensor]) -> tuple[Tensor, Tensor]:
        if len(logits) != 2:
            raise ValueError(
                f"AlignDistilTeacher composes 2 teacher heads (DPO, then reverse DPO or reference), got "
                f"{len(logits)}"
            )
        z_dpo, z_neg = logits
        if self.weight is None:
            distance = torch.softmax(z_dpo, -1).sub_(torch.softmax(z_neg, -1)).abs_().sum(-1)
            w = self.scale * distance + self.eps
        else:
            w = z_dpo.new_full(z_dpo.shape[:1], self.weight)
        step = (w + 1 if self.contrastive else w).unsqueeze(-1)
        teacher = z_dpo.sub_(z_neg).mul_(step).add_(z_neg)  # z_neg + step (z_dpo − z_neg), in place
        return torch.log_softmax(teacher, -1), w


@token_loss(sum_over="tokens", needs=("teacher_kl",))
def aligndistil_loss(tokens: TokenLogps, *, beta: float = 0.1, length_normalize: bool = True) -> LossOutput:
    """AlignDistil's distillation loss ``mean_b Σ_t m_t (β / w_t) KL(π_θ ‖ π*_t) [/ Σ_t m_t]`` on ``[B, T]``
    records with ``teacher_kl`` and ``teacher_weight`` (``w_t``) from :class:`AlignDistilTeacher` (through
    ``chunked_loss(..., teacher=AlignDistilTeacher(...))``). ``beta`` is the DPO model's β₀. Metrics:
    ``teacher_kl`` (token-mean KL to the teacher) and ``teacher_weight`` (token-mean ``w_t``)."""
    check_positive("beta", beta)
    check_bool("length_normalize", length_normalize)
    tokens.require("teacher_kl", "teacher_weight")
    per_sequence = masked_sum(beta / tokens.teacher_weight * tokens.teacher_kl, tokens.mask)
    if length_normalize:
        per_sequence = per_sequence / tokens.mask.sum(-1)
    count = tokens.mask.sum()
    metrics = {
        "teacher_kl": masked_sum(tokens.teacher_kl.detach(), tokens.mask).sum() / count,
        "teacher_weight": masked_sum(tokens.teacher_weight, tokens.mask).sum() / count,
    }
    return LossOutput(per_sequence.mean(), metrics)
