"""Merge methods on one tensor, behind one registry, streamed in row blocks.

Every method merges one parameter tensor of a *base* model with the same tensor of ``n``
fine-tuned models. Methods built on task vectors work on ``τ_i = θ_i − θ_base`` (*Editing Models
with Task Arithmetic*) and return ``θ_base + merge(τ_1 … τ_n)``; they share these mechanisms, each
with one home here:

* **sparsify** — :func:`magnitude_thresholds` + :func:`trim_` (keep the top ``density`` fraction of
  each task vector by magnitude) or :func:`dare_masks` + :func:`drop_and_rescale_` (DARE: keep each
  entry with probability ``density``, divide by ``density``);
* **elect sign** — :func:`elect_sign` (TIES: the sign of ``Σ_i τ_i`` ("total") or of ``Σ_i sign(τ_i)``
  ("frequency"), as in PEFT's ``calculate_majority_sign_mask``);
* **combine** — the weighted sum ``Σ_i w_i τ_i`` or :func:`disjoint_mean_` over the entries that agree
  with the elected sign.

Methods read their inputs through :class:`MergeInputs`, row block by row block (blocks of about
:data:`BLOCK_ELEMENTS` entries along the first dimension), and yield the merged blocks. Whole-tensor
quantities (trim thresholds, DARE masks, SLERP's angle) are computed first, blockwise; everything
else is elementwise. So a checkpoint merge never holds more than one block of the ``n`` task
vectors, plus one float32 copy of the tensor (trim threshold) or ``n`` boolean masks (DARE), and
the result does not depend on the block size. A new method is one generator function
``fn(inputs, weights, *, **params)`` registered with :func:`register_merge_method`, which declares its
parameters (:class:`~tokenlab.merging.registry.Param`, shared ones such as :data:`DENSITY` declared
once below) and how many models it takes; :func:`merge_tensors` dispatches by name, validates input
against the declarations and concatenates the blocks.

Conventions follow ``peft.utils.merge_utils`` (the tests' oracle): trimming is per tensor with
``k = int(density · numel)`` (entries tied with the k-th magnitude are all kept, where ``topk`` picks
arbitrarily among them); in TIES the sign is elected on the unweighted trimmed task vectors and the
disjoint mean divides the weighted sum by the number of agreeing entries. Computation is in float32
(float64 for float64 inputs); results have the base tensor's dtype.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from tokenlab._checks import (
    check_choice,
    check_int,
    check_number,
    check_probability,
    check_tensor,
)
from tokenlab.merging.registry import (
    MergeMethod,
    Param,
    Target,
    check_with,
    merge_method,
    register_merge_method,
)

SIGN_METHODS = ("total", "frequency")
BLOCK_ELEMENTS = 1 << 20  # entries per row block (per model)

ReadRows = Callable[[int, int], torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class MergeInputs:
    """One tensor of the base and of ``n`` fine-tuned models, readable by rows (first dimension).

    ``read_base(a, b)`` / ``read_models[i](a, b)`` return rows ``a:b``; 0-d tensors are read as one
    row of shape ``(1,)``. :meth:`from_tensors` wraps in-memory tensors; checkpoint merges read
    from safetensors files.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read_base: ReadRows
    read_models: tuple[ReadRows, ...]
    block_elements: int = BLOCK_ELEMENTS

    @classmethod
    def from_tensors(cls, base: torch.Tensor, finetuned: Sequence[torch.Tensor], name: str = "tensor"):
        def rows(t: torch.Tensor) -> ReadRows:
            t = t.reshape(1) if t.dim() == 0 else t
            return lambda a, b: t[a:b]

        return cls(name, tuple(base.shape), base.dtype, rows(base), tuple(rows(t) for t in finetuned))

    @property
    def n(self) -> int:
        return len(self.read_models)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.dtype)

    def blocks(self) -> list[tuple[int, int]]:
        """Row ranges ``(a, b)`` of about ``block_elements`` entries each, in order."""
        rows = self.shape[0] if self.shape else 1
        step = max(1, self.block_elements // max(1, math.prod(self.shape[1:])))
        return [(a, min(a + step, rows)) for a in range(0, rows, step)] or [(0, 0)]  # (0, …): one empty

    def base_rows(self, a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` of the base, a fresh tensor in the compute dtype."""
        return self.read_base(a, b).to(self.compute_dtype, copy=True)

    def task_vector(self, i: int, a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` of ``τ_i = θ_i − θ_base`` in the compute dtype."""
        return self.read_models[i](a, b).to(self.compute_dtype, copy=True).sub_(self.read_base(a, b))

    def task_vectors(self, a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` of all task vectors, stacked: shape ``(n, b − a, *shape[1:])``."""
        base = self.read_base(a, b)
        tau = torch.empty((self.n, *base.shape), dtype=self.compute_dtype)
        for row, read in zip(tau, self.read_models):
            row.copy_(read(a, b)).sub_(base)
        return tau


# ------------------------------------------------------------------------------------ mechanisms
def magnitude_thresholds(inputs: MergeInputs, density: float) -> list[float]:
    """Per model, the magnitude ``|τ_i|`` of rank ``k = int(density · numel)`` (largest first), found
    with an in-place partition of one buffer of ``|τ_i|`` filled block by block:
    TIES' trim keeps the entries with ``|τ_i| ≥`` it (``-inf``: keep all; ``+inf``: keep none)."""
    numel = inputs.numel
    k = int(density * numel)
    if k >= numel:
        return [-math.inf] * inputs.n
    if k == 0:
        return [math.inf] * inputs.n
    magnitude = torch.empty(numel, dtype=inputs.compute_dtype)
    thresholds = []
    for i in range(inputs.n):
        offset = 0
        for a, b in inputs.blocks():
            block = inputs.task_vector(i, a, b).abs_().reshape(-1)
            magnitude[offset : offset + block.numel()] = block
            offset += block.numel()
        # k-th largest = (numel − k)-th smallest; numpy's in-place partition needs no index buffer
        # (torch.kthvalue copies the values and allocates int64 indices: 3× the memory)
        values = magnitude.numpy()
        values.partition(numel - k)
        thresholds.append(float(values[numel - k]))
    return thresholds


def trim_(tau: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """TIES *trim*, in place: zero the entries of each ``tau[i]`` with ``|τ_i| <`` ``thresholds[i]``."""
    for row, threshold in zip(tau, thresholds):
        row.mul_(row.abs() >= threshold)
    return tau


def dare_masks(
    inputs: MergeInputs,
    density: float,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """DARE keep-masks: ``n`` independent Bernoulli(``density``) draws of the tensor's shape (True =
    keep), shape ``(n, *shape)``, boolean.

    Drawn with ``torch.bernoulli`` on ``dtype`` (default: the compute dtype) one model after the
    other, block by block — the same stream as one draw per model, and as PEFT's ``random_pruning``,
    so a generator seeded like the global RNG reproduces PEFT's masks.
    """
    dtype = dtype or inputs.compute_dtype
    masks = torch.empty((inputs.n, *(inputs.shape or (1,))), dtype=torch.bool)
    for row in masks:
        for a, b in inputs.blocks():
            p = torch.full((b - a, *row.shape[1:]), float(density), dtype=dtype)
            row[a:b] = torch.bernoulli(p, generator=generator)
    return masks


def drop_and_rescale_(tau: torch.Tensor, density: float, masks: torch.Tensor) -> torch.Tensor:
    """DARE, in place: ``τ̃_i = m_i ⊙ τ_i / density`` with keep-masks ``m_i``."""
    return tau.mul_(masks).div_(density)


def elect_sign(tau: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES *elect sign*: boolean mask (shape of ``tau``) of the entries whose sign is the elected one.

    The elected sign is ``sign(Σ_i τ_i)`` for ``"total"`` (the sign of greater total magnitude, as
    in the paper) or ``sign(Σ_i sign(τ_i))`` for ``"frequency"``; ties elect ``+``. Zero (trimmed)
    entries never agree.
    """
    score = tau.sum(0) if method == "total" else tau.sign().sum(0)
    return torch.where(score >= 0, tau > 0, tau < 0)


def disjoint_mean_(weighted_tau: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES *disjoint merge* (overwrites ``weighted_tau``): mean over the models that agree with the
    elected sign, ``Σ_{i∈A} w_i τ_i / |A|`` (0 where ``A`` is empty)."""
    count = agree.sum(0, dtype=weighted_tau.dtype).clamp_(min=1)
    return weighted_tau.mul_(agree).sum(0).div_(count)


def weight_(tau: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """In place: ``τ_i ← w_i τ_i``."""
    return tau.mul_(weights.to(tau.dtype).view(-1, *([1] * (tau.dim() - 1))))


def _dare_blocks(
    inputs: MergeInputs, density: float, generator: torch.Generator | None, masks: torch.Tensor | None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(a, b, τ̃)``: rows ``a:b`` of the dropped-and-rescaled task vectors, block by block, with the
    given ``masks`` or masks drawn from ``generator``."""
    if masks is None:
        masks = dare_masks(inputs, density, generator)
    masks = masks.reshape(inputs.n, -1, *inputs.shape[1:])
    for a, b in inputs.blocks():
        yield a, b, drop_and_rescale_(inputs.task_vectors(a, b), density, masks[:, a:b])


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """The generator that draws the DARE masks of tensor ``name`` in a merge seeded with ``seed``
    (independent of the order tensors are visited in, so streaming and in-memory merges agree)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


# ------------------------------------------------------------------------- shared parameters
def _check_generator(name: str, value: object, target: Target) -> torch.Generator:
    if not isinstance(value, torch.Generator):
        raise TypeError(f"`{name}` must be a torch.Generator, got {type(value).__name__}")
    return value


def _check_masks(name: str, value: object, target: Target) -> torch.Tensor:
    masks = check_tensor(name, value)
    expected = (target.n, *(target.shape or ()))
    if masks.shape != expected:
        raise ValueError(
            f"`{name}` for {target.where} must be a tensor of shape {expected}, got {tuple(masks.shape)}"
        )
    return masks


DENSITY = Param(
    "density", check_with(check_probability, zero=False), "fraction of each task vector kept, in (0, 1]"
)
MAJORITY_SIGN = Param(
    "majority_sign",
    check_with(check_choice, choices=SIGN_METHODS),
    "elected sign: 'total' (of Σ τ_i) or 'frequency' (of Σ sign τ_i)",
    default="total",
)
DARE_MASKS = (
    Param(
        "generator",
        _check_generator,
        "draws the DARE masks (default: the global RNG; whole-model merges: from `seed`)",
        default=None,
        tensor_only=True,
        from_seed=tensor_generator,
    ),
    Param(
        "masks",
        _check_masks,
        "DARE keep-masks of shape (n, *shape), instead of drawing them",
        default=None,
        tensor_only=True,
    ),
)


# --------------------------------------------------------------------------------------- methods
@register_merge_method("task_arithmetic", paper="Editing Models with Task Arithmetic")
def task_arithmetic(inputs: MergeInputs, weights: torch.Tensor) -> Iterator[torch.Tensor]:
    """``θ = θ_base + Σ_i w_i τ_i``."""
    for a, b in inputs.blocks():
        yield weight_(inputs.task_vectors(a, b), weights).sum(0).add_(inputs.base_rows(a, b))


@register_merge_method(
    "magnitude_prune",
    paper="TIES-Merging: Resolving Interference When Merging Models (trim step only)",
    params=(DENSITY,),
)
def magnitude_prune(inputs: MergeInputs, weights: torch.Tensor, *, density: float) -> Iterator[torch.Tensor]:
    """``θ = θ_base + Σ_i w_i trim(τ_i, density)`` (PEFT's ``magnitude_prune``)."""
    thresholds = magnitude_thresholds(inputs, density)
    for a, b in inputs.blocks():
        tau = trim_(inputs.task_vectors(a, b), thresholds)
        yield weight_(tau, weights).sum(0).add_(inputs.base_rows(a, b))


@register_merge_method(
    "ties", paper="TIES-Merging: Resolving Interference When Merging Models", params=(DENSITY, MAJORITY_SIGN)
)
def ties(
    inputs: MergeInputs, weights: torch.Tensor, *, density: float, majority_sign: str
) -> Iterator[torch.Tensor]:
    """Trim, elect sign, disjoint mean: ``θ = θ_base + Σ_{i∈A} w_i τ̂_i / |A|`` with ``τ̂ = trim(τ)``
    and ``A`` the models whose ``τ̂`` agrees with the elected sign."""
    thresholds = magnitude_thresholds(inputs, density)
    for a, b in inputs.blocks():
        tau = trim_(inputs.task_vectors(a, b), thresholds)
        agree = elect_sign(tau, majority_sign)
        yield disjoint_mean_(weight_(tau, weights), agree).add_(inputs.base_rows(a, b))


@register_merge_method(
    "dare_linear",
    paper="Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
    params=(DENSITY, *DARE_MASKS),
)
def dare_linear(
    inputs: MergeInputs,
    weights: torch.Tensor,
    *,
    density: float,
    generator: torch.Generator | None,
    masks: torch.Tensor | None,
) -> Iterator[torch.Tensor]:
    """DARE then task arithmetic: ``θ = θ_base + Σ_i w_i m_i ⊙ τ_i / density``."""
    for a, b, tau in _dare_blocks(inputs, density, generator, masks):
        yield weight_(tau, weights).sum(0).add_(inputs.base_rows(a, b))


@register_merge_method(
    "dare_ties",
    paper="Language Models are Super Mario (DARE) with TIES-Merging's sign election",
    params=(DENSITY, MAJORITY_SIGN, *DARE_MASKS),
)
def dare_ties(
    inputs: MergeInputs,
    weights: torch.Tensor,
    *,
    density: float,
    majority_sign: str,
    generator: torch.Generator | None,
    masks: torch.Tensor | None,
) -> Iterator[torch.Tensor]:
    """DARE's drop-and-rescale in place of TIES' trim, then elect sign and disjoint mean."""
    for a, b, tau in _dare_blocks(inputs, density, generator, masks):
        agree = elect_sign(tau, majority_sign)
        yield disjoint_mean_(weight_(tau, weights), agree).add_(inputs.base_rows(a, b))


@register_merge_method(
    "slerp",
    paper="Animating Rotation with Quaternion Curves (SLERP)",
    params=(
        Param(
            "t", check_with(check_probability), "position in [0, 1]: 0 = the base, 1 = the fine-tuned model"
        ),
        Param(
            "eps", check_with(check_number, low=0.0), "norm or sin Ω below which it is linear", default=1e-8
        ),
    ),
    weighted=False,
    min_models=1,
    max_models=1,
)
def slerp(inputs: MergeInputs, weights: torch.Tensor, *, t: float, eps: float) -> Iterator[torch.Tensor]:
    """Spherical linear interpolation from the base (t = 0) to the one fine-tuned tensor (t = 1).

    With ``Ω`` the angle between the flattened tensors (inner products accumulated in float64),
    ``θ = sin((1−t)Ω)/sin Ω · θ_base + sin(tΩ)/sin Ω · θ_1``; falls back to linear interpolation
    ``(1−t) θ_base + t θ_1`` when the tensors are (anti)parallel within ``eps`` or one is zero.
    """
    read_other = inputs.read_models[0]
    dot = norm0 = norm1 = 0.0
    for a, b in inputs.blocks():
        v0, v1 = inputs.read_base(a, b).double(), read_other(a, b).double()
        dot += (v0 * v1).sum().item()
        norm0 += v0.square().sum().item()
        norm1 += v1.square().sum().item()
    norm0, norm1 = math.sqrt(norm0), math.sqrt(norm1)
    c0, c1 = 1.0 - t, float(t)
    if norm0 > eps and norm1 > eps:
        omega = math.acos(max(-1.0, min(1.0, dot / (norm0 * norm1))))
        if math.sin(omega) > eps:
            c0, c1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    for a, b in inputs.blocks():
        yield inputs.base_rows(a, b).mul_(c0).add_(read_other(a, b).to(inputs.compute_dtype), alpha=c1)


# ---------------------------------------------------------------------------------- entry points
def check_tensors(base: torch.Tensor, finetuned: Sequence[torch.Tensor], name: str = "tensor") -> None:
    """Same shape and dtype across ``base`` and every fine-tuned tensor, floating point and finite
    (NaN or infinity in a task vector would reach the merge: TIES' trim threshold, DARE's rescale);
    errors name ``name``."""
    check_tensor("base", base)
    if isinstance(finetuned, torch.Tensor) or not isinstance(finetuned, Sequence) or not finetuned:
        raise TypeError("`finetuned` must be a non-empty sequence of tensors")
    for i, t in enumerate(finetuned):
        check_tensor(f"finetuned[{i}]", t)
        if t.shape != base.shape:
            raise ValueError(
                f"shape mismatch for {name!r}: base {tuple(base.shape)} vs model {i} {tuple(t.shape)}"
            )
        if t.dtype != base.dtype:
            raise ValueError(f"dtype mismatch for {name!r}: base {base.dtype} vs model {i} {t.dtype}")
    if not base.is_floating_point():
        raise TypeError(f"{name!r} has dtype {base.dtype}: only floating-point tensors can be merged")
    for who, t in (("base", base), *((f"finetuned[{i}]", t) for i, t in enumerate(finetuned))):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"`{who}` {name!r} holds NaN or infinite values (a merge would spread them)")


def _merge(
    entry: MergeMethod,
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: torch.Tensor,
    params: dict,
    name: str,
) -> torch.Tensor:
    """Run a checked merge of one tensor and concatenate its blocks."""
    blocks = entry.fn(MergeInputs.from_tensors(base, finetuned, name), weights, **params)
    return torch.cat([blk.to(base.dtype) for blk in blocks]).reshape(base.shape)


def merge_tensors(
    method: str,
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    name: str = "tensor",
    **params,
) -> torch.Tensor:
    """Merge one parameter tensor of ``n`` fine-tuned models with the base model's.

    Args:
        method: a name in :data:`MERGE_METHODS` — ``"task_arithmetic"``, ``"ties"``, ``"dare_linear"``,
            ``"dare_ties"``, ``"magnitude_prune"``, ``"slerp"``.
        base: the base model's tensor, any shape.
        finetuned: ``n`` tensors of the same shape and dtype.
        weights: per-model weights ``w_i`` (default 1 each; not for ``slerp``).
        name: the tensor's name, used in error messages.
        **params: the method's declared parameters (``MERGE_METHODS[method].params``) — ``density``
            ∈ (0, 1] (fraction kept), ``majority_sign`` (``"total"`` | ``"frequency"``), ``t`` ∈ [0, 1]
            (slerp), ``generator`` or ``masks`` of shape ``(n, *base.shape)`` (DARE).

    Returns:
        the merged tensor, shape and dtype of ``base``.
    """
    entry = merge_method(method)
    check_tensors(base, finetuned, name)
    n = len(finetuned)
    full = entry.resolve(params, Target(n, tuple(base.shape), repr(name)))
    return _merge(entry, base, finetuned, entry.resolve_weights(weights, n), full, name)


def merge_state_dicts(
    method: str,
    base: dict[str, torch.Tensor],
    finetuned: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    seed: int = 0,
    **params,
) -> dict[str, torch.Tensor]:
    """Merge whole state dicts tensor by tensor (in memory). Non-floating tensors are copied from the
    base; DARE draws each tensor's masks from :func:`tensor_generator` ``(seed, name)``."""
    entry = merge_method(method)
    if not isinstance(base, Mapping):
        raise TypeError(f"`base` must be a state dict (mapping name -> tensor), got {type(base).__name__}")
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence) or not finetuned:
        raise TypeError("`finetuned` must be a non-empty list of state dicts (not one state dict)")
    for i, sd in enumerate(finetuned):
        if not isinstance(sd, Mapping):
            raise TypeError(f"`finetuned[{i}]` must be a state dict, got {type(sd).__name__}")
        if set(sd) != set(base):
            diff = sorted(set(base) ^ set(sd))
            raise ValueError(f"model {i} and the base have different tensors, e.g. {diff[:3]}")
    full = entry.resolve(params, Target(len(finetuned), where="state-dict"))
    w = entry.resolve_weights(weights, len(finetuned))
    seed = check_int("seed", seed)
    out = {}
    for key, b in base.items():
        if not b.is_floating_point():
            out[key] = b.clone()
            continue
        tensors = [sd[key] for sd in finetuned]
        check_tensors(b, tensors, key)
        out[key] = _merge(entry, b, tensors, w, full | entry.seeded(seed, key), key)
    return out
