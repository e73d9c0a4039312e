"""Token healing: back-off rule by brute force, canonical tokenization restored on prompts cut mid-token."""

from __future__ import annotations

import pytest
import torch

from tokenlab.decoding import ConstrainedLogitsProcessor, TokenVocabulary, heal_prompt, token_healing_generate

# Prompts that end inside a token of the toy tokenizer ("None" is one token; the prompt splits it).
CUT_PROMPTS = ["    return No", "if x is not No"]


def _brute_force_backoff(token_bytes, ids, max_backoff):
    best = 0
    for n in range(1, min(max_backoff, len(ids) - 1) + 1):
        removed = b"".join(token_bytes[i] for i in ids[-n:])
        try:
            removed.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if any(t is not None and t.startswith(removed) for t in token_bytes):
            best = n
    return best


def test_backoff_and_first_token_set_equal_brute_force(tiny_world):
    tokenizer = tiny_world.tokenizer
    vocab = TokenVocabulary.from_tokenizer(tokenizer)
    for text in [*CUT_PROMPTS, "import o", "def __in", "x = 1", "é"]:
        ids = [tokenizer.bos_token_id, *tokenizer(text).input_ids]
        for max_backoff in (1, 3):
            healed = heal_prompt(tokenizer, ids, max_backoff=max_backoff)
            k = _brute_force_backoff(vocab.token_bytes, ids, max_backoff)
            assert healed.input_ids == ids[: len(ids) - k]
            assert healed.removed == vocab.decode(ids[len(ids) - k :])
            first = [
                v for v, b in enumerate(vocab.token_bytes)
                if b is not None and healed.constraint.allows_prefix(b.decode("utf-8", errors="replace"))
            ]  # fmt: skip
            covering = [
                v for v, b in enumerate(vocab.token_bytes) if b is not None and b.startswith(healed.removed)
            ]
            assert first == covering and (k == 0 or first)
    single = heal_prompt(tokenizer, [tokenizer.bos_token_id])
    assert single.input_ids == [tokenizer.bos_token_id] and single.removed == b""
    with pytest.raises(ValueError, match="max_backoff"):
        heal_prompt(tokenizer, ids, max_backoff=0)
    with pytest.raises(ValueError, match="token ids"):
        heal_prompt(tokenizer, [len(vocab) + 5])


@pytest.mark.parametrize("prompt", CUT_PROMPTS)
def test_healing_restores_the_canonical_tokenization(tiny_world, prompt):
    """The naive prompt tokens are not the canonical tokenization of the text they begin (the prompt
    was cut mid-token); after healing, the kept prompt plus the first generated token is canonical
    and the generated text re-creates the removed text. ``generate`` with the processor agrees."""
    model, tokenizer = tiny_world.target, tiny_world.tokenizer
    naive = tokenizer(prompt).input_ids
    assert tokenizer(prompt + "ne").input_ids[: len(naive)] != naive
    out = token_healing_generate(model, tokenizer, prompt, max_new_tokens=4)
    kept = out.healed.input_ids
    generated = out.output.sequences[0, len(kept) :].tolist()
    assert out.output.texts[0].encode().startswith(out.healed.removed) and out.healed.removed
    healed = kept[1:] + generated[:1]  # without BOS, through the first generated token
    assert tokenizer(tokenizer.decode(healed)).input_ids == healed
    assert prompt + out.completions[0] == tokenizer.decode(kept[1:] + generated)
    processor = ConstrainedLogitsProcessor(out.healed.constraint, tokenizer, do_sample=False)
    hf = model.generate(torch.tensor([kept]), logits_processor=[processor], max_new_tokens=4, do_sample=False,
                        pad_token_id=1)  # fmt: skip
    assert hf[0, len(kept) :].tolist()[: len(generated)] == generated


def test_bad_arguments_are_named_before_any_work(tiny_world):
    model, tokenizer = tiny_world.target, tiny_world.tokenizer
    with pytest.raises(TypeError, match="tokenizer"):
        token_healing_generate(model, "gpt2", "x = No", max_new_tokens=2)
    with pytest.raises(TypeError, match="model"):
        token_healing_generate("gpt2", tokenizer, "x = No", max_new_tokens=2)
    with pytest.raises(TypeError, match="prompt"):
        token_healing_generate(model, tokenizer, ["x = No"], max_new_tokens=2)
