"""Fused attention: Triton kernel (interpreter) vs the float64 reference, reference vs peer libraries
(torch SDPA and eager flex_attention), gradcheck, invariants of the flags, and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from tokenlab.attention import AttentionVariant, flash_attention
from tokenlab.kernels.attention import attention_reference, visible_keys
from tokenlab.testing import assert_relative_error, relative_error

F64_TOL = 1e-12  # float64 kernel vs float64 reference (measured ≈ 1e-16..1e-15)


def _inputs(B, Hq, Hkv, T, S, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for H, L in ((Hq, T), (Hkv, S), (Hkv, S))
    )
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _per_head(Hq, seed, low=-1.0, high=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(Hq, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()


def _segments(B, S, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (B, S), generator=g)


def _tree(B, n, seed):
    """Packed ancestor bitmasks ``[B, n]`` of random trees (node ``i``'s parent is a random earlier node)."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.zeros(B, n, dtype=torch.int64)
    for i in range(n):
        parent = torch.randint(0, max(i, 1), (B,), generator=g)
        bits[:, i] = (bits.gather(1, parent[:, None])[:, 0] if i else 0) | (1 << i)
    return bits


def _run(backend, q, k, v, dout, **kw):
    """Output and gradients of every tensor input that requires grad."""
    out = flash_attention(q, k, v, backend=backend, **kw)
    leaves = [q, k, v] + [t for t in kw.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, leaves, dout)


def _compare(q, k, v, tol, grad_tol=None, **kw):
    """Kernel vs float64 reference: forward and every gradient; returns the largest relative error."""
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_kw = {n: (t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                  and t.is_floating_point() else t) for n, t in kw.items()}  # fmt: skip
    out_ref = flash_attention(*ref_inputs, backend="reference", **ref_kw)
    dout = torch.randn_like(out_ref)
    leaves_ref = ref_inputs + [t for t in ref_kw.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    grads_ref = torch.autograd.grad(out_ref, leaves_ref, dout)
    out, grads = _run("triton", q, k, v, dout.to(q.dtype), **kw)
    errs = [assert_relative_error(out, out_ref, tol, "forward")]
    for i, (g, r) in enumerate(zip(grads, grads_ref)):
        errs.append(assert_relative_error(g, r, grad_tol or tol, f"gradient of input {i}"))
    return max(errs)


FLAG_CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window_causal": {"causal": True, "window": 9},
    "window_bidirectional": {"window": 7},
    "scale": {"scale": 0.3},
    "sinks": {"sinks": lambda H: _per_head(H, 1)},
    "softcap": {"softcap": 2.0},
    "sigmoid": {"score_fn": "sigmoid", "sigmoid_bias": lambda H: _per_head(H, 2, -3.0, 0.0)},
    "sigmoid_default_bias": {"score_fn": "sigmoid"},
    "relu": {"score_fn": "relu"},
    "initial_token_scale": {"initial_token_scale": lambda H: _per_head(H, 3, 0.2, 4.0).detach()},
    "segments": {"segment_ids": lambda B, S: _segments(B, S, 4)},
    "causal_sinks_softcap_window": {
        "causal": True,
        "window": 12,
        "sinks": lambda H: _per_head(H, 5),
        "softcap": 5.0,
    },
    "causal_segments_sinks_gamma": {
        "causal": True,
        "segment_ids": lambda B, S: _segments(B, S, 6),
        "sinks": lambda H: _per_head(H, 7),
        "initial_token_scale": lambda H: _per_head(H, 8, 0.5, 3.0).detach(),
    },
    "sigmoid_causal_softcap_segments": {
        "score_fn": "sigmoid",
        "causal": True,
        "softcap": 4.0,
        "sigmoid_bias": lambda H: _per_head(H, 9, -2.0, 0.0),
        "segment_ids": lambda B, S: _segments(B, S, 10),
    },
    "relu_window_causal": {"score_fn": "relu", "causal": True, "window": 20},
    "tree": {"tree": lambda B, S: _tree(B, 20, 11)},
    "causal_tree_segments_sinks": {
        "causal": True,
        "tree": lambda B, S: _tree(B, 40, 12),
        "segment_ids": lambda B, S: _segments(B, S, 13),
        "sinks": lambda H: _per_head(H, 14),
    },
}


def _materialise(flags, B, Hq, S):
    out = {}
    for name, value in flags.items():
        if callable(value):
            value = value(B, S) if name in ("segment_ids", "tree") else value(Hq)
        out[name] = value
    return out


@pytest.mark.parametrize("name", list(FLAG_CASES))
def test_kernel_matches_reference_every_flag_float64(name):
    B, Hq, Hkv, T, S, D = 2, 2, 1, 33, 45, 16
    q, k, v = _inputs(B, Hq, Hkv, T, S, D, seed=11)
    err = _compare(q, k, v, F64_TOL, **_materialise(FLAG_CASES[name], B, Hq, S))
    print(f"{name}: max relative error fwd/bwd {err:.2e}")


@pytest.mark.parametrize(
    "B,Hq,Hkv,T,S,D,causal",
    [
        (1, 1, 1, 1, 1, 16, True),  # single token
        (1, 2, 2, 1, 37, 64, True),  # decoding step with a cache
        (1, 2, 1, 17, 17, 64, False),
        (1, 3, 3, 70, 70, 80, True),  # non-power-of-two head dim, several blocks
        (1, 2, 2, 33, 70, 96, True),  # S > T: bottom-right alignment
        (1, 2, 2, 70, 33, 16, True),  # S < T: the first rows see no key
        (2, 8, 2, 20, 29, 32, True),  # GQA group of 4
        (1, 1, 1, 9, 40, 128, False),
    ],
)
def test_kernel_matches_reference_shapes_float64(B, Hq, Hkv, T, S, D, causal):
    q, k, v = _inputs(B, Hq, Hkv, T, S, D, seed=T + S + D)
    _compare(q, k, v, F64_TOL, causal=causal, sinks=_per_head(Hq, 12))


@pytest.mark.parametrize(
    "dtype,tol,grad_tol",
    [(torch.float32, 2e-6, 1e-5), (torch.bfloat16, 2e-2, 3e-2), (torch.float16, 4e-3, 8e-3)],
)
def test_kernel_low_precision_tolerances(dtype, tol, grad_tol):
    q, k, v = _inputs(1, 4, 2, 50, 50, 64, dtype=dtype, seed=21)
    err = _compare(q, k, v, tol, grad_tol, causal=True, sinks=_per_head(4, 22, dtype=torch.float32))
    print(f"{dtype}: max relative error vs float64 reference {err:.2e}")


def test_lse_and_its_gradient_match_reference():
    q, k, v = _inputs(1, 2, 1, 21, 40, 16, seed=31)
    sinks = _per_head(2, 32)
    segs = _segments(1, 40, 33)
    outs = {}
    for backend in ("reference", "triton"):
        out, lse = flash_attention(
            q, k, v, causal=True, sinks=sinks, segment_ids=segs, return_lse=True, backend=backend
        )
        loss = out.square().sum() + lse.sin().sum()
        outs[backend] = (lse, torch.autograd.grad(loss, (q, k, v, sinks)))
    assert_relative_error(outs["triton"][0], outs["reference"][0], F64_TOL, "lse")
    for g, r in zip(outs["triton"][1], outs["reference"][1]):
        assert_relative_error(g, r, F64_TOL, "gradient through the LSE")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fully_masked_rows_output_zero(backend):
    # S < T with bottom-right causal alignment: the first T - S rows see no key (window shrinks S further).
    q, k, v = _inputs(1, 2, 2, 40, 24, 16, seed=41)
    sinks = _per_head(2, 42)
    out, lse = flash_attention(q, k, v, causal=True, window=3, return_lse=True, backend=backend)
    assert out[:, :, :16].abs().max() == 0 and torch.isneginf(lse[:, :, :16]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 16:]).all()
    out_s, lse_s = flash_attention(q, k, v, causal=True, sinks=sinks, return_lse=True, backend=backend)
    assert out_s[:, :, :16].abs().max() == 0
    torch.testing.assert_close(lse_s[0, :, :16], sinks.detach()[:, None].expand(2, 16), rtol=0, atol=0)
    grads = torch.autograd.grad(out.sum() + out_s.sum() + lse_s.sum(), (q, k, v, sinks))
    assert all(torch.isfinite(g).all() for g in grads)


