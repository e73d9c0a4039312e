"""The decoding family's shared mechanism (``tokenlab.decoding.incremental``) and its one set of checks.

Every public entry of the family that takes prompts, EOS ids, a pad id or a generator goes through
the same checks, so the same mistake gets the same error (naming the argument) everywhere, before
any forward; a left-padded batch without an attention mask is read as ``generate`` reads it.
"""

from __future__ import annotations

import pytest
import torch

from tokenlab._checks import ArgumentTypeError, check_generator
from tokenlab.decoding import (
    RegexConstraint,
    branching_factor,
    constrained_generate,
    context_aware_generate,
    counterfactual_generate,
    gumbel_generate,
)

PROMPTS = ["def area():\n    return", "import os\n"]


@pytest.fixture(scope="module")
def world(tiny_world):
    tok = tiny_world.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    assert batch.attention_mask.eq(0).any()  # really padded, with the model's pad id
    assert tiny_world.target.generation_config.pad_token_id == tok.pad_token_id
    return tiny_world.target, tok, batch


class CountForwards:
    """Counts the model's forward calls (a check must fail before any)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _entries(model, tok):
    """One call per public sampling entry, taking the keyword arguments under test."""
    regex = RegexConstraint(r"[a-z_]+\(")
    return {
        "gumbel_generate": lambda ids, **kw: gumbel_generate(model, ids, max_new_tokens=3, **kw),
        "context_aware_generate": lambda ids, **kw: context_aware_generate(
            model, ids, ids, max_new_tokens=3, **kw
        ),
        "branching_factor": lambda ids, **kw: branching_factor(
            model, ids, num_samples=2, max_new_tokens=3, **kw
        ),
        "constrained_generate": lambda ids, **kw: constrained_generate(
            model, tok, ids, regex, max_new_tokens=3, **kw
        ),
    }


@pytest.mark.parametrize(
    "entry", ["gumbel_generate", "context_aware_generate", "branching_factor", "constrained_generate"]
)
def test_prompt_checks_name_the_argument_before_any_forward(world, entry):
    model, tok, batch = world
    call = _entries(model, tok)[entry]
    V = model.get_input_embeddings().num_embeddings
    with CountForwards(model) as forwards:
        with pytest.raises(ArgumentTypeError, match="input_ids"):  # the wrong kind: a TypeError too
            call(batch.input_ids.float())
        too_big = batch.input_ids.clone()
        too_big[0, -1] = V
        with pytest.raises(ValueError, match=rf"input_ids.*\[0, {V}\)"):
            call(too_big)
    assert forwards.calls == 0


@pytest.mark.parametrize("entry", ["gumbel_generate", "context_aware_generate", "branching_factor"])
def test_eos_and_generator_checks_name_the_argument_before_any_forward(world, entry):
    model, tok, batch = world
    call = _entries(model, tok)[entry]
    V = model.get_output_embeddings().weight.shape[0]
    with CountForwards(model) as forwards:
        with pytest.raises(ArgumentTypeError, match="eos_token_id"):
            call(batch.input_ids, eos_token_id="</s>")
        with pytest.raises(ValueError, match="eos_token_id"):
            call(batch.input_ids, eos_token_id=[0, V])
        if entry != "gumbel_generate":  # the Gumbel-Max sampler draws its noise from seeds
            with pytest.raises(ArgumentTypeError, match="generator"):
                call(batch.input_ids, generator=0)
    assert forwards.calls == 0


@pytest.mark.parametrize("entry", ["gumbel_generate", "context_aware_generate", "constrained_generate"])
def test_pad_token_id_is_checked_against_the_vocabulary(world, entry):
    """A pad id outside the vocabulary would be fed to the model after a row ends."""
    model, tok, batch = world
    V = model.get_output_embeddings().weight.shape[0]
    with CountForwards(model) as forwards, pytest.raises(ValueError, match="pad_token_id"):
        _entries(model, tok)[entry](batch.input_ids, pad_token_id=V)
    assert forwards.calls == 0


def test_check_generator_device():
    assert check_generator("generator", None, torch.device("cpu")) is None
    generator = torch.Generator()
    assert check_generator("generator", generator, torch.device("cpu")) is generator
    with pytest.raises(ValueError, match=r"`generator` must be a torch\.Generator on cuda"):
        check_generator("generator", generator, torch.device("cuda", 0))
    with pytest.raises(ArgumentTypeError, match="generator"):
        check_generator("generator", 0)


def test_padded_prompts_without_a_mask_are_read_as_generate_reads_them(world):
    """``attention_mask=None`` with the model's pad id in the prompts (and the pad id no EOS id):
    the mask is ``input_ids != pad_token_id``, as ``generate`` infers it — the same tokens as with the
    mask, for every entry that takes prompts (both streams of the CAD loop included)."""
    model, tok, batch = world
    ids, mask = batch.input_ids, batch.attention_mask
    with_mask = gumbel_generate(model, ids, attention_mask=mask, max_new_tokens=6, seed=3, eos_token_id=[])
    without = gumbel_generate(model, ids, max_new_tokens=6, seed=3, eos_token_id=[])
    assert torch.equal(without.sequences, with_mask.sequences)
    assert torch.equal(without.attention_mask, mask)
    replay = counterfactual_generate(model, without, input_ids=ids)
    assert torch.equal(replay.sequences, with_mask.sequences)
    cad_mask = context_aware_generate(
        model, ids, ids, attention_mask=mask, context_free_attention_mask=mask, alpha=0.0, max_new_tokens=6
    )
    cad = context_aware_generate(model, ids, ids, alpha=0.0, max_new_tokens=6)
    assert torch.equal(cad.sequences, cad_mask.sequences)
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(cad.sequences, hf)  # α = 0: plain decoding, as generate (which infers the mask)
    # A pad id after a prompt token is not left padding: ask for the mask.
    bad = ids.clone()
    bad[1, -1] = tok.pad_token_id
    with pytest.raises(ValueError, match="attention_mask"):
        gumbel_generate(model, bad, max_new_tokens=2)
