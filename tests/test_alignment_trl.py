"""Oracle: DPO, IPO, KTO and GRPO equal TRL's trainer code on the same per-token log-probs, and the chunked
mechanism equals TRL's own chunked LM-head kernel (adapters in tokenlab.testing.trl)."""

from __future__ import annotations

import pytest
import torch

from tokenlab.alignment import (
    LinearHead,
    TokenLogps,
    dpo_loss,
    group_advantages,
    grpo_loss,
    ipo_loss,
    kto_loss,
    token_stats,
)
from tokenlab.testing import assert_relative_error

pytest.importorskip("trl")
from trl.trainer.utils import nanstd

from tokenlab.testing.trl import (
    trl_chunked_logps,
    trl_dpo_loss,
    trl_grpo_loss,
    trl_kto_loss,
)

TOL = 1e-12


def _tokens(B: int, T: int, seed: int) -> TokenLogps:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.float64)
    for i in range(B):  # ragged completions
        mask[i, int(torch.randint(1, T + 1, (1,), generator=g)) :] = 0
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    return TokenLogps(logps * mask, mask, ref_logps=ref * mask)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_and_ipo_equal_trl(beta):
    chosen, rejected = _tokens(5, 7, 0), _tokens(5, 7, 1)
    for ours, loss_type in ((dpo_loss, "sigmoid"), (ipo_loss, "ipo")):
        got = ours(chosen, rejected, beta=beta).loss
        want = trl_dpo_loss(chosen, rejected, beta=beta, loss_type=loss_type)
        assert abs(got.item() - want.item()) <= TOL * max(1.0, abs(want.item())), (loss_type, got, want)


def test_kto_equals_trl():
    tokens = _tokens(6, 5, 2)
    desirable = torch.tensor([1, 0, 1, 1, 0, 0])
    g = torch.Generator().manual_seed(5)  # not the global stream: the test must not depend on test order
    kl_policy = -torch.rand(6, generator=g, dtype=torch.float64) * 2
    kl_ref = -torch.rand(6, generator=g, dtype=torch.float64) * 2 - 0.5  # a positive KL (TRL clamps ≥ 0)
    weights = dict(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    want, metrics = trl_kto_loss(tokens, desirable, kl_logps=kl_policy, ref_kl_logps=kl_ref, **weights)
    got = kto_loss(tokens, desirable, kl_logratios=kl_policy - kl_ref, **weights)
    assert abs(got.loss.item() - want.item()) <= TOL, (got.loss, want)
    assert metrics["kl"][0] > 0 and abs(got.metrics["kl"].item() - metrics["kl"][0]) <= TOL
    assert abs(got.metrics["rewards/chosen"].item() - metrics["rewards/chosen"][0]) <= 1e-9


@pytest.mark.parametrize(
    "normalization,loss_type", [("sequence", "grpo"), ("token", "bnpo"), ("dr_grpo", "dr_grpo")]
)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_equals_trl(normalization, loss_type, beta):
    tokens = _tokens(6, 9, 3)
    g = torch.Generator().manual_seed(4)
    old = tokens.logps + 0.3 * torch.randn(tokens.logps.shape, generator=g, dtype=torch.float64)
    advantages = group_advantages(torch.randn(6, generator=g, dtype=torch.float64), 3)
    policy = tokens.logps.clone().requires_grad_(True)
    ours = TokenLogps(policy, tokens.mask, ref_logps=tokens.ref_logps)
    clip = dict(epsilon_low=0.2, epsilon_high=0.28)
    want = trl_grpo_loss(
        ours, advantages, old_logps=old, beta=beta, loss_type=loss_type, max_completion_length=12, **clip
    )
    (want_grad,) = torch.autograd.grad(want, policy)
    got = grpo_loss(
        ours,
        advantages,
        old_logps=old,
        beta=beta,
        normalization=normalization,
        max_completion_length=12,
        **clip,
    ).loss
    (got_grad,) = torch.autograd.grad(got, policy)
    assert abs(got.item() - want.item()) <= TOL, (got, want)
    assert torch.allclose(got_grad, want_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_group_advantages_match_trl_formula(scale):
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(1).repeat_interleave(4)
    std = nanstd(grouped, dim=1).squeeze().repeat_interleave(4) if scale == "group" else nanstd(rewards)
    want = (rewards - mean) / (std + 1e-4)
    # TRL's nanstd computes Bessel's correction count/(count-1) in float32, hence the 1e-7 tolerance
    assert torch.allclose(group_advantages(rewards, 4, scale=scale), want, rtol=1e-7, atol=0)


def test_chunked_mechanism_equals_trl_kernel():
    g = torch.Generator().manual_seed(6)
    N, H, V = 45, 16, 77
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    upstream = torch.randn(N, generator=g, dtype=torch.float64)
    ours = token_stats(LinearHead(hidden, weight), labels, chunk_size=8).logps
    theirs = trl_chunked_logps(hidden, weight, None, labels)
    # TRL keeps its online-logsumexp statistics in float32 even for float64 inputs: float32-level agreement
    assert_relative_error(ours, theirs, 1e-6, "logps vs TRL kernel")
    for a, b in zip(torch.autograd.grad((ours * upstream).sum(), (hidden, weight)),
                    torch.autograd.grad((theirs * upstream).sum(), (hidden, weight))):  # fmt: skip
        assert_relative_error(a, b, 1e-6, "gradient vs TRL kernel")
