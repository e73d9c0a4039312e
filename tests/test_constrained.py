"""Constrained generation: constraints, token masking and AWRS (law, weights, calls), the sampling loop,
the generate processor, and genlm-control as a peer (when installed)."""

from __future__ import annotations

import itertools
import json
import math
import random
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tokenlab.decoding import (
    ConstrainedLogitsProcessor,
    Constraint,
    FiniteSetConstraint,
    JSONConstraint,
    PredicateConstraint,
    RegexConstraint,
    TokenVocabulary,
    constrained_generate,
    constrained_sample,
)
from tokenlab.decoding import awrs as awrs_module
from tokenlab.decoding.constraints import decode_text

IDENTIFIER_CALL = r"[A-Za-z_][A-Za-z0-9_]*\("

# A small world for one-step laws: 8 tokens, the last one EOS, one special token without text.
VOCAB = TokenVocabulary([b"a", b"b", b"c", b"(", b"x1", b"_", None, b"<eos>"], eos_token_ids=[7])
P = torch.tensor([0.3, 0.05, 0.1, 0.2, 0.15, 0.05, 0.05, 0.1], dtype=torch.float64)
REGEX = RegexConstraint(r"[a-z_][a-z0-9_]*\(")


def allowed_set(constraint: Constraint, vocab: TokenVocabulary, prefix: str | bytes) -> list[int]:
    """Brute force: every token the constraint allows after ``prefix`` (texts cut before a split
    UTF-8 character, as the samplers see them)."""
    data = prefix.encode() if isinstance(prefix, str) else prefix
    out = []
    for v, token in enumerate(vocab.token_bytes):
        if vocab.is_eos(v):
            ok = constraint.allows_end(decode_text(data))
        else:
            ok = token is not None and constraint.allows_prefix(decode_text(data + token))
        if ok:
            out.append(v)
    return out


# ------------------------------------------------------------------------------------ constraints
def test_regex_partial_matching_equals_brute_force_completion():
    """``allows_prefix(x)`` ⇔ some string ``x + y`` (|y| ≤ 2 over the alphabet) fully matches; for this
    pattern every viable prefix completes within two characters."""
    pattern = r"[ab][ab1]*\((1)?"
    constraint = RegexConstraint(pattern)
    full = RegexConstraint(pattern).pattern
    alphabet = "ab1("
    for n in range(5):
        for chars in itertools.product(alphabet, repeat=n):
            x = "".join(chars)
            completable = any(
                full.fullmatch(x + "".join(y))
                for k in range(3)
                for y in itertools.product(alphabet, repeat=k)
            )
            assert constraint.allows_prefix(x) == completable, x
            assert constraint.allows_end(x) == (full.fullmatch(x) is not None), x


def test_finite_set_equals_brute_force():
    members = ["print(", "len(", "range(", "re", "", "pr"]
    constraint = FiniteSetConstraint(members)
    probes = {m[:i] for m in members for i in range(len(m) + 1)} | {"x", "prx", "range((", "lem"}
    for x in probes:
        assert constraint.allows_prefix(x) == any(m.startswith(x) for m in members), x
        assert constraint.allows_end(x) == (x in members), x


def test_json_constraint_agrees_with_json_loads():
    constraint = JSONConstraint()
    docs = [
        {"a": [1, 2.5, -3e2, True, None], "b": {"c": "d\\u00e9\n", "e": []}},
        [[], {}, "x", 0, -0.25, False],
        "plain",
        12,
    ]
    texts = [json.dumps(d) for d in docs] + [json.dumps(d, indent=2) for d in docs]
    for text in texts:
        assert constraint.allows_end(text)
        for i in range(len(text) + 1):
            assert constraint.allows_prefix(text[:i]), text[:i]
    # Random strings over JSON's alphabet (no letters of NaN/Infinity, which json.loads accepts):
    # membership equals json.loads, and allowed prefixes are closed under taking prefixes.
    rng = random.Random(0)
    alphabet = [*'{}[]:,"0123-.e tru fals n', '"a"', "1", "[1", '{"k":']
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        try:
            json.loads(text)
            valid = True
        except ValueError:
            valid = False
        assert constraint.allows_end(text) == valid, text
        if constraint.allows_prefix(text):
            assert all(constraint.allows_prefix(text[:i]) for i in range(len(text)))
    for bad in ['{"a" 1', "[1,,", "}", "[1, 2] x", "01", '{"k": tx']:
        assert not constraint.allows_prefix(bad), bad


