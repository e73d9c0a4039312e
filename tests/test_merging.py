"""Merging: methods vs PEFT's merge_utils, TIES by hand, SLERP invariants, Self-Positioning on toy
fine-tunes, streaming checkpoint merges vs in-memory merges, recipes/CLI and bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tokenlab._atomic import _host
from tokenlab._checks import check_number
from tokenlab.merging import (
    MERGE_METHODS,
    MergeInputs,
    Param,
    load_recipe,
    magprune_probabilities,
    merge_checkpoints,
    merge_from_recipe,
    merge_state_dicts,
    merge_tensors,
    probe_loss,
    register_merge_method,
    self_positioning,
    weight_,
)
from tokenlab.merging.cli import main as cli_main
from tokenlab.merging.methods import DENSITY
from tokenlab.merging.registry import Target, check_with
from tokenlab.tour.merging import DOMAINS, domain_ids, toy_finetunes

SHAPES = [(7, 13), (33,), (4, 5, 6)]
PEFT_METHODS = {
    "task_arithmetic": lambda tv, w, p: merge_utils.task_arithmetic(tv, w),
    "magnitude_prune": lambda tv, w, p: merge_utils.magnitude_prune(tv, w, p["density"]),
    "ties": lambda tv, w, p: merge_utils.ties(tv, w, p["density"], p["majority_sign"]),
    "dare_linear": lambda tv, w, p: merge_utils.dare_linear(tv, w, p["density"]),
    "dare_ties": lambda tv, w, p: merge_utils.dare_ties(tv, w, p["density"], p["majority_sign"]),
}


def _models(shape, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    return base, [base + torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


# ------------------------------------------------------------------------------- methods vs PEFT
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {}),
        ("magnitude_prune", {"density": 0.3}),
        ("ties", {"density": 0.4, "majority_sign": "total"}),
        ("ties", {"density": 0.7, "majority_sign": "frequency"}),
        ("dare_linear", {"density": 0.5}),
        ("dare_ties", {"density": 0.3, "majority_sign": "total"}),
        ("dare_ties", {"density": 0.6, "majority_sign": "frequency"}),
    ],
)
def test_methods_equal_peft(method, params, shape, dtype):
    base, finetuned = _models(shape, 3, dtype)
    weights = torch.tensor([0.5, 1.0, 0.7], dtype=dtype)
    task_vectors = [t - base for t in finetuned]
    extra = {}
    if MERGE_METHODS[method].random:  # PEFT draws its masks from the global RNG, in model order
        torch.manual_seed(1234)
        extra = {"generator": torch.Generator().manual_seed(1234)}
    expected = base + PEFT_METHODS[method](task_vectors, weights, params)
    inputs = [base.clone(), *(t.clone() for t in finetuned)]
    out = merge_tensors(method, base, finetuned, weights, **params, **extra)
    assert all(torch.equal(x, y) for x, y in zip(inputs, [base, *finetuned]))  # inputs untouched
    assert out.dtype == dtype and out.shape == base.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_dare_explicit_masks_and_rescale():
    base, finetuned = _models((50, 40), 2, torch.float64)
    masks = torch.rand(2, 50, 40, generator=torch.Generator().manual_seed(3)) < 0.25
    out = merge_tensors("dare_linear", base, finetuned, [1.0, 1.0], density=0.25, masks=masks)
    expected = base + sum(m * (t - base) / 0.25 for m, t in zip(masks, finetuned))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_ties_by_hand_with_sign_conflicts():
    base = torch.ones(4, dtype=torch.float64)
    tau = torch.tensor(
        [[10.0, -1.0, 2.0, 0.5], [-3.0, -2.0, 0.5, 1.0], [-2.0, 3.0, -1.0, 0.1]], dtype=torch.float64
    )
    finetuned = list(base + tau)
    # density 0.5 keeps 2 of 4 per model: [10, 0, 2, 0], [-3, -2, 0, 0], [-2, 3, 0, 0]
    # total: sums [5, 1, 2, 0] → signs [+, +, +, +(tie)] → means [10, 3, 2, 0]
    total = merge_tensors("ties", base, finetuned, density=0.5, majority_sign="total")
    torch.testing.assert_close(total, base + torch.tensor([10.0, 3.0, 2.0, 0.0], dtype=torch.float64))
    # frequency: sign counts [-1, 0, 1, 0] → signs [-, +, +, +] → means [(-3-2)/2, 3, 2, 0]
    freq = merge_tensors("ties", base, finetuned, density=0.5, majority_sign="frequency")
    torch.testing.assert_close(freq, base + torch.tensor([-2.5, 3.0, 2.0, 0.0], dtype=torch.float64))
    # weights scale each agreeing entry before the disjoint mean: entry 0 = (2·(-3) + 1·(-2)) / 2
    weighted = merge_tensors("ties", base, finetuned, [1.0, 2.0, 1.0], density=0.5, majority_sign="frequency")
    assert weighted[0].item() == pytest.approx(1.0 - 4.0)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"density": 0.3}),
        ("dare_ties", {"density": 0.4}),
        ("slerp", {"t": 0.4}),
        ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.1, "rescale": "l1", "weighted_sign": True}),
        ("della", {"density": 0.5, "epsilon": 0.2}),
        ("della_linear", {"density": [0.3, 0.5, 0.7], "epsilon": 0.1, "rescale": "l1"}),
        ("model_stock", {}),
        ("model_stock", {"filter_wise": True}),
        ("linear", {}),
    ],
)
def test_row_blocks_do_not_change_the_result(method, params):
    """Streaming in row blocks (as checkpoint merges do) gives the whole-tensor result, bit for bit
    (2-D rows, and a 1-D tensor cut into pieces: DELLA ranks a 1-D tensor whole)."""
    n = 1 if method == "slerp" else 3
    entry = MERGE_METHODS[method]
    if entry.random:
        params = {**params, "generator": torch.Generator().manual_seed(9)}
    weights = torch.ones(n, dtype=torch.float64)
    for shape in ((37, 11), (53,)):
        base, finetuned = _models(shape, n, torch.float32, seed=5)
        results = []
        for block_elements in (11, 50, 10_000):  # one row, a few rows, everything
            inputs = MergeInputs.from_tensors(base, finetuned)
            inputs = dataclasses.replace(inputs, block_elements=block_elements)
            if entry.random:
                params["generator"].manual_seed(9)
            full = entry.resolve(params, Target(n, tuple(base.shape)))
            results.append(torch.cat(list(entry.fn(inputs, weights, **full))))
        assert len(inputs.blocks()) == 1 and all(torch.equal(r, results[-1]) for r in results)


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 4)], ids=str)
def test_every_method_merges_0d_and_empty_tensors(method, shape):
    """Scalars (e.g. a learned temperature) and tensors with no entries (a zero-width layer) merge
    like any other: same shape and dtype, finite, an empty result for an empty tensor."""
    entry = MERGE_METHODS[method]
    n = 1 if method == "slerp" else 3
    base, finetuned = _models(shape, n, torch.float32)
    params = {name: value for name, value in (("density", 0.5), ("t", 0.3)) if entry.param(name)}
    if entry.random:
        params["generator"] = torch.Generator().manual_seed(0)
    out = merge_tensors(method, base, finetuned, **params)
    assert out.shape == base.shape and out.dtype == base.dtype and torch.isfinite(out).all()


def test_trim_keeps_ties_at_the_threshold():
    base = torch.zeros(4)
    out = merge_tensors("magnitude_prune", base, [torch.tensor([1.0, -1.0, 1.0, 0.5])], density=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0, 1.0, 0.0]))  # k = 2, three tied at |1|


# ------------------------------------------------------- linear, Breadcrumbs, DELLA, Model Stock
def test_linear_by_hand_and_one_model_is_that_model():
    base, finetuned = _models((6, 5), 2, torch.float64)
    out = merge_tensors("linear", base, finetuned, [1.0, 3.0])
    torch.testing.assert_close(out, (finetuned[0] + 3 * finetuned[1]) / 4, rtol=0, atol=1e-12)
    raw = merge_tensors("linear", base, finetuned, [1.0, 3.0], normalize="none")
    torch.testing.assert_close(raw, finetuned[0] + 3 * finetuned[1], rtol=0, atol=1e-12)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):  # one model: that model, bit for bit
        b, (m,) = _models((7, 3), 1, torch.float32)
        assert torch.equal(merge_tensors("linear", b.to(dtype), [m.to(dtype)]), m.to(dtype))
    assert torch.equal(merge_tensors("linear", base, finetuned[:1], [0.25]), finetuned[0])
    with pytest.raises(ValueError, match="sum to 0"):
        merge_tensors("linear", base, finetuned, [1.0, -1.0])


def test_task_arithmetic_scaling_and_weight_normalization():
    base, finetuned = _models((4, 3), 2, torch.float64)
    tau = [t - base for t in finetuned]
    out = merge_tensors("task_arithmetic", base, finetuned, [1.0, 3.0], normalize="weight", scaling=0.5)
    torch.testing.assert_close(out, base + 0.5 * (tau[0] + 3 * tau[1]) / 4, rtol=0, atol=1e-12)


def test_ties_mergekit_conventions_by_hand():
    """The sign elected on the weighted task vectors and the disjoint merge normalized by the agreeing
    weights (mergekit) differ from PEFT's (unweighted sign, mean over the agreeing count) at entry 1."""
    base = torch.ones(4, dtype=torch.float64)
    tau = torch.tensor(
        [[10.0, -1.0, 2.0, 0.5], [-3.0, -2.0, 0.5, 1.0], [-2.0, 3.0, -1.0, 0.1]], dtype=torch.float64
    )
    finetuned, w = list(base + tau), [1.0, 2.0, 1.0]
    # trimmed (density 0.5): [10, 0, 2, 0], [-3, -2, 0, 0], [-2, 3, 0, 0]; weighted: model 1 doubled
    # weighted sums [2, -1, 2, 0] → signs [+, -, +, +]; agreeing weighted entries / their weights:
    mergekit = merge_tensors("ties", base, finetuned, w, density=0.5, weighted_sign=True, normalize="weight")
    torch.testing.assert_close(mergekit, base + torch.tensor([10.0, -4.0 / 2, 2.0, 0.0], dtype=torch.float64))
    unnormalized = merge_tensors(
        "ties", base, finetuned, w, density=0.5, weighted_sign=True, normalize="none"
    )
    torch.testing.assert_close(unnormalized, base + torch.tensor([10.0, -4.0, 2.0, 0.0], dtype=torch.float64))
    # PEFT: unweighted sums [5, 1, 2, 0] → all +; entry 1 = 1·3 / 1
    peft = merge_tensors("ties", base, finetuned, w, density=0.5)
    torch.testing.assert_close(peft, base + torch.tensor([10.0, 3.0, 2.0, 0.0], dtype=torch.float64))


