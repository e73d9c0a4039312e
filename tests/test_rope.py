"""RoPE and CARoPE: oracles are Hugging Face Llama's rotary embedding, RoPE's relative-position
property, a loop-by-loop evaluation of CARoPE's formula, CARoPE's reduction to RoPE, and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tokenlab.attention import (
    ContextAwareRotaryEmbedding,
    RotaryEmbedding,
    apply_rope,
    carope_cos_sin,
    carope_frequencies,
    carope_phases,
    rope_cos_sin,
    rotary_frequencies,
)
from tokenlab.testing import assert_relative_error


@pytest.mark.parametrize(("head_dim", "base", "seq"), [(16, 10000.0, 7), (64, 500000.0, 33), (6, 100.0, 5)])
def test_rope_matches_hf_llama(head_dim: int, base: float, seq: int) -> None:
    torch.manual_seed(head_dim)
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=base)
    config.rope_parameters = {"rope_type": "default", "rope_theta": base}
    hf_rope = LlamaRotaryEmbedding(config)
    q, k = torch.randn(2, 2, seq, head_dim), torch.randn(2, 2, seq, head_dim)
    positions = torch.stack([torch.arange(seq), torch.arange(seq) * 3 + 5])  # [B, T], ragged offsets
    cos_hf, sin_hf = hf_rope(q, positions)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)

    # Both compute phases m·θ_i in float32 (θ_i rounded differently); phases reach ~100 rad here.
    tol = 1e-5
    cos, sin = rope_cos_sin(positions, head_dim, base)
    assert_relative_error(cos, cos_hf, tol, "cos")
    assert_relative_error(sin, sin_hf, tol, "sin")
    assert_relative_error(apply_rope(q, positions=positions, base=base), q_hf, tol, "q")
    q_mod, k_mod = RotaryEmbedding(head_dim, base)(q, k, positions)
    assert_relative_error(q_mod, q_hf, tol, "module q")
    assert_relative_error(k_mod, k_hf, tol, "module k")


def test_rotary_frequencies_formula() -> None:
    inv_freq = rotary_frequencies(8, base=10000.0).double()
    expected = torch.tensor([10000.0 ** (-2 * i / 8) for i in range(4)], dtype=torch.float64)
    assert_relative_error(inv_freq, expected, 1e-7, "theta_i")


def test_rope_relative_position_property() -> None:
    """⟨rope(q, m), rope(k, n)⟩ depends on (m, n) only through m − n; not on m alone."""
    torch.manual_seed(0)
    q, k = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)

    def score(m: float, n: float) -> float:
        qm = apply_rope(q[None], positions=torch.tensor([m], dtype=torch.float64))
        kn = apply_rope(k[None], positions=torch.tensor([n], dtype=torch.float64))
        return float((qm * kn).sum())

    for m, n in [(3, 1), (10, 10), (0, 17), (250, 4)]:
        reference = score(m, n)
        for shift in (1, 7, 1000):
            assert score(m + shift, n + shift) == pytest.approx(reference, rel=1e-9, abs=1e-9)
    assert abs(score(5, 0) - score(6, 0)) > 1e-3  # positions do matter


def _f_loop(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """f(x) = 1/(softplus(xW+b)+1), one entry at a time, softplus written as log(1 + e^z)."""
    batch, seq, _ = x.shape
    out = torch.empty(batch, seq, weight.shape[0], dtype=torch.float64)
    for b in range(batch):
        for t in range(seq):
            for h in range(weight.shape[0]):
                z = float(x[b, t] @ weight[h] + bias[h])
                out[b, t, h] = 1.0 / (math.log1p(math.exp(z)) + 1.0)
    return out


@pytest.mark.parametrize("first_exponent", [0, 1])
def test_carope_phases_match_loop_over_the_formula(first_exponent: int) -> None:
    """φ_i^{(h)}(m) = Σ_{t=1}^{m} f(x_t)_h^i evaluated by plain loops, on a ragged small case, for the
    paper's exponents i = 1 … D/2 and for RoFormer's i = 0 … D/2 − 1."""
    torch.manual_seed(1)
    batch, seq, d_model, heads, head_dim = 2, 5, 6, 3, 6
    x = torch.randn(batch, seq, d_model, dtype=torch.float64)
    weight, bias = torch.randn(heads, d_model, dtype=torch.float64), torch.randn(heads, dtype=torch.float64)
    f = _f_loop(x, weight, bias)
    assert_relative_error(carope_frequencies(x, weight, bias), f, 1e-12, "f")
    assert bool(((f > 0) & (f < 1)).all())
    expected = torch.zeros(batch, heads, seq, head_dim // 2, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for m in range(seq):
                for i in range(head_dim // 2):
                    power = i + first_exponent
                    expected[b, h, m, i] = sum(float(f[b, t, h]) ** power for t in range(m + 1))
    phases = carope_phases(carope_frequencies(x, weight, bias), head_dim, first_exponent=first_exponent)
    assert_relative_error(phases, expected, 1e-12, "phi")


def test_carope_paper_exponents_make_every_pair_context_dependent() -> None:
    """The paper's θ_i = θ_1^i, i = 1 … D/2: pair 0 turns at f(x) itself, so two contexts of the same
    length give different pair-0 phases; RoFormer's ladder (i from 0) gives pair 0 the token count."""
    torch.manual_seed(4)
    weight, bias = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    a, b = torch.randn(2, 1, 5, 6, dtype=torch.float64)
    pair0 = {
        e: [carope_phases(carope_frequencies(x, weight, bias), 8, first_exponent=e)[..., 0] for x in (a, b)]
        for e in (0, 1)
    }
    assert torch.equal(pair0[0][0], pair0[0][1])  # the count 1 … T, whatever the tokens
    assert torch.equal(pair0[0][0][0, 0], torch.arange(1, 6, dtype=torch.float64))
    assert float((pair0[1][0] - pair0[1][1]).abs().min()) > 0
    assert ContextAwareRotaryEmbedding(6, 2, 8).first_exponent == 1  # the paper's rule is the default


