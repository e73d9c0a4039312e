"""Incremental decoding of a left-padded batch: the mechanism the decoding processors and loops share.

* :class:`CachedStream` — a batch of token sequences fed to a causal LM one token per step through
  its own ``DynamicCache``: the prompt once (:meth:`~CachedStream.prefill`), then each new token
  (:meth:`~CachedStream.advance`), never re-encoding the prefix. Layout invariant: ``ids``/``mask``
  ``[R, L]`` are left-padded, the cache covers all ``L`` columns, and the model sees
  ``position_ids = cumsum(mask) − 1`` — so a padded row computes what it would alone.
  Rows can be re-selected (:meth:`~CachedStream.select`: beam reordering, repeats) and the stream
  rolled back (:meth:`~CachedStream.crop`: rejected candidates of assisted generation).
* :class:`GenerationProgress` — where a ``LogitsProcessor`` stands inside one ``generate`` call:
  the prompt width and the response position of each call, and whether a call starts a new
  generation (a processor object reused across ``generate`` calls resets itself).
  The sampling loops (constrained generation, branching factor, token forcing, token healing) step
  it the same way.
* :func:`decode_loop` — the plain loop (no ``generate``): one stream, a token chooser per step,
  EOS handling and ``generate``-style output (the prompt, then new tokens, padded after EOS).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from tokenlab._hf import cache_kwargs


def check_causal_lm(name: str, model: object) -> PreTrainedModel:
    """``model`` if it is a Hugging Face causal LM (a ``PreTrainedModel`` with an LM head)."""
    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
        raise TypeError(f"`{name}` must be a Hugging Face causal LM (PreTrainedModel with an LM head)")
    return model


def check_prompts(
    name: str, input_ids: object, attention_mask: object, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` int64 prompts on ``device`` and their 0/1 left-padding mask (all ones when ``None``)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"`{name}` must be a [B, T] int64 tensor")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"`{name}` must be non-empty, got shape {tuple(input_ids.shape)}")
    if input_ids.device != device:
        raise ValueError(f"`{name}` is on {input_ids.device} but the model is on {device}")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    mask_name = f"{name}'s attention_mask"
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"`{mask_name}` must be a tensor of shape {tuple(input_ids.shape)}")
    if attention_mask.device != device:
        raise ValueError(f"`{mask_name}` is on {attention_mask.device} but the model is on {device}")
    mask = attention_mask.long()
    if not (
        ((mask == 0) | (mask == 1)).all() and (mask[:, 1:] >= mask[:, :-1]).all() and (mask[:, -1] == 1).all()
    ):
        raise ValueError(f"`{mask_name}` must be 0/1 with left padding (zeros only before the tokens)")
    return input_ids, mask


def eos_token_ids(model: PreTrainedModel, eos_token_id: int | Sequence[int] | None) -> list[int]:
    """The EOS ids as a list: ``None`` takes the model's ``generation_config`` (as ``generate``)."""
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
        raise ValueError(f"`eos_token_id` must be None, an int or a list of ints, got {eos_token_id!r}")
    return eos


def pad_token_id_for(model: PreTrainedModel, pad_token_id: int | None, eos: list[int]) -> int:
    """``pad_token_id``, else the model's generation config, else the first EOS id, else 0."""
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return pad_token_id


