"""Shared benchmark harness: timing, peak memory, environment record, table printing.

Every benchmark script in this folder:

* runs the peers in the same process and prints their times side by side with ratios;
* accepts ``--quick`` (tiny sizes, CPU-friendly, *asserts correctness*; CI runs every script so)
  and ``--out PATH`` (a JSON record: results plus device, versions, git commit and command).

Timing: CUDA events on GPU, ``time.perf_counter`` on CPU; warm-up runs, then the median of
repeats. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak resident set
size sampled by a background thread (``/proc/self/statm``) above the level before the call, after
returning the C allocator's free memory to the OS (else memory freed by an earlier call is reused
without raising the resident set, and the call's allocations go uncounted).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tokenlab.testing.timing import synchronize, time_fn, timed

__all__ = ["synchronize", "time_fn", "timed"]


def parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every benchmark shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes; check correctness (CI mode)")
    p.add_argument("--out", type=Path, default=None, help="write a JSON record of the results here")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3 quick / 20 full)")
    return p


def device_from(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def enable_interpreter_if_cpu() -> None:
    """Switch on the Triton interpreter before any kernel is defined when no GPU is present."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap() -> None:
    """Return memory that the C allocator holds after earlier frees to the OS (glibc ``malloc_trim``), so
    that a later call's allocations raise the resident set instead of silently reusing it."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: reused memory may go uncounted
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory in bytes that ``fn()`` adds above what was allocated before it ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    _release_free_heap()
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak, _rss_bytes()) - base


def _git_commit() -> str:
    """The checkout's commit, ``+dirty`` when tracked files differ from it."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=here
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], capture_output=True, cwd=here).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


# Read when the benchmark starts, not when it ends: the code that ran is the code at import time.
_STARTED = (_git_commit(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def environment(device: torch.device) -> dict:
    """Device, versions, commit and date at the start of this run, and its command."""
    commit, started = _STARTED
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "device": f"{device.type}: {name}",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": commit,
        "date": started,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def print_table(rows: list[dict], columns: Sequence[str]) -> None:
    """Print ``rows`` as an aligned text table of ``columns``."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def finish(args: argparse.Namespace, device: torch.device, name: str, rows: list[dict]) -> None:
    """Print the environment line and write the JSON record when ``--out`` was given."""
    env = environment(device)
    print(
        f"# {name} | {env['device']} | torch {env['torch']} | triton {env['triton']} "
        f"| commit {env['git_commit']}"
        f"{' | quick (correctness) mode' if args.quick else ''}"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"benchmark": name, "quick": args.quick, **env, "results": rows}, indent=2)
        )
