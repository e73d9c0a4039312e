"""KV-cache policies (StreamingLLM sink + window, H2O heavy hitters) as transformers caches: identical to
DynamicCache when nothing is evicted, kept tokens equal to brute-force simulations of each policy,
positions checked against a one-layer model run without a cache, bounded size over 1,000 generated
tokens, and kvpress's StreamingLLM press as a peer."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tokenlab.attention import HeavyHitterCache, SinkCache, register_attention

GREEDY = {"do_sample": False, "pad_token_id": 0}


def _llama(layers=2, kv_heads=2, dtype=torch.float32, attn="tokenlab", seed=0):
    if attn == "tokenlab":
        register_attention()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=4096, attn_implementation=attn,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def _ids(B=2, T=12, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "make_cache",
    [
        lambda m: SinkCache(m, budget=64),
        lambda m: SinkCache(m, budget=64, sinks=0, positions="original"),
        lambda m: HeavyHitterCache(m, budget=64, sinks=2),
        lambda m: HeavyHitterCache(m, budget=64, positions="cache"),
    ],
    ids=["sink", "window_original", "h2o_sinks", "h2o_cache_positions"],
)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_budget_above_the_sequence_is_dynamic_cache(make_cache, family):
    if family == "llama":
        model = _llama()
    else:
        torch.manual_seed(0)
        config = Qwen2Config(
            vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, attn_implementation=register_attention(),
        )  # fmt: skip
        model = Qwen2ForCausalLM(config).eval()
    ids = _ids()
    expected = model.generate(ids, cache=DynamicCache(config=model.config), max_new_tokens=24, **GREEDY)
    cache = make_cache(model)
    assert torch.equal(model.generate(ids, cache=cache, max_new_tokens=24, **GREEDY), expected)
    assert cache.cached_lengths() == [12 + 23] * 2


def test_sink_cache_keeps_sinks_and_window_at_every_step():
    model = _llama()
    cache = SinkCache(model, budget=10, sinks=3)
    ids = _ids(B=1, T=14)
    with torch.no_grad():
        model(ids, cache=cache)  # a prompt longer than the budget: attended in full, then cut
        for step in range(20):
            seen = 14 + step
            expected = list(range(3)) + list(range(seen - 7, seen))
            for layer in range(2):
                assert cache.positions(layer)[0, 0].tolist() == expected
            model(torch.tensor([[step % 97]]), cache=cache)


def _simulate_h2o(steps, budget, sinks, window):
    """Brute force of H2O's greedy eviction with pinned sinks, on sets, per (row, head)."""
    kept: dict[int, float] = {}
    seen = 0
    for scores in steps:  # scores: {position: attention this step} over kept ∪ new
        T = len(scores) - len(kept)
        new = range(seen, seen + T)
        seen += T
        assert set(scores) == set(kept) | set(new)
        kept = {p: kept.get(p, 0.0) + s for p, s in scores.items()}
        if len(kept) > budget:
            recent = sorted(kept)[-window:] if window else []
            pinned = {p for p in kept if p < sinks} | set(recent)
            rest = sorted((p for p in kept if p not in pinned), key=lambda p: -kept[p])
            kept = {p: kept[p] for p in pinned | set(rest[: budget - len(pinned)])}
    return kept


def test_heavy_hitter_eviction_equals_brute_force_on_constructed_attention():
    """Constructed per-key scores (GQA: 4 query heads on 2 KV heads) fed through the cache's hook
    interface over a prefill and 30 decoding steps; every kept set and score equals the brute force."""
    model = _llama()
    budget, sinks, window = 9, 2, 3
    cache = HeavyHitterCache(model, budget=budget, window=window, sinks=sinks)
    g = torch.Generator().manual_seed(0)
    B, Hkv, Hq, D = 2, 2, 4, 16
    history = {(b, h): [] for b in range(B) for h in range(Hkv)}
    for T in [13] + [1] * 30:
        keys = torch.randn(B, Hkv, T, D, generator=g)
        k, _ = cache.update(keys, keys.clone(), 0)
        assert cache.wants_key_scores(0) and not cache.wants_key_scores(1)
        scores = torch.rand(B, Hq, k.shape[2], generator=g, dtype=torch.float64).float()
        positions = cache.positions(0).clone()
        cache.record_key_scores(0, scores)
        grouped = scores.view(B, Hkv, 2, -1).sum(2)
        for (b, h), steps in history.items():
            steps.append(dict(zip(positions[b, h].tolist(), grouped[b, h].tolist())))
    for (b, h), steps in history.items():
        expected = _simulate_h2o(steps, budget, sinks, window)
        assert cache.positions(0)[b, h].tolist() == sorted(expected)
        got = cache.heavy_hitter_scores(0)[b, h].tolist()
        assert got == pytest.approx([expected[p] for p in sorted(expected)], rel=1e-6)
    assert len({tuple(cache.positions(0)[b, h].tolist()) for b in range(B) for h in range(Hkv)}) > 1


