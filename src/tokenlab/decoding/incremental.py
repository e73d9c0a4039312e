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
  generation (a processor object reused across ``generate`` calls resets itself). Every processor
  of the family tracks its position with it (CAD/AdaCAD, refusal tokens, CyclicReflex, constrained
  decoding).
* :func:`decode_loop` — the plain loop (no ``generate``): one stream, a token chooser per step,
  EOS handling and ``generate``-style output (the prompt, then new tokens, padded after EOS); every
  sampling loop of the family runs on it (CAD/AdaCAD, the Gumbel-Max SCM, constrained generation,
  branching factor, token forcing), and :func:`choose_token` is its greedy-or-warped-sample chooser.
* The checks every public entry of the family shares, so a mistake gets the same error everywhere,
  before any forward: :func:`check_causal_lm`, :func:`check_prompts` (token ids in range, a left-padding
  mask — inferred from the pad id as ``generate`` does when none is given), :func:`eos_token_ids`,
  :func:`pad_token_id_for` (generators: :func:`tokenlab._checks.check_generator`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from tokenlab._checks import ArgumentTypeError, check_int
from tokenlab._hf import cache_kwargs
from tokenlab.kernels.warping import Warping


def check_causal_lm(name: str, model: object) -> PreTrainedModel:
    """``model`` if it is a Hugging Face causal LM (a ``PreTrainedModel`` with an LM head)."""
    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
        raise TypeError(f"`{name}` must be a Hugging Face causal LM (PreTrainedModel with an LM head)")
    return model


def model_device(model: PreTrainedModel) -> torch.device:
    """The device of the model's parameters (where prompts must be)."""
    return next(model.parameters()).device


def vocab_size(model: PreTrainedModel) -> int:
    """The number of token ids the model scores (rows of its LM head): the range of EOS and pad ids."""
    return model.get_output_embeddings().weight.shape[0]


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) − 1`` (0 at padding): the positions of a left-padded batch ``[R, L]``, so that a
    padded row computes what it would alone."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def _is_left_padding(mask: torch.Tensor) -> bool:
    return bool(
        ((mask == 0) | (mask == 1)).all() and (mask[:, 1:] >= mask[:, :-1]).all() and (mask[:, -1] == 1).all()
    )


