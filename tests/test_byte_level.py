"""Exact byte-level probabilities against brute-force enumeration.

Oracle: a 31-token byte-level BPE tokenizer over {a, b, c} (27 byte tokens from explicit merges,
BOS/EOS, 3 FIM sentinels) and a random tiny Llama whose next-token distribution is masked to
canonical continuations, so the token model defines the byte model exactly (the lemma's
assumption). Brute force enumerates every token sequence up to DEPTH tokens (each token has ≥ 1
byte, so DEPTH tokens decide the first DEPTH bytes) and sums their probabilities by decoded
string — no cover encodings involved.
"""

from __future__ import annotations

import copy
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tokenlab._hf import cache_kwargs
from tokenlab.tokenization.byte_level import (
    EOS_BYTE,
    ByteLevelBPE,
    ByteLevelEnsemble,
    ByteLevelLM,
    core_weights,
    fill_in_the_middle,
    generate_bytes,
)
from tokenlab.tokenization.pretokenize import make_pre_tokenizer

MERGES = [
    ("a", "b"), ("b", "c"), ("c", "a"), ("a", "a"), ("ab", "c"), ("c", "c"), ("b", "a"), ("ab", "ab"),
    ("ca", "b"), ("b", "b"), ("a", "c"), ("bc", "a"), ("aa", "b"), ("c", "b"), ("abc", "a"), ("ba", "c"),
    ("cc", "a"), ("bb", "c"), ("ac", "b"), ("cb", "a"), ("a", "ca"), ("ca", "a"), ("c", "bb"), ("aa", "a"),
]  # fmt: skip
ALPHABET = b"abc"
DEPTH = 4
FIM_SENTINELS = ["<pre>", "<suf>", "<mid>"]


def abc_tokenizer(merges=MERGES) -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "a": 1, "b": 2, "c": 3}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", *FIM_SENTINELS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<s>", additional_special_tokens=FIM_SENTINELS
    )


