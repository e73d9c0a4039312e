"""Shared fixtures. The Triton interpreter is switched on before any kernel module is imported, so
every kernel runs on CPU tensors here and is compared with its reference."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
import torch

from tokenlab.tour.toy import ToyWorld, load_toy_world

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
