"""Self-Positioning: interpolation coefficients of task vectors learned by SGD on a probe set.

From *Improving General Text Embedding Model: Tackling Task Conflict and Data Imbalance through
Model Merging* (Li et al., 2024). With base parameters ``θ_0`` and task vectors ``τ_i = θ_i − θ_0``,
the merged model is ``θ(α) = θ_0 + Σ_i α_i τ_i``; only the ``n`` coefficients ``α`` are trained, by
stochastic gradient descent on a small *probe* set drawn from the tasks' data:

    α* = argmin_α  E_{batch ∈ probe} L(f(batch; θ_0 + Σ_i α_i τ_i))  +  λ ‖α‖²

(``λ`` = ``regularization``, 0 by default). The gradient ``∂L/∂α_i = ⟨∇_θ L, τ_i⟩`` flows through
``torch.func.functional_call``, so the model's own weights are never modified. The learned ``α``
are the ``weights`` of a task-arithmetic merge (:func:`~tokenlab.merging.merge_state_dicts`,
:func:`~tokenlab.merging.merge_checkpoints`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers.utils import ModelOutput

from tokenlab._checks import check_bool, check_int, check_number, check_positive

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[object, Batch], torch.Tensor]


def causal_lm_loss(outputs: ModelOutput, batch: Batch) -> torch.Tensor:
    """Default loss: the ``loss`` a Hugging Face model returns when the batch carries ``labels``."""
    return outputs.loss


@dataclass
class SelfPositioningResult:
    """Learned coefficients ``α`` (shape ``(n,)``) and the probe loss at every step."""

    coefficients: torch.Tensor
    losses: list[float]


def _floating_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters() if v.is_floating_point()}


def model_task_vectors(
    model: nn.Module, finetuned: Sequence[nn.Module | Mapping[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The base's floating parameters ``θ_0`` and the task vectors ``τ_i = θ_i − θ_0`` of ``finetuned``."""
    base = _floating_params(model)
    task_vectors = []
    for i, ft in enumerate(finetuned):
        sd = _floating_params(ft) if isinstance(ft, nn.Module) else ft
        missing = [k for k in base if k not in sd]
        if missing:
            raise ValueError(f"`finetuned[{i}]` lacks parameter(s) {missing[:3]}")
        for k, b in base.items():
            if sd[k].shape != b.shape:
                raise ValueError(
                    f"shape mismatch for {k!r}: base {tuple(b.shape)} vs model {i} {tuple(sd[k].shape)}"
                )
        task_vectors.append({k: sd[k].detach().to(b.dtype) - b for k, b in base.items()})
    return base, task_vectors


def merged_parameters(
    base: Mapping[str, torch.Tensor], task_vectors: Sequence[Mapping[str, torch.Tensor]], alpha: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``θ_0 + Σ_i α_i τ_i`` for every parameter (differentiable in ``alpha``)."""
    return {k: b + sum(a * tv[k] for a, tv in zip(alpha, task_vectors)) for k, b in base.items()}


def self_positioning(
    model: nn.Module,
    finetuned: Sequence[nn.Module | Mapping[str, torch.Tensor]],
    probe: Iterable[Batch],
    loss_fn: LossFn = causal_lm_loss,
    *,
    steps: int = 50,
    lr: float = 0.1,
    momentum: float = 0.9,
    init: Sequence[float] | None = None,
    regularization: float = 0.0,
    progress: bool = False,
) -> SelfPositioningResult:
    """Learn the interpolation coefficients ``α`` of the task vectors of ``finetuned`` w.r.t. ``model``.

    Args:
        model: the base model ``θ_0`` (left unchanged).
        finetuned: ``n`` fine-tuned models (or their state dicts) of the same architecture.
        probe: the probe set, a (re-iterable) collection of keyword-argument batches for ``model``
            (e.g. ``{"input_ids": ids, "labels": ids}``); cycled through for ``steps`` steps.
        loss_fn: ``loss_fn(outputs, batch) -> scalar``; default: ``outputs.loss``.
        steps, lr, momentum: SGD on ``α``.
        init: starting coefficients (default uniform, ``1/n`` each).
        regularization: ``λ`` of the ``λ ‖α‖²`` penalty.
        progress: tqdm bar.

    Returns:
        :class:`SelfPositioningResult` with ``coefficients`` (float32, ``(n,)``) and per-step losses.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(finetuned, (nn.Module, Mapping)) or not finetuned:
        raise TypeError("`finetuned` must be a non-empty sequence of models or state dicts")
    steps = check_int("steps", steps, low=1)
    lr = check_positive("lr", lr)
    momentum = check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
    regularization = check_number("regularization", regularization, low=0.0)  # λ of λ‖α‖²
    progress = check_bool("progress", progress)
    probe = list(probe)
    if not probe or not all(isinstance(b, Mapping) for b in probe):
        raise ValueError("`probe` must be a non-empty collection of keyword-argument batches (mappings)")
    n = len(finetuned)
    base, task_vectors = model_task_vectors(model, finetuned)
    start = [1.0 / n] * n if init is None else list(init)
    if len(start) != n:
        raise ValueError(f"`init` must have {n} entries, got {len(start)}")
    device = next(iter(base.values())).device
    alpha = torch.tensor(start, dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.SGD([alpha], lr=lr, momentum=momentum)
    losses: list[float] = []
    batches = itertools.cycle(probe)
    for _ in tqdm(range(steps), desc="self-positioning", disable=not progress, leave=False):
        batch = next(batches)
        params = merged_parameters(base, task_vectors, alpha)
        loss = loss_fn(functional_call(model, params, args=(), kwargs=dict(batch)), batch)
        total = loss + regularization * alpha.square().sum()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(loss.item())
    return SelfPositioningResult(alpha.detach().cpu(), losses)


@torch.no_grad()
def probe_loss(
    model: nn.Module,
    finetuned: Sequence[nn.Module | Mapping[str, torch.Tensor]],
    coefficients: Sequence[float] | torch.Tensor,
    probe: Iterable[Batch],
    loss_fn: LossFn = causal_lm_loss,
) -> float:
    """Mean ``loss_fn`` over ``probe`` of the model ``θ_0 + Σ_i α_i τ_i`` with ``α = coefficients``."""
    alpha = torch.as_tensor(coefficients, dtype=torch.float32)
    if alpha.dim() != 1 or alpha.numel() != len(finetuned):
        raise ValueError(
            f"`coefficients` must hold one number per fine-tuned model ({len(finetuned)}), "
            f"got shape {tuple(alpha.shape)}"
        )
    probe = list(probe)
    if not probe:
        raise ValueError("`probe` must be a non-empty collection of keyword-argument batches")
    base, tvs = model_task_vectors(model, finetuned)
    params = merged_parameters(base, tvs, alpha)
    values = [loss_fn(functional_call(model, params, args=(), kwargs=dict(b)), b).item() for b in probe]
    return sum(values) / len(values)