class CanonicalMaskedLM(torch.nn.Module):
    """A random tiny Llama whose next-token law is restricted to canonical continuations: after token
    ``p`` only tokens ``t`` with ``encode(decode([p, t])) == [p, t]`` (BPE canonicality is decided by
    adjacent pairs; checked below), and EOS; after BOS or a FIM sentinel any token that is canonical
    on its own, or EOS."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        V = len(tokenizer)
        config = LlamaConfig(
            vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=32, max_position_embeddings=64,
        )  # fmt: skip
        self.base = LlamaForCausalLM(config).double()
        with torch.no_grad():  # larger logits: far-from-uniform laws
            self.base.lm_head.weight.mul_(30.0)
        bpe = ByteLevelBPE(tokenizer)
        allowed = torch.zeros(V, V, dtype=torch.bool)
        for p in bpe.byte_token_ids:
            for t in bpe.byte_token_ids:
                allowed[p, t] = bpe.encode(bpe.token_bytes[p] + bpe.token_bytes[t]) == [p, t]
            for special in tokenizer.all_special_ids:
                allowed[special, p] = bpe.encode(bpe.token_bytes[p]) == [p]
        allowed[:, tokenizer.eos_token_id] = True
        self.register_buffer("allowed", allowed)

    @property
    def config(self):
        return self.base.config

    def forward(self, input_ids, cache=None, **kwargs):
        if cache is not None:
            kwargs.update(cache_kwargs(self.base, cache))
        out = self.base(input_ids=input_ids, **kwargs)
        return SimpleNamespace(logits=out.logits.masked_fill(~self.allowed[input_ids], float("-inf")))


@torch.no_grad()
def brute_force(model, tokenizer, context: list[int]) -> dict[tuple[bytes, bool], float]:
    """Probability of every (first ≤ DEPTH bytes, ended) outcome, by enumerating all token sequences of
    ≤ DEPTH tokens level by level (batched); zero-probability branches are dropped."""
    bpe = ByteLevelBPE(tokenizer)
    eos = tokenizer.eos_token_id
    outcomes: dict[tuple[bytes, bool], float] = {}
    level = [([], 0.0)]
    for _ in range(DEPTH):
        ids = torch.tensor([context + seq for seq, _ in level])
        logp = torch.log_softmax(model(input_ids=ids).logits[:, -1], -1)
        nxt = []
        for (seq, lp), row in zip(level, logp):
            key = (bpe.decode(seq)[:DEPTH], True)
            outcomes[key] = outcomes.get(key, 0.0) + (lp + row[eos]).exp().item()
            for t in bpe.byte_token_ids:
                if row[t] > float("-inf"):
                    nxt.append(([*seq, t], lp + row[t].item()))
        level = nxt
    for seq, lp in level:
        key = (bpe.decode(seq)[:DEPTH], False)
        outcomes[key] = outcomes.get(key, 0.0) + math.exp(lp)
    return outcomes


def brute_prefix(outcomes, x: bytes) -> float:
    return sum(p for (s, _), p in outcomes.items() if s.startswith(x))


def brute_law(outcomes, x: bytes) -> torch.Tensor:
    law = torch.zeros(EOS_BYTE + 1, dtype=torch.float64)
    for b in ALPHABET:
        law[b] = brute_prefix(outcomes, x + bytes([b]))
    law[EOS_BYTE] = sum(p for (s, ended), p in outcomes.items() if ended and s == x)
    return law / brute_prefix(outcomes, x)


@pytest.fixture(scope="module")
def world():
    tokenizer = abc_tokenizer()
    model = CanonicalMaskedLM(tokenizer, seed=0)
    lm = ByteLevelLM(model, tokenizer)
    return SimpleNamespace(
        tokenizer=tokenizer, model=model, lm=lm, outcomes=brute_force(model, tokenizer, lm.context_ids)
    )


def strings(max_len: int):
    for n in range(max_len + 1):
        for chars in itertools.product(ALPHABET, repeat=n):
            yield bytes(chars)


def test_tokenizer_and_pair_canonicality(world):
    """The oracle's premises: our byte view encodes like HF, and pairwise canonicality equals full
    canonicality (encode(decode(t)) == t) on all sequences of ≤ 3 tokens."""
    bpe = ByteLevelBPE(world.tokenizer)
    assert len(world.tokenizer) == 31 and bpe.max_token_bytes == 4
    for x in strings(6):
        assert bpe.encode(x) == world.tokenizer(x.decode(), add_special_tokens=False).input_ids
    allowed = world.model.allowed
    for n in (2, 3):
        for seq in itertools.product(bpe.byte_token_ids, repeat=n):
            pairwise = all(allowed[p, t] for p, t in itertools.pairwise(seq))
            assert pairwise == (bpe.encode(bpe.decode(seq)) == list(seq))


def test_prefix_probability_equals_brute_force(world):
    for x in strings(DEPTH):
        got = math.exp(world.lm.prefix_log_probability(x))
        want = brute_prefix(world.outcomes, x)
        assert abs(got - want) <= 1e-10 * max(want, 1e-300), x
    assert world.lm.prefix_log_probability(b"") == 0.0


def test_next_byte_law_equals_brute_force_and_sums_to_one(world):
    worst = 0.0
    for x in strings(DEPTH - 1):
        law = world.lm.next_byte_distribution(x)
        assert law.sum().item() == pytest.approx(1.0, abs=1e-12)
        worst = max(worst, (law - brute_law(world.outcomes, x)).abs().max().item())
    assert worst < 1e-10


def test_mid_token_prompt_exact_law_differs_from_naive(world):
    """The prompt 'a' is the token 'a', a prefix of 'ab', 'abc', ...; since a·b is the first merge, no
    canonical sequence has 'a' followed by a token starting with 'b': naive token completion gives
    'b' probability 0, the exact law does not."""
    x = b"a"
    exact = world.lm.next_byte_distribution(x)
    naive = world.lm.naive_next_byte_distribution(x)
    truth = brute_law(world.outcomes, x)
    assert (exact - truth).abs().max() < 1e-10
    assert naive[ord("b")] == 0.0 and truth[ord("b")] > 0.05
    assert 0.5 * (naive - truth).abs().sum() > 0.3


def test_context_law_equals_brute_force(world):
    """A fixed token context before the byte prompt, ending with a special token (as in FIM: sentinels
    and a tokenized suffix, then <MID>; here BOS plays the sentinel)."""
    bos = world.tokenizer.bos_token_id
    context = [bos, *world.lm.bpe.encode(b"cab"), bos]
    outcomes = brute_force(world.model, world.tokenizer, context)
    for x in (b"", b"a", b"ab", b"cc"):
        law = world.lm.next_byte_distribution(x, context)
        assert (law - brute_law(outcomes, x)).abs().max() < 1e-10


def test_greedy_generation_follows_argmax_of_exact_law(world):
    x, want = b"", b""
    for _ in range(DEPTH - 1):
        b = int(brute_law(world.outcomes, x + want).argmax())
        if b == EOS_BYTE:
            break
        want += bytes([b])
    assert generate_bytes(world.lm, x, DEPTH - 1) == want


def test_sampling_matches_law():
    """Fixed seed, 300 one-byte samples: total variation to the exact law < 0.1 (≈ 4 standard errors)."""
    tokenizer = abc_tokenizer()
    lm = ByteLevelLM(CanonicalMaskedLM(tokenizer, seed=1), tokenizer)
    law = lm.next_byte_distribution(b"ab")
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(EOS_BYTE + 1, dtype=torch.float64)
    for _ in range(300):
        out = generate_bytes(lm, b"ab", 1, do_sample=True, generator=gen)
        counts[out[0] if out else EOS_BYTE] += 1
    assert 0.5 * (counts / 300 - law).abs().sum() < 0.1
    assert lm.cost.forward_calls <= 2  # 300 laws of one prompt: its branches are evaluated once


def test_fill_in_the_middle_and_token_healing(world):
    tok, lm = world.tokenizer, world.lm
    a, b, c = tok.convert_tokens_to_ids(FIM_SENTINELS)
    middle = fill_in_the_middle(
        lm, b"ab", b"cc", prefix_token_id=a, suffix_token_id=b, middle_token_id=c, max_new_bytes=2
    )
    context = [tok.bos_token_id, a, b, *lm.bpe.encode(b"cc"), c]
    assert middle == generate_bytes(_Ctx(lm, context), b"ab", 2)
    with pytest.raises(TypeError, match="`lm`"):  # an ensemble has no single tokenizer for the suffix
        fill_in_the_middle(
            ByteLevelEnsemble([lm]), b"ab", b"cc", prefix_token_id=a, suffix_token_id=b, middle_token_id=c,
            max_new_bytes=2,
        )  # fmt: skip
    healed = lm.token_healing_generate(b"ab", 2)
    logits = world.model(input_ids=torch.tensor([[tok.bos_token_id]])).logits[0, -1]
    first = max(lm.bpe.tokens_starting_with(b"ab"), key=lambda t: logits[t])
    assert lm.bpe.token_bytes[first].startswith(b"ab")
    assert (b"ab" + healed).startswith(lm.bpe.token_bytes[first])


class _Ctx:
    def __init__(self, lm, context):
        self.lm, self.context = lm, context

    def next_byte_distribution(self, text):
        return self.lm.next_byte_distribution(text, self.context)


def test_ensemble_of_two_tokenizers(world):
    other_tok = abc_tokenizer(MERGES[:12])
    other = ByteLevelLM(CanonicalMaskedLM(other_tok, seed=2), other_tok)
    ens = ByteLevelEnsemble([world.lm, other], weights=[3.0, 1.0])
    for x in (b"", b"ab", b"cab"):
        mix = ens.next_byte_distribution(x)
        assert mix.sum().item() == pytest.approx(1.0, abs=1e-12)
        want = 0.75 * world.lm.next_byte_distribution(x) + 0.25 * other.next_byte_distribution(x)
        assert (mix - want).abs().max() < 1e-12
    alone = ByteLevelEnsemble([world.lm, world.lm]).next_byte_distribution(b"ab")
    assert (alone - world.lm.next_byte_distribution(b"ab")).abs().max() < 1e-12
    with pytest.raises(ValueError, match="weights"):
        ByteLevelEnsemble([world.lm], weights=[-1.0])
    with pytest.raises(ValueError, match="weights"):  # NaN/inf used to give a NaN law
        ByteLevelEnsemble([world.lm, world.lm], weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="weights"):
        ByteLevelEnsemble([world.lm, world.lm], weights=[1.0, float("inf")])


def test_bad_input(world):
    wordlevel = Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="BPE"):
        ByteLevelBPE(PreTrainedTokenizerFast(tokenizer_object=wordlevel))
    plain = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    with pytest.raises(ValueError, match="byte-level"):
        ByteLevelBPE(PreTrainedTokenizerFast(tokenizer_object=plain))
    with pytest.raises(TypeError, match="text"):
        world.lm.next_byte_distribution(3)
    with pytest.raises(ValueError, match="context_ids"):
        world.lm.next_byte_distribution(b"a", [999])
    for call in (world.lm.next_byte_distribution, world.lm.naive_next_byte_distribution):
        with pytest.raises(ValueError, match="`text` is not valid Unicode"):  # a lone surrogate
            call("a\ud800")
    with pytest.raises(ValueError, match="`prompt` is not valid Unicode"):
        generate_bytes(world.lm, "\udfff", 2)
    with pytest.raises(ValueError, match="probability zero"):
        world.lm.next_byte_distribution(b"b", [world.tokenizer.bos_token_id, world.lm.bpe.encode(b"a")[0]])
    with pytest.raises(ValueError, match="max_new_bytes"):
        generate_bytes(world.lm, b"a", -1)
    with pytest.raises(ValueError, match="`max_new_bytes`"):  # was a TypeError from range()
        generate_bytes(world.lm, b"a", 2.0)
    with pytest.raises(ValueError, match="`temperature`"):  # inf: law ** 0, uniform over all 257
        generate_bytes(world.lm, b"a", 2, do_sample=True, temperature=float("inf"))
    with pytest.raises(TypeError, match="`generator`"):
        generate_bytes(world.lm, b"a", 2, do_sample=True, generator=0)
    for eos in (-1, world.lm.bpe.vocab_size):  # −1 read the last token's probability as end-of-text
        with pytest.raises(ValueError, match="`eos_token_id`"):
            ByteLevelLM(world.lm.model, world.tokenizer, eos_token_id=eos)


def test_canonical_prefixes_on_toy_tokenizer(tiny_world):
    """On the toy world's GPT-2-regex tokenizer, at every cut of real code (whitespace runs, mid-word,
    non-ASCII, invalid UTF-8): the canonical encoding of the prefix is a canonical prefix, its one-token
    extensions that re-encode to themselves are found, and the byte view encodes like HF."""
    tok = tiny_world.tokenizer
    bpe = ByteLevelBPE(tok)
    text = "def f(x):\n    return  x  +  1  # ünïcode ñ\n\n\nclass A:\n\tpass   \n".encode()
    for cut in range(0, len(text) + 1, 3):
        data = text[:cut]
        ids = bpe.encode(data)
        assert bpe.is_canonical_prefix(data, ids)
        nxt = bpe.next_tokens(data, ids).tolist()
        for t in bpe.tokens_starting_with(text[cut : cut + 1])[:8]:
            if bpe.encode(data + bpe.token_bytes[t]) == [*ids, t]:
                assert t in nxt, (data, bpe.token_bytes[t])
        try:
            assert ids == tok(data.decode(), add_special_tokens=False).input_ids
        except UnicodeDecodeError:
            assert bpe.decode(ids) == data


def test_byte_map_has_one_home():
    """GPT-2's byte → character map lives in tokenlab.tokenization.bpe; byte_level had a second copy."""
    from tokenlab.tokenization import bpe, byte_level, canonical

    assert not hasattr(byte_level, "byte_to_unicode")
    assert canonical.bytes_to_unicode is bpe.bytes_to_unicode


