"""BPE / superword trainer: HF BpeTrainer agreement, incremental counts vs recount, export = own
encoder, exact round trips, digit pre-tokenisers, superword compression, bad input."""

from __future__ import annotations

import json
import random
import unicodedata
from collections import Counter
from itertools import pairwise

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tokenlab.tokenization import (
    BPETokenizer,
    bytes_to_unicode,
    make_pre_tokenizer,
    train_bpe,
    train_superword_bpe,
)
from tokenlab.tokenization.bpe import _count_pre_tokens, _MergeState
from tokenlab.tokenization.pretokenize import DIGIT_SPLITS
from tokenlab.tour.toy import stdlib_documents

VOCAB = 640
TRANSITION = 450


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [t for _, t in stdlib_documents("train", max_bytes=150_000)]


@pytest.fixture(scope="module")
def heldout() -> list[str]:
    return [t for _, t in stdlib_documents("heldout", max_bytes=60_000)]


@pytest.fixture(scope="module")
def tokenizers_under_test(corpus) -> dict[str, BPETokenizer]:
    """One tokenizer per pre-tokeniser configuration, and a superword one."""
    small = corpus[: max(1, len(corpus) // 3)]
    out = {
        f"{split}+{digits}": train_bpe(small, VOCAB, pre_tokenizer=make_pre_tokenizer(split, digits))
        for split, digits in [("gpt2", None), ("gpt2", "r2l3"), ("whitespace", "single"), ("lines", "l2r3")]
    }
    out["superword"] = train_superword_bpe(
        small,
        VOCAB,
        TRANSITION,
        pre_tokenizer=make_pre_tokenizer("gpt2", "l2r3"),
        superword_pre_tokenizer=make_pre_tokenizer("lines", "l2r3"),
    )
    return out


def random_unicode(rng: random.Random, n: int) -> str:
    """Characters assigned in Python's Unicode database (any plane), ASCII, digits, whitespace."""
    out = []
    while len(out) < n:
        kind = rng.random()
        if kind < 0.3:
            out.append(rng.choice("abc XYZ 0123456789 \n\t  .,;:'s'll()=_-"))
        else:
            low, high = (
                (0x80, 0x3000) if kind < 0.8 else (0x3000, 0x10000) if kind < 0.95 else (0x10000, 0x30000)
            )
            c = chr(rng.randrange(low, high))
            if unicodedata.category(c) not in ("Cn", "Cs"):
                out.append(c)
    return "".join(out)


# ------------------------------------------------------------------------ training oracles
def test_incremental_counts_equal_recount_and_best_pair_is_argmax():
    """After every merge the incrementally updated pair counts equal a full recount, and the chosen
    pair is the brute-force argmax (ties: smallest ids). Small alphabet → many overlaps (aaa)."""
    rng = random.Random(0)
    words = Counter(bytes(rng.choice(b"aab") for _ in range(rng.randint(1, 9))) for _ in range(300))
    state = _MergeState(dict(words))
    tokens = [bytes([b]) for b in range(256)]
    for _ in range(25):
        recount = Counter()
        for word, freq in zip(state.words, state.freqs):
            for pair in pairwise(word):
                recount[pair] += freq
        assert dict(state.counts) == dict(recount)
        if not recount:
            break
        expected = min(recount, key=lambda p: (-recount[p], p))
        assert state.best_pair() == expected
        tokens.append(tokens[expected[0]] + tokens[expected[1]])
        state.merge(expected, len(tokens) - 1)
    assert [b"".join(tokens[i] for i in w) for w in state.words] == list(words)  # bytes preserved


def test_stage1_merges_equal_hf_bpetrainer_until_first_tie(corpus):
    """Same corpus, same pre-tokeniser: our merges equal HF BpeTrainer's until a count tie; at the
    first divergence both pairs have the same count and ours is the smaller (left id, right id)."""
    pre = make_pre_tokenizer("gpt2")
    ours = train_bpe(corpus, VOCAB, pre_tokenizer=pre, progress=False)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre.to_hf()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(corpus, trainer)
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    hf_merges = [
        tuple(bytes(byte_of[c] for c in part) for part in merge)
        for merge in json.loads(hf.to_str())["model"]["merges"]
    ]
    our_merges = [(ours.tokens[a], ours.tokens[b]) for a, b in ours.merges]
    assert len(our_merges) == len(hf_merges) == VOCAB - 257
    k = next((i for i, (x, y) in enumerate(zip(our_merges, hf_merges)) if x != y), len(our_merges))
    assert k >= 50, f"merge lists diverge early, at {k}"
    if k < len(our_merges):
        state = _MergeState(_count_pre_tokens(corpus, pre))
        for pair in ours.merges[:k]:
            state.merge(pair, ours.tokens.index(ours.tokens[pair[0]] + ours.tokens[pair[1]]))
        hf_pair = tuple(ours.tokens.index(t) for t in hf_merges[k])
        assert state.counts[ours.merges[k]] == state.counts[hf_pair] == max(state.counts.values())
        assert ours.merges[k] < hf_pair


def test_superword_stage1_is_subword_bpe_and_replay_is_rank_encoding(corpus, tokenizers_under_test):
    """Stage 1 = plain BPE up to the transition size; stage 2 starts from the stage-1 merges
    replayed on the coarse pre-tokens, which equals encoding them by merge rank."""
    small = corpus[: max(1, len(corpus) // 3)]
    sub = train_bpe(small, TRANSITION, pre_tokenizer=make_pre_tokenizer("gpt2", "l2r3"), progress=False)
    sw = tokenizers_under_test["superword"]
    assert sw.merges[: len(sub.merges)] == sub.merges
    lines = {p.encode() for t in small[:5] for p in make_pre_tokenizer("lines", "l2r3").split(t)}
    state = _MergeState(dict.fromkeys(lines, 1))
    for pair in sub.merges:
        state.merge(pair, sub.tokens.index(sub.tokens[pair[0]] + sub.tokens[pair[1]]))
    assert state.words == [sub.encode_pre_token(w) for w in lines]
    crossing = [t for t in sw.tokens[len(sub.tokens) :] if b" " in t.strip()]
    assert crossing, "stage 2 learned no token spanning whitespace"
    assert not [t for t in sub.tokens if b" " in t.strip(b" ")]


# --------------------------------------------------------------------------- export oracles
@pytest.mark.parametrize("name", ["gpt2+None", "gpt2+r2l3", "whitespace+single", "lines+l2r3", "superword"])
def test_export_gives_identical_ids(name, tokenizers_under_test, heldout):
    """HF ``tokenizers`` loading the export = our encoder, on real held-out text, random Unicode,
    random bytes (decoded with replacement) and text containing the special token."""
    tok = tokenizers_under_test[name]
    hf = tok.to_hf()
    rng = random.Random(1)
    texts = [*heldout[:4], *(random_unicode(rng, 200) for _ in range(20))]
    texts += [bytes(rng.randrange(256) for _ in range(200)).decode("utf-8", "replace") for _ in range(10)]
    texts += ["x = 1<|endoftext|>def f():\n    return 12345678<|endoftext|>"]
    for text in texts:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
        assert hf.decode(hf.encode(text, add_special_tokens=False)) == text
    assert len(hf) == len(tok) == VOCAB


def test_pre_tokenizer_pipeline_equals_hf(tokenizers_under_test):
    rng = random.Random(2)
    char = bytes_to_unicode()
    for tok in tokenizers_under_test.values():
        hf = tok.pre_tokenizer.to_hf()
        for _ in range(20):
            text = random_unicode(rng, 120)
            ours = ["".join(char[b] for b in p.encode()) for p in tok.pre_tokenizer.split(text)]
            assert ours == [p for p, _ in hf.pre_tokenize_str(text)]


def test_roundtrip_arbitrary_bytes_and_unicode(tokenizers_under_test):
    rng = random.Random(3)
    for tok in tokenizers_under_test.values():
        for _ in range(20):
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(300)))  # mostly invalid UTF-8
            assert tok.decode_bytes(tok.encode(data)) == data
            text = random_unicode(rng, rng.randrange(300))
            assert tok.decode(tok.encode(text)) == text
    assert tok.decode_bytes(tok.encode(b"\xff\xfe<|endoftext|>\x80")) == b"\xff\xfe<|endoftext|>\x80"


def test_save_and_reload(tokenizers_under_test, tmp_path):
    from transformers import AutoTokenizer

    tok = tokenizers_under_test["superword"]
    tok.save(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "import os\n\nif x == 1000:\n    print('hello world')\n"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text)
    with pytest.raises(FileExistsError, match="directory"):
        tok.save(tmp_path / "tok")


# ---------------------------------------------------------------------------- pre-tokenisers
@pytest.mark.parametrize(
    ("digits", "text", "expected"),
    [
        ("single", "x=12345 y", ["x=", "1", "2", "3", "4", "5", " y"]),
        ("l2r3", "x=12345 y", ["x=", "123", "45", " y"]),
        ("l2r3", "1234567", ["123", "456", "7"]),
        ("r2l3", "x=12345 y", ["x=", "12", "345", " y"]),
        ("r2l3", "1234567", ["1", "234", "567"]),
        ("r2l3", "123,4 1000000.", ["123", ",", "4", " ", "1", "000", "000", "."]),
        ("r2l3", "no digits", ["no digits"]),
    ],
)
def test_digit_pre_tokenizers_hand_checked(digits, text, expected):
    stage = DIGIT_SPLITS[digits]
    assert stage.split(text) == expected
    assert [p for p, _ in stage.to_hf().pre_tokenize_str(text)] == expected


def test_digit_stage_then_gpt2_split():
    assert make_pre_tokenizer("gpt2", "r2l3").split("n = 1234567 + x") == [
        "n", " =", " ", "1", "234", "567", " +", " x",
    ]  # fmt: skip


def test_digit_grouped_tokenizer_never_merges_across_groups(tokenizers_under_test):
    tok = tokenizers_under_test["gpt2+r2l3"]
    pieces = [tok.tokens[i] for i in tok.encode("total = 1234567890")]
    assert b"".join(p for p in pieces if p.isdigit()) == b"1234567890"
    assert all(len(p) <= 3 for p in pieces if p.isdigit())
    assert b"890" not in [p for p in pieces if len(p) > 3]


# ------------------------------------------------------------------------ superword benefit
def test_superword_fewer_tokens_than_subword_at_equal_vocab(corpus, heldout):
    """Fewer tokens on held-out text (the margin grows with corpus and vocabulary: ≈ 1 % here,
    ≥ 15 % in the full benchmark) and ≥ 5 % fewer on the training text."""
    sub = train_bpe(corpus, 1024, progress=False).to_hf()
    lines = make_pre_tokenizer("lines")  # at this small scale; the benchmark compares both stage-2 rules
    sw = train_superword_bpe(corpus, 1024, 400, superword_pre_tokenizer=lines, progress=False).to_hf()

    def n_tokens(tokenizer, texts):
        return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])

    assert n_tokens(sw, heldout) < n_tokens(sub, heldout)
    assert n_tokens(sw, corpus) < 0.95 * n_tokens(sub, corpus)


