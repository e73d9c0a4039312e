"""Tiny Hugging Face causal-LM pairs for tests and benchmarks of decoding (float64, seconds to run)."""

from __future__ import annotations

import copy

import torch
from transformers import PretrainedConfig, PreTrainedModel


def tiny_causal_lm(
    model_cls: type[PreTrainedModel],
    config_cls: type[PretrainedConfig],
    hidden: int,
    layers: int,
    vocab: int,
    seed: int,
    **config: object,
) -> PreTrainedModel:
    """A random float64 causal LM in eval mode: 2 query heads and 1 key/value head, pad/eos/bos ids
    0/1/2, initializer range 0.1 (peakier attention than the default 0.02, so positions matter);
    ``config`` adds or overrides config fields (e.g. ``attn_implementation="tokenlab"``)."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=2 * hidden,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        initializer_range=0.1,
    )
    return model_cls(config_cls(**{**fields, **config})).double().eval()


def noisy_copy(model: PreTrainedModel, scale: float, seed: int) -> PreTrainedModel:
    """A draft that agrees with ``model`` often but not always: every weight plus Gaussian noise of
    ``scale`` times that weight tensor's standard deviation."""
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * scale * p.std())
    return draft


def left_padded_prompts(batch: int, max_len: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask) [batch, max_len]``: random prompts of mixed lengths (the first one ``max_len``
    long), left-padded with id 0; tokens are ``>= 3`` (clear of pad/eos/bos)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=gen)
    lengths[0] = max_len
    ids = torch.randint(3, vocab, (batch, max_len), generator=gen)
    mask = (torch.arange(max_len) >= (max_len - lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask
