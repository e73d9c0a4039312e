"""Hugging Face glue: run causal LMs on (prompt + completion) batches and return the per-token record the
losses take, through the chunked mechanism of :mod:`tokenlab.alignment.fused_linear`; and T-REG's
self-generated token rewards by contrastive prompting."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tokenlab._checks import check_shape, check_tensor
from tokenlab.alignment.common import TokenLogps
from tokenlab.alignment.fused_linear import HeadBackend, causal_lm_head, shift_for_next_token, token_stats


def completion_token_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    attention_mask: Tensor | None = None,
    reference_model: torch.nn.Module | None = None,
    kl: bool = False,
    entropy: bool = False,
    chunk_size: int = 1024,
    backend: HeadBackend = "chunked",
) -> TokenLogps:
    """Per-token log-probs of the completion tokens of ``input_ids [B, T]`` under ``model`` (with grad) and
    ``reference_model`` (no grad), aligned to next-token prediction: every output is ``[B, T−1]`` and
    position ``t`` scores ``input_ids[:, t+1]``. ``completion_mask [B, T]`` marks completion tokens.

    ``kl=True`` adds ``KL(π_ref ‖ π_θ)`` per token (needs ``reference_model``); ``entropy=True`` adds the
    policy entropy. No ``[B, T, V]`` logits are built on ``backend="chunked"``.
    """
    check_tensor("input_ids", input_ids)
    check_tensor("completion_mask", completion_mask)
    check_shape("completion_mask", completion_mask, input_ids.shape, of="`input_ids`")
    if kl and reference_model is None:
        raise ValueError("`kl=True` needs a `reference_model`")
    head, labels = shift_for_next_token(
        causal_lm_head(model, input_ids, attention_mask), input_ids, completion_mask
    )
    ref_head = ref_logps = None
    if reference_model is not None:
        with torch.no_grad():
            ref_head, _ = shift_for_next_token(
                causal_lm_head(reference_model, input_ids, attention_mask), input_ids, completion_mask
            )
            ref_logps = token_stats(ref_head, labels, chunk_size=chunk_size, backend=backend).logps
    stats = token_stats(
        head, labels, reference=ref_head if kl else None, entropy=entropy, chunk_size=chunk_size,
        backend=backend,
    )  # fmt: skip
    mask = completion_mask[:, 1:].to(stats.logps.dtype)
    return TokenLogps(stats.logps, mask, ref_logps=ref_logps, kl=stats.kl, entropy=stats.entropy)


@torch.no_grad()
def contrastive_token_rewards(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    *,
    better_instruction: str,
    worse_instruction: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """T-REG's self-generated token rewards by contrastive prompting.

    Each completion is scored twice by ``model``: after ``better_instruction + prompt`` and after
    ``worse_instruction + prompt``; the token reward is ``r_t = 2σ(log p_better(y_t) − log p_worse(y_t)) − 1``
    ∈ (−1, 1), positive where the "better" context makes the token more likely.

    Returns:
        ``(completion_ids [B, L], completion_mask [B, L], rewards [B, L])`` — completions tokenized on
        their own and right-padded; rewards are 0 on padding.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError("`prompts` and `completions` must be non-empty lists of equal length")
    encoded = [tokenizer(c, add_special_tokens=False).input_ids for c in completions]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("every completion must tokenize to at least one token")
    contexts = {
        instruction: [tokenizer(instruction + p, add_special_tokens=False).input_ids for p in prompts]
        for instruction in (better_instruction, worse_instruction)
    }
    if any(len(ids) == 0 for ctx in contexts.values() for ids in ctx):
        # the first completion token is scored from the token before it: the context cannot be empty
        raise ValueError("every instruction + prompt in `prompts` must tokenize to at least one token")
    L = max(len(ids) for ids in encoded)
    device = next(model.parameters()).device
    completion_ids = torch.zeros(len(encoded), L, dtype=torch.long, device=device)
    completion_mask = torch.zeros(len(encoded), L, device=device)
    for i, ids in enumerate(encoded):
        completion_ids[i, : len(ids)] = torch.tensor(ids, device=device)
        completion_mask[i, : len(ids)] = 1

    def completion_logps(instruction: str) -> Tensor:
        rows = []
        for i, context in enumerate(contexts[instruction]):
            ids = torch.tensor([context + encoded[i]], device=device)
            mask = torch.zeros_like(ids)
            mask[:, len(context) :] = 1
            lp = completion_token_logps(model, ids, mask).logps[0, len(context) - 1 :]
            rows.append(torch.nn.functional.pad(lp, (0, L - lp.numel())))
        return torch.stack(rows)

    delta = completion_logps(better_instruction) - completion_logps(worse_instruction)
    rewards = (2 * torch.sigmoid(delta) - 1) * completion_mask
    return completion_ids, completion_mask, rewards
