"""Exact byte-level probabilities against brute-force enumeration.

Oracle: a 31-token byte-level BPE tokenizer over {a, b, c} (27 byte tokens from explicit merges,
BOS/EOS, 3 FIM sentinels) and a random tiny Llama whose next-token distribution is masked to
canonical continuations, so the token model defines the byte model exactly (the lemma's
assumption). Brute force enumerates every token sequence up to DEPTH tokens (each token has ≥ 1
byte, so DEPTH tokens decide the first DEPTH bytes) and sums their probabilities by decoded
string — no cover encodings involved.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tokenlab.tokenization.byte_level import (
    EOS_BYTE,
    ByteLevelBPE,
    ByteLevelEnsemble,
    ByteLevelLM,
    fill_in_the_middle,
    generate_bytes,
)

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

    def forward(self, input_ids, attention_mask=None):
        logits = self.base(input_ids=input_ids, attention_mask=attention_mask).logits
        return SimpleNamespace(logits=logits.masked_fill(~self.allowed[input_ids], float("-inf")))


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
    assert lm.cost.forward_calls == 301 and lm.cost.sequences > 301


def test_fill_in_the_middle_and_token_healing(world):
    tok, lm = world.tokenizer, world.lm
    a, b, c = tok.convert_tokens_to_ids(FIM_SENTINELS)
    middle = fill_in_the_middle(
        lm, b"ab", b"cc", prefix_token_id=a, suffix_token_id=b, middle_token_id=c, max_new_bytes=2
    )
    context = [tok.bos_token_id, a, b, *lm.bpe.encode(b"cc"), c]
    assert middle == generate_bytes(_Ctx(lm, context), b"ab", 2)
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


def test_canonical_extensions_match_definition_on_toy_tokenizer(tiny_world):
    """The tail-only canonicality check equals the definition encode(bytes) == ids on the toy world's
    GPT-2-regex tokenizer, at random cut points of real code (whitespace runs, mid-word, invalid
    UTF-8), and the byte view encodes like the HF tokenizer."""
    tok = tiny_world.tokenizer
    bpe = ByteLevelBPE(tok)
    text = "def f(x):\n    return  x  +  1  # ünïcode ñ\n\n\nclass A:\n\tpass   \n".encode()
    gen = torch.Generator().manual_seed(0)
    for cut in [*range(len(text)), len(text)]:
        data = text[:cut]
        if cut < 20 or cut % 3 == 0:
            tokens = torch.randint(0, len(bpe.byte_token_ids), (40,), generator=gen).tolist()
            tokens = [bpe.byte_token_ids[k] for k in tokens] + bpe.tokens_starting_with(text[cut : cut + 1])[
                :20
            ]
            ids, canonical = bpe.canonical_extensions(data, tokens)
            want = [t for t in tokens if bpe.encode(data + bpe.token_bytes[t]) == [*ids, t]]
            assert canonical == want, data
        try:
            assert bpe.encode(data) == tok(data.decode(), add_special_tokens=False).input_ids
        except UnicodeDecodeError:
            assert bpe.decode(bpe.encode(data)) == data


def test_byte_map_has_one_home():
    """GPT-2's byte → character map lives in tokenlab.tokenization.bpe; byte_level had a second copy."""
    from tokenlab.tokenization import bpe, byte_level

    assert not hasattr(byte_level, "byte_to_unicode")
    assert byte_level.bytes_to_unicode is bpe.bytes_to_unicode
