"""The merge-method registry: each method declares its parameters beside its function.

A merge method is a generator function ``fn(inputs, weights, *, **params)`` (see
:mod:`tokenlab.merging.methods`) registered with :func:`register_merge_method` together with

* its keyword parameters, each a :class:`Param` — name, check, default (or :data:`REQUIRED`), a
  one-line doc, and whether it takes one value per fine-tuned model (``per_model``), exists only
  for one-tensor merges (``tensor_only``), or is set per tensor from the merge's seed (``from_seed``);
* how many fine-tuned models it takes (``min_models`` / ``max_models``) and whether it takes
  per-model ``weights``.

Parameters shared by several methods are declared once (``DENSITY`` …) and listed by each.
:meth:`MergeMethod.resolve` reads these declarations — and nothing else — to reject unknown and
missing parameters, fill in defaults and run each check, once per merge call and before any work;
so a new method or parameter is a function and its declaration, never an edit here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from tokenlab._checks import check_finite

MergeFn = Callable[..., Iterator[torch.Tensor]]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # the default of a parameter that has none


@dataclass(frozen=True)
class Target:
    """What one merge call's parameters are checked against: ``n`` fine-tuned models and, when one
    tensor is merged, its ``shape`` (``None``: a whole-model merge); ``where`` names it in errors."""

    n: int
    shape: tuple[int, ...] | None = None
    where: str = "tensor"


ParamCheck = Callable[[str, object, Target], object]  # (name, value, target) -> value, normalised


def check_with(check: Callable[..., object], **options: object) -> ParamCheck:
    """A :data:`ParamCheck` from a :mod:`tokenlab._checks` function and its options, e.g.
    ``check_with(check_probability, zero=False)`` for a number in (0, 1]."""

    def param_check(name: str, value: object, target: Target) -> object:
        return check(name, value, **options)

    return param_check


@dataclass(frozen=True)
class Param:
    """One keyword parameter of a merge method.

    ``check(name, value, target)`` validates a given value and returns it normalised (defaults are
    trusted, not checked). ``per_model``: one value, or a sequence of one per fine-tuned model; the
    method receives a tuple of ``n``. ``tensor_only``: only :func:`~tokenlab.merging.merge_tensors`
    takes it (whole-model merges, recipes and records do not). ``from_seed(seed, tensor_name)``:
    whole-model merges set the parameter per tensor from their ``seed``.
    """

    name: str
    check: ParamCheck
    doc: str
    default: object = REQUIRED
    per_model: bool = False
    tensor_only: bool = False
    from_seed: Callable[[int, str], object] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def resolve(self, params: Mapping[str, object], target: Target) -> object:
        """The value to pass: the given one, checked, or the default."""
        value = params.get(self.name, self.default)
        if not self.per_model:
            return value if value is self.default else self.check(self.name, value, target)
        values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value] * target.n
        if len(values) != target.n:
            raise ValueError(
                f"`{self.name}` must be one value or one per fine-tuned model ({target.n}), got {len(values)}"
            )
        return tuple(
            v if v is self.default else self.check(f"{self.name}[{i}]", v, target)
            for i, v in enumerate(values)
        )


def _count(k: int) -> str:
    return {1: "one", 2: "two", 3: "three"}.get(k, str(k))


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function, its declared parameters and model-count rule."""

    name: str
    fn: MergeFn
    params: tuple[Param, ...]
    paper: str
    weighted: bool = True  # takes per-model ``weights``
    min_models: int = 1
    max_models: int | None = None

    @property
    def defaults(self) -> dict[str, object]:
        """Every parameter with its default (``None`` for required ones)."""
        return {p.name: None if p.required else p.default for p in self.params}

    @property
    def random(self) -> bool:
        """Whether whole-model merges seed a parameter per tensor (DARE's mask generator)."""
        return any(p.from_seed is not None for p in self.params)

    @property
    def model_count(self) -> str:
        """How many fine-tuned models the method takes, in words (``"exactly one"`` …)."""
        low, high = self.min_models, self.max_models
        if low == high:
            return f"exactly {_count(low)}"
        return f"at least {_count(low)}" if high is None else f"{_count(low)} to {_count(high)}"

    def check_models(self, n: int) -> None:
        """Raise unless the method takes ``n`` fine-tuned models."""
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            raise ValueError(
                f"merge method {self.name!r} takes {self.model_count} fine-tuned model(s), got {n}"
            )

    def resolve(self, params: Mapping[str, object], target: Target) -> dict[str, object]:
        """Check ``params`` against the declarations for ``target``; return every parameter's value.

        Raises ``TypeError`` for unknown or missing parameters (and, in whole-model merges, for
        tensor-only ones), ``ValueError`` for a model count the method does not take; each
        parameter's own check raises as :mod:`tokenlab._checks` does.
        """
        names = [p.name for p in self.params]
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise TypeError(
                f"merge method {self.name!r} takes no parameter(s) {unknown}; it takes {sorted(names)}"
            )
        if target.shape is None:
            per_tensor = [p.name for p in self.params if p.tensor_only and p.name in params]
            if per_tensor:
                raise TypeError(
                    f"{target.where} merges set {per_tensor} per tensor (DARE masks from `seed`); "
                    "pass `seed`, or use merge_tensors"
                )
        missing = [p.name for p in self.params if p.required and p.name not in params]
        if missing:
            raise TypeError(f"merge method {self.name!r} needs parameter(s) {missing}")
        self.check_models(target.n)
        return {p.name: p.resolve(params, target) for p in self.params}

    def resolve_weights(self, weights: Sequence[float] | torch.Tensor | None, n: int) -> torch.Tensor:
        """Per-model weights as a float64 tensor of length ``n`` (default: all ones)."""
        if weights is None:
            return torch.ones(n, dtype=torch.float64)
        if not self.weighted:
            raise ValueError(f"merge method {self.name!r} takes no `weights`")
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if w.numel() != n:
            raise ValueError(f"`weights` must have one entry per fine-tuned model ({n}), got {w.numel()}")
        check_finite("weights", w)
        return w

    def seeded(self, seed: int, tensor: str) -> dict[str, object]:
        """The parameters a whole-model merge seeded with ``seed`` sets for tensor ``tensor``."""
        return {p.name: p.from_seed(seed, tensor) for p in self.params if p.from_seed is not None}

    def recorded(self, values: Mapping[str, object]) -> dict[str, object]:
        """``values`` without the tensor-only parameters (what a recipe or a merge record holds)."""
        return {p.name: values[p.name] for p in self.params if not p.tensor_only}


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(
    name: str,
    *,
    paper: str,
    params: Sequence[Param] = (),
    weighted: bool = True,
    min_models: int = 1,
    max_models: int | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Decorator: register ``fn(inputs, weights, *, <params>) -> Iterator[Tensor]`` under ``name``.

    ``params`` declares every keyword parameter (the function's keyword-only parameters, by name,
    without defaults of their own); ``min_models``/``max_models`` bound the number of fine-tuned
    models; ``weighted=False``: the method takes no per-model ``weights``.
    """

    def register(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        declared = [p.name for p in params]
        keywords = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        if len(set(declared)) != len(declared) or set(declared) != set(keywords):
            raise TypeError(
                f"merge method {name!r}: declared parameters {declared} do not match the keyword-only "
                f"parameters of {fn.__name__}: {keywords}"
            )
        MERGE_METHODS[name] = MergeMethod(name, fn, tuple(params), paper, weighted, min_models, max_models)
        return fn

    return register


def merge_method(name: str) -> MergeMethod:
    """The registered method called ``name``; an unknown name raises, listing the available ones."""
    if name not in MERGE_METHODS:
        raise ValueError(f"unknown merge `method` {name!r}; available: {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[name]
