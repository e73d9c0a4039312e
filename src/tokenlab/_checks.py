"""Argument checks: one home, one message style, used at every public entry point.

Every check names the argument and says what it must be, then what it got::

    ArgumentTypeError: `temperature` must be a finite number > 0, got 'hot'
    ValueError:        `top_p` must be a finite number in (0, 1], got 1.5
    ValueError:        `group_size` must be an int >= 1, got 0

A value of the right kind outside its range is a ``ValueError``. A wrong *kind* of value (a string
where a number goes, a bool or a float where an int goes) is an :class:`ArgumentTypeError`, which is
both a ``TypeError`` and a ``ValueError`` (as numpy's ``AxisError`` is both an ``IndexError`` and a
``ValueError``): ``except TypeError`` and ``except ValueError`` both catch it. ``bool`` is never
accepted as a number. Each check returns the value normalised (``float``, ``int``, the tensor), so an
entry point validates and converts in one line, once, before any work; inner layers trust their callers.
This module sits at the bottom of the package: it imports only ``torch``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Sequence

import torch

__all__ = [
    "ArgumentTypeError",
    "check_bool",
    "check_choice",
    "check_finite",
    "check_generator",
    "check_int",
    "check_number",
    "check_positive",
    "check_probability",
    "check_shape",
    "check_strings",
    "check_tensor",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind (e.g. a ``str`` or ``bool`` where a number goes)."""


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def _outside(x: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    return (low is not None and (x <= low if low_open else x < low)) or (
        high is not None and (x >= high if high_open else x > high)
    )


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    floating: bool = False,
    integer: bool = False,
) -> torch.Tensor:
    """Return ``value`` if it is a tensor (of ``ndim`` dimensions, floating-point or integer when
    asked), else raise naming ``name``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"`{name}` must be an integer tensor, got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {tuple(value.shape)}")
    return value


def check_shape(name: str, value: torch.Tensor, shape: tuple[int, ...], of: str) -> torch.Tensor:
    """Return ``value`` if its shape is ``shape`` (``of`` says whose shape that is, e.g. ```logps```)."""
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"`{name}` shape {tuple(value.shape)} must equal {of} {tuple(shape)}")
    return value


def check_finite(name: str, value: torch.Tensor | None) -> None:
    """Raise a ``ValueError`` naming ``name`` when the tensor holds NaN or infinity."""
    if value is not None and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` contains NaN or infinite values")


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool``."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"`{name}` must be a bool, got {value!r}")
    return value


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite ``float`` in the interval given by ``low``/``high`` (closed unless
    ``low_open``/``high_open``)."""
    message = f"`{name}` must be a finite number{_interval(low, high, low_open, high_open)}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(message)
    x = float(value)
    if not math.isfinite(x) or _outside(x, low, high, low_open, high_open):
        raise ValueError(message)
    return x


def check_positive(name: str, value: object) -> float:
    """Return ``value`` as a finite ``float`` > 0."""
    return check_number(name, value, low=0.0, low_open=True)


def check_probability(name: str, value: object, *, zero: bool = True, one: bool = True) -> float:
    """Return ``value`` as a ``float`` in [0, 1] (``zero=False``: excluding 0; ``one=False``: excluding 1)."""
    return check_number(name, value, low=0.0, high=1.0, low_open=not zero, high_open=not one)


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an ``int`` in ``[low, high]`` (either bound optional)."""
    message = f"`{name}` must be an int{_interval(low, high, False, False)}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(message)
    if _outside(int(value), low, high, False, False):
        raise ValueError(message)
    return int(value)


def check_generator(
    name: str, value: object, device: torch.device | str | None = None
) -> torch.Generator | None:
    """Return ``value`` if it is ``None`` or a ``torch.Generator`` (on the type of ``device`` — where
    its random numbers are drawn — when ``device`` is given)."""
    if value is None:
        return None
    if not isinstance(value, torch.Generator):
        raise ArgumentTypeError(f"`{name}` must be a torch.Generator or None, got {type(value).__name__}")
    if device is not None and value.device.type != torch.device(device).type:
        kind = torch.device(device).type
        raise ValueError(
            f"`{name}` must be a torch.Generator on {kind} (where its numbers are drawn), got one on "
            f"{value.device.type}: create it with torch.Generator(device={kind!r})"
        )
    return value


def check_strings(name: str, value: object) -> list[str]:
    """Return ``value`` as a list if it is a sequence of ``str`` (a lone ``str`` is not one)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ArgumentTypeError(f"`{name}` must be a sequence of str, got {type(value).__name__}")
    others = [type(v).__name__ for v in value if not isinstance(v, str)]
    if others:
        raise ArgumentTypeError(
            f"`{name}` must be a sequence of str, got a {type(value).__name__} holding {others[0]}"
        )
    return list(value)


def check_choice(name: str, value: object, choices: Collection[object]) -> object:
    """Return ``value`` if it is one of ``choices``."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")
    return value
