"""Counterfactual generation with the Gumbel-Max SCM against its oracles.

* with no intervention the replay is identical; after a token intervention at ``t`` the tokens
  before ``t`` are unchanged;
* every generated token is the SCM's ``argmax(warped logits + U)`` recomputed from scratch (a fresh
  forward of the prefix, the recorded noise) — for the factual run and for both kinds of intervention;
* the marginal law of the sampled tokens is the warped softmax (chi-square, fixed seeds), across
  seeds and across positions;
* the noise belongs to vocabulary ids: counterfactual stability (raising the chosen token's logit
  relative to all others never changes the choice) holds for our sampler and fails for noise
  attached to ranks.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from tokenlab._checks import ArgumentTypeError
from tokenlab.decoding import (
    GumbelSample,
    Warping,
    counterfactual_generate,
    gumbel_generate,
    gumbel_max_choice,
    gumbel_noise,
    warped_probs,
)

PROMPTS = ["def read(path):\n    with open(", "import os\n", "class Point:\n    def __init__(self, x, y):\n"]
WARP = dict(temperature=0.9, top_k=60, top_p=0.95)


@pytest.fixture(scope="module")
def world(tiny_world):
    tok = tiny_world.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    return tiny_world.target, tok, batch


@torch.no_grad()
def _scm_tokens(model, prompt_rows, sample: GumbelSample, new_tokens):
    """Recompute each token of ``new_tokens [B, N]`` from a fresh forward of its prefix and the noise."""
    tokens = []
    for b, prompt in enumerate(prompt_rows):
        row = []
        for i in range(new_tokens.shape[1]):
            ids = torch.cat([prompt, new_tokens[b, :i]]).view(1, -1)
            logits = model(input_ids=ids).logits[:, -1].float()
            noise = gumbel_noise(sample.seeds[b : b + 1], i, logits.shape[-1])
            row.append(int(gumbel_max_choice(sample.warping.logits(logits), noise)))
        tokens.append(row)
    return torch.tensor(tokens)


def _factual(model, batch, max_new_tokens, seed):
    """A sampled run of the padded ``batch`` (no EOS stop, so every row has ``max_new_tokens``)."""
    return gumbel_generate(
        model, batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
        seed=seed, eos_token_id=[], **WARP,
    )  # fmt: skip


def _rows(tok, prompts):
    return [tok(p, return_tensors="pt").input_ids[0] for p in prompts]


def test_no_intervention_replays_identically(world):
    model, tok, batch = world
    factual = _factual(model, batch, 12, seed=11)
    again = counterfactual_generate(model, factual)
    assert torch.equal(again.sequences, factual.sequences)
    assert torch.equal(factual.seeds, torch.tensor([11, 12, 13]))
    # The factual run is the SCM (padded batch = each row alone with its noise).
    assert torch.equal(
        _scm_tokens(model, _rows(tok, PROMPTS), factual, factual.new_tokens), factual.new_tokens
    )


def test_token_intervention_keeps_the_past_and_replays_the_noise(world):
    model, tok, batch = world
    factual = _factual(model, batch, 12, seed=5)
    t = 4
    replacement = (factual.new_tokens[:, t] + 1) % model.config.vocab_size  # surely a different token
    cf = counterfactual_generate(model, factual, position=t, token=replacement)
    assert torch.equal(cf.new_tokens[:, :t], factual.new_tokens[:, :t])
    assert torch.equal(cf.new_tokens[:, t], replacement)
    expected = _scm_tokens(model, _rows(tok, PROMPTS), cf, cf.new_tokens)
    assert torch.equal(expected[:, t + 1 :], cf.new_tokens[:, t + 1 :])
    assert not torch.equal(cf.new_tokens[:, t + 1 :], factual.new_tokens[:, t + 1 :])  # it did change


def test_prompt_intervention_replays_the_noise(world):
    model, tok, batch = world
    factual = _factual(model, batch, 10, seed=2)
    changed = [p.replace("path", "name").replace("os", "sys").replace("x, y", "a, b") for p in PROMPTS]
    new = tok(changed, return_tensors="pt", padding=True, padding_side="left")
    cf = counterfactual_generate(model, factual, input_ids=new.input_ids, attention_mask=new.attention_mask)
    assert torch.equal(_scm_tokens(model, _rows(tok, changed), cf, cf.new_tokens), cf.new_tokens)
    # Shared noise couples the two texts: they agree more often than independent samples would.
    independent = _factual(model, new, 10, seed=1000)
    same_cf = (cf.new_tokens == factual.new_tokens).float().mean()
    same_independent = (independent.new_tokens == factual.new_tokens).float().mean()
    assert same_cf > same_independent


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of counts against probs, tail (expected < 5) merged into one bin."""
    n = counts.sum()
    expected = probs.double() / probs.double().sum() * n
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)]).double()
    expected = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = expected > 0
    return float(chisquare(observed[keep].numpy(), expected[keep].numpy()).pvalue)


