"""Decoding: speculative decoding (chain, batched, and token trees — static, RSD, DySpec) with fused
verification kernels, and the logit warping (temperature, top-k, top-p) every sampling loop shares
(its home is :mod:`tokenlab.kernels.warping`; this package is its public face)."""

from tokenlab.decoding.speculative import SpeculativeOutput, SpeculativeStats, speculative_generate
from tokenlab.decoding.token_tree import TREE_MODES, TokenTree, draft_tree, score_tree, tree_spec
from tokenlab.kernels.warping import Warping, warp_cutoff, warp_logits, warped_probs

__all__ = [
    "TREE_MODES",
    "SpeculativeOutput",
    "SpeculativeStats",
    "TokenTree",
    "Warping",
    "draft_tree",
    "score_tree",
    "speculative_generate",
    "tree_spec",
    "warp_cutoff",
    "warp_logits",
    "warped_probs",
]
