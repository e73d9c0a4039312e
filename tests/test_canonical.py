"""Canonical prefixes under pre-tokenisation, against brute force.

Oracle: for tiny byte-level BPE tokenizers with the GPT-2 regex, right-to-left digit groups and single
digits, encode *every* text over the tokenizer's alphabet up to ``TEXT_LEN`` characters and collect
all prefixes of the canonical encodings — the canonical prefixes, by definition, up to the length
where longer texts could still add some (``PREFIX_LEN`` bytes, ``TEXT_LEN − PREFIX_LEN`` characters of
slack). Every token sequence decoding to ≤ ``PREFIX_LEN`` bytes is then classified by
``ByteLevelBPE.is_canonical_prefix`` and must agree. The bigram rule is checked against re-encoding
every pair of the toy world's vocabulary, and the Python pre-tokeniser against HF's.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import regex
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from tokenlab.tokenization.canonical import ByteLevelBPE, _match_ends
from tokenlab.tokenization.pretokenize import PreTokenizer, RegexSplit, make_pre_tokenizer

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tiny_tokenizer(
    merges: list[tuple[str, str]], pre: PreTokenizer, alphabet: str
) -> PreTrainedTokenizerFast:
    """A byte-level BPE over ``alphabet`` (GPT-2 byte symbols: ``Ġ`` is the space) with explicit merges."""
    symbols = ["Ġ" if c == " " else c for c in alphabet]
    vocab = {"<s>": 0, **{s: i + 1 for i, s in enumerate(symbols)}}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre.to_hf()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


# (name, merges, pre-tokenizer, alphabet, text length for brute force)
TOKENIZERS = {
    # the issue's repro: "  a" is [Ġ][Ġ][a] but "  " alone is [ĠĠ]; Ġa merges, Ġs does not
    "gpt2": (
        [("Ġ", "Ġ"), ("Ġ", "a"), ("a", "a"), ("'", "s"), ("ĠĠ", "Ġ"), ("a", "s"), ("Ġa", "a")],
        make_pre_tokenizer("gpt2"),
        "as' ",
        7,
    ),
    # right-to-left groups of three digits, then the GPT-2 regex
    "r2l3": (
        [("1", "1"), ("11", "1"), ("2", "1"), ("1", "2"), ("Ġ", "Ġ"), ("Ġ", "1")],
        make_pre_tokenizer("gpt2", "r2l3"),
        "12 ",
        8,
    ),
    # single digits: no token spans two digits in a canonical encoding, though "12" is in the vocabulary
    "single": (
        [("1", "2"), ("a", "1"), ("a", "a"), ("Ġ", "a"), ("Ġ", "1")],
        make_pre_tokenizer("gpt2", "single"),
        "12a ",
        7,
    ),
}
PREFIX_LEN = 4


def brute_force_prefixes(bpe: ByteLevelBPE, alphabet: str, text_len: int) -> set[tuple[int, ...]]:
    texts = ["".join(p) for n in range(text_len + 1) for p in itertools.product(alphabet, repeat=n)]
    found: set[tuple[int, ...]] = set()
    for ids in bpe.encode_many([t.encode() for t in texts]):
        found.update(tuple(ids[:k]) for k in range(len(ids) + 1))
    return found


def token_sequences(bpe: ByteLevelBPE, max_bytes: int):
    """Every sequence of byte tokens whose bytes total ≤ ``max_bytes``."""
    level = [((), 0)]
    while level:
        nxt = []
        for seq, size in level:
            yield seq
            for t in bpe.byte_token_ids:
                if size + len(bpe.token_bytes[t]) <= max_bytes:
                    nxt.append(((*seq, t), size + len(bpe.token_bytes[t])))
        level = nxt


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_canonical_prefixes_equal_brute_force(name):
    merges, pre, alphabet, text_len = TOKENIZERS[name]
    bpe = ByteLevelBPE(tiny_tokenizer(merges, pre, alphabet))
    truth = brute_force_prefixes(bpe, alphabet, text_len)
    checked = disagree = 0
    for seq in token_sequences(bpe, PREFIX_LEN):
        want = seq in truth
        got = bpe.is_canonical_prefix(bpe.decode(seq), seq)
        checked += 1
        disagree += want != got
        assert want == got, (name, [bpe.token_bytes[t] for t in seq], want)
    assert checked > 300 and disagree == 0
    # and the cases the plain-BPE assumption got wrong exist in these tokenizers
    if name == "gpt2":
        g, a = bpe.token_id[b" "], bpe.token_id[b"a"]
        assert bpe.encode(b"  ") == [bpe.token_id[b"  "]] and bpe.is_canonical_prefix(b"  ", [g, g])
        assert bpe.encode(b"  s") == [g, g, bpe.token_id[b"s"]] and bpe.encode(b"  a") == [
            g,
            bpe.token_id[b" a"],
        ]
        assert not bpe.is_canonical_prefix(b"  a", [g, g, a])


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_next_tokens_and_stable_cuts(name):
    """``next_tokens`` is the one-token extension set; a stable cut splits every encoding."""
    merges, pre, alphabet, text_len = TOKENIZERS[name]
    bpe = ByteLevelBPE(tiny_tokenizer(merges, pre, alphabet))
    truth = brute_force_prefixes(bpe, alphabet, text_len)
    for seq in [s for s in truth if len(bpe.decode(s)) <= 2]:
        window = bpe.decode(seq)
        want = sorted(t for t in bpe.byte_token_ids if (*seq, t) in truth)
        assert sorted(bpe.next_tokens(window, seq).tolist()) == want, [bpe.token_bytes[t] for t in seq]
        for prefix in (b"1", b"a", b" "):
            got = sorted(bpe.next_tokens(window, seq, prefix).tolist())
            assert got == [t for t in want if bpe.token_bytes[t].startswith(prefix)]
    texts = ["".join(p) for p in itertools.product(alphabet, repeat=5)]
    for text in texts[::17]:
        data = text.encode()
        cut = bpe.stable_cut(data)
        for more in ("", alphabet[0], alphabet[-1] * 2, alphabet[:2]):
            whole = bpe.encode(data + more.encode())
            assert whole == bpe.encode(data[:cut]) + bpe.encode(data[cut:] + more.encode()), (text, cut, more)


def test_issue_repros_are_canonical_prefixes():
    """Issue 17's two repros at the tokenizer level: [Ġ][Ġ] is a prefix of encode("  a") with vocab
    {a, Ġ, ĠĠ}; with right-to-left digit groups and vocab {1, 11}, "111" has three canonical prefixes
    that cover it: [11][1] (itself), [1][11] (of "1111") and [11][11] (of "11111")."""
    spaces = ByteLevelBPE(tiny_tokenizer([("Ġ", "Ġ")], make_pre_tokenizer("gpt2"), "a "))
    g = spaces.token_id[b" "]
    assert spaces.encode(b"  a") == [g, g, spaces.token_id[b"a"]]
    assert spaces.is_canonical_prefix(b"  ", [g, g]) and spaces.is_canonical_prefix(
        b"  ", [spaces.token_id[b"  "]]
    )
    digits = ByteLevelBPE(tiny_tokenizer([("1", "1")], make_pre_tokenizer(None, "r2l3"), "1"))
    one, two = digits.token_id[b"1"], digits.token_id[b"11"]
    covers = [
        c
        for c in ([two, one], [one, two], [two, two], [one, one])
        if digits.is_canonical_prefix(digits.decode(c), c)
    ]
    assert covers == [[two, one], [one, two], [two, two]]


def test_bigram_rule_equals_reencoding(tiny_world):
    """``canonical_pairs`` (merge spines) against HF's BPE on 49k pairs of the tiny toy vocabulary (every
    third left token, every right token)."""
    bpe = ByteLevelBPE(tiny_world.tokenizer)
    ids = bpe.byte_token_ids
    pairs = [(a, b) for a in ids[::3] for b in ids]
    pieces = [
        ["".join(bpe._to_unicode[x] for x in bpe.token_bytes[a] + bpe.token_bytes[b])] for a, b in pairs
    ]
    encs = bpe._bpe.encode_batch(pieces, is_pretokenized=True, add_special_tokens=False)
    rows = {a: bpe.canonical_pairs(a) for a in ids[::3]}
    wrong = [(a, b) for (a, b), enc in zip(pairs, encs) if (enc.ids == [a, b]) != bool(rows[a][b])]
    assert not wrong and sum(bool(rows[a][b]) for a, b in pairs) > 40_000


def test_pre_tokenizer_matches_hf():
    """The Python pipeline read back from the tokenizer JSON splits like HF's Rust pre-tokeniser."""
    text = "x's  it'LL  12345 678\n\n  \tdef f(a1, b):  return 'é'  ² ٣4  \r\n "
    for pre in (
        make_pre_tokenizer("gpt2"),
        make_pre_tokenizer("gpt2", "r2l3"),
        make_pre_tokenizer("whitespace", "l2r3"),
    ):
        hf = pre.to_hf()
        want = [(lo, hi) for _, (lo, hi) in hf.pre_tokenize_str(text)]
        assert pre.spans(text) == want
    llama = PreTokenizer((RegexSplit("llama3", LLAMA3_PATTERN),))
    hf = llama.to_hf()
    assert llama.spans(text) == [(lo, hi) for _, (lo, hi) in hf.pre_tokenize_str(text)]
    from tokenizers import pre_tokenizers

    for individual in (True, False):
        state = {"type": "Digits", "individual_digits": individual}
        want = [
            (lo, hi)
            for _, (lo, hi) in pre_tokenizers.Digits(individual_digits=individual).pre_tokenize_str(text)
        ]
        assert PreTokenizer.from_hf(state).spans(text) == want
    with pytest.raises(ValueError, match="Metaspace"):
        PreTokenizer.from_hf({"type": "Metaspace"})
    with pytest.raises(ValueError, match="isolated"):
        PreTokenizer.from_hf(
            {"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Removed", "invert": False}
        )


