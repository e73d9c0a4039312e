"""Shared fixtures. The Triton interpreter is switched on before any kernel module is imported, so
every kernel runs on CPU tensors here and is compared with its reference.

Deprecations reached through tokenlab's own calls fail the test that triggers them: pyproject's
``filterwarnings`` turns FutureWarning and DeprecationWarning attributed to a ``tokenlab`` module into
errors, and :func:`_attribute_to_tokenlab` attributes each such warning to the tokenlab frame that made
the call. (A library warns with a ``stacklevel`` that names its own caller, often its own plumbing:
transformers' ``past_key_values`` deprecation names ``torch.nn.Module.__call__``, so a module filter
alone never sees tokenlab.) Warnings of calls that tests make into libraries directly are left alone.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
import warnings
from pathlib import Path

import pytest
import torch

import tokenlab
from tokenlab.tour.toy import ToyWorld, load_toy_world

OURS = (str(Path(tokenlab.__file__).parent), str(Path(__file__).parent))  # tokenlab, the tests

# The tests run tiny models, for which extra intra-op threads only contend (up to ~100x slower on a
# busy machine); parallelism comes from pytest-xdist workers instead, one thread each.
torch.set_num_threads(1)

TOY_CACHE = Path(
    os.environ.get("TOKENLAB_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "tests")
)


@pytest.fixture(scope="session")
def tiny_world() -> ToyWorld:
    """The 'tiny' toy world (trained once per machine in ~10 s, cached under .cache/tests)."""
    return load_toy_world("tiny", cache=TOY_CACHE, device="cpu", progress=False)


def _package_root(filename: str) -> str:
    """The top-level package directory of a file under site-packages (elsewhere, the file itself)."""
    for parent in Path(filename).parents:
        if parent.parent.name in ("site-packages", "dist-packages"):
            return str(parent)
    return filename


PLUMBING = str(Path(torch.__file__).parent)  # torch.nn.Module.__call__ and the like pass calls through


def _tokenlab_caller(filename: str, lineno: int):
    """The frame of tokenlab's own code that called the library whose code warned — the warning being
    attributed to ``filename:lineno`` — or ``None``. Walks out from the attributed frame (from the
    warning call itself when that frame is not on the stack) past the warning library's own frames and
    torch's call plumbing; the caller found there is tokenlab's (or a test's), or a third library's, in
    which case the deprecated call is that library's and is left alone."""
    frame = start = sys._getframe(2)
    while frame is not None and not (frame.f_code.co_filename == filename and frame.f_lineno == lineno):
        frame = frame.f_back
    frame = frame or start
    library = _package_root(filename)
    while frame is not None and frame.f_code.co_filename.startswith((library, PLUMBING)):
        frame = frame.f_back
    if frame is not None and frame.f_code.co_filename.startswith(OURS[0]):
        return frame
    return None


def _attribute_to_tokenlab(show):
    def attributed(message: warnings.WarningMessage) -> None:
        if issubclass(message.category, (DeprecationWarning, FutureWarning)):
            caller = _tokenlab_caller(message.filename, message.lineno)
            if caller is not None and caller.f_code.co_filename != message.filename:
                # Warn again from tokenlab's frame: pyproject's filters decide (error, unless a test
                # expects the warning with pytest.warns).
                warnings.warn_explicit(
                    message.message,
                    message.category,
                    caller.f_code.co_filename,
                    caller.f_lineno,
                    module=caller.f_globals.get("__name__", "tokenlab"),
                )
                return
        show(message)

    return attributed


def pytest_configure(config: pytest.Config) -> None:
    # warnings.warn (C) calls the module's _showwarnmsg for every warning that a filter lets through;
    # catch_warnings (pytest's capture, pytest.warns) swaps what it calls, never it.
    warnings._showwarnmsg = _attribute_to_tokenlab(warnings._showwarnmsg)


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global torch RNG state, so a test that draws from the global
    stream gets the same numbers whatever ran before it on its xdist worker."""
    torch.manual_seed(0)
