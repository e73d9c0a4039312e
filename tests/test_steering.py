"""Steering processors (refusal tokens, CyclicReflex) against their oracles.

* the bias equals the formula at every position and touches only the listed tokens (recorded before
  and after the processor inside ``generate``: greedy, sampling, beam search);
* CyclicReflex's wave equals the paper's piecewise schedule (the reference code's three segments);
* adding refusal tokens grows the embeddings with mean rows, keeps a tied head tied, and leaves the
  old tokens' logits unchanged;
* the threshold rule's decision equals a brute-force recomputation, and on the toy model the refusal
  rate moves monotonically with the threshold (down) and with the bias (up).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tokenlab._checks import ArgumentTypeError
from tokenlab.decoding import (
    CyclicReflexLogitsProcessor,
    RefusalTokenLogitsProcessor,
    add_refusal_tokens,
    triangular_wave,
)
from tokenlab.testing.processors import RecordingProcessor

MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, temperature=0.8, top_k=50),
    "beams": dict(do_sample=False, num_beams=3),
}


def _reference_wave(n: int, amplitude: float, period: float, shift: float) -> float:
    """The schedule as the paper's code writes it, one position at a time."""
    cycle = ((n + shift * period) % period) / period
    if cycle <= 0.25:
        return cycle / 0.25 * amplitude
    if cycle <= 0.75:
        return amplitude - (cycle - 0.25) / 0.5 * 2 * amplitude
    return -amplitude + (cycle - 0.75) / 0.25 * amplitude


@pytest.fixture(scope="module")
def prompts(tiny_world):
    tok = tiny_world.tokenizer
    texts = [
        "def main():\n",
        "import os\nimport sys\n",
        "class A(object):\n    def __init__(self",
        "for i in",
    ]
    return tok(texts, return_tensors="pt", padding=True, padding_side="left")


def _generate(model, tok, batch, processors, mode, max_new_tokens=12):
    torch.manual_seed(0)
    return model.generate(
        **batch, logits_processor=processors, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
        eos_token_id=[], **MODES[mode],
    )  # fmt: skip


# ----------------------------------------------------------------------------------- CyclicReflex
@pytest.mark.parametrize(
    ("amplitude", "period", "shift"), [(3.0, 100.0, 0.0), (5.0, 12.0, 0.3), (1.0, 7.0, -0.5)]
)
def test_triangular_wave_equals_the_papers_schedule(amplitude, period, shift):
    positions = torch.arange(0, int(3 * period) + 5)
    expected = torch.tensor([_reference_wave(n, amplitude, period, shift) for n in positions.tolist()])
    torch.testing.assert_close(triangular_wave(positions, amplitude, period, shift), expected.double())
    if shift == 0.0:
        T = period
        assert [
            float(triangular_wave(n, amplitude, T)) for n in (0, T / 4, T / 2, 3 * T / 4)
        ] == pytest.approx([0.0, amplitude, 0.0, -amplitude])


def _check_wave(before, after, prompt_length, listed, amplitude, period, shift):
    """At every call: listed tokens moved by the wave at the call's response position, others not."""
    others = torch.ones(before.calls[0][1].shape[-1], dtype=torch.bool)
    others[listed] = False
    for (ids, x), (_, y) in zip(before.calls, after.calls):
        wave = float(triangular_wave(ids.shape[1] - prompt_length, amplitude, period, shift))
        finite = x[:, listed].isfinite()
        torch.testing.assert_close((y - x)[:, listed][finite], torch.full_like(x[:, listed], wave)[finite])
        assert torch.equal(y[:, others], x[:, others])


@pytest.mark.parametrize("mode", list(MODES))
def test_cyclic_reflex_bias_is_the_wave_on_listed_tokens_only(tiny_world, prompts, mode):
    model, tok = tiny_world.target, tiny_world.tokenizer
    listed = tok.convert_tokens_to_ids(["Ġif", "Ġreturn", "Ġself"])
    before, after = RecordingProcessor(), RecordingProcessor()
    processor = CyclicReflexLogitsProcessor(listed, amplitude=2.5, period=8, shift=0.1)
    _generate(model, tok, prompts, [before, processor, after], mode)
    assert [ids.shape[1] for ids, _ in before.calls] == list(
        range(prompts.input_ids.shape[1], prompts.input_ids.shape[1] + 12)
    )
    _check_wave(before, after, prompts.input_ids.shape[1], listed, 2.5, 8, 0.1)