def test_predicate_constraint_and_defaults():
    constraint = PredicateConstraint(lambda x: x.isdigit() or x == "")
    assert constraint.allows_prefix("12") and not constraint.allows_prefix("1a")
    assert constraint.allows_end("12")  # default: every allowed prefix may end
    ended = PredicateConstraint(str.isdigit, allows_end=lambda x: len(x) == 2)
    assert ended.allows_prefixes(["1", "x"]) == [True, False]
    assert ended.allows_end("12") and not ended.allows_end("1")
    with pytest.raises(TypeError, match="callable"):
        PredicateConstraint("digits")
    with pytest.raises(NotImplementedError):
        Constraint().allows_prefix("")


def test_decode_text_marks_a_split_character():
    data = "né".encode()
    assert decode_text(data[:2]) == "n\ufffd"  # é is two bytes; the first alone is unfinished
    assert decode_text(data) == "né"
    # ASCII-only patterns reject the unfinished character; "any character" accepts it.
    assert not RegexConstraint("[a-z]+").allows_prefix(decode_text(data[:2]))
    assert RegexConstraint("n.").allows_prefix(decode_text(data[:2]))


def test_token_vocabulary_from_tokenizers(tiny_world):
    tokenizer = tiny_world.tokenizer
    vocab = TokenVocabulary.from_tokenizer(tokenizer)
    assert len(vocab) == len(tokenizer) and vocab.eos_token_ids == (tokenizer.eos_token_id,)
    assert vocab.token_bytes[tokenizer.pad_token_id] is None
    for text in ["def f(x):\n    return x", "é ü ∑"]:
        assert vocab.decode(tokenizer(text).input_ids) == text.encode()
    # A tokenizer that is not byte-level BPE: each token decoded on its own.
    from tokenizers import Tokenizer, models, pre_tokenizers

    word = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1, "there": 2, "</s>": 3}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="[UNK]", eos_token="</s>")
    vocab = TokenVocabulary.from_tokenizer(fast)
    assert vocab.token_bytes == [None, b"hi", b"there", None] and vocab.eos_token_ids == (3,)


# ------------------------------------------------------------------------- one step: exact laws
def _sequence_probability(order: tuple[int, ...], p: torch.Tensor) -> float:
    """Probability that sampling without replacement from ``p`` yields ``order`` (a permutation of
    the support)."""
    prob, rest = 1.0, float(p[list(order)].sum())
    for v in order:
        prob *= float(p[v]) / rest
        rest -= float(p[v])
    return prob


@pytest.mark.parametrize("prefix", ["", "ab"])
@pytest.mark.parametrize("estimator", ["two_loop", "recursive"])
def test_awrs_exact_law_and_unbiased_weight_by_enumeration(monkeypatch, prefix, estimator):
    """Replace the Gumbel race by every permutation of the support (each loop of the two-loop
    estimator independently), weight each run by its probability under sampling without replacement,
    and sum: the law of the returned token is exactly p restricted to the allowed set and
    renormalised, and the expected weight is exactly the allowed mass Z (to float rounding). Four
    tokens with mass and one allowed token without (never drawn): 24 or 24² runs."""
    vocab = TokenVocabulary([b"a", b"(", b"1", b"zz", b"<eos>"], eos_token_ids=[4])
    p = torch.tensor([0.4, 0.3, 0.2, 0.0, 0.1], dtype=torch.float64)
    support = [v for v in range(len(p)) if p[v] > 0]
    allowed = allowed_set(REGEX, vocab, prefix)
    assert 0 < len(set(allowed) & set(support)) < len(support)
    Z = float(p[allowed].sum())
    script: list[tuple[int, ...]] = []

    def scripted_race(logp, generator, do_sample):
        order = script.pop(0)
        return iter([v for v in order if logp[v] > -np.inf])

    monkeypatch.setattr(awrs_module, "_race", scripted_race)
    law = torch.zeros(len(p), dtype=torch.float64)
    expected_weight = 0.0
    perms = [(order, _sequence_probability(order, p)) for order in itertools.permutations(support)]
    second_loops = perms if estimator == "two_loop" else [((), 1.0)]
    for first, p1 in perms:
        for second, p2 in second_loops:
            script[:] = [first, second]
            step = constrained_sample(p, REGEX, vocab, prefix, estimator=estimator)
            law[step.token] += p1 * p2
            expected_weight += p1 * p2 * math.exp(step.log_weight)
    target = torch.zeros_like(p)
    target[allowed] = p[allowed] / Z
    torch.testing.assert_close(law, target, rtol=0, atol=1e-12)
    assert abs(expected_weight - Z) < 1e-12


