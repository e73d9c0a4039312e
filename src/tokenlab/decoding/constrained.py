"""Constrained generation: a batched sampling loop and a ``generate``-compatible logits processor.

Both draw each token with :mod:`tokenlab.decoding.awrs` (adaptive weighted rejection sampling, or
the token-masking baseline) from the warped next-token distribution restricted to the tokens the
:class:`~tokenlab.decoding.constraints.Constraint` allows after the text generated so far, and
accumulate per sequence the log-weight ``Σ_t log Ẑ_t`` (``Ẑ_t`` the allowed mass at step ``t``,
exact for masking, an unbiased estimate for AWRS). That weight is the importance weight from the
locally constrained proposal to the model conditioned on the constraint, ``p(y) 1[y ∈ L] / q(y)``
(*Fast Controlled Generation from Language Models with Adaptive Weighted Rejection Sampling*):
resampling sequences in proportion to ``exp(log_weights)`` (importance resampling, or sequential
Monte Carlo when done every step) corrects the myopia of local constraint enforcement.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from tokenlab._checks import check_bool, check_int
from tokenlab.decoding.awrs import Estimator, Method, TokenJudge, allowed_tokens, check_sampling, sample_step
from tokenlab.decoding.constraints import Constraint, TokenVocabulary, decode_text
from tokenlab.decoding.incremental import (
    CachedStream,
    GenerationProgress,
    check_causal_lm,
    check_prompts,
    decode_loop,
    pad_token_id_for,
    vocab_size,
)
from tokenlab.kernels.warping import Warping


@dataclass
class ConstrainedOutput:
    """Result of :func:`constrained_generate` for ``B`` sequences and ``N`` steps.

    Attributes:
        sequences: ``[B, P + N]`` the prompts as given, then the new tokens (EOS kept), ``pad``
            after a sequence ends.
        texts: the generated text of each sequence (:func:`~tokenlab.decoding.constraints.decode_text`).
        log_weights: ``[B]`` float64 ``Σ_t log Ẑ_t`` (``-inf``: the sequence reached a prefix with
            no allowed continuation; ``nan`` for greedy AWRS, which estimates nothing).
        step_log_weights: ``[B, N]`` the per-step terms (0 after a sequence ends).
        complete: ``[B]`` whether the generated text is a member of the constraint's set.
        num_new_tokens: ``[B]`` tokens generated per sequence (EOS included).
        constraint_calls: ``[B]`` constraint evaluations per sequence.
        seconds: wall time of the call.
        sampling_seconds: the part of it spent drawing tokens (constraint checks, races, masks),
            i.e. without the model's forwards and the warping.
    """

    sequences: torch.Tensor
    texts: list[str]
    log_weights: torch.Tensor
    step_log_weights: torch.Tensor
    complete: torch.Tensor
    num_new_tokens: torch.Tensor
    constraint_calls: torch.Tensor
    seconds: float
    sampling_seconds: float

    @property
    def calls_per_token(self) -> float:
        """Constraint evaluations per generated token, over the batch."""
        return float(self.constraint_calls.sum()) / max(int(self.num_new_tokens.sum()), 1)

    @property
    def tokens_per_second(self) -> float:
        return int(self.num_new_tokens.sum()) / self.seconds if self.seconds else 0.0


def _vocabulary(vocabulary: object) -> TokenVocabulary:
    if isinstance(vocabulary, PreTrainedTokenizerBase):
        return TokenVocabulary.from_tokenizer(vocabulary)
    if not isinstance(vocabulary, TokenVocabulary):
        raise TypeError(
            f"`vocabulary` must be a TokenVocabulary or a tokenizer, got {type(vocabulary).__name__}"
        )
    return vocabulary


def _padded(vocabulary: TokenVocabulary, size: int) -> TokenVocabulary:
    """The vocabulary extended with text-less tokens up to the model's ``size`` scores (padding rows
    of an embedding matrix are never allowed)."""
    if len(vocabulary) > size:
        raise ValueError(f"`vocabulary` has {len(vocabulary)} tokens but the model scores only {size}")
    if len(vocabulary) == size:
        return vocabulary
    return TokenVocabulary(
        vocabulary.token_bytes + [None] * (size - len(vocabulary)), vocabulary.eos_token_ids
    )


def _probabilities(logits: torch.Tensor, warping: Warping) -> np.ndarray:
    """``[B, V]`` float64 numpy: the warped distribution, or the plain softmax for greedy decoding."""
    logits = logits.double()
    probs = warping.probs(logits, backend="reference") if warping.do_sample else logits.softmax(dim=-1)
    return probs.cpu().numpy()


@torch.no_grad()
def constrained_generate(
    model: PreTrainedModel,
    vocabulary: TokenVocabulary | PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    constraint: Constraint,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    method: Method = "awrs",
    estimator: Estimator = "two_loop",
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    pad_token_id: int | None = None,
    stop_when_complete: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> ConstrainedOutput:
    """Generate text in the set of ``constraint`` (AWRS or token masking), with importance weights.

    Each step runs the model once on the batch (KV cache), warps the logits (temperature, top-k,
    top-p), and for every unfinished sequence draws a token from the warped distribution restricted
    to the allowed tokens (:func:`tokenlab.decoding.awrs.constrained_sample`), adding ``log Ẑ`` to its
    log-weight. A sequence ends at an EOS token (allowed only where the constraint ``allows_end``),
    when no token is allowed (log-weight ``-inf``), after ``max_new_tokens``, or — with
    ``stop_when_complete`` — as soon as its text is a member of the set.

    Args:
        model: a Hugging Face causal LM.
        vocabulary: the token bytes and EOS ids (:class:`TokenVocabulary`) or a tokenizer to build
            them from (EOS: the tokenizer's).
        input_ids: ``[B, P]`` prompts, left-padded when ``attention_mask`` ``[B, P]`` is given. The
            constraint applies to the generated text only.
        constraint: the set of allowed texts.
        max_new_tokens: most tokens per sequence.
        method: ``"awrs"`` or ``"mask"``; ``estimator``: AWRS weight estimator (``"two_loop"``,
            ``"recursive"`` or ``None``).
        do_sample, temperature, top_k, top_p: the warping of :class:`tokenlab.kernels.warping.Warping`.
        pad_token_id: fills sequences after they end (default: the model's generation config, then
            the first EOS id, then 0).
        stop_when_complete: end a sequence once its text is a member of the set.
        generator: random source of the draws (CPU ``torch.Generator``).
        progress: show a progress bar over steps.

    Returns:
        :class:`ConstrainedOutput`.
    """
    check_causal_lm("model", model)
    input_ids, mask = check_prompts(model, input_ids, attention_mask)
    if not isinstance(constraint, Constraint):
        raise TypeError(f"`constraint` must be a Constraint, got {type(constraint).__name__}")
    vocab = _padded(_vocabulary(vocabulary), vocab_size(model))
    check_int("max_new_tokens", max_new_tokens, low=1)
    check_sampling(method, estimator, do_sample, generator)
    warping = Warping(do_sample, temperature, top_k, top_p)
    check_bool("stop_when_complete", stop_when_complete)
    check_bool("progress", progress)
    pad_token_id = pad_token_id_for(model, pad_token_id, vocab.eos_token_ids)

    start = time.perf_counter()
    B, P = input_ids.shape
    generated = [b""] * B
    step_log_weights = torch.zeros(B, max_new_tokens, dtype=torch.float64)
    calls = torch.zeros(B, dtype=torch.long)
    lengths = torch.zeros(B, dtype=torch.long)
    sampling_seconds = 0.0

    def choose(step: int, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        nonlocal sampling_seconds
        active = torch.nonzero(~done.cpu()).flatten().tolist()
        probs = _probabilities(logits[active], warping)
        sampling_start = time.perf_counter()
        tokens = torch.full((B,), pad_token_id, dtype=torch.long)
        for row, p in zip(active, probs):
            judge = TokenJudge(constraint, vocab, generated[row])
            drawn = sample_step(p, judge, method, estimator, do_sample, generator)
            calls[row] += drawn.calls
            step_log_weights[row, step] = drawn.log_weight
            if drawn.token < 0:  # a dead end: no allowed continuation; the row ends without a token
                done[row] = True
                continue
            tokens[row] = drawn.token
            lengths[row] += 1
            generated[row] += vocab.token_bytes[drawn.token] or b""
            if (
                stop_when_complete
                and not vocab.is_eos(drawn.token)
                and constraint.allows_end(decode_text(generated[row]))
            ):
                done[row] = True  # the row keeps this token and ends
        sampling_seconds += time.perf_counter() - sampling_start
        return tokens.to(logits.device)

    stream = CachedStream(model, input_ids, mask)
    sequences = decode_loop(
        stream, choose, max_new_tokens=max_new_tokens, eos=vocab.eos_token_ids, pad_token_id=pad_token_id,
        progress=progress, desc="constrained generation",
    )  # fmt: skip
    width = int(lengths.max())
    texts = [decode_text(g) for g in generated]
    return ConstrainedOutput(
        sequences=sequences[:, : P + width],
        texts=texts,
        log_weights=step_log_weights.sum(dim=1),
        step_log_weights=step_log_weights[:, :width],
        complete=torch.tensor([constraint.allows_end(t) for t in texts]),
        num_new_tokens=lengths,
        constraint_calls=calls,
        seconds=time.perf_counter() - start,
        sampling_seconds=sampling_seconds,
    )


class ConstrainedLogitsProcessor(LogitsProcessor):
    """Constrained decoding inside ``model.generate`` (a ``LogitsProcessor``).

    Each call reads the text each row has generated since the prompt from ``input_ids`` (the prompt
    width is tracked by :class:`~tokenlab.decoding.incremental.GenerationProgress`, so one object
    serves successive ``generate`` calls). Per row it draws a token with AWRS (``method="awrs"``) and
    returns scores that are ``-inf`` except at that token, so ``generate`` (greedy or sampling) emits
    it; with ``method="mask"`` it returns the warped log-probabilities with the disallowed tokens at
    ``-inf``, and ``generate`` samples among them. ``generate`` applies its own warpers *after* the
    user's processors, so put temperature/top-k/top-p here and leave ``generate``'s at their neutral
    values (``temperature=1.0, top_k=0, top_p=1.0``). A row with no allowed token is forced to EOS
    (weight ``-inf``). Rows that emitted EOS are left alone (``generate`` pads them).

    Modes: greedy and sampling (``num_return_sequences`` included). Under beam search or assisted
    generation the generated texts stay constrained, but ``log_weights`` (accumulated per row and per
    call) mean nothing: rows are reordered, candidates scored and dropped.

    Attributes:
        log_weights: ``[B]`` float64 accumulated ``log Ẑ`` per row (what :func:`constrained_generate`
            returns as ``log_weights``), for the current ``generate`` call.
        constraint_calls: ``[B]`` constraint evaluations per row.
    """

    def __init__(
        self,
        constraint: Constraint,
        vocabulary: TokenVocabulary | PreTrainedTokenizerBase,
        *,
        method: Method = "awrs",
        estimator: Estimator = "two_loop",
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ):
        if not isinstance(constraint, Constraint):
            raise TypeError(f"`constraint` must be a Constraint, got {type(constraint).__name__}")
        self.constraint = constraint
        self.vocabulary = _vocabulary(vocabulary)
        check_sampling(method, estimator, do_sample, generator)
        self.method, self.estimator, self.do_sample, self.generator = method, estimator, do_sample, generator
        self.warping = Warping(do_sample, temperature, top_k, top_p)
        self.progress = GenerationProgress()
        self.reset()

    def reset(self) -> None:
        """Start afresh at the next call (only needed when a new prompt begins with the previous one)."""
        self.progress.reset()
        self._vocab: TokenVocabulary | None = None
        self.log_weights = torch.zeros(0, dtype=torch.float64)
        self.constraint_calls = torch.zeros(0, dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids [B, T]``, ``scores [B, V]`` → constrained scores ``[B, V]`` (a new tensor)."""
        B, V = scores.shape
        if self.progress.update(input_ids) == 0:
            self._vocab = _padded(self.vocabulary, V)
            self.log_weights = torch.zeros(B, dtype=torch.float64)
            self.constraint_calls = torch.zeros(B, dtype=torch.long)
        vocab = self._vocab
        generated = input_ids[:, self.progress.prompt_length :].tolist()
        probs = _probabilities(scores, self.warping)
        out = torch.full_like(scores, float("-inf"))
        for row in range(B):
            if any(vocab.is_eos(t) for t in generated[row]):
                out[row] = scores[row]
                continue
            judge = TokenJudge(self.constraint, vocab, vocab.decode(generated[row]))
            if self.method == "mask":  # generate samples among the allowed tokens
                allowed = allowed_tokens(probs[row], judge)
                dead = allowed.size == 0
                log_weight = float("-inf") if dead else math.log(probs[row][allowed].sum())
                out[row, allowed] = torch.from_numpy(np.log(probs[row][allowed])).to(out.device, out.dtype)
            else:
                drawn = sample_step(probs[row], judge, "awrs", self.estimator, self.do_sample, self.generator)
                dead, log_weight = drawn.token < 0, drawn.log_weight
                if not dead:
                    out[row, drawn.token] = 0.0
            self.constraint_calls[row] += judge.calls
            self.log_weights[row] += log_weight
            if dead:  # no allowed continuation: end the row with EOS (without an EOS id, leave it be)
                if vocab.eos_token_ids:
                    out[row, list(vocab.eos_token_ids)] = 0.0
                else:
                    out[row] = scores[row]
        return out
