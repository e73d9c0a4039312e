"""The merge-method registry: each method declares its parameters beside its function.

A merge method is a generator function ``fn(inputs, weights, *, **params)`` (see
:mod:`tokenlab.merging.methods`) registered with :func:`register_merge_method` together with

* its keyword parameters, each a :class:`Param` — name, check, default (or :data:`REQUIRED`), a
  one-line doc, and whether it takes one value per fine-tuned model (``per_model``), exists only
  for one-tensor merges (``tensor_only``), or is set per tensor from the merge's seed (``from_seed``);
* how many fine-tuned models it takes (``min_models`` / ``max_models``), whether it takes
  per-model ``weights`` and whether it reads the base's values (``uses_base``);
* a ``constraint`` between parameters (DELLA's ``density ± epsilon``), checked after each one's own;
* ``mergekit``: for a method mergekit shares (same name), the tokenlab values that stand for
  mergekit's defaults (:class:`Mergekit`), read by :mod:`tokenlab.merging.mergekit`.

Parameters shared by several methods are declared once (``DENSITY`` …) and listed by each.
:meth:`MergeMethod.resolve` reads these declarations — and nothing else — to reject unknown and
missing parameters, fill in defaults and run each check, once per merge call and before any work;
:meth:`MergeMethod.plan` does so per tensor when values vary by tensor
(:class:`~tokenlab.merging.settings.TensorSetting`). So a new method or parameter is a function and its
declaration, never an edit here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tokenlab._checks import check_finite
from tokenlab.merging.settings import NOT_SET, evaluate, layer_positions, varies

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
        if not isinstance(value, Sequence) or isinstance(value, str):  # one value for every model
            return (value if value is self.default else self.check(self.name, value, target),) * target.n
        values = value
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


Constraint = Callable[[Mapping[str, object], torch.Tensor, Target], None]  # (values, weights, target)
Settled = tuple[torch.Tensor, dict[str, object]]  # (weights as float64, every parameter's value)


@dataclass(frozen=True)
class Mergekit:
    """How a mergekit config naming the same method maps onto it.

    ``defaults``: tokenlab parameter values standing for mergekit's defaults, used where the config
    leaves the parameter out (e.g. ``ties``: ``normalize="weight"``, ``weighted_sign=True``,
    ``density=1.0``); ``no_effect``: mergekit parameters accepted (checked as booleans) that change
    nothing in tokenlab (``int8_mask``: tokenlab's sign masks are boolean already).
    """

    defaults: Mapping[str, object] = field(default_factory=dict)
    no_effect: tuple[str, ...] = ()


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
    uses_base: bool = True  # False: the base gives only the layout (linear averages the models alone)
    constraint: Constraint | None = None
    mergekit: Mergekit | None = None

    def param(self, name: str) -> Param | None:
        """The declared parameter called ``name`` (``None`` if there is none)."""
        return next((p for p in self.params if p.name == name), None)

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

    def settle(
        self, params: Mapping[str, object], weights: Sequence[float] | torch.Tensor | None, target: Target
    ) -> Settled:
        """:meth:`resolve_weights` and :meth:`resolve`, then the method's ``constraint``."""
        values = self.resolve(params, target)
        w = self.resolve_weights(weights, target.n)
        if self.constraint is not None:
            self.constraint(values, w, target)
        return w, values

    def plan(
        self,
        params: Mapping[str, object],
        weights: Sequence[object] | torch.Tensor | None,
        n: int,
        names: Sequence[str],
        where: str,
    ) -> Callable[[str], Settled]:
        """Weights and parameter values for each tensor of a whole-model merge of tensors ``names``,
        all checked now, before any work.

        Values (or per-model entries, or weights) that are
        :class:`~tokenlab.merging.settings.TensorSetting` s are evaluated per tensor at its layer
        position (:func:`~tokenlab.merging.settings.layer_positions`); a setting that gives no value
        leaves the parameter at its default (weights at 1). Errors name the tensor.
        """
        if not varies(weights) and not any(varies(v) for v in params.values()):
            settled = self.settle(params, weights, Target(n, where=where))
            return lambda name: settled
        positions = layer_positions(names)
        table = {}
        for name in names:
            try:
                given = self._given({k: evaluate(v, name, positions[name]) for k, v in params.items()}, name)
                w = evaluate(weights, name, positions[name])
                if isinstance(w, list):
                    w = [1.0 if v is NOT_SET else v for v in w]
                table[name] = self.settle(given, w, Target(n, where=f"{where} tensor {name!r}"))
            except (TypeError, ValueError) as e:
                if repr(name) in str(e):
                    raise
                raise type(e)(f"{e} (tensor {name!r})") from e
        return table.__getitem__

    def _given(self, values: Mapping[str, object], tensor: str) -> dict[str, object]:
        """Evaluated ``values`` without the ones no setting gave (:data:`NOT_SET`); per-model entries
        left unset take the parameter's default (or raise if it is required)."""
        given = {}
        for key, value in values.items():
            if value is NOT_SET:
                continue
            param = self.param(key)
            if isinstance(value, list) and param is not None and any(v is NOT_SET for v in value):
                unset = [i for i, v in enumerate(value) if v is NOT_SET]
                if param.required:
                    raise ValueError(f"`{key}` is not set for model(s) {unset} at tensor {tensor!r}")
                value = [param.default if v is NOT_SET else v for v in value]
            given[key] = value
        return given

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
    uses_base: bool = True,
    constraint: Constraint | None = None,
    mergekit: Mergekit | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Decorator: register ``fn(inputs, weights, *, <params>) -> Iterator[Tensor]`` under ``name``.

    ``params`` declares every keyword parameter (the function's keyword-only parameters, by name,
    without defaults of their own); ``min_models``/``max_models`` bound the number of fine-tuned
    models; ``weighted=False``: the method takes no per-model ``weights``; ``uses_base=False``: it
    does not read the base's values; ``constraint(values, weights, target)`` raises for values that
    pass each parameter's check but not together; ``mergekit``: mergekit's defaults, for a method
    mergekit has under the same name.
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
        MERGE_METHODS[name] = MergeMethod(
            name, fn, tuple(params), paper, weighted, min_models, max_models, uses_base, constraint, mergekit
        )
        return fn

    return register


def merge_method(name: str) -> MergeMethod:
    """The registered method called ``name``; an unknown name raises, listing the available ones."""
    if name not in MERGE_METHODS:
        raise ValueError(f"unknown merge `method` {name!r}; available: {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[name]
