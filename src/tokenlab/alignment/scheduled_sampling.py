"""Batch-scheduled sampling, from *Bridging the Training-Inference Gap in LLMs by Leveraging Self-Generated
Tokens*: train on contexts in which some ground-truth tokens are replaced by the model's own.

For a batch of ``input_ids [B, T]`` with HF-style ``labels [B, T]`` (``-100`` outside the part that is
learned), one teacher-forced forward pass of the current model, without gradient, gives at every position
``t`` its next-token distribution ``p(· | x_≤t)``; the model's token for position ``t + 1`` is drawn from it
(or is its argmax). Each eligible input position — a labelled position ``t ≥ 1`` (and, when an
``attention_mask`` is given, attended, as is position ``t − 1`` that predicts it) — independently keeps the
ground-truth token with probability ``1 − ρ`` or takes the model's token with probability ``ρ``; prompts and
padding keep theirs, and the labels stay the ground truth, so the model learns to continue correctly from
contexts holding its own tokens. This is the paper's offline interleaving: the model's tokens come from one
parallel pass over the ground-truth prefix, not from a token-by-token rollout. ``ρ = 0`` is teacher forcing
exactly; ``ρ = 1`` gives the model's token at every eligible position. The mixing ratio follows a schedule
over training steps, :func:`scheduled_sampling_ratio` (linear from 0 to ``final_ratio``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenlab._checks import (
    check_bool,
    check_generator,
    check_int,
    check_positive,
    check_probability,
    check_shape,
    check_tensor,
)
from tokenlab.alignment.fused_linear import IGNORE_INDEX


def scheduled_sampling_ratio(step: int, total_steps: int, *, final_ratio: float) -> float:
    """The mixing ratio at ``step`` of ``total_steps``: ``final_ratio · min(step / total_steps, 1)``,
    rising linearly from teacher forcing (0) to ``final_ratio`` ∈ [0, 1]."""
    step = check_int("step", step, low=0)
    total_steps = check_int("total_steps", total_steps, low=1)
    final_ratio = check_probability("final_ratio", final_ratio)
    return final_ratio * min(step / total_steps, 1.0)


@torch.no_grad()
def batch_scheduled_sampling(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    ratio: float,
    attention_mask: Tensor | None = None,
    do_sample: bool = True,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Replace a fraction ``ratio`` of a batch's labelled input tokens by the model's own (module docstring).

    Args:
        model: a Hugging Face causal LM (``model(input_ids, attention_mask=…).logits`` is ``[B, T, V]``);
            it runs once, without gradient, in its current mode.
        input_ids: ``[B, T]`` ground-truth tokens.
        labels: ``[B, T]`` as HF causal LMs take them (aligned with ``input_ids``; ``-100`` where nothing is
            learned): position ``t ≥ 1`` with a label is eligible for replacement.
        ratio: probability ``ρ`` ∈ [0, 1] that an eligible position takes the model's token
            (:func:`scheduled_sampling_ratio` gives the schedule's value).
        attention_mask: ``[B, T]``; unattended positions are never replaced, nor is a position right after
            one (with left padding, the first attended token: the model has no prediction for it).
        do_sample: draw the model's tokens from ``softmax(logits / temperature)`` (else its argmax).
        temperature: > 0, for sampling.
        generator: seeds the choice of positions and the sampled tokens (on the model's device type).

    Returns:
        ``(mixed_input_ids [B, T], replaced [B, T] bool)``; train with ``mixed_input_ids`` and the same
        ``labels``. ``ratio = 0`` returns ``input_ids`` unchanged without running the model.
    """
    check_tensor("input_ids", input_ids, ndim=2, integer=True)
    check_tensor("labels", labels, integer=True)
    check_shape("labels", labels, input_ids.shape, of="`input_ids`")
    if attention_mask is not None:
        check_shape("attention_mask", check_tensor("attention_mask", attention_mask), input_ids.shape,
                    of="`input_ids`")  # fmt: skip
    ratio = check_probability("ratio", ratio)
    check_bool("do_sample", do_sample)
    temperature = check_positive("temperature", temperature)
    check_generator("generator", generator, input_ids.device)

    eligible = labels != IGNORE_INDEX
    eligible[:, 0] = False
    if attention_mask is not None:  # the position and the one predicting it (not padding, left or right)
        attended = attention_mask.bool()
        eligible &= attended
        eligible[:, 1:] &= attended[:, :-1]
    if ratio == 0.0 or not eligible.any():
        return input_ids.clone(), torch.zeros_like(eligible)
    draws = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    replaced = eligible & (draws < ratio)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    if do_sample:
        probs = torch.softmax(logits / temperature, -1)
        flat = probs.reshape(-1, probs.shape[-1])
        own = torch.multinomial(flat, 1, generator=generator).view(logits.shape[:2])
    else:
        own = logits.argmax(-1)
    mixed = input_ids.clone()
    mixed[:, 1:] = torch.where(replaced[:, 1:], own, input_ids[:, 1:])
    return mixed, replaced
