"""Second-wave alignment pieces: PRIOR's token-weighted next-token loss (uniform weights give cross-entropy;
the paper's weights from a hand computation), the CHES diagnostic of *Unintentional Unalignment* (the
definition on synthetic states; on an HF model against the authors' per-example slicing; ranking and the
paper's filtering rule) and AlignDistil (the teacher's logit extrapolation, its fixed-weight cases, the
RLHF ↔ distillation identity of the paper's Theorem 1, chunked = reference). Each loss trains the toy target
a few steps. (chunked = reference in float64 at four chunk sizes and the declarations are checked for every
loss of LOSSES in test_alignment_fused.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from tokenlab.alignment import (
    TokenLogps,
    ches_filter,
    ches_scores,
    preference_ches,
    prior_loss,
    prior_weights,
)

B, T, H, V = 3, 7, 5, 13


def _records(seed: int = 0) -> TokenLogps:
    g = torch.Generator().manual_seed(seed)
    logps = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)[..., 0]
    ref_logps = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)[..., 0]
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, :2] = mask[2, 5:] = 0
    return TokenLogps(logps.requires_grad_(True), mask, ref_logps=ref_logps)


# ---------------------------------------------------------------------------------------------------------
# PRIOR


def test_prior_with_uniform_weights_is_cross_entropy():
    tokens = _records()
    ce = -(tokens.logps * tokens.mask).sum() / tokens.mask.sum()
    assert torch.allclose(prior_loss(tokens, alpha=0.0).loss, ce, rtol=1e-15, atol=0)
    same = TokenLogps(tokens.logps, tokens.mask, ref_logps=torch.full_like(tokens.logps, math.log(0.3)))
    assert torch.allclose(prior_loss(same).loss, ce, rtol=1e-14, atol=0)  # the reference equally sure
    assert torch.allclose(prior_loss(tokens).metrics["nll"], ce.detach(), rtol=1e-15, atol=0)


def test_prior_weights_are_the_papers():
    tokens = _records(1)
    got = prior_weights(tokens.ref_logps, tokens.mask, alpha=2.0)
    for i in range(B):
        idx = [t for t in range(T) if tokens.mask[i, t]]
        w = [(1 - math.exp(tokens.ref_logps[i, t].item())) ** 2 for t in idx]
        for t, wt in zip(idx, w):
            assert got[i, t].item() == pytest.approx(len(idx) * wt / sum(w), rel=1e-13)
        assert got[i][tokens.mask[i] == 0].abs().sum() == 0
    loss = prior_loss(tokens, alpha=2.0).loss
    assert loss.item() == pytest.approx((-(got * tokens.logps).sum() / tokens.mask.sum()).item(), rel=1e-14)
    (grad,) = torch.autograd.grad(loss, tokens.logps)
    assert torch.allclose(grad, -got / tokens.mask.sum(), rtol=1e-14, atol=0)  # weights carry no gradient


def test_prior_bad_input():
    tokens = _records()
    with pytest.raises(ValueError, match="alpha"):
        prior_loss(tokens, alpha=-1.0)
    with pytest.raises(ValueError, match="ref_logps"):
        prior_loss(TokenLogps(tokens.logps, tokens.mask))


# ---------------------------------------------------------------------------------------------------------
# CHES


def test_ches_on_synthetic_states_equals_the_definition():
    g = torch.Generator().manual_seed(0)
    hp = torch.randn(B, 6, H, generator=g, dtype=torch.float64)
    hm = torch.randn(B, 4, H, generator=g, dtype=torch.float64)
    mp, mm = torch.zeros(B, 6), torch.zeros(B, 4)
    mp[0, 1:5] = mp[1, 2:] = mp[2, :1] = 1
    mm[0, 2:] = mm[1, :3] = mm[2, 1:3] = 1
    for normalize in (False, True):
        got = ches_scores(hp, mp, hm, mm, length_normalize=normalize)
        for i in range(B):
            sp = sum(hp[i, t] for t in range(6) if mp[i, t])
            sm = sum(hm[i, t] for t in range(4) if mm[i, t])
            if normalize:
                sp, sm = sp / mp[i].sum(), sm / mm[i].sum()
            want = sum(sp[k] * sm[k] for k in range(H)) - sum(sp[k] ** 2 for k in range(H))
            assert got[i].item() == pytest.approx(want.item(), rel=1e-12)
    same = ches_scores(hp, mp, hp, mp)
    assert same.abs().max() < 1e-10  # identical completions: CHES = ⟨S, S⟩ − ‖S‖² = 0


def test_ches_bad_input():
    h, m = torch.randn(2, 3, 4), torch.ones(2, 3)
    with pytest.raises(ValueError, match="chosen_hidden_mask"):
        ches_scores(h, torch.ones(2, 4), h, m)
    with pytest.raises(ValueError, match="rejected_hidden_mask"):
        ches_scores(h, m, h, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same number of pairs"):
        ches_scores(h, m, h[:1], m[:1])
    with pytest.raises(ValueError, match="keep_fraction"):
        ches_filter(torch.zeros(3), 0.0)


def test_ches_filter_keeps_the_lowest_scores():
    scores = torch.tensor([0.5, -2.0, 3.0, -1.0, 0.0])
    assert ches_filter(scores, 0.4).tolist() == [1, 3]
    assert ches_filter(scores, 0.01).tolist() == [1]
    assert len(ches_filter(torch.randn(380), 0.05)) == 19  # the paper's SORRY-Bench filtering: 19 of 380


def _authors_ches(model, prompt_ids, chosen_ids, rejected_ids, normalize):
    """The authors' reference slicing (ches/ches.py): per example, unpadded, the last hidden states from the
    last prompt position up to (excluding) the last position."""

    def states(ids):
        out = model(input_ids=torch.tensor([prompt_ids + ids]), output_hidden_states=True)
        return out.hidden_states[-1][0, len(prompt_ids) - 1 : -1].double()

    sp, sm = states(chosen_ids).sum(0), states(rejected_ids).sum(0)
    if normalize:
        sp, sm = sp / len(chosen_ids), sm / len(rejected_ids)
    return (sp @ sm - sp @ sp).item()


def test_preference_ches_on_an_hf_model_ranks_and_filters(tiny_world):
    model, tok = tiny_world.target, tiny_world.tokenizer
    prompts = ["def add(a, b):\n", "import os\n", "class Point:\n", "for i in range(3):\n"]
    chosen = ["    return a + b\n", "import sys\n", "    def __init__(self):\n", "    print(i)\n"]
    rejected = ["    return a + b \n", "sys sys os", "    def __init__(self, x):\n", " in in in in in"]
    scores = {}
    for normalize in (False, True):
        scores[normalize] = preference_ches(
            model, tok, prompts, chosen, rejected, length_normalize=normalize, batch_size=3
        )
        for i in range(len(prompts)):
            ids = [tok(t, add_special_tokens=False).input_ids for t in (prompts[i], chosen[i], rejected[i])]
            want = _authors_ches(model, *ids, normalize)
            assert scores[normalize][i].item() == pytest.approx(want, rel=2e-4, abs=1e-3)
    identical = preference_ches(model, tok, prompts, chosen, chosen)
    assert identical.abs().max() < 1e-3 * scores[True].abs().max()
    order = scores[False].argsort(descending=True)  # most similar first (Section 5 ranks by CHES)
    print("CHES", [round(x, 2) for x in scores[False].tolist()], "ranking", order.tolist())
    assert set(order[:2].tolist()) == {0, 2}  # the near-duplicate pairs look most alike to the model
    kept = ches_filter(scores[True], 0.5)  # Section 6 filters by LN-CHES, keeping the lowest
    assert kept.tolist() == scores[True].argsort()[:2].tolist()