def test_superbpe_stage2_rule_is_the_default():
    """SuperBPE's stage-2 regex (scripts/extend_tokenizer.sh), isolated: digits in groups of ≤ 3,
    punctuation runs of ≥ 2 and space runs stand alone; words join across single spaces and newlines."""
    text = "def f(x):\n    return x + 12345  # ok\nby the way"
    assert make_pre_tokenizer("superbpe").split(text) == [
        "def f(x", "):\n", "   ", " return x + ", "123", "45", " ", " # ok\nby the way",
    ]  # fmt: skip
    corpus = ["ab\ncd 1234567 ==> ef\n"] * 40 + ["ab cd\n", "ef"] * 5
    sw = train_superword_bpe(corpus, 290, 262, progress=False)
    assert sw.pre_tokenizer == make_pre_tokenizer("superbpe")
    assert b"ab\ncd" in sw.tokens  # a merge across a newline (whole lines could not learn it)
    assert not any(t.isdigit() and len(t) > 3 for t in sw.tokens)  # digits stay in groups of ≤ 3
    fused = [t for t in sw.tokens if b"=>" in t and any(chr(c).isalnum() for c in t)]
    assert not fused  # a punctuation run stays apart from words and digits
    lines = train_superword_bpe(corpus, 290, 262, superword_pre_tokenizer=make_pre_tokenizer("lines"),
                                progress=False)  # fmt: skip
    assert b"ab\ncd" not in lines.tokens
    assert b"cd 1234567 ==> ef\n" in lines.tokens  # whole lines fuse digits and punctuation with words


