"""Decoding: speculative decoding (chain, batched, token trees) with a fused verification kernel,
contrastive/context-aware decoding, counterfactual generation, steering logits processors,
constrained sampling and generation metrics (catalogue section D)."""

from tokenlab.decoding.speculative import SpeculativeOutput, SpeculativeStats, speculative_generate
from tokenlab.decoding.warping import warp_cutoff, warp_logits, warped_probs

__all__ = [
    "SpeculativeOutput",
    "SpeculativeStats",
    "speculative_generate",
    "warp_cutoff",
    "warp_logits",
    "warped_probs",
]
