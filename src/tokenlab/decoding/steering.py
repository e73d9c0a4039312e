"""Steering processors: refusal tokens and CyclicReflex, as Hugging Face ``LogitsProcessor``s.

* *Refusal Tokens: A Simple Way to Calibrate Refusals in Large Language Models* (Jain et al., 2025):
  a model fine-tuned to begin each response with a refusal token (one per refusal category, or a
  single ``[refuse]``) or a ``[respond]`` token exposes its refusal decision as the first response
  token, which can be steered at inference without retraining: add a per-category **logit bias**
  to the refusal tokens, or **threshold** their probability — refuse with category ``c`` when
  ``p(c) ≥ τ_c``, otherwise respond. :func:`add_refusal_tokens` adds the tokens to a tokenizer and
  model; :class:`RefusalTokenLogitsProcessor` steers the first response token.
* *CyclicReflex: Improving Reasoning Models via Cyclical Reflection Token Scheduling* (Fan et al.,
  2026): the logits of reflection tokens ("wait", "but", "alternatively") get a bias that follows a
  position-dependent triangular wave of amplitude ``A`` and period ``T`` —
  :class:`CyclicReflexLogitsProcessor`, with the wave itself in :func:`triangular_wave`.

Both processors depend only on the response position and the row's own tokens, so they support
every ``generate`` mode: greedy, sampling (applied before temperature/top-k/top-p), beam search and
assisted generation (whose candidate positions each get their own position's bias).
The response position is the number of tokens generated before the current step (``0`` for the
first response token), tracked per ``generate`` call
(:class:`tokenlab.decoding.incremental.GenerationProgress`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from tokenlab._checks import check_int, check_number, check_positive
from tokenlab.decoding.incremental import GenerationProgress, check_causal_lm


def _token_ids(name: str, ids: object) -> list[int]:
    """A non-empty list of distinct token ids ``≥ 0``."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids:
        raise ValueError(f"`{name}` must be a non-empty sequence of token ids, got {ids!r}")
    values = [check_int(f"{name}[{i}]", v, low=0) for i, v in enumerate(ids)]
    if len(set(values)) != len(values):
        raise ValueError(f"`{name}` must not repeat a token id, got {values}")
    return values


def _check_in_vocabulary(vocab: int, **ids: Sequence[int] | int | None) -> None:
    """Each named id (or list of ids) in ``[0, vocab)``: checked at the first call of a generation, when
    the scores' vocabulary size is known."""
    for name, values in ids.items():
        values = [] if values is None else [values] if isinstance(values, int) else values
        if any(v >= vocab for v in values):
            raise ValueError(
                f"`{name}` must be token ids in [0, {vocab}) (the scores' vocabulary), got {values}"
            )