def test_masking_weight_is_the_exact_allowed_mass():
    for prefix in ["", "ab", "ab("]:
        allowed = allowed_set(REGEX, VOCAB, prefix)
        step = constrained_sample(
            P, REGEX, VOCAB, prefix, method="mask", generator=torch.Generator().manual_seed(0)
        )
        assert step.token in allowed
        assert math.isclose(step.log_weight, math.log(float(P[allowed].sum())), rel_tol=1e-12)
        assert step.calls == sum(1 for v in range(8) if VOCAB.token_bytes[v] is not None)


@pytest.mark.parametrize(
    ("method", "estimator"), [("awrs", "two_loop"), ("awrs", "recursive"), ("mask", "two_loop")]
)
def test_sampled_law_chi_square_and_weight_mean(method, estimator):
    """4 000 draws at a fixed seed: the token frequencies follow p restricted and renormalised
    (chi-square p > 1e-3), and the mean weight is within 4 standard errors (and 0.03) of Z = 0.65."""
    generator = torch.Generator().manual_seed(1234)
    allowed = allowed_set(REGEX, VOCAB, "")
    Z = float(P[allowed].sum())
    n = 4000
    counts = np.zeros(len(P))
    weights = np.empty(n)
    for i in range(n):
        step = constrained_sample(
            P, REGEX, VOCAB, "", method=method, estimator=estimator, generator=generator
        )
        counts[step.token] += 1
        weights[i] = math.exp(step.log_weight)
    assert counts.sum() == counts[allowed].sum()
    expected = (P[allowed] / Z * n).numpy()
    assert chisquare(counts[allowed], expected).pvalue > 1e-3
    se = weights.std() / math.sqrt(n)
    assert abs(weights.mean() - Z) < max(4 * se, 1e-12) and abs(weights.mean() - Z) < 0.03


def test_greedy_dead_ends_and_no_estimate():
    for method in ("awrs", "mask"):
        greedy = constrained_sample(P, REGEX, VOCAB, "ab", method=method, do_sample=False)
        assert greedy.token == 0  # the most likely allowed token ('a' at 0.3; '(' has 0.2)
        dead = constrained_sample(P, FiniteSetConstraint(["zz"]), VOCAB, "", method=method)
        assert dead.token == -1 and dead.log_weight == -math.inf
    tied = torch.tensor([0, 0, 0.25, 0.25, 0.25, 0.25, 0, 0], dtype=torch.float64)  # c ( x1 _
    for method in ("awrs", "mask"):  # ties go to the lowest allowed id, as argmax (HF greedy) does
        assert constrained_sample(tied, REGEX, VOCAB, "b", method=method, do_sample=False).token == 2
        assert constrained_sample(tied, REGEX, VOCAB, method=method, do_sample=False).token == 2
    assert math.isnan(constrained_sample(P, REGEX, VOCAB, "", estimator=None).log_weight)
    assert math.isnan(constrained_sample(P, REGEX, VOCAB, "", do_sample=False).log_weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        constrained_sample(P, REGEX, VOCAB, method="beam")
    with pytest.raises(ValueError, match="estimator"):
        constrained_sample(P, REGEX, VOCAB, estimator="geometric")
    with pytest.raises(ValueError, match="sum to 1"):
        constrained_sample(P * 2, REGEX, VOCAB)
    with pytest.raises(ValueError, match="TokenVocabulary of 7"):
        constrained_sample(P[:7] / P[:7].sum(), REGEX, VOCAB)
    with pytest.raises(TypeError, match="Constraint"):
        constrained_sample(P, r"[a-z]+", VOCAB)
    with pytest.raises(TypeError, match="do_sample"):
        constrained_sample(P, REGEX, VOCAB, do_sample=1)
    with pytest.raises(TypeError, match="generator"):
        constrained_sample(P, REGEX, VOCAB, generator=0)
    with pytest.raises(ValueError, match="eos_token_ids"):
        TokenVocabulary([b"a"], eos_token_ids=[3])


# ---------------------------------------------------------------------- sequences: tiny models
def _char_model(seed: int) -> tuple[LlamaForCausalLM, TokenVocabulary]:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, eos_token_id=5, bos_token_id=5, pad_token_id=5,
    )  # fmt: skip
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # a peakier distribution than at init
    return model, TokenVocabulary([b"a", b"b", b"c", b"d", b"e", None], eos_token_ids=[5])