def test_triton_backward_is_deterministic():
    q, k, v = _inputs(1, 4, 1, 40, 40, 16, dtype=torch.float32, seed=51)
    dout = torch.randn(1, 4, 40, 16)
    first = _run("triton", q, k, v, dout, causal=True)[1]
    second = _run("triton", q, k, v, dout, causal=True)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# --- reference vs peer libraries -------------------------------------------------------------


@pytest.mark.parametrize("T,S,window", [(23, 23, None), (11, 30, None), (30, 30, 6), (7, 19, 5)])
def test_reference_matches_sdpa(T, S, window):
    q, k, v = (t.detach() for t in _inputs(2, 4, 2, T, S, 32, seed=61))
    ours = attention_reference(q, k, v, AttentionVariant(causal=True, window=window, scale=0.2))[0]
    mask = visible_keys(AttentionVariant(causal=True, window=window), T, S, device=q.device)
    # SDPA's is_causal is top-left aligned, so the bottom-right causal/window mask is passed explicitly.
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2, enable_gqa=True)
    assert relative_error(ours, theirs) < 1e-13
    if window is None and T == S:
        assert (
            relative_error(
                ours, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2, enable_gqa=True)
            )
            < 1e-13
        )


def _flex(q, k, v, score_mod=None, mask_mod=None):
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not compiled
        return flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True, return_lse=True
        )