def _per_token(name: str, value: object, count: int, check: Callable[[str, object], float]) -> list[float]:
    """One number per token: a scalar is broadcast, a sequence must have ``count`` entries."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != count:
            raise ValueError(
                f"`{name}` must be a number or hold {count} numbers (one per token), got {len(value)}"
            )
        return [check(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [check(name, value)] * count


# ------------------------------------------------------------------------------ refusal tokens
@dataclass(frozen=True)
class RefusalTokens:
    """Ids of the tokens :func:`add_refusal_tokens` added: ``refusal`` maps each category's token
    string to its id (in the order given); ``respond`` is the ``[respond]`` id or ``None``."""

    refusal: dict[str, int]
    respond: int | None

    @property
    def refusal_ids(self) -> list[int]:
        return list(self.refusal.values())


def add_refusal_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    refusal_tokens: Sequence[str] = ("[refuse]",),
    *,
    respond_token: str | None = "[respond]",
) -> RefusalTokens:
    """Add refusal tokens (one per category) and a respond token to ``tokenizer`` and ``model``, in place.

    The tokens are added as special tokens (never split). The embedding matrix grows with
    ``resize_token_embeddings`` when the new ids do not fit (a model whose matrix is padded beyond
    the tokenizer may already have the rows), and the row of each newly added token is the mean of
    the rows of the tokens the tokenizer had before (a neutral start for fine-tuning, as the paper's
    models are then trained to emit them). A tied head stays tied (same tensor); an untied head's
    new rows (and bias entries) are likewise the mean of its rows for the old tokens. Tokens
    already in the vocabulary keep their rows.

    Returns:
        :class:`RefusalTokens` with the ids.
    """
    model = check_causal_lm("model", model)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"`tokenizer` must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    if isinstance(refusal_tokens, str) or not refusal_tokens:
        raise ValueError("`refusal_tokens` must be a non-empty sequence of token strings")
    strings = list(refusal_tokens) + ([respond_token] if respond_token is not None else [])
    if not all(isinstance(s, str) and s for s in strings) or len(set(strings)) != len(strings):
        raise ValueError(f"refusal and respond tokens must be distinct non-empty strings, got {strings}")
    known = len(tokenizer)
    tokenizer.add_tokens(strings, special_tokens=True)
    ids = dict(zip(strings, tokenizer.convert_tokens_to_ids(strings)))
    _init_new_rows(model, known, [i for i in ids.values() if i >= known], len(tokenizer))
    return RefusalTokens({s: ids[s] for s in refusal_tokens}, ids[respond_token] if respond_token else None)


@torch.no_grad()
def _init_new_rows(model: PreTrainedModel, known: int, new_ids: list[int], vocab: int) -> None:
    """Grow the embeddings to ``vocab`` rows if needed (ties kept) and set the rows ``new_ids`` to the
    mean of the rows ``[0, known)`` (input embeddings; an untied head and its bias too)."""
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if vocab > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab, mean_resizing=False)
        if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            model.tie_weights()
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    rows = torch.tensor(new_ids, dtype=torch.long, device=inputs.weight.device)
    inputs.weight[rows] = inputs.weight[:known].mean(dim=0)
    if outputs.weight is not inputs.weight:
        outputs.weight[rows] = outputs.weight[:known].mean(dim=0)
    if getattr(outputs, "bias", None) is not None:
        outputs.bias[rows] = outputs.bias[:known].mean()


class RefusalTokenLogitsProcessor(LogitsProcessor):
    """Steer the refusal decision at the first response token (*Refusal Tokens*).

    At response position 0 only (later positions pass through unchanged), with ``R`` the refusal
    token ids (one per category):

    1. **logit bias**: ``scores[:, R_c] += bias_c``;
    2. **threshold** (when ``threshold`` is given): with ``p = softmax(scores / softmax_temperature)``
       (after the bias), a row *refuses* when some category has ``p(R_c) ≥ τ_c``; it then emits the
       most probable such token. Any other row emits ``respond_token_id`` when given, otherwise it
       continues with the refusal tokens removed (``−∞``). Emitting a token sets every other score
       of the row to ``−∞`` (and the token's to 0).

    Raising a category's bias, or lowering its threshold, can only raise its refusal rate.

    The rule is the paper's code's: one refusal token refuses when ``p([refuse]) ≥ τ`` and otherwise
    emits ``[respond]``; with categories the code compares the most probable category's probability
    with ``τ`` — what this rule does when every category has the same ``τ`` (per-category ``τ_c`` is
    the generalisation: among the categories at or above their threshold the most probable wins).

    Args:
        refusal_token_ids: the refusal tokens, one per category (e.g. ``RefusalTokens.refusal_ids``).
        respond_token_id: the ``[respond]`` token, emitted below threshold (optional).
        bias: a logit bias, one for all or one per refusal token.
        threshold: ``τ``, one for all or one per refusal token, each in ``[0, 1]`` (``None``: bias only).
        softmax_temperature: the temperature of the probability that is thresholded (the paper's
            code uses 1).

    Modes: greedy, sampling, beam search and assisted generation (``scores`` may be logits or
    log-probabilities).
    """

    def __init__(
        self,
        refusal_token_ids: Sequence[int],
        *,
        respond_token_id: int | None = None,
        bias: float | Sequence[float] = 0.0,
        threshold: float | Sequence[float] | None = None,
        softmax_temperature: float = 1.0,
    ) -> None:
        self.refusal_token_ids = _token_ids("refusal_token_ids", refusal_token_ids)
        count = len(self.refusal_token_ids)
        self.respond_token_id = (
            None if respond_token_id is None else check_int("respond_token_id", respond_token_id, low=0)
        )
        if self.respond_token_id in self.refusal_token_ids:
            raise ValueError("`respond_token_id` must not be one of the refusal tokens")
        self.bias = _per_token("bias", bias, count, check_number)
        self.threshold = (
            None
            if threshold is None
            else _per_token("threshold", threshold, count, lambda n, v: check_number(n, v, low=0.0, high=1.0))
        )
        self.softmax_temperature = check_positive("softmax_temperature", softmax_temperature)
        self.progress = GenerationProgress()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids [R, T]``, ``scores [R, V]`` → steered scores ``[R, V]`` (a new tensor)."""
        if self.progress.update(input_ids) != 0:
            return scores
        _check_in_vocabulary(
            scores.shape[-1], refusal_token_ids=self.refusal_token_ids, respond_token_id=self.respond_token_id
        )
        ids = torch.tensor(self.refusal_token_ids, device=scores.device)
        scores = scores.clone()
        scores[:, ids] += torch.tensor(self.bias, dtype=scores.dtype, device=scores.device)
        if self.threshold is None:
            return scores
        p = (scores / self.softmax_temperature).softmax(dim=-1)[:, ids]
        hits = p >= torch.tensor(self.threshold, dtype=p.dtype, device=p.device)
        refuse = hits.any(dim=-1)
        chosen = ids[torch.where(hits, p, -1.0).argmax(dim=-1)]
        if self.respond_token_id is not None:
            below = torch.full_like(scores, float("-inf"))
            below[:, self.respond_token_id] = 0.0
        else:
            below = scores.index_fill(-1, ids, float("-inf"))
        out = torch.where(refuse.unsqueeze(-1), float("-inf"), below)
        out[refuse, chosen[refuse]] = 0.0
        return out


# ----------------------------------------------------------------------------------- CyclicReflex
def _wave(position: torch.Tensor | int, amplitude: float, period: float, shift: float) -> torch.Tensor:
    n = torch.as_tensor(position, dtype=torch.float64)
    u = torch.remainder(n + shift * period, period) / period
    return amplitude * torch.where(u <= 0.25, 4 * u, torch.where(u <= 0.75, 2 - 4 * u, 4 * u - 4))


def triangular_wave(
    position: torch.Tensor | int, amplitude: float, period: float, shift: float = 0.0
) -> torch.Tensor:
    """CyclicReflex's bias at response position ``n``: ``A · w(u)``, ``u = ((n + shift·T) mod T) / T``,

        w(u) = 4u          for u ≤ ¼      (0 → +1)
               2 − 4u      for ¼ < u ≤ ¾  (+1 → −1)
               4u − 4      for u > ¾      (−1 → 0)

    a zero-mean triangular wave of period ``T`` that starts at 0 rising (``shift`` is a fraction of the
    period). ``position``: an int or a tensor of positions; the result is float64 of its shape.
    """
    return _wave(
        position,
        check_number("amplitude", amplitude),
        check_positive("period", period),
        check_number("shift", shift),
    )


class CyclicReflexLogitsProcessor(LogitsProcessor):
    """CyclicReflex (*CyclicReflex: Improving Reasoning Models via Cyclical Reflection Token Scheduling*).

    At response position ``n`` (tokens generated so far) adds :func:`triangular_wave` ``(n, A, T, shift)``
    to the logits of the reflection tokens, for every row that has not yet emitted one of
    ``end_token_ids`` (e.g. ``</think>``: the schedule covers the reasoning only). Other tokens are
    untouched. Positive phases encourage reflection, negative phases discourage it.

    Args:
        reflection_token_ids: the reflection tokens (e.g. the ids of "wait", "Wait", "but", "But",
            "Alternatively").
        amplitude: ``A ≥ 0`` (the paper's runs use 1–5).
        period: ``T > 0`` in tokens (the paper's runs use 600–1200 for reasoning of several thousand tokens).
        shift: phase offset as a fraction of the period (default 0: start at 0, rising).
        end_token_ids: tokens after which a row gets no more bias (default: none).

    Modes: greedy, sampling, beam search and assisted generation.
    """

    def __init__(
        self,
        reflection_token_ids: Sequence[int],
        *,
        amplitude: float,
        period: float,
        shift: float = 0.0,
        end_token_ids: Sequence[int] = (),
    ) -> None:
        self.reflection_token_ids = _token_ids("reflection_token_ids", reflection_token_ids)
        self.amplitude = check_number("amplitude", amplitude, low=0.0)
        self.period = check_positive("period", period)
        self.shift = check_number("shift", shift)
        self.end_token_ids = _token_ids("end_token_ids", end_token_ids) if len(end_token_ids) else []
        self.progress = GenerationProgress()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids [R, T]``, ``scores [R, V]`` → biased scores ``[R, V]`` (a new tensor)."""
        position = self.progress.update(input_ids)
        if position == 0:
            _check_in_vocabulary(
                scores.shape[-1],
                reflection_token_ids=self.reflection_token_ids,
                end_token_ids=self.end_token_ids,
            )
        bias = float(_wave(position, self.amplitude, self.period, self.shift))
        ids = torch.tensor(self.reflection_token_ids, device=scores.device)
        scores = scores.clone()
        if self.end_token_ids:
            generated = input_ids[:, self.progress.prompt_length :]
            ended = torch.isin(generated, torch.tensor(self.end_token_ids, device=scores.device)).any(dim=-1)
            scores[:, ids] += torch.where(ended, 0.0, bias).to(scores.dtype).unsqueeze(-1)
        else:
            scores[:, ids] += bias
        return scores
