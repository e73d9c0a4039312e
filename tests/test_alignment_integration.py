"""Integration on the toy world: a plain training loop with a tokenlab loss lowers the loss and raises the
held-out chosen-vs-rejected margin (real stdlib continuation vs the same tokens shuffled); T-REG's
contrastive-prompting token rewards obey their invariants; the tour section runs."""

from __future__ import annotations

import pytest
import torch

from tokenlab.alignment import contrastive_token_rewards
from tokenlab.tour.alignment import tour_section
from tokenlab.tour.preference import preference_margin, shuffled_continuation_pairs, train_preference


def test_dpo_on_toy_target_raises_heldout_margin(tiny_world):
    torch.manual_seed(0)
    train = shuffled_continuation_pairs(tiny_world.train_ids, 32, prompt_len=16, completion_len=12, seed=0)
    heldout = shuffled_continuation_pairs(
        tiny_world.heldout_ids, 16, prompt_len=16, completion_len=12, seed=1
    )
    target = tiny_world.target
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in target.named_parameters()}
    assert preference_margin(target, target, heldout) == 0.0  # policy == reference
    policy, losses = train_preference(target, train, steps=4, batch_size=8, learning_rate=2e-3)
    after = preference_margin(policy, target, heldout)
    print(f"DPO losses {[round(x, 3) for x in losses]}, held-out margin 0 -> {after:.3f}")
    assert losses[0] == torch.nn.functional.softplus(torch.tensor(0.0)).item()  # log 2 at step 0
    assert sum(losses[-2:]) / 2 < losses[0] - 0.05
    assert after > 0.5
    for name, p in target.named_parameters():  # the reference (the caller's model) is left untouched
        assert torch.equal(p, before[name][0]) and p.requires_grad == before[name][1]


def test_contrastive_token_rewards_invariants(tiny_world):
    model, tok = tiny_world.target, tiny_world.tokenizer
    prompts, completions = ["def add(a, b):\n"], ["    return a + b\n"]
    ids, mask, same = contrastive_token_rewards(
        model, tok, prompts, completions, better_instruction="# good\n", worse_instruction="# good\n"
    )
    assert ids.shape == mask.shape == same.shape and mask.sum() == len(tok(completions[0]).input_ids)
    assert (same == 0).all()  # identical contexts: no preference for any token
    _, _, r = contrastive_token_rewards(
        model, tok, prompts, completions, better_instruction="# correct\n", worse_instruction="# buggy\n"
    )
    _, _, r_swapped = contrastive_token_rewards(
        model, tok, prompts, completions, better_instruction="# buggy\n", worse_instruction="# correct\n"
    )
    assert torch.allclose(r, -r_swapped, atol=1e-6) and (r.abs() < 1).all() and (r != 0).any()
    completion = tok(completions[0], add_special_tokens=False).input_ids
    assert ids[0].tolist() == completion

    def logps(instruction: str) -> torch.Tensor:  # the oracle: the model's own logits, position by position
        context = tok(instruction + prompts[0], add_special_tokens=False).input_ids
        with torch.no_grad():
            log_p = torch.log_softmax(model(torch.tensor([context + completion])).logits[0].double(), -1)
        return torch.stack([log_p[len(context) - 1 + k, y] for k, y in enumerate(completion)])

    want = 2 * torch.sigmoid(logps("# correct\n") - logps("# buggy\n")) - 1
    torch.testing.assert_close(r[0].double(), want, rtol=1e-4, atol=1e-5)


def test_contrastive_token_rewards_rejects_empty_context(tiny_world):
    """With an empty instruction + prompt the first completion token has no preceding token to be scored
    from; the rewards used to be silently misaligned (slice from position -1)."""
    with pytest.raises(ValueError, match="must tokenize to at least one token"):
        contrastive_token_rewards(
            tiny_world.target, tiny_world.tokenizer, [""], ["    return a + b\n"],
            better_instruction="", worse_instruction="# good\n",
        )  # fmt: skip


def test_tour_section_runs(tiny_world):
    lines = tour_section(tiny_world)
    assert any("naive" in line and "chunked" in line for line in lines)
    assert any("margin" in line for line in lines)
