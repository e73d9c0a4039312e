"""Decoding: speculative decoding (chain, batched, and token trees — static, RSD, DySpec) with fused
verification kernels; context-aware decoding (CAD, AdaCAD) as batched, cache-aware
``LogitsProcessor``s; counterfactual generation with the Gumbel-Max SCM; steering processors (refusal
tokens, CyclicReflex); constrained generation (token masking and adaptive weighted rejection
sampling, with importance weights) under regex / JSON / finite-set / callable constraints; token
healing; generation metrics (per-step entropy, branching factor, turn-wise KL drift, unconditional
token forcing); and the logit warping (temperature, top-k, top-p) every sampling loop shares (its
home is :mod:`tokenlab.kernels.warping`; this package is its public face)."""

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
from tokenlab.decoding.context_aware import (
    AdaCADLogitsProcessor,
    ContextAwareLogitsProcessor,
    ContextAwareOutput,
    context_aware_generate,
    jensen_shannon_divergence,
)
from tokenlab.decoding.counterfactual import (
    GumbelSample,
    counterfactual_generate,
    gumbel_generate,
    gumbel_max_choice,
    gumbel_noise,
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
from tokenlab.decoding.steering import (
    CyclicReflexLogitsProcessor,
    RefusalTokenLogitsProcessor,
    RefusalTokens,
    add_refusal_tokens,
    triangular_wave,
)
from tokenlab.decoding.token_healing import (
    HealedPrompt,
    TokenHealingOutput,
    heal_prompt,
    token_healing_generate,
)
from tokenlab.decoding.token_tree import TREE_MODES, TokenTree, draft_tree, score_tree, tree_spec
from tokenlab.kernels.warping import Warping, warp_cutoff, warp_logits, warped_probs

__all__ = [
    "JSON_PATTERN",
    "TREE_MODES",
    "AdaCADLogitsProcessor",
    "BranchingFactor",
    "ConstrainedLogitsProcessor",
    "ConstrainedOutput",
    "ConstrainedStep",
    "Constraint",
    "ContextAwareLogitsProcessor",
    "ContextAwareOutput",
    "CyclicReflexLogitsProcessor",
    "FiniteSetConstraint",
    "GumbelSample",
    "HealedPrompt",
    "JSONConstraint",
    "PredicateConstraint",
    "RefusalTokenLogitsProcessor",
    "RefusalTokens",
    "RegexConstraint",
    "SpeculativeOutput",
    "SpeculativeStats",
    "TokenForcingScan",
    "TokenHealingOutput",
    "TokenTree",
    "TokenVocabulary",
    "Warping",
    "add_refusal_tokens",
    "branching_factor",
    "branching_factor_from_entropies",
    "concat_turns",
    "constrained_generate",
    "constrained_sample",
    "context_aware_generate",
    "counterfactual_generate",
    "draft_tree",
    "gumbel_generate",
    "gumbel_max_choice",
    "gumbel_noise",
    "heal_prompt",
    "jensen_shannon_divergence",
    "next_token_entropy",
    "score_tree",
    "speculative_generate",
    "token_entropy",
    "token_healing_generate",
    "tree_spec",
    "triangular_wave",
    "turn_kl_drift",
    "unconditional_token_forcing",
    "warp_cutoff",
    "warp_logits",
    "warped_probs",
]
