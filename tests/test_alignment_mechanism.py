"""The chunked per-token mechanism equals the naive (materialised-logits) path in value and gradient, and
the naive path equals torch.distributions (a peer implementation of log-prob, entropy and KL)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, kl_divergence
from transformers import LlamaConfig, LlamaForCausalLM

from tokenlab.alignment import LinearHead, causal_lm_head, completion_token_logps, completions, token_stats
from tokenlab.testing import assert_relative_error, relative_error


def _heads(N: int, H: int, V: int, dtype=torch.float64, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_(True)
    W = (torch.randn(V, H, generator=g, dtype=dtype) / H**0.5).requires_grad_(True)
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_(True) if bias else None
    ref = LinearHead(
        torch.randn(N, H, generator=g, dtype=dtype), torch.randn(V, H, generator=g, dtype=dtype) / H**0.5
    )
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100  # ragged: every fifth token ignored
    return LinearHead(h, W, b), ref, labels


def _run(head, ref, labels, backend, chunk_size, seed=1):
    stats = token_stats(head, labels, reference=ref, entropy=True, chunk_size=chunk_size, backend=backend)
    g = torch.Generator().manual_seed(seed)
    weights = [
        torch.randn(labels.shape, generator=g, dtype=torch.float64).to(stats.logps.dtype) for _ in range(3)
    ]
    total = sum((w * t).sum() for w, t in zip(weights, (stats.logps, stats.entropy, stats.kl)))
    params = [p for p in (head.hidden, head.weight, head.bias) if p is not None]
    return stats, torch.autograd.grad(total, params)


@pytest.mark.parametrize("N,V,bias", [(37, 53, True), (64, 100, False), (5, 17, True)])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
def test_chunked_equals_naive_float64(N, V, bias, chunk_size):
    head, ref, labels = _heads(N, 12, V, bias=bias)
    want, want_grads = _run(head, ref, labels, "reference", 1)
    got, got_grads = _run(head, ref, labels, "chunked", chunk_size)
    errors = []
    for name in ("logps", "entropy", "kl"):
        errors.append(assert_relative_error(getattr(got, name), getattr(want, name), 1e-13, name))
    for g, w in zip(got_grads, want_grads):
        errors.append(assert_relative_error(g, w, 1e-13, "gradient"))
    print(f"N={N} V={V} chunk={chunk_size}: max relative error {max(errors):.2e}")


def test_chunked_float32_matches_float64_reference():
    head, ref, labels = _heads(50, 16, 301, dtype=torch.float32)
    head64 = LinearHead(
        *(t.detach().double().requires_grad_(True) for t in (head.hidden, head.weight, head.bias))
    )
    ref64 = LinearHead(ref.hidden.double(), ref.weight.double())
    want, want_grads = _run(head64, ref64, labels, "reference", 1)
    got, got_grads = _run(head, ref, labels, "chunked", 13)
    for name in ("logps", "entropy", "kl"):
        assert_relative_error(getattr(got, name), getattr(want, name), 1e-5, name)
    for g, w in zip(got_grads, want_grads):
        assert_relative_error(g, w, 1e-5, "gradient")


def test_chunked_bias_gradient_float64_with_frozen_weight():
    """A trainable bias beside a frozen LM-head weight (PEFT ``bias="all"``) gets its gradient in float64
    on float64 inputs, as when the weight is trainable (it was accumulated in float32: 7e-8)."""
    head, _, labels = _heads(37, 12, 53)
    frozen_weight = LinearHead(head.hidden, head.weight.detach(), head.bias)
    grads = {}
    for backend, chunk_size in (("reference", 1), ("chunked", 7)):
        stats = token_stats(frozen_weight, labels, entropy=True, chunk_size=chunk_size, backend=backend)
        total = (stats.logps * torch.linspace(-1, 2, labels.numel(), dtype=torch.float64)).sum()
        grads[backend] = torch.autograd.grad(total + stats.entropy.sum(), [head.hidden, head.bias])
    for got, want in zip(grads["chunked"], grads["reference"]):
        assert got.dtype == torch.float64
        assert_relative_error(got, want, 1e-12, "gradient with a frozen weight")


def test_naive_path_equals_torch_distributions():
    head, ref, labels = _heads(20, 8, 31)
    stats = token_stats(head, labels, reference=ref, entropy=True, backend="reference")
    p = Categorical(logits=head.hidden @ head.weight.T + head.bias)
    q = Categorical(logits=ref.hidden @ ref.weight.T)
    keep = labels != -100
    assert_relative_error(stats.logps[keep], p.log_prob(labels.clamp(min=0))[keep], 1e-13, "logps")
    assert_relative_error(stats.entropy[keep], p.entropy()[keep], 1e-13, "entropy")
    assert_relative_error(stats.kl[keep], kl_divergence(q, p)[keep], 1e-12, "kl")
    assert (stats.logps[~keep] == 0).all() and (stats.kl[~keep] == 0).all()


def test_ignored_tokens_get_no_gradient_and_frozen_head_is_skipped():
    head, _, labels = _heads(12, 8, 19)
    frozen = LinearHead(head.hidden, head.weight.detach(), None)
    stats = token_stats(frozen, labels, chunk_size=5)
    (grad,) = torch.autograd.grad(stats.logps.sum(), [frozen.hidden])
    assert (grad[labels == -100] == 0).all() and (grad[labels != -100] != 0).any()


def test_autocast_bfloat16_close_to_float32():
    head, ref, labels = _heads(40, 32, 257, dtype=torch.float32)
    want = token_stats(head, labels, reference=ref, entropy=True, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive, naive_grads = _run(head, ref, labels, "reference", 1)
        chunked, chunked_grads = _run(head, ref, labels, "chunked", 9)
    assert chunked.logps.dtype == torch.float32
    assert_relative_error(chunked.logps, want.logps, 3e-2, "bf16 autocast vs float32")
    assert_relative_error(chunked.logps, naive.logps, 1e-6, "chunked vs naive under the same autocast")
    for g, w in zip(chunked_grads, naive_grads):
        assert_relative_error(g, w, 2e-2, "gradient under autocast")


def test_bad_inputs_raise_clear_errors():
    head, ref, labels = _heads(10, 8, 19)
    with pytest.raises(ValueError, match="labels"):
        token_stats(head, labels[:-1])
    with pytest.raises(ValueError, match="labels"):
        token_stats(head, labels.clamp(min=0) + 19)
    with pytest.raises(TypeError, match="labels"):
        token_stats(head, labels.double())
    with pytest.raises(ValueError, match="chunk_size"):
        token_stats(head, labels, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        token_stats(head, labels, backend="fast")
    with pytest.raises(ValueError, match="weight"):
        LinearHead(head.hidden, head.weight[:, :-1])
    with pytest.raises(ValueError, match="reference"):
        token_stats(head, labels, reference=LinearHead(ref.hidden[:-1], ref.weight))
    nan_head = LinearHead(head.hidden.detach().clone(), head.weight)
    nan_head.hidden[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        token_stats(nan_head, labels)


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).double().eval()


def test_hf_helper_equals_model_logits():
    model, ref = _tiny_llama(0), _tiny_llama(1)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(2))
    completion = torch.zeros_like(ids)
    completion[:, 4:] = 1
    completion[2, 9:] = 0  # ragged completion
    tokens = completion_token_logps(
        model, ids, completion, reference_model=ref, kl=True, entropy=True, chunk_size=7
    )
    log_p = torch.log_softmax(model(ids).logits[:, :-1], -1)
    log_q = torch.log_softmax(ref(ids).logits[:, :-1], -1)
    m = completion[:, 1:].bool()
    want = log_p.gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert relative_error(tokens.logps[m], want[m]) < 1e-12
    assert relative_error(tokens.ref_logps[m], log_q.gather(-1, ids[:, 1:, None]).squeeze(-1)[m]) < 1e-12
    assert relative_error(tokens.kl[m], (log_q.exp() * (log_q - log_p)).sum(-1)[m]) < 1e-12
    assert relative_error(tokens.entropy[m], -(log_p.exp() * log_p).sum(-1)[m]) < 1e-12
    assert torch.equal(tokens.mask, completion[:, 1:].double())
    head = causal_lm_head(model, ids)
    assert head.hidden.shape == (3, 11, 32) and head.weight is model.lm_head.weight


def test_completions_keeps_the_last_scored_positions():
    """``last`` keeps the last ``last`` of the ``T − 1`` scored positions; 0 (which sliced ``[-0:]``, every
    position) or more than ``T − 1`` raise instead of silently keeping everything."""
    model = _tiny_llama(0)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros_like(ids)
    mask[:, 5:] = 1
    kept = completions(model, ids, mask, last=4)
    full = completions(model, ids, mask)
    assert torch.equal(kept.labels, ids[:, -4:]) and torch.equal(kept.head.hidden, full.head.hidden[:, -4:])
    for bad in (0, 9, -1):
        with pytest.raises(ValueError, match="`last`"):
            completions(model, ids, mask, last=bad)
