"""A complete, small preference-training example on the toy world (used by the docs, the integration
test and the tour): pairs of Python-stdlib text where the chosen completion is the real continuation
of a prompt and the rejected one is the same tokens shuffled; a plain PyTorch loop trains a copy of the
toy target with a tokenlab loss against the frozen original, and the held-out DPO margin is measured.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tokenlab.alignment.common import LossOutput, TokenLogps
from tokenlab.alignment.hf import completion_token_logps
from tokenlab.alignment.preference import dpo_loss


@dataclass
class PreferencePairs:
    """``chosen_ids`` / ``rejected_ids`` ``[B, P + C]`` sharing a prompt of ``P`` tokens; ``completion_mask``
    ``[B, P + C]`` marks the ``C`` completion tokens."""

    chosen_ids: Tensor
    rejected_ids: Tensor
    completion_mask: Tensor

    def __len__(self) -> int:
        return self.chosen_ids.shape[0]

    def batch(self, index: Tensor) -> PreferencePairs:
        return PreferencePairs(self.chosen_ids[index], self.rejected_ids[index], self.completion_mask[index])


def shuffled_continuation_pairs(
    token_ids: Tensor, n_pairs: int, *, prompt_len: int = 24, completion_len: int = 16, seed: int = 0
) -> PreferencePairs:
    """``n_pairs`` windows of a 1-D token stream: chosen = real continuation, rejected = its tokens permuted
    (same bag of tokens, so only order — what a language model knows — separates them)."""
    width = prompt_len + completion_len
    if token_ids.ndim != 1 or token_ids.numel() < width * n_pairs:
        raise ValueError(f"`token_ids` must be 1-D with at least {width * n_pairs} tokens")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(token_ids.numel() // width, generator=g)[:n_pairs] * width
    chosen = torch.stack([token_ids[s : s + width] for s in starts.tolist()])
    rejected = chosen.clone()
    for row in rejected:
        row[prompt_len:] = row[prompt_len:][torch.randperm(completion_len, generator=g)]
    mask = torch.zeros_like(chosen)
    mask[:, prompt_len:] = 1
    return PreferencePairs(chosen, rejected, mask)


PairedLoss = Callable[[TokenLogps, TokenLogps], LossOutput]


def pair_token_logps(
    policy: torch.nn.Module, reference: torch.nn.Module, pairs: PreferencePairs, **kw
) -> tuple[TokenLogps, TokenLogps]:
    """Chosen and rejected :class:`TokenLogps` of ``pairs`` (policy with grad, reference without)."""
    device = next(policy.parameters()).device
    chosen, rejected = (
        completion_token_logps(
            policy, ids.to(device), pairs.completion_mask.to(device), reference_model=reference, **kw
        )
        for ids in (pairs.chosen_ids, pairs.rejected_ids)
    )
    return chosen, rejected


@torch.no_grad()
def preference_margin(policy: torch.nn.Module, reference: torch.nn.Module, pairs: PreferencePairs) -> float:
    """Mean DPO reward margin ``(log π/π_ref)(y⁺) − (log π/π_ref)(y⁻)`` (β = 1) over ``pairs``."""
    return dpo_loss(*pair_token_logps(policy, reference, pairs), beta=1.0).metrics["rewards/margins"].item()


def train_preference(
    model: torch.nn.Module,
    pairs: PreferencePairs,
    *,
    loss_fn: PairedLoss = lambda c, r: dpo_loss(c, r, beta=0.1),
    steps: int = 8,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> tuple[torch.nn.Module, list[float]]:
    """Train a copy of ``model`` with ``loss_fn`` (frozen ``model`` as reference) for ``steps`` AdamW steps in
    a plain loop; return the trained copy and the loss of every step."""
    reference = model  # scored under no_grad by completion_token_logps; left untouched
    policy = copy.deepcopy(model).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=learning_rate, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="preference training", disable=not progress):
        index = torch.randperm(len(pairs), generator=g)[:batch_size]
        out = loss_fn(*pair_token_logps(policy, reference, pairs.batch(index)))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return policy.eval(), losses
