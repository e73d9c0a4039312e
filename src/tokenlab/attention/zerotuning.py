"""ZeroTuning: training-free, head-specific scaling of the attention on the initial token.

*ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language Models Without Training*
(Han et al.). In head ``h`` the weight ``a_0`` of the initial token is multiplied by ``γ_h`` and the row
renormalised,

    a'_0 = γ a_0 / D,   a'_j = a_j / D,   D = (γ − 1) a_0 + 1,

which keeps the proportions among the other tokens: ``γ > 1`` flattens them, ``γ < 1`` sharpens them.
It equals adding ``log γ_h`` to the initial token's logit, which is how the fused kernel applies it
(``initial_token_scale``).

* :func:`initial_token_scaling` — a context manager applying ``γ`` (one number, ``[Hq]`` or
  ``[L, Hq]``) to a Hugging Face model: on the ``"tokenlab"`` implementation through each layer's
  ``tokenlab_initial_token_scale`` (the fused kernel's flag); on any other implementation by running
  eager attention with the multiply-and-renormalise step above for the duration.
* :func:`zerotuning_calibrate` — calibration after the paper's: profile each head (or layer group)
  under a grid of ``γ`` on a few examples (the paper's head profiling), with the paper's two
  objectives — accuracy on labelled examples (supervised mode) or the output entropy (unsupervised
  mode) — then keep the groups whose objective improves and combine them greedily, each kept only if
  the joint objective improves. That selection-and-combination rule is tokenlab's: the paper's own
  selection step (how it turns the profile into one setting) was not available to check against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from tokenlab._checks import check_bool, check_choice, check_positive, check_tensor
from tokenlab.attention.hf import (
    ATTN_IMPLEMENTATION,
    attention_implementation,
    attention_modules,
    check_pretrained_model,
    set_layer_flag,
)

__all__ = [
    "DEFAULT_GRID",
    "ZEROTUNING_EAGER",
    "ZeroTuningCalibration",
    "initial_token_scaling",
    "zerotuning_calibrate",
    "zerotuning_objective",
]

ZEROTUNING_EAGER = "tokenlab_zerotuning_eager"  # the eager fallback's attention implementation
GAMMA_ATTR = "tokenlab_zerotuning_gamma"  # γ [Hq] of a layer for the eager fallback
DEFAULT_GRID = (0.5, 0.7, 0.85, 1.2, 1.5, 2.0)
MODES = ("kernel", "eager")


def zerotuning_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with ZeroTuning's step: ``P [B, Hq, T, S]`` from the softmax, then column 0
    multiplied by the layer's ``γ`` and every row renormalised. Returns ``(out [B, T, Hq, D], P')``.
    Sliding windows and padding come with the (eager) mask; models with learned sinks are refused."""
    if kwargs.get("s_aux") is not None:
        raise ValueError(
            "the ZeroTuning eager fallback does not support learned sinks (s_aux); use mode='kernel'"
        )
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (
        query.shape[-1] ** -0.5 if scaling is None else scaling
    )
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    gamma = getattr(module, GAMMA_ATTR, None)
    if gamma is not None:
        a0, g = probs[..., :1], gamma.to(probs)[None, :, None, None]
        probs = torch.cat([g * a0, probs[..., 1:]], dim=-1) / ((g - 1.0) * a0 + 1.0)
    probs = torch.nn.functional.dropout(probs.to(query.dtype), p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _register_eager_fallback() -> None:
    """Register :data:`ZEROTUNING_EAGER` with transformers (idempotent), when the fallback is used:
    importing this module leaves transformers' process-wide registries alone."""
    AttentionInterface.register(ZEROTUNING_EAGER, zerotuning_eager_attention)
    AttentionMaskInterface.register(ZEROTUNING_EAGER, eager_mask)


def _gamma_table(model: PreTrainedModel, gamma: float | torch.Tensor) -> tuple[list[nn.Module], torch.Tensor]:
    """The attention modules and ``γ`` as ``[L, Hq]`` float32 (validated: finite, > 0)."""
    modules = attention_modules(check_pretrained_model(model))
    L, H = len(modules), modules[0].config.num_attention_heads
    if isinstance(gamma, torch.Tensor):
        check_tensor("gamma", gamma, floating=True)
        table = gamma.detach().float().cpu()
    else:
        table = torch.tensor(check_positive("gamma", gamma))
    if (
        table.dim() > 2
        or (table.dim() >= 1 and table.shape[-1] != H)
        or (table.dim() == 2 and table.shape[0] != L)
    ):
        raise ValueError(
            f"`gamma` must be a number, [Hq] = [{H}] or [L, Hq] = [{L}, {H}], got {tuple(table.shape)}"
        )
    if not bool((torch.isfinite(table) & (table > 0)).all()):
        raise ValueError("`gamma` must be finite and > 0 (it multiplies the weight of the initial token)")
    return modules, table.expand(L, H).clone()


@contextmanager
def initial_token_scaling(
    model: PreTrainedModel, gamma: float | torch.Tensor, *, mode: str | None = None
) -> Iterator[PreTrainedModel]:
    """Scale the attention on the initial token by ``γ`` per head while the context is open.

    Args:
        model: a causal LM whose attention modules have ``q_proj`` (Llama, Qwen2, Mistral, …).
        gamma: ``γ > 0`` — one number for every head, ``[Hq]`` for every layer, or ``[L, Hq]``.
        mode: ``"kernel"`` — the ``"tokenlab"`` implementation's fused ``initial_token_scale`` (the
            model must use ``attn_implementation="tokenlab"``; the flag is added to each layer's other
            flags and the previous value restored on exit); ``"eager"`` — the model runs the
            multiply-and-renormalise eager attention :data:`ZEROTUNING_EAGER` for the duration.
            Default: ``"kernel"`` when the model uses ``"tokenlab"``, else ``"eager"``.

    Yields the model. Nothing is trained and no weight changes; on exit the model is as before.
    """
    modules, table = _gamma_table(model, gamma)
    implementation = model.config._attn_implementation
    if mode is None:
        mode = "kernel" if implementation == ATTN_IMPLEMENTATION else "eager"
    check_choice("mode", mode, MODES)
    if mode == "kernel" and implementation != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"mode='kernel' needs attn_implementation={ATTN_IMPLEMENTATION!r}, got {implementation!r}; "
            "use mode='eager'"
        )
    attr = "tokenlab_initial_token_scale"
    previous = [getattr(m, attr if mode == "kernel" else GAMMA_ATTR, None) for m in modules]
    for module, row in zip(modules, table):
        row = row.to(module.q_proj.weight.device)
        if mode == "kernel":
            set_layer_flag(module, "initial_token_scale", row)
        else:
            setattr(module, GAMMA_ATTR, row)
    try:
        if mode == "eager":
            _register_eager_fallback()
            with attention_implementation(model, ZEROTUNING_EAGER):
                yield model
        else:
            yield model
    finally:
        for module, value in zip(modules, previous):
            if mode == "kernel":
                set_layer_flag(module, "initial_token_scale", value)
            else:
                setattr(module, GAMMA_ATTR, value)


