"""Context-aware decoding (CAD) and AdaCAD against their oracles.

* α = 0 is plain ``generate`` token for token (greedy and sampling);
* CAD equals HF's ``UnbatchedClassifierFreeGuidanceLogitsProcessor`` with guidance ``1 + α`` (the
  same contrast, unbatched) on a single unpadded prompt;
* a batch of 3 left-padded prompts equals each prompt run alone; the processor's context-free cache
  equals a fresh forward of its prefix; under beam search its stream follows the reordering (every
  step's context-free logits equal a fresh forward of that beam's prefix);
* AdaCAD's α equals ``scipy.spatial.distance.jensenshannon(p, q) ** 2`` (base e) at every step;
* the plain loop equals ``generate`` with the processor; no deprecation warnings from our calls.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from scipy.spatial.distance import jensenshannon
from transformers import UnbatchedClassifierFreeGuidanceLogitsProcessor

from tokenlab._checks import ArgumentTypeError
from tokenlab.decoding import (
    AdaCADLogitsProcessor,
    ContextAwareLogitsProcessor,
    context_aware_generate,
    jensen_shannon_divergence,
)
from tokenlab.decoding.incremental import CachedStream
from tokenlab.testing.processors import RecordingProcessor

# (context + query, query): the context redefines or introduces names the query goes on to use.
PROMPTS = [
    ("width = 3\nheight = 4\n\ndef area():\n    return", "def area():\n    return"),
    ("import os\n\nclass Reader:\n    def __init__(self, stream):\n        self.", "        self."),
    ("def main(argv):\n    if", "    if"),
]


@pytest.fixture(scope="module")
def world(tiny_world):
    tok = tiny_world.tokenizer
    context = tok([c for c, _ in PROMPTS], return_tensors="pt", padding=True, padding_side="left")
    query = tok([q for _, q in PROMPTS], return_tensors="pt", padding=True, padding_side="left")
    return tiny_world.target, tok, context, query


def _alone(tok, i):
    return tok(PROMPTS[i][0], return_tensors="pt").input_ids, tok(
        PROMPTS[i][1], return_tensors="pt"
    ).input_ids


@torch.no_grad()
def _fresh_logits(model, ids):
    """Last-position logits of one unpadded sequence, no cache."""
    return model(input_ids=ids.view(1, -1)).logits[0, -1].float()


def _gen(model, tok, ids, mask, processors, **kw):
    kw.setdefault("max_new_tokens", 8)
    kw.setdefault("do_sample", False)
    return model.generate(
        input_ids=ids, attention_mask=mask, logits_processor=processors, pad_token_id=tok.pad_token_id, **kw
    )


def test_jensen_shannon_equals_scipy():
    gen = torch.Generator().manual_seed(0)
    p, q = (
        torch.randn(5, 40, generator=gen, dtype=torch.float64),
        torch.randn(5, 40, generator=gen).double() * 3,
    )
    p[0, :7] = float("-inf")  # zero-probability tokens on one side
    q[1, 30:] = float("-inf")
    ours = jensen_shannon_divergence(p, q)
    expected = [jensenshannon(a, b) ** 2 for a, b in zip(p.softmax(-1).numpy(), q.softmax(-1).numpy())]
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert float(jensen_shannon_divergence(p[2], p[2])) == pytest.approx(0.0, abs=1e-12)


def test_alpha_zero_is_plain_decoding(world):
    model, tok, context, query = world
    plain = _gen(model, tok, context.input_ids, context.attention_mask, [])
    cad = ContextAwareLogitsProcessor(model, query.input_ids, query.attention_mask, alpha=0.0)
    assert torch.equal(_gen(model, tok, context.input_ids, context.attention_mask, [cad]), plain)
    sampled = {}
    for name, processors in (("plain", []), ("cad", [cad])):
        torch.manual_seed(7)
        sampled[name] = _gen(
            model, tok, context.input_ids, context.attention_mask, processors,
            do_sample=True, temperature=0.9, top_k=40, top_p=0.95,
        )  # fmt: skip
    assert torch.equal(sampled["cad"], sampled["plain"])


def test_cad_equals_hf_classifier_free_guidance(world):
    """HF's unbatched CFG computes ``γ·(log p_c − log p_u) + log p_u``: CAD with ``α = γ − 1``."""
    model, tok, _, _ = world
    for i in range(len(PROMPTS)):
        c, x = _alone(tok, i)
        ours = ContextAwareLogitsProcessor(model, x, alpha=1.5)
        peer = UnbatchedClassifierFreeGuidanceLogitsProcessor(2.5, model, unconditional_ids=x)
        rec_ours, rec_peer = RecordingProcessor(), RecordingProcessor()
        out = _gen(model, tok, c, None, [ours, rec_ours], max_new_tokens=10)
        expected = _gen(model, tok, c, None, [peer, rec_peer], max_new_tokens=10)
        assert torch.equal(out, expected)
        for (_, a), (_, b) in zip(rec_ours.calls, rec_peer.calls):
            torch.testing.assert_close(a, b.log_softmax(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["cad", "adacad"])
def test_batch_of_left_padded_prompts_equals_each_alone(world, kind):
    model, tok, context, query = world
    make = {
        "cad": lambda ids, mask=None: ContextAwareLogitsProcessor(model, ids, mask, alpha=1.0),
        "adacad": lambda ids, mask=None: AdaCADLogitsProcessor(model, ids, mask),
    }[kind]
    assert context.attention_mask.eq(0).any() and query.attention_mask.eq(0).any()  # really padded
    processor = make(query.input_ids, query.attention_mask)
    batch = _gen(model, tok, context.input_ids, context.attention_mask, [processor], max_new_tokens=10)
    width = context.input_ids.shape[1]
    for i in range(len(PROMPTS)):
        c, x = _alone(tok, i)
        alone = make(x)
        single = _gen(model, tok, c, None, [alone], max_new_tokens=10)
        n = single.shape[1] - c.shape[1]
        assert torch.equal(batch[i, width : width + n], single[0, c.shape[1] :])
        torch.testing.assert_close(
            processor.alpha_history[i, :n], alone.alpha_history[0, :n], atol=1e-5, rtol=0
        )


def test_context_free_cache_equals_fresh_forward(world):
    model, tok, context, query = world
    processor = ContextAwareLogitsProcessor(model, query.input_ids, query.attention_mask, alpha=1.0)
    out = _gen(model, tok, context.input_ids, context.attention_mask, [processor], max_new_tokens=9)
    stream = processor.stream
    generated = out[:, context.input_ids.shape[1] :]
    assert torch.equal(stream.ids, torch.cat([query.input_ids, generated[:, :-1]], dim=1))
    positions = (stream.mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        fresh = model(
            input_ids=stream.ids, attention_mask=stream.mask, position_ids=positions, use_cache=True
        ).cache
    valid = stream.mask.bool()
    for ours, ref in zip(stream.cache.layers, fresh.layers):
        for a, b in ((ours.keys, ref.keys), (ours.values, ref.values)):
            a, b = a.transpose(1, 2)[valid], b.transpose(1, 2)[valid]  # [tokens, heads, dim]
            assert float((a - b).norm() / b.norm()) < 1e-5


class CheckedAdaCAD(AdaCADLogitsProcessor):
    """AdaCAD that checks every step's context-free logits against a fresh forward of the row's prefix."""

    def __init__(self, model, ids, mask, query_rows):
        super().__init__(model, ids, mask)
        self.query_rows, self.reorders, self.rollbacks, self.checked = query_rows, 0, 0, 0

    def _context_free_logits(self, input_ids):
        before = None if self.stream is None else self.stream.ids.clone()
        logits = super()._context_free_logits(input_ids)
        if before is not None and self.progress.prompt_length < input_ids.shape[1]:
            after = self.stream.ids
            self.rollbacks += after.shape[1] <= before.shape[1]
            self.reorders += after.shape[1] == before.shape[1] + 1 and not torch.equal(after[:, :-1], before)
        group = input_ids.shape[0] // len(self.query_rows)
        for r in range(input_ids.shape[0]):
            prefix = torch.cat([self.query_rows[r // group], input_ids[r, self.progress.prompt_length :]])
            torch.testing.assert_close(logits[r], _fresh_logits(self.model, prefix), atol=1e-4, rtol=1e-4)
            self.checked += 1
        return logits


@pytest.mark.parametrize("do_sample", [False, True])
def test_beam_search_follows_the_beams(world, do_sample):
    model, tok, context, query = world
    rows = [tok(q, return_tensors="pt").input_ids[0] for _, q in PROMPTS]
    processor = CheckedAdaCAD(model, query.input_ids, query.attention_mask, rows)
    torch.manual_seed(3)
    _gen(
        model, tok, context.input_ids, context.attention_mask, [processor],
        num_beams=3, max_new_tokens=7, do_sample=do_sample,
    )  # fmt: skip
    assert processor.reorders > 0 and processor.checked == 3 * 3 * 7


def test_assisted_generation_rolls_the_stream_back(world, tiny_world):
    """HF assisted generation scores candidate positions and rolls back: the stream follows (every
    call checked against a fresh forward), and greedy output equals unassisted greedy."""
    model, tok, _, _ = world
    rollbacks = 0
    for i in range(len(PROMPTS)):
        c, x = _alone(tok, i)
        plain = _gen(model, tok, c, None, [AdaCADLogitsProcessor(model, x)], max_new_tokens=12)
        processor = CheckedAdaCAD(model, x, None, [x[0]])
        assisted = _gen(model, tok, c, None, [processor], max_new_tokens=12, assistant_model=tiny_world.draft)
        assert torch.equal(assisted, plain)
        assert processor.checked > 12  # candidate positions were scored too
        rollbacks += processor.rollbacks
    assert rollbacks > 0


def test_adacad_alpha_equals_scipy_jensen_shannon(world):
    model, tok, context, query = world
    recorder = RecordingProcessor()
    processor = AdaCADLogitsProcessor(model, query.input_ids, query.attention_mask)
    _gen(model, tok, context.input_ids, context.attention_mask, [recorder, processor], max_new_tokens=6)
    alphas = processor.alpha_history
    for step, (ids, scores) in enumerate(recorder.calls):
        for r in range(ids.shape[0]):
            prefix = torch.cat([_alone(tok, r)[1][0], ids[r, context.input_ids.shape[1] :]])
            p = scores[r].double().softmax(-1).numpy()
            q = _fresh_logits(model, prefix).double().softmax(-1).numpy()
            assert float(alphas[r, step]) == pytest.approx(jensenshannon(p, q) ** 2, rel=1e-3, abs=1e-6)
    assert float(alphas.max()) > 1e-3  # the contexts do change the distribution


@torch.no_grad()
def test_contrast_moves_mass_toward_what_the_context_raises(world):
    """The token the context raises most (``y* = argmax d``, ``d = log p_c − log p_q``) gains
    probability under CAD, the more the larger α: ``log p_CAD(y*) = log p_c(y*) + α·d* − log Z(α)``
    whose derivative in α is ``d* − E_{p_CAD}[d] ≥ 0`` (and it equals ``log p_c(y*)`` at α = 0)."""
    model, _, context, query = world
    contextual = CachedStream(model, context.input_ids, context.attention_mask).prefill()
    free = CachedStream(model, query.input_ids, query.attention_mask).prefill()
    raised = (contextual.log_softmax(-1) - free.log_softmax(-1)).argmax(-1, keepdim=True)
    previous = contextual.log_softmax(-1).gather(-1, raised)
    for alpha in (0.25, 0.5, 1.0, 2.0):
        processor = ContextAwareLogitsProcessor(model, query.input_ids, query.attention_mask, alpha=alpha)
        gained = processor(context.input_ids, contextual).gather(-1, raised)
        assert (gained >= previous - 1e-6).all()
        previous = gained


class RulesOutToken(ContextAwareLogitsProcessor):
    """CAD whose context-free logits rule out ``token`` (as a model that masks a vocabulary entry)."""

    token = 5

    def _context_free_logits(self, input_ids):
        logits = super()._context_free_logits(input_ids).clone()
        logits[:, self.token] = float("-inf")
        return logits


@torch.no_grad()
def test_ruled_out_tokens_never_give_nan(world):
    """A token at −∞ on both sides stays at −∞ (no ∞ − ∞); with α = 0 a token ruled out only by the
    context-free side changes nothing (no 0·∞): the output is exactly the contextual log-softmax."""
    model, _, context, query = world
    scores = CachedStream(model, context.input_ids, context.attention_mask).prefill()
    both = scores.clone()
    both[:, RulesOutToken.token] = float("-inf")
    for alpha in (0.0, 0.5, 1.0):
        processor = RulesOutToken(model, query.input_ids, query.attention_mask, alpha=alpha)
        out = processor(context.input_ids, both)
        assert not out.isnan().any()
        assert (out[:, RulesOutToken.token] == float("-inf")).all()
        assert out.isfinite().sum() == out.numel() - out.shape[0]
    plain = RulesOutToken(model, query.input_ids, query.attention_mask, alpha=0.0)(context.input_ids, scores)
    torch.testing.assert_close(plain, scores.log_softmax(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["cad", "adacad"])
def test_plain_loop_equals_generate(world, method):
    model, tok, context, query = world
    processor = (
        ContextAwareLogitsProcessor(model, query.input_ids, query.attention_mask, alpha=0.7)
        if method == "cad"
        else AdaCADLogitsProcessor(model, query.input_ids, query.attention_mask)
    )
    expected = _gen(model, tok, context.input_ids, context.attention_mask, [processor], max_new_tokens=8)
    common = dict(
        attention_mask=context.attention_mask, context_free_attention_mask=query.attention_mask,
        method=method, alpha=0.7, max_new_tokens=8, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    out = context_aware_generate(model, context.input_ids, query.input_ids, **common)
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(out.alphas, processor.alpha_history[:, : out.alphas.shape[1]])
    # The sampling path with top_k = 1 is greedy.
    sampled = context_aware_generate(
        model, context.input_ids, query.input_ids, do_sample=True, top_k=1, temperature=0.5, **common
    )
    assert torch.equal(sampled.sequences, expected)


def test_processor_object_can_serve_several_generate_calls(world):
    model, tok, context, query = world
    processor = ContextAwareLogitsProcessor(model, query.input_ids, query.attention_mask, alpha=1.0)
    first = _gen(model, tok, context.input_ids, context.attention_mask, [processor])
    again = _gen(model, tok, context.input_ids, context.attention_mask, [processor])
    assert torch.equal(first, again)


def test_no_deprecation_warnings(world):
    model, tok, context, query = world
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once: see the message again
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            processor = AdaCADLogitsProcessor(model, query.input_ids, query.attention_mask)
            _gen(model, tok, context.input_ids, context.attention_mask, [processor], max_new_tokens=3)
            context_aware_generate(
                model, context.input_ids, query.input_ids, attention_mask=context.attention_mask,
                context_free_attention_mask=query.attention_mask, max_new_tokens=3,
            )  # fmt: skip
    finally:
        logger.removeHandler(handler)
    assert not [m for m in messages if "deprecat" in m.lower()], messages


def test_bad_arguments(world):
    model, tok, context, query = world
    with pytest.raises(ValueError, match="alpha"):
        ContextAwareLogitsProcessor(model, query.input_ids, alpha=-0.1)
    with pytest.raises(ArgumentTypeError, match="alpha"):
        ContextAwareLogitsProcessor(model, query.input_ids, alpha="strong")
    with pytest.raises(TypeError, match="model"):
        AdaCADLogitsProcessor("gpt2", query.input_ids)
    with pytest.raises(ValueError, match="context_free_ids"):
        AdaCADLogitsProcessor(model, query.input_ids.float())
    with pytest.raises(ValueError, match="left padding"):
        AdaCADLogitsProcessor(model, query.input_ids, query.attention_mask.flip(-1))
    with pytest.raises(ValueError, match="multiple"):  # 3 prompts to generate, 2 context-free prompts
        _gen(
            model,
            tok,
            context.input_ids,
            context.attention_mask,
            [AdaCADLogitsProcessor(model, query.input_ids[:2])],
        )
    with pytest.raises(ValueError, match="method"):
        context_aware_generate(model, context.input_ids, query.input_ids, method="dola", max_new_tokens=2)
    with pytest.raises(ValueError, match="one row per prompt"):
        context_aware_generate(model, context.input_ids, query.input_ids[:1], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        context_aware_generate(model, context.input_ids, query.input_ids, max_new_tokens=0)