@torch.no_grad()
def _stream(model, cache, ids):
    """Prefill with the first token, then feed the others one by one; returns the last logits."""
    model(ids[:, :1], cache=cache)
    for t in range(1, ids.shape[1] - 1):
        model(ids[:, t : t + 1], cache=cache)
    return model(ids[:, -1:], cache=cache).logits[0, -1]


@pytest.mark.parametrize("positions", ["cache", "original"])
def test_sink_positions_match_a_one_layer_model_without_cache(positions):
    """With one layer, a token's key and value depend only on its id and position, so a step of the
    streaming cache must equal the plain forward over the kept tokens at the positions the policy
    states: 0 … L−1 within the cache (StreamingLLM's re-indexing; the sinks are re-rotated) or the
    original ones. The two differ once tokens have been evicted."""
    model = _llama(layers=1, dtype=torch.float64)
    ids = _ids(B=1, T=40, seed=3)
    cache = SinkCache(model, budget=12, sinks=4, positions=positions)
    got = _stream(model, cache, ids)
    kept = cache.positions(0)[0, 0]  # what the last step attended to: sinks 0..3 and the window 32..39
    assert kept.tolist() == [0, 1, 2, 3, *range(32, 40)]
    pos = torch.arange(12) if positions == "cache" else kept
    with torch.no_grad():
        expected = model(ids[:, kept], position_ids=pos[None]).logits[0, -1]
        other = model(ids[:, kept], position_ids=(kept if positions == "cache" else torch.arange(12))[None])
    # transformers builds RoPE tables in float32 even for float64 models, so rotating at other absolute
    # positions (the cache re-indexing) agrees to float32 rounding of cos/sin; same positions: exact.
    tol = 1e-6 if positions == "cache" else 1e-10
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert (got - other.logits[0, -1]).abs().max() > 1e-3


def test_heavy_hitter_positions_match_a_one_layer_model_without_cache():
    """H2O keeps original positions: its last step equals the plain forward over the tokens it kept
    before that step plus the new one, at their original positions (one KV head: one kept set)."""
    model = _llama(layers=1, kv_heads=1, dtype=torch.float64)
    ids = _ids(B=1, T=30, seed=4)
    before = HeavyHitterCache(model, budget=10, window=4)
    _stream(model, before, ids[:, :-1])
    attended = torch.cat([before.positions(0)[0, 0], torch.tensor([29])])
    cache = HeavyHitterCache(model, budget=10, window=4)
    got = _stream(model, cache, ids)
    kept = cache.positions(0)[0, 0]
    assert (
        kept.numel() == 10
        and kept[-4:].tolist() == [26, 27, 28, 29]
        and set(kept.tolist()) <= set(attended.tolist())
    )
    with torch.no_grad():
        expected = model(ids[:, attended], position_ids=attended[None]).logits[0, -1]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "make_cache",
    [lambda m: SinkCache(m, budget=10, sinks=2), lambda m: HeavyHitterCache(m, budget=10, window=4, sinks=1)],
    ids=["sink", "h2o"],
)
def test_beam_reordering_and_expansion_follow_the_rows_they_select(make_cache):
    """Beam search calls ``reorder_cache(beam_idx)`` between steps (and ``batch_repeat_interleave``
    to expand rows): afterwards each row must continue as the row it now holds — the same logits, kept
    positions and (H2O) accumulated scores as a cache that ran that row's history from the start.
    Eviction is under way (14-token prompt, budget 10) and H2O keeps different tokens per row."""
    model = _llama()
    g = torch.Generator().manual_seed(7)
    prompt, steps, after = (torch.randint(0, 97, (3, n), generator=g) for n in (14, 3, 3))
    select = torch.tensor([2, 2, 0, 0, 2, 2])  # reorder [2, 0, 2], then repeat each row twice

    def run(cache, rows, edit):
        logits = []
        with torch.no_grad():
            model(prompt[rows], cache=cache)
            for t in range(3):
                model(steps[rows, t : t + 1], cache=cache)
            edit(cache)
            for t in range(3):
                logits.append(model(after[select, t : t + 1], cache=cache).logits)
        state = [cache.positions(i).clone() for i in range(2)]
        if isinstance(cache, HeavyHitterCache):
            state += [cache.heavy_hitter_scores(i).clone() for i in range(2)]
        return torch.cat(logits, dim=1), state

    def reorder_then_expand(cache):
        cache.reorder_cache(torch.tensor([2, 0, 2]))
        cache.batch_repeat_interleave(2)

    got, got_state = run(make_cache(model), slice(None), reorder_then_expand)
    want, want_state = run(make_cache(model), select, lambda cache: None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_state, want_state):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got_state[0].shape == (6, 2, 10)


