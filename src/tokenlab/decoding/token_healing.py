"""Token healing: undo the tokenization artefact at the end of a prompt.

A prompt that ends inside what would be one token in running text (``"x = No"`` where training text
holds ``"None"`` as one token) is tokenized as ``[…, "No"]`` or ``[…, "N", "o"]``, and the model,
which rarely saw ``None`` split that way, continues badly. Token healing (introduced by the
``guidance`` library) backs the prompt up by its last token(s) and requires the generated text to
start with the removed text ``r``, so the model can choose the token that covers ``r`` — restoring
the canonical tokenization.

Here healing is constrained generation: the removed text becomes the constraint "every generated
prefix starts with ``r``" (a :class:`~tokenlab.decoding.constraints.PredicateConstraint`; it rejects
a first token that re-creates only part of ``r``, so the first token covers ``r``), and generation
runs through :func:`~tokenlab.decoding.constrained.constrained_generate` (AWRS or token
masking, with importance weights, so the healed continuation can also be resampled towards the
model's law conditioned on ``r``). The back-off length uses the byte-level BPE view
(:class:`~tokenlab.tokenization.byte_level.ByteLevelBPE`): the prompt is backed up by the most
tokens (at most ``max_backoff``) whose bytes are still the beginning of some vocabulary token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenlab._checks import check_int
from tokenlab.decoding.constrained import ConstrainedOutput, constrained_generate
from tokenlab.decoding.constraints import PredicateConstraint, TokenVocabulary
from tokenlab.decoding.incremental import check_causal_lm, model_device
from tokenlab.tokenization.byte_level import ByteLevelBPE


@dataclass
class HealedPrompt:
    """A prompt backed up for token healing.

    Attributes:
        input_ids: the prompt's token ids without the removed tokens.
        removed: the bytes of the removed tokens (``b""`` when nothing was removed).
        constraint: every generated prefix must start with ``removed`` (decoded as UTF-8): the first
            generated token covers the removed text (not just part of it), as in ``guidance``.
    """

    input_ids: list[int]
    removed: bytes
    constraint: PredicateConstraint


def _bpe(tokenizer: object) -> ByteLevelBPE:
    if isinstance(tokenizer, ByteLevelBPE):
        return tokenizer
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"`tokenizer` must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    return ByteLevelBPE(tokenizer)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def heal_prompt(
    tokenizer: PreTrainedTokenizerBase | ByteLevelBPE,
    input_ids: Sequence[int] | torch.Tensor,
    *,
    max_backoff: int = 3,
) -> HealedPrompt:
    """Back up ``input_ids`` for token healing.

    The number of removed tokens ``k`` is the largest ``k ≤ max_backoff`` (and ``< len(input_ids)``,
    so a prompt of one token keeps it) such that some vocabulary token starts with the bytes of the
    last ``k`` tokens and those bytes are whole UTF-8 characters; ``k = 1`` qualifies unless the last
    token splits a character.

    Args:
        tokenizer: a byte-level BPE Hugging Face tokenizer (or its :class:`ByteLevelBPE` view).
        input_ids: the tokenized prompt (1-D).
        max_backoff: most tokens to remove.
    """
    bpe = _bpe(tokenizer)
    ids = [
        int(i) for i in (input_ids.flatten().tolist() if isinstance(input_ids, torch.Tensor) else input_ids)
    ]
    check_int("max_backoff", max_backoff, low=1)
    if any(not 0 <= i < bpe.vocab_size for i in ids):
        raise ValueError(f"`input_ids` must be token ids in [0, {bpe.vocab_size})")
    k = 0
    for n in range(1, min(max_backoff, len(ids) - 1) + 1):
        removed = bpe.decode(ids[-n:])
        if bpe.tokens_starting_with(removed) and _is_utf8(removed):
            k = n
    removed = bpe.decode(ids[len(ids) - k :])
    text = removed.decode("utf-8")
    return HealedPrompt(ids[: len(ids) - k], removed, PredicateConstraint(lambda x: x.startswith(text)))


@dataclass
class TokenHealingOutput:
    """``healed``: the backed-up prompt; ``output``: the constrained generation from it (its texts
    start with ``healed.removed``); ``completions``: the text after the original prompt."""

    healed: HealedPrompt
    output: ConstrainedOutput

    @property
    def completions(self) -> list[str]:
        cut = len(self.healed.removed.decode("utf-8"))
        return [text[cut:] for text in self.output.texts]


def token_healing_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int,
    max_backoff: int = 3,
    num_return_sequences: int = 1,
    **generate_kwargs,
) -> TokenHealingOutput:
    """Continue ``prompt`` with token healing.

    The prompt is tokenized (``add_special_tokens=False``, then the tokenizer's BOS in front if it
    has one), backed up by :func:`heal_prompt`, and continued by
    :func:`~tokenlab.decoding.constrained.constrained_generate` under the healing constraint
    (``generate_kwargs``: ``method``, ``do_sample``, ``temperature``, ``generator``, … — greedy AWRS
    by default, which checks tokens in order of probability until one extends the removed text).

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its byte-level BPE tokenizer.
        prompt: the prompt text (may end mid-token).
        max_new_tokens: tokens to generate (the first ones re-create the removed text).
        max_backoff: most prompt tokens to back up.
        num_return_sequences: continuations of the prompt (a batch).
    """
    check_causal_lm("model", model)
    bpe = _bpe(tokenizer)
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a str, got {type(prompt).__name__}")
    check_int("num_return_sequences", num_return_sequences, low=1)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    healed = heal_prompt(bpe, bos + ids, max_backoff=max_backoff)
    input_ids = torch.tensor(
        [healed.input_ids] * num_return_sequences, dtype=torch.long, device=model_device(model)
    )
    generate_kwargs.setdefault("do_sample", False)
    output = constrained_generate(
        model,
        TokenVocabulary.from_tokenizer(tokenizer),
        input_ids,
        healed.constraint,
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )
    return TokenHealingOutput(healed, output)
