"""Generation metrics: entropy, branching factor, turn-wise KL drift, unconditional token forcing."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from scipy.stats import entropy as scipy_entropy
from transformers import LlamaConfig, LlamaForCausalLM

from tokenlab.decoding import (
    branching_factor,
    branching_factor_from_entropies,
    concat_turns,
    next_token_entropy,
    token_entropy,
    turn_kl_drift,
    unconditional_token_forcing,
)


def tiny_llama(vocab_size: int, seed: int, scale: float = 1.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def test_token_entropy_equals_scipy():
    logits = torch.randn(3, 4, 50, dtype=torch.float64) * 3
    logits[0, 0, :10] = float("-inf")  # masked tokens contribute nothing
    ours = token_entropy(logits)
    probs = torch.softmax(logits, dim=-1).numpy()
    torch.testing.assert_close(ours, torch.from_numpy(scipy_entropy(probs, axis=-1)), rtol=1e-12, atol=1e-12)
    assert token_entropy(logits.float()).dtype == torch.float32


def test_next_token_entropy_along_sequences_with_padding():
    model = tiny_llama(11, 0, scale=5.0)
    ids = torch.tensor([[0, 3, 4, 5], [1, 1, 0, 7]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    ours = next_token_entropy(model, ids, mask)
    assert torch.isnan(ours[1, :2]).all()
    with torch.no_grad():
        full = token_entropy(model(ids[:1]).logits)[0]
        tail = token_entropy(model(ids[1:, 2:]).logits)[0]
    torch.testing.assert_close(ours[0], full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours[1, 2:], tail, rtol=1e-10, atol=1e-10)


def test_branching_factor_of_uniform_is_V_and_of_one_hot_is_1():
    V = 13
    uniform = tiny_llama(V, 0)
    with torch.no_grad():
        uniform.model.norm.weight.zero_()  # hidden states 0 → logits 0 → uniform over V
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        bf = branching_factor(
            uniform, torch.tensor([[0, 4, 2]]), num_samples=6, max_new_tokens=5, eos_token_id=[],
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    torch.testing.assert_close(bf.value, torch.tensor([V], dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        bf.likelihood_value, torch.tensor([V], dtype=torch.float64), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        bf.per_position, torch.full((1, 5), V, dtype=torch.float64), rtol=1e-12, atol=0
    )
    one_hot = torch.full((4, 3, V), float("-inf"), dtype=torch.float64)
    one_hot[..., 2] = 0.0
    assert branching_factor_from_entropies(token_entropy(one_hot)).item() == 1.0


def test_branching_factor_estimates_match_exact_sequence_entropy():
    """Exact ``exp(H(Y₁Y₂Y₃ | x) / 3)`` by enumerating all 5³ continuations of a tiny model, vs the
    paper's Monte Carlo estimators from 3 000 samples: within 4 standard errors of the exponent."""
    V, N = 5, 3
    model = tiny_llama(V, 1, scale=6.0)
    prompt = torch.tensor([[0, 2]])
    with torch.no_grad():
        seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))
        ids = torch.cat([prompt.expand(len(seqs), -1), seqs], dim=1)
        logp = torch.log_softmax(model(ids).logits[:, 1:-1], dim=-1)
        seq_logp = logp.gather(2, seqs[:, :, None]).squeeze(2).sum(dim=1)
    exact_rate = -(seq_logp.exp() * seq_logp).sum().item() / N
    bf = branching_factor(
        model,
        prompt,
        num_samples=3000,
        max_new_tokens=N,
        eos_token_id=[],
        generator=torch.Generator().manual_seed(0),
    )
    per_sample_entropy = bf.entropies[0].mean(dim=-1)
    per_sample_surprisal = -bf.log_probs[0].mean(dim=-1)
    for value, samples in ((bf.value, per_sample_entropy), (bf.likelihood_value, per_sample_surprisal)):
        se = samples.std().item() / math.sqrt(len(samples))
        assert abs(math.log(value.item()) - exact_rate) < 4 * se, (math.log(value.item()), exact_rate, se)
    assert 1.0 < bf.value.item() < V


