"""Attention-sink analysis: scores of constructed attention patterns in closed form, eager and fused
paths equal to statistics recomputed from ``output_attentions`` and the model's own states, the
BOS-decorrelation loss against a loop over tokens, and the plot helpers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tokenlab.attention import analyze_sinks, attention_map, bos_decorrelation_loss, register_attention
from tokenlab.attention.hf import configure_attention
from tokenlab.attention.sink_analysis import SinkAnalysis


def _llama(seed=0, attn="eager"):
    if attn == "tokenlab":
        register_attention()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation=attn,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _ids(B=2, T=11, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def test_constructed_pattern_gives_the_closed_form_scores():
    """Zero query projections make every logit equal; ZeroTuning's γ_h on key 0 then gives query i the
    weight γ_h / (γ_h + i) on the first token, so α_0 = (1/T) Σ_i γ_h / (γ_h + i) in closed form."""
    model = _llama(attn="tokenlab")
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.data.zero_()
    gamma = torch.tensor([0.5, 1.0, 8.0, 200.0])
    configure_attention(model, initial_token_scale=gamma)
    T = 11
    analysis = analyze_sinks(model, _ids(T=T), method="fused")
    expected = torch.tensor([sum(g / (g + i) for i in range(T)) / T for g in gamma.tolist()])
    torch.testing.assert_close(analysis.sink_scores, expected.expand(2, 2, 4), rtol=1e-5, atol=1e-6)
    # key j ≥ 1 receives 1 / (γ + i) from every query i ≥ j
    col = torch.tensor([sum(1 / (gamma[0].item() + i) for i in range(j, T)) for j in range(1, T)])
    torch.testing.assert_close(analysis.key_scores[0, 0, 0, 1:], col, rtol=1e-5, atol=1e-6)
    assert expected.tolist() == pytest.approx([0.198, 0.275, 0.656, 0.976], abs=1e-3)
    assert analysis.dormant[0, 0].tolist() == [False, False, True, True]  # ε = 0.3
    assert analysis.sink_rate == 0.5
    assert analysis.top_keys[..., 1:].eq(0).all()  # γ ≥ 1: key 0 receives the most attention
    strict = analyze_sinks(model, _ids(T=T), method="fused", threshold=0.7)
    assert strict.dormant[0, 0].tolist() == [False, False, False, True] and strict.sink_rate == 0.25


def test_importance_and_top_key_on_constructed_key_scores():
    key_scores = torch.tensor([[[[4.0, 1.0, 2.5, 0.5]]]])  # T = 4: key j is seen by 4 - j queries
    analysis = SinkAnalysis(key_scores, None, torch.ones(1, 1, 4), torch.ones(1, 1, 4), threshold=0.5)
    torch.testing.assert_close(analysis.importance, torch.tensor([[[[1.0, 1 / 3, 1.25, 0.5]]]]))
    assert analysis.sink_scores.item() == 1.0 and analysis.top_keys.item() == 0
    assert analysis.top_key_scores.item() == 1.0 and analysis.dormant.item()


@pytest.mark.parametrize("method", ["eager", "fused"])
def test_scores_equal_those_recomputed_from_output_attentions(method):
    model = _llama()
    ids = _ids()
    analysis = analyze_sinks(model, ids, method=method)
    assert model.config._attn_implementation == "eager"  # restored
    with torch.no_grad():
        out = model(ids, output_attentions=True, output_hidden_states=True)
    attentions = torch.stack(out.attentions, dim=1)  # [B, L, H, T, T]
    T = ids.shape[1]
    torch.testing.assert_close(analysis.sink_scores, attentions[..., 0].mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(analysis.key_scores, attentions.sum(-2), rtol=1e-5, atol=1e-5)
    expected_importance = torch.stack([attentions[..., k:, k].mean(-1) for k in range(T)], dim=-1)
    torch.testing.assert_close(analysis.importance, expected_importance, rtol=1e-5, atol=1e-6)
    hidden = torch.stack(out.hidden_states[:2], dim=1)  # the residual stream entering each layer
    torch.testing.assert_close(analysis.residual_norms, hidden.norm(dim=-1))
    torch.testing.assert_close(analysis.max_activations, hidden.abs().amax(-1))
    for layer, block in enumerate(model.model.layers):
        with torch.no_grad():
            v = block.self_attn.v_proj(block.input_layernorm(out.hidden_states[layer]))
        torch.testing.assert_close(
            analysis.value_norms[:, layer], v.view(2, T, 2, 16).norm(dim=-1).transpose(1, 2)
        )
    torch.testing.assert_close(attention_map(model, ids, 1, 3), attentions[:, 1, 3])


@pytest.mark.parametrize("method", ["eager", "fused"])
def test_sliding_window_layers_average_over_the_queries_that_see_the_key(method):
    """In a sliding-window layer (window w) key k is seen by min(T − k, w) queries, not T − k: the
    importance (and the sink score α_0) averages over those. Qwen2 with layer 0 sliding (w = 4) and
    layer 1 full, T = 11; the counts come from the eager attention mask itself."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], attn_implementation="eager",
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    ids = _ids()
    analysis = analyze_sinks(model, ids, method=method)
    with torch.no_grad():
        attentions = torch.stack(model(ids, output_attentions=True).attentions, dim=1)  # [B, L, H, T, T]
    seen_by = (attentions[0, :, 0] > 0).sum(-2)  # [L, T]: queries that see each key
    assert seen_by[0].tolist() == [4] * 8 + [3, 2, 1] and seen_by[1].tolist() == list(range(11, 0, -1))
    torch.testing.assert_close(
        analysis.importance, attentions.sum(-2) / seen_by[None, :, None], rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(analysis.sink_scores[:, 0], attentions[:, 0, :, :4, 0].mean(-1))


def test_bos_decorrelation_loss_equals_a_loop_over_tokens():
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 5, 8, generator=g, requires_grad=True) for _ in range(4)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    loss = bos_decorrelation_loss(states, mask)
    per_layer = []
    for h in states[1:3]:  # default: the intermediate entries
        terms = [
            torch.nn.functional.cosine_similarity(h[b, 0], h[b, j], dim=0) ** 2
            for b in range(2)
            for j in range(1, 5)
            if mask[b, j]
        ]
        per_layer.append(sum(terms) / len(terms))
    torch.testing.assert_close(loss, sum(per_layer) / 2)
    loss.backward()
    assert states[1].grad.abs().sum() > 0 and states[0].grad is None and states[3].grad is None
    bos = torch.zeros(1, 3, 4)
    bos[0, 0, 0] = 2.0
    bos[0, 1, 1] = -1.0  # orthogonal to BOS
    bos[0, 2, 0] = -3.0  # anti-parallel: cos² = 1
    assert bos_decorrelation_loss([bos], layers=[0]).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="layers"):
        bos_decorrelation_loss(states, layers=[7])
    with pytest.raises(ValueError, match="attention_mask"):
        bos_decorrelation_loss(states, torch.ones(2, 4))