def check_prompts(
    model: PreTrainedModel,
    input_ids: object,
    attention_mask: object = None,
    *,
    name: str = "input_ids",
    mask_name: str = "attention_mask",
    pad_token_id: int | None = None,
    eos: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` int64 prompts of token ids in ``[0, num_embeddings)`` on the model's device, and their
    0/1 left-padding mask ``[B, T]`` (``name``/``mask_name``: the arguments' names in messages).

    Without ``attention_mask`` the mask is decided as ``generate`` decides it, from ``pad_token_id``
    (default: the model's ``generation_config``): a pad id that occurs in the prompts and is no EOS id
    (``eos``, default: the generation config's) cannot be a prompt token, so the mask is
    ``input_ids != pad_token_id`` — which must then be left padding (else ``ValueError``: pass the
    mask). A pad id that is also an EOS id may be a real token: every token is taken as prompt, unless
    the rows start with different numbers of it (that looks like left padding: ``ValueError``).
    Otherwise the mask is all ones.
    """
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.is_floating_point()
        or input_ids.dtype != torch.long
    ):
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ArgumentTypeError(f"`{name}` must be a [B, T] int64 tensor of token ids, got {got}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"`{name}` must be a non-empty [B, T] tensor, got shape {tuple(input_ids.shape)}")
    device = model_device(model)
    if input_ids.device != device:
        raise ValueError(f"`{name}` is on {input_ids.device} but the model is on {device}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`{mask_name}` must be a tensor of the shape of `{name}` {tuple(input_ids.shape)}"
            )
        if attention_mask.device != device:
            raise ValueError(f"`{mask_name}` is on {attention_mask.device} but the model is on {device}")
        mask = attention_mask.long()
        if not _is_left_padding(mask):
            raise ValueError(f"`{mask_name}` must be 0/1 with left padding (zeros only before the tokens)")
    else:
        mask = _generate_mask(model, input_ids, pad_token_id, eos, name, mask_name)
    embedded = model.get_input_embeddings().num_embeddings
    tokens = input_ids[mask.bool()]
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= embedded:
        raise ValueError(
            f"`{name}` must be token ids in [0, {embedded}) (the model's embedded vocabulary), "
            f"got ids {low} to {high}"
        )
    return input_ids, mask


def _generate_mask(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    pad_token_id: int | None,
    eos: Sequence[int] | None,
    name: str,
    mask_name: str,
) -> torch.Tensor:
    """The left-padding mask ``generate`` infers from the pad id (see :func:`check_prompts`)."""
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
    ones = torch.ones_like(input_ids)
    if pad_token_id is None or not bool((input_ids == pad_token_id).any()):
        return ones
    is_pad = input_ids == pad_token_id
    if pad_token_id not in (eos_token_ids(model, None) if eos is None else eos):
        mask = (~is_pad).long()
        if not _is_left_padding(mask):
            raise ValueError(
                f"`{name}` holds pad_token_id {pad_token_id} after a prompt token (or a row of padding "
                f"only), which is not left padding: pass `{mask_name}`"
            )
        return mask
    leading = is_pad.long().cumprod(dim=1).sum(dim=1)
    if bool((leading != leading[0]).any()):
        raise ValueError(
            f"`{name}` rows start with different numbers of pad_token_id {pad_token_id}, which is also an "
            f"EOS id (so it may be a prompt token): pass `{mask_name}`"
        )
    return ones


def eos_token_ids(model: PreTrainedModel, eos_token_id: object) -> list[int]:
    """The EOS ids as a list of ids in ``[0, vocab_size)``: ``None`` takes the model's
    ``generation_config`` (as ``generate``), ``[]`` none (never stop early)."""
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    scalar = isinstance(eos_token_id, int)
    values = [eos_token_id] if scalar else eos_token_id
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ArgumentTypeError(
            f"`eos_token_id` must be None, an int or a list of ints, got {eos_token_id!r}"
        )
    high = vocab_size(model) - 1
    return [
        check_int("eos_token_id" if scalar else f"eos_token_id[{i}]", e, low=0, high=high)
        for i, e in enumerate(values)
    ]


def pad_token_id_for(model: PreTrainedModel, pad_token_id: object, eos: Sequence[int]) -> int:
    """``pad_token_id``, else the model's generation config, else the first EOS id, else 0: an id in
    ``[0, vocab_size)`` (it is fed to the model after a row ends)."""
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return check_int("pad_token_id", pad_token_id, low=0, high=vocab_size(model) - 1)


def choose_token(
    logits: torch.Tensor, warping: Warping, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token of each row from ``logits [R, V]``: ``argmax`` for greedy decoding, else a draw
    from the warped distribution (:class:`~tokenlab.kernels.warping.Warping`) with ``generator``
    (on the logits' device). ``[R]`` int64."""
    if not warping.do_sample:
        return logits.argmax(dim=-1)
    return torch.multinomial(warping.probs(logits), 1, generator=generator).view(-1)


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
        positions = position_ids(self.mask)
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
    choose: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    max_new_tokens: int,
    eos: Sequence[int],
    pad_token_id: int,
    progress: bool = False,
    desc: str = "decoding",
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens per row of ``stream`` (its prompt as it stands).

    ``choose(step, logits [R, V], done [R]) -> tokens [R]`` picks the token of position ``step``
    (0-based) from the stream's next-token logits; ``done`` marks the rows that have ended (their
    token is replaced by ``pad_token_id``). A row ends after emitting an EOS id (kept), or when
    ``choose`` sets it in ``done`` (in place: the row keeps the token chosen at this step — e.g. a text
    that is complete — or gets ``pad_token_id`` if ``choose`` returns that, e.g. at a dead end). The
    loop stops when every row has ended; it advances the stream once per step except the last.

    Returns ``sequences [R, P + N]``: the prompt as given, then the new tokens (``N ≤ max_new_tokens``).
    """
    prompt = stream.ids
    eos_ids = torch.tensor(list(eos), dtype=torch.long, device=prompt.device)
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    new: list[torch.Tensor] = []
    logits = stream.prefill()
    for step in tqdm(range(max_new_tokens), desc=desc, disable=not progress):
        ended = done.clone()
        tokens = torch.where(ended, pad_token_id, choose(step, logits, done))
        new.append(tokens)
        done |= torch.isin(tokens, eos_ids)
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        logits = stream.advance(tokens)
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1)