def test_carope_paper_exponents_with_constant_f_equal_rope_at_scaled_positions() -> None:
    """W = 0 with the paper's exponents: φ_i(m) = m·θ_1^i = (θ_1·m)·θ_1^(i−1), RoPE at positions θ_1·m."""
    torch.manual_seed(5)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    q, k = torch.randn(2, 2, 3, 7, 10, dtype=torch.float64)
    carope = ContextAwareRotaryEmbedding(12, 3, 10).double()
    theta_1 = float(carope.frequencies(x).flatten()[0])
    base = theta_1 ** (-10 / 2)
    scaled = theta_1 * torch.arange(1, 8, dtype=torch.float64)
    q_c, k_c = carope(x, q, k)
    assert_relative_error(q_c, apply_rope(q, positions=scaled, base=base), 1e-12, "q")
    assert_relative_error(k_c, apply_rope(k, positions=scaled, base=base), 1e-12, "k")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_carope_with_constant_f_equals_rope(dtype: torch.dtype) -> None:
    """W = 0 makes f constant; with RoFormer's exponents (from 0) CARoPE is then RoPE at positions 1 … T
    with θ_1 = f."""
    torch.manual_seed(2)
    batch, seq, d_model, heads, head_dim = 2, 9, 12, 3, 10
    x = torch.randn(batch, seq, d_model, dtype=dtype)
    q, k = torch.randn(2, batch, heads, seq, head_dim, dtype=dtype)
    positions = torch.arange(1, seq + 1)
    tol = 1e-12 if dtype == torch.float64 else 2e-5

    # Default initialisation from RoPE: W = 0, bias chosen so f = base^(-2/D) (to float32 rounding).
    carope = ContextAwareRotaryEmbedding(d_model, heads, head_dim, base=10000.0, first_exponent=0).to(dtype)
    f = carope.frequencies(x).detach()
    assert float((f - f.flatten()[0]).abs().max()) == 0.0
    assert float(f.flatten()[0]) == pytest.approx(10000.0 ** (-2 / head_dim), rel=1e-6)
    base_f = float(f.flatten()[0]) ** (-head_dim / 2)  # RoPE base whose θ_1 is exactly this f
    q_c, k_c = carope(x, q, k)
    assert_relative_error(q_c, apply_rope(q, positions=positions, base=base_f), tol, "q")
    assert_relative_error(k_c, apply_rope(k, positions=positions, base=base_f), tol, "k")

    # W = 0 and no bias: f = 1/(1 + ln 2) = θ_1 of RoPE with base (1 + ln 2)^(D/2).
    weight = torch.zeros(heads, d_model, dtype=dtype)
    cos, sin, _ = carope_cos_sin(x, weight, None, head_dim, first_exponent=0)
    base = (1.0 + math.log(2.0)) ** (head_dim / 2)
    assert_relative_error(apply_rope(q, cos=cos, sin=sin), apply_rope(q, positions=positions, base=base), tol)