class CachedStream:
    """A left-padded batch fed to ``model`` token by token through its own ``DynamicCache``.

    Shapes: ``ids``/``mask`` ``[R, L]`` (int64, left padding), the cache covering all ``L``
    columns once :meth:`prefill` has run. Every call returns the next-token logits ``[R, V]`` of
    the last column, in float32 (float64 for a float64 model).
    """

    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model = model
        self.ids = input_ids
        self.mask = attention_mask.long()
        self.cache = DynamicCache(config=model.config)

    def _forward(self, start: int) -> torch.Tensor:
        positions = (self.mask.cumsum(dim=-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=self.ids[:, start:],
            attention_mask=self.mask,
            position_ids=positions[:, start:],
            use_cache=True,
            **cache_kwargs(self.model, self.cache),
            logits_to_keep=1,
        ).logits[:, -1]
        return logits if logits.dtype == torch.float64 else logits.float()

    def prefill(self) -> torch.Tensor:
        """Encode the whole prompt; logits ``[R, V]`` of the next token."""
        return self._forward(0)

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` — ``[R]`` (one per row) or ``[R, n]`` — and feed only them; logits
        ``[R, V]`` of the token after the last one."""
        tokens = tokens.view(tokens.shape[0], -1)
        start = self.ids.shape[1]
        self.ids = torch.cat([self.ids, tokens], dim=1)
        self.mask = torch.nn.functional.pad(self.mask, (0, tokens.shape[1]), value=1)
        return self._forward(start)

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows [R']`` (any order, repeats allowed): ids, mask and every cache layer."""
        self.ids, self.mask = self.ids[rows], self.mask[rows]
        self.cache.reorder_cache(rows)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` columns (ids, mask and cache): a rollback (full-attention caches
        only: a sliding window has already dropped the columns it would need)."""
        if not all(type(layer) is DynamicLayer for layer in self.cache.layers):
            raise ValueError(
                f"{type(self.model).__name__} uses sliding-window or other non-full cache layers, which "
                "cannot be rolled back (assisted generation needs full attention caches)"
            )
        if length < self.ids.shape[1]:
            self.cache.crop(length - self.ids.shape[1])  # a negative count: columns to remove
            self.ids, self.mask = self.ids[:, :length], self.mask[:, :length]


class GenerationProgress:
    """Where a ``LogitsProcessor`` stands inside ``generate``, from the ``input_ids [R, T]`` it is given.

    ``generate`` calls a processor once per position with the sequences so far, prompt columns
    first (assisted generation calls it for each candidate position, then rolls back). A call
    continues the current generation when it has the same rows, is longer than the prompt, and has
    the same prompt columns (beam search reorders rows only within a prompt's beams, whose prompt
    columns are equal); the response position is then ``T − prompt length``. Any other call — the
    first, a different prompt, or the same prompt again — starts a new generation, so one processor
    object can serve successive ``generate`` calls; :meth:`reset` forces a new start (needed only
    when a new prompt begins with the whole previous prompt).
    """

    def __init__(self) -> None:
        self.prompt: torch.Tensor | None = None

    @property
    def prompt_length(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[1]

    def reset(self) -> None:
        """Forget the current generation: the next call starts a new one."""
        self.prompt = None

    def update(self, input_ids: torch.Tensor) -> int:
        """Register a call; returns the response position (``0``: a new generation starts)."""
        prompt = self.prompt
        continues = (
            prompt is not None
            and input_ids.shape[0] == prompt.shape[0]
            and input_ids.shape[1] > prompt.shape[1]
            and torch.equal(input_ids[:, : prompt.shape[1]], prompt)
        )
        if not continues:
            self.prompt = input_ids.clone()
        return input_ids.shape[1] - self.prompt.shape[1]


def decode_loop(
    stream: CachedStream,
    choose: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    max_new_tokens: int,
    eos: Sequence[int],
    pad_token_id: int,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens per row of ``stream`` (its prompt as it stands).

    ``choose(step, logits [R, V]) -> tokens [R]`` picks the token of position ``step`` (0-based)
    from the stream's next-token logits. A row that emits an EOS id keeps it and is padded with
    ``pad_token_id`` afterwards; the loop stops when every row has ended.

    Returns ``sequences [R, P + N]``: the prompt as given, then the new tokens (``N ≤ max_new_tokens``).
    """
    prompt = stream.ids
    eos_ids = torch.tensor(list(eos), dtype=torch.long, device=prompt.device)
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    new: list[torch.Tensor] = []
    logits = stream.prefill()
    for step in range(max_new_tokens):
        tokens = torch.where(done, pad_token_id, choose(step, logits))
        new.append(tokens)
        done |= torch.isin(tokens, eos_ids)
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        logits = stream.advance(tokens)
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1)