def test_l1_rescale_restores_each_task_vector_norm():
    """mergekit's rescale: the kept entries, scaled so each sparsified task vector keeps its L1 norm."""
    base, (ft,) = _models((20, 9), 1, torch.float64)
    tau = ft - base
    for method, params in (
        ("ties", {"density": 0.3, "rescale": "l1"}),
        ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "rescale": "l1"}),
        ("dare_linear", {"density": 0.4, "rescale": "l1", "generator": torch.Generator().manual_seed(0)}),
        (
            "della_linear",
            {"density": 0.4, "epsilon": 0.2, "rescale": "l1", "masks": torch.rand(1, 20, 9) < 0.4},
        ),
    ):
        delta = merge_tensors(method, base, [ft], **params) - base
        assert delta.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-12), method
        assert 0 < (delta != 0).double().mean() < 0.7, method


def test_breadcrumbs_drops_both_tails_by_hand():
    tau = torch.tensor([0.1, -0.5, 2.0, -3.0, 0.3, 1.0, -0.05, 0.7, 4.0, -1.5], dtype=torch.float64)
    base = torch.zeros(10, dtype=torch.float64)
    # density 0.6 keeps 6 of 10; gamma 0.2 drops the 2 largest (4, -3), hence the 2 smallest (-0.05, 0.1)
    out = merge_tensors("breadcrumbs", base, [tau], density=0.6, gamma=0.2)
    torch.testing.assert_close(out, tau * torch.tensor([0, 1, 1, 0, 1, 1, 0, 1, 0, 1], dtype=torch.float64))
    # gamma larger than 1 − density: fewer of the largest are dropped, none of the smallest
    out = merge_tensors("breadcrumbs", base, [tau], density=0.6, gamma=0.5)
    torch.testing.assert_close(out, tau * (tau.abs() <= 1.0))
    # zero tails: task arithmetic (and density 1 keeps everything, as in mergekit)
    base3, finetuned = _models((9, 4), 3, torch.float64)
    ta = merge_tensors("task_arithmetic", base3, finetuned, [0.5, 1.0, 0.7])
    for gamma in (0.0, 0.2):
        tails = merge_tensors("breadcrumbs", base3, finetuned, [0.5, 1.0, 0.7], density=1.0, gamma=gamma)
        assert torch.equal(tails, ta)
    tiesless = merge_tensors(
        "breadcrumbs_ties", base3, finetuned, density=1.0, gamma=0.0, majority_sign="total"
    )
    assert torch.equal(tiesless, merge_tensors("ties", base3, finetuned, density=1.0))


