"""The "tokenlab" attention implementation inside transformers models: same logits and greedy
generations as eager attention (Llama, Qwen2 with sliding windows, padding, KV cache, 4-D masks),
through both the reference and the Triton kernel (interpreter), and the per-layer variant hook."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, Qwen2Config
from transformers.masking_utils import AttentionMaskInterface

from tokenlab.attention import analyze_sinks, initial_token_scaling
from tokenlab.attention.hf import (
    ATTN_IMPLEMENTATION,
    configure_attention,
    register_attention,
    tokenlab_attention_mask,
)

LOGIT_TOL = 2e-5  # float32 models, max |Δ logit|


def _llama_config():
    return LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0,
    )  # fmt: skip


def _qwen2_config():
    return Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=128, use_sliding_window=True, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip


def _pair(config):
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ours = AutoModelForCausalLM.from_config(config, attn_implementation=register_attention()).eval()
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == ATTN_IMPLEMENTATION
    return eager, ours


def _batch(T=10, B=2, pad=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # left padding in the second row
    return ids, mask


def _max_logit_diff(a, b, mask):
    return (a.logits - b.logits)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("make_config", [_llama_config, _qwen2_config], ids=["llama", "qwen2_sliding"])
def test_logits_and_greedy_generate_match_eager(make_config):
    eager, ours = _pair(make_config())
    ids, mask = _batch()
    with torch.no_grad():
        assert (
            _max_logit_diff(eager(ids, attention_mask=mask), ours(ids, attention_mask=mask), mask) < LOGIT_TOL
        )
        unpadded = ids[:1]
        assert (eager(unpadded).logits - ours(unpadded).logits).abs().max() < LOGIT_TOL
        kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        expected = eager.generate(ids, attention_mask=mask, **kw)
        assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), expected)


def test_triton_kernel_inside_llama_matches_eager():
    eager, ours = _pair(_llama_config())
    configure_attention(ours, backend="triton")
    ids, mask = _batch(T=11)
    with torch.no_grad():
        assert (
            _max_logit_diff(eager(ids, attention_mask=mask), ours(ids, attention_mask=mask), mask) < LOGIT_TOL
        )
        kw = {"max_new_tokens": 3, "do_sample": False}
        assert torch.equal(ours.generate(ids[:1], **kw), eager.generate(ids[:1], **kw))


def test_custom_4d_mask_falls_back_to_reference_exactly():
    eager, ours = _pair(_llama_config())
    ids, _ = _batch(T=10)
    # A block mask eager understands: causal, but tokens 3..5 do not see tokens 0..2 (additive form).
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()
    allowed[3:6, 0:3] = False
    additive = torch.zeros(2, 1, 10, 10).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        a = eager(ids, attention_mask=additive).logits
        b = ours(ids, attention_mask=additive).logits
        c = ours(ids, attention_mask=allowed.expand(2, 1, 10, 10)).logits  # boolean form
    assert (a - b).abs().max() < LOGIT_TOL and (a - c).abs().max() < LOGIT_TOL
    with pytest.raises(ValueError, match="additive 4-D masks"):
        ours(ids, attention_mask=additive * 0 + 0.5)


def test_mask_function_hands_over_padding_only():
    kw = {"batch_size": 2, "q_length": 6, "kv_length": 6, "device": "cpu", "dtype": torch.float32}
    assert tokenlab_attention_mask(attention_mask=torch.ones(2, 6, dtype=torch.bool), **kw) is None
    padded = torch.ones(2, 6, dtype=torch.bool)
    padded[0, 0] = False
    assert torch.equal(tokenlab_attention_mask(attention_mask=padded, **kw), padded)
    full = tokenlab_attention_mask(attention_mask=padded, allow_is_causal_skip=False, **kw)
    assert full.shape == (2, 1, 6, 6) and full.dtype == torch.bool


def test_variant_hook_sinks_softcap_initial_token_scale():
    eager, ours = _pair(_llama_config())
    ids = _batch(T=9)[0][:1]
    with torch.no_grad():
        base = eager(ids).logits
        configure_attention(ours, sinks=-1e4, initial_token_scale=1.0)  # both are the identity
        assert (ours(ids).logits - base).abs().max() < LOGIT_TOL
        configure_attention(ours, sinks=0.0, layers=[1])
        changed = ours(ids).logits
    assert (changed - base).abs().max() > 1e-3
    assert torch.equal(ours.model.layers[0].self_attn.tokenlab_sinks.detach(), torch.full((4,), -1e4))
    sinks = ours.model.layers[1].self_attn.tokenlab_sinks
    assert isinstance(sinks, torch.nn.Parameter) and sinks.shape == (4,)
    ours(ids).logits.logsumexp(-1).sum().backward()
    assert sinks.grad is not None and sinks.grad.abs().sum() > 0

    # The same variants through the Triton kernel give the same logits as through the reference.
    configure_attention(ours, sinks=torch.tensor([0.5, -1.0, 0.0, 2.0]), softcap=3.0, initial_token_scale=2.0)
    with torch.no_grad():
        ref = ours(ids).logits
        configure_attention(
            ours,
            sinks=torch.tensor([0.5, -1.0, 0.0, 2.0]),
            softcap=3.0,
            initial_token_scale=2.0,
            backend="triton",
        )
        assert (ours(ids).logits - ref).abs().max() < LOGIT_TOL


def test_configure_attention_bad_input():
    _, ours = _pair(_llama_config())
    with pytest.raises(ValueError, match="`sinks` must be"):
        configure_attention(ours, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="`layers`"):
        configure_attention(ours, layers=[5])
    with pytest.raises(ValueError, match="`backend`"):
        configure_attention(ours, backend="gpu")
    with pytest.raises(ValueError, match="`softcap`"):
        configure_attention(ours, softcap=0.0)
    with pytest.raises(ValueError, match="no attention modules"):
        configure_attention(torch.nn.Linear(2, 2))
    ours.train()
    ours.model.layers[0].self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="`dropout`"):
        ours(torch.tensor([[1, 2, 3]]))


def test_configure_attention_bad_input_leaves_model_unchanged():
    _, ours = _pair(_llama_config())
    configure_attention(ours, sinks=0.5, initial_token_scale=2.0, softcap=3.0)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="`sinks` must be"):
        configure_attention(ours, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="`initial_token_scale` must be > 0"):
        configure_attention(ours, initial_token_scale=0.0)
    after = ours.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.tokenlab_softcap == 3.0 for m in ours.model.layers.modules() if hasattr(m, "q_proj"))


def test_public_attention_functions_are_typed_and_documented():
    import inspect

    from tokenlab.attention import hf, rope, set_based_prompting

    missing = []
    for module in (hf, rope, set_based_prompting):
        for name, fn in vars(module).items():
            if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            sig = inspect.signature(fn)
            untyped = [p for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty]
            if untyped or sig.return_annotation is inspect.Signature.empty or not fn.__doc__:
                missing.append(f"{module.__name__}.{name}")
    assert not missing, missing


def _tokenlab_registrations() -> list[str]:
    names = [*AttentionInterface._global_mapping, *AttentionMaskInterface._global_mapping]
    return sorted(k for k in names if k.startswith("tokenlab"))


@pytest.fixture
def unregistered():
    """transformers' attention registries without tokenlab's entries, as in a fresh process."""
    saved = [(i, dict(i._global_mapping)) for i in (AttentionInterface, AttentionMaskInterface)]
    for interface, mapping in saved:
        interface._global_mapping = {k: v for k, v in mapping.items() if not k.startswith("tokenlab")}
    yield
    for interface, mapping in saved:
        interface._global_mapping = mapping


def test_importing_registers_nothing_and_registration_is_explicit(unregistered):
    """transformers' attention registries are process-wide: executing any module of
    ``tokenlab.attention`` (a fresh module object, so that ``sys.modules`` is left alone) must leave
    them as they are; ``register_attention()`` adds ``"tokenlab"`` (idempotent), and the entry points
    that switch a model's implementation themselves register what they switch to."""
    package = importlib.import_module("tokenlab.attention")
    names = [package.__name__] + [
        f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
    ]
    for name in names:
        spec = importlib.util.find_spec(name)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert len(names) >= 9 and _tokenlab_registrations() == []

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_llama_config(), attn_implementation="eager").eval()
    ids = torch.randint(0, 97, (1, 5))
    analyze_sinks(model, ids, method="fused")
    assert _tokenlab_registrations() == ["tokenlab", "tokenlab"]  # attention and mask functions
    with initial_token_scaling(model, 2.0, mode="eager"):
        model(ids)
    assert _tokenlab_registrations() == ["tokenlab"] * 2 + ["tokenlab_zerotuning_eager"] * 2
    assert register_attention() == register_attention() == ATTN_IMPLEMENTATION
