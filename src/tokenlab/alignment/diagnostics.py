"""Diagnostics of preference data: the CHES score of *Unintentional Unalignment: Likelihood Displacement in
Direct Preference Optimization* (Razin et al., Definition 2), ranking a preference dataset by it, and the
paper's filtering rule.

For a prompt ``x`` with preferred completion ``y⁺`` and dispreferred ``y⁻``, let ``h_{x,y<k}`` ``[H]`` be the
model's last-layer hidden state at the position that predicts token ``y_k`` (the position before it), and
``S⁺ = Σ_{k=1}^{|y⁺|} h_{x,y⁺<k}``, ``S⁻ = Σ_{k=1}^{|y⁻|} h_{x,y⁻<k}``::

    CHES(x, y⁺, y⁻)    = ⟨S⁺, S⁻⟩ − ‖S⁺‖²
    LN-CHES(x, y⁺, y⁻) = ⟨S⁺/|y⁺|, S⁻/|y⁻|⟩ − ‖S⁺/|y⁺|‖²          (length-normalised)

A high score means the two completions look alike to the model; DPO on such pairs tends to *lower* the
likelihood of the preferred completion (likelihood displacement). The paper's remedy (Section 6) filters the
dataset by length-normalised CHES, keeping the samples with the lowest scores (5% there):
:func:`ches_filter`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from tokenlab._checks import check_bool, check_finite, check_int, check_probability, check_shape, check_tensor
from tokenlab.alignment.hf import last_hidden_states


def _summed_states(side: str, hidden: Tensor, mask: Tensor, length_normalize: bool) -> Tensor:
    """``S = Σ_t mask_t h_t`` ``[B, H]`` of the arguments ``{side}_hidden`` and ``{side}_mask``."""
    name, mask_name = f"{side}_hidden", f"{side}_mask"
    check_tensor(name, hidden, ndim=3, floating=True)
    check_finite(name, hidden)
    check_tensor(mask_name, mask, ndim=2)
    check_shape(mask_name, mask, tuple(hidden.shape[:2]), of=f"the leading shape of `{name}`")
    hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))  # half precision overflows
    m = mask.to(hidden.dtype)
    if ((m != 0) & (m != 1)).any():
        raise ValueError(f"`{mask_name}` must hold only 0 and 1")
    counts = m.sum(-1)
    if (counts == 0).any():
        raise ValueError(f"`{mask_name}` selects no position in some row; every completion needs a token")
    total = torch.einsum("bt,bth->bh", m, hidden)
    return total / counts.unsqueeze(-1) if length_normalize else total


def ches_scores(
    chosen_hidden: Tensor,
    chosen_mask: Tensor,
    rejected_hidden: Tensor,
    rejected_mask: Tensor,
    *,
    length_normalize: bool = False,
) -> Tensor:
    """CHES (or, with ``length_normalize``, LN-CHES) of each preference pair from hidden states.

    Args:
        chosen_hidden: last-layer hidden states ``[B, T⁺, H]`` of prompt + preferred completion.
        chosen_mask: ``[B, T⁺]``, 1 at the positions that predict a preferred-completion token (the position
            *before* each completion token), 0 elsewhere (prompt, padding, the last token's own position).
        rejected_hidden, rejected_mask: the same for the dispreferred completion ``[B, T⁻, H]``.
        length_normalize: average instead of sum the hidden states over each completion.

    Returns:
        ``[B]``: ``⟨S⁺, S⁻⟩ − ‖S⁺‖²`` with ``S = Σ_t mask_t h_t`` (divided by the completion length when
        ``length_normalize``), in float32 (float64 for float64 states): half-precision states are summed and
        multiplied in float32 (in float16 ``‖S‖²`` overflows; the score is a difference of large terms).
    """
    check_bool("length_normalize", length_normalize)
    plus = _summed_states("chosen", chosen_hidden, chosen_mask, length_normalize)
    minus = _summed_states("rejected", rejected_hidden, rejected_mask, length_normalize)
    if plus.shape != minus.shape:
        raise ValueError(
            f"`chosen_hidden` and `rejected_hidden` must hold the same number of pairs and hidden size, got "
            f"{tuple(chosen_hidden.shape)} and {tuple(rejected_hidden.shape)}"
        )
    return (plus * minus).sum(-1) - (plus * plus).sum(-1)


def _pad(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, device=device)
        attention[i, : len(r)] = 1
    return ids, attention


@torch.no_grad()
def preference_ches(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    length_normalize: bool = True,
    batch_size: int = 8,
) -> Tensor:
    """CHES scores of a preference dataset under a Hugging Face causal LM, one per (prompt, chosen, rejected).

    Each completion is tokenized on its own (no special tokens) after the tokenized prompt, as
    ``prompt_ids + completion_ids``; the model runs each pair's two sequences in one right-padded batch
    (``batch_size`` pairs at a time) and :func:`ches_scores` takes the last hidden states at the positions
    predicting the completion tokens (only hidden states are read: models that post-process their logits are
    fine here). Length-normalised by default, the variant the paper filters by.

    Returns:
        ``[N]`` scores (float32; float64 for a float64 model) on the model's device. Rank with
        ``scores.argsort(descending=True)`` (most similar pairs — the likeliest to displace the preferred
        completion's likelihood — first) and filter with :func:`ches_filter`.
    """
    check_bool("length_normalize", length_normalize)
    check_int("batch_size", batch_size, low=1)
    if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
        raise ValueError("`prompts`, `chosen` and `rejected` must be non-empty sequences of equal length")

    def encode(texts: Sequence[str], name: str) -> list[list[int]]:
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        if any(len(i) == 0 for i in ids):
            raise ValueError(f"every text in `{name}` must tokenize to at least one token")
        return ids

    prompt_ids = encode(prompts, "prompts")
    sides = [encode(chosen, "chosen"), encode(rejected, "rejected")]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = []
    for start in range(0, len(prompt_ids), batch_size):
        rows, masks = [], []
        for side in sides:
            for p, c in zip(prompt_ids[start : start + batch_size], side[start : start + batch_size]):
                rows.append(p + c)
                masks.append([0] * len(p) + [1] * len(c))
        ids, attention = _pad(rows, pad_id, device)
        completion_mask, _ = _pad(masks, 0, device)
        # position t predicts token t + 1: it counts when that token is a completion token
        hidden = last_hidden_states(model, ids, attention)[:, :-1]
        mask, n = completion_mask[:, 1:], len(rows) // 2
        pair = (hidden[:n], mask[:n], hidden[n:], mask[n:])
        scores.append(ches_scores(*pair, length_normalize=length_normalize))
    return torch.cat(scores)


def ches_filter(scores: Tensor, keep_fraction: float = 0.05) -> Tensor:
    """The paper's filtering rule: keep the ``ceil(keep_fraction · N)`` samples with the *lowest* (length-
    normalised) CHES scores, dropping those likeliest to cause likelihood displacement.

    Args:
        scores: ``[N]`` CHES scores (e.g. from :func:`preference_ches`), finite.
        keep_fraction: in (0, 1]; the paper keeps 5% of its SORRY-Bench preference set (19 samples).

    Returns:
        int64 ``[k]`` indices of the kept samples, lowest score first (ties by index).
    """
    check_tensor("scores", scores, ndim=1, floating=True)
    check_finite("scores", scores)
    if scores.numel() == 0:
        raise ValueError("`scores` must hold at least one score")
    fraction = check_probability("keep_fraction", keep_fraction, zero=False)
    keep = max(1, math.ceil(fraction * scores.numel() - 1e-9))
    return torch.sort(scores, stable=True).indices[:keep]
