"""Merge methods on one tensor, behind one registry, streamed in row blocks.

Every method merges one parameter tensor of a *base* model with the same tensor of ``n``
fine-tuned models. Methods built on task vectors ``τ_i = θ_i − θ_base`` (*Editing Models with Task
Arithmetic*) return ``θ_base + λ · combine(sparsify(τ_1) … sparsify(τ_n))`` in three stages, each
mechanism with one home here:

* **sparsify** (a :data:`Sparsify`; whole-tensor statistics are computed first) — keep a magnitude
  band (:func:`magnitude_bands` + :func:`keep_bands_`): the top ``density`` fraction of ``|τ_i|``
  (TIES' *trim*) or the middle with both tails dropped (*Model Breadcrumbs*); or drop at random
  (:func:`draw_masks`): each entry kept with probability ``density`` (DARE) or with a probability
  rising with its magnitude rank in its row (DELLA's MagPrune, :func:`magprune_probabilities`). The
  kept entries are rescaled by ``1/p`` (the papers, PEFT), to ``τ_i``'s L1 norm
  (:func:`l1_rescaled`, mergekit's ``rescale``) or not at all;
* **elect sign** — :func:`elect_sign` (TIES: the sign of ``Σ_i τ_i`` ("total") or of ``Σ_i sign(τ_i)``
  ("frequency")), on the sparsified task vectors (PEFT, the paper) or on the weighted ones
  (``weighted_sign``, mergekit);
* **combine** — :func:`combine_`: ``Σ_i w_i τ̃_i`` over every model, or over the models agreeing with
  the elected sign, divided by their number (TIES' *disjoint mean*, PEFT), by their total weight
  (mergekit's ``normalize``) or by nothing; then scaled by λ (``scaling``).

Linear averaging, SLERP and Model Stock interpolate the models themselves.

Methods read their inputs through :class:`MergeInputs`, row block by row block (blocks of about
:data:`BLOCK_ELEMENTS` entries along the first dimension), and yield the merged blocks. Whole-tensor
quantities (magnitude bands, random masks, L1 norms, SLERP's angle, Model Stock's cosines) are
computed first, blockwise; everything else is per block. So a checkpoint merge never holds more
than one block of the ``n`` task vectors, plus one float32 copy of the tensor (magnitude bands) or
``n`` boolean masks (DARE, DELLA), and the result does not depend on the block size. A new method is
one generator function ``fn(inputs, weights, *, **params)`` registered with
:func:`register_merge_method`, which declares its parameters
(:class:`~tokenlab.merging.registry.Param`; shared ones such as :data:`DENSITY` are declared once
below) and how many models it takes; :func:`merge_tensors` dispatches by name, validates input
against the declarations and concatenates the blocks.

Conventions. The defaults follow ``peft.utils.merge_utils`` (the tests' oracle) and the papers:
trimming is per tensor with ``k = int(density · numel)`` (entries tied with the k-th magnitude are
all kept, where ``topk`` picks arbitrarily among them); TIES elects the sign on the unweighted
trimmed task vectors and the disjoint mean divides the weighted sum by the number of agreeing
entries; DARE and DELLA divide kept entries by their keep probability. mergekit's conventions are
options (``weighted_sign=True``, ``normalize="weight"``/``"none"``, ``rescale="l1"``, ``scaling``),
which :mod:`tokenlab.merging.mergekit` sets from a mergekit config. Computation is in float32
(float64 for float64 inputs); results have the base tensor's dtype.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from tokenlab._checks import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_probability,
    check_tensor,
)
from tokenlab.merging.registry import (
    Mergekit,
    MergeMethod,
    Param,
    Target,
    check_with,
    merge_method,
    register_merge_method,
)

SIGN_METHODS = ("total", "frequency")
BLOCK_ELEMENTS = 1 << 20  # entries per row block (per model)
L1_EPS = 1e-7  # mergekit's rescale leaves a task vector alone when either L1 norm is below this

ReadRows = Callable[[int, int], torch.Tensor]
Sparsify = Callable[[torch.Tensor, int, int], torch.Tensor]  # (rows a:b of all τ_i, a, b) → τ̃, in place


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
def per_model(value: float | Sequence[float], n: int) -> tuple[float, ...]:
    """One value per fine-tuned model: a sequence as is, a number repeated ``n`` times."""
    return tuple(value) if isinstance(value, Sequence) else (value,) * n


def trim_counts(numel: int, density: Sequence[float]) -> list[tuple[int, int]]:
    """TIES' *trim* as :func:`magnitude_bands` counts: keep the ``k = int(density · numel)`` largest."""
    return [(numel - int(d * numel), int(d * numel)) for d in density]