# ------------------------------------------------------------------ pre-tokenisers, exactly
class TextLM(torch.nn.Module):
    """A token-level LM defined by a law over texts: it writes the canonical encoding of text ``s``, then
    EOS, with probability ``weights[s]`` — supported on canonical encodings, whatever the
    pre-tokeniser, and with no mass on a prefix of one that is not itself canonical. Its next-token law
    after ``c`` is ``mass(c·t) / mass(c)`` with ``mass(c) = Σ_{s: c ⊑ τ(s)} weights[s]``. It keeps the
    token history in the KV cache (one layer, keys = token ids), so it runs on both evaluation paths."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, weights: dict[bytes, float]):
        super().__init__()
        bpe = ByteLevelBPE(tokenizer)
        self.vocab, self.eos = len(tokenizer), tokenizer.eos_token_id
        self.mass: dict[tuple[int, ...], float] = {}
        self.ends: dict[tuple[int, ...], float] = {}
        for text, w in weights.items():
            ids = tuple(bpe.encode(text))
            for k in range(len(ids) + 1):
                self.mass[ids[:k]] = self.mass.get(ids[:k], 0.0) + w
            self.ends[ids] = self.ends.get(ids, 0.0) + w
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def law(self, history: tuple[int, ...]) -> torch.Tensor:
        total = self.mass.get(history, 0.0)
        out = torch.full((self.vocab,), float("-inf"), dtype=torch.float64)
        if total == 0.0:
            return torch.zeros(self.vocab, dtype=torch.float64)
        for t in range(self.vocab):
            m = self.mass.get((*history, t), 0.0) if t != self.eos else self.ends.get(history, 0.0)
            if m > 0:
                out[t] = math.log(m / total)
        return out

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False):
        B, S = input_ids.shape
        past = cache.layers[0].keys[:, 0, :, 0].long() if cache is not None and cache.layers else None
        P = 0 if past is None else past.shape[1]
        mask = torch.ones((B, P + S), dtype=torch.long) if attention_mask is None else attention_mask.cpu()
        logits = torch.zeros((B, S, self.vocab), dtype=torch.float64)
        for r in range(B):
            history = [int(past[r, j]) for j in range(P) if mask[r, j]] if P else []
            for j in range(S):
                if mask[r, P + j]:
                    history.append(int(input_ids[r, j]))
                    logits[r, j] = self.law(tuple(history[1:]))  # after the BOS context
        if cache is not None:  # filled in place, as a transformers model does: the new tokens as keys
            keys = input_ids[:, None, :, None].double()
            cache.update(keys, torch.zeros_like(keys), 0)
        return SimpleNamespace(logits=logits)


def pre_tokenized(merges, pre, alphabet):
    from tests.test_canonical import tiny_tokenizer

    return tiny_tokenizer(merges, pre, alphabet)


def texts_law(alphabet: str, max_len: int, seed: int) -> dict[bytes, float]:
    gen = torch.Generator().manual_seed(seed)
    texts = [("".join(p)).encode() for n in range(max_len + 1) for p in itertools.product(alphabet, repeat=n)]
    w = torch.rand(len(texts), generator=gen, dtype=torch.float64) ** 3
    return dict(zip(texts, (w / w.sum()).tolist()))


def depth_first(alphabet: str, max_len: int, prefix: bytes = b""):
    """Byte strings up to ``max_len`` in depth-first order: most follow-ups extend the previous one, so
    the incremental path (growing branches) is exercised as well as fresh starts."""
    yield prefix
    if len(prefix) < max_len:
        for c in alphabet.encode():
            yield from depth_first(alphabet, max_len, prefix + bytes([c]))


@pytest.mark.parametrize(
    ("merges", "pre", "alphabet"),
    [
        ([("Ġ", "Ġ"), ("Ġ", "a"), ("a", "a"), ("'", "s"), ("ĠĠ", "Ġ")], make_pre_tokenizer("gpt2"), "as' "),
        ([("1", "1"), ("11", "1"), ("2", "1"), ("Ġ", "Ġ")], make_pre_tokenizer("gpt2", "r2l3"), "12 "),
        ([("1", "2"), ("a", "1"), ("a", "a"), ("Ġ", "a")], make_pre_tokenizer("gpt2", "single"), "12a "),
    ],
    ids=["gpt2", "r2l3", "single"],
)
def test_pre_tokenized_laws_equal_brute_force(merges, pre, alphabet):
    """With regex pre-tokenisers, an LM supported on canonical encodings of a random law over all
    texts of ≤ 6 characters: P(x) = Σ_{s ⊒ x} weights[s] and P(· | x) for every x of ≤ 3 characters,
    to 1e-12, laws summing to 1 — with the KV cache (incremental, in depth-first order) and without."""
    tokenizer = pre_tokenized(merges, pre, alphabet)
    weights = texts_law(alphabet, 6, seed=len(alphabet))
    model = TextLM(tokenizer, weights)

    prefix_mass: dict[bytes, float] = {}
    for s, w in weights.items():
        for k in range(len(s) + 1):
            prefix_mass[s[:k]] = prefix_mass.get(s[:k], 0.0) + w

    def truth(x: bytes) -> float:
        return prefix_mass[x]

    for kv_cache in (True, False):
        lm = ByteLevelLM(model, tokenizer, kv_cache=kv_cache)
        worst = 0.0
        for x in depth_first(alphabet, 3 if kv_cache else 2):
            want = truth(x)
            assert math.exp(lm.prefix_log_probability(x)) == pytest.approx(want, rel=1e-12, abs=1e-300), x
            law = lm.next_byte_distribution(x)
            assert law.sum().item() == pytest.approx(1.0, abs=1e-12)
            expected = torch.zeros(EOS_BYTE + 1, dtype=torch.float64)
            for c in alphabet.encode():
                expected[c] = truth(x + bytes([c])) / want
            expected[EOS_BYTE] = weights[x] / want
            worst = max(worst, (law - expected).abs().max().item())
        assert worst < 1e-12


def test_issue_repros():
    """Issue 17's numbers. Vocab {a, Ġ, ĠĠ}, GPT-2 regex, an LM writing "  a" then EOS: P("  a") = 1
    (was 0) and P('a' | "  ") = 1 (was an error). Right-to-left digit groups, vocab {1, 11}, lengths
    1–5 with probability 0.2 each: P("111") = 0.6 (was 0.2), P('1' | "11") = 0.75 (was 0.5)."""
    spaces = pre_tokenized([("Ġ", "Ġ")], make_pre_tokenizer("gpt2"), "a ")
    lm = ByteLevelLM(TextLM(spaces, {b"  a": 1.0}), spaces)
    assert lm.prefix_log_probability(b"  a") == pytest.approx(0.0, abs=1e-12)
    assert lm.next_byte_distribution(b"  ")[ord("a")].item() == pytest.approx(1.0, abs=1e-12)
    digits = pre_tokenized([("1", "1")], make_pre_tokenizer("gpt2", "r2l3"), "1")
    lm = ByteLevelLM(TextLM(digits, {b"1" * k: 0.2 for k in range(1, 6)}), digits)
    assert math.exp(lm.prefix_log_probability(b"111")) == pytest.approx(0.6, abs=1e-12)
    assert lm.next_byte_distribution(b"11")[ord("1")].item() == pytest.approx(0.75, abs=1e-12)


def test_kv_cache_equals_reference_on_toy_model(tiny_world):
    """The KV-cached engine (one new token per branch, batched, trunk moving forward) gives the laws of
    the reference (every branch from its first token) on the toy model in float64, along a greedy
    generation of 60 bytes through code with indentation, numbers and a mid-token prompt; and it
    evaluates ≤ 3 branches per generated byte."""
    model = copy.deepcopy(tiny_world.target).double()
    cached = ByteLevelLM(model, tiny_world.tokenizer)
    reference = ByteLevelLM(model, tiny_world.tokenizer, kv_cache=False)
    prompt = b"    def f(self, x=1234):\n        return self.na"
    out = generate_bytes(cached, prompt, 60)
    before = cached.cost.sequences
    worst = 0.0
    for k in range(0, len(out) + 1, 6):
        a = cached.next_byte_distribution(prompt + out[:k])
        b = reference.next_byte_distribution(prompt + out[:k])
        worst = max(worst, (a - b).abs().max().item())
    assert worst < 1e-10
    assert generate_bytes(reference, prompt, 12) == out[:12]
    assert before / len(out) <= 3.0


def test_core_weights_follow_the_formulas():
    """CoRE on two hand-checked laws over 3 outcomes, β = 2 (the third outcome has no mass anywhere)."""
    p = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]], dtype=torch.float64)
    token, weights = core_weights(p, beta=2.0)
    ref = [0.7, 0.3]
    s = [
        [(math.exp(-2 * abs(p[m, v].item() - ref[v])) - math.exp(-2)) / (1 - math.exp(-2)) for v in range(2)]
        for m in range(2)
    ]
    sums = [sum(row) for row in s]
    for m in range(2):
        for v in range(2):
            assert token[m, v].item() == pytest.approx(s[m][v] / sums[m] * 2, rel=1e-12)
        assert token[m, 2].item() == 0.0
    entropy = [-(0.5 * math.log(0.5)) * 2, -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]
    c = [sums[m] / entropy[m] for m in range(2)]
    assert weights.tolist() == pytest.approx([c[0] / sum(c), c[1] / sum(c)], rel=1e-12)
    with pytest.raises(ValueError, match="beta"):
        core_weights(p, beta=0.0)
    with pytest.raises(ValueError, match="`laws`"):
        core_weights(p[0])  # one law, not (M, K): failed deep in a sum over dim 1
    with pytest.raises(ValueError, match="`laws`"):
        core_weights(-p)


def test_core_ensemble_of_a_model_with_itself_is_the_model(world):
    """Identical members agree everywhere: token consistency 1 on the support, equal weights, and the
    CoRE ensemble's law is the member's; with a second tokenizer it is a proper law that differs."""
    alone = ByteLevelEnsemble([world.lm, world.lm], method="core")
    for x in (b"", b"ab", b"cab"):
        assert (alone.next_byte_distribution(x) - world.lm.next_byte_distribution(x)).abs().max() < 1e-12
        assert alone.last_weights.tolist() == pytest.approx([0.5, 0.5], abs=1e-12)
    other_tok = abc_tokenizer(MERGES[:12])
    other = ByteLevelLM(CanonicalMaskedLM(other_tok, seed=2), other_tok)
    pair = ByteLevelEnsemble([world.lm, other], method="core")
    law = pair.next_byte_distribution(b"ab")
    laws = torch.stack([world.lm.next_byte_distribution(b"ab"), other.next_byte_distribution(b"ab")])
    token, w = core_weights(laws)
    want = w @ (token * laws)
    assert (law - want / want.sum()).abs().max() < 1e-12 and law.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="weights"):
        ByteLevelEnsemble([world.lm, other], weights=[1.0, 2.0], method="core")
    with pytest.raises(ValueError, match="method"):
        ByteLevelEnsemble([world.lm], method="vote")
