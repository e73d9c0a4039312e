"""Set-based prompting: order-independent prompts for decoder-only language models.

*Set-Based Prompting: Provably Solving the Language Model Order Dependency Problem* (McIlroy-Young
et al., 2024). A prompt ``prefix · {part_1, …, part_n} · suffix`` whose parts form a *set* is laid out
so that the model cannot tell their order:

* **attention mask** — a token of part ``j`` sees the prefix and the earlier tokens of part ``j``,
  never another part; prefix and suffix tokens are causal over everything before them;
* **positions** — every part starts at the position right after the prefix (``P``); the suffix
  continues from the end of the longest part, ``P + max_j |part_j|``.

With segment ids ``s`` (0 for prefix and suffix, ``j`` for part ``j``) the mask is::

    visible(q, k) = k ≤ q  and  (s_q = 0  or  s_k = 0  or  s_q = s_k)

Every suffix token (and every generated token) then attends to the same set of (token, position)
pairs whatever the order of the parts, and attention is a sum over keys, so its output — hence the
suffix logits and the continuation — is the same for every permutation (up to floating-point summation
order). Parts are tokenized one by one, so their tokens do not depend on their neighbours either.

:func:`set_based_inputs` builds ``input_ids``, the 4-D additive mask and ``position_ids`` that Hugging
Face models accept as they are (Llama, Qwen2, GPT-2's learned absolute positions via ``position_ids``),
plus ``segment_ids`` for kernels that take them (``flash_attention(..., segment_ids=)``).
:func:`set_based_generate` decodes with a KV cache; each new token sees every earlier token and takes
the next position, so the guarantee holds for the whole continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from tokenlab._checks import check_int
from tokenlab._hf import cache_kwargs
from tokenlab.kernels.warping import Warping

__all__ = ["SetBasedInputs", "segment_attention_mask", "set_based_generate", "set_based_inputs"]

# Attention implementations that never see a dense 4-D mask, so cannot keep parts apart.
_MASKLESS_ATTENTION = ("flash_attention_2", "flash_attention_3", "paged_attention")


@dataclass(frozen=True)
class SetBasedInputs:
    """Model inputs for one set-based prompt (batch of one).

    Attributes:
        input_ids: ``[1, L]`` prefix, part 1 … part n, suffix tokens.
        attention_mask: ``[1, 1, L, L]`` additive mask: 0 where visible, ``finfo(dtype).min`` where blocked.
        position_ids: ``[1, L]``; parts share their start position, the suffix follows the longest part.
        segment_ids: ``[1, L]``; 0 for prefix and suffix, ``j`` for the tokens of part ``j`` (1-based).
        suffix_start: index of the first suffix token in ``L``.
        next_position: the position id of the first token generated after the suffix.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    suffix_start: int
    next_position: int

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``position_ids``: ``model(**inputs.model_inputs())``."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean visibility ``[B, 1, L, L]`` (True = visible) from ``segment_ids [B, L]``.

    ``visible(q, k) = k ≤ q and (s_q = 0 or s_k = 0 or s_q = s_k)``: causal, and two tokens of
    different non-zero segments never see each other.
    """
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.ndim != 2:
        raise ValueError("`segment_ids` must be a [B, L] tensor")
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    s_q, s_k = segment_ids[:, :, None], segment_ids[:, None, :]
    return (causal & ((s_q == 0) | (s_k == 0) | (s_q == s_k)))[:, None]


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``visible``, the most negative finite value of ``dtype`` elsewhere (as Hugging Face)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
        ~visible, torch.finfo(dtype).min
    )


def _check_prompt(tokenizer: object, prefix: object, parts: object, suffix: object) -> None:
    """Type checks of :func:`set_based_inputs`' arguments, before any tokenization."""
    if not callable(tokenizer):
        raise TypeError(
            f"`tokenizer` must be a callable Hugging Face tokenizer, got {type(tokenizer).__name__}"
        )
    if isinstance(parts, str) or not isinstance(parts, Sequence):
        raise TypeError(f"`parts` must be a list or tuple of str, got {type(parts).__name__}")
    if len(parts) == 0:
        raise ValueError("`parts` must hold at least one string")
    named = [("prefix", prefix), *((f"parts[{j}]", p) for j, p in enumerate(parts)), ("suffix", suffix)]
    for name, text in named:
        if not isinstance(text, str):
            raise TypeError(f"`{name}` must be a str, got {type(text).__name__}")


def _encode(tokenizer: object, text: str, *, add_special_tokens: bool) -> list[int]:
    """Token ids of one text, checking that the tokenizer gives them."""
    encoded = tokenizer(text, add_special_tokens=add_special_tokens)
    try:
        ids = encoded["input_ids"]
    except (KeyError, TypeError, IndexError):
        raise TypeError(
            f"`tokenizer` must return a mapping with 'input_ids', got {type(encoded).__name__}"
        ) from None
    if not isinstance(ids, Sequence) or not all(isinstance(i, int) for i in ids):
        raise TypeError(f"`tokenizer` must return a flat list of int token ids for one text, got {ids!r:.80}")
    return list(ids)


