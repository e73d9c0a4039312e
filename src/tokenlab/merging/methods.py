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
``fn(inputs, weights, **params)`` decorated with :func:`register_merge_method`;
:func:`merge_tensors` dispatches by name, validates input and concatenates the blocks.

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

SIGN_METHODS = ("total", "frequency")
BLOCK_ELEMENTS = 1 << 20  # entries per row block (per model)

MergeFn = Callable[..., Iterator[torch.Tensor]]
ReadRows = Callable[[int, int], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function, the keyword parameters it takes and their defaults."""

    name: str
    fn: MergeFn
    defaults: dict
    paper: str
    random: bool = False  # draws random masks (takes ``generator`` / ``masks``)
    weighted: bool = True  # takes per-model ``weights``


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(
    name: str, *, paper: str, random: bool = False, weighted: bool = True, **defaults
) -> Callable[[MergeFn], MergeFn]:
    """Decorator: register ``fn(inputs, weights, **params) -> Iterator[Tensor]`` under ``name``.

    ``defaults`` lists every keyword parameter the method accepts with its default value (``None``
    for required ones); :func:`merge_tensors` rejects any other keyword.
    """

    def register(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        MERGE_METHODS[name] = MergeMethod(name, fn, defaults, paper, random, weighted)
        return fn

    return register


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


def _masks_for(inputs, density, generator, masks) -> torch.Tensor:
    return (
        dare_masks(inputs, density, generator)
        if masks is None
        else masks.reshape(inputs.n, -1, *inputs.shape[1:])
    )


# --------------------------------------------------------------------------------------- methods
@register_merge_method("task_arithmetic", paper="Editing Models with Task Arithmetic")
def task_arithmetic(inputs: MergeInputs, weights: torch.Tensor) -> Iterator[torch.Tensor]:
    """``θ = θ_base + Σ_i w_i τ_i``."""
    for a, b in inputs.blocks():
        yield weight_(inputs.task_vectors(a, b), weights).sum(0).add_(inputs.base_rows(a, b))


@register_merge_method("magnitude_prune", paper="TIES-Merging (trim step only)", density=None)
def magnitude_prune(inputs: MergeInputs, weights: torch.Tensor, *, density: float) -> Iterator[torch.Tensor]:
    """``θ = θ_base + Σ_i w_i trim(τ_i, density)`` (PEFT's ``magnitude_prune``)."""
    thresholds = magnitude_thresholds(inputs, density)
    for a, b in inputs.blocks():
        tau = trim_(inputs.task_vectors(a, b), thresholds)
        yield weight_(tau, weights).sum(0).add_(inputs.base_rows(a, b))


@register_merge_method(
    "ties",
    paper="TIES-Merging: Resolving Interference When Merging Models",
    density=None,
    majority_sign="total",
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
    random=True,
    density=None,
    generator=None,
    masks=None,
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
    masks = _masks_for(inputs, density, generator, masks)
    for a, b in inputs.blocks():
        tau = drop_and_rescale_(inputs.task_vectors(a, b), density, masks[:, a:b])
        yield weight_(tau, weights).sum(0).add_(inputs.base_rows(a, b))


@register_merge_method(
    "dare_ties",
    paper="Language Models are Super Mario (DARE) with TIES-Merging's sign election",
    random=True,
    density=None,
    majority_sign="total",
    generator=None,
    masks=None,
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
    masks = _masks_for(inputs, density, generator, masks)
    for a, b in inputs.blocks():
        tau = drop_and_rescale_(inputs.task_vectors(a, b), density, masks[:, a:b])
        agree = elect_sign(tau, majority_sign)
        yield disjoint_mean_(weight_(tau, weights), agree).add_(inputs.base_rows(a, b))


@register_merge_method(
    "slerp", paper="Animating Rotation with Quaternion Curves (SLERP)", weighted=False, t=None, eps=1e-8
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


# ----------------------------------------------------------------------------------- entry point
def check_param_values(method: MergeMethod, params: dict, n: int, shape: torch.Size, where: str) -> None:
    """Validate a method's resolved ``params`` for ``n`` models and tensors of ``shape`` (``masks``:
    ``(n, *shape)``); errors name the parameter, and ``where`` (the tensor or checkpoints) for masks."""
    if "density" in method.defaults:
        d = params["density"]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 < d <= 1):
            raise ValueError(f"`density` must be in (0, 1], got {d!r}")
    if "majority_sign" in method.defaults and params["majority_sign"] not in SIGN_METHODS:
        raise ValueError(f"`majority_sign` must be one of {SIGN_METHODS}, got {params['majority_sign']!r}")
    if "t" in method.defaults:
        t = params["t"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 <= t <= 1):
            raise ValueError(f"`t` must be in [0, 1], got {t!r}")
    if method.name == "slerp" and n != 1:
        raise ValueError(f"slerp interpolates the base with exactly one fine-tuned model, got {n}")
    masks = params.get("masks")
    if masks is not None and (not isinstance(masks, torch.Tensor) or masks.shape != (n, *shape)):
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"`masks` for {where} must be a tensor of shape {(n, *shape)}, got {got}")
    gen = params.get("generator")
    if gen is not None and not isinstance(gen, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator, got {type(gen).__name__}")


def resolve_params(method: str, params: dict) -> tuple[MergeMethod, dict]:
    """Look ``method`` up and fill in its defaults; unknown or missing parameters raise."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge `method` {method!r}; available: {sorted(MERGE_METHODS)}")
    entry = MERGE_METHODS[method]
    unknown = sorted(set(params) - set(entry.defaults))
    if unknown:
        raise TypeError(
            f"merge method {method!r} takes no parameter(s) {unknown}; it takes {sorted(entry.defaults)}"
        )
    full = {**entry.defaults, **params}
    missing = [k for k, v in full.items() if v is None and k not in ("generator", "masks")]
    if missing:
        raise TypeError(f"merge method {method!r} needs parameter(s) {missing}")
    return entry, full


def resolve_weights(
    entry: MergeMethod, weights: Sequence[float] | torch.Tensor | None, n: int
) -> torch.Tensor:
    """Per-model weights as a float64 tensor of length ``n`` (default: all ones)."""
    if weights is None:
        return torch.ones(n, dtype=torch.float64)
    if not entry.weighted:
        raise ValueError(f"merge method {entry.name!r} takes no `weights`")
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if w.numel() != n:
        raise ValueError(f"`weights` must have one entry per fine-tuned model ({n}), got {w.numel()}")
    if not torch.isfinite(w).all():
        raise ValueError(f"`weights` must be finite, got {w.tolist()}")
    return w


def check_tensors(base: torch.Tensor, finetuned: Sequence[torch.Tensor], name: str = "tensor") -> None:
    """Same shape and dtype across ``base`` and every fine-tuned tensor; errors name ``name``."""
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"`base` must be a torch.Tensor, got {type(base).__name__}")
    if isinstance(finetuned, torch.Tensor) or not isinstance(finetuned, Sequence) or not finetuned:
        raise TypeError("`finetuned` must be a non-empty sequence of tensors")
    for i, t in enumerate(finetuned):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`finetuned[{i}]` must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != base.shape:
            raise ValueError(
                f"shape mismatch for {name!r}: base {tuple(base.shape)} vs model {i} {tuple(t.shape)}"
            )
        if t.dtype != base.dtype:
            raise ValueError(f"dtype mismatch for {name!r}: base {base.dtype} vs model {i} {t.dtype}")
    if not base.is_floating_point():
        raise TypeError(f"{name!r} has dtype {base.dtype}: only floating-point tensors can be merged")


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
        **params: the method's parameters — ``density`` ∈ (0, 1] (fraction kept), ``majority_sign``
            (``"total"`` | ``"frequency"``), ``t`` ∈ [0, 1] (slerp), ``generator`` or ``masks`` of shape
            ``(n, *base.shape)`` (DARE).

    Returns:
        the merged tensor, shape and dtype of ``base``.
    """
    entry, full = resolve_params(method, params)
    check_tensors(base, finetuned, name)
    n = len(finetuned)
    check_param_values(entry, full, n, base.shape, repr(name))
    w = resolve_weights(entry, weights, n)
    blocks = entry.fn(MergeInputs.from_tensors(base, finetuned, name), w, **full)
    return torch.cat([blk.to(base.dtype) for blk in blocks]).reshape(base.shape)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """The generator that draws the DARE masks of tensor ``name`` in a merge seeded with ``seed``
    (independent of the order tensors are visited in, so streaming and in-memory merges agree)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


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
    if "masks" in params or "generator" in params:
        raise TypeError("merge_state_dicts draws DARE masks from `seed`; pass `seed`, not masks/generator")
    random = resolve_params(method, params)[0].random
    out = {}
    for key, b in base.items():
        if not b.is_floating_point():
            out[key] = b.clone()
            continue
        extra = {"generator": tensor_generator(seed, key)} if random else {}
        out[key] = merge_tensors(
            method, b, [sd[key] for sd in finetuned], weights, name=key, **params, **extra
        )
    return out