@pytest.mark.parametrize("method", ["awrs", "mask"])
def test_sequence_weights_estimate_the_constraint_probability(method):
    """Over whole sequences the product of per-step weights is an importance weight: its mean over
    particles is an unbiased estimate of P(text ∈ L) = Σ_{s ∈ L} p(s, EOS), computed exactly."""
    model, vocab = _char_model(0)
    members = ["ab", "ba", "abc", "e"]
    constraint = FiniteSetConstraint(members)
    with torch.no_grad():
        exact = 0.0
        for s in members:
            ids = torch.tensor([[5] + [b"abcde".index(ch.encode()) for ch in s] + [5]])
            logp = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
            exact += logp.gather(1, ids[0, 1:, None]).sum().exp().item()
    n = 1500
    out = constrained_generate(
        model, vocab, torch.full((n, 1), 5), constraint, max_new_tokens=4, method=method,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    weights = out.log_weights.exp().numpy()
    assert all(t in members for t in out.texts) and bool(out.complete.all())
    se = weights.std() / math.sqrt(n)
    assert abs(weights.mean() - exact) < max(4 * se, 1e-12), (weights.mean(), exact, se)
    if method == "mask":
        # every masked particle reaches EOS with positive weight; resampling by weight gives p(·|L)
        assert np.isfinite(np.log(weights)).all()


def test_greedy_masking_equals_hf_prefix_constrained_generation(tiny_world):
    """HF's own masking processor (``prefix_allowed_tokens_fn``, allowed sets by brute force) as the
    peer: greedy token masking, greedy AWRS and the processor inside ``generate`` all give its tokens."""
    model, tokenizer = tiny_world.target, tiny_world.tokenizer
    vocab = TokenVocabulary.from_tokenizer(tokenizer)
    constraint = RegexConstraint(IDENTIFIER_CALL)
    batch = tokenizer(
        ["    x = ", "def main():\n    return "], return_tensors="pt", padding=True, padding_side="left"
    )
    P_len = batch.input_ids.shape[1]

    def allowed_fn(row, ids):
        return allowed_set(constraint, vocab, vocab.decode(ids[P_len:].tolist())) or [tokenizer.eos_token_id]

    kwargs = dict(attention_mask=batch.attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=1)
    hf = model.generate(batch.input_ids, prefix_allowed_tokens_fn=allowed_fn, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for method in ("mask", "awrs"):
            ours = constrained_generate(
                model, vocab, batch.input_ids, constraint, attention_mask=batch.attention_mask,
                max_new_tokens=6, method=method, do_sample=False,
            )  # fmt: skip
            assert torch.equal(ours.sequences, hf[:, : ours.sequences.shape[1]])
    for method in ("mask", "awrs"):
        processor = ConstrainedLogitsProcessor(constraint, vocab, method=method, do_sample=False)
        assert torch.equal(model.generate(batch.input_ids, logits_processor=[processor], **kwargs), hf)


def test_awrs_needs_far_fewer_constraint_calls_than_masking(tiny_world):
    """On the trained toy model (V = 384): masking checks every token with text (+ EOS) per step;
    AWRS fewer than V/20 per generated token, and every text it generates is allowed."""
    model, tokenizer = tiny_world.target, tiny_world.tokenizer
    vocab = TokenVocabulary.from_tokenizer(tokenizer)
    constraint = RegexConstraint(IDENTIFIER_CALL)
    prompts = tokenizer(
        ["    result = ", "        self."] * 2, return_tensors="pt", padding=True, padding_side="left"
    )
    checkable = sum(b is not None for b in vocab.token_bytes) + 1
    calls = {}
    for method in ("awrs", "mask"):
        out = constrained_generate(
            model, vocab, prompts.input_ids, constraint, attention_mask=prompts.attention_mask,
            max_new_tokens=10, method=method, stop_when_complete=True,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        assert all(constraint.allows_prefix(t) for t in out.texts)
        assert bool(torch.isfinite(out.log_weights).all())
        calls[method] = out.calls_per_token
    assert calls["mask"] == checkable
    assert calls["awrs"] < len(vocab) / 20, calls


def test_processor_sampling_weights_and_reset(tiny_world):
    model, tokenizer = tiny_world.target, tiny_world.tokenizer
    constraint = FiniteSetConstraint(["print(", "len(", "range(", "isinstance("])
    processor = ConstrainedLogitsProcessor(constraint, tokenizer, generator=torch.Generator().manual_seed(0))
    ids = tokenizer(["x = "] * 3, return_tensors="pt").input_ids
    for _ in range(2):
        out = model.generate(ids, logits_processor=[processor], max_new_tokens=8, do_sample=True, top_k=0,
                             pad_token_id=1)  # fmt: skip
        texts = [tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]
        assert all(t in constraint.members for t in texts), texts
        assert processor.log_weights.shape == (3,) and bool(torch.isfinite(processor.log_weights).all())
        assert bool((processor.log_weights <= 0).all()) and bool((processor.constraint_calls > 0).all())
        processor.reset()


def test_processor_object_serves_successive_generate_calls(tiny_world):
    """As every processor of the family, one object serves successive ``generate`` calls with other
    prompts and batch sizes (a new prompt starts a new generation), without ``reset()``."""
    model, tokenizer = tiny_world.target, tiny_world.tokenizer
    constraint = FiniteSetConstraint(["print(", "len(", "range(", "isinstance("])
    processor = ConstrainedLogitsProcessor(constraint, tokenizer, do_sample=False)
    for prompts in (["x = "] * 3, ["    value = ", "y = "]):
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        out = model.generate(**batch, logits_processor=[processor], max_new_tokens=8, do_sample=False,
                             pad_token_id=1)  # fmt: skip
        texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
        assert all(t in constraint.members for t in texts), texts
        assert processor.log_weights.shape == (len(prompts),)


def test_generate_bad_arguments(tiny_world):
    model, tokenizer = tiny_world.target, tiny_world.tokenizer
    ids = tokenizer(["x = "], return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="max_new_tokens"):
        constrained_generate(model, tokenizer, ids, REGEX, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        constrained_generate(model, tokenizer, ids, REGEX, max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="model scores only"):
        constrained_generate(model, TokenVocabulary([b"a"] * 999), ids, REGEX, max_new_tokens=2)
    with pytest.raises(TypeError, match="causal LM"):
        constrained_generate(torch.nn.Linear(2, 2), tokenizer, ids, REGEX, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        constrained_generate(model, tokenizer, ids[0], REGEX, max_new_tokens=2)


# ------------------------------------------------------------------------------- peer: genlm
def test_genlm_control_awrs_has_the_same_one_step_law():
    """genlm-control's AWRS on the same distribution and constraint (skipped when not installed):
    its tokens follow p restricted (chi-square), tokenlab's and genlm's draws are one law (contingency
    chi-square), and its mean weight is within 4 standard errors of Z."""
    pytest.importorskip("genlm.control")
    from tokenlab.testing.genlm import genlm_awrs_draws

    vocab = TokenVocabulary([b"a", b"b", b"c", b"(", b"x1", b"_", b"9", b"<eos>"], eos_token_ids=[7])
    allowed = allowed_set(REGEX, vocab, "")
    Z = float(P[allowed].sum())
    n = 2000
    tokens, log_weights = genlm_awrs_draws(P, REGEX, vocab, num_draws=n, seed=0)
    theirs = np.bincount(tokens, minlength=8)
    assert theirs.sum() == theirs[allowed].sum()
    assert chisquare(theirs[allowed], (P[allowed] / Z * n).numpy()).pvalue > 1e-3
    generator = torch.Generator().manual_seed(0)
    ours = np.bincount(
        [constrained_sample(P, REGEX, vocab, generator=generator).token for _ in range(n)], minlength=8
    )
    assert chi2_contingency(np.stack([ours[allowed], theirs[allowed]])).pvalue > 1e-3
    weights = np.exp(log_weights)
    assert abs(weights.mean() - Z) < 4 * weights.std() / math.sqrt(n)
