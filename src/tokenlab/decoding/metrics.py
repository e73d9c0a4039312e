"""Generation metrics: per-step entropy, branching factor, turn-wise KL drift, token forcing scan.

* **Per-step entropy** ``H_t = −Σ_v p_t(v) log p_t(v)`` (nats) of a model's next-token
  distributions: :func:`token_entropy` (from logits) and :func:`next_token_entropy` (along given
  sequences, one forward).
* **Branching factor** (*How Alignment Shrinks the Generative Horizon*, Yang & Holtzman): the
  effective number of plausible next tokens, ``BF(x) = exp(H(Y₁..Y_N | x) / N)``. By the chain rule
  ``H(Y | x) = E_y[Σ_t H_t(y_<t)]``, so the paper estimates it from ``M`` sampled continuations:
  ``BF ≈ exp(mean_i (1/N_i) Σ_t H_t(y_i,<t))`` (:func:`branching_factor`), or for long outputs by the
  asymptotic equipartition property, ``exp(mean_i −(1/N_i) log p(y_i | x))``. Uniform next-token
  distributions over ``V`` tokens give ``BF = V``, deterministic ones ``BF = 1``.
* **Turn-wise KL drift** (*Drift No More? Context Equilibria in Multi-Turn LLM Interactions*,
  Dongre et al.): ``D_t = KL(q_t ‖ p_t)`` between the test model's token-level predictive
  distributions ``q`` and a goal-consistent reference model's ``p`` over the tokens of turn ``t``,
  averaged over those tokens (:func:`turn_kl_drift`).
* **Unconditional token forcing** (*Hiding Text in Large Language Models: Introducing Unconditional
  Token Forcing Confusion*, Hoscilowicz et al.): feed every vocabulary token alone (after BOS) and
  decode greedily; text planted by fine-tuning shows up as continuations of abnormally high
  probability. :func:`unconditional_token_forcing` ranks the forced tokens by the mean log-probability
  of their greedy continuation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from tokenlab._checks import check_bool, check_generator, check_int, check_tensor
from tokenlab.decoding.incremental import (
    CachedStream,
    check_causal_lm,
    check_prompts,
    decode_loop,
    eos_token_ids,
    model_device,
    pad_token_id_for,
    position_ids,
    vocab_size,
)
from tokenlab.kernels.warping import Warping


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` over the last dimension: ``[..., V]`` → ``[...]``.

    ``-inf`` logits (masked tokens) contribute nothing. Computed in float32 (float64 for float64
    input)."""
    check_tensor("logits", logits, floating=True)
    return _entropy(
        torch.log_softmax(logits.double() if logits.dtype == torch.float64 else logits.float(), dim=-1)
    )


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """``−Σ p log p`` over the last dimension of log-probabilities (``0 · log 0 = 0``)."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)


def _positions_logits(model: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = position_ids(mask)
    return model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits


@torch.no_grad()
def next_token_entropy(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-step entropy along given sequences: ``[B, T]``, entry ``t`` the entropy of the model's
    distribution of token ``t + 1`` given tokens ``≤ t`` (``nan`` at padding)."""
    check_causal_lm("model", model)
    input_ids, mask = check_prompts(model, input_ids, attention_mask)
    entropy = token_entropy(_positions_logits(model, input_ids, mask))
    return entropy.masked_fill(mask == 0, float("nan"))


def branching_factor_from_entropies(entropies: torch.Tensor) -> torch.Tensor:
    """The branching factor ``exp(mean_i mean_t H_it)`` from per-step entropies ``[..., M, N]`` of
    ``M`` sampled continuations (``nan`` marks steps after a continuation ended) → ``[...]``."""
    check_tensor("entropies", entropies, floating=True)
    per_sample = entropies.nanmean(dim=-1)
    return per_sample.nanmean(dim=-1).exp()


