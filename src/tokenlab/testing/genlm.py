"""genlm-control as an oracle: its AWRS sampler on tokenlab's constraints, distributions and models.

genlm-control (PyPI ``genlm-control``, the reference implementation of *Fast Controlled Generation
from Language Models with Adaptive Weighted Rejection Sampling*) is optional: it is imported lazily
and every entry raises ``ImportError`` without it. Its samplers are ``async``; these adapters run
them with ``asyncio.run``. Nothing of genlm's is copied here: the adapters only wrap tokenlab objects
as genlm ``Potential`` objects.

* :func:`constraint_potential` — a tokenlab :class:`~tokenlab.decoding.constraints.Constraint` as a
  boolean genlm potential over byte tokens (``0`` allowed, ``-inf`` not), counting its evaluations;
* :func:`genlm_awrs_draws` — one-step AWRS draws from a fixed next-token distribution;
* :func:`genlm_constrained_generate` — genlm's AWRS (with its SMC loop) on a Hugging Face model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import torch

from tokenlab.decoding.constraints import Constraint, TokenVocabulary, decode_text


def _genlm():
    from genlm.control import AWRS, Potential

    return AWRS, Potential


def constraint_potential(constraint: Constraint, vocabulary: Sequence[bytes]):
    """A genlm ``Potential`` over ``vocabulary`` (byte tokens) that is 0 where ``constraint`` allows
    the decoded text (``prefix``: ``allows_prefix``; ``complete``: ``allows_end``) and ``-inf``
    elsewhere. ``calls`` counts the evaluations."""
    _, Potential = _genlm()

    class _ConstraintPotential(Potential):
        def __init__(self):
            super().__init__(list(vocabulary))
            self.calls = 0

        def _text(self, context) -> str:
            return decode_text(b"".join(bytes(t) for t in context))

        async def prefix(self, context) -> float:
            self.calls += 1
            return 0.0 if constraint.allows_prefix(self._text(context)) else float("-inf")

        async def complete(self, context) -> float:
            self.calls += 1
            return 0.0 if constraint.allows_end(self._text(context)) else float("-inf")

    return _ConstraintPotential()


def _fixed_distribution(tokens: list[bytes], logp: np.ndarray):
    """A genlm potential whose next-token log-weights are ``logp`` (tokens, then EOS) after any context."""
    _, Potential = _genlm()

    class _Fixed(Potential):
        def __init__(self):
            super().__init__(tokens)

        async def prefix(self, context) -> float:
            return float(sum(logp[self.lookup[t]] for t in context))

        async def complete(self, context) -> float:
            return await self.prefix(context) + float(logp[-1])

        async def logw_next(self, context):
            return self.make_lazy_weights(logp.copy())

    return _Fixed()


def genlm_awrs_draws(
    probs: torch.Tensor, constraint: Constraint, vocabulary: TokenVocabulary, *, num_draws: int, seed: int
) -> tuple[list[int], list[float]]:
    """``num_draws`` one-step draws of genlm's AWRS from ``probs`` (``[V]``) under ``constraint``
    (empty prefix). ``vocabulary`` must have distinct non-empty token bytes and one EOS id (genlm's
    vocabulary is a set of byte strings plus its own EOS). Returns tokenlab token ids and log-weights."""
    AWRS, _ = _genlm()
    if len(vocabulary.eos_token_ids) != 1:
        raise ValueError("`vocabulary` must have exactly one EOS id")
    eos = vocabulary.eos_token_ids[0]
    ids = [v for v in range(len(vocabulary)) if v != eos]
    tokens = [vocabulary.token_bytes[v] for v in ids]
    if any(not t for t in tokens) or len(set(tokens)) != len(tokens):
        raise ValueError("`vocabulary` must have distinct non-empty bytes for every non-EOS token")
    p = probs.double().cpu().numpy()
    with np.errstate(divide="ignore"):
        logp = np.log(np.append(p[ids], p[eos]))
    model = _fixed_distribution(tokens, logp)
    sampler = AWRS(model, constraint_potential(constraint, tokens), seed=seed)
    back = {t: v for t, v in zip(tokens, ids)}

    async def run() -> tuple[list[int], list[float]]:
        drawn, weights = [], []
        for _ in range(num_draws):
            token, log_weight, _ = await sampler.sample([])
            drawn.append(back.get(token, eos))
            weights.append(float(log_weight))
        return drawn, weights

    return asyncio.run(run())


def genlm_constrained_generate(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    constraint: Constraint,
    *,
    num_particles: int,
    max_tokens: int,
) -> dict:
    """genlm-control's AWRS-SMC on a Hugging Face causal LM (its ``AsyncTransformer`` backend, CPU or
    GPU): ``num_particles`` particles continuing ``prompt_ids`` under ``constraint``, no resampling
    (``ess_threshold=0``, so every particle is a locally constrained sample with a weight).

    Returns ``texts`` (one per particle), ``log_weights``, ``tokens`` (generated tokens, EOS included),
    ``calls`` (constraint evaluations) and ``seconds``.
    """
    AWRS, _ = _genlm()
    from genlm.backend.llm import AsyncTransformer
    from genlm.control import PromptedLLM

    lm = PromptedLLM(AsyncTransformer(model, tokenizer))
    lm.prompt_ids = list(prompt_ids)
    condition = constraint_potential(constraint, lm.vocab)
    sampler = AWRS(lm, condition, seed=0)

    async def run():
        return await sampler.smc(n_particles=num_particles, ess_threshold=0.0, max_tokens=max_tokens)

    start = time.perf_counter()
    sequences = asyncio.run(run())
    seconds = time.perf_counter() - start
    contexts = [list(c) for c in sequences.contexts]
    texts = [b"".join(bytes(t) for t in c if isinstance(t, bytes)) for c in contexts]
    return {
        "texts": [decode_text(t) for t in texts],
        "log_weights": [float(w) for w in sequences.log_weights],
        "tokens": sum(len(c) for c in contexts),
        "calls": condition.calls,
        "seconds": seconds,
    }