def test_reference_matches_flex_attention_softcap_gamma_segments_window():
    B, Hq, Hkv, T, S, D = 2, 4, 2, 19, 27, 16
    q, k, v = (t.detach() for t in _inputs(B, Hq, Hkv, T, S, D, seed=71))
    gamma = _per_head(Hq, 72, 0.3, 3.0).detach()
    segs = _segments(B, S, 73)
    c, w, off = 3.0, 9, S - T

    def score_mod(s, b, h, qi, kj):
        s = c * torch.tanh(s / c)
        return s + torch.where(kj == 0, torch.log(gamma[h]), 0.0)

    def mask_mod(b, h, qi, kj):
        p = qi + off
        sq, sk = segs[b, p], segs[b, kj]
        return (kj <= p) & (kj > p - w) & ((sq == 0) | (sk == 0) | (sq == sk))

    out_flex, lse_flex = _flex(q, k, v, score_mod, mask_mod)
    variant = AttentionVariant(causal=True, window=w, softcap=c, initial_token_scale=gamma, segment_ids=segs)
    out, lse = attention_reference(q, k, v, variant)
    visible_rows = visible_keys(variant, T, S, device=q.device).any(-1).expand_as(lse)
    assert relative_error(out, out_flex) < 1e-12
    assert relative_error(lse[visible_rows], lse_flex[visible_rows]) < 1e-12


def test_sinks_match_flex_attention_with_a_sink_key():
    # A sink is a key whose logit is sink_h for every query and whose value is 0: append one to k/v.
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 13, 13, 16, seed=81))
    sinks = _per_head(2, 82).detach()
    k_ext = torch.cat([k, torch.zeros(1, 2, 1, 16, dtype=k.dtype)], dim=2)
    v_ext = torch.cat([v, torch.zeros(1, 2, 1, 16, dtype=v.dtype)], dim=2)
    S = 13

    def score_mod(s, b, h, qi, kj):
        return torch.where(kj == S, sinks[h], s)

    def mask_mod(b, h, qi, kj):
        return (kj <= qi) | (kj == S)

    out_flex, lse_flex = _flex(q, k_ext, v_ext, score_mod, mask_mod)
    out, lse = attention_reference(q, k, v, AttentionVariant(causal=True, sinks=sinks))
    assert relative_error(out, out_flex) < 1e-12 and relative_error(lse, lse_flex) < 1e-12


