"""Decoding: speculative decoding (chain and batched) with a fused verification kernel; constrained
generation (token masking and adaptive weighted rejection sampling, with importance weights) under
regex / JSON / finite-set / callable constraints; token healing; generation metrics (per-step
entropy, branching factor, turn-wise KL drift, unconditional token forcing); and the logit warping
(temperature, top-k, top-p) every sampling loop shares (its home is
:mod:`tokenlab.kernels.warping`; this package is its public face)."""

from tokenlab.decoding.awrs import ConstrainedStep, constrained_sample
from tokenlab.decoding.constrained import ConstrainedLogitsProcessor, ConstrainedOutput, constrained_generate
from tokenlab.decoding.constraints import (
    JSON_PATTERN,
    Constraint,
    FiniteSetConstraint,
    JSONConstraint,
    PredicateConstraint,
    RegexConstraint,
    TokenVocabulary,
)
from tokenlab.decoding.metrics import (
    BranchingFactor,
    TokenForcingScan,
    branching_factor,
    branching_factor_from_entropies,
    concat_turns,
    next_token_entropy,
    token_entropy,
    turn_kl_drift,
    unconditional_token_forcing,
)
from tokenlab.decoding.speculative import SpeculativeOutput, SpeculativeStats, speculative_generate
from tokenlab.decoding.token_healing import (
    HealedPrompt,
    TokenHealingOutput,
    heal_prompt,
    token_healing_generate,
)
from tokenlab.kernels.warping import Warping, warp_cutoff, warp_logits, warped_probs

__all__ = [
    "JSON_PATTERN",
    "BranchingFactor",
    "ConstrainedLogitsProcessor",
    "ConstrainedOutput",
    "ConstrainedStep",
    "Constraint",
    "FiniteSetConstraint",
    "HealedPrompt",
    "JSONConstraint",
    "PredicateConstraint",
    "RegexConstraint",
    "SpeculativeOutput",
    "SpeculativeStats",
    "TokenForcingScan",
    "TokenHealingOutput",
    "TokenVocabulary",
    "Warping",
    "branching_factor",
    "branching_factor_from_entropies",
    "concat_turns",
    "constrained_generate",
    "constrained_sample",
    "heal_prompt",
    "next_token_entropy",
    "speculative_generate",
    "token_entropy",
    "token_healing_generate",
    "turn_kl_drift",
    "unconditional_token_forcing",
    "warp_cutoff",
    "warp_logits",
    "warped_probs",
]