def test_sampled_tokens_follow_the_warped_softmax_chi_square(world):
    """4000 rows of one prompt, one seed each: the first tokens follow the warped law (p > 1e-3)."""
    model, tok, _ = world
    ids = tok("def read(path):\n    with open(", return_tensors="pt").input_ids
    n = 4000
    out = gumbel_generate(model, ids.expand(n, -1), max_new_tokens=1, seed=0, eos_token_id=[], **WARP)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
    probs = warped_probs(logits, **WARP)
    counts = torch.bincount(out.new_tokens[:, 0], minlength=probs.numel())
    assert _chi_square(counts, probs) > 1e-3
    assert counts[probs == 0].sum() == 0  # never a token the warping removed


def test_noise_across_positions_is_iid_gumbel_chi_square():
    """One seed, 5000 positions, a fixed distribution: the choices follow it (p > 1e-3)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=torch.float64)
    seeds = torch.tensor([123])
    tokens = torch.stack(
        [
            gumbel_max_choice(logits.view(1, -1), gumbel_noise(seeds, i, 6, dtype=torch.float64))
            for i in range(5000)
        ]
    ).view(-1)
    assert _chi_square(torch.bincount(tokens, minlength=6), logits.softmax(-1)) > 1e-3
    # A pure function of (seed, position): equal when recomputed, different across positions and seeds.
    assert torch.equal(gumbel_noise(seeds, 7, 6), gumbel_noise(seeds, 7, 6))
    assert not torch.equal(gumbel_noise(seeds, 7, 6), gumbel_noise(seeds, 8, 6))
    assert not torch.equal(gumbel_noise(seeds, 7, 6), gumbel_noise(seeds + 1, 7, 6))


def _by_rank(warping, logits, noise):
    """Gumbel-Max with rank-attached noise: the j-th most likely token gets ``noise[j]``."""
    order = logits.argsort(dim=-1, descending=True)
    return int(order[0, (warping.logits(logits).gather(-1, order) + noise).argmax()])


def test_counterfactual_stability_needs_noise_attached_to_token_ids():
    """If an intervention raises the factual token's logit at least as much as any other's, the
    Gumbel-Max SCM keeps the token (counterfactual stability). Noise indexed by vocabulary id has
    this property; noise indexed by rank in the sorted distribution does not."""
    gen = torch.Generator().manual_seed(0)
    V, trials, rank_violations = 12, 400, 0
    warping = Warping(True, 0.7)  # no truncation: a token outside top-k/top-p could enter with its noise
    for i in range(trials):
        logits = torch.randn(1, V, generator=gen, dtype=torch.float64) * 2
        noise = gumbel_noise(torch.tensor([i]), 0, V, dtype=torch.float64)
        y = int(gumbel_max_choice(warping.logits(logits), noise))
        shift = torch.rand(1, V, generator=gen, dtype=torch.float64) * 3
        shift[0, y] = shift.max() + 0.1  # the factual token gains the most
        counterfactual = logits + shift
        assert int(gumbel_max_choice(warping.logits(counterfactual), noise)) == y

        rank_violations += _by_rank(warping, counterfactual, noise) != _by_rank(warping, logits, noise)
    assert rank_violations > 0


def test_bad_arguments(world):
    model, _, batch = world
    factual = gumbel_generate(model, batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=3)
    with pytest.raises(ValueError, match="go together"):
        counterfactual_generate(model, factual, position=1)
    with pytest.raises(ValueError, match="position"):
        counterfactual_generate(model, factual, position=factual.new_tokens.shape[1], token=5)
    with pytest.raises(ValueError, match="token"):
        counterfactual_generate(
            model, factual, position=0, token=torch.tensor([1, model.config.vocab_size, 2])
        )
    with pytest.raises(ValueError, match="rows"):
        counterfactual_generate(model, factual, input_ids=batch.input_ids[:2])
    with pytest.raises(TypeError, match="GumbelSample"):
        counterfactual_generate(model, factual.sequences)
    with pytest.raises(ValueError, match="seed"):
        gumbel_generate(model, batch.input_ids, max_new_tokens=2, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        gumbel_generate(model, batch.input_ids, max_new_tokens=2, seed=[1, 2])
    with pytest.raises(ArgumentTypeError, match="temperature"):
        gumbel_generate(model, batch.input_ids, max_new_tokens=2, temperature="warm")
    with pytest.raises(ValueError, match="temperature"):
        gumbel_generate(model, batch.input_ids, max_new_tokens=2, temperature=0.0)
