"""The benchmark harness's measuring helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import harness
from tokenlab.testing import relative_error


def test_time_fn_positive():
    ms = harness.time_fn(
        lambda: torch.randn(100, 100) @ torch.randn(100, 100), torch.device("cpu"), repeats=3
    )
    assert ms > 0


def test_peak_memory_sees_a_large_allocation():
    def alloc():
        x = torch.ones(64, 1024, 1024)  # 256 MiB, touched
        return x.sum()

    peak = harness.peak_memory(alloc, torch.device("cpu"))
    assert 200 * 2**20 < peak < 600 * 2**20


def test_environment_record():
    env = harness.environment(torch.device("cpu"))
    assert env["torch"] == torch.__version__ and env["device"].startswith("cpu")


def test_relative_error():
    a = torch.tensor([3.0, 4.0])
    assert relative_error(a, a) == 0
    assert abs(relative_error(torch.tensor([3.0, 0.0]), a) - 0.8) < 1e-12
    assert relative_error(torch.tensor([float("inf"), 1.0]), torch.tensor([1.0, 1.0])) == float("inf")
