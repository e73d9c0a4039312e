"""Merge methods on one tensor, behind one registry.

Every method merges one parameter tensor of a *base* model with the same tensor of ``n``
fine-tuned models. Methods built on task vectors work on ``τ_i = θ_i − θ_base`` (*Editing Models
with Task Arithmetic*) and return ``θ_base + merge(τ_1 … τ_n)``; they share three mechanisms, each
with one home here:

* **sparsify** — :func:`trim_magnitude_` (keep the top ``density`` fraction by magnitude) or
  :func:`drop_and_rescale_` (DARE: keep each entry with probability ``density``, divide by ``density``);
* **elect sign** — :func:`elect_sign` (TIES: the sign of ``Σ_i τ_i`` ("total") or of ``Σ_i sign(τ_i)``
  ("frequency"), as in PEFT's ``calculate_majority_sign_mask``);
* **combine** — the weighted sum ``Σ_i w_i τ_i`` or :func:`disjoint_mean_` over the entries that agree
  with the elected sign.

A new method is one function ``fn(base, finetuned, weights, **params) -> Tensor`` decorated with
:func:`register_merge_method`; :func:`merge_tensors` dispatches by name and validates input.

Conventions follow ``peft.utils.merge_utils`` (the tests' oracle): trimming is per tensor with
``k = int(density · numel)``; in TIES the sign is elected on the unweighted trimmed task vectors and
the disjoint mean divides the weighted sum by the number of agreeing entries. Computation is in
float32 (float64 for float64 inputs); the result has the base tensor's dtype.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SIGN_METHODS = ("total", "frequency")

MergeFn = Callable[..., torch.Tensor]


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
    """Decorator: register ``fn(base, finetuned, weights, **params)`` under ``name``.

    ``defaults`` lists every keyword parameter the method accepts with its default value (``None``
    for required ones); :func:`merge_tensors` rejects any other keyword.
    """

    def register(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        MERGE_METHODS[name] = MergeMethod(name, fn, defaults, paper, random, weighted)
        return fn

    return register


# ------------------------------------------------------------------------------------ mechanisms
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def task_vectors(base: torch.Tensor, finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stacked task vectors ``τ_i = θ_i − θ_base``, shape ``(n, *base.shape)``, in the compute dtype."""
    tau = torch.empty((len(finetuned), *base.shape), dtype=compute_dtype(base.dtype), device=base.device)
    for row, t in zip(tau, finetuned):
        row.copy_(t).sub_(base)
    return tau