def test_carope_is_token_dependent_and_chunks_compose() -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 12, 8, dtype=torch.float64)
    weight, bias = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    cos, sin, _ = carope_cos_sin(x, weight, bias, 8)
    assert not torch.allclose(cos[:, 0], cos[:, 1])  # head-specific
    # Phases of positions 6…12 continue from the last phase of positions 1…5.
    cos_a, sin_a, last = carope_cos_sin(x[:, :5], weight, bias, 8)
    cos_b, sin_b, _ = carope_cos_sin(x[:, 5:], weight, bias, 8, initial_phase=last)
    assert_relative_error(torch.cat([cos_a, cos_b], dim=2), cos, 1e-12, "chunked cos")
    assert_relative_error(torch.cat([sin_a, sin_b], dim=2), sin, 1e-12, "chunked sin")


def test_carope_gradients_reach_the_frequency_projection() -> None:
    torch.manual_seed(4)
    x = torch.randn(1, 4, 5, dtype=torch.float64)
    q, k = torch.randn(2, 1, 2, 4, 4, dtype=torch.float64)
    weight = (0.3 * torch.randn(2, 5, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def scores(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        cos, sin, _ = carope_cos_sin(x, weight, bias, 4)
        return apply_rope(q, cos=cos, sin=sin) @ apply_rope(k, cos=cos, sin=sin).transpose(-1, -2)

    assert torch.autograd.gradcheck(scores, (weight, bias))
    module = ContextAwareRotaryEmbedding(5, 2, 4).double()  # starts at W = 0
    q_rot, k_rot = module(x, q, k)
    (q_rot @ k_rot.transpose(-1, -2)).square().sum().backward()
    grad = module.frequency_proj.weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().max() > 1e-6


def test_rope_bad_input() -> None:
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="head_dim"):
        rotary_frequencies(5)
    with pytest.raises(ValueError, match="base"):
        rotary_frequencies(4, base=1.0)
    with pytest.raises(TypeError, match="`x`"):
        apply_rope(x.tolist(), positions=torch.arange(3))
    with pytest.raises(ValueError, match="head_dim"):
        apply_rope(torch.randn(3, 5), positions=torch.arange(3))
    with pytest.raises(ValueError, match="`positions`"):
        apply_rope(x, positions=torch.arange(4))
    with pytest.raises(ValueError, match="either"):
        apply_rope(x, positions=torch.arange(3), cos=torch.ones(3, 4), sin=torch.ones(3, 4))
    with pytest.raises(ValueError, match="`cos`"):
        apply_rope(x, cos=torch.ones(5, 4), sin=torch.ones(5, 4))
    with pytest.raises(ValueError, match="`sin`"):
        apply_rope(x, cos=torch.ones(3, 4), sin=torch.ones(2, 2, 3, 4))
    with pytest.raises(ValueError, match="`positions` or both"):
        apply_rope(x, cos=torch.ones(3, 4))
    with pytest.raises(ValueError, match="`weight`"):
        carope_frequencies(torch.randn(1, 3, 8), torch.randn(2, 7))
    with pytest.raises(ValueError, match="`bias`"):
        carope_frequencies(torch.randn(1, 3, 8), torch.randn(2, 8), torch.randn(3))
    with pytest.raises(ValueError, match="`initial_phase`"):
        carope_phases(torch.rand(1, 3, 2), 4, initial_phase=torch.zeros(1, 2, 3))
    module = ContextAwareRotaryEmbedding(8, 2, 4)
    with pytest.raises(ValueError, match="`q`"):
        module(torch.randn(1, 3, 8), torch.randn(1, 3, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="num_heads"):
        ContextAwareRotaryEmbedding(8, 0, 4)
    with pytest.raises(ValueError, match="init_from_rope"):
        ContextAwareRotaryEmbedding(8, 2, 4, bias=False)
