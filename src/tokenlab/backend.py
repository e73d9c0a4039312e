"""The one dispatch rule between a Triton kernel and its PyTorch reference.

Every op with a fused kernel takes ``backend="auto" | "triton" | "reference"``:

* ``"reference"`` — the pure-PyTorch specification; runs anywhere, supports autograd.
* ``"triton"`` — the fused kernel. On CUDA tensors it is compiled; on CPU tensors it runs
  under the Triton interpreter, which must be switched on with ``TRITON_INTERPRET=1`` *before*
  ``triton`` is first imported (``triton.language`` builds its helpers at import, and transformers'
  model modules import triton): set it in the environment or at the very top of the script.
  tokenlab itself imports its kernel modules lazily, on first use.
* ``"auto"`` — Triton when every tensor is on CUDA and Triton imports, the reference otherwise.

Ops call :func:`resolve_backend` with their tensor arguments *by name*, so errors name the
argument the caller got wrong::

    impl = resolve_backend(backend, logits=logits)
    if impl == "triton":
        ...
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

from tokenlab._checks import check_choice, check_tensor

Backend = Literal["auto", "triton", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "reference")


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package imports on this platform."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set, so Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, **tensors: torch.Tensor | None) -> Literal["triton", "reference"]:
    """Apply the dispatch rule and return the implementation to run.

    Args:
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        **tensors: the op's tensor arguments by name (``None`` entries are skipped). They must all
            be tensors and share one device.

    Raises:
        ValueError: unknown ``backend``; tensors on different devices; ``backend="triton"``
            where no Triton kernel can run (Triton missing, or CPU tensors without
            ``TRITON_INTERPRET=1``).
        TypeError: a named argument that is not a tensor.
    """
    check_choice("backend", backend, BACKENDS)
    present = {name: check_tensor(name, t) for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"`{n}` on {t.device}" for n, t in present.items())
        raise ValueError(f"tensors must be on one device, got {where}")
    on_cuda = bool(devices) and next(iter(devices)).type == "cuda"

    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "reference"
    if not triton_available():
        raise ValueError("`backend`='triton' needs the `triton` package, which does not import here")
    if not on_cuda and not triton_interpreter_enabled():
        raise ValueError(
            "`backend`='triton' needs CUDA tensors (got CPU ones); to run the kernel on CPU, set "
            "TRITON_INTERPRET=1 before triton is first imported, or use backend='reference'"
        )
    return "triton"
