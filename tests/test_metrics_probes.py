"""Tokenizer metrics on hand-computed corpora; character probes and adversarial strings against
brute force (every candidate scored one sequence at a time, straddling tokens re-derived from the
token texts)."""

from __future__ import annotations

import math

import pytest
import torch

from tokenlab.tokenization import (
    CHAR_TASKS,
    BPETokenizer,
    adversarial_strings,
    bytes_per_token,
    char_probes,
    compare_tokenizers,
    continuation_log_probs,
    corpus_token_count,
    fertility,
    make_pre_tokenizer,
    parity,
    plot_tokenizer_comparison,
    run_char_probes,
    score_strings,
    token_premiums,
    train_bpe,
    vocabulary_utilisation,
)


def chars(text: str) -> list[int]:
    """A character-level tokenizer: one token per character."""
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def toy_bpe() -> BPETokenizer:
    """Byte-level BPE with two merges, ``ab`` then ``abc``: ``"abc abd"`` → ``abc`` `` `` ``ab`` ``d``
    (the whitespace split keeps the space on the second word: ``" abd"`` → `` `` ``ab`` ``d``)."""
    tokens = [bytes([b]) for b in range(256)] + [b"ab", b"abc"]
    return BPETokenizer(tokens, [(97, 98), (256, 99)], make_pre_tokenizer("whitespace"), ("<|endoftext|>",))


# ------------------------------------------------------------------------------------- metrics
def test_metrics_on_hand_computed_corpora(toy_bpe):
    texts = ["abc abd", "abcabc"]
    assert toy_bpe.encode("abc abd") == [257, 32, 256, 100]
    assert toy_bpe.encode("abcabc") == [257, 257]
    assert corpus_token_count(toy_bpe, texts) == 6
    assert bytes_per_token(toy_bpe, texts) == pytest.approx(13 / 6)
    assert fertility(toy_bpe, texts) == pytest.approx(6 / 3)  # 3 whitespace words
    assert vocabulary_utilisation(toy_bpe, texts) == pytest.approx(4 / 258)  # abc, " ", ab, d of 258
    assert bytes_per_token(chars, ["héllo wörld"]) == pytest.approx(13 / 11)  # é, ö: 2 bytes each
    assert fertility(chars, ["a bb ccc"]) == pytest.approx(8 / 3)
    hf = toy_bpe.to_hf()
    for metric in (bytes_per_token, fertility, vocabulary_utilisation):
        assert metric(hf, texts) == pytest.approx(metric(toy_bpe, texts))  # HF export: same figures


def test_token_premiums_and_parity():
    parallel = {"en": ["the cat", "a dog"], "de": ["die Katze", "ein Hund"], "xx": ["ab", "c"]}
    premiums = token_premiums(chars, parallel, reference="en")
    assert premiums == pytest.approx({"en": 1.0, "de": 17 / 12, "xx": 3 / 12})  # CTC ratios
    assert parity(chars, parallel["de"], parallel["en"]) == pytest.approx((9 / 7 + 8 / 5) / 2)
    assert parity(chars, parallel["de"], parallel["de"]) == 1.0  # a tokenizer with itself
    words = lambda text: [len(w) for w in text.split()]  # one token per word
    assert parity(chars, ["ab cd"], ["ab cd"], reference_tokenizer=words) == pytest.approx(5 / 2)
    with pytest.raises(ValueError, match="aligned"):
        token_premiums(chars, {"en": ["a"], "de": ["a", "b"]}, reference="en")
    with pytest.raises(ValueError, match="`reference`"):
        token_premiums(chars, parallel, reference="fr")
    with pytest.raises(ValueError, match="aligned"):
        parity(chars, ["a"], ["a", "b"])
    with pytest.raises(TypeError, match="`texts`"):
        bytes_per_token(chars, "not a list")