def test_steering_in_assisted_generation(tiny_world):
    """Assisted generation calls processors at candidate positions and rolls back: the position
    (hence the bias) follows each call, and the refusal decision is made at the first position."""
    model, tok = tiny_world.target, tiny_world.tokenizer
    prompt = tok("def main():\n", return_tensors="pt")
    listed = tok.convert_tokens_to_ids(["Ġif", "Ġreturn"])
    before, after = RecordingProcessor(), RecordingProcessor()
    cyclic = CyclicReflexLogitsProcessor(listed, amplitude=1.5, period=6)
    refusal = RefusalTokenLogitsProcessor([7], respond_token_id=9, threshold=0.5)
    out = model.generate(
        **prompt, logits_processor=[refusal, before, cyclic, after], max_new_tokens=10, do_sample=False,
        assistant_model=tiny_world.draft, pad_token_id=tok.pad_token_id, eos_token_id=[],
    )  # fmt: skip
    width = prompt.input_ids.shape[1]
    lengths = [ids.shape[1] for ids, _ in before.calls]
    assert any(b <= a for a, b in itertools.pairwise(lengths))  # a rollback happened
    _check_wave(before, after, width, listed, 1.5, 6, 0.0)
    assert out[0, width] == 9  # p(token 7) < 0.5: respond
    assert all(x[0].isfinite().all() for ids, x in before.calls if ids.shape[1] > width)


def test_cyclic_reflex_stops_after_an_end_token(tiny_world, prompts):
    model, tok = tiny_world.target, tiny_world.tokenizer
    newline = tok("\n", add_special_tokens=False).input_ids[0]
    listed = [tok("if", add_special_tokens=False).input_ids[0]]
    before, after = RecordingProcessor(), RecordingProcessor()
    processor = CyclicReflexLogitsProcessor(listed, amplitude=4.0, period=6, end_token_ids=[newline])
    _generate(model, tok, prompts, [before, processor, after], "greedy")
    width = prompts.input_ids.shape[1]
    ended_somewhere = False
    for step, ((ids, x), (_, y)) in enumerate(zip(before.calls, after.calls)):
        ended = (ids[:, width:] == newline).any(dim=-1)
        ended_somewhere |= bool(ended.any())
        expected = torch.where(ended, 0.0, float(triangular_wave(step, 4.0, 6)))
        torch.testing.assert_close((y - x)[:, listed[0]], expected, atol=1e-5, rtol=0)
    assert ended_somewhere


# ---------------------------------------------------------------------------------- refusal tokens
@pytest.fixture(scope="module")
def refusal_world(tiny_world):
    model, tok = copy.deepcopy(tiny_world.target), copy.deepcopy(tiny_world.tokenizer)
    old_vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.tensor([[5, 17, 42, 8, 99]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    tokens = add_refusal_tokens(model, tok, ["[refuse:unsafe]", "[refuse:unknown]"])
    return model, tok, tokens, old_vocab, ids, before


def test_add_refusal_tokens_grows_embeddings_properly(refusal_world):
    model, tok, tokens, old_vocab, ids, before = refusal_world
    assert tokens.refusal_ids == [old_vocab, old_vocab + 1] and tokens.respond == old_vocab + 2
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == old_vocab + 3 and model.config.vocab_size == old_vocab + 3
    assert model.get_output_embeddings().weight is emb  # the tied head stays tied
    torch.testing.assert_close(emb[old_vocab:], emb[:old_vocab].mean(0).expand(3, -1))
    for text, token_id in (*tokens.refusal.items(), ("[respond]", tokens.respond)):
        assert tok(text, add_special_tokens=False).input_ids == [token_id]  # one token, never split
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after[..., :old_vocab], before)


@pytest.mark.parametrize("rows", [50, 64])  # 64: a matrix padded beyond the tokenizer's 50 tokens
def test_add_refusal_tokens_to_an_untied_head(rows):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=rows, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    words = {f"w{i}": i for i in range(50)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, "w0")))
    head_before = model.get_output_embeddings().weight.detach().clone()
    emb_before = model.get_input_embeddings().weight.detach().clone()
    tokens = add_refusal_tokens(model, tok, ["[refuse]", "[other]"], respond_token=None)
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert tokens.refusal == {"[refuse]": 50, "[other]": 51} and tokens.respond is None
    assert head is not emb and head.shape[0] == emb.shape[0] == max(rows, 52)
    torch.testing.assert_close(head[:50], head_before[:50])
    torch.testing.assert_close(head[50:52], head_before[:50].mean(0).expand(2, -1))
    torch.testing.assert_close(emb[50:52], emb_before[:50].mean(0).expand(2, -1))
    if rows > 52:  # padding rows beyond the new tokens are left alone
        torch.testing.assert_close(emb[52:], emb_before[52:])


@pytest.mark.parametrize("mode", list(MODES))
def test_refusal_bias_at_the_first_response_token_only(refusal_world, prompts, mode):
    model, tok, tokens, *_ = refusal_world
    before, after = RecordingProcessor(), RecordingProcessor()
    processor = RefusalTokenLogitsProcessor(tokens.refusal_ids, bias=[1.5, -2.0])
    _generate(model, tok, prompts, [before, processor, after], mode, max_new_tokens=4)
    for step, ((_, x), (_, y)) in enumerate(zip(before.calls, after.calls)):
        expected = x.clone()
        if step == 0:
            expected[:, tokens.refusal_ids] += torch.tensor([1.5, -2.0])
        assert torch.equal(y, expected)


