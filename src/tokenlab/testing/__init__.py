"""Helpers for checking an implementation against its oracle (used by tests and benchmarks)."""

from __future__ import annotations

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 (Frobenius norms); ``‖out‖`` when ``ref`` is all zero.

    Non-finite entries must sit at the same places in both (same value) and are left out.
    """
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: `out` {tuple(out.shape)} vs `ref` {tuple(ref.shape)}")
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(out)) or not torch.equal(out[~finite], ref[~finite]):
        return float("inf")
    diff = torch.linalg.vector_norm(out[finite] - ref[finite]).item()
    norm = torch.linalg.vector_norm(ref[finite]).item()
    return diff / norm if norm > 0 else diff


def assert_relative_error(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> float:
    """Assert ``relative_error(out, ref) <= tol`` and return the error."""
    err = relative_error(out, ref)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} exceeds {tol:.1e}")
    return err
