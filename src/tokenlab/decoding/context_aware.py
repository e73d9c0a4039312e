"""Context-aware decoding (CAD) and AdaCAD: contrast the next-token distribution with and without a context.

*Trusting Your Evidence: Hallucinate Less with Context-aware Decoding* (Shi et al., 2024) samples from

    p_CAD(y_t) ∝ exp[ (1 + α) · ℓ(y_t | c, x, y_<t)  −  α · ℓ(y_t | x, y_<t) ]

where ``ℓ`` are the model's logits with the context ``c`` and without it (``x`` is the query), and
``α ≥ 0`` is fixed. *AdaCAD: Adaptively Decoding to Balance Conflicts between Contextual and
Parametric Knowledge* (Wang et al., 2025) sets ``α`` per step and per sequence to the Jensen–Shannon
divergence of the two next-token distributions (natural log, so ``α ∈ [0, ln 2]``): little
adjustment where context and parameters agree, more where they conflict.

Both are Hugging Face ``LogitsProcessor``s for ``model.generate(..., logits_processor=[...])``. The
processor owns the context-free stream — its own input ids, attention mask and ``DynamicCache``
(:class:`tokenlab.decoding.incremental.CachedStream`) — and advances it one token per step, so the
growing prefix is never re-encoded; the contextual stream is ``generate``'s own. Batches may be
left-padded (both the contextual prompts given to ``generate`` and the context-free prompts given
to the processor). Because the logits are log-normalised before they are combined, ``ℓ`` may be
logits or log-probabilities and the output is the log of ``p_CAD``.

Supported ``generate`` modes: greedy (``do_sample=False``), sampling (with temperature/top-k/top-p,
which ``generate`` applies *after* this processor, and ``num_return_sequences``), beam search
(``num_beams > 1``, with or without sampling; the processor follows the beams' reordering by
matching each row's generated tokens to the rows it saw a step before), and assisted generation
(``assistant_model=...``: the processor scores each candidate position and rolls its cache back
to the accepted prefix). The stream always equals a fresh encoding of ``x`` + the tokens of the
call; it never sees a token twice except after a rollback.
:func:`context_aware_generate` is the same computation as a plain loop, for users who do not use
``generate``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import LogitsProcessor, PreTrainedModel

from tokenlab._checks import check_choice, check_generator, check_int, check_number, check_shape, check_tensor
from tokenlab.decoding.incremental import (
    CachedStream,
    GenerationProgress,
    check_causal_lm,
    check_prompts,
    choose_token,
    decode_loop,
    eos_token_ids,
    model_device,
    pad_token_id_for,
)
from tokenlab.kernels.warping import Warping

Method = Literal["cad", "adacad"]
METHODS: tuple[str, ...] = ("cad", "adacad")


def _jensen_shannon_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """JSD of two normalised log-distributions ``[..., V]`` → ``[...]`` (zero-probability safe)."""
    logm = torch.logaddexp(logp, logq) - math.log(2.0)

    def kl_to_m(logx: torch.Tensor) -> torch.Tensor:
        x = logx.exp()
        return torch.where(x > 0, x * (logx - logm), 0.0).sum(dim=-1)

    return (0.5 * (kl_to_m(logp) + kl_to_m(logq))).clamp(min=0.0)


def jensen_shannon_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence (natural log) between ``softmax(logits_p)`` and ``softmax(logits_q)``.

    ``JSD(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)`` with ``m = ½ (p + q)``; shapes ``[..., V]`` → ``[...]``,
    in ``[0, ln 2]``. Equal to ``scipy.spatial.distance.jensenshannon(p, q) ** 2`` (whose default
    base is e). ``-inf`` logits are zero probabilities.
    """
    check_tensor("logits_p", logits_p, floating=True)
    check_tensor("logits_q", logits_q, floating=True)
    check_shape("logits_q", logits_q, tuple(logits_p.shape), "`logits_p`'s")
    return _jensen_shannon_logprobs(logits_p.log_softmax(dim=-1), logits_q.log_softmax(dim=-1))