def test_compare_tokenizers_rows_equal_the_metrics_and_plot(toy_bpe, tmp_path):
    corpora = {"code": ["abc abd", "abcabc"], "prose": ["the cat sat"]}
    rows = compare_tokenizers({"toy": toy_bpe, "chars": chars}, corpora)
    assert [(r["tokenizer"], r["corpus"]) for r in rows] == [
        ("toy", "code"), ("toy", "prose"), ("chars", "code"), ("chars", "prose"),
    ]  # fmt: skip
    for row in rows:
        tok = toy_bpe if row["tokenizer"] == "toy" else chars
        texts = corpora[row["corpus"]]
        assert row["bytes_per_token"] == pytest.approx(bytes_per_token(tok, texts))
        assert row["fertility"] == pytest.approx(fertility(tok, texts))
        assert row["tokens"] == corpus_token_count(tok, texts)
    expected = vocabulary_utilisation(toy_bpe, corpora["code"])
    assert rows[0]["vocabulary_utilisation"] == pytest.approx(expected)
    assert rows[2]["vocabulary_utilisation"] is None  # a bare callable has no vocabulary
    pytest.importorskip("matplotlib")
    path = plot_tokenizer_comparison(rows, tmp_path / "cmp.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError):
        plot_tokenizer_comparison(rows, path)
    with pytest.raises(ValueError, match="`metrics`"):
        plot_tokenizer_comparison(rows, tmp_path / "x.png", metrics=["speed"])


# ------------------------------------------------------------------------------ character probes
def test_char_probe_answers_by_brute_force():
    words = ["banana", "letter", "abc", "mississippi", "a b"]  # "a b" has a space: ignored
    probes = char_probes(words, 20, seed=1)
    assert [p.task for p in probes] == [t for t in CHAR_TASKS for _ in range(20)]
    for p in probes:
        assert p.word != "a b"
        positions = [i for i, c in enumerate(p.word) if c == p.character]
        expected = {
            "count_character_frequency": len(positions),
            "count_unique_chars": len({c for c in p.word}),
            "find_first_occurrence": positions[0] if positions else None,
            "find_last_occurrence": positions[-1] if positions else None,
        }[p.task]
        assert p.answer == expected
        assert p.answer in p.candidates()
    probe = next(p for p in probes if p.task == "find_last_occurrence")
    assert probe.question("-") == (
        f"What is the index of the last occurrence of the character '{probe.character}' in the string "
        f"'{'-'.join(probe.word)}'?\nStart counting from 0."
    )
    with pytest.raises(ValueError, match="`tasks`"):
        char_probes(words, 2, tasks=["spell"])


def _log_prob(model, ids: list[int], start: int) -> float:
    """log P(ids[start:] | ids[:start]), one unpadded sequence at a time (float64)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids)))


def test_char_probe_predictions_are_the_brute_force_argmax(tiny_world):
    model, tok = tiny_world.target, tiny_world.tokenizer
    probes = char_probes(["return", "self", "import", "value"], 2, seed=0)
    report = run_char_probes(model, tok, probes, batch_size=3)
    for result in report.results:
        for separator, predicted in [(None, result.predicted), (" ", result.predicted_spelled)]:
            question = f"Question: {result.probe.question(separator)}\nAnswer:"
            prompt = tok.encode(question, add_special_tokens=False)
            scores = {
                k: _log_prob(model, prompt + tok.encode(f" {k}", add_special_tokens=False), len(prompt))
                for k in result.probe.candidates()
            }
            best = max(scores.values())
            assert scores[predicted] == pytest.approx(best, abs=1e-9)  # argmax (ties: any maximiser)
        assert result.word_tokens == len(tok.encode(result.probe.word, add_special_tokens=False))
    assert report.accuracy["all"] == sum(r.correct for r in report.results) / len(probes)
    assert set(report.accuracy) == {*CHAR_TASKS, "all"}
    assert 0 <= report.accuracy_spelled["all"] <= 1


# --------------------------------------------------------------------------- adversarial strings
def test_adversarial_strings_straddle_the_word_boundary():
    corpus = ["stable"] * 60 + ["moves", "table", "the", "cat", "sat", "mat"] * 3
    tok = train_bpe(corpus, 290, progress=False).to_hf()
    words = ["moves", "table", "cat", "the", "mat", "sat"]
    found, controls = adversarial_strings(tok, words, 10, min_trap_chars=4)
    assert "movestable" in [s.text for s in found]
    assert controls and len(controls) <= len(found)
    for item in found + controls:
        pieces = tok.convert_ids_to_tokens(tok.encode(item.text, add_special_tokens=False))
        texts = [tok.convert_tokens_to_string([p]) for p in pieces]
        assert "".join(texts) == item.text and tuple(texts) == item.tokens
        ends = [sum(map(len, texts[: k + 1])) for k in range(len(texts))]
        starts = [e - len(t) for e, t in zip(ends, texts)]
        crossing = [t for s, e, t in zip(starts, ends, texts) if s < len(item.left) < e]
        assert (crossing[:1] or [None])[0] == item.trap
        assert (item.trap is None) == (item in controls)


def test_score_strings_is_bits_per_byte(tiny_world):
    model, tok = tiny_world.target, tiny_world.tokenizer
    strings = ["selfvalue", "returnself", "import os"]
    scores = score_strings(model, tok, strings, context="x = ", batch_size=2)
    prefix = tok.encode("x = ", add_special_tokens=False)
    for text, bits in zip(strings, scores.bits_per_byte):
        ids = prefix + tok.encode(text, add_special_tokens=False)
        expected = -_log_prob(model, ids, len(prefix)) / math.log(2) / len(text.encode())
        assert bits == pytest.approx(expected, rel=1e-9)
    assert scores.mean == pytest.approx(sum(scores.bits_per_byte) / 3)


def test_continuation_log_probs_rejects_starts_that_would_wrap(tiny_world):
    """``start = 0`` has no previous position to predict token 0 from: the index ``start − 1 = −1``
    used to read the *last* position's law silently; misaligned ``starts`` were truncated by ``zip``."""
    model, tok = tiny_world.target, tiny_world.tokenizer
    ids = tok.encode("x = 1", add_special_tokens=False)
    assert continuation_log_probs(model, [ids], [1], 0) == [pytest.approx(_log_prob(model, ids, 1), abs=1e-9)]
    with pytest.raises(ValueError, match="`starts`"):
        continuation_log_probs(model, [ids], [0], 0)
    with pytest.raises(ValueError, match="`starts`"):
        continuation_log_probs(model, [ids], [len(ids) + 1], 0)
    with pytest.raises(ValueError, match="`starts`"):
        continuation_log_probs(model, [ids, ids], [1], 0)
    with pytest.raises(TypeError, match="`strings`"):
        score_strings(model, tok, "selfvalue", context="x = ")  # a str is not a list of strings
