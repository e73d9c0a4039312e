"""The toy world: deterministic corpus, tokenizer round trip, save/reload, training beats unigram."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from tokenlab.tour.toy import (
    PRESETS,
    build_toy_model,
    load_toy_world,
    stdlib_documents,
    train_toy_tokenizer,
)


def test_corpus_is_deterministic_and_split():
    a = stdlib_documents("train", max_bytes=200_000)
    b = stdlib_documents("train", max_bytes=200_000)
    assert a == b
    held = {p for p, _ in stdlib_documents("heldout")}
    train = {p for p, _ in stdlib_documents("train")}
    assert held and train and not held & train
    assert all(
        p.endswith(".py") and "site-packages" not in p and "/test/" not in f"/{p}" for p in held | train
    )
    assert sum(len(t.encode()) for _, t in a) >= 200_000


def test_corpus_bad_input():
    with pytest.raises(ValueError, match="`split`"):
        stdlib_documents("dev")
    with pytest.raises(ValueError, match="`max_bytes`"):
        stdlib_documents("train", max_bytes=0)


def test_tokenizer_round_trip_on_stdlib_and_unicode():
    docs = [t for _, t in stdlib_documents("train", max_bytes=100_000)]
    tok = train_toy_tokenizer(docs, 300)
    assert len(tok) == 300
    heldout = [t for _, t in stdlib_documents("heldout", max_bytes=50_000)]
    for text in [*heldout[:5], "héllo wörld — 日本語 🐍\n\t\x00", ""]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text


def test_tokenizer_bad_input():
    with pytest.raises(ValueError, match="`vocab_size`"):
        train_toy_tokenizer(["abc"], 100)
    with pytest.raises(ValueError, match="`texts`"):
        train_toy_tokenizer([], 300)


def test_toy_world_trained_below_unigram(tiny_world):
    m = tiny_world.metrics
    assert m["target_heldout_loss"] < m["unigram_heldout_loss"] - 0.3
    assert m["draft_heldout_loss"] < m["unigram_heldout_loss"] - 0.2
    assert m["target_parameters"] > m["draft_parameters"]
    assert tiny_world.tokenizer.eos_token_id is not None and tiny_world.tokenizer.pad_token_id is not None


def test_toy_world_reload_gives_identical_logits(tiny_world, tmp_path):
    ids = tiny_world.heldout_ids[:40].unsqueeze(0)
    before = tiny_world.target(ids).logits
    tiny_world.target.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    after = LlamaForCausalLM.from_pretrained(tmp_path)(ids).logits
    assert torch.equal(before, after)
    # The cached world reloads to the same weights too.
    again = load_toy_world("tiny", cache=tiny_world.path.parent, progress=False)
    assert torch.equal(again.target(ids).logits, before)


def test_load_toy_world_bad_input():
    with pytest.raises(ValueError, match="`preset`"):
        load_toy_world("huge")
    with pytest.raises(TypeError, match="`preset`"):
        load_toy_world(3)


def test_build_is_seeded():
    size = PRESETS["tiny"].draft
    torch.manual_seed(0)
    a = build_toy_model(size, 300, 32)
    torch.manual_seed(0)
    b = build_toy_model(size, 300, 32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