@pytest.mark.parametrize("mode", list(MODES))
def test_refusal_threshold_decision_equals_brute_force(refusal_world, prompts, mode):
    model, tok, tokens, *_ = refusal_world
    before, after = RecordingProcessor(), RecordingProcessor()
    thresholds = [0.05, 0.2]
    processor = RefusalTokenLogitsProcessor(
        tokens.refusal_ids, respond_token_id=tokens.respond, bias=[6.0, 6.5], threshold=thresholds
    )
    out = _generate(model, tok, prompts, [before, processor, after], mode, max_new_tokens=3)
    (_, x), (_, y) = before.calls[0], after.calls[0]
    decided = set()
    for r in range(x.shape[0]):
        p = x[r].clone().index_add_(0, torch.tensor(tokens.refusal_ids), torch.tensor([6.0, 6.5])).softmax(-1)
        hits = [(float(p[t]), t) for t, tau in zip(tokens.refusal_ids, thresholds) if p[t] >= tau]
        expected = max(hits)[1] if hits else tokens.respond
        assert int(y[r].argmax()) == expected and y[r].isfinite().sum() == 1
        decided.add(expected)
    assert len(decided) > 1  # the prompts fall on both sides of the thresholds
    width = prompts.input_ids.shape[1]
    assert set(out[:, width].tolist()) <= {*tokens.refusal_ids, tokens.respond}
    for (_, a), (_, b) in zip(before.calls[1:], after.calls[1:]):
        assert torch.equal(a, b)  # later positions untouched


@torch.no_grad()
def test_refusal_rate_moves_monotonically_on_the_toy_model(refusal_world, tiny_world):
    model, tok, tokens, *_ = refusal_world
    starts = torch.linspace(0, tiny_world.heldout_ids.numel() - 17, 48).long()
    ids = torch.stack([tiny_world.heldout_ids[s : s + 16] for s in starts.tolist()])
    refusal = set(tokens.refusal_ids)

    def rate(**kwargs) -> float:
        processor = RefusalTokenLogitsProcessor(tokens.refusal_ids, respond_token_id=tokens.respond, **kwargs)
        first = model.generate(
            input_ids=ids, logits_processor=[processor], max_new_tokens=1, do_sample=False,
            pad_token_id=tok.pad_token_id,
        )[:, -1]  # fmt: skip
        return sum(t in refusal for t in first.tolist()) / len(first)

    by_threshold = [rate(bias=6.0, threshold=t) for t in (0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.2, 1.0)]
    assert all(a >= b for a, b in itertools.pairwise(by_threshold)), by_threshold
    assert by_threshold[0] == 1.0 and by_threshold[-1] == 0.0 and len(set(by_threshold)) > 3
    by_bias = [rate(bias=b) for b in (0.0, 6.0, 8.0, 9.0, 10.0, 12.0, 30.0)]
    assert all(a <= b for a, b in itertools.pairwise(by_bias)), by_bias
    assert by_bias[0] == 0.0 and by_bias[-1] == 1.0 and len(set(by_bias)) > 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="reflection_token_ids"):
        CyclicReflexLogitsProcessor([], amplitude=1.0, period=10)
    with pytest.raises(ValueError, match="period"):
        CyclicReflexLogitsProcessor([3], amplitude=1.0, period=0)
    with pytest.raises(ArgumentTypeError, match="amplitude"):
        CyclicReflexLogitsProcessor([3], amplitude="big", period=10)
    with pytest.raises(ValueError, match="repeat"):
        RefusalTokenLogitsProcessor([3, 3])
    with pytest.raises(ValueError, match="threshold"):
        RefusalTokenLogitsProcessor([3, 4], threshold=[0.5])
    with pytest.raises(ValueError, match="threshold"):
        RefusalTokenLogitsProcessor([3], threshold=1.5)
    with pytest.raises(ValueError, match="respond_token_id"):
        RefusalTokenLogitsProcessor([3], respond_token_id=3)


def test_token_ids_outside_the_vocabulary_are_named(tiny_world, prompts):
    """Ids are checked against the scores' vocabulary at the first call of a generation (the processor
    does not know the model before), with an error naming the argument rather than an IndexError."""
    model, tok = tiny_world.target, tiny_world.tokenizer
    V = model.get_output_embeddings().weight.shape[0]
    processors = {
        "refusal_token_ids": RefusalTokenLogitsProcessor([3, V], bias=1.0),
        "respond_token_id": RefusalTokenLogitsProcessor([3], respond_token_id=V, threshold=0.5),
        "reflection_token_ids": CyclicReflexLogitsProcessor([V + 2], amplitude=1.0, period=4),
        "end_token_ids": CyclicReflexLogitsProcessor([3], amplitude=1.0, period=4, end_token_ids=[V]),
    }
    for name, processor in processors.items():
        with pytest.raises(ValueError, match=rf"`{name}`.*\[0, {V}\)"):
            _generate(model, tok, prompts, [processor], "greedy", max_new_tokens=2)