def breadcrumbs_counts(numel: int, density: Sequence[float], gamma: Sequence[float]) -> list[tuple[int, int]]:
    """*Model Breadcrumbs* as :func:`magnitude_bands` counts: drop the ``int(gamma · numel)`` largest
    magnitudes and as many of the smallest as leave ``int(density · numel)`` kept (fewer of the
    largest when ``density + gamma > 1``); ``density = 1`` keeps everything (mergekit's convention).
    Where ``int(gamma · numel) = 0`` no top is dropped (mergekit keeps nothing there: its mask
    ``indices[n_bot:-0]`` is empty), so ``gamma = 0, density = 1`` is task arithmetic."""
    counts = []
    for d, g in zip(density, gamma):
        if d >= 1:
            counts.append((0, numel))
            continue
        kept, top = int(d * numel), int(g * numel)
        counts.append((max(0, numel - kept - top), kept))
    return counts


def magnitude_bands(inputs: MergeInputs, counts: Sequence[tuple[int, int]]) -> list[tuple[float, float]]:
    """Per model, the magnitude band ``(lo, hi)`` of the entries of ``|τ_i|`` ranked ``dropped`` to
    ``dropped + kept − 1`` in ascending order, for ``counts[i] = (dropped, kept)``.

    Found with an in-place partition of one buffer of ``|τ_i|`` (compute dtype) filled block by block;
    :func:`keep_bands_` keeps ``lo ≤ |τ_i| ≤ hi`` (so entries tied with a band edge are all kept).
    ``(-inf, inf)``: keep all; ``(inf, inf)``: keep none.
    """
    numel = inputs.numel
    bands: list[tuple[float, float]] = []
    magnitude = None
    for i, (dropped, kept) in enumerate(counts):
        if kept <= 0:
            bands.append((math.inf, math.inf))
            continue
        top = dropped + kept - 1  # ascending rank of the band's largest entry
        if dropped <= 0 and top >= numel - 1:
            bands.append((-math.inf, math.inf))
            continue
        if magnitude is None:
            magnitude = torch.empty(numel, dtype=inputs.compute_dtype)
        offset = 0
        for a, b in inputs.blocks():
            block = inputs.task_vector(i, a, b).abs_().reshape(-1)
            magnitude[offset : offset + block.numel()] = block
            offset += block.numel()
        # numpy's in-place partition needs no index buffer (torch.kthvalue copies the values and
        # allocates int64 indices: 3× the memory)
        values = magnitude.numpy()
        kth = {r for r, needed in ((dropped, dropped > 0), (top, top < numel - 1)) if needed}
        values.partition(sorted(kth))
        lo = float(values[dropped]) if dropped > 0 else -math.inf
        hi = float(values[top]) if top < numel - 1 else math.inf
        bands.append((lo, hi))
    return bands


def keep_bands_(tau: torch.Tensor, bands: Sequence[tuple[float, float]]) -> torch.Tensor:
    """In place: zero the entries of each ``tau[i]`` outside ``lo_i ≤ |τ_i| ≤ hi_i``."""
    for row, (lo, hi) in zip(tau, bands):
        if lo == -math.inf and hi == math.inf:
            continue
        magnitude = row.abs()
        row.mul_((magnitude >= lo) & (magnitude <= hi))
    return tau


def magprune_probabilities(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities for each row of ``rows`` (shape ``(r, c)``): the entry of
    ascending magnitude rank ``ρ ∈ {0 … c−1}`` in its row is kept with probability
    ``density − ε + 2ε · ρ / (c − 1)`` (``density`` when ``c = 1``; ties ranked by position) —
    the row's mean keep probability is ``density``; ``density ≥ 1`` keeps all (probability 1).
    Same shape and dtype as ``rows``.

    ``ε`` is mergekit's half-width. *DELLA-Merging* writes the drop probabilities as
    ``p_i = p_min + ε r_i / n`` with ``p_min = p − ε/2`` (``r_i`` the rank from the largest magnitude):
    a span of width ``ε``, so the paper's ``ε`` is twice this one."""
    c = rows.shape[-1]
    if density >= 1:
        return torch.ones_like(rows)
    if c == 1:
        return torch.full_like(rows, density)
    order = rows.abs().argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(c).expand_as(order))
    return ranks.to(rows.dtype).div_(c - 1).mul_(2 * epsilon).add_(density - epsilon)


KeepProbability = Callable[[int, torch.Tensor, int, int], torch.Tensor]  # (i, rows a:b of τ_i, a, b) → p