def trim_magnitude_(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES *trim*, in place: keep the ``k = int(density · numel)`` largest-magnitude entries of each
    task vector (``tau`` has shape ``(n, ...)``) and zero the rest.

    The k-th largest magnitude is found with ``kthvalue`` (linear time, no index tensor); entries
    tied with it are kept in order of position until ``k`` are kept — the same set as ``topk``
    whenever magnitudes are distinct.
    """
    flat = tau.reshape(tau.shape[0], -1)
    numel = flat.shape[1]
    k = int(density * numel)
    if k >= numel:
        return tau
    for row in flat:
        if k == 0:
            row.zero_()
            continue
        magnitude = row.abs()
        threshold = magnitude.kthvalue(numel - k + 1).values
        keep = magnitude > threshold
        tied = magnitude == threshold
        del magnitude
        need = k - int(keep.sum())
        if need < int(tied.sum()):
            tied &= tied.cumsum(0) <= need
        row.mul_(keep | tied)
    return tau


def dare_masks(
    shape: Sequence[int],
    n: int,
    density: float,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DARE keep-masks: ``n`` independent Bernoulli(``density``) draws of ``shape`` (True = keep),
    shape ``(n, *shape)``.

    Drawn one model after the other with ``torch.bernoulli`` on a ``dtype`` tensor — the same
    stream as PEFT's ``random_pruning``, so a generator seeded like the global RNG reproduces PEFT's
    masks.
    """
    p = torch.full(tuple(shape), float(density), dtype=dtype)
    masks = torch.empty((n, *shape), dtype=torch.bool)
    for row in masks:
        row.copy_(torch.bernoulli(p, generator=generator))
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
    score = tau.sum(0) if method == "total" else sum(row.sign() for row in tau)
    positive = score >= 0
    return torch.where(positive, tau > 0, tau < 0)


def disjoint_mean_(weighted_tau: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES *disjoint merge* (overwrites ``weighted_tau``): mean over the models that agree with the
    elected sign, ``Σ_{i∈A} w_i τ_i / |A|`` (0 where ``A`` is empty)."""
    count = agree.sum(0, dtype=weighted_tau.dtype).clamp_(min=1)
    return weighted_tau.mul_(agree).sum(0).div_(count)


def _weight_(tau: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return tau.mul_(weights.to(tau.dtype).view(-1, *([1] * (tau.dim() - 1))))


def _dare_tau(base, finetuned, density, generator, masks) -> torch.Tensor:
    tau = task_vectors(base, finetuned)
    if masks is None:
        masks = dare_masks(base.shape, len(finetuned), density, generator, tau.dtype)
    return drop_and_rescale_(tau, density, masks)


def _ties_combine(base, tau, weights, majority_sign) -> torch.Tensor:
    agree = elect_sign(tau, majority_sign)
    return disjoint_mean_(_weight_(tau, weights), agree).add_(base)


def _sum_combine(base, tau, weights) -> torch.Tensor:
    return _weight_(tau, weights).sum(0).add_(base)


# --------------------------------------------------------------------------------------- methods
@register_merge_method("task_arithmetic", paper="Editing Models with Task Arithmetic")
def task_arithmetic(base, finetuned, weights) -> torch.Tensor:
    """``θ = θ_base + Σ_i w_i τ_i``."""
    return _sum_combine(base, task_vectors(base, finetuned), weights)


@register_merge_method("magnitude_prune", paper="TIES-Merging (trim step only)", density=None)
def magnitude_prune(base, finetuned, weights, *, density) -> torch.Tensor:
    """``θ = θ_base + Σ_i w_i trim(τ_i, density)`` (PEFT's ``magnitude_prune``)."""
    return _sum_combine(base, trim_magnitude_(task_vectors(base, finetuned), density), weights)


@register_merge_method(
    "ties",
    paper="TIES-Merging: Resolving Interference When Merging Models",
    density=None,
    majority_sign="total",
)
def ties(base, finetuned, weights, *, density, majority_sign) -> torch.Tensor:
    """Trim, elect sign, disjoint mean: ``θ = θ_base + Σ_{i∈A} w_i τ̂_i / |A|`` with ``τ̂ = trim(τ)``
    and ``A`` the models whose ``τ̂`` agrees with the elected sign."""
    return _ties_combine(
        base, trim_magnitude_(task_vectors(base, finetuned), density), weights, majority_sign
    )


@register_merge_method(
    "dare_linear",
    paper="Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
    random=True,
    density=None,
    generator=None,
    masks=None,
)
def dare_linear(base, finetuned, weights, *, density, generator, masks) -> torch.Tensor:
    """DARE then task arithmetic: ``θ = θ_base + Σ_i w_i m_i ⊙ τ_i / density``."""
    return _sum_combine(base, _dare_tau(base, finetuned, density, generator, masks), weights)


@register_merge_method(
    "dare_ties",
    paper="Language Models are Super Mario (DARE) with TIES-Merging's sign election",
    random=True,
    density=None,
    majority_sign="total",
    generator=None,
    masks=None,
)
def dare_ties(base, finetuned, weights, *, density, majority_sign, generator, masks) -> torch.Tensor:
    """DARE's drop-and-rescale in place of TIES' trim, then elect sign and disjoint mean."""
    return _ties_combine(base, _dare_tau(base, finetuned, density, generator, masks), weights, majority_sign)


@register_merge_method(
    "slerp", paper="Animating Rotation with Quaternion Curves (SLERP)", weighted=False, t=None, eps=1e-8
)
def slerp(base, finetuned, weights, *, t, eps) -> torch.Tensor:
    """Spherical linear interpolation from ``base`` (t = 0) to the one fine-tuned tensor (t = 1).

    With ``Ω`` the angle between the flattened tensors,
    ``θ = sin((1−t)Ω)/sin Ω · θ_base + sin(tΩ)/sin Ω · θ_1``; falls back to linear interpolation when
    the tensors are (anti)parallel within ``eps`` (``sin Ω ≈ 0``) or one of them is zero.
    """
    dtype = compute_dtype(base.dtype)
    v0, v1 = base.to(dtype), finetuned[0].to(dtype)
    n0, n1 = v0.norm(), v1.norm()
    if n0 <= eps or n1 <= eps:
        return torch.lerp(v0, v1, t)
    cos = ((v0 * v1).sum() / (n0 * n1)).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    if sin <= eps:
        return torch.lerp(v0, v1, t)
    return (torch.sin((1 - t) * omega) / sin) * v0 + (torch.sin(t * omega) / sin) * v1


# ----------------------------------------------------------------------------------- entry point
def check_param_values(method: MergeMethod, params: dict, n: int, shape: torch.Size, where: str) -> None:
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


def resolve_weights(entry: MergeMethod, weights, n: int) -> torch.Tensor:
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


def check_tensors(base, finetuned, name: str = "tensor") -> None:
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
    return entry.fn(base, list(finetuned), w, **full).to(base.dtype)


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
    for i, sd in enumerate(finetuned):
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
