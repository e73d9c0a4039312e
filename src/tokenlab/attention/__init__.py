"""Attention variants: the fused attention kernel and its flags (sinks, softcap, sigmoid/ReLU
scores, ZeroTuning's initial-token scale, segment ids), RoPE/CARoPE, set-based prompting,
TokenFormer, KV-cache eviction policies and attention-sink analysis (catalogue section A)."""

from tokenlab.kernels.attention import flash_attention

__all__ = ["flash_attention"]
