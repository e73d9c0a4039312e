"""Oracle: DPO, IPO, KTO and GRPO equal TRL's trainer code on the same per-token log-probs.

TRL (1.16) only exposes these losses inside ``Trainer._compute_loss`` methods. We call those methods
unbound with a minimal stub ``self`` (the attributes they read) and a stub model whose outputs carry the
per-token log-probs, then compare the returned loss with tokenlab's on the same numbers.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tokenlab.alignment import TokenLogps, dpo_loss, group_advantages, grpo_loss, ipo_loss, kto_loss

trl_trainer = pytest.importorskip("trl.trainer")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

TOL = 1e-12


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def _stub(**attrs) -> SimpleNamespace:
    base = dict(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    return SimpleNamespace(**{**base, **attrs})


def _outputs(per_token: torch.Tensor) -> SimpleNamespace:
    zeros = torch.zeros_like(per_token)
    return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _tokens(B: int, T: int, seed: int) -> TokenLogps:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.float64)
    for i in range(B):  # ragged completions
        mask[i, int(torch.randint(1, T + 1, (1,), generator=g)) :] = 0
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    return TokenLogps(logps * mask, mask, ref_logps=ref * mask)


def _trl_dpo(loss_type: str, beta: float, chosen: TokenLogps, rejected: TokenLogps) -> torch.Tensor:
    B, T = chosen.logps.shape
    per_token = torch.cat([chosen.logps * chosen.mask, rejected.logps * rejected.mask])
    completion_mask = torch.cat(
        [torch.zeros(2 * B, 1, dtype=torch.float64), torch.cat([chosen.mask, rejected.mask])], 1
    )
    stub = _stub(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
    )
    inputs = {
        "input_ids": torch.zeros(2 * B, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": (chosen.ref_logps * chosen.mask).sum(-1),
        "ref_rejected_logps": (rejected.ref_logps * rejected.mask).sum(-1),
    }
    outputs = _outputs(per_token)
    return DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_and_ipo_equal_trl(beta):
    chosen, rejected = _tokens(5, 7, 0), _tokens(5, 7, 1)
    for ours, loss_type in ((dpo_loss, "sigmoid"), (ipo_loss, "ipo")):
        got = ours(chosen, rejected, beta=beta).loss
        want = _trl_dpo(loss_type, beta, chosen, rejected)
        assert abs(got.item() - want.item()) <= TOL * max(1.0, abs(want.item())), (loss_type, got, want)


def test_kto_equals_trl():
    tokens = _tokens(6, 5, 2)
    desirable = torch.tensor([1, 0, 1, 1, 0, 0])
    kl_policy = -torch.rand(6, dtype=torch.float64) * 2
    kl_ref = -torch.rand(6, dtype=torch.float64) * 2 - 0.5
    B, T = tokens.logps.shape
    stub = _stub(
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=0.2,
        desirable_weight=1.3,
        undesirable_weight=0.7,
        _compute_kl_logps=lambda model, batch: kl_policy,
    )
    batch = {
        "input_ids": torch.zeros(B, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(B, T + 1, dtype=torch.long),
        "completion_mask": torch.cat([torch.zeros(B, 1, dtype=torch.float64), tokens.mask], 1),
        "label": desirable,
        "ref_logps": (tokens.ref_logps * tokens.mask).sum(-1),
        "ref_KL_logps": kl_ref,
    }
    outputs = _outputs(tokens.logps * tokens.mask)
    want = KTOTrainer._compute_loss(stub, lambda **kw: outputs, batch, return_outputs=False)
    got = kto_loss(
        tokens,
        desirable,
        kl_logratios=kl_policy - kl_ref,
        beta=0.2,
        desirable_weight=1.3,
        undesirable_weight=0.7,
    ).loss
    assert abs(got.item() - want.item()) <= TOL, (got, want)
    assert stub._metrics["train"]["kl"][0] > 0  # the reference point was active, not clamped away


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
    stub = _stub(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        use_vllm=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=12,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        _get_per_token_logps_and_entropies=lambda *a, **k: (policy, torch.zeros_like(policy), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(6, 2, dtype=torch.long),
        "prompt_mask": torch.ones(6, 2, dtype=torch.long),
        "completion_ids": torch.zeros(6, 9, dtype=torch.long),
        "completion_mask": tokens.mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": tokens.ref_logps,
    }
    want = GRPOTrainer._compute_loss(stub, None, inputs)
    (want_grad,) = torch.autograd.grad(want, policy)
    ours = TokenLogps(policy, tokens.mask, ref_logps=tokens.ref_logps)
    got = grpo_loss(
        ours,
        advantages,
        old_logps=old,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.28,
        normalization=normalization,
        max_completion_length=12,
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
