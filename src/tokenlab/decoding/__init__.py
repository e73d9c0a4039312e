"""Decoding: speculative decoding (chain and batched) with a fused verification kernel, and the logit
warping (temperature, top-k, top-p) every sampling loop shares (its home is
:mod:`tokenlab.kernels.warping`; this package is its public face)."""

from tokenlab.decoding.speculative import SpeculativeOutput, SpeculativeStats, speculative_generate
from tokenlab.kernels.warping import Warping, warp_cutoff, warp_logits, warped_probs

__all__ = [
    "SpeculativeOutput",
    "SpeculativeStats",
    "Warping",
    "speculative_generate",
    "warp_cutoff",
    "warp_logits",
    "warped_probs",
]
