"""The toy world: deterministic corpus, tokenizer round trip, save/reload, training beats unigram."""

from __future__ import annotations

import io
import os
import stat

import pytest
import torch
from transformers import LlamaForCausalLM

from tokenlab.tour.toy import (
    PRESETS,
    ToyModelSize,
    ToyWorldConfig,
    build_once,
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


MICRO = ToyWorldConfig(
    corpus_bytes=20_000,
    vocab_size=260,
    context_length=16,
    target=ToyModelSize(16, 1, 2, 1, 32),
    draft=ToyModelSize(8, 1, 2, 1, 16),
    train_steps=3,
    batch_size=2,
    eval_tokens=256,
)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_first_build_says_what_where_and_shows_one_bar_per_stage(tmp_path, capsys, monkeypatch):
    """The first build used to print nothing on stdout for minutes while tqdm bars (leave=False)
    scrolled on stderr even when redirected, and transformers added its own loading/saving bars."""
    previous = os.umask(0o022)
    try:
        load_toy_world(MICRO, cache=tmp_path / "redirected", device="cpu")  # stderr is not a terminal
    finally:
        os.umask(previous)
    out, err = capsys.readouterr()
    entry = tmp_path / "redirected" / f"toy-{MICRO.key()}"
    assert f"building a custom toy world on cpu once; cached in {entry}" in out and "built in" in out
    assert err == ""  # no bars, not even transformers' "Loading weights" / "Writing model shards"
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755  # the umask, not drwx------
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary directory left

    load_toy_world(MICRO, cache=tmp_path / "redirected", device="cpu")  # cached: silent
    assert capsys.readouterr() == ("", "")

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    load_toy_world(MICRO, cache=tmp_path / "terminal", device="cpu")
    finished = [line.rsplit("\r", 1)[-1] for line in terminal.getvalue().split("\n")[:-1]]
    assert [line.split(":")[1].strip() for line in finished] == [
        "corpus and tokenizer",
        "training target",
        "training draft",
    ]
    assert all("100%" in line for line in finished)

    capsys.readouterr()
    load_toy_world(MICRO, cache=tmp_path / "quiet", device="cpu", progress=False)
    assert capsys.readouterr().out == "" and terminal.getvalue().count("\n") == 3


def test_build_once_publishes_complete_entries_only(tmp_path):
    entry, calls = tmp_path / "entry", []

    def failing(out):
        (out / "part").write_text("half")
        raise RuntimeError("interrupted")

    def good(out):
        calls.append(out)
        (out / "data").write_text("x")
        (out / "done").write_text("")

    with pytest.raises(RuntimeError, match="interrupted"):
        build_once(entry, failing, complete="done", name="test", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the entry nor a temporary directory
    assert build_once(entry, good, complete="done", name="test", progress=False) == entry
    assert build_once(entry, good, complete="done", name="test", progress=False) == entry
    assert len(calls) == 1 and (entry / "data").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
