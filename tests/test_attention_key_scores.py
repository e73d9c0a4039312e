"""Per-key scores ``Σ_i P_ij`` of the fused attention (``flash_attention(..., return_key_scores=True)``):
the Triton key-block pass (interpreter) vs the float64 reference, the reference vs column sums of
probabilities computed here by brute force, and the invariants that tie them to the softmax."""

from __future__ import annotations

import pytest
import torch

from tokenlab.attention import flash_attention
from tokenlab.kernels.attention import AttentionVariant, visible_keys
from tokenlab.testing import assert_relative_error

F64_TOL = 1e-12  # measured ≈ 2e-16 .. 4e-16


def _qkv(B, Hq, Hkv, T, S, D, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = ((Hq, T), (Hkv, S), (Hkv, S))
    return [torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for H, L in shapes]


def _tree_bits(B, n, g):
    """Packed ancestor bitmasks of random trees (node i's parent a random earlier node)."""
    bits = torch.zeros(B, n, dtype=torch.int64)
    for i in range(n):
        parent = torch.randint(0, max(i, 1), (B,), generator=g)
        bits[:, i] = (bits.gather(1, parent[:, None])[:, 0] if i else 0) | (1 << i)
    return bits


def _flags(name, B, Hq, S):
    g = torch.Generator().manual_seed(len(name))
    per_head = torch.rand(Hq, generator=g, dtype=torch.float64)
    return {
        "plain": {},
        "causal": {"causal": True},
        "window_causal": {"causal": True, "window": 9},
        "window_bidirectional": {"window": 7},
        "sinks_softcap": {"causal": True, "sinks": per_head * 2 - 1, "softcap": 3.0},
        "gamma_segments": {
            "causal": True,
            "initial_token_scale": per_head * 3 + 0.2,
            "segment_ids": torch.randint(0, 3, (B, S), generator=g),
        },
        "causal_tree": {"causal": True, "tree": _tree_bits(B, 12, g)},  # a draft tree after a prefix
    }[name]


@pytest.mark.parametrize(
    "name,B,Hq,Hkv,T,S,D",
    [
        ("plain", 1, 2, 2, 17, 17, 16),
        ("causal", 2, 4, 2, 33, 45, 16),  # GQA, S > T (prefill after a cache), two key blocks
        ("window_causal", 1, 2, 1, 70, 33, 32),  # S < T: the first rows see no key
        ("window_bidirectional", 1, 1, 1, 20, 37, 16),
        ("sinks_softcap", 1, 3, 1, 1, 37, 80),  # one decoding step, non-power-of-two head dim
        ("gamma_segments", 2, 2, 1, 20, 29, 16),
        ("causal_tree", 2, 2, 1, 15, 40, 16),
    ],
)
def test_key_scores_kernel_matches_reference_float64(name, B, Hq, Hkv, T, S, D):
    q, k, v = _qkv(B, Hq, Hkv, T, S, D, seed=T + S)
    flags = _flags(name, B, Hq, S)
    out, ref = flash_attention(q, k, v, return_key_scores=True, backend="reference", **flags)
    out_k, got = flash_attention(q, k, v, return_key_scores=True, backend="triton", **flags)
    assert got.shape == (B, Hq, S) and got.dtype == torch.float64
    err = assert_relative_error(got, ref, F64_TOL, "key scores")
    assert_relative_error(out_k, out, F64_TOL, "output alongside the key scores")
    print(f"{name} {B, Hq, Hkv, T, S, D}: key scores relative error {err:.1e}")


def test_reference_key_scores_are_column_sums_of_brute_force_probabilities():
    """Independent of the reference: softmax of masked scores written out here, summed over queries."""
    B, Hq, Hkv, T, S, D = 2, 4, 2, 13, 21, 16
    q, k, v = _qkv(B, Hq, Hkv, T, S, D, seed=3)
    variant = AttentionVariant(causal=True, window=6)
    kk = k.repeat_interleave(Hq // Hkv, dim=1)
    logits = torch.einsum("bhtd,bhsd->bhts", q, kk) * D**-0.5
    visible = visible_keys(variant, T, S, device=q.device).expand(B, Hq, T, S)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    for backend in ("reference", "triton"):
        _, scores = flash_attention(q, k, v, variant, return_key_scores=True, backend=backend)
        assert_relative_error(scores, probs.sum(dim=2), F64_TOL, backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_key_scores_sum_to_the_attended_mass(backend):
    """Σ_j Σ_i P_ij = T for plain softmax; with sinks every row loses exactly its sink weight
    exp(sink − L_i); a decoding step (T = 1) gives the probability row itself."""
    q, k, v = _qkv(1, 2, 1, 29, 40, 16, seed=5)
    _, scores = flash_attention(q, k, v, causal=True, return_key_scores=True, backend=backend)
    torch.testing.assert_close(scores.sum(-1), torch.full((1, 2), 29.0, dtype=torch.float64))
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64)
    _, lse, scores = flash_attention(
        q, k, v, causal=True, sinks=sinks, return_lse=True, return_key_scores=True, backend=backend
    )
    sink_mass = torch.exp(sinks[None, :, None] - lse).sum(-1)
    torch.testing.assert_close(scores.sum(-1) + sink_mass, torch.full((1, 2), 29.0, dtype=torch.float64))
    q1 = q[:, :, -1:]
    _, row = flash_attention(q1, k, v, causal=True, return_key_scores=True, backend=backend)
    probs = torch.softmax(torch.einsum("bhd,bhsd->bhs", q1[:, :, 0], k.expand(1, 2, 40, 16)) * 0.25, -1)
    torch.testing.assert_close(row, probs)


def test_key_scores_carry_no_gradient_and_leave_the_output_differentiable():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 9, 9, 16, seed=7))
    for backend in ("reference", "triton"):
        out, scores = flash_attention(q, k, v, causal=True, return_key_scores=True, backend=backend)
        assert not scores.requires_grad
        (gq,) = torch.autograd.grad(out.sum(), [q])
        assert torch.isfinite(gq).all()


def test_key_scores_need_softmax_and_a_bool():
    q, k, v = _qkv(1, 1, 1, 4, 4, 16, seed=0)
    with pytest.raises(ValueError, match="return_key_scores"):
        flash_attention(q, k, v, score_fn="sigmoid", return_key_scores=True)
    with pytest.raises(TypeError, match="return_key_scores"):
        flash_attention(q, k, v, return_key_scores=1)