def test_bad_arguments_raise():
    model = _llama()
    with pytest.raises(ValueError, match="method"):
        analyze_sinks(model, _ids(), method="sdpa")
    with pytest.raises(ValueError, match="threshold"):
        analyze_sinks(model, _ids(), threshold=1.0)
    with pytest.raises(TypeError, match="input_ids"):
        analyze_sinks(model, _ids().float())
    with pytest.raises(ValueError, match="layer"):
        attention_map(model, _ids(), 2, 0)


def test_plot_helpers_draw(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from tokenlab.attention.plots import plot_attention_map, plot_residual_norms, plot_sink_scores

    model = _llama()
    ids = _ids()
    analysis = analyze_sinks(model, ids)
    ax = plot_sink_scores(analysis)
    assert ax.images[0].get_array().shape == (2, 4)
    ax.figure.savefig(tmp_path / "sinks.png")
    ax = plot_attention_map(attention_map(model, ids, 0, 0)[0], tokens=[str(t) for t in ids[0].tolist()])
    assert ax.images[0].get_array().shape == (11, 11)
    ax = plot_residual_norms(analysis, row=1)
    assert len(ax.lines) == 2 and math.isclose(
        ax.lines[0].get_ydata()[0], analysis.residual_norms[1, 0, 0].item()
    )
    assert (tmp_path / "sinks.png").stat().st_size > 0
    with pytest.raises(ValueError, match="row"):
        plot_residual_norms(analysis, row=2)