def magprune_keep(inputs: MergeInputs, density: Sequence[float], epsilon: Sequence[float]) -> KeepProbability:
    """``keep(i, τ_i rows, a, b)``: MagPrune's keep probabilities for rows ``a:b`` of model ``i``.

    A row is the tensor's first-dimension slice (a 1-D tensor is one row, ranked whole: its
    probabilities are computed here, once)."""
    if len(inputs.shape) >= 2:

        def keep(i: int, tau: torch.Tensor, a: int, b: int) -> torch.Tensor:
            return magprune_probabilities(tau.flatten(1), density[i], epsilon[i]).reshape(tau.shape)

        return keep
    rows = inputs.shape[0] if inputs.shape else 1
    whole = [
        magprune_probabilities(inputs.task_vector(i, 0, rows).reshape(1, -1), density[i], epsilon[i])[0]
        for i in range(inputs.n)
    ]
    return lambda i, tau, a, b: whole[i][a:b]


def draw_masks(
    inputs: MergeInputs,
    density: float | Sequence[float],
    generator: torch.Generator | None = None,
    keep: KeepProbability | None = None,
) -> torch.Tensor:
    """Random keep-masks (True = keep), shape ``(n, *shape)``, boolean: each entry of model ``i`` kept
    with probability ``density[i]`` (DARE) or ``keep(i, …)`` (DELLA); a model at ``density ≥ 1``
    keeps everything and draws nothing (mergekit's convention).

    Drawn with ``torch.bernoulli`` in the compute dtype, one model after the other, block by block —
    the same stream as one draw per model, as PEFT's ``random_pruning`` and mergekit's sparsifiers
    draw from the global RNG, so a generator seeded like it reproduces their masks.
    """
    density = per_model(density, inputs.n)
    masks = torch.empty((inputs.n, *(inputs.shape or (1,))), dtype=torch.bool)
    for i, row in enumerate(masks):
        if density[i] >= 1:
            row.fill_(True)
            continue
        for a, b in inputs.blocks():
            if keep is None:
                p = torch.full((b - a, *row.shape[1:]), float(density[i]), dtype=inputs.compute_dtype)
            else:
                p = keep(i, inputs.task_vector(i, a, b), a, b)
            row[a:b] = torch.bernoulli(p, generator=generator)
    return masks


def l1_rescaled(inputs: MergeInputs, sparsify: Sparsify) -> Sparsify:
    """``sparsify`` followed by mergekit's ``rescale``: each ``τ̃_i`` multiplied by
    ``‖τ_i‖₁ / ‖τ̃_i‖₁`` over the whole tensor (norms accumulated in float64 in a first pass; left
    alone when either norm is below :data:`L1_EPS`)."""
    before = torch.zeros(inputs.n, dtype=torch.float64)
    after = torch.zeros(inputs.n, dtype=torch.float64)
    for a, b in inputs.blocks():
        tau = inputs.task_vectors(a, b)
        before += tau.abs().reshape(inputs.n, -1).sum(1, dtype=torch.float64)
        after += sparsify(tau, a, b).abs_().reshape(inputs.n, -1).sum(1, dtype=torch.float64)
    small = (before < L1_EPS) | (after < L1_EPS)
    factors = torch.where(small, 1.0, before / torch.where(small, 1.0, after))
    return lambda tau, a, b: weight_(sparsify(tau, a, b), factors)


