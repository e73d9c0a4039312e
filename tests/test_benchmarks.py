"""Every benchmark script runs in --quick mode (tiny sizes, correctness asserted) and writes a record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p for p in BENCH_DIR.glob("*.py") if p.name != "harness.py")


def test_scripts_found():
    assert SCRIPTS, "no benchmark scripts found"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_quick(script, tmp_path, tiny_world):
    out = tmp_path / "record.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "TOKENLAB_CACHE": str(tiny_world.path.parent)}
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["quick"] is True and record["results"] and record["git_commit"]
