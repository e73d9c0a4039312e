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
from tqdm.auto import tqdm
from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase

from tokenlab._checks import check_bool, check_int
from tokenlab.decoding.awrs import Estimator, Method, TokenJudge, allowed_tokens, check_sampling, sample_step
from tokenlab.decoding.constraints import Constraint, TokenVocabulary, decode_text
from tokenlab.decoding.incremental import CachedStream, check_causal_lm, check_prompts
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
    device = next(model.parameters()).device
    input_ids, mask = check_prompts("input_ids", input_ids, attention_mask, device)
    if not isinstance(constraint, Constraint):
        raise TypeError(f"`constraint` must be a Constraint, got {type(constraint).__name__}")
    size = model.get_output_embeddings().weight.shape[0]
    vocab = _padded(_vocabulary(vocabulary), size)
    check_int("max_new_tokens", max_new_tokens, low=1)
    check_sampling(method, estimator, do_sample, generator)
    warping = Warping(do_sample, temperature, top_k, top_p)
    check_bool("stop_when_complete", stop_when_complete)
    check_bool("progress", progress)
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = vocab.eos_token_ids[0] if vocab.eos_token_ids else 0
    check_int("pad_token_id", pad_token_id, low=0, high=size - 1)

    start = time.perf_counter()
    B = input_ids.shape[0]
    stream = CachedStream(model, input_ids, mask)
    logits = stream.prefill()
    generated = [b""] * B
    new_tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long)
    step_log_weights = torch.zeros(B, max_new_tokens, dtype=torch.float64)
    calls = torch.zeros(B, dtype=torch.long)
    lengths = torch.zeros(B, dtype=torch.long)
    active = list(range(B))
    sampling_seconds = 0.0
    for step in tqdm(range(max_new_tokens), desc="constrained generation", disable=not progress):
        probs = _probabilities(logits[active], warping)
        sampling_start = time.perf_counter()
        still = []
        for row, p in zip(active, probs):
            judge = TokenJudge(constraint, vocab, generated[row])
            drawn = sample_step(p, judge, method, estimator, do_sample, generator)
            calls[row] += drawn.calls
            step_log_weights[row, step] = drawn.log_weight
            if drawn.token < 0:  # a dead end: no allowed continuation
                continue
            new_tokens[row, step] = drawn.token
            lengths[row] += 1
            generated[row] += vocab.token_bytes[drawn.token] or b""
            if vocab.is_eos(drawn.token):
                continue
            if stop_when_complete and constraint.allows_end(decode_text(generated[row])):
                continue
            still.append(row)
        sampling_seconds += time.perf_counter() - sampling_start
        active = still
        if not active:
            break
        logits = stream.advance(new_tokens[:, step].to(device))
    width = int(lengths.max()) if B else 0
    texts = [decode_text(g) for g in generated]
    complete = torch.tensor([constraint.allows_end(t) for t in texts])
    return ConstrainedOutput(
        sequences=torch.cat([input_ids, new_tokens[:, :width].to(device)], dim=1),
        texts=texts,
        log_weights=step_log_weights.sum(dim=1),
        step_log_weights=step_log_weights[:, :width],
        complete=complete,
        num_new_tokens=lengths,
        constraint_calls=calls,
        seconds=time.perf_counter() - start,
        sampling_seconds=sampling_seconds,
    )


class ConstrainedLogitsProcessor(LogitsProcessor):
    """Constrained decoding inside ``model.generate`` (a ``LogitsProcessor``).

    The first call records the prompt length; later calls read the tokens generated since from
    ``input_ids``. Per row it draws a token with AWRS (``method="awrs"``) and returns scores that are
    ``-inf`` except at that token, so ``generate`` (greedy or sampling) emits it; with
    ``method="mask"`` it returns the warped log-probabilities with the disallowed tokens at ``-inf``,
    and ``generate`` samples among them. ``generate`` applies its own warpers *after* the user's
    processors, so put temperature/top-k/top-p here and leave ``generate``'s at their neutral values
    (``temperature=1.0, top_k=0, top_p=1.0``). A row with no allowed token is forced to EOS (weight
    ``-inf``). Rows that emitted EOS are left alone (``generate`` pads them).

    Attributes:
        log_weights: ``[B]`` float64 accumulated ``log Ẑ`` per row (what :func:`constrained_generate`
            returns as ``log_weights``).
        constraint_calls: ``[B]`` constraint evaluations per row.

    Call :meth:`reset` before reusing the processor for another ``generate`` call.
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
        self.reset()

    def reset(self) -> None:
        """Forget the prompt length, texts, weights and counts of the previous ``generate`` call."""
        self._prompt_length: int | None = None
        self._vocab: TokenVocabulary | None = None
        self.log_weights = torch.zeros(0, dtype=torch.float64)
        self.constraint_calls = torch.zeros(0, dtype=torch.long)
        self._texts: list[bytes] = []
        self._done: list[bool] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, V = scores.shape
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
            self._vocab = _padded(self.vocabulary, V)
            self.log_weights = torch.zeros(B, dtype=torch.float64)
            self.constraint_calls = torch.zeros(B, dtype=torch.long)
            self._texts, self._done = [b""] * B, [False] * B
        elif input_ids.shape[1] > self._prompt_length:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if not self._done[row]:
                    self._texts[row] += self._vocab.token_bytes[token] or b""
                    self._done[row] = self._vocab.is_eos(token)
        probs = _probabilities(scores, self.warping)
        out = torch.full_like(scores, float("-inf"))
        for row in range(B):
            if self._done[row]:
                out[row] = scores[row]
                continue
            judge = TokenJudge(self.constraint, self._vocab, self._texts[row])
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
                if self._vocab.eos_token_ids:
                    out[row, list(self._vocab.eos_token_ids)] = 0.0
                else:
                    out[row] = scores[row]
        return out