def _check_task(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    candidates: torch.Tensor | None,
    labels: torch.Tensor | None,
) -> None:
    """The calibration task: prompts ``[N, T]`` (T ≥ 1), answer options ``[C]`` among the model's
    ``V`` output logits, labels ``[N]`` indexing the options (given only with them)."""
    check_tensor("input_ids", input_ids, ndim=2, integer=True)
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(
            f"`input_ids` must hold at least one prompt of one token, got {tuple(input_ids.shape)}"
        )
    if candidates is not None:
        check_tensor("candidates", candidates, ndim=1, integer=True)
        V = model.config.get_text_config(decoder=True).vocab_size  # the width of the logits
        if candidates.numel() < 1 or not bool(((candidates >= 0) & (candidates < V)).all()):
            raise ValueError(f"`candidates` must be a non-empty [C] of token ids in [0, {V})")
    if labels is not None:
        if candidates is None:
            raise ValueError("`labels` index into `candidates`: give both for the supervised mode")
        check_tensor("labels", labels, ndim=1, integer=True)
        if labels.shape[0] != input_ids.shape[0] or not bool(
            ((labels >= 0) & (labels < len(candidates))).all()
        ):
            raise ValueError(f"`labels` must be [N] = [{input_ids.shape[0]}] indices into `candidates`")


@torch.no_grad()
def _objective(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    candidates: torch.Tensor | None,
    labels: torch.Tensor | None,
) -> float:
    """:func:`zerotuning_objective` on checked arguments (the calibration's per-setting evaluation)."""
    logits = model(input_ids, use_cache=False).logits[:, -1].float()
    if candidates is not None:
        logits = logits[:, candidates]
    logp = logits.log_softmax(dim=-1)
    if labels is None:
        return (logp.exp() * logp).sum(dim=-1).mean().item()
    correct = logp.gather(1, labels[:, None]).squeeze(1)
    accuracy = (logp.argmax(dim=-1) == labels).float().mean()
    return (accuracy + 1e-3 * correct.mean()).item()