def test_size_stays_within_budget_over_1000_generated_tokens():
    model = _llama(layers=1)
    ids = _ids(B=1, T=20)
    for cache in (SinkCache(model, budget=32, sinks=4), HeavyHitterCache(model, budget=32, sinks=4)):
        sizes = []

        def record(input_ids, scores, cache=cache, sizes=sizes):
            sizes.append(max(cache.cached_lengths()))
            return False

        kw = {"max_new_tokens": 1000, "min_new_tokens": 1000, "stopping_criteria": [record], **GREEDY}
        out = model.generate(ids, cache=cache, **kw)
        assert out.shape[1] == 1020 and len(sizes) == 1000 and max(sizes) == 32
        assert cache.get_seq_length() == 1019 and cache.nbytes() == 2 * 32 * 2 * 16 * 4  # K+V, 2 heads, fp32


@pytest.fixture
def kvpress():
    """kvpress, imported without its side effect: on import it wraps every function of transformers'
    ALL_ATTENTION_FUNCTIONS (a wrapper that breaks calls in transformers 5.x); the wrappers are undone."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    saved = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    module = pytest.importorskip("kvpress")
    ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
    ALL_ATTENTION_FUNCTIONS._local_mapping.update(saved)
    return module


def test_kvpress_streaming_llm_press_keeps_the_same_keys(kvpress):
    """Peer: kvpress's StreamingLLMPress compresses a prefill's DynamicCache keys to the first n_sink
    tokens and the most recent ones; SinkCache (original positions) keeps the same keys and values."""
    model = _llama()
    ids = _ids(B=2, T=32)
    dynamic = DynamicCache(config=model.config)
    ours = SinkCache(model, budget=24, sinks=4, positions="original")
    with torch.no_grad():
        model(ids, cache=dynamic)
        model(ids, cache=ours)
    press = kvpress.StreamingLLMPress(compression_ratio=0.25, n_sink=4)
    for layer in range(2):
        module = model.model.layers[layer].self_attn
        keys, values = dynamic.layers[layer].keys, dynamic.layers[layer].values
        order = torch.arange(32, dtype=keys.dtype).expand(2, 2, 32)[..., None].expand_as(keys)
        kept_order, _ = press.compress(module, None, order, values, None, {})
        kept = kept_order[..., 0].long().sort(dim=-1).values
        assert torch.equal(kept, ours.positions(layer))
        index = kept[..., None].expand(-1, -1, -1, keys.shape[-1])
        assert torch.equal(ours.layers[layer].keys, keys.gather(2, index))
        assert torch.equal(ours.layers[layer].values, values.gather(2, index))


def test_heavy_hitter_cache_needs_tokenlab_attention_and_valid_arguments():
    eager = _llama(attn="eager")
    with pytest.raises(ValueError, match="attn_implementation"):
        HeavyHitterCache(eager, budget=8)
    model = _llama()
    with pytest.raises(ValueError, match="sinks"):
        SinkCache(model, budget=4, sinks=4)
    with pytest.raises(ValueError, match="budget"):
        HeavyHitterCache(model, budget=8, window=6, sinks=3)
    with pytest.raises(ValueError, match="positions"):
        SinkCache(model, budget=8, positions="absolute")
    with pytest.raises(TypeError, match="model"):
        SinkCache(model.config, budget=8)
    torch.manual_seed(0)
    sliding = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            use_sliding_window=True,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
        )
    )
    with pytest.raises(ValueError, match="full-attention"):
        SinkCache(sliding, budget=8)
    # Scores never delivered (another cache built for the model since): a clear error, not silent drift.
    stale = HeavyHitterCache(model, budget=8)
    HeavyHitterCache(model, budget=8)
    with pytest.raises(RuntimeError, match="no attention scores"), torch.no_grad():
        model(_ids(T=4), cache=stale)
        model(_ids(T=1), cache=stale)
