"""ZeroTuning: γ = 1 is the identity, the eager fallback's probabilities follow the renormalisation
formula, the fused kernel flag and the eager fallback agree, and calibration improves its objective on
a toy task (supervised and unsupervised)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokenlab.attention import (
    initial_token_scaling,
    register_attention,
    zerotuning_calibrate,
    zerotuning_objective,
)


def _llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="eager",
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _ids(B=2, T=10, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_gamma_one_leaves_logits_unchanged():
    model = _llama()
    ids = _ids()
    expected = model(ids).logits
    with initial_token_scaling(model, 1.0):  # eager fallback
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    model.set_attn_implementation(register_attention())
    with initial_token_scaling(model, torch.ones(4)):  # fused flag
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert model.model.layers[0].self_attn.tokenlab_initial_token_scale is None  # restored


@torch.no_grad()
def test_eager_fallback_follows_the_renormalisation_formula():
    """Layer 0 sees the same inputs with and without γ, so its probabilities must be
    a'_0 = γ a_0 / D, a'_j = a_j / D with D = (γ − 1) a_0 + 1, from the plain eager ones."""
    model = _llama()
    ids = _ids()
    plain = model(ids, output_attentions=True).attentions[0]
    gamma = torch.tensor([[0.3, 1.0, 2.5, 7.0], [1.5, 1.5, 0.5, 0.5]])
    with initial_token_scaling(model, gamma, mode="eager"):
        assert model.config._attn_implementation == "tokenlab_zerotuning_eager"
        scaled = model(ids, output_attentions=True).attentions[0]
    assert model.config._attn_implementation == "eager"
    g = gamma[0][None, :, None, None]
    denominator = (g - 1) * plain[..., :1] + 1
    expected = torch.cat([g * plain[..., :1], plain[..., 1:]], dim=-1) / denominator
    torch.testing.assert_close(scaled, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scaled.sum(-1), torch.ones_like(scaled.sum(-1)))


@torch.no_grad()
def test_fused_flag_equals_eager_fallback():
    """Two mechanisms, one function: log γ added to the key-0 logit (kernel) vs multiply and
    renormalise the probabilities (eager), per layer and head, also through generation."""
    model = _llama()
    ids = _ids()
    gamma = torch.tensor([[0.3, 1.0, 2.5, 7.0], [1.5, 1.5, 0.5, 0.5]])
    with initial_token_scaling(model, gamma):
        eager = model(ids).logits
        eager_gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.set_attn_implementation(register_attention())
    with initial_token_scaling(model, gamma):
        fused = model(ids).logits
        fused_gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused_gen, eager_gen)
    assert (fused - model(ids).logits).abs().max() > 1e-2  # and γ does change the model


def _toy_task(world, n=32, length=48):
    """Next-token prediction on held-out Python: prompts are windows of held-out tokens, the answer
    options the true next tokens of all prompts."""
    ids = world.heldout_ids
    starts = torch.arange(n) * 97
    prompts = torch.stack([ids[s : s + length] for s in starts])
    answers = torch.stack([ids[s + length] for s in starts])
    candidates, labels = answers.unique(return_inverse=True)
    return prompts, candidates, labels


@pytest.mark.parametrize("supervised", [True, False], ids=["accuracy", "entropy"])
def test_calibration_improves_its_objective_on_a_toy_task(tiny_world, supervised):
    model = tiny_world.target
    prompts, candidates, labels = _toy_task(tiny_world)
    labels = labels if supervised else None
    grid = (0.25, 0.5, 2.0, 4.0)
    result = zerotuning_calibrate(model, prompts, candidates=candidates, labels=labels, grid=grid)
    L, H = result.gamma.shape
    assert result.profile.shape == (L * H, len(grid)) and len(result.groups) == L * H
    assert result.baseline == pytest.approx(
        zerotuning_objective(model, prompts, candidates=candidates, labels=labels)
    )
    # accuracy: at least one more of the 32 prompts right (measured 18.5% -> 21.6%); entropy: lower
    assert result.score > result.baseline + (1 / 32 if supervised else 0.0)
    with initial_token_scaling(model, result.gamma):
        assert zerotuning_objective(model, prompts, candidates=candidates, labels=labels) == pytest.approx(
            result.score
        )
    name = "accuracy" if supervised else "-entropy"
    print(f"ZeroTuning ({name}): {result.baseline:.4f} -> {result.score:.4f}")


def test_bad_arguments_raise():
    model = _llama()
    for gamma, mode, match in [
        (torch.ones(3), None, "gamma"),
        (torch.tensor([1.0, 0.0, 1.0, 1.0]), None, "gamma"),
        (1.5, "kernel", "mode"),  # an eager model
    ]:
        with pytest.raises(ValueError, match=match), initial_token_scaling(model, gamma, mode=mode):
            pass
    with pytest.raises(ValueError, match="labels"):
        zerotuning_calibrate(model, _ids(), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="grid"):
        zerotuning_calibrate(model, _ids(), grid=(1.0,))
    with pytest.raises(ValueError, match="groups"):
        zerotuning_calibrate(model, _ids(), groups=[[(5, 0)]])
    # the objective is public too: it checks its arguments before running the model
    for kwargs, error, match in [
        ({"input_ids": _ids().float()}, TypeError, "input_ids"),
        ({"input_ids": _ids(), "candidates": torch.tensor([[1, 2]])}, ValueError, "candidates"),
        ({"input_ids": _ids(), "candidates": torch.tensor([1, 200])}, ValueError, "candidates"),
        ({"input_ids": _ids(), "labels": torch.tensor([0, 1])}, ValueError, "labels"),
        ({"input_ids": _ids(), "candidates": torch.tensor([3, 4]), "labels": torch.tensor([0, 2])},
         ValueError, "labels"),
    ]:  # fmt: skip
        with pytest.raises(error, match=match):
            zerotuning_objective(model, **kwargs)
