"""Shared fixtures. The Triton interpreter is switched on before any kernel module is imported, so
every kernel runs on CPU tensors here and is compared with its reference."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
import torch

from tokenlab.toy import ToyWorld, load_toy_world

# Under pytest-xdist the workers share the cores: oversubscribed intra-op threads make the tiny models'
# forward passes up to ~100x slower, so each worker gets its share of the cores.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

TOY_CACHE = Path(
    os.environ.get("TOKENLAB_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "tests")
)


@pytest.fixture(scope="session")
def tiny_world() -> ToyWorld:
    """The 'tiny' toy world (trained once per machine in ~10 s, cached under .cache/tests)."""
    return load_toy_world("tiny", cache=TOY_CACHE, device="cpu", progress=False)