def test_della_keep_probabilities_by_hand():
    row = torch.tensor([[0.1, -0.4, 0.2, 0.3]], dtype=torch.float64)
    # magnitude ranks 0, 3, 1, 2 → p = 0.5 − 0.2 + 0.4 · rank / 3
    expected = torch.tensor([[0.3, 0.7, 0.3 + 0.4 / 3, 0.3 + 0.8 / 3]], dtype=torch.float64)
    torch.testing.assert_close(magprune_probabilities(row, 0.5, 0.2), expected, rtol=0, atol=1e-15)
    base = torch.zeros(1, 4, dtype=torch.float64)
    masks = torch.tensor([[[True, True, False, True]]])
    out = merge_tensors("della_linear", base, [row], density=0.5, epsilon=0.2, masks=masks)
    torch.testing.assert_close(out, row * masks[0] / expected)
    with pytest.raises(ValueError, match="density − epsilon"):
        merge_tensors("della", base, [row], density=0.2, epsilon=0.3)


@pytest.mark.parametrize(("della", "dare"), [("della", "dare_ties"), ("della_linear", "dare_linear")])
def test_della_at_uniform_probabilities_is_dare(della, dare):
    base, finetuned = _models((23, 7), 3, torch.float32)
    density = [0.3, 0.5, 0.8]
    got = merge_tensors(della, base, finetuned, [1.0, 0.5, 2.0], density=density, epsilon=0.0,
                        generator=torch.Generator().manual_seed(4))  # fmt: skip
    want = merge_tensors(dare, base, finetuned, [1.0, 0.5, 2.0], density=density,
                         generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_drops_keep_the_task_vector_in_expectation(method):
    """Dividing by the keep probability keeps ``E[m ⊙ τ / p] = τ``: the mean over 400 seeds ≈ task
    arithmetic; the per-entry std of the mean is ≤ |τ|·sqrt((1−p)/p)/20·sqrt(2) ≈ 0.07|τ| at p ≥ 0.4:
    a 5σ bound on the norm."""
    base, finetuned = _models((50, 40), 2, torch.float64)
    params = {"density": 0.5} | ({"epsilon": 0.1} if method == "della_linear" else {})
    draws = [
        merge_tensors(method, base, finetuned, generator=torch.Generator().manual_seed(s), **params)
        for s in range(400)
    ]
    ta = merge_tensors("task_arithmetic", base, finetuned)
    assert (torch.stack(draws).mean(0) - ta).norm() / (ta - base).norm() < 0.15


def _equiangular(n: int, cos: float, d: int = 16) -> torch.Tensor:
    """``n`` task vectors of equal norms with every pairwise cosine ``cos``: ``a·u_0 + b·u_i``
    (orthonormal ``u``), ``cos = a² / (a² + b²)``."""
    u = torch.linalg.qr(
        torch.randn(d, n + 1, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    )[0]
    a, b = math.sqrt(cos), math.sqrt(1 - cos)
    return torch.stack([a * u[:, 0] + b * u[:, i + 1] for i in range(n)]) * 3.0


@pytest.mark.parametrize(("n", "cos"), [(2, 0.5), (3, 0.2), (5, 0.9)])
def test_model_stock_ratio_is_the_papers_formula(n, cos):
    base = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tau = _equiangular(n, cos)
    t = n * cos / (1 + (n - 1) * cos)  # Model Stock, eq. for t with n fine-tuned models at angle θ
    out = merge_tensors("model_stock", base, list(base + tau))
    torch.testing.assert_close(out, base + t * tau.mean(0), rtol=0, atol=1e-12)
    # per filter: each row of a 2-D tensor has its own angle and ratio
    rows = torch.stack([_equiangular(n, c) for c in (cos, 0.6)], dim=1)  # (n, 2, 16)
    base2 = torch.zeros(2, 16, dtype=torch.float64)
    out = merge_tensors("model_stock", base2, list(rows), filter_wise=True)
    for r, c in enumerate((cos, 0.6)):
        t = n * c / (1 + (n - 1) * c)
        torch.testing.assert_close(out[r], t * rows[:, r].mean(0), rtol=0, atol=1e-12)
    # opposite pair: 1 + (n − 1) cos θ = 0 has no finite ratio → the base
    assert torch.equal(merge_tensors("model_stock", base, [base + tau[0], base - tau[0]]), base)


def test_slerp_dot_threshold_falls_back_to_linear():
    u0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    u1 = torch.tensor([math.cos(0.02), math.sin(0.02)], dtype=torch.float64)  # cos Ω = 0.9998
    lerp = 0.7 * u0 + 0.3 * u1
    linear = merge_tensors("slerp", u0, [u1], t=0.3, dot_threshold=0.9995)
    torch.testing.assert_close(linear, lerp, rtol=0, atol=1e-15)
    spherical = merge_tensors("slerp", u0, [u1], t=0.3)  # on the unit circle at angle 0.3 Ω
    expected = torch.tensor([math.cos(0.006), math.sin(0.006)], dtype=torch.float64)
    torch.testing.assert_close(spherical, expected, rtol=0, atol=1e-15)
    assert (spherical - lerp).norm() > 1e-6


# ----------------------------------------------------------------------------------------- SLERP
def test_slerp_endpoints_and_unit_norm():
    base, (other,) = _models((6, 5), 1, torch.float64)
    torch.testing.assert_close(merge_tensors("slerp", base, [other], t=0.0), base, rtol=0, atol=1e-12)
    torch.testing.assert_close(merge_tensors("slerp", base, [other], t=1.0), other, rtol=0, atol=1e-12)
    u0, u1 = base / base.norm(), other / other.norm()
    omega = torch.arccos((u0 * u1).sum())
    for t in (0.1, 0.25, 0.5, 0.9):
        mid = merge_tensors("slerp", u0, [u1], t=t)
        assert mid.norm().item() == pytest.approx(1.0, abs=1e-12)
        # the interpolant sits at angle t·Ω from the start (on the great circle)
        assert torch.arccos((mid * u0).sum().clamp(-1, 1)).item() == pytest.approx(t * omega.item(), abs=1e-9)
    # parallel inputs fall back to linear interpolation
    torch.testing.assert_close(merge_tensors("slerp", u0, [2 * u0], t=0.5), 1.5 * u0)


def test_merge_tensors_bad_input():
    base, finetuned = _models((4, 4), 2, torch.float32)
    with pytest.raises(ValueError, match="unknown merge `method`"):
        merge_tensors("average_of_vibes", base, finetuned)
    for density in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"`density` must be a finite number in \(0, 1\]"):
            merge_tensors("ties", base, finetuned, density=density)
    with pytest.raises(ValueError, match=r"shape mismatch for 'layer\.w'"):
        merge_tensors("task_arithmetic", base, [finetuned[0], torch.zeros(4, 5)], name="layer.w")
    with pytest.raises(ValueError, match="dtype mismatch for 'tensor'"):
        merge_tensors("task_arithmetic", base, [finetuned[0].double()])
    with pytest.raises(ValueError, match="`weights` must have one entry"):
        merge_tensors("task_arithmetic", base, finetuned, [1.0])
    with pytest.raises(TypeError, match="takes no parameter"):
        merge_tensors("task_arithmetic", base, finetuned, density=0.5)
    with pytest.raises(TypeError, match="needs parameter"):
        merge_tensors("ties", base, finetuned)
    with pytest.raises(ValueError, match="`majority_sign`"):
        merge_tensors("ties", base, finetuned, density=0.5, majority_sign="mode")
    with pytest.raises(ValueError, match="exactly one"):
        merge_tensors("slerp", base, finetuned, t=0.5)
    with pytest.raises(ValueError, match="`masks`"):
        merge_tensors("dare_linear", base, finetuned, density=0.5, masks=torch.ones(3, 4, 4))


@pytest.fixture
def scaled_sum():
    """A throwaway method registered as a new one is: a function and its declaration, nothing else."""

    @register_merge_method(
        "test_scaled_sum",
        paper="(test)",
        params=(Param("scale", check_with(check_number, low=0.0), "factor", default=1.0, per_model=True),),
        min_models=2,
    )
    def scaled_sum(inputs, weights, *, scale):
        factors = weights * torch.tensor(scale, dtype=torch.float64)
        for a, b in inputs.blocks():
            yield weight_(inputs.task_vectors(a, b), factors).sum(0).add_(inputs.base_rows(a, b))

    yield "test_scaled_sum"
    del MERGE_METHODS["test_scaled_sum"]


def test_declared_parameters_are_resolved_generically(scaled_sum):
    base, finetuned = _models((5, 3), 2, torch.float64)
    ta = merge_tensors("task_arithmetic", base, finetuned, [0.5, 2.0])
    torch.testing.assert_close(merge_tensors(scaled_sum, base, finetuned, scale=[0.5, 2.0]), ta)
    torch.testing.assert_close(merge_tensors(scaled_sum, base, finetuned, [0.5, 2.0]), ta)  # default 1 each
    with pytest.raises(ValueError, match=r"`scale\[1\]` must be a finite number >= 0"):
        merge_tensors(scaled_sum, base, finetuned, scale=[1.0, -1.0])
    with pytest.raises(ValueError, match=r"`scale` must be one value or one per fine-tuned model \(2\)"):
        merge_tensors(scaled_sum, base, finetuned, scale=[1.0])
    with pytest.raises(ValueError, match="takes at least two fine-tuned model"):
        merge_tensors(scaled_sum, base, finetuned[:1])
    # a recipe's model entries may carry the method's per-model parameters
    recipe = load_recipe({"method": scaled_sum, "base": "b", "models": [{"path": "x", "scale": 0.5}, "y"]})
    assert recipe["parameters"] == {"scale": [0.5, 1.0]}
    # whole-model merges set tensor-only parameters (DARE's generator) themselves
    with pytest.raises(TypeError, match="per tensor"):
        merge_state_dicts("dare_linear", {"w": base}, [{"w": t} for t in finetuned], density=0.5, masks=None)
    # the declaration must name exactly the function's keyword-only parameters
    with pytest.raises(TypeError, match="do not match the keyword-only parameters"):
        register_merge_method("test_mismatch", paper="(test)", params=(DENSITY,))(lambda inputs, w: None)
    assert "test_mismatch" not in MERGE_METHODS


# ----------------------------------------------------------------------------- Self-Positioning
@pytest.fixture(scope="module")
def finetunes(tiny_world):
    return toy_finetunes(tiny_world, steps=25, max_bytes=60_000)


def test_self_positioning_lowers_probe_loss(tiny_world, finetunes):
    models = finetunes
    ctx = tiny_world.config.context_length
    probe = []
    for domain in DOMAINS:
        ids = domain_ids(tiny_world, "train", domain, 60_000)
        windows = ids[: 4 * ctx].view(4, ctx)
        probe += [{"input_ids": w, "labels": w} for w in windows.split(2)]
    ft = list(models.values())
    uniform = probe_loss(tiny_world.target, ft, [0.5, 0.5], probe)
    result = self_positioning(tiny_world.target, ft, probe, steps=12, lr=0.5)
    learned = probe_loss(tiny_world.target, ft, result.coefficients, probe)
    assert result.losses[0] == pytest.approx(
        probe_loss(tiny_world.target, ft, [0.5, 0.5], probe[:1]), rel=1e-5
    )
    assert learned < uniform - 1e-3, (uniform, learned, result.coefficients)
    # the learned coefficients are task-arithmetic weights: the merged state dict scores the same
    merged = merge_state_dicts(
        "task_arithmetic", tiny_world.target.state_dict(), [m.state_dict() for m in ft], result.coefficients
    )
    model = LlamaForCausalLM(tiny_world.target.config)
    model.load_state_dict(merged)
    with torch.no_grad():
        direct = sum(model(**b).loss.item() for b in probe) / len(probe)
    assert direct == pytest.approx(learned, rel=1e-4)


def test_self_positioning_gradient_matches_finite_differences(tiny_world, finetunes):
    """One plain SGD step moves α by −lr·∂L/∂α; compare ∂L/∂α with central differences of the loss."""
    models = finetunes
    ft = list(models.values())
    ids = domain_ids(tiny_world, "train", "tests", 60_000)[: 2 * 64].view(2, 64)
    probe = [{"input_ids": ids, "labels": ids}]
    start, lr, h = [0.3, 0.6], 1e-3, 1e-2
    step = self_positioning(tiny_world.target, ft, probe, steps=1, lr=lr, momentum=0.0, init=start)
    grad = (torch.tensor(start) - step.coefficients) / lr
    for i in range(2):
        plus, minus = list(start), list(start)
        plus[i] += h
        minus[i] -= h
        fd = (
            probe_loss(tiny_world.target, ft, plus, probe) - probe_loss(tiny_world.target, ft, minus, probe)
        ) / (2 * h)
        assert grad[i].item() == pytest.approx(fd, rel=0.02, abs=1e-4), (i, grad, fd)


def test_merge_state_dicts_bad_input():
    base = {"w": torch.zeros(2, 2)}
    with pytest.raises(TypeError, match="not one state dict"):  # was "model 0 ... different tensors"
        merge_state_dicts("task_arithmetic", base, {"w": torch.ones(2, 2)})
    with pytest.raises(TypeError, match=r"`finetuned\[0\]`"):
        merge_state_dicts("task_arithmetic", base, [torch.ones(2, 2)])
    with pytest.raises(TypeError, match="`base`"):
        merge_state_dicts("task_arithmetic", [torch.zeros(2, 2)], [base])


def test_probe_loss_bad_input():
    """Too few coefficients used to be dropped silently by zip (a merge of fewer models)."""
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    base, a, b = (LlamaForCausalLM(config) for _ in range(3))
    ids = torch.randint(0, 32, (1, 8))
    probe = [{"input_ids": ids, "labels": ids}]
    with pytest.raises(ValueError, match="`coefficients` must hold one number per fine-tuned model"):
        probe_loss(base, [a, b], [0.5], probe)
    with pytest.raises(ValueError, match="`probe` must be a non-empty"):
        probe_loss(base, [a, b], [0.5, 0.5], [])
    # a negative λ rewards large coefficients, momentum ≥ 1 diverges: rejected before any step
    # (a bool where an int goes is the wrong kind of value: TypeError, as everywhere in tokenlab._checks)
    for kwargs, name, error in (
        ({"regularization": -0.1}, "regularization", ValueError),
        ({"momentum": 1.0}, "momentum", ValueError),
        ({"lr": float("nan")}, "lr", ValueError),
        ({"steps": True}, "steps", TypeError),
    ):
        with pytest.raises(error, match=f"`{name}`"):
            self_positioning(base, [a, b], probe, **kwargs)
    assert math.isfinite(probe_loss(base, [a, b], [0.5, 0.5], probe))


# -------------------------------------------------------------------------- checkpoint merges
def _tree_hash(paths) -> dict[str, str]:
    return {
        str(f): hashlib.sha256(f.read_bytes()).hexdigest()
        for p in paths
        for f in sorted(Path(p).rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_world):
    """A base and three fine-tuned tiny Llamas (random, the fine-tunes = base + noise); two
    fine-tunes are saved sharded. The base directory also holds the toy tokenizer."""
    root = tmp_path_factory.mktemp("ckpts")
    config = LlamaConfig(
        vocab_size=len(tiny_world.tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        tie_word_embeddings=False,
        eos_token_id=tiny_world.tokenizer.eos_token_id,
        bos_token_id=tiny_world.tokenizer.bos_token_id,
        pad_token_id=tiny_world.tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    dirs = [root / "base"]
    base.save_pretrained(dirs[0])
    tiny_world.tokenizer.save_pretrained(dirs[0])
    for i in range(3):
        ft = LlamaForCausalLM(config)
        ft.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()})
        dirs.append(root / f"ft{i}")
        ft.save_pretrained(dirs[-1], max_shard_size="40KB" if i != 1 else "50MB")
    assert (dirs[1] / "model.safetensors.index.json").exists() and (dirs[2] / "model.safetensors").exists()
    return dirs


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize(
    ("method", "n", "weights", "params"),
    [
        ("ties", 3, [0.5, 1.0, 0.8], {"density": 0.4, "majority_sign": "frequency"}),
        ("dare_ties", 3, None, {"density": 0.5}),
        ("dare_linear", 2, [0.6, 0.4], {"density": 0.3}),
        ("slerp", 1, None, {"t": 0.3}),
    ],
)
def test_checkpoint_merge_equals_in_memory(checkpoints, tmp_path, method, n, weights, params):
    base_dir, *ft_dirs = checkpoints
    before = _tree_hash(checkpoints)
    out = merge_checkpoints(
        method,
        base_dir,
        ft_dirs[:n],
        tmp_path / "merged",
        weights,
        seed=7,
        max_shard_size="60KB",
        progress=False,
        **params,
    )
    assert _tree_hash(checkpoints) == before
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded output
    expected = merge_state_dicts(
        method, _load_dir(base_dir), [_load_dir(d) for d in ft_dirs[:n]], weights, seed=7, **params
    )
    got = _load_dir(out)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    model = LlamaForCausalLM.from_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)
    assert json.loads((out / "tokenlab_merge.json").read_text())["method"] == method
    assert not list(tmp_path.glob(".merged.*"))  # no temporary directory left behind


def test_single_file_output_and_overwrite(checkpoints, tmp_path):
    base_dir, *ft_dirs = checkpoints
    out = tmp_path / "out"
    merge_checkpoints("task_arithmetic", base_dir, ft_dirs[:2], out, [0.5, 0.5], progress=False)
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    first = _load_dir(out)
    with pytest.raises(FileExistsError, match="not empty"):
        merge_checkpoints("task_arithmetic", base_dir, ft_dirs[:2], out, progress=False)
    merge_checkpoints(
        "task_arithmetic", base_dir, ft_dirs[:2], out, [1.0, 1.0], overwrite=True, progress=False
    )
    second = _load_dir(out)
    key = "model.norm.weight"
    torch.testing.assert_close(second[key] - first[key], first[key] - _load_dir(base_dir)[key])


def test_recipe_yaml_json_and_cli(checkpoints, tmp_path):
    base_dir, *ft_dirs = checkpoints
    recipe = {
        "method": "ties",
        "base": str(base_dir),
        "models": [{"path": str(ft_dirs[0]), "weight": 0.7}, str(ft_dirs[1])],
        "parameters": {"density": 0.5},
        "max_shard_size": "100KB",
    }
    api = merge_checkpoints(
        "ties", base_dir, ft_dirs[:2], tmp_path / "api", [0.7, 1.0], density=0.5, progress=False
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**recipe, "out": "from_yaml"}))
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    merge_from_recipe(tmp_path / "r.yaml", progress=False)  # `out` relative to the recipe file
    cli_main([str(tmp_path / "r.json"), "--out", str(tmp_path / "from_json"), "--no-progress"])
    flags = ["--method", "ties", "--base", str(base_dir), "--models", str(ft_dirs[0]), str(ft_dirs[1])]
    flags += ["--weights", "0.7", "1.0", "--param", "density=0.5", "--out", str(tmp_path / "flags")]
    cli_main([*flags, "--no-progress"])
    expected = _load_dir(api)
    for name in ("from_yaml", "from_json", "flags"):
        got = _load_dir(tmp_path / name)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    with pytest.raises(ValueError, match="unknown key"):
        merge_from_recipe({**recipe, "lambda": 1.0}, tmp_path / "x")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of checkpoint ``src`` (single file) whose weights are replaced by ``tensors``."""
    save_file(tensors, _copy(src, dst) / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_checkpoint_bad_input(checkpoints, tmp_path):
    base_dir, ft0, ft1, _ = checkpoints
    out = tmp_path / "out"
    original = load_file(ft1 / "model.safetensors")
    bad_shape = _rewrite(ft1, tmp_path / "bad_shape", {**original, "model.norm.weight": torch.zeros(33)})
    bad_dtype = _rewrite(ft1, tmp_path / "bad_dtype", {k: v.double() for k, v in original.items()})
    missing = _rewrite(
        ft1, tmp_path / "missing", {k: v for k, v in original.items() if k != "lm_head.weight"}
    )
    other_arch = _copy(ft1, tmp_path / "other_arch")
    cfg = json.loads((other_arch / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (other_arch / "config.json").write_text(json.dumps(cfg))
    inputs = [base_dir, ft0, ft1, bad_shape, bad_dtype, missing, other_arch]
    before = _tree_hash(inputs)
    cases = [
        ([bad_shape], {}, ValueError, r"shape mismatch for 'model.norm.weight'"),
        ([bad_dtype], {}, ValueError, r"dtype mismatch for '"),
        ([missing], {}, ValueError, r"missing \['lm_head.weight'\]"),
        ([other_arch], {}, ValueError, r"architecture: hidden_act: 'silu' vs 'gelu'"),
        ([ft0, ft1], {"density": 0.0}, ValueError, r"`density` must be a finite number in \(0, 1\]"),
        ([ft0, ft1], {"density": 1.2}, ValueError, r"`density` must be a finite number in \(0, 1\]"),
        ([tmp_path / "nope"], {}, FileNotFoundError, r"is not a directory"),
    ]
    for models, params, error, match in cases:
        method = "ties" if params else "task_arithmetic"
        with pytest.raises(error, match=match):
            merge_checkpoints(method, base_dir, models, out, progress=False, **params)
        assert not out.exists()
    for inside in (ft0 / "merged", ft0, base_dir.parent):
        with pytest.raises(ValueError, match="must not be an input directory, inside one or contain one"):
            merge_checkpoints("task_arithmetic", base_dir, [ft0], inside, progress=False, overwrite=True)
    assert _tree_hash(inputs) == before
    assert not (ft0 / "merged").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_truncated_or_corrupt_input_file_is_named(checkpoints, tmp_path):
    """safetensors' own error ("incomplete metadata") did not say which file of which input it was."""
    base_dir, ft0, ft1, _ = checkpoints
    truncated = _copy(ft1, tmp_path / "truncated") / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(
        ValueError, match=re.escape(f"`finetuned_dirs[1]`: {str(truncated)!r}") + ".*truncated"
    ):
        merge_checkpoints(
            "task_arithmetic", base_dir, [ft0, truncated.parent], tmp_path / "out", progress=False
        )
    index = _copy(ft0, tmp_path / "bad_index") / "model.safetensors.index.json"
    index.write_text("{")
    with pytest.raises(ValueError, match=re.escape(str(index))):
        merge_checkpoints("task_arithmetic", base_dir, [index.parent], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_nan_inputs_are_rejected_naming_the_tensor(checkpoints, tmp_path):
    """A NaN in one task vector used to spread (task arithmetic) or, in TIES, to become the trim
    threshold of the whole tensor, which then trimmed every other entry silently."""
    base, finetuned = _models((6, 5), 2, torch.float32)
    finetuned[1][2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"`finetuned\[1\]` 'layer.w' holds NaN"):
        merge_tensors("ties", base, finetuned, density=0.5, name="layer.w")
    with pytest.raises(ValueError, match=r"`base` 'w' holds NaN"):
        merge_state_dicts("task_arithmetic", {"w": torch.tensor([math.inf])}, [{"w": torch.ones(1)}])
    base_dir, ft0, ft1, _ = checkpoints
    weights = load_file(ft1 / "model.safetensors")
    weights["model.norm.weight"][7] = float("nan")
    nan_dir = _rewrite(ft1, tmp_path / "nan", weights)
    with pytest.raises(ValueError, match=r"merged tensor 'model\.norm\.weight' has NaN"):
        merge_checkpoints("ties", base_dir, [ft0, nan_dir], tmp_path / "out", density=0.5, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


_TERMINATED_MERGE = """
import os, signal, sys
from tokenlab.merging import merge_checkpoints, register_merge_method, task_arithmetic

@register_merge_method("test_terminated", paper="(test)")
def terminated(inputs, weights):
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the output is being written
    yield from task_arithmetic(inputs, weights)

merge_checkpoints("test_terminated", sys.argv[1], [sys.argv[2]], sys.argv[3], progress=False)
"""


def test_sigterm_during_a_merge_leaves_no_temporary_directory(checkpoints, tmp_path):
    """Ctrl-C cleaned up, SIGTERM left a hidden temporary directory of the output's size behind."""
    base_dir, ft0, _, _ = checkpoints
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", _TERMINATED_MERGE, str(base_dir), str(ft0), str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == -signal.SIGTERM, run.stderr[-2000:]  # the process still ends by SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_temporary_directories_are_swept_and_outputs_follow_the_umask(checkpoints, tmp_path):
    """A temporary directory of the same output left by a dead process goes on the next run (one of a
    live process stays); the output is created with the umask (it was drwx------)."""
    base_dir, ft0, _, _ = checkpoints
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.merging-{dead.pid}@{_host()}-0123abcd"
    live = tmp_path / f".out.merging-{os.getppid()}@{_host()}-4567cdef"
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    previous = os.umask(0o027)
    try:
        out = merge_checkpoints("task_arithmetic", base_dir, [ft0], tmp_path / "out", progress=False)
    finally:
        os.umask(previous)
    assert not stale.exists() and live.exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o640


def test_tour_domains_split_by_file(tmp_path, monkeypatch, tiny_world):
    """Unit tests (.py under test dirs) vs text/data files; library .py and binary files belong to
    neither; of every ten files in SHA-1 order the first is held out and the sixth is validation.
    Without those files the tour section says so instead of running."""
    from tokenlab.tour import merging

    for i in range(20):
        (tmp_path / "test" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "test" / "sub" / f"test_{i}.py").write_text(f"# test {i}\n")
        (tmp_path / f"notes_{i}.txt").write_text(f"note {i}\n")
    (tmp_path / "library.py").write_text("x = 1\n")
    (tmp_path / "blob.txt").write_bytes(b"\xff\xfe\x00binary")
    splits = {
        split: merging.domain_texts(split, 10**6, tmp_path) for split in ("train", "validation", "heldout")
    }
    for domain in merging.DOMAINS:
        texts = [t for split in splits.values() for t in split[domain]]
        assert len(texts) == 20 == len(set(texts))  # the undecodable blob.txt is skipped
    assert [len(splits[s]["tests"]) for s in ("train", "validation", "heldout")] == [16, 2, 2]
    assert all(t.startswith("# test") for t in splits["train"]["tests"])
    assert all(t.startswith("note") for t in splits["train"]["data"])

    merging.domain_texts.cache_clear()
    only_tests = tmp_path / "only_tests"
    (only_tests / "test").mkdir(parents=True)
    (only_tests / "test" / "test_a.py").write_text("pass\n")
    monkeypatch.setattr(merging, "stdlib_root", lambda: only_tests)
    try:
        assert merging.tour_section(tiny_world) == [
            "skipped: this Python's standard library ships no data files (no Lib/test)"
        ]
    finally:
        merging.domain_texts.cache_clear()


def test_tour_section_runs(tiny_world):
    from tokenlab.tour.merging import tour_section

    lines = tour_section(tiny_world)
    rows = {line[:20].strip(): [float(v) for v in line[20:].split()] for line in lines[4:8]}
    assert list(rows) == ["base", "tuned on tests", "tuned on data", "TIES merge"]
    assert all(math.isfinite(v) and 0 < v < 10 for values in rows.values() for v in values)
    for column, domain in enumerate(DOMAINS):  # each fine-tune improves on its own domain
        assert rows[f"tuned on {domain}"][column] < rows["base"][column] - 0.05, rows
    assert lines[-1].startswith("the merge keeps ")


def test_public_merging_functions_are_typed_and_documented():
    """Every public function of the merging family states its types and has a docstring."""
    import inspect

    from tokenlab.merging import checkpoint, cli, methods, recipe, registry, self_positioning

    missing = []
    for module in (registry, methods, self_positioning, checkpoint, recipe, cli):
        for name, fn in vars(module).items():
            if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            sig = inspect.signature(fn)
            untyped = [
                p
                for p in sig.parameters.values()
                if p.annotation is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD
            ]
            if untyped or sig.return_annotation is inspect.Signature.empty or not fn.__doc__:
                missing.append(f"{module.__name__}.{name}")
    assert not missing, missing