# --------------------------------------------------------------------------------- bad input
def test_bad_input(corpus):
    with pytest.raises(ValueError, match="`texts` is empty"):
        train_bpe([], 300)
    with pytest.raises(ValueError, match="`texts` is empty"):
        train_bpe(["", ""], 300)
    with pytest.raises(TypeError, match="`texts`"):
        train_bpe("some text", 300)
    with pytest.raises(ValueError, match="`vocab_size`"):
        train_bpe(["abc"], 256)
    with pytest.raises(ValueError, match="`transition_vocab_size`"):
        train_superword_bpe(["abc"], 300, 300)
    with pytest.raises(ValueError, match="`transition_vocab_size`"):
        train_superword_bpe(["abc"], 300, 200)
    with pytest.raises(ValueError, match="`special_tokens`"):
        train_bpe(["abc"], 300, special_tokens=["x", "x"])
    with pytest.raises(TypeError, match="`pre_tokenizer`"):  # a str used to be split on, silently
        train_bpe(["abc def"], 300, pre_tokenizer="gpt2", progress=False)
    with pytest.raises(TypeError, match="`superword_pre_tokenizer`"):
        train_superword_bpe(["abc def"], 300, 280, superword_pre_tokenizer="lines", progress=False)
    with pytest.raises(ValueError, match="`split`"):
        make_pre_tokenizer("words")
    with pytest.raises(ValueError, match="`digits`"):
        make_pre_tokenizer("gpt2", "r2l4")
    tok = train_bpe(corpus[:2], 300, progress=False)
    with pytest.raises(TypeError, match="`text`"):
        tok.encode(123)
    with pytest.raises(ValueError, match="`text`"):
        tok.encode("lone \udc80 surrogate")
    with pytest.raises(ValueError, match="`texts`"):
        train_bpe(["lone \udc80 surrogate"], 300)
    with pytest.raises(ValueError, match="`ids`"):
        tok.decode([len(tok)])