def zerotuning_objective(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    candidates: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> float:
    """The calibration objective on prompts ``input_ids [N, T]`` (rows of equal length), from the
    next-token distribution at the last position restricted to ``candidates [C]`` (token ids of the
    answer options; default the whole vocabulary). Higher is better:

    * supervised (``labels [N]``, indices into ``candidates``): accuracy, with ties broken by the mean
      log-probability of the correct option (``accuracy + 10⁻³ · mean log p``, so that a flat accuracy
      still ranks the settings);
    * unsupervised (no ``labels``): minus the mean entropy of the distribution (ZeroTuning's
      unsupervised mode minimises the output entropy).

    Raises ``TypeError``/``ValueError`` naming the argument before running the model.
    """
    _check_task(check_pretrained_model(model), input_ids, candidates, labels)
    return _objective(model, input_ids, candidates, labels)


@dataclass(frozen=True)
class ZeroTuningCalibration:
    """The result of :func:`zerotuning_calibrate`.

    Attributes:
        gamma: ``[L, Hq]`` — the chosen ``γ`` (1 where a head is left alone).
        baseline: the objective without scaling (``γ = 1``).
        score: the objective with ``gamma``.
        groups: the head groups calibrated together, each a list of ``(layer, head)``.
        profile: ``[G, len(grid)]`` — the objective with one group scaled by each grid ``γ``.
        grid: the ``γ`` values tried.
    """

    gamma: torch.Tensor
    baseline: float
    score: float
    groups: list[list[tuple[int, int]]]
    profile: torch.Tensor
    grid: tuple[float, ...]


def _groups(spec: str | Sequence[Sequence[tuple[int, int]]], L: int, H: int) -> list[list[tuple[int, int]]]:
    if isinstance(spec, str):
        check_choice("groups", spec, ("head", "layer"))
        if spec == "head":
            return [[(layer, head)] for layer in range(L) for head in range(H)]
        return [[(layer, head) for head in range(H)] for layer in range(L)]
    groups = [list(map(tuple, group)) for group in spec]
    if not groups or not all(group for group in groups):
        raise ValueError(
            "`groups` must be 'head', 'layer' or a non-empty list of non-empty (layer, head) lists"
        )
    for group in groups:
        for layer, head in group:
            if not (0 <= layer < L and 0 <= head < H):
                raise ValueError(f"`groups` names head ({layer}, {head}) outside {L} layers × {H} heads")
    return groups


def zerotuning_calibrate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    candidates: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    groups: str | Sequence[Sequence[tuple[int, int]]] = "head",
    mode: str | None = None,
    progress: bool = False,
) -> ZeroTuningCalibration:
    """ZeroTuning's calibration of head-specific ``γ`` on a few examples, without training.

    1. *Head profiling* (the paper's): for every group (a head, a layer's heads, or the given groups)
       and every ``γ`` in ``grid``, the objective (:func:`zerotuning_objective`) with only that group
       scaled.
    2. *Selection* (tokenlab's rule): the groups whose best ``γ`` beats the unscaled objective, each
       with that ``γ`` (``γ > 1`` for heads that gain from more attention on the initial token,
       ``γ < 1`` otherwise — the paper finds both kinds, and stronger effects in early layers).
    3. *Combination* (tokenlab's rule): the selected groups are added greedily, best first, each kept
       only if the objective of the joint setting improves — so the result never scores below the
       baseline on the calibration examples.

    Supervised mode (``labels`` given): accuracy on the labelled examples; unsupervised mode: output
    entropy (minimised). ``len(groups) × len(grid) + len(selected)`` forward passes of the batch.

    Args:
        model: the causal LM (see :func:`initial_token_scaling` for ``mode``).
        input_ids: ``[N, T]`` prompts whose next token is the answer (rows of equal length).
        candidates: ``[C]`` token ids of the answer options (default: the whole vocabulary).
        labels: ``[N]`` indices into ``candidates`` of the correct answers (supervised mode).
        grid: ``γ`` values to try (> 0; 1 is the baseline and is skipped).
        groups: ``"head"`` (per head), ``"layer"`` (one ``γ`` per layer) or explicit groups.
        progress: a tqdm bar over the profiling.

    Returns:
        A :class:`ZeroTuningCalibration`; apply it with ``initial_token_scaling(model, result.gamma)``.
    """
    modules, _ = _gamma_table(model, 1.0)
    L, H = len(modules), modules[0].config.num_attention_heads
    _check_task(model, input_ids, candidates, labels)
    grid = tuple(check_positive(f"grid[{i}]", g) for i, g in enumerate(grid))
    grid = tuple(g for g in grid if g != 1.0)
    if not grid:
        raise ValueError("`grid` must hold at least one γ ≠ 1")
    check_bool("progress", progress)
    head_groups = _groups(groups, L, H)

    def objective(gamma: torch.Tensor) -> float:
        with initial_token_scaling(model, gamma, mode=mode):
            return _objective(model, input_ids, candidates, labels)

    baseline = objective(torch.ones(L, H))
    profile = torch.empty(len(head_groups), len(grid))
    bar = tqdm(total=profile.numel(), desc="ZeroTuning: profiling heads", disable=not progress, leave=False)
    for g, group in enumerate(head_groups):
        rows, cols = zip(*group)
        for k, value in enumerate(grid):
            gamma = torch.ones(L, H)
            gamma[list(rows), list(cols)] = value
            profile[g, k] = objective(gamma)
            bar.update()
    bar.close()

    best, best_k = profile.max(dim=1)
    chosen, score = torch.ones(L, H), baseline
    for g in sorted(range(len(head_groups)), key=lambda g: -best[g].item()):
        if best[g] <= baseline:
            break
        trial = chosen.clone()
        rows, cols = zip(*head_groups[g])
        trial[list(rows), list(cols)] = grid[best_k[g]]
        trial_score = objective(trial)
        if trial_score > score:
            chosen, score = trial, trial_score
    return ZeroTuningCalibration(chosen, baseline, score, head_groups, profile, grid)
