"""Counterfactual token generation with the Gumbel-Max structural causal model.

*Counterfactual Token Generation in Large Language Models* (Chatzi et al., 2025) models sampling as
a structural causal model: the token at response position ``i`` is

    y_i = argmax_v  [ log p_warped(v | prompt, y_<i) + U_{i,v} ],    U_{i,v} ~ Gumbel(0, 1) i.i.d.

which draws ``y_i`` from the warped distribution ``p_warped`` (Gumbel-Max trick), with all the
randomness in the exogenous noise ``U``. Recording the noise with the sample makes the generation
replayable: after an *intervention* — replacing the token at position ``t``, or changing the prompt
(e.g. the context) — the same noise regenerates the positions the intervention can affect, giving
the counterfactual text ("what would the model have written had …"). Positions before ``t`` are
unchanged; with no intervention the text is identical.

The noise of a position is indexed by **vocabulary id** (the paper's "top-p token" / "top-k token"
samplers): ``U_{i,v}`` belongs to token ``v`` whatever its rank, so when an intervention changes the
distribution (and the order of the tokens in it) each token keeps its own noise. Temperature /
top-k / top-p act on the logits before the argmax (``tokenlab.kernels.warping.Warping``); tokens
they remove have ``log p = −∞``.

The noise is recorded as its seed stream: row ``b`` has a seed ``s_b`` and position ``i`` the
Gumbel vector drawn on CPU (float64) from a generator seeded with a 64-bit mix of ``(s_b, i)``, so
it is the same on every device and costs ``O(V)`` per token to re-create (:func:`gumbel_noise`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from tokenlab._checks import check_int, check_tensor
from tokenlab.decoding.incremental import (
    CachedStream,
    check_causal_lm,
    check_prompts,
    decode_loop,
    eos_token_ids,
    model_device,
    pad_token_id_for,
    vocab_size,
)
from tokenlab.kernels.warping import Warping

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _gumbel_noise(
    seeds: torch.Tensor, position: int, vocab_size: int, dtype: torch.dtype, device: torch.device | str | None
) -> torch.Tensor:
    rows = []
    for seed in seeds.tolist():
        generator = torch.Generator().manual_seed(_splitmix64(_splitmix64(seed) ^ position))
        rows.append(torch.rand(vocab_size, generator=generator, dtype=torch.float64))
    return (-(-torch.stack(rows).log()).log()).to(device=device, dtype=dtype)


def gumbel_noise(
    seeds: torch.Tensor,
    position: int,
    vocab_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The Gumbel(0, 1) noise ``U_{position, ·}`` of each row: ``seeds [R]`` (int64) → ``[R, vocab_size]``.

    ``U = −log(−log u)`` with ``u ~ U[0, 1)`` drawn in float64 on CPU from a generator seeded with
    ``splitmix64(splitmix64(seed) ⊕ position)``, then cast to ``dtype`` on ``device``: a pure function
    of ``(seed, position, vocabulary id)``.
    """
    check_tensor("seeds", seeds, ndim=1, integer=True)
    if bool((seeds < 0).any()):
        raise ValueError("`seeds` must be non-negative")
    check_int("position", position, low=0)
    check_int("vocab_size", vocab_size, low=1)
    return _gumbel_noise(seeds, position, vocab_size, dtype, device)


