"""Decoding: speculative decoding (chain, batched, and token trees — static, RSD, DySpec) with fused
verification kernels; context-aware decoding (CAD, AdaCAD) as batched, cache-aware
``LogitsProcessor``s; counterfactual generation with the Gumbel-Max SCM; steering processors (refusal
tokens, CyclicReflex); and the logit warping (temperature, top-k, top-p) every sampling loop shares
(its home is :mod:`tokenlab.kernels.warping`; this package is its public face)."""

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
from tokenlab.decoding.speculative import SpeculativeOutput, SpeculativeStats, speculative_generate
from tokenlab.decoding.steering import (
    CyclicReflexLogitsProcessor,
    RefusalTokenLogitsProcessor,
    RefusalTokens,
    add_refusal_tokens,
    triangular_wave,
)
from tokenlab.decoding.token_tree import TREE_MODES, TokenTree, draft_tree, score_tree, tree_spec
from tokenlab.kernels.warping import Warping, warp_cutoff, warp_logits, warped_probs

__all__ = [
    "TREE_MODES",
    "AdaCADLogitsProcessor",
    "ContextAwareLogitsProcessor",
    "ContextAwareOutput",
    "CyclicReflexLogitsProcessor",
    "GumbelSample",
    "RefusalTokenLogitsProcessor",
    "RefusalTokens",
    "SpeculativeOutput",
    "SpeculativeStats",
    "TokenTree",
    "Warping",
    "add_refusal_tokens",
    "context_aware_generate",
    "counterfactual_generate",
    "draft_tree",
    "gumbel_generate",
    "gumbel_max_choice",
    "gumbel_noise",
    "jensen_shannon_divergence",
    "score_tree",
    "speculative_generate",
    "tree_spec",
    "triangular_wave",
    "warp_cutoff",
    "warp_logits",
    "warped_probs",
]