def test_sink_limits():
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 10, 10, 16, seed=91))
    plain, lse = attention_reference(q, k, v, AttentionVariant(causal=True))
    far = attention_reference(
        q, k, v, AttentionVariant(causal=True, sinks=torch.full((2,), -1e4, dtype=q.dtype))
    )[0]
    assert relative_error(far, plain) < 1e-14  # sink → −∞ is plain softmax
    plus_one = attention_reference(
        q, k, v, AttentionVariant(causal=True, sinks=torch.zeros(2, dtype=q.dtype))
    )[0]
    # sink = 0 is softmax-plus-one: weights exp(s)/(Σ exp(s) + 1).
    assert relative_error(plus_one, plain * (lse.exp() / (lse.exp() + 1))[..., None]) < 1e-14


def test_initial_token_scale_multiplies_key_zero_weight():
    q, k, _ = (t.detach() for t in _inputs(1, 2, 2, 8, 8, 16, seed=92))
    gamma = torch.tensor([0.5, 3.0], dtype=q.dtype)
    eye = torch.eye(8, dtype=q.dtype).expand(1, 2, 8, 8)  # value j = one-hot(j): output = weights
    weights = attention_reference(q, k, eye, AttentionVariant(causal=True))[0]
    scaled = weights.clone()
    scaled[..., 0] *= gamma[None, :, None]
    expected = scaled / scaled.sum(-1, keepdim=True)
    assert (
        relative_error(
            attention_reference(q, k, eye, AttentionVariant(causal=True, initial_token_scale=gamma))[0],
            expected,
        )
        < 1e-14
    )


def test_sigmoid_and_relu_formulas():
    q, k, v = (t.detach() for t in _inputs(1, 2, 1, 6, 9, 16, seed=93))
    s = torch.einsum("bhtd,bhsd->bhts", q, k.expand(1, 2, 9, 16)) / 4.0
    vis = visible_keys(AttentionVariant(causal=True), 6, 9, device=q.device)
    sigmoid = AttentionVariant(causal=True, score_fn="sigmoid", sigmoid_bias=-1.5)
    sig = attention_reference(q, k, v, sigmoid)[0]
    assert relative_error(sig, (torch.sigmoid(s - 1.5) * vis) @ v.expand(1, 2, 9, 16)) < 1e-14
    rel = attention_reference(q, k, v, AttentionVariant(causal=True, score_fn="relu"))[0]
    assert relative_error(rel, (s.relu() * vis) @ v.expand(1, 2, 9, 16)) < 1e-14


def test_reference_gradcheck_float64():
    q, k, v = _inputs(1, 2, 1, 5, 7, 4, seed=94)
    sinks, gamma, bias = _per_head(2, 95), _per_head(2, 96, 0.5, 2.0), _per_head(2, 97)
    segs = torch.tensor([[0, 1, 1, 2, 0, 2, 1]])
    assert torch.autograd.gradcheck(
        lambda q, k, v, s, g: attention_reference(
            q,
            k,
            v,
            AttentionVariant(
                causal=True, window=4, sinks=s, softcap=2.0, initial_token_scale=g, segment_ids=segs
            ),
        )[0],
        (q, k, v, sinks, gamma),
    )
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: attention_reference(
            q, k, v, AttentionVariant(causal=True, score_fn="sigmoid", sigmoid_bias=b)
        )[0],
        (q, k, v, bias),
    )


def test_auto_backend_on_cpu_is_reference():
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 5, 5, 8, seed=98))  # D=8: reference only
    assert torch.equal(
        flash_attention(q, k, v, causal=True), attention_reference(q, k, v, AttentionVariant(causal=True))[0]
    )


# --- bad input --------------------------------------------------------------------------------

