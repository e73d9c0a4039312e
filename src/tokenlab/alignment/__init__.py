"""Alignment: token-level preference and policy losses (DPO family, KTO/BCO, GRPO/GTPO/IcePop) as small
formulas over one chunked fused-linear mechanism that never materialises ``[N, V]`` logits.

Pipeline: :func:`completions` turns a model and a batch into a :class:`Completions` record (hidden states,
LM head, labels, reference) and :func:`chunked_loss` evaluates a loss from :data:`LOSSES` on it, computing the
head's gradients chunk by chunk during the forward pass; or :func:`completion_token_logps` (through
:func:`token_stats`) gives per-token :class:`TokenLogps` records for any other use. A loss turns records
into a :class:`LossOutput` (loss + metrics) and declares itself with :func:`token_loss`. TRL trainers that
compute their loss this way are in :mod:`tokenlab.alignment.trainers`. See docs/alignment.md.
"""

from collections.abc import Callable

from tokenlab.alignment.common import (
    LossDeclaration,
    LossOutput,
    TokenLogps,
    loss_declaration,
    sequence_kl,
    sequence_logratio,
    token_loss,
)
from tokenlab.alignment.fused_linear import Completions, LinearHead, TokenStats, chunked_loss, token_stats
from tokenlab.alignment.hf import (
    causal_lm_head,
    completion_token_logps,
    completions,
    contrastive_token_rewards,
    lm_head_parameters,
    shift_for_next_token,
)
from tokenlab.alignment.policy import (
    NORMALIZATIONS,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    gtpo_conflict_tokens,
    gtpo_loss,
    icepop_loss,
)
from tokenlab.alignment.preference import (
    SparseTokenMask,
    activation_token_mask,
    cdpo_loss,
    critical_token_weights,
    dpo_loss,
    ipo_loss,
    sparsepo_loss,
    tdpo_loss,
    token_level_margin,
    token_weighted_dpo_loss,
    treg_loss,
)
from tokenlab.alignment.unpaired import RewardShift, bco_loss, kto_loss

LOSSES: dict[str, Callable[..., LossOutput]] = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "token_weighted_dpo": token_weighted_dpo_loss,
    "tdpo": tdpo_loss,
    "cdpo": cdpo_loss,
    "sparsepo": sparsepo_loss,
    "treg": treg_loss,
    "kto": kto_loss,
    "bco": bco_loss,
    "grpo": grpo_loss,
    "gtpo": gtpo_loss,
    "icepop": icepop_loss,
}
"""Every loss by name: paired ones take ``(chosen, rejected, **kw)``, unpaired ``(tokens, desirable, **kw)``,
policy ones ``(tokens, advantages, ...)``."""

__all__ = [
    "LOSSES",
    "NORMALIZATIONS",
    "Completions",
    "LinearHead",
    "LossDeclaration",
    "LossOutput",
    "RewardShift",
    "SparseTokenMask",
    "TokenLogps",
    "TokenStats",
    "activation_token_mask",
    "bco_loss",
    "causal_lm_head",
    "cdpo_loss",
    "chunked_loss",
    "clipped_surrogate",
    "completion_token_logps",
    "completions",
    "contrastive_token_rewards",
    "critical_token_weights",
    "dpo_loss",
    "group_advantages",
    "grpo_loss",
    "gtpo_conflict_tokens",
    "gtpo_loss",
    "icepop_loss",
    "ipo_loss",
    "kto_loss",
    "lm_head_parameters",
    "loss_declaration",
    "sequence_kl",
    "sequence_logratio",
    "shift_for_next_token",
    "sparsepo_loss",
    "tdpo_loss",
    "token_level_margin",
    "token_loss",
    "token_stats",
    "token_weighted_dpo_loss",
    "treg_loss",
]