@dataclass
class BranchingFactor:
    """Branching factor of ``B`` prompts from ``M`` sampled continuations of up to ``N`` tokens.

    Attributes:
        value: ``[B]`` ``exp(mean_i (1/N_i) Σ_t H_it)`` — the paper's estimator.
        likelihood_value: ``[B]`` ``exp(mean_i −(1/N_i) log p(y_i | x))`` — the asymptotic
            equipartition estimator (same expectation of the exponent; suited to long outputs).
        per_position: ``[B, N]`` ``exp(mean_i H_it)``: the branching factor at output position ``t``.
        entropies: ``[B, M, N]`` entropy of the sampled-from distribution at each step (``nan`` after
            a continuation ended at EOS).
        log_probs: ``[B, M, N]`` log-probability of each sampled token (``nan`` after the end).
        sequences: ``[B, M, N]`` the sampled tokens (after the end: the model's pad id, else the
            first EOS id, else 0).
    """

    value: torch.Tensor
    likelihood_value: torch.Tensor
    per_position: torch.Tensor
    entropies: torch.Tensor
    log_probs: torch.Tensor
    sequences: torch.Tensor


@torch.no_grad()
def branching_factor(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> BranchingFactor:
    """Estimate the branching factor of each prompt from sampled continuations.

    For each of the ``B`` prompts, ``num_samples`` continuations are sampled from the warped
    distribution (temperature/top-k/top-p, :class:`~tokenlab.kernels.warping.Warping`), recording at
    every step the entropy of that distribution and the log-probability of the sampled token.

    Args:
        model: a Hugging Face causal LM.
        input_ids: ``[B, P]`` prompts (left-padded when ``attention_mask`` is given).
        num_samples: continuations per prompt (``M``).
        max_new_tokens: length of each continuation (``N``; shorter when it emits EOS).
        eos_token_id: token id(s) that end a continuation (counted as its last step); default the
            model's ``generation_config.eos_token_id``; ``[]`` never ends early.
        generator: random source of the samples (a ``torch.Generator`` on the model's device).

    Returns:
        :class:`BranchingFactor`.
    """
    check_causal_lm("model", model)
    input_ids, mask = check_prompts(model, input_ids, attention_mask)
    M = check_int("num_samples", num_samples, low=1)
    N = check_int("max_new_tokens", max_new_tokens, low=1)
    warping = Warping(True, temperature, top_k, top_p)
    eos = eos_token_ids(model, eos_token_id)
    pad = pad_token_id_for(model, None, eos)
    check_generator("generator", generator, model_device(model))
    check_bool("progress", progress)

    B, P = input_ids.shape
    stream = CachedStream(model, input_ids.repeat_interleave(M, dim=0), mask.repeat_interleave(M, dim=0))
    entropies = torch.full((B * M, N), float("nan"), dtype=torch.float64)
    log_probs = torch.full((B * M, N), float("nan"), dtype=torch.float64)

    def choose(step: int, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(warping.logits(logits.double()), dim=-1)
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        live = ~done
        entropies[live.cpu(), step] = _entropy(logp)[live].cpu()
        log_probs[live.cpu(), step] = logp.gather(1, token[:, None]).squeeze(1)[live].cpu()
        return token

    sequences = decode_loop(
        stream,
        choose,
        max_new_tokens=N,
        eos=eos,
        pad_token_id=pad,
        progress=progress,
        desc="branching factor",
    )
    tokens = torch.full((B * M, N), pad, dtype=torch.long)
    tokens[:, : sequences.shape[1] - P] = sequences[:, P:].cpu()
    entropies, log_probs = entropies.view(B, M, N), log_probs.view(B, M, N)
    return BranchingFactor(
        value=branching_factor_from_entropies(entropies),
        likelihood_value=(-log_probs.nanmean(dim=-1)).mean(dim=-1).exp(),
        per_position=entropies.nanmean(dim=1).exp(),
        entropies=entropies,
        log_probs=log_probs,
        sequences=tokens.view(B, M, N),
    )


def concat_turns(turns: Sequence[Sequence[int]], scored: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of a conversation and its turn index: ``input_ids [1, T]`` (the turns concatenated)
    and ``turn_ids [1, T]`` — the ``k``-th scored turn's tokens get ``k``, the rest ``−1``."""
    if len(turns) != len(scored) or not turns:
        raise ValueError("`turns` and `scored` must be non-empty and of the same length")
    ids, index, k = [], [], 0
    for turn, score in zip(turns, scored):
        ids.extend(int(t) for t in turn)
        index.extend([k if score else -1] * len(turn))
        k += bool(score)
    return torch.tensor([ids], dtype=torch.long), torch.tensor([index], dtype=torch.long)


def _scored_log_probs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    turn_ids: torch.Tensor,
    mask: torch.Tensor,
    warping: Warping,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per row: (tokens, turn index, log-distribution predicting them ``[n, V]`` float64) of the
    positions with ``turn_ids ≥ 0``."""
    logp = torch.log_softmax(warping.logits(_positions_logits(model, input_ids, mask).double()), dim=-1)
    rows = []
    for b in range(input_ids.shape[0]):
        where = torch.nonzero(turn_ids[b] >= 0).flatten()
        rows.append((input_ids[b, where], turn_ids[b, where], logp[b, where - 1]))
    return rows


@torch.no_grad()
def turn_kl_drift(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    input_ids: torch.Tensor,
    turn_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    reference_input_ids: torch.Tensor | None = None,
    reference_turn_ids: torch.Tensor | None = None,
    reference_attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Turn-wise KL drift ``D_t = mean over the tokens j of turn t of KL(q_j ‖ p_j)``.

    ``q_j`` is ``model``'s distribution of token ``j`` given the tokens before it, ``p_j`` the
    ``reference``'s (both ``softmax(logits / temperature)``), ``KL(q ‖ p) = Σ_v q(v) log(q(v)/p(v))``.

    Args:
        model, reference: Hugging Face causal LMs over the same vocabulary.
        input_ids: ``[B, T]`` conversations (left-padded when ``attention_mask`` is given).
        turn_ids: ``[B, T]`` the turn each token belongs to (``0..K−1``) or ``−1`` for tokens not
            scored (e.g. user turns; see :func:`concat_turns`). The first token cannot be scored.
        reference_input_ids, reference_turn_ids, reference_attention_mask: a different context for
            the reference (e.g. the conversation with a goal reminder); its scored tokens must be the
            same tokens, in the same order, with the same turn indices. Default: the same as the model's.

    Returns:
        ``[B, K]`` float64 drift per turn (``nan`` for a turn without tokens in a row).
    """
    for name, m in (("model", model), ("reference", reference)):
        check_causal_lm(name, m)
    input_ids, mask = check_prompts(model, input_ids, attention_mask)
    check_tensor("turn_ids", turn_ids, integer=True)
    if turn_ids.shape != input_ids.shape:
        raise ValueError(f"`turn_ids` must have the shape of `input_ids` {tuple(input_ids.shape)}")
    if model_device(reference) != model_device(model):
        raise ValueError(f"`reference` is on {model_device(reference)}, `model` on {model_device(model)}")
    if reference_input_ids is None:
        if reference_turn_ids is not None or reference_attention_mask is not None:
            raise ValueError("`reference_turn_ids`/`reference_attention_mask` need `reference_input_ids`")
        reference_input_ids, reference_turn_ids, ref_mask = input_ids, turn_ids, mask
    else:
        reference_input_ids, ref_mask = check_prompts(
            reference,
            reference_input_ids,
            reference_attention_mask,
            name="reference_input_ids",
            mask_name="reference_attention_mask",
        )
        check_tensor("reference_turn_ids", reference_turn_ids, integer=True)
        if reference_turn_ids.shape != reference_input_ids.shape:
            raise ValueError("`reference_turn_ids` must have the shape of `reference_input_ids`")
    for name, ids in (("turn_ids", turn_ids), ("reference_turn_ids", reference_turn_ids)):
        if bool((ids[:, 0] >= 0).any()):
            raise ValueError(f"`{name}`: the first token has no prediction and cannot be scored (use -1)")
    vocab = (vocab_size(model), vocab_size(reference))
    if vocab[0] != vocab[1]:
        raise ValueError(
            f"`model` and `reference` must share a vocabulary, got sizes {vocab[0]} and {vocab[1]}"
        )
    warping = Warping(True, temperature)

    test = _scored_log_probs(model, input_ids, turn_ids, mask, warping)
    ref = _scored_log_probs(reference, reference_input_ids, reference_turn_ids, ref_mask, warping)
    K = int(turn_ids.max()) + 1 if bool((turn_ids >= 0).any()) else 0
    drift = torch.full((input_ids.shape[0], K), float("nan"), dtype=torch.float64)
    for b, ((tokens, turns, logq), (ref_tokens, ref_turns, logp)) in enumerate(zip(test, ref)):
        if not (torch.equal(tokens, ref_tokens) and torch.equal(turns, ref_turns)):
            raise ValueError(f"row {b}: the reference's scored tokens differ from the model's")
        q = logq.exp()
        kl = torch.where(q > 0, q * (logq - logp), 0.0).sum(dim=-1).cpu()  # 0·log(0/p) = 0
        turns = turns.cpu()
        for k in turns.unique().tolist():
            drift[b, k] = kl[turns == k].mean()
    return drift


def _recording_greedy(log_probs: torch.Tensor) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A :func:`decode_loop` chooser: the most likely token, its log-probability written to
    ``log_probs[:, step]`` (a view of the caller's ``[rows, L]`` table)."""

    def choose(step: int, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        best = torch.log_softmax(logits.double(), dim=-1).max(dim=-1)
        log_probs[:, step] = best.values.cpu()
        return best.indices

    return choose


@dataclass
class TokenForcingScan:
    """Result of :func:`unconditional_token_forcing` for ``C`` forced tokens, best first.

    Attributes:
        tokens: ``[C]`` the forced tokens, ranked by ``scores`` (descending).
        continuations: ``[C, L]`` the greedy continuation of each.
        log_probs: ``[C, L]`` float64 log-probability of each continuation token.
        scores: ``[C]`` mean log-probability of the continuation (the forced log-likelihood per token).
    """

    tokens: torch.Tensor
    continuations: torch.Tensor
    log_probs: torch.Tensor
    scores: torch.Tensor


@torch.no_grad()
def unconditional_token_forcing(
    model: PreTrainedModel,
    *,
    candidate_tokens: Sequence[int] | torch.Tensor | None = None,
    prefix_ids: Sequence[int] | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 256,
    progress: bool = False,
) -> TokenForcingScan:
    """Unconditional token forcing: greedy continuations of every single token, ranked.

    Each candidate ``c`` is fed as ``prefix_ids + [c]`` (no prompt, no chat template) and continued
    greedily for ``max_new_tokens`` tokens; its score is the mean log-probability of that
    continuation. Hidden text (a fingerprint) planted by fine-tuning surfaces at the top: once its
    first token is forced, the model continues it with near-certainty.

    Args:
        model: a Hugging Face causal LM.
        candidate_tokens: the tokens to force (default: every id of the output vocabulary).
        prefix_ids: tokens before each candidate (default: ``[bos_token_id]`` of the model's
            generation config, or none).
        max_new_tokens: continuation length ``L`` (EOS does not stop it).
        batch_size: candidates per batched forward.
    """
    check_causal_lm("model", model)
    V = vocab_size(model)
    candidates = torch.arange(V) if candidate_tokens is None else torch.as_tensor(candidate_tokens).flatten()
    if (
        candidates.numel() == 0
        or candidates.is_floating_point()
        or bool(((candidates < 0) | (candidates >= V)).any())
    ):
        raise ValueError(f"`candidate_tokens` must be a non-empty list of token ids in [0, {V})")
    if prefix_ids is None:
        bos = model.generation_config.bos_token_id
        prefix_ids = [] if bos is None else [bos]
    embedded = model.get_input_embeddings().num_embeddings
    prefix = torch.tensor(
        [check_int(f"prefix_ids[{i}]", t, low=0, high=embedded - 1) for i, t in enumerate(prefix_ids)],
        dtype=torch.long,
    )
    L = check_int("max_new_tokens", max_new_tokens, low=1)
    check_int("batch_size", batch_size, low=1)
    check_bool("progress", progress)

    device = model_device(model)
    continuations = torch.empty(candidates.numel(), L, dtype=torch.long)
    log_probs = torch.empty(candidates.numel(), L, dtype=torch.float64)
    for lo in tqdm(range(0, candidates.numel(), batch_size), desc="token forcing", disable=not progress):
        chunk = candidates[lo : lo + batch_size].long()
        rows = slice(lo, lo + chunk.numel())
        ids = torch.cat([prefix.expand(chunk.numel(), -1), chunk[:, None]], dim=1).to(device)
        stream = CachedStream(model, ids, torch.ones_like(ids))
        greedy = _recording_greedy(log_probs[rows])
        sequences = decode_loop(stream, greedy, max_new_tokens=L, eos=[], pad_token_id=0)
        continuations[rows] = sequences[:, ids.shape[1] :].cpu()
    scores = log_probs.mean(dim=-1)
    order = torch.sort(scores, descending=True, stable=True).indices
    return TokenForcingScan(candidates[order], continuations[order], log_probs[order], scores[order])