_q, _k, _v = (t.detach() for t in _inputs(1, 4, 2, 6, 8, 16, seed=99))


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((_q, _k[:, :, :5], _v), {}, ValueError, "`k` and `v`"),
        ((_q, _k.float(), _v), {}, TypeError, "share a dtype"),
        ((_q[0], _k, _v), {}, ValueError, "`q` must be 4-D"),
        ((_q, _k[:, :, :, :8], _v[:, :, :, :8]), {}, ValueError, "`k` must be"),
        ((_q[:, :3], _k, _v), {}, ValueError, "multiple of"),
        ((_q, _k, _v), {"window": 0}, ValueError, "`window` must be an int >= 1"),
        ((_q, _k, _v), {"window": 2.5}, TypeError, "`window`"),
        ((_q, _k, _v), {"sinks": torch.zeros(3, dtype=torch.float64)}, ValueError, "`sinks` must be"),
        (
            (_q, _k, _v),
            {"segment_ids": torch.zeros(1, 6, dtype=torch.long)},
            ValueError,
            "`segment_ids` must be",
        ),
        ((_q, _k, _v), {"segment_ids": torch.zeros(1, 8)}, TypeError, "`segment_ids` must be an integer"),
        (
            (_k, _q[:, :2], _q[:, :2]),
            {"segment_ids": torch.zeros(1, 6, dtype=torch.long)},
            ValueError,
            "T <= S",
        ),
        ((_q, _k, _v), {"softcap": -1.0}, ValueError, "`softcap`"),
        ((_q, _k, _v), {"score_fn": "tanh"}, ValueError, "`score_fn`"),
        (
            (_q, _k, _v),
            {"score_fn": "relu", "sinks": torch.zeros(4, dtype=torch.float64)},
            ValueError,
            "`sinks`",
        ),
        ((_q, _k, _v), {"sigmoid_bias": 1.0}, ValueError, "`sigmoid_bias`"),
        ((_q, _k, _v), {"initial_token_scale": -torch.ones(4, dtype=torch.float64)}, ValueError, "> 0"),
        ((_q, _k, _v), {"score_fn": "sigmoid", "return_lse": True}, ValueError, "`return_lse`"),
        ((_q, _k, _v), {"backend": "cuda"}, ValueError, "`backend`"),
        ((_q, "k", _v), {}, TypeError, "`k` must be a torch.Tensor"),
        ((_q.long(), _k.long(), _v.long()), {}, TypeError, "`q` must be float16"),
    ],
)
def test_bad_input_raises_naming_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        flash_attention(*args, **kwargs)


def test_bad_head_dim_and_device_for_triton():
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 4, 4, 8, seed=100))
    with pytest.raises(ValueError, match="head dim D=8"):
        flash_attention(q, k, v, backend="triton")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            flash_attention(q, k.cuda(), v, backend="triton")


def test_window_semantics_match_docstring():
    vis = visible_keys(AttentionVariant(causal=True, window=2), 3, 5, device=torch.device("cpu"))[0, 0]
    # Query i sits at key position i + 2; it sees positions p - 1 and p.
    expected = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(vis, expected)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nan_inputs_propagate_as_documented(backend):
    """docs/attention.md: NaN is not checked for; a NaN in query i reaches output row i only, one in key
    j every row that sees key j, one in value j every row of its head (0 · NaN = NaN)."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g, dtype=torch.float64) for _ in range(3))
    q[0, 0, 2, 3] = k[0, 1, 5, 0] = v[0, 0, 4, 1] = float("nan")
    rows = torch.arange(8)
    for causal in (False, True):
        nan_rows = torch.isnan(flash_attention(q, k, v, causal=causal, backend=backend)).any(-1)[0]
        assert torch.equal(nan_rows[0], torch.ones(8, dtype=torch.bool))  # value 4 of head 0
        assert torch.equal(nan_rows[1], rows >= 5 if causal else torch.ones(8, dtype=torch.bool))  # key 5
    q_only = torch.isnan(flash_attention(q, k.nan_to_num(), v.nan_to_num(), backend=backend)).any(-1)[0]
    assert q_only.nonzero().tolist() == [[0, 2]]