def test_representative_characters_cover_the_classes():
    """Every character of a probe set behaves like its representative under each pattern: replacing
    it by the representative inside random strings never changes the pieces."""
    for pre in (make_pre_tokenizer("gpt2", "r2l3"), PreTokenizer((RegexSplit("llama3", LLAMA3_PATTERN),))):
        reps = pre.representative_characters()
        gen = torch.Generator().manual_seed(0)
        probes = "aZéß1٣²  \t\n\r!'_-ſKsStTrReE"
        for _ in range(60):
            picks = torch.randint(0, len(probes), (6,), generator=gen).tolist()
            text = "".join(probes[i] for i in picks)
            for i, ch in enumerate(text):
                rep = next(r for r in reps if _same(pre, r, ch))
                swapped = text[:i] + rep + text[i + 1 :]
                assert pre.spans(swapped) == pre.spans(text), (text, i, rep)


def _same(pre: PreTokenizer, a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are in one class of ``pre``'s representative partition."""
    return all(bool(r.fullmatch(a)) == bool(r.fullmatch(b)) for r in _compiled_atoms(pre))


@functools.cache
def _compiled_atoms(pre: PreTokenizer) -> list[regex.Pattern]:
    from tokenlab.tokenization.pretokenize import _atoms

    out = []
    for stage in pre.stages:
        flags = [0, regex.IGNORECASE] if "(?i" in stage.pattern else [0]
        out += [regex.compile(atom, f) for atom in _atoms(stage.pattern) for f in flags]
    return out


def test_fast_extensions_equal_the_full_test(tiny_world):
    """``next_tokens`` settles most tokens from one pre-tokenisation of all ``window + token`` texts laid
    end to end; on the toy tokenizer it must equal the full test token by token, also for non-ASCII
    windows, a window ending inside a character, digits and whitespace runs."""
    bpe = ByteLevelBPE(tiny_world.tokenizer)
    windows = [
        b" the",
        b"self.na",
        b"    ",
        b"\n        ",
        b"x'",
        b"12",
        b"\xc3",
        "é".encode(),
        "日本".encode(),
        b"a1",
    ]
    for window in windows:
        ids = bpe.encode(window)
        assert bpe.is_canonical_prefix(window, ids)
        full = [
            t for t in bpe.byte_token_ids if bpe.is_canonical_prefix(window + bpe.token_bytes[t], [*ids, t])
        ]
        assert sorted(bpe.next_tokens(window, ids).tolist()) == sorted(full), window


def test_fast_extensions_equal_the_full_test_on_random_windows(tiny_world):
    """Randomised: canonical prefixes cut from the encodings of random texts (so also prefixes that are
    not their text's own encoding), with and without a first-bytes filter — the vectorised extension
    test of ``next_tokens`` equals the full test (a separate instance: no shared memo), token by token
    and in order."""
    bpe, slow = ByteLevelBPE(tiny_world.tokenizer), ByteLevelBPE(tiny_world.tokenizer)
    gen = torch.Generator().manual_seed(0)
    alphabet = ["a", "e", "s", "t", "x", " ", "  ", "   ", "\n", "\n\n", "\t", "1", "2", "'", ".", "é", "日"]
    for _ in range(40):
        picks = torch.randint(0, len(alphabet), (8,), generator=gen).tolist()
        ids = bpe.encode("".join(alphabet[i] for i in picks).encode())
        ids = ids[: int(torch.randint(1, len(ids) + 1, (1,), generator=gen))]
        window = bpe.decode(ids)
        some = bpe.byte_token_ids[int(torch.randint(0, len(bpe.byte_token_ids), (1,), generator=gen))]
        for prefix in (b"", bpe.token_bytes[some][:1]):
            full = [
                t
                for t in slow.tokens_starting_with(prefix)
                if slow.is_canonical_prefix(window + slow.token_bytes[t], [*ids, t])
            ]
            assert bpe.next_tokens(window, ids, prefix).tolist() == full, (window, ids, prefix)


def test_match_ends_equal_the_match_spans():
    """The match offsets read off ``findall`` lengths (matches that tile the text) equal those of the
    match objects; patterns with gaps or groups take the match objects."""
    gen = torch.Generator().manual_seed(1)
    gpt2 = make_pre_tokenizer("gpt2").stages[0].compiled
    patterns = [gpt2, regex.compile(r"a+"), regex.compile(r"(a)b|\s")]
    for _ in range(30):
        text = "".join("ab 1\n'é"[i] for i in torch.randint(0, 7, (12,), generator=gen).tolist())
        for pattern in patterns:
            spans = {x for match in pattern.finditer(text) for x in match.span()}
            assert set(_match_ends(pattern, text).tolist()) == spans, (pattern.pattern, text)