def set_based_inputs(
    tokenizer: object,
    prefix: str,
    parts: Sequence[str],
    suffix: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> SetBasedInputs:
    """Lay out ``prefix · {parts} · suffix`` for set-based prompting (see the module docstring).

    The prefix is tokenized with the tokenizer's special tokens (e.g. BOS), each part and the suffix
    without. Every part and the suffix must produce at least one token: the suffix is what predicts the
    continuation (the last token of a part only sees its own part).

    Args:
        tokenizer: a Hugging Face tokenizer (``tokenizer(text, add_special_tokens=...)["input_ids"]``).
        prefix: text before the parts (may be empty).
        parts: the parallel texts, a list or tuple of non-empty ``str``.
        suffix: text after the parts (non-empty).
        dtype: dtype of the additive mask; use the model's.
        device: device of the returned tensors.
    """
    _check_prompt(tokenizer, prefix, parts, suffix)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"`dtype` must be a floating-point torch.dtype (the mask is additive), got {dtype}")
    prefix_ids = _encode(tokenizer, prefix, add_special_tokens=True)
    part_ids = [_encode(tokenizer, part, add_special_tokens=False) for part in parts]
    suffix_ids = _encode(tokenizer, suffix, add_special_tokens=False)
    for j, ids in enumerate(part_ids):
        if not ids:
            raise ValueError(f"`parts[{j}]` is empty (it gives no tokens)")
    if not suffix_ids:
        raise ValueError("`suffix` must give at least one token: it predicts the continuation")

    start = len(prefix_ids)
    longest = max(len(ids) for ids in part_ids)
    ids = prefix_ids + [t for p in part_ids for t in p] + suffix_ids
    positions = list(range(start))
    segments = [0] * start
    for j, p in enumerate(part_ids, start=1):
        positions += range(start, start + len(p))
        segments += [j] * len(p)
    positions += range(start + longest, start + longest + len(suffix_ids))
    segments += [0] * len(suffix_ids)

    def row(values: list[int]) -> torch.Tensor:
        return torch.tensor([values], dtype=torch.long, device=device)

    segment_ids = row(segments)
    return SetBasedInputs(
        input_ids=row(ids),
        attention_mask=additive_mask(segment_attention_mask(segment_ids), dtype),
        position_ids=row(positions),
        segment_ids=segment_ids,
        suffix_start=len(ids) - len(suffix_ids),
        next_position=start + longest + len(suffix_ids),
    )


def _next_token(logits: torch.Tensor, warping: Warping, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax, or a sample from ``softmax(logits / temperature)`` restricted to the top ``k``
    (the warping of :class:`tokenlab.kernels.warping.Warping`)."""
    if not warping.do_sample:
        return logits.argmax(dim=-1)
    probs = warping.probs(logits.float())
    return torch.multinomial(probs, 1, generator=generator)[..., 0]


@torch.no_grad()
def set_based_generate(
    model: nn.Module,
    tokenizer: object,
    prefix: str,
    parts: Sequence[str],
    suffix: str,
    max_new_tokens: int = 32,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Continue a set-based prompt with a KV cache; returns the new token ids ``[1, N ≤ max_new_tokens]``.

    The prompt is encoded by :func:`set_based_inputs` and run once; each generated token is then fed
    with the next position id and a mask row that sees every cached token, so the continuation is the
    same for every order of ``parts`` (greedy exactly; sampling given the same ``generator`` state).

    Args:
        model: a Hugging Face causal LM that accepts a 4-D ``attention_mask`` and ``position_ids``
            (Llama, Qwen2, GPT-2 … with eager or SDPA attention).
        tokenizer, prefix, parts, suffix: as for :func:`set_based_inputs`.
        max_new_tokens: the most tokens to generate.
        do_sample: sample instead of greedy decoding.
        temperature, top_k: the sampling distribution ``softmax(logits / temperature)`` over the top ``k``.
        generator: random generator for sampling (on the model's device).
        eos_token_id: stop after this token (default: ``tokenizer.eos_token_id``, if any).
        progress: show a tqdm bar over the generated tokens.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"`model` must be a Hugging Face causal LM (nn.Module with .config), got {type(model).__name__}"
        )
    attn = getattr(model.config, "_attn_implementation", None)
    if attn in _MASKLESS_ATTENTION:
        raise ValueError(
            f"`model` uses attn_implementation={attn!r}, which ignores 4-D masks; use 'eager' or 'sdpa'"
        )
    check_int("max_new_tokens", max_new_tokens, low=1)
    warping = Warping(do_sample, temperature, top_k)
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)

    param = next(model.parameters())
    inputs = set_based_inputs(tokenizer, prefix, parts, suffix, dtype=param.dtype, device=param.device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and inputs.next_position + max_new_tokens - 1 >= limit:
        raise ValueError(
            f"the prompt's positions end at {inputs.next_position - 1}; {max_new_tokens} new tokens "
            f"would pass the model's max_position_embeddings = {limit}"
        )

    cache = DynamicCache(config=model.config)  # filled in place by every call below
    logits = model(**inputs.model_inputs(), **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
    length, new_tokens = inputs.input_ids.shape[1], []
    for step in tqdm(range(max_new_tokens), desc="set-based generate", disable=not progress):
        token = _next_token(logits, warping, generator)
        new_tokens.append(token)
        if (eos_token_id is not None and int(token) == eos_token_id) or step == max_new_tokens - 1:
            break
        length += 1
        out = model(
            input_ids=token[:, None],
            attention_mask=torch.zeros(1, 1, 1, length, dtype=param.dtype, device=param.device),
            position_ids=torch.full((1, 1), inputs.next_position + step, device=param.device),
            **cache_kwargs(model, cache),
            use_cache=True,
        )
        logits = out.logits[:, -1]
    return torch.stack(new_tokens, dim=1)