def band_sparsifier(inputs: MergeInputs, counts: Sequence[tuple[int, int]], rescale: str) -> Sparsify:
    """Keep each model's magnitude band (:func:`magnitude_bands`), then ``rescale`` ("none" | "l1")."""
    bands = magnitude_bands(inputs, counts)

    def keep(tau: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return keep_bands_(tau, bands)

    return l1_rescaled(inputs, keep) if rescale == "l1" else keep


def drop_sparsifier(
    inputs: MergeInputs,
    density: Sequence[float],
    rescale: str,
    generator: torch.Generator | None,
    masks: torch.Tensor | None,
    keep: KeepProbability | None = None,
) -> Sparsify:
    """Random drop with the given ``masks`` or masks drawn by :func:`draw_masks`, then ``rescale``:
    "probability" divides each kept entry by its keep probability (``density``, or ``keep``'s),
    "l1" matches the L1 norm (:func:`l1_rescaled`), "none" leaves it."""
    if masks is None:
        masks = draw_masks(inputs, density, generator, keep)
    masks = masks.reshape(inputs.n, *(inputs.shape or (1,)))  # 0-d tensors are read as one row
    scale = torch.tensor(density, dtype=inputs.compute_dtype).view(-1, *([1] * len(masks.shape[1:])))

    def drop(tau: torch.Tensor, a: int, b: int) -> torch.Tensor:
        if rescale == "probability":
            p = scale if keep is None else torch.stack([keep(i, t, a, b) for i, t in enumerate(tau)])
            return tau.mul_(masks[:, a:b]).div_(p)
        return tau.mul_(masks[:, a:b])

    return l1_rescaled(inputs, drop) if rescale == "l1" else drop


def elect_sign(tau: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES *elect sign*: boolean mask (shape of ``tau``) of the entries whose sign is the elected one.

    The elected sign is ``sign(Σ_i τ_i)`` for ``"total"`` (the sign of greater total magnitude, as
    in the paper) or ``sign(Σ_i sign(τ_i))`` for ``"frequency"``; ties elect ``+``. Zero (trimmed)
    entries never agree.
    """
    score = tau.sum(0) if method == "total" else tau.sign().sum(0)
    return torch.where(score >= 0, tau > 0, tau < 0)


def weight_(tau: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """In place: ``τ_i ← w_i τ_i``."""
    return tau.mul_(weights.to(tau.dtype).view(-1, *([1] * (tau.dim() - 1))))


def combine_(
    weighted_tau: torch.Tensor, weights: torch.Tensor, agree: torch.Tensor | None, normalize: str
) -> torch.Tensor:
    """Combine weighted task vectors ``w_i τ̃_i`` (overwrites ``weighted_tau``).

    Without ``agree``: ``Σ_i w_i τ̃_i``, divided by ``Σ_i w_i`` for ``normalize="weight"`` (by 1 where
    ``|Σ_i w_i| < 1e-8``, as mergekit). With ``agree`` (TIES' *disjoint merge*): ``Σ_{i∈A} w_i τ̃_i``
    over the models ``A`` agreeing with the elected sign, divided by ``|A|`` ("count": the disjoint
    mean of the paper and PEFT), by ``Σ_{i∈A} w_i`` ("weight": mergekit's ``normalize``) or by 1
    ("none"); entries where the divisor is 0 stay 0.
    """
    if agree is None:
        total = weighted_tau.sum(0)
        if normalize == "weight":
            w = float(weights.sum())
            total.div_(w if abs(w) >= 1e-8 else 1.0)
        return total
    total = weighted_tau.mul_(agree).sum(0)
    if normalize == "count":
        return total.div_(agree.sum(0, dtype=total.dtype).clamp_(min=1))
    if normalize == "weight":
        divisor = weight_(agree.to(total.dtype), weights).sum(0)
        return total.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return total


def merge_task_vectors(
    inputs: MergeInputs,
    weights: torch.Tensor,
    sparsify: Sparsify | None,
    *,
    normalize: str,
    scaling: float,
    majority_sign: str | None = None,
    weighted_sign: bool = False,
) -> Iterator[torch.Tensor]:
    """The task-vector pipeline, block by block: ``θ_base + λ · combine(w_i · sparsify(τ_i))``, with
    TIES' sign election when ``majority_sign`` is given (on ``sparsify(τ_i)``, or on ``w_i ·
    sparsify(τ_i)`` with ``weighted_sign``)."""
    for a, b in inputs.blocks():
        tau = inputs.task_vectors(a, b)
        if sparsify is not None:
            tau = sparsify(tau, a, b)
        agree = None
        if majority_sign is not None and not weighted_sign:
            agree = elect_sign(tau, majority_sign)
        weight_(tau, weights)
        if majority_sign is not None and weighted_sign:
            agree = elect_sign(tau, majority_sign)
        merged = combine_(tau, weights, agree, normalize)
        if scaling != 1:
            merged.mul_(scaling)
        yield merged.add_(inputs.base_rows(a, b))


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """The generator that draws the random masks of tensor ``name`` in a merge seeded with ``seed``
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
    "density",
    check_with(check_probability, zero=False),
    "fraction of each task vector kept, in (0, 1]",
    per_model=True,
)
MAJORITY_SIGN = Param(
    "majority_sign",
    check_with(check_choice, choices=SIGN_METHODS),
    "elected sign: 'total' (of Σ τ_i) or 'frequency' (of Σ sign τ_i)",
    default="total",
)
WEIGHTED_SIGN = Param(
    "weighted_sign",
    check_with(check_bool),
    "elect the sign on the weighted w_i τ̃_i (mergekit) instead of τ̃_i (PEFT, the paper)",
    default=False,
)
SCALING = Param("scaling", check_with(check_number), "λ, the factor of the merged task vector", default=1.0)


def choice(name: str, choices: tuple[str, ...], doc: str) -> Param:
    """A parameter taking one of ``choices``, the first being its default."""
    return Param(name, check_with(check_choice, choices=choices), doc, default=choices[0])


NORMALIZE_SUM = choice("normalize", ("none", "weight"), "'weight': divide Σ w_i τ̃_i by Σ w_i (mergekit)")
NORMALIZE_DISJOINT = choice(
    "normalize",
    ("count", "weight", "none"),
    "divide the agreeing Σ w_i τ̃_i by their count (disjoint mean: paper, PEFT), weight (mergekit) or 1",
)
RESCALE_BAND = choice("rescale", ("none", "l1"), "'l1': rescale each τ̃_i to the L1 norm of τ_i (mergekit)")
RESCALE_DROP = choice(
    "rescale",
    ("probability", "l1", "none"),
    "kept entries ÷ keep probability (papers, PEFT), 'l1': to τ_i's L1 norm (mergekit), or 'none'",
)
GAMMA = Param(
    "gamma",
    check_with(check_probability),
    "fraction of each task vector's largest magnitudes dropped (the paper's β)",
    default=0.01,
    per_model=True,
)
EPSILON = Param(
    "epsilon",
    check_with(check_number, low=0.0),
    "ε: keep probabilities span density ± ε over magnitude ranks (mergekit's; the paper's ε is 2ε)",
    default=0.15,
    per_model=True,
)
RANDOM_MASKS = (
    Param(
        "generator",
        _check_generator,
        "draws the random masks (default: the global RNG; whole-model merges: from `seed`)",
        default=None,
        tensor_only=True,
        from_seed=tensor_generator,
    ),
    Param(
        "masks",
        _check_masks,
        "keep-masks of shape (n, *shape), instead of drawing them",
        default=None,
        tensor_only=True,
    ),
)
SUM = (NORMALIZE_SUM, SCALING)
CONSENSUS = (MAJORITY_SIGN, WEIGHTED_SIGN, NORMALIZE_DISJOINT, SCALING)
INT8_MASK = ("int8_mask",)  # mergekit's int8 sign masks save memory; tokenlab's masks are boolean


def _mergekit(normalize: str, rescale: str | None = None, consensus: bool = False) -> Mergekit:
    """mergekit's defaults for one of its generalized task-arithmetic methods."""
    defaults: dict[str, object] = {"normalize": normalize}
    if rescale is not None:
        defaults |= {"rescale": rescale, "density": 1.0}
    if consensus:
        defaults["weighted_sign"] = True
    return Mergekit(defaults, no_effect=INT8_MASK)


def _della_constraint(values: Mapping[str, object], weights: torch.Tensor, target: Target) -> None:
    for i, (d, e) in enumerate(zip(values["density"], values["epsilon"])):
        if d < 1 and not (d - e > 0 and d + e <= 1):
            raise ValueError(
                f"DELLA keeps entries with probabilities density ± epsilon: needs 0 < density − epsilon "
                f"and density + epsilon ≤ 1 (or density = 1), got density[{i}] = {d}, epsilon[{i}] = {e}"
            )


def _linear_constraint(values: Mapping[str, object], weights: torch.Tensor, target: Target) -> None:
    if values["normalize"] == "weight" and abs(float(weights.sum())) < 1e-8:
        raise ValueError(f"linear with normalize='weight': the `weights` sum to 0 for {target.where}")


# ----------------------------------------------------------------- task-vector methods
@register_merge_method(
    "task_arithmetic", paper="Editing Models with Task Arithmetic", params=SUM, mergekit=_mergekit("none")
)
def task_arithmetic(
    inputs: MergeInputs, weights: torch.Tensor, *, normalize: str, scaling: float
) -> Iterator[torch.Tensor]:
    """``θ = θ_base + λ Σ_i w_i τ_i`` (``/ Σ_i w_i`` with ``normalize="weight"``)."""
    return merge_task_vectors(inputs, weights, None, normalize=normalize, scaling=scaling)


@register_merge_method(
    "magnitude_prune",
    paper="TIES-Merging: Resolving Interference When Merging Models (trim step only)",
    params=(DENSITY, RESCALE_BAND, *SUM),
)
def magnitude_prune(
    inputs: MergeInputs,
    weights: torch.Tensor,
    *,
    density: tuple,
    rescale: str,
    normalize: str,
    scaling: float,
) -> Iterator[torch.Tensor]:
    """``θ = θ_base + λ Σ_i w_i trim(τ_i, density_i)`` (PEFT's ``magnitude_prune``)."""
    sparsify = band_sparsifier(inputs, trim_counts(inputs.numel, density), rescale)
    return merge_task_vectors(inputs, weights, sparsify, normalize=normalize, scaling=scaling)


@register_merge_method(
    "ties",
    paper="TIES-Merging: Resolving Interference When Merging Models",
    params=(DENSITY, RESCALE_BAND, *CONSENSUS),
    mergekit=_mergekit("weight", "none", consensus=True),
)
def ties(
    inputs: MergeInputs,
    weights: torch.Tensor,
    *,
    density: tuple,
    rescale: str,
    majority_sign: str,
    weighted_sign: bool,
    normalize: str,
    scaling: float,
) -> Iterator[torch.Tensor]:
    """Trim, elect sign, disjoint mean: ``θ = θ_base + λ Σ_{i∈A} w_i τ̂_i / |A|`` with ``τ̂ = trim(τ)``
    and ``A`` the models whose ``τ̂`` agrees with the elected sign (mergekit: ``/ Σ_{i∈A} w_i``)."""
    sparsify = band_sparsifier(inputs, trim_counts(inputs.numel, density), rescale)
    return merge_task_vectors(
        inputs, weights, sparsify, normalize=normalize, scaling=scaling,
        majority_sign=majority_sign, weighted_sign=weighted_sign,
    )  # fmt: skip


@register_merge_method(
    "breadcrumbs",
    paper="Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
    params=(DENSITY, GAMMA, RESCALE_BAND, *SUM),
    mergekit=_mergekit("none", "none"),
)
def breadcrumbs(
    inputs: MergeInputs,
    weights: torch.Tensor,
    *,
    density: tuple,
    gamma: tuple,
    rescale: str,
    normalize: str,
    scaling: float,
) -> Iterator[torch.Tensor]:
    """``θ = θ_base + λ Σ_i w_i m_i ⊙ τ_i``, ``m_i`` masking out both tails of ``|τ_i|`` per tensor:
    the ``gamma`` fraction of largest magnitudes (outliers) and the smallest ones, keeping
    ``density`` (:func:`breadcrumbs_counts`). ``density = 1, gamma = 0``: task arithmetic."""
    sparsify = band_sparsifier(inputs, breadcrumbs_counts(inputs.numel, density, gamma), rescale)
    return merge_task_vectors(inputs, weights, sparsify, normalize=normalize, scaling=scaling)


@register_merge_method(
    "breadcrumbs_ties",
    paper="Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (with TIES' sign election)",
    params=(DENSITY, GAMMA, RESCALE_BAND, *CONSENSUS),
    mergekit=_mergekit("none", "none", consensus=True),
)
def breadcrumbs_ties(
    inputs: MergeInputs,
    weights: torch.Tensor,
    *,
    density: tuple,
    gamma: tuple,
    rescale: str,
    majority_sign: str,
    weighted_sign: bool,
    normalize: str,
    scaling: float,
) -> Iterator[torch.Tensor]:
    """Breadcrumbs' two-tailed masks in place of TIES' trim, then elect sign and disjoint merge."""
    sparsify = band_sparsifier(inputs, breadcrumbs_counts(inputs.numel, density, gamma), rescale)
    return merge_task_vectors(
        inputs, weights, sparsify, normalize=normalize, scaling=scaling,
        majority_sign=majority_sign, weighted_sign=weighted_sign,
    )  # fmt: skip


@register_merge_method(
    "dare_linear",
    paper="Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
    params=(DENSITY, RESCALE_DROP, *SUM, *RANDOM_MASKS),
    mergekit=_mergekit("none", "l1"),
)
def dare_linear(
    inputs: MergeInputs,
    weights: torch.Tensor,
    *,
    density: tuple,
    rescale: str,
    normalize: str,
    scaling: float,
    generator: torch.Generator | None,
    masks: torch.Tensor | None,
) -> Iterator[torch.Tensor]:
    """DARE then task arithmetic: ``θ = θ_base + λ Σ_i w_i m_i ⊙ τ_i / p_i``, ``m_i ~ Bernoulli(p_i)``,
    ``p_i = density_i``."""
    sparsify = drop_sparsifier(inputs, density, rescale, generator, masks)
    return merge_task_vectors(inputs, weights, sparsify, normalize=normalize, scaling=scaling)


@register_merge_method(
    "dare_ties",
    paper="Language Models are Super Mario (DARE) with TIES-Merging's sign election",
    params=(DENSITY, RESCALE_DROP, *CONSENSUS, *RANDOM_MASKS),
    mergekit=_mergekit("none", "l1", consensus=True),
)
def dare_ties(
    inputs: MergeInputs,
    weights: torch.Tensor,
    *,
    density: tuple,
    rescale: str,
    majority_sign: str,
    weighted_sign: bool,
    normalize: str,
    scaling: float,
    generator: torch.Generator | None,
    masks: torch.Tensor | None,
) -> Iterator[torch.Tensor]:
    """DARE's drop-and-rescale in place of TIES' trim, then elect sign and disjoint merge."""
    sparsify = drop_sparsifier(inputs, density, rescale, generator, masks)
    return merge_task_vectors(
        inputs, weights, sparsify, normalize=normalize, scaling=scaling,
        majority_sign=majority_sign, weighted_sign=weighted_sign,
    )  # fmt: skip


@register_merge_method(
    "della_linear",
    paper="DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
    params=(DENSITY, EPSILON, RESCALE_DROP, *SUM, *RANDOM_MASKS),
    constraint=_della_constraint,
    mergekit=_mergekit("none", "l1"),
)
def della_linear(
    inputs: MergeInputs,
    weights: torch.Tensor,
    *,
    density: tuple,
    epsilon: tuple,
    rescale: str,
    normalize: str,
    scaling: float,
    generator: torch.Generator | None,
    masks: torch.Tensor | None,
) -> Iterator[torch.Tensor]:
    """MagPrune then task arithmetic: ``θ = θ_base + λ Σ_i w_i m_i ⊙ τ_i / p_i`` with per-entry keep
    probabilities ``p_i`` rising with the magnitude rank in the row (:func:`magprune_probabilities`).
    ``epsilon = 0``: DARE."""
    keep = magprune_keep(inputs, density, epsilon)
    sparsify = drop_sparsifier(inputs, density, rescale, generator, masks, keep)
    return merge_task_vectors(inputs, weights, sparsify, normalize=normalize, scaling=scaling)


@register_merge_method(
    "della",
    paper="DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
    params=(DENSITY, EPSILON, RESCALE_DROP, *CONSENSUS, *RANDOM_MASKS),
    constraint=_della_constraint,
    mergekit=_mergekit("weight", "l1", consensus=True),
)
def della(
    inputs: MergeInputs,
    weights: torch.Tensor,
    *,
    density: tuple,
    epsilon: tuple,
    rescale: str,
    majority_sign: str,
    weighted_sign: bool,
    normalize: str,
    scaling: float,
    generator: torch.Generator | None,
    masks: torch.Tensor | None,
) -> Iterator[torch.Tensor]:
    """Drop (MagPrune), elect sign, fuse (disjoint merge): DELLA. ``epsilon = 0``: DARE-TIES."""
    keep = magprune_keep(inputs, density, epsilon)
    sparsify = drop_sparsifier(inputs, density, rescale, generator, masks, keep)
    return merge_task_vectors(
        inputs, weights, sparsify, normalize=normalize, scaling=scaling,
        majority_sign=majority_sign, weighted_sign=weighted_sign,
    )  # fmt: skip


# ------------------------------------------------------------------- interpolation methods
@register_merge_method(
    "linear",
    paper="Model soups: averaging weights of multiple fine-tuned models improves accuracy without "
    "increasing inference time",
    params=(choice("normalize", ("weight", "none"), "'weight': divide Σ w_i θ_i by Σ w_i"),),
    uses_base=False,
    constraint=_linear_constraint,
    mergekit=Mergekit({"normalize": "weight"}),
)
def linear(inputs: MergeInputs, weights: torch.Tensor, *, normalize: str) -> Iterator[torch.Tensor]:
    """The weighted average of the models, ``θ = Σ_i w_i θ_i / Σ_i w_i`` (``Σ_i w_i θ_i`` with
    ``normalize="none"``); the base gives only the layout."""
    w = weights.tolist()
    total = sum(w)
    for a, b in inputs.blocks():
        merged = inputs.read_models[0](a, b).to(inputs.compute_dtype).mul(w[0])
        for wi, read in zip(w[1:], inputs.read_models[1:]):
            merged.add_(read(a, b).to(inputs.compute_dtype), alpha=wi)
        yield merged.div_(total) if normalize == "weight" else merged


def model_stock_ratio(gram: torch.Tensor) -> torch.Tensor:
    """Model Stock's interpolation ratio from the Gram matrices ``G_ij = ⟨τ_i, τ_j⟩`` (shape
    ``(..., n, n)``, ``n ≥ 2``): ``t = n cos θ / (1 + (n − 1) cos θ)`` with ``cos θ`` the mean cosine
    over pairs ``i < j`` (a pair with a zero task vector counts 0); ``t = 0`` where the denominator
    is within 1e-6 of 0. Shape ``(...)``."""
    n = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    i, j = torch.triu_indices(n, n, 1)
    norm_products = norms[..., i] * norms[..., j]
    cosines = gram[..., i, j] / torch.where(norm_products > 0, norm_products, 1.0)
    cos = cosines.clamp_(-1, 1).mean(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))


@register_merge_method(
    "model_stock",
    paper="Model Stock: All we need is just a few fine-tuned models",
    params=(
        Param(
            "filter_wise",
            check_with(check_bool),
            "one ratio per vector along the last dimension (a row of a 2-D weight) instead of per tensor",
            default=False,
        ),
    ),
    weighted=False,
    min_models=2,
    mergekit=Mergekit(),
)
def model_stock(inputs: MergeInputs, weights: torch.Tensor, *, filter_wise: bool) -> Iterator[torch.Tensor]:
    """``θ = θ_base + t · (1/n) Σ_i τ_i`` — the average of the fine-tuned models pulled towards the
    base by the ratio ``t`` of :func:`model_stock_ratio`, from the angles between the task vectors
    (inner products accumulated in float64; per tensor, or per last-dimension vector with
    ``filter_wise``)."""
    n = inputs.n
    if filter_wise and len(inputs.shape) >= 2:
        for a, b in inputs.blocks():
            tau = inputs.task_vectors(a, b)
            t = model_stock_ratio(torch.einsum("i...c,j...c->...ij", tau.double(), tau.double()))
            yield tau.sum(0).div_(n).mul_(t.unsqueeze(-1).to(tau.dtype)).add_(inputs.base_rows(a, b))
        return
    gram = torch.zeros(n, n, dtype=torch.float64)
    for a, b in inputs.blocks():
        flat = inputs.task_vectors(a, b).reshape(n, -1).double()
        gram += flat @ flat.T
    t = float(model_stock_ratio(gram))
    for a, b in inputs.blocks():
        yield inputs.task_vectors(a, b).sum(0).mul_(t / n).add_(inputs.base_rows(a, b))


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
        Param(
            "dot_threshold",
            check_with(check_probability),
            "|cos Ω| above which it is linear (mergekit: 0.9995)",
            default=1.0,
        ),
    ),
    weighted=False,
    min_models=1,
    max_models=1,
    mergekit=Mergekit({"dot_threshold": 0.9995}),
)
def slerp(
    inputs: MergeInputs, weights: torch.Tensor, *, t: float, eps: float, dot_threshold: float
) -> Iterator[torch.Tensor]:
    """Spherical linear interpolation from the base (t = 0) to the one fine-tuned tensor (t = 1).

    With ``Ω`` the angle between the flattened tensors (inner products accumulated in float64),
    ``θ = sin((1−t)Ω)/sin Ω · θ_base + sin(tΩ)/sin Ω · θ_1``; linear interpolation
    ``(1−t) θ_base + t θ_1`` when ``|cos Ω| > dot_threshold``, the tensors are (anti)parallel within
    ``eps`` or one is zero.
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
        cos = max(-1.0, min(1.0, dot / (norm0 * norm1)))
        omega = math.acos(cos)
        if abs(cos) <= dot_threshold and math.sin(omega) > eps:
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
            ``"dare_ties"``, ``"magnitude_prune"``, ``"breadcrumbs"``, ``"breadcrumbs_ties"``,
            ``"della"``, ``"della_linear"``, ``"linear"``, ``"model_stock"``, ``"slerp"``.
        base: the base model's tensor, any shape.
        finetuned: ``n`` tensors of the same shape and dtype.
        weights: per-model weights ``w_i`` (default 1 each; not for ``slerp``, ``model_stock``).
        name: the tensor's name, used in error messages.
        **params: the method's declared parameters (``MERGE_METHODS[method].params``) — e.g.
            ``density`` ∈ (0, 1] (fraction kept, one value or one per model), ``majority_sign``
            (``"total"`` | ``"frequency"``), ``t`` ∈ [0, 1] (slerp), ``generator`` or ``masks`` of
            shape ``(n, *base.shape)`` (DARE, DELLA).

    Returns:
        the merged tensor, shape and dtype of ``base``.
    """
    entry = merge_method(method)
    check_tensors(base, finetuned, name)
    w, full = entry.settle(params, weights, Target(len(finetuned), tuple(base.shape), repr(name)))
    return _merge(entry, base, finetuned, w, full, name)


def merge_state_dicts(
    method: str,
    base: dict[str, torch.Tensor],
    finetuned: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[object] | torch.Tensor | None = None,
    *,
    seed: int = 0,
    **params,
) -> dict[str, torch.Tensor]:
    """Merge whole state dicts tensor by tensor (in memory). Non-floating tensors are copied from the
    base; random masks of tensor ``name`` come from :func:`tensor_generator` ``(seed, name)``.
    Parameters and weights may vary by tensor (:class:`~tokenlab.merging.settings.TensorSetting`)."""
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
    names = [k for k, v in base.items() if v.is_floating_point()]
    plan = entry.plan(params, weights, len(finetuned), names, "state-dict")
    seed = check_int("seed", seed)
    out = {}
    for key, b in base.items():
        if not b.is_floating_point():
            out[key] = b.clone()
            continue
        tensors = [sd[key] for sd in finetuned]
        check_tensors(b, tensors, key)
        w, full = plan(key)
        out[key] = _merge(entry, b, tensors, w, full | entry.seeded(seed, key), key)
    return out