def gumbel_max_choice(warped_logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The Gumbel-Max SCM's token: ``argmax_v (warped_logits_v + noise_v)``; ``[R, V]`` → ``[R]``.

    With ``noise`` i.i.d. Gumbel(0, 1) the result is distributed as ``softmax(warped_logits)``.
    """
    return (warped_logits + noise).argmax(dim=-1)


@dataclass
class GumbelSample:
    """A generation with its exogenous noise, replayable by :func:`counterfactual_generate`.

    ``sequences [B, P + N]``: the prompts as given, then the generated tokens (padded after EOS);
    ``attention_mask [B, P]``: the prompts' left-padding mask (given, or inferred from the pad id);
    ``seeds [B]``: each row's noise seed (position ``i`` of row ``b`` used :func:`gumbel_noise`
    ``(seeds[b], i)``); the warping and stop settings of the run; ``max_new_tokens``: the budget a
    replay uses.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    seeds: torch.Tensor
    warping: Warping
    eos_token_ids: list[int]
    pad_token_id: int
    max_new_tokens: int

    @property
    def prompt_length(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def prompt_ids(self) -> torch.Tensor:
        """``[B, P]``."""
        return self.sequences[:, : self.prompt_length]

    @property
    def new_tokens(self) -> torch.Tensor:
        """``[B, N]`` the generated tokens (position ``i`` of the SCM is column ``i``)."""
        return self.sequences[:, self.prompt_length :]


def _seeds(seed: int | Sequence[int] | torch.Tensor, batch: int) -> torch.Tensor:
    """``[B]`` int64 seeds in ``[0, 2**63)``: ``seed + b`` for an int, else one given per row."""
    high = (1 << 63) - 1
    if isinstance(seed, torch.Tensor):
        values = check_tensor("seed", seed, ndim=1, integer=True).tolist()
    elif isinstance(seed, Sequence):
        values = list(seed)
    else:
        start = check_int("seed", seed, low=0, high=high + 1 - batch)
        values = list(range(start, start + batch))
    if len(values) != batch:
        raise ValueError(f"`seed` must be an int or hold one seed per prompt ({batch}), got {len(values)}")
    return torch.tensor([check_int(f"seed[{i}]", v, low=0, high=high) for i, v in enumerate(values)])


def _run(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    seeds: torch.Tensor,
    warping: Warping,
    eos: list[int],
    pad: int,
    max_new_tokens: int,
    forced: torch.Tensor | None,
) -> GumbelSample:
    """The SCM's loop; ``forced [B, F]`` (the intervention) fixes the tokens of the first ``F`` positions."""
    stream = CachedStream(model, input_ids, mask)

    def choose(step: int, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        if forced is not None and step < forced.shape[1]:
            return forced[:, step]
        noise = _gumbel_noise(seeds, step, logits.shape[-1], logits.dtype, logits.device)
        return gumbel_max_choice(warping.logits(logits), noise)

    sequences = decode_loop(stream, choose, max_new_tokens=max_new_tokens, eos=eos, pad_token_id=pad)
    return GumbelSample(sequences, mask, seeds, warping, eos, pad, max_new_tokens)


@torch.no_grad()
def gumbel_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    seed: int | Sequence[int] | torch.Tensor = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> GumbelSample:
    """Sample with the Gumbel-Max SCM, recording the noise (its seeds) for counterfactual replay.

    Args:
        model: an HF causal LM (full-attention cache layers).
        input_ids: ``[B, P]`` prompts, left-padded when ``attention_mask [B, P]`` is given.
        max_new_tokens: tokens per sequence (fewer when it emits an EOS).
        seed: an int ``s`` (row ``b`` gets seed ``s + b``) or one non-negative seed per row.
        temperature, top_k, top_p: the warping (:class:`tokenlab.kernels.warping.Warping`).
        eos_token_id: id(s) that end a sequence (kept); ``None``: the model's generation config.
        pad_token_id: fills a sequence after its EOS (default: generation config, first EOS, 0).

    Returns:
        :class:`GumbelSample`. Each token is distributed as the warped ``softmax`` of the model's
        logits (the Gumbel-Max trick), i.e. as ``generate(do_sample=True)`` samples.
    """
    model = check_causal_lm("model", model)
    input_ids, mask = check_prompts(model, input_ids, attention_mask)
    check_int("max_new_tokens", max_new_tokens, low=1)
    seeds = _seeds(seed, input_ids.shape[0])
    warping = Warping(True, temperature, top_k, top_p)
    eos = eos_token_ids(model, eos_token_id)
    pad = pad_token_id_for(model, pad_token_id, eos)
    return _run(model, input_ids, mask, seeds, warping, eos, pad, max_new_tokens, None)


@torch.no_grad()
def counterfactual_generate(
    model: PreTrainedModel,
    factual: GumbelSample,
    *,
    position: int | None = None,
    token: int | torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> GumbelSample:
    """Regenerate ``factual`` under an intervention, with the same Gumbel noise.

    Interventions (either or both):

    * **token**: ``position = t`` and ``token`` (an id, or ``[B]`` ids): the generated tokens before
      ``t`` are kept, position ``t`` is set to ``token``, positions after ``t`` are resampled with
      their recorded noise. A row that ended (EOS) before ``t`` stays as it was.
    * **prompt**: ``input_ids`` ``[B, P']`` (left-padded with ``attention_mask``), e.g. the prompt
      with its context changed: every position is resampled with its recorded noise.

    With neither, the factual text is reproduced exactly. ``model`` must be the factual model (or the
    intervened-upon one, for a model intervention); warping, stop tokens, seeds and the token budget
    come from ``factual``. Returns a :class:`GumbelSample` (replayable in turn).
    """
    model = check_causal_lm("model", model)
    if not isinstance(factual, GumbelSample):
        raise TypeError(
            f"`factual` must be a GumbelSample (from gumbel_generate), got {type(factual).__name__}"
        )
    device = model_device(model)
    batch = factual.sequences.shape[0]
    if input_ids is None:
        if attention_mask is not None:
            raise ValueError("`attention_mask` goes with `input_ids` (a new prompt)")
        input_ids, mask = factual.prompt_ids, factual.attention_mask
    else:
        input_ids, mask = check_prompts(model, input_ids, attention_mask)
        if input_ids.shape[0] != batch:
            raise ValueError(
                f"`input_ids` must have {batch} rows (one per factual sequence), got {input_ids.shape[0]}"
            )
    forced = None
    if (position is None) != (token is None):
        raise ValueError("`position` and `token` go together (a token intervention needs both)")
    if position is not None:
        generated = factual.new_tokens
        check_int("position", position, low=0, high=generated.shape[1] - 1)
        if isinstance(token, torch.Tensor):
            check_tensor("token", token, ndim=1, integer=True)
            if token.shape[0] != batch:
                raise ValueError(f"`token` must hold {batch} ids, got {token.shape[0]}")
            token = token.to(device=device, dtype=torch.long)
        else:
            token = torch.full((batch,), check_int("token", token, low=0), dtype=torch.long, device=device)
        vocab = vocab_size(model)
        if bool(((token < 0) | (token >= vocab)).any()):
            raise ValueError(f"`token` ids must be in [0, {vocab})")
        forced = torch.cat([generated[:, :position], token.view(-1, 1)], dim=1)
    return _run(
        model, input_ids, mask, factual.seeds, factual.warping, factual.eos_token_ids, factual.pad_token_id,
        factual.max_new_tokens, forced,
    )  # fmt: skip
