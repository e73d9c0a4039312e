"""A batch of sequences stepped through a Hugging Face causal LM with a KV cache.

The sampling loops of :mod:`tokenlab.decoding` (constrained generation, branching-factor sampling,
token forcing, token healing) share this: feed the prompt once, then one token per sequence per
step. Left padding is given by ``attention_mask``; position ids are ``cumsum(mask) − 1``. The cache
is a ``DynamicCache`` passed under the model's current keyword (``cache=`` in transformers 5,
``past_key_values=`` before), so no deprecation warning is raised.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel


def check_causal_lm(name: str, model: object) -> PreTrainedModel:
    """Return ``model`` if it is a Hugging Face causal LM (a ``PreTrainedModel`` with an LM head)."""
    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
        raise TypeError(f"`{name}` must be a Hugging Face causal LM (PreTrainedModel with an LM head)")
    return model


def check_input_ids(input_ids: object, attention_mask: object, device: torch.device) -> torch.Tensor:
    """``[B, T]`` int64 token ids on ``device`` with an optional left-padding 0/1 mask of the same
    shape; returns the mask (all ones when none is given)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("`input_ids` must be a [B, T] int64 tensor")
    if input_ids.numel() == 0:
        raise ValueError(f"`input_ids` must be non-empty, got shape {tuple(input_ids.shape)}")
    if input_ids.device != device:
        raise ValueError(f"`input_ids` is on {input_ids.device} but the model is on {device}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"`attention_mask` must be a tensor of shape {tuple(input_ids.shape)}")
    mask = attention_mask.to(device=device, dtype=torch.long)
    if not (
        ((mask == 0) | (mask == 1)).all() and (mask[:, 1:] >= mask[:, :-1]).all() and (mask[:, -1] == 1).all()
    ):
        raise ValueError("`attention_mask` must be 0/1 with left padding (zeros only before the tokens)")
    return mask


class IncrementalDecoder:
    """Next-token logits of a batch of growing sequences, one cached forward per step.

    Args:
        model: a Hugging Face causal LM (full-attention or sliding-window caches).
        input_ids: ``[B, P]`` prompts (left-padded when ``attention_mask`` has zeros).
        attention_mask: ``[B, P]`` 0/1 mask (trusted: checked by the caller).

    :meth:`next_logits` returns ``[B, V]`` logits after the tokens so far (running the model on the
    tokens it has not seen); :meth:`append` adds one token per sequence.
    """

    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model = model
        self.mask = attention_mask
        self._pending = input_ids
        self._cache = DynamicCache(config=model.config)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._logits: torch.Tensor | None = None

    def next_logits(self) -> torch.Tensor:
        """``[B, V]`` next-token logits (float32 or the model's dtype, on the model's device)."""
        if self._logits is None:
            width = self._pending.shape[1]
            positions = (self.mask.cumsum(dim=-1) - 1).clamp(min=0)[:, -width:]
            out = self.model(
                input_ids=self._pending,
                attention_mask=self.mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: self._cache},
            )
            self._logits = out.logits[:, -1]
        return self._logits

    def append(self, tokens: torch.Tensor) -> None:
        """Append ``tokens [B]`` (one per sequence)."""
        self.next_logits()  # the model must have seen every earlier token
        self._pending = tokens.view(-1, 1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self._logits = None