class _ContrastiveContextProcessor(LogitsProcessor):
    """The shared machinery of CAD and AdaCAD: the context-free stream and the contrast."""

    def __init__(
        self,
        model: PreTrainedModel,
        context_free_ids: torch.Tensor,
        context_free_attention_mask: torch.Tensor | None,
    ) -> None:
        self.model = check_causal_lm("model", model)
        self.context_free_ids, self.context_free_mask = check_prompts(
            model,
            context_free_ids,
            context_free_attention_mask,
            name="context_free_ids",
            mask_name="context_free_attention_mask",
        )
        self.progress = GenerationProgress()
        self.stream: CachedStream | None = None
        self.alphas: list[torch.Tensor] = []

    def context_weight(self, logp_context: torch.Tensor, logp_free: torch.Tensor) -> torch.Tensor:
        """``α [R]`` of this step from the two normalised log-distributions ``[R, V]``."""
        raise NotImplementedError

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids [R, T]`` (``generate``'s sequences so far), ``scores [R, V]`` (logits or
        log-probabilities with the context) → ``log p_CAD [R, V]``. Records ``α [R]`` in ``alphas``."""
        logp_free = self._context_free_logits(input_ids).to(scores.dtype).log_softmax(dim=-1)
        logp_context = scores.log_softmax(dim=-1)
        alpha = self.context_weight(logp_context, logp_free)
        self.alphas.append(alpha)
        alpha = alpha.unsqueeze(-1)
        # (1 + α)·ℓ_c − α·ℓ_x written as ℓ_c + α·(ℓ_c − ℓ_x): α = 0 adds exactly nothing (no 0·∞ where
        # the context-free side rules a token out), and a token the context rules out stays at −∞
        # (no ∞ − ∞ where both sides do).
        contrast = torch.where(alpha > 0, alpha * (logp_context - logp_free), 0.0)
        combined = (logp_context + contrast).masked_fill(logp_context == float("-inf"), float("-inf"))
        return combined.log_softmax(dim=-1)

    @property
    def alpha_history(self) -> torch.Tensor:
        """``α`` of every response position of the current generation, ``[R, steps]`` (row ``r`` of
        column ``i``: the row that was ``r`` at step ``i``; beam search reorders rows between steps)."""
        return torch.stack(self.alphas, dim=1)

    def reset(self) -> None:
        """Start afresh at the next call (only needed when a new prompt begins with the previous one)."""
        self.progress.reset()

    def _context_free_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[R, V]`` of the context-free stream, brought in line with ``input_ids``.

        The stream holds ``x`` and the tokens it was fed. Usually ``input_ids`` has one new token
        (fed alone); beam search may also have reordered the rows (matched by their tokens, cache
        reordered); assisted generation may have rolled back (cache cropped to the common prefix).
        """
        if self.progress.update(input_ids) == 0:
            rows, batch = input_ids.shape[0], self.context_free_ids.shape[0]
            if rows % batch:
                raise ValueError(
                    f"generate runs {rows} rows but the processor holds {batch} context-free prompts; "
                    "rows must be a multiple (beams / return sequences of each prompt)"
                )
            rep = torch.arange(batch, device=input_ids.device).repeat_interleave(rows // batch)
            self.stream = CachedStream(self.model, self.context_free_ids[rep], self.context_free_mask[rep])
            self.alphas = []
            return self.stream.prefill()
        stream, width = self.stream, self.context_free_ids.shape[1]
        generated, fed = input_ids[:, self.progress.prompt_length :], stream.ids[:, width:]
        if fed.shape[1] == generated.shape[1] - 1:  # one new token (greedy, sampling, beams)
            if torch.equal(generated[:, :-1], fed):
                return stream.advance(generated[:, -1])
            parents = self._parent_rows(generated[:, :-1], fed)
            if parents is not None:  # beam search reordered the rows
                stream.select(parents)
                return stream.advance(generated[:, -1])
        # Assisted generation: candidates scored one by one, then a rollback to the accepted prefix.
        keep = min(_common_prefix(generated, fed), generated.shape[1] - 1)
        stream.crop(width + keep)
        del self.alphas[generated.shape[1] :]
        return stream.advance(generated[:, keep:])

    def _parent_rows(self, current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor | None:
        """For each row of ``current [R, t]``, a row of ``previous [R, t]`` with the same tokens among
        the rows of the same prompt (beam search reorders rows only within a prompt's group);
        ``None`` when some row has no such parent."""
        rows, steps = current.shape
        group = rows // self.context_free_ids.shape[0]
        same = (current.view(-1, group, 1, steps) == previous.view(-1, 1, group, steps)).all(dim=-1)
        if not bool(same.any(dim=-1).all()):
            return None
        offsets = torch.arange(0, rows, group, device=current.device).view(-1, 1)
        return (same.int().argmax(dim=-1) + offsets).view(-1)


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of leading columns on which ``a [R, n]`` and ``b [R, m]`` agree in every row."""
    n = min(a.shape[1], b.shape[1])
    agree = (a[:, :n] == b[:, :n]).all(dim=0)
    return n if bool(agree.all()) else int(agree.int().argmin())


class ContextAwareLogitsProcessor(_ContrastiveContextProcessor):
    """CAD (*Trusting Your Evidence: Hallucinate Less with Context-aware Decoding*) with a fixed ``α``.

    ``scores ↦ log_softmax[(1 + α)·log_softmax(scores) − α·log_softmax(ℓ(·|x, y_<t))]`` where the
    context-free logits come from the processor's own stream over ``context_free_ids`` followed by
    the generated tokens. ``α = 0`` is plain decoding.

    Args:
        model: the HF causal LM that ``generate`` runs (full-attention cache layers).
        context_free_ids: ``[B, Tx]`` the prompts without the context (``x``), one per prompt given to
            ``generate`` (whose prompts are ``c + x``), left-padded when
            ``context_free_attention_mask [B, Tx]`` is given.
        alpha: ``α ≥ 0``, the weight of the contrast (the paper uses 0.5 and 1).

    Modes: greedy, sampling, beam search and assisted generation (see the module docstring). After a
    ``generate`` call, ``stream`` holds the context-free ids/mask/cache and ``alpha_history`` the ``α``
    per step.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        context_free_ids: torch.Tensor,
        context_free_attention_mask: torch.Tensor | None = None,
        *,
        alpha: float = 0.5,
    ) -> None:
        self.alpha = check_number("alpha", alpha, low=0.0)
        super().__init__(model, context_free_ids, context_free_attention_mask)

    def context_weight(self, logp_context: torch.Tensor, logp_free: torch.Tensor) -> torch.Tensor:
        return torch.full(
            logp_context.shape[:-1], self.alpha, dtype=logp_context.dtype, device=logp_context.device
        )


class AdaCADLogitsProcessor(_ContrastiveContextProcessor):
    """AdaCAD (*AdaCAD: Adaptively Decoding to Balance Conflicts between Contextual and Parametric
    Knowledge*): CAD with ``α_t = JSD(p(·|c, x, y_<t) ‖ p(·|x, y_<t))`` per step and per sequence.

    The divergence (natural log, ``∈ [0, ln 2]``) is computed from the distributions the processor
    sees: ``softmax(scores)`` with the context (after any processor that runs before it in
    ``generate``'s list) and the context-free stream's ``softmax(ℓ)``. Arguments and modes as
    :class:`ContextAwareLogitsProcessor`, without ``alpha``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        context_free_ids: torch.Tensor,
        context_free_attention_mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model, context_free_ids, context_free_attention_mask)

    def context_weight(self, logp_context: torch.Tensor, logp_free: torch.Tensor) -> torch.Tensor:
        return _jensen_shannon_logprobs(logp_context, logp_free)


@dataclass
class ContextAwareOutput:
    """``sequences [B, P + N]`` (the contextual prompts as given, then new tokens, padded after EOS,
    as ``generate`` returns them) and ``alphas [B, N]``, the ``α`` used at each step."""

    sequences: torch.Tensor
    alphas: torch.Tensor


@torch.no_grad()
def context_aware_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    context_free_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    context_free_attention_mask: torch.Tensor | None = None,
    method: Method = "cad",
    alpha: float = 0.5,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> ContextAwareOutput:
    """CAD / AdaCAD as a plain loop: two cached streams (with and without the context), one token per step.

    Args:
        model: an HF causal LM (full-attention cache layers).
        input_ids: ``[B, P]`` prompts with the context (``c + x``), left-padded when
            ``attention_mask [B, P]`` is given.
        context_free_ids: ``[B, Tx]`` the same prompts without the context (``x``), left-padded when
            ``context_free_attention_mask`` is given.
        method: ``"cad"`` (fixed ``alpha``) or ``"adacad"`` (``α`` = Jensen–Shannon divergence per step).
        alpha: CAD's ``α ≥ 0`` (ignored by AdaCAD).
        max_new_tokens: tokens to generate per sequence (fewer when it emits an EOS).
        do_sample, temperature, top_k, top_p: greedy or sampling from the warped CAD distribution
            (:class:`tokenlab.kernels.warping.Warping`, applied after the contrast, as ``generate`` does).
        eos_token_id: id(s) that end a sequence (kept); ``None``: the model's generation config;
            ``[]``: never stop early.
        pad_token_id: fills a sequence after its EOS (default: generation config, first EOS, 0).
        generator: random source of sampling (a ``torch.Generator`` on the model's device).

    Returns:
        :class:`ContextAwareOutput`. Greedy output equals ``model.generate(input_ids,
        logits_processor=[ContextAwareLogitsProcessor(...)], do_sample=False)`` token for token.
    """
    check_causal_lm("model", model)
    input_ids, mask = check_prompts(model, input_ids, attention_mask)
    check_choice("method", method, METHODS)
    if method == "cad":  # the processor validates the context-free prompts and alpha
        processor: _ContrastiveContextProcessor = ContextAwareLogitsProcessor(
            model, context_free_ids, context_free_attention_mask, alpha=alpha
        )
    else:
        processor = AdaCADLogitsProcessor(model, context_free_ids, context_free_attention_mask)
    if processor.context_free_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"`context_free_ids` must have one row per prompt ({input_ids.shape[0]}), "
            f"got {processor.context_free_ids.shape[0]}"
        )
    check_int("max_new_tokens", max_new_tokens, low=1)
    warping = Warping(do_sample, temperature, top_k, top_p)
    eos = eos_token_ids(model, eos_token_id)
    pad = pad_token_id_for(model, pad_token_id, eos)
    check_generator("generator", generator, model_device(model))
    stream = CachedStream(model, input_ids, mask)

    def choose(step: int, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        return choose_token(processor(stream.ids, logits), warping, generator)

    sequences = decode_loop(stream, choose, max_new_tokens=max_new_tokens, eos=eos, pad_token_id=pad)
    return ContextAwareOutput(sequences, processor.alpha_history)
