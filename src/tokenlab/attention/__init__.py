"""Attention variants: the fused attention kernel and its flags (sinks, softcap, sigmoid/ReLU
scores, ZeroTuning's initial-token scale, segment ids), RoPE/CARoPE, set-based prompting,
TokenFormer, KV-cache eviction policies and attention-sink analysis (catalogue section A)."""

from tokenlab.attention.flash import flash_attention
from tokenlab.attention.hf import register_attention
from tokenlab.attention.kv_cache import HeavyHitterCache, SinkCache
from tokenlab.attention.rope import (
    ContextAwareRotaryEmbedding,
    RotaryEmbedding,
    apply_rope,
    carope_cos_sin,
    carope_frequencies,
    carope_phases,
    rope_cos_sin,
    rotary_frequencies,
    rotate_half,
)
from tokenlab.attention.set_based_prompting import (
    SetBasedInputs,
    segment_attention_mask,
    set_based_generate,
    set_based_inputs,
)
from tokenlab.attention.sink_analysis import (
    SinkAnalysis,
    analyze_sinks,
    attention_map,
    bos_decorrelation_loss,
)
from tokenlab.attention.tokenformer import Pattention, TokenFormerBlock, TokenFormerLM, pattention_scores
from tokenlab.attention.zerotuning import (
    ZeroTuningCalibration,
    initial_token_scaling,
    zerotuning_calibrate,
    zerotuning_objective,
)
from tokenlab.kernels.attention import AttentionVariant

__all__ = [
    "AttentionVariant",
    "ContextAwareRotaryEmbedding",
    "HeavyHitterCache",
    "Pattention",
    "RotaryEmbedding",
    "SetBasedInputs",
    "SinkAnalysis",
    "SinkCache",
    "TokenFormerBlock",
    "TokenFormerLM",
    "ZeroTuningCalibration",
    "analyze_sinks",
    "apply_rope",
    "attention_map",
    "bos_decorrelation_loss",
    "carope_cos_sin",
    "carope_frequencies",
    "carope_phases",
    "flash_attention",
    "initial_token_scaling",
    "pattention_scores",
    "register_attention",
    "rope_cos_sin",
    "rotary_frequencies",
    "rotate_half",
    "segment_attention_mask",
    "set_based_generate",
    "set_based_inputs",
    "zerotuning_calibrate",
    "zerotuning_objective",
]
