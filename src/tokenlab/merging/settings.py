"""Parameter values set per tensor: mergekit's tensor-name filters and layer gradients.

A whole-model merge may set any method parameter (and any per-model weight) to a
:class:`TensorSetting` instead of one value. The setting is evaluated for each tensor from its name and
its *layer position* ``t`` (:func:`layer_positions`), with mergekit's rules:

* **filters** — ``rules`` are ``(filter, value)`` pairs tried in order; the first whose ``filter`` is
  ``None`` or ``"*"`` or occurs in the tensor's name gives the value;
* **gradients** — a value that is a list of numbers is interpolated piecewise linearly over ``t``
  (``[1, 0.7, 0.1]`` is 1 at the first layer, 0.7 at the middle one, 0.1 at the last); a list of
  booleans or strings picks ``values[int(t · (len − 1))]``;
* **precedence** — when no rule matches, ``fallback`` decides: another value or setting (the next,
  less specific level of a config) or :data:`NOT_SET` — the parameter's default applies, or, for a
  ``required`` setting (mergekit's required ``weight``), an error naming ``label`` and the tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


class _NotSet:
    def __repr__(self) -> str:
        return "NOT_SET"


NOT_SET = _NotSet()  # a setting that gives no value for a tensor: the parameter's default applies

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to: the first integer component of its name
    (``"model.layers.3.mlp.up_proj.weight"`` → 3), ``None`` for tensors outside the layers."""
    m = _LAYER_INDEX.search(name)
    return None if m is None else int(m.group(1))


def layer_count(names: Iterable[str]) -> int:
    """The number of layers of a model with these tensor names (highest layer index + 1; 0 if none)."""
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """mergekit's gradient position ``t`` of each tensor: layer ``i`` of ``L`` is at ``i / (L − 1)``
    (1 when ``L = 1``); tensors outside the layers (embeddings, final norm, head) are at 0."""
    count = layer_count(names)
    positions = {}
    for name in names:
        i = layer_index(name)
        positions[name] = 0.0 if i is None else (i / (count - 1) if count > 1 else 1.0)
    return positions


def _at_position(value: object, position: float) -> object:
    """A scalar as is; a gradient (list) at ``position``."""
    if not isinstance(value, list):
        return value
    if not value:
        return NOT_SET
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        scaled = position * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    return value[int(position * (len(value) - 1))]


@dataclass(frozen=True)
class TensorSetting:
    """A parameter value that depends on the tensor (see the module docstring).

    ``rules``: ``((filter, value), ...)``, ``filter`` a substring of tensor names, ``None`` or ``"*"``
    (every tensor); ``value`` a scalar or a gradient list. ``fallback``: what applies where no rule
    matches. ``required``: a tensor no rule (and no fallback) gives a value is an error, which
    ``label`` names the parameter in (``"`weight` of models[1]"``).
    """

    rules: tuple[tuple[str | None, object], ...]
    fallback: object = NOT_SET
    label: str = "parameter"
    required: bool = False

    def at(self, name: str, position: float) -> object:
        """The value for tensor ``name`` at layer position ``position`` (:data:`NOT_SET`: none)."""
        for pattern, value in self.rules:
            if pattern is None or pattern == "*" or pattern in name:
                found = _at_position(value, position)
                if found is not NOT_SET:
                    return found
        if isinstance(self.fallback, TensorSetting):
            found = self.fallback.at(name, position)
        else:
            found = _at_position(self.fallback, position)
        if found is NOT_SET and self.required:
            raise ValueError(f"{self.label} is not set for tensor {name!r} (no filter matches it)")
        return found

    def describe(self) -> dict:
        """A JSON-ready description (what a merge record holds)."""
        fallback = self.fallback
        if isinstance(fallback, TensorSetting):
            fallback = fallback.describe()
        elif fallback is NOT_SET:
            fallback = None
        return {"rules": [[p, v] for p, v in self.rules], "fallback": fallback}


def varies(value: object) -> bool:
    """Whether ``value`` is, or (a per-model sequence) holds, a :class:`TensorSetting`."""
    if isinstance(value, TensorSetting):
        return True
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and any(isinstance(v, TensorSetting) for v in value)
    )


def evaluate(value: object, name: str, position: float) -> object:
    """``value`` for one tensor: a setting evaluated, a per-model sequence evaluated element by
    element (a list), anything else as is."""
    if isinstance(value, TensorSetting):
        return value.at(name, position)
    if varies(value):
        return [evaluate(v, name, position) for v in value]
    return value


def jsonable(value: object) -> object:
    """``value`` (a mapping, sequence or scalar) with settings described (for merge records)."""
    if isinstance(value, TensorSetting):
        return value.describe()
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