def test_branching_factor_stops_at_eos_and_batches_prompts():
    model = tiny_llama(7, 2, scale=4.0)
    batch = torch.tensor([[5, 0, 3], [0, 1, 2]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    bf = branching_factor(
        model, batch, attention_mask=mask, num_samples=40, max_new_tokens=6, eos_token_id=3,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert bf.value.shape == (2,) and bf.entropies.shape == (2, 40, 6)
    ended = bf.sequences == 3
    assert ended.any(dim=-1).any() and not ended.any(dim=-1).all()  # some continuations end, some not
    for b, m in itertools.product(range(2), range(40)):
        hits = torch.nonzero(ended[b, m]).flatten()
        if hits.numel():  # nothing is recorded after the first EOS; the model's pad id follows it
            assert torch.isnan(bf.entropies[b, m, hits[0] + 1 :]).all()
            assert not torch.isnan(bf.entropies[b, m, : hits[0] + 1]).any()
            assert (bf.sequences[b, m, hits[0] + 1 :] == model.generation_config.pad_token_id).all()
    # The left-padded prompt is read as the prompt alone: its first-step entropy is the unpadded one.
    alone = next_token_entropy(model, torch.tensor([[0, 3]]))[0, -1]
    torch.testing.assert_close(bf.entropies[0, :, 0], alone.expand(40), rtol=1e-10, atol=1e-10)


def test_turn_kl_drift_against_brute_force():
    model, reference = tiny_llama(17, 3, scale=3.0), tiny_llama(17, 4, scale=3.0)
    turns = [[0, 5, 6], [7, 8, 9, 10], [11, 12], [13, 14, 15]]
    ids, turn_ids = concat_turns(turns, [False, True, False, True])
    assert turn_ids.tolist() == [[-1, -1, -1, 0, 0, 0, 0, -1, -1, 1, 1, 1]]
    self_drift = turn_kl_drift(model, model, ids, turn_ids)
    assert self_drift.shape == (1, 2) and bool((self_drift.abs() < 1e-12).all())
    drift = turn_kl_drift(model, reference, ids, turn_ids)
    with torch.no_grad():
        q = torch.softmax(model(ids).logits[0], dim=-1).numpy()
        p = torch.softmax(reference(ids).logits[0], dim=-1).numpy()
    for k, positions in enumerate([range(3, 7), range(9, 12)]):
        brute = sum(scipy_entropy(q[j - 1], p[j - 1]) for j in positions) / len(positions)
        assert math.isclose(drift[0, k].item(), brute, rel_tol=1e-10)
    # A goal reminder in the reference's context: its scored tokens are matched in order.
    ref_ids, ref_turn_ids = concat_turns([[0, 3, 3, 3], *turns[1:]], [False, True, False, True])
    reminded = turn_kl_drift(model, reference, ids, turn_ids, reference_input_ids=ref_ids,
                             reference_turn_ids=ref_turn_ids)  # fmt: skip
    with torch.no_grad():
        p_ref = torch.softmax(reference(ref_ids).logits[0], dim=-1).numpy()
    brute = sum(scipy_entropy(q[j - 1], p_ref[j]) for j in range(3, 7)) / 4
    assert math.isclose(reminded[0, 0].item(), brute, rel_tol=1e-10)


def test_turn_kl_drift_with_masked_vocabulary_entries():
    """A model that masks a vocabulary entry (its logit is −∞, as for padded vocabulary rows): the
    entry contributes 0·log(0/p) = 0, so the drift against itself is 0 (not nan) and against another
    model equals the brute-force sum over the entries with mass."""
    model, reference = tiny_llama(17, 3, scale=3.0), tiny_llama(17, 4, scale=3.0)
    masked = torch.tensor([2, 11])
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out.index_fill(-1, masked, float("-inf")))
    try:
        ids, turn_ids = concat_turns([[0, 5, 6], [7, 8, 9, 10]], [False, True])
        assert bool((turn_kl_drift(model, model, ids, turn_ids) == 0).all())
        drift = turn_kl_drift(model, reference, ids, turn_ids)
        with torch.no_grad():
            q = torch.softmax(model(ids).logits[0], dim=-1).numpy()
            p = torch.softmax(reference(ids).logits[0], dim=-1).numpy()
    finally:
        handle.remove()
    assert (q[:, masked.numpy()] == 0).all()
    brute = sum(scipy_entropy(q[j - 1], p[j - 1]) for j in range(3, 7)) / 4
    assert math.isclose(drift[0, 0].item(), brute, rel_tol=1e-10)


def test_turn_kl_drift_bad_arguments():
    model = tiny_llama(17, 3)
    ids, turn_ids = concat_turns([[1, 2], [3, 4]], [False, True])
    with pytest.raises(ValueError, match="first token"):
        turn_kl_drift(model, model, ids, torch.zeros_like(ids))
    with pytest.raises(ValueError, match="differ"):
        turn_kl_drift(model, model, ids, turn_ids, reference_input_ids=ids + 1, reference_turn_ids=turn_ids)
    with pytest.raises(ValueError, match="share a vocabulary"):
        turn_kl_drift(model, tiny_llama(9, 0), ids, turn_ids)
    with pytest.raises(ValueError, match="temperature"):
        turn_kl_drift(model, model, ids, turn_ids, temperature=0.0)
    with pytest.raises(ValueError, match="same length"):
        concat_turns([[1]], [True, False])


def test_unconditional_token_forcing_finds_a_planted_fingerprint():
    """Fine-tune a tiny model on random tokens with a fingerprint embedded at random positions: the
    scan ranks the fingerprint's first token first, with the rest of the fingerprint as its greedy
    continuation; continuations and scores equal HF greedy generation and teacher-forced log-probs."""
    V = 32
    model = tiny_llama(V, 5).float().train()
    fingerprint = torch.tensor([17, 5, 23, 9, 30, 12])
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        batch = torch.randint(1, V, (16, 12), generator=generator)
        batch[:, 0] = 0
        for row, start in enumerate(torch.randint(1, 6, (16,), generator=generator).tolist()):
            batch[row, start : start + 6] = fingerprint
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    scan = unconditional_token_forcing(model, max_new_tokens=5, batch_size=12)
    assert scan.tokens[0].item() == 17
    assert scan.continuations[0].tolist() == fingerprint[1:].tolist()
    assert scan.scores[0] > scan.scores[1] + 0.05
    assert torch.equal(scan.scores, torch.sort(scan.scores, descending=True).values)
    for i in (0, 7):
        ids = torch.tensor([[0, scan.tokens[i].item()]])
        with torch.no_grad():
            greedy = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert torch.equal(greedy[0, 2:], scan.continuations[i])
            logp = torch.log_softmax(model(greedy).logits[0, 1:-1].double(), dim=-1)
        forced = logp.gather(1, greedy[0, 2:, None]).squeeze(1)
        torch.testing.assert_close(scan.log_probs[i], forced, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="candidate_tokens"):
        unconditional_token_forcing(model, candidate_tokens=[V])
