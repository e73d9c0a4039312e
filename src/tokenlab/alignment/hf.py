"""Hugging Face glue: run causal LMs on (prompt + completion) batches and return what the losses take —
:class:`~tokenlab.alignment.fused_linear.Completions` for
:func:`~tokenlab.alignment.fused_linear.chunked_loss`, or per-token
:class:`~tokenlab.alignment.common.TokenLogps` through :func:`~tokenlab.alignment.fused_linear.token_stats`
— and T-REG's self-generated token rewards by contrastive prompting.

Models run through their own ``forward`` (``output_hidden_states=True, logits_to_keep=1``: one position's
logits), so wrappers that act in ``forward`` — DDP's gradient synchronisation, FSDP2's parameter gathering,
PEFT adapters — see an ordinary call. The LM head is then read from the model: its ``weight`` and ``bias``,
or, for a LoRA adapter on the head, the effective weight ``W + Σ s·B A``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from tokenlab._checks import check_int, check_shape, check_tensor
from tokenlab.alignment.common import TokenLogps
from tokenlab.alignment.fused_linear import IGNORE_INDEX, Completions, HeadBackend, LinearHead, token_stats


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (FSDP2 and PEFT keep the model's methods)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def lm_head_parameters(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The LM head's weight ``[V, H]`` and bias ``[V]`` (or None) of a causal LM, as the logits use them.

    An ``nn.Linear`` head gives its parameters. A LoRA adapter on the head (PEFT) gives the effective weight
    ``W + Σ_a s_a B_a A_a`` over the active adapters (the base weight when adapters are disabled or merged),
    so gradients reach ``A`` and ``B``; adapters with dropout in training mode, DoRA or a bias on ``B`` have
    no such weight and are refused."""
    head = _unwrapped(model).get_output_embeddings()
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    base = getattr(head, "base_layer", None)
    if not (isinstance(base, nn.Linear) and hasattr(head, "lora_A")):
        kind = type(head).__name__
        raise TypeError(f"`model` must have an nn.Linear LM head (or a LoRA adapter on one), got {kind}")
    weight = base.weight
    if head.disable_adapters or head.merged:
        return weight, base.bias
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        dropout = head.training and not isinstance(head.lora_dropout[name], nn.Identity)
        if dropout or head.use_dora.get(name) or head.lora_B[name].bias is not None:
            raise ValueError(
                f"the LoRA adapter {name!r} on the LM head has dropout (in training mode), DoRA or a bias: "
                "its logits are not those of one weight matrix; use lora_dropout=0, no DoRA and no lora_bias"
            )
        weight = weight + head.scaling[name] * (head.lora_B[name].weight @ head.lora_A[name].weight)
    return weight, base.bias


def causal_lm_head(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> LinearHead:
    """Run a Hugging Face causal LM and return its last hidden states ``[B, T, H]`` with its LM head.

    Position ``t`` predicts token ``t + 1``; use :func:`shift_for_next_token` to align labels. The model runs
    its own ``forward`` with ``output_hidden_states=True`` and ``logits_to_keep=1`` (works on DDP/FSDP2/PEFT
    wrapped models); the head is :func:`lm_head_parameters`. Models that post-process logits (final logit
    soft-capping, logit scaling) are refused, since the head alone would not reproduce their logits.
    """
    config = getattr(_unwrapped(model), "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1.0):
            value = getattr(config, attr)
            raise ValueError(f"`model` post-processes its logits ({attr}={value}); unsupported")
    return LinearHead(last_hidden_states(model, input_ids, attention_mask), *lm_head_parameters(model))


def last_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The last layer's hidden states ``[B, T, H]`` of a Hugging Face causal LM, from the model's own
    ``forward`` (``output_hidden_states=True``, ``logits_to_keep=1``: no ``[B, T, V]`` logits, no cache)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    return out.hidden_states[-1]


def shift_for_next_token(
    head: LinearHead, input_ids: Tensor, completion_mask: Tensor
) -> tuple[LinearHead, Tensor]:
    """Align a :func:`causal_lm_head` output with next-token labels: hidden ``[B, T−1, H]``, labels
    ``[B, T−1]`` = ``input_ids[:, 1:]`` with ``-100`` where ``completion_mask[:, 1:]`` is 0."""
    labels = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, IGNORE_INDEX)
    return LinearHead(head.hidden[:, :-1], head.weight, head.bias), labels


def completions(
    model: nn.Module,
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    attention_mask: Tensor | None = None,
    reference_model: nn.Module | None = None,
    teacher_models: Sequence[nn.Module] = (),
    last: int | None = None,
) -> Completions:
    """The :class:`~tokenlab.alignment.fused_linear.Completions` of ``input_ids [B, T]`` under ``model`` (with
    gradient) and ``reference_model`` (without), for :func:`~tokenlab.alignment.fused_linear.chunked_loss`.

    Position ``t`` scores ``input_ids[:, t+1]``; ``completion_mask [B, T]`` marks completion tokens. ``last``
    keeps only the last ``last`` scored positions (e.g. the completion part of prompt + completion, as
    trainers lay out their per-token tensors): hidden ``[B, last, H]`` scoring ``input_ids[:, -last:]``.
    ``teacher_models`` (without gradient) give the ``teachers`` heads, in order, for losses that distil from a
    composed teacher (AlignDistil: the DPO model, then the reverse DPO model or the reference).
    For paired losses, score chosen and rejected in one call and split with
    :meth:`~tokenlab.alignment.fused_linear.Completions.select`.
    """
    check_tensor("input_ids", input_ids)
    check_tensor("completion_mask", completion_mask)
    check_shape("completion_mask", completion_mask, input_ids.shape, of="`input_ids`")
    if last is not None:
        check_int("last", last, low=1, high=input_ids.shape[-1] - 1)
    keep = slice(-last, None) if last is not None else slice(None)

    def scored(m: nn.Module) -> LinearHead:
        head = causal_lm_head(m, input_ids, attention_mask)
        return LinearHead(head.hidden[:, :-1][:, keep], head.weight, head.bias)

    with torch.no_grad():
        reference = None if reference_model is None else scored(reference_model)
        teachers = tuple(scored(m) for m in teacher_models)
    labels = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, IGNORE_INDEX)
    return Completions(scored(model), labels[:, keep], reference, teachers=teachers)


def completion_token_logps(
    model: nn.Module,
    input_ids: Tensor,
    completion_mask: Tensor,
    *,
    attention_mask: Tensor | None = None,
    reference_model: nn.Module | None = None,
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
    model: nn.Module,
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
