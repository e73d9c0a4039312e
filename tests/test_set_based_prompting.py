"""Set-based prompting. Oracle: the paper's guarantee (suffix logits and continuations identical for
every order of the parts), a brute-force mask/position construction, a no-cache decoding loop, and
Hugging Face's own forward/generate when there is a single part (then nothing is parallel)."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tokenlab.attention import SetBasedInputs, segment_attention_mask, set_based_generate, set_based_inputs
from tokenlab.attention.set_based_prompting import additive_mask

PREFIX = "# three facts\n"
PARTS = ["x = 1\n", "import os\n", "def g(a, b):\n    return a\n", "y = [0]\n"]
SUFFIX = "print("


def tiny_model(kind: str, vocab_size: int) -> torch.nn.Module:
    """A random float32 model (init std 0.2 so that logits are far from uniform)."""
    torch.manual_seed(0)
    common = {"vocab_size": vocab_size, "initializer_range": 0.2}
    if kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0, **common
            )
        )
    else:
        config_cls, model_cls = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        }[kind]
        config = config_cls(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
        model = model_cls(config)
    return model.eval()


def suffix_logits(model: torch.nn.Module, inputs: SetBasedInputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs.model_inputs()).logits[0, inputs.suffix_start :]


def concatenation_logits(model: torch.nn.Module, tokenizer, parts: list[str]) -> torch.Tensor:
    """The control: the usual prompt, parts one after another with ordinary causal attention."""
    ids = tokenizer(PREFIX + "".join(parts) + SUFFIX, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0, -1]


def max_spread(tensors: list[torch.Tensor]) -> float:
    return max(float((t - tensors[0]).abs().max()) for t in tensors)


def check_order_invariance(
    model, tokenizer, attn: str, logit_tol: float, new_tokens: int
) -> tuple[float, float]:
    model.set_attn_implementation(attn)
    logits, continuations, control = [], [], []
    for order in itertools.permutations(PARTS):
        inputs = set_based_inputs(tokenizer, PREFIX, list(order), SUFFIX, dtype=model.dtype)
        logits.append(suffix_logits(model, inputs))
        continuations.append(set_based_generate(model, tokenizer, PREFIX, list(order), SUFFIX, new_tokens))
        control.append(concatenation_logits(model, tokenizer, list(order)))
    spread, control_spread = max_spread(logits), max_spread(control)
    assert spread <= logit_tol, f"suffix logits differ across the 24 orders by {spread:.2e}"
    assert all(torch.equal(c, continuations[0]) for c in continuations), "greedy continuations differ"
    assert continuations[0].shape == (1, new_tokens)
    # The control: plain concatenation is order dependent, by far more than the tolerance.
    assert control_spread > 100 * logit_tol, f"control spread {control_spread:.2e} is too small to tell"
    return spread, control_spread


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_every_order_gives_the_same_logits_and_continuation(kind: str, attn: str, tiny_world) -> None:
    model = tiny_model(kind, len(tiny_world.tokenizer))
    check_order_invariance(model, tiny_world.tokenizer, attn, logit_tol=1e-4, new_tokens=6)


def test_order_invariance_on_the_trained_toy_target(tiny_world) -> None:
    """Trained model: summation order moves the logits by ~1e-6, the order of a concatenation by ~1e-1."""
    check_order_invariance(
        tiny_world.target.eval(), tiny_world.tokenizer, "sdpa", logit_tol=1e-4, new_tokens=8
    )


def roles(tokenizer, prefix: str, parts: list[str], suffix: str) -> list[tuple[str, int, int]]:
    """(kind, part number, index within its piece) for each token, from separate tokenizations."""
    out = [("prefix", 0, i) for i in range(len(tokenizer(prefix).input_ids))]
    for j, part in enumerate(parts, start=1):
        out += [("part", j, i) for i in range(len(tokenizer(part, add_special_tokens=False).input_ids))]
    return out + [("suffix", 0, i) for i in range(len(tokenizer(suffix, add_special_tokens=False).input_ids))]


def test_layout_equals_brute_force_construction(tiny_world) -> None:
    tokenizer = tiny_world.tokenizer
    parts = ["a", "bb = 22\n", "ccc(3)"]  # ragged lengths
    inputs = set_based_inputs(tokenizer, PREFIX, parts, SUFFIX, dtype=torch.float16)
    r = roles(tokenizer, PREFIX, parts, SUFFIX)
    n_prefix = sum(kind == "prefix" for kind, _, _ in r)
    longest = max(sum(kind == "part" and j == p for kind, j, _ in r) for p in range(1, len(parts) + 1))

    def sees(q: tuple[str, int, int], k: tuple[str, int, int], q_at: int, k_at: int) -> bool:
        if k_at > q_at:
            return False
        if q[0] == "part" and k[0] == "part":
            return q[1] == k[1]
        return True  # prefix before everything; suffix sees everything before it

    expected = torch.tensor([[sees(q, k, a, b) for b, k in enumerate(r)] for a, q in enumerate(r)])
    positions = [
        i if kind == "prefix" else n_prefix + i if kind == "part" else n_prefix + longest + i
        for kind, _, i in r
    ]
    ids = (
        tokenizer(PREFIX).input_ids
        + [t for p in parts for t in tokenizer(p).input_ids]
        + tokenizer(SUFFIX).input_ids
    )

    assert inputs.input_ids.tolist() == [ids]
    assert inputs.position_ids.tolist() == [positions]
    assert inputs.segment_ids.tolist() == [[j for _, j, _ in r]]
    assert torch.equal(segment_attention_mask(inputs.segment_ids)[0, 0], expected)
    mask = inputs.attention_mask
    assert mask.shape == (1, 1, len(r), len(r)) and mask.dtype == torch.float16
    assert bool((mask[0, 0][expected] == 0).all())
    assert bool((mask[0, 0][~expected] == torch.finfo(torch.float16).min).all())
    assert inputs.suffix_start == len(r) - len(tokenizer(SUFFIX).input_ids)
    assert inputs.next_position == positions[-1] + 1


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cached_decoding_equals_recomputing_the_whole_sequence(kind: str, tiny_world) -> None:
    """The KV-cache loop equals a loop that re-runs the full sequence with the mask rebuilt each step."""
    tokenizer, model = tiny_world.tokenizer, tiny_model(kind, len(tiny_world.tokenizer))
    cached = set_based_generate(model, tokenizer, PREFIX, PARTS[:3], SUFFIX, 5, eos_token_id=-1)
    inputs = set_based_inputs(tokenizer, PREFIX, PARTS[:3], SUFFIX, dtype=model.dtype)
    ids, positions, segments = inputs.input_ids, inputs.position_ids, inputs.segment_ids
    for _ in range(5):
        mask = additive_mask(segment_attention_mask(segments), model.dtype)
        with torch.no_grad():
            token = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        segments = torch.cat([segments, torch.zeros_like(segments[:, :1])], dim=1)
    assert torch.equal(cached, ids[:, inputs.input_ids.shape[1] :])


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_single_part_is_the_ordinary_prompt(kind: str, tiny_world) -> None:
    """One part: the layout is plain causal attention at positions 0 … L−1, so HF's forward and its
    greedy ``generate`` are the oracle."""
    tokenizer, model = tiny_world.tokenizer, tiny_model(kind, len(tiny_world.tokenizer))
    inputs = set_based_inputs(tokenizer, PREFIX, [PARTS[2]], SUFFIX, dtype=model.dtype)
    with torch.no_grad():
        plain = model(inputs.input_ids).logits
        ours = model(**inputs.model_inputs()).logits
        hf = model.generate(
            inputs.input_ids,
            attention_mask=torch.ones_like(inputs.input_ids),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)
    ours_gen = set_based_generate(model, tokenizer, PREFIX, [PARTS[2]], SUFFIX, 6, eos_token_id=-1)
    assert torch.equal(ours_gen, hf[:, inputs.input_ids.shape[1] :])


def test_sampling_is_order_invariant_and_stops_at_eos(tiny_world) -> None:
    tokenizer, model = tiny_world.tokenizer, tiny_world.target.eval()
    samples = []
    for order in [PARTS[:3], PARTS[2::-1], [PARTS[1], PARTS[2], PARTS[0]]]:
        generator = torch.Generator().manual_seed(7)
        samples.append(
            set_based_generate(
                model,
                tokenizer,
                PREFIX,
                order,
                SUFFIX,
                10,
                do_sample=True,
                temperature=0.9,
                generator=generator,
            )
        )
    assert all(torch.equal(s, samples[0]) for s in samples)
    greedy = set_based_generate(model, tokenizer, PREFIX, PARTS[:3], SUFFIX, 6, eos_token_id=-1)
    top1 = set_based_generate(
        model, tokenizer, PREFIX, PARTS[:3], SUFFIX, 6, do_sample=True, top_k=1, eos_token_id=-1
    )
    assert torch.equal(top1, greedy)
    stopped = set_based_generate(
        model, tokenizer, PREFIX, PARTS[:3], SUFFIX, 6, eos_token_id=int(greedy[0, 2])
    )
    first_eos = greedy[0].tolist().index(int(greedy[0, 2]))
    assert torch.equal(stopped, greedy[:, : first_eos + 1])


class NoIds:
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"tokens": list(text)}


def test_sampling_arguments_follow_the_shared_warping(tiny_world) -> None:
    """Sampling goes through tokenlab.kernels.warping (one home): as there and in HF ``generate``, the
    temperature is ignored (not rejected) when decoding greedily."""
    model, tok = tiny_world.target, tiny_world.tokenizer
    greedy = set_based_generate(model, tok, PREFIX, PARTS[:2], SUFFIX, 3, eos_token_id=-1)
    ignored = set_based_generate(model, tok, PREFIX, PARTS[:2], SUFFIX, 3, temperature=0.0, eos_token_id=-1)
    assert torch.equal(greedy, ignored)


def test_bad_input(tiny_world) -> None:
    tok = tiny_world.tokenizer
    with pytest.raises(ValueError, match="at least one"):
        set_based_inputs(tok, PREFIX, [], SUFFIX)
    with pytest.raises(TypeError, match="`parts`"):
        set_based_inputs(tok, PREFIX, "abc", SUFFIX)
    with pytest.raises(TypeError, match=r"`parts\[1\]`"):
        set_based_inputs(tok, PREFIX, ["a", 3], SUFFIX)
    with pytest.raises(ValueError, match=r"`parts\[0\]` is empty"):
        set_based_inputs(tok, PREFIX, ["", "a"], SUFFIX)
    with pytest.raises(ValueError, match="`suffix`"):
        set_based_inputs(tok, PREFIX, ["a"], "")
    with pytest.raises(TypeError, match="`prefix`"):
        set_based_inputs(tok, None, ["a"], SUFFIX)
    with pytest.raises(TypeError, match="`tokenizer`"):
        set_based_inputs(NoIds(), PREFIX, ["a"], SUFFIX)
    with pytest.raises(TypeError, match="`tokenizer`"):
        set_based_inputs("gpt2", PREFIX, ["a"], SUFFIX)
    with pytest.raises(TypeError, match="`dtype`"):
        set_based_inputs(tok, PREFIX, ["a"], SUFFIX, dtype=torch.int64)
    model = tiny_world.target
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        set_based_generate(model, tok, PREFIX, ["a"], SUFFIX, 0)
    with pytest.raises(ValueError, match="`temperature`"):
        set_based_generate(model, tok, PREFIX, ["a"], SUFFIX, 4, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="`top_k`"):
        set_based_generate(model, tok, PREFIX, ["a"], SUFFIX, 4, do_sample=True, top_k=0)
    with pytest.raises(TypeError, match="`model`"):
        set_based_generate(object(), tok, PREFIX, ["a"], SUFFIX, 4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        set_based_generate(model, tok, PREFIX, ["a"], SUFFIX, 10**6)
    with pytest.raises(ValueError, match="segment_ids"):
        segment_attention_mask(torch.zeros(5, dtype=torch.long))
