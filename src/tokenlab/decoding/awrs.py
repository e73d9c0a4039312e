"""One constrained decoding step: token masking, and adaptive weighted rejection sampling (AWRS).

*Fast Controlled Generation from Language Models with Adaptive Weighted Rejection Sampling*
(Lipkin, LeBrun, Vigly, Loula, MacIver, Du, Eisner, Cotterell, Mansinghka, O'Donnell, Lew, Vieira).
Given the next-token distribution ``p`` (``[V]``) and the set ``A`` of tokens a constraint allows
after the current prefix, both samplers draw from ``p`` restricted to ``A`` and renormalised,

    p_A(v) = p(v) 1[v ∈ A] / Z,      Z = Σ_{v ∈ A} p(v)  (the allowed mass),

and return a log-weight: ``log Z`` or an unbiased estimate of ``Z``. The product of the per-step
``Z`` over a sequence is its importance weight from locally constrained decoding to ``p``
conditioned on the constraint, the weight sequential Monte Carlo resamples by.

* **token masking** (``method="mask"``, the baseline of outlines/xgrammar-style decoding): check every
  token with ``p(v) > 0`` (``V`` constraint calls), mask, renormalise, sample; ``Z`` is exact.
* **AWRS** (``method="awrs"``): draw tokens from ``p`` *without replacement* (a Gumbel race:
  ``argsort(log p + G)``, ``G ~ Gumbel(0, 1)``, consumed lazily) and check each until one is
  allowed. Removing rejected tokens and renormalising is sampling from ``p`` conditioned on not
  being rejected, so the accepted token follows ``p_A`` exactly, after on average far fewer
  than ``V`` checks (about ``1/Z`` when ``p`` puts its mass on few tokens). Weight estimators:

  - ``estimator="two_loop"`` (the paper's, as in the authors' first release of genlm-control): run a
    *second* race over the tokens not rejected by the
    first, again until an allowed token (the first accepted one is still in the pool, its verdict
    cached); with ``R₁`` the tokens rejected by the first loop and ``N`` the rejections of both
    loops, ``Ẑ = (1 − p(R₁)) / (N + 1)`` is unbiased for ``Z``;
  - ``estimator="recursive"`` (the variant of the reference implementation, genlm-control): with the
    race order ``x₁, x₂, …`` and ``q_i = p(x_i) / (1 − p(x₁..x_{i−1}))``, the first allowed ``x_k``
    gives ``Ẑ = ∏_{i<k} (1 − q_i) · (q_k + (1 − q_k) 1[x_{k+1} ∈ A])`` — unbiased by
    ``E f = q f(x) + (1 − q) E[f | X ≠ x]`` — for one extra check;
  - ``estimator=None``: no weight (``nan``), no extra check.

Greedy decoding (``do_sample=False``) checks tokens in descending order of ``p`` (AWRS) or all of
them (masking) and returns the most likely allowed token; AWRS then has no weight (``nan``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from tokenlab._checks import check_bool, check_choice, check_generator, check_tensor
from tokenlab.decoding.constraints import Constraint, TokenVocabulary, decode_text

Method = Literal["awrs", "mask"]
Estimator = Literal["two_loop", "recursive"] | None
METHODS: tuple[str, ...] = ("awrs", "mask")
ESTIMATORS: tuple[str | None, ...] = ("two_loop", "recursive", None)


@dataclass(frozen=True)
class ConstrainedStep:
    """One constrained draw: ``token`` (−1 when no token is allowed), ``log_weight`` (``log Z`` or
    the log of its estimate; ``-inf`` when no token is allowed; ``nan`` without an estimate) and
    ``calls``, the constraint evaluations it made."""

    token: int
    log_weight: float
    calls: int


class TokenJudge:
    """Decides which next tokens a constraint allows after one generated prefix.

    A token ``v`` is allowed when ``constraint.allows_prefix(text(prefix + bytes(v)))``; an EOS token
    when ``constraint.allows_end(text(prefix))``; a token without bytes (special) never, without a
    call. Verdicts are cached (a token is checked once per prefix); ``calls`` counts the evaluations.
    """

    def __init__(self, constraint: Constraint, vocabulary: TokenVocabulary, prefix: bytes):
        self.constraint = constraint
        self.vocabulary = vocabulary
        self.prefix = prefix
        self.text = decode_text(prefix)
        self.calls = 0
        self._verdicts: dict[int, bool] = {}

    def _candidate(self, token: int) -> str | None:
        data = self.vocabulary.token_bytes[token]
        return None if data is None else decode_text(self.prefix + data)

    def __call__(self, token: int) -> bool:
        verdict = self._verdicts.get(token)
        if verdict is None:
            if self.vocabulary.is_eos(token):
                verdict = self.constraint.allows_end(self.text)
                self.calls += 1
            else:
                text = self._candidate(token)
                verdict = text is not None and self.constraint.allows_prefix(text)
                self.calls += text is not None
            self._verdicts[token] = verdict
        return verdict

    def many(self, tokens: list[int]) -> list[bool]:
        """Verdicts for many tokens with one batched ``allows_prefixes`` call (token masking)."""
        texts, where = [], []
        verdicts = [False] * len(tokens)
        for i, token in enumerate(tokens):
            if self.vocabulary.is_eos(token):
                verdicts[i] = self(token)
            elif (text := self._candidate(token)) is not None:
                texts.append(text)
                where.append(i)
        for i, ok in zip(where, self.constraint.allows_prefixes(texts), strict=True):
            verdicts[i] = bool(ok)
        self.calls += len(texts)
        return verdicts


def _race(logp: np.ndarray, generator: torch.Generator | None, do_sample: bool) -> Iterator[int]:
    """The tokens with ``logp > -inf`` in the order of sampling without replacement from
    ``softmax(logp)`` (Gumbel-top-k: ``argsort(logp + G)`` with ``G = −log E``, ``E ~ Exp(1)`` drawn
    from ``generator``; sorted lazily: the top 16, then 4× more each time the walk gets past them),
    or by descending ``logp`` (ties: lower id first) when not sampling."""
    n = len(logp)
    if not do_sample:  # one stable sort: exact ties (equal logits) keep a fixed order
        order = np.argsort(-logp, kind="stable")
        yield from order[: int(np.isfinite(logp).sum())].tolist()
        return
    noise = torch.empty(n, dtype=torch.float64).exponential_(generator=generator).numpy()
    keys = logp - np.log(noise)
    done, k = 0, min(16, n)
    while done < n:
        top = np.argpartition(-keys, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.argsort(-keys[top], kind="stable")]
        for v in top[done:].tolist():
            if keys[v] == -np.inf:
                return
            yield v
        done, k = k, min(4 * k, n)


def _dead(judge: TokenJudge) -> ConstrainedStep:
    return ConstrainedStep(-1, float("-inf"), judge.calls)


def allowed_tokens(p: np.ndarray, judge: TokenJudge) -> np.ndarray:
    """The allowed tokens among those with ``p > 0`` (ascending ids): token masking's full check,
    one batched constraint call."""
    candidates = np.flatnonzero(p > 0)
    return candidates[np.array(judge.many(candidates.tolist()), dtype=bool)]


def _mask(
    p: np.ndarray, judge: TokenJudge, generator: torch.Generator | None, do_sample: bool
) -> ConstrainedStep:
    allowed = allowed_tokens(p, judge)
    if allowed.size == 0:
        return _dead(judge)
    mass = p[allowed]
    total = float(mass.sum())
    if do_sample:  # inverse CDF of one uniform from `generator`
        u = float(torch.rand((), dtype=torch.float64, generator=generator)) * total
        token = allowed[min(int(np.searchsorted(np.cumsum(mass), u, side="right")), allowed.size - 1)]
    else:
        token = allowed[int(np.argmax(mass))]
    return ConstrainedStep(int(token), math.log(total), judge.calls)


def _awrs_two_loop(
    p: np.ndarray, logp: np.ndarray, judge: TokenJudge, generator: torch.Generator | None
) -> ConstrainedStep:
    rejected: list[int] = []
    first_loop_rejected = 0
    token = None
    for loop in range(2):
        pool = logp
        if rejected:
            pool = logp.copy()
            pool[rejected] = -np.inf
        for v in _race(pool, generator, True):
            if judge(v):
                token = v if token is None else token
                break
            rejected.append(v)
        else:
            return _dead(judge)  # the first loop exhausted the support (the second always stops)
        if loop == 0:
            first_loop_rejected = len(rejected)
    kept = p.copy()
    kept[rejected[:first_loop_rejected]] = 0.0
    return ConstrainedStep(token, math.log(float(kept.sum()) / (len(rejected) + 1)), judge.calls)


def _awrs_recursive(
    p: np.ndarray, logp: np.ndarray, judge: TokenJudge, generator: torch.Generator | None
) -> ConstrainedStep:
    log_multiplier, remaining = 0.0, 1.0
    race = _race(logp, generator, True)
    for v in race:
        q = min(float(p[v]) / remaining, 1.0) if remaining > 0 else 1.0
        if judge(v):
            after = next(race, None)
            if after is None or judge(after):
                return ConstrainedStep(v, log_multiplier, judge.calls)
            return ConstrainedStep(v, log_multiplier + math.log(q), judge.calls)
        log_multiplier += math.log1p(-q) if q < 1 else float("-inf")
        remaining -= float(p[v])
    return _dead(judge)


def _awrs(
    p: np.ndarray, judge: TokenJudge, generator: torch.Generator | None, do_sample: bool, estimator: Estimator
) -> ConstrainedStep:
    with np.errstate(divide="ignore"):
        logp = np.log(p)
    if not do_sample or estimator is None:
        for v in _race(logp, generator, do_sample):
            if judge(v):
                return ConstrainedStep(v, float("nan"), judge.calls)
        return _dead(judge)
    if estimator == "two_loop":
        return _awrs_two_loop(p, logp, judge, generator)
    return _awrs_recursive(p, logp, judge, generator)


def sample_step(
    p: np.ndarray,
    judge: TokenJudge,
    method: Method,
    estimator: Estimator,
    do_sample: bool,
    generator: torch.Generator | None,
) -> ConstrainedStep:
    """One draw from ``p`` (``[V]`` float64 numpy array summing to 1) restricted to what ``judge``
    allows. Arguments are trusted (checked by the public entry that calls this)."""
    if method == "mask":
        return _mask(p, judge, generator, do_sample)
    return _awrs(p, judge, generator, do_sample, estimator)


def check_sampling(method: object, estimator: object, do_sample: object, generator: object) -> None:
    """Argument checks shared by the public entries of constrained decoding."""
    check_choice("method", method, METHODS)
    check_choice("estimator", estimator, ESTIMATORS)
    check_bool("do_sample", do_sample)
    check_generator("generator", generator, "cpu")  # the draws run on CPU (numpy)


def constrained_sample(
    probs: torch.Tensor,
    constraint: Constraint,
    vocabulary: TokenVocabulary,
    prefix: bytes | str = b"",
    *,
    method: Method = "awrs",
    estimator: Estimator = "two_loop",
    do_sample: bool = True,
    generator: torch.Generator | None = None,
) -> ConstrainedStep:
    """Draw one token from ``probs`` restricted to the tokens ``constraint`` allows after ``prefix``.

    Args:
        probs: ``[V]`` next-token probabilities (non-negative, summing to 1; computed in float64).
        constraint: the :class:`~tokenlab.decoding.constraints.Constraint`.
        vocabulary: the bytes of each token (``len(vocabulary) == V``) and the EOS ids.
        prefix: the text generated so far (bytes, or str encoded as UTF-8).
        method: ``"awrs"`` (adaptive weighted rejection sampling) or ``"mask"`` (token masking).
        estimator: AWRS weight estimator: ``"two_loop"`` (the paper's), ``"recursive"`` or ``None``.
        do_sample: ``False``: the most likely allowed token.
        generator: random source (CPU ``torch.Generator``).

    Returns:
        :class:`ConstrainedStep`: the token (−1 if none is allowed), the log allowed mass (exact for
        masking, an unbiased estimate of the mass for AWRS), and the constraint calls made.
    """
    check_tensor("probs", probs, ndim=1, floating=True)
    if not isinstance(constraint, Constraint):
        raise TypeError(f"`constraint` must be a Constraint, got {type(constraint).__name__}")
    if not isinstance(vocabulary, TokenVocabulary) or len(vocabulary) != probs.shape[0]:
        raise ValueError(
            f"`vocabulary` must be a TokenVocabulary of {probs.shape[0]} tokens (the size of `probs`)"
        )
    check_sampling(method, estimator, do_sample, generator)
    p = probs.detach().double().cpu().numpy()
    if not np.isfinite(p).all() or (p < 0).any() or abs(float(p.sum()) - 1) > 1e-6:
        raise ValueError("`probs` must be finite, non-negative and sum to 1")
    data = prefix.encode("utf-8") if isinstance(prefix, str) else bytes(prefix)
    judge = TokenJudge(constraint, vocabulary, data)
    return sample_step(p, judge, method, estimator, do_sample, generator)
