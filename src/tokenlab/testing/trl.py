"""TRL as an oracle: its losses on given per-token log-probs, and its chunked LM-head log-prob kernel.

TRL (≥ 1.16, an optional test/benchmark dependency) only exposes DPO, IPO, KTO and GRPO inside
``Trainer._compute_loss`` methods that run a model. These adapters call those methods unbound, with a
minimal stub ``self`` (only the attributes the methods read) and a stub model whose output carries the
given per-token log-probs, so tests and benchmarks compare tokenlab with TRL's own code on the same
numbers. Nothing of TRL's is copied here.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from torch import Tensor

from tokenlab.alignment.common import TokenLogps


class _Accelerator:
    """Single-process stand-in for ``accelerate.Accelerator``: gathers and reductions are identities."""

    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x: Tensor) -> Tensor:
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x: Tensor, reduction: str = "sum") -> Tensor:
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


def _outputs(per_token: Tensor) -> SimpleNamespace:
    zeros = torch.zeros_like(per_token.detach())
    return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _unshifted(mask: Tensor) -> Tensor:
    """TRL's completion masks cover ``input_ids`` (one position longer than the per-token log-probs)."""
    return torch.cat([torch.zeros_like(mask[:, :1]), mask], 1)


def trl_dpo_loss(
    chosen: TokenLogps,
    rejected: TokenLogps,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    f_divergence_type: str = "reverse_kl",
    label_smoothing: float = 0.0,
) -> Tensor:
    """``DPOTrainer._compute_loss`` (``loss_type`` "sigmoid" = DPO, "ipo" = IPO, "robust", …; any
    ``f_divergence_type``) on precomputed log-probs."""
    from trl.trainer.dpo_trainer import DPOTrainer

    B, T = chosen.logps.shape
    per_token = torch.cat([chosen.logps * chosen.mask, rejected.logps * rejected.mask])
    stub = _stub(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type=f_divergence_type,
        label_smoothing=label_smoothing,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
    )
    ids = torch.zeros(2 * B, T + 1, dtype=torch.long, device=per_token.device)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": _unshifted(torch.cat([chosen.mask, rejected.mask])),
        "ref_chosen_logps": (chosen.ref_logps * chosen.mask).sum(-1),
        "ref_rejected_logps": (rejected.ref_logps * rejected.mask).sum(-1),
    }
    outputs = _outputs(per_token)
    return DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, return_outputs=False)


def trl_kto_loss(
    tokens: TokenLogps,
    desirable: Tensor,
    *,
    kl_logps: Tensor,
    ref_kl_logps: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict]:
    """``KTOTrainer._compute_loss`` on precomputed log-probs; returns the loss and TRL's logged metrics."""
    from trl.trainer.kto_trainer import KTOTrainer

    B, T = tokens.logps.shape
    stub = _stub(
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        _compute_kl_logps=lambda model, batch: kl_logps,
    )
    ids = torch.zeros(B, T + 1, dtype=torch.long, device=tokens.logps.device)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": _unshifted(tokens.mask),
        "label": desirable,
        "ref_logps": (tokens.ref_logps * tokens.mask).sum(-1),
        "ref_KL_logps": ref_kl_logps,
    }
    outputs = _outputs(tokens.logps * tokens.mask)
    loss = KTOTrainer._compute_loss(stub, lambda **kw: outputs, batch, return_outputs=False)
    return loss, stub._metrics["train"]


def trl_grpo_loss(
    tokens: TokenLogps,
    advantages: Tensor,
    *,
    old_logps: Tensor,
    beta: float,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> Tensor:
    """``GRPOTrainer._compute_loss`` (``loss_type`` "grpo", "bnpo" or "dr_grpo"; an entropy bonus
    ``entropy_coef`` on the per-token ``entropy``) on precomputed log-probs."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, T = tokens.logps.shape
    policy = tokens.logps
    entropies = torch.zeros_like(policy.detach()) if entropy is None else entropy
    stub = _stub(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        use_vllm=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length or T,
        _entropy_bonus_enabled=entropy_coef != 0.0,
        entropy_coef=entropy_coef,
        use_adaptive_entropy=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        _get_per_token_logps_and_entropies=lambda *a, **k: (policy, entropies, None),
    )
    device = policy.device
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long, device=device),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long, device=device),
        "completion_ids": torch.zeros(B, T, dtype=torch.long, device=device),
        "completion_mask": tokens.mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
        "ref_per_token_logps": tokens.ref_logps if beta else None,
    }
    return GRPOTrainer._compute_loss(stub, None, inputs)


def trl_chunked_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
    """Per-token log-probs ``[N]`` from TRL's own chunked LM-head kernel (``trl.kernels``); ``labels`` [N]
    with ``-100`` for ignored tokens (their value is 0)."""
    from trl.kernels import ChunkedLogProbFunction

    valid = labels != -100
    logps = ChunkedLogProbFunction.apply(
        hidden, weight, bias, labels.clamp(min=0), 1.0, 32768, None, 1.0, ()
    )[0]
    return logps * valid
