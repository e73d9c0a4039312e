"""Speculative decoding against its oracles.

* warping equals HF's Temperature/TopK/TopP warpers;
* the Triton verification kernel (interpreter) equals the reference token for token;
* the one-step law of speculative sampling equals the target's warped law exactly (enumeration on
  a tiny vocabulary), and fixed-seed chi-square tests of sampled tokens do not reject;
* greedy output equals ``target.generate(do_sample=False)``; batched output (EQSPEC, EXSPEC) equals
  each sequence's own greedy run, with left padding and mixed lengths;
* bad input raises errors naming the argument.
"""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import chisquare
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    Qwen2Config,
    Qwen2ForCausalLM,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tokenlab.decoding import speculative_generate, warp_cutoff, warp_logits, warped_probs
from tokenlab.kernels.speculative_verify import speculative_verify as verify
from tokenlab.kernels.speculative_verify.reference import acceptance_probability, residual_distribution
from tokenlab.testing.tiny_models import left_padded_prompts as _prompts
from tokenlab.testing.tiny_models import noisy_copy as _noisy_copy
from tokenlab.testing.tiny_models import tiny_causal_lm as _tiny

WARPINGS = [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8), (0.5, 4, 0.7), (2.0, 1, None)]


@pytest.fixture(scope="module")
def pairs(tiny_world):
    llama = _tiny(LlamaForCausalLM, LlamaConfig, 32, 2, 64, seed=0)
    qwen = _tiny(Qwen2ForCausalLM, Qwen2Config, 32, 2, 64, seed=1)
    return {
        "llama-noisy": (llama, _noisy_copy(llama, 0.15, seed=2)),
        "llama-small": (llama, _tiny(LlamaForCausalLM, LlamaConfig, 16, 1, 64, seed=3)),
        "qwen2-noisy": (qwen, _noisy_copy(qwen, 0.15, seed=4)),
        "toy-trained": (tiny_world.target, tiny_world.draft),
    }


# ---------------------------------------------------------------------------------- warping
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), WARPINGS)
def test_warping_matches_hf_warpers(temperature, top_k, top_p):
    logits = torch.randn(6, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    hf = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        hf.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        hf.append(TopPLogitsWarper(top_p))
    expected = hf(None, logits.clone())
    ours = warp_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        warped_probs(logits, temperature, top_k, top_p), expected.softmax(-1), rtol=1e-12, atol=1e-15
    )


def test_public_warping_functions_reject_bad_arguments():
    """temperature 0 used to give NaN probabilities, top_k 0 an index error, top_p > 1 no filter."""
    logits = torch.randn(2, 10)
    for fn in (warp_cutoff, warp_logits, warped_probs):
        with pytest.raises(ValueError, match="`temperature`"):
            fn(logits, 0.0, None, 0.9)
        with pytest.raises(ValueError, match="`top_k`"):
            fn(logits, 1.0, 0, None)
        with pytest.raises(ValueError, match="`top_p`"):
            fn(logits, 1.0, None, 1.5)
        with pytest.raises(TypeError, match="`logits`"):
            fn(logits.tolist(), 1.0, 3, None)


# ----------------------------------------------------------------------- kernel vs reference
def _verify_inputs(B, k, V, dtype, seed, agree=0.6):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, k + 1, V, dtype=dtype, generator=gen) * 2
    # Draft distributions close to the target's so that acceptances are common and ragged.
    q = torch.softmax(logits[:, :k] + torch.randn(B, k, V, dtype=dtype, generator=gen), dim=-1)
    tokens = torch.multinomial(q.reshape(-1, V).double(), 1, generator=gen).reshape(B, k)
    greedy = torch.where(torch.rand(B, k, generator=gen) < agree, logits[:, :k].argmax(-1), tokens)
    uniforms = torch.rand(B, k, dtype=dtype, generator=gen)
    noise = torch.empty(B, k + 1, V, dtype=dtype).exponential_(generator=gen)
    return logits, q, tokens, greedy, uniforms, noise


@pytest.mark.parametrize(
    ("B", "k", "V", "dtype"),
    [
        (3, 1, 8, torch.float64),
        (4, 4, 37, torch.float32),
        (2, 3, 1000, torch.float64),
        (2, 2, 5000, torch.float32),
    ],
)
def test_kernel_equals_reference(B, k, V, dtype):
    logits, q, tokens, greedy, uniforms, noise = _verify_inputs(B, k, V, dtype, seed=V + k)
    seen = set()
    for do_sample, (temperature, top_k, top_p) in [(False, WARPINGS[0]), *((True, w) for w in WARPINGS[1:4])]:
        args = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        drafts = tokens if do_sample else greedy
        ref = verify(logits, q, drafts, uniforms=uniforms, exponentials=noise, backend="reference", **args)
        out = verify(logits, q, drafts, uniforms=uniforms, exponentials=noise, backend="triton", **args)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), args
        seen.update(ref[0].tolist())
        n = ref[0]
        emitted = ref[1].gather(1, n[:, None]).squeeze(1)
        assert (emitted >= 0).all() and (emitted < V).all()
        assert torch.equal(ref[1][:, :k] == drafts, torch.arange(k)[None] < n[:, None])
    assert len(seen) > 1, "inputs should give ragged acceptance"


def test_greedy_verification_is_prefix_matching():
    logits = torch.randn(4, 4, 11, dtype=torch.float64)
    best = logits.argmax(-1)
    drafts = best[:, :3].clone()
    drafts[1, 0] = (best[1, 0] + 1) % 11
    drafts[2, 2] = (best[2, 2] + 1) % 11
    drafts[3, 1] = (best[3, 1] + 1) % 11
    for backend in ("reference", "triton"):
        n, tokens = verify(logits, None, drafts, backend=backend)
        assert n.tolist() == [3, 0, 2, 1]
        assert tokens[0].tolist() == best[0].tolist()
        assert tokens[1].tolist() == [best[1, 0].item(), -1, -1, -1]
        assert tokens[3].tolist() == [best[3, 0].item(), best[3, 1].item(), -1, -1]


# ------------------------------------------------------------------------- sampling: exact law
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), WARPINGS)
def test_one_step_law_is_target_law_by_enumeration(temperature, top_k, top_p):
    """P(first emitted = t) = Σ_d q(d) [α_d·1{t=d} + (1 − α_d)·residual_d(t)] equals p(t) exactly,
    with α and the residual taken from the implementation, and verify's test is u < α_d."""
    V = 8
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(1, 2, V, dtype=torch.float64, generator=gen) * 2
    draft_logits = torch.randn(1, 1, V, dtype=torch.float64, generator=gen) * 2
    p = warped_probs(logits[:, 0], temperature, top_k, top_p).squeeze(0)
    q = warped_probs(draft_logits[0], temperature, top_k, top_p)
    law = torch.zeros(V, dtype=torch.float64)
    for d in torch.nonzero(q[0] > 0).flatten().tolist():
        alpha = acceptance_probability(p[None], q, torch.tensor([d])).item()
        law += q[0, d] * ((1 - alpha) * residual_distribution(p[None], q)[0])
        law[d] += q[0, d] * alpha
        noise = torch.ones(1, 2, V, dtype=torch.float64)
        for backend in ("reference", "triton"):
            below = [(alpha * (1 - 1e-9), True)] if alpha > 0 else []
            for u, accepted in [*below, (min(alpha * (1 + 1e-9), 1 - 1e-16), alpha >= 1)]:
                n, _ = verify(
                    logits,
                    q[None],
                    torch.tensor([[d]]),
                    do_sample=True,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    uniforms=torch.tensor([[u]], dtype=torch.float64),
                    exponentials=noise,
                    backend=backend,
                )
                assert bool(n.item()) == accepted, (d, alpha, u, backend)
    torch.testing.assert_close(law, p, rtol=0, atol=1e-14)


def test_verify_samples_follow_target_law_chi_square():
    """Many independent steps on one (p, q): the first emitted token is distributed as p."""
    V, k, N = 8, 2, 20_000
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(1, k + 1, V, dtype=torch.float64, generator=gen) * 1.5).expand(N, -1, -1)
    q = torch.softmax(torch.randn(1, k, V, dtype=torch.float64, generator=gen), -1).expand(N, -1, -1)
    tokens = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(N, k)
    uniforms = torch.rand(N, k, dtype=torch.float64, generator=gen)
    noise = torch.empty(N, k + 1, V, dtype=torch.float64).exponential_(generator=gen)
    for temperature, top_k, top_p in [(1.0, None, None), (0.7, 5, 0.9)]:
        _, out = verify(
            logits,
            q,
            tokens,
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            uniforms=uniforms,
            exponentials=noise,
            backend="reference",
        )
        p = warped_probs(logits[0, 0], temperature, top_k, top_p)
        counts = torch.bincount(out[:, 0], minlength=V).double()
        support = p > 0
        assert counts[~support].sum() == 0
        assert chisquare(counts[support].numpy(), (p[support] * N).numpy()).pvalue > 1e-3


def test_generate_first_token_law_chi_square(pairs):
    """End to end: 4000 sampled runs of one prompt; the first new token follows the target's law."""
    target, draft = pairs["llama-noisy"]
    prompt = torch.tensor([[5, 17, 33, 8]])
    N = 4000
    for temperature, top_k, top_p in [(1.5, None, None), (1.0, 6, 0.9)]:
        gen = torch.Generator().manual_seed(3)
        out = speculative_generate(
            target,
            draft,
            prompt.expand(N, -1),
            max_new_tokens=2,
            num_draft_tokens=2,
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=gen,
        )
        p = warped_probs(target(prompt).logits[0, -1], temperature, top_k, top_p).detach()
        counts = torch.bincount(out.sequences[:, prompt.shape[1]], minlength=p.numel()).double()
        support = p > 0
        assert counts[~support].sum() == 0
        assert chisquare(counts[support].numpy(), (p[support] * N / p[support].sum()).numpy()).pvalue > 1e-3
        assert 0 < out.stats.acceptance_rate < 1


# ------------------------------------------------------------------------------------ greedy
def test_generate_with_triton_backend_equals_reference(pairs):
    """The kernel inside the decoding loop: same tokens as the reference, greedy and sampled."""
    target, draft = pairs["llama-noisy"]
    ids, mask = _prompts(2, 4, 64, seed=8)
    for do_sample in (False, True):
        outs = [
            speculative_generate(
                target,
                draft,
                ids,
                attention_mask=mask,
                max_new_tokens=6,
                num_draft_tokens=2,
                do_sample=do_sample,
                temperature=0.9,
                top_k=20,
                generator=torch.Generator().manual_seed(1),
                backend=backend,
            ).sequences
            for backend in ("reference", "triton")
        ]
        assert torch.equal(outs[0], outs[1]), do_sample


@pytest.mark.parametrize("name", ["llama-noisy", "llama-small", "qwen2-noisy", "toy-trained"])
def test_greedy_equals_hf_generate(pairs, name):
    target, draft = pairs[name]
    vocab = target.config.vocab_size
    for k, prompt_len, seed in [(1, 1, 0), (3, 5, 1), (4, 11, 2)]:
        prompt = torch.randint(3, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
        ref = target.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
        # An EOS that occurs in the middle of the reference continuation ends it there.
        eos = ref[0, prompt_len + 9].item()
        ref_eos = target.generate(
            prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=eos
        )
        assert ref_eos.shape[1] < ref.shape[1]
        for eos_id, expected in ((None, ref), (eos, ref_eos)):
            out = speculative_generate(
                target,
                draft,
                prompt,
                max_new_tokens=24,
                num_draft_tokens=k,
                eos_token_id=eos_id,
                pad_token_id=0,
            )
            assert torch.equal(out.sequences, expected), (name, k, prompt_len, eos_id)
            stats = out.stats
            assert stats.target_calls == stats.steps and stats.draft_calls == k * stats.target_calls
            assert stats.new_tokens == expected.shape[1] - prompt_len


@pytest.mark.parametrize("strategy", ["eqspec", "exspec"])
@pytest.mark.parametrize("name", ["llama-noisy", "qwen2-noisy", "toy-trained"])
def test_batched_greedy_equals_each_sequence_alone(pairs, name, strategy):
    target, draft = pairs[name]
    ids, mask = _prompts(5, 9, target.config.vocab_size, seed=len(name))
    alone = []
    for row in range(ids.shape[0]):
        prompt = ids[row : row + 1, mask[row].bool()]
        alone.append(
            target.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, prompt.shape[1] :]
        )
    # The runs alone stop at the config's EOS; sequence 1 (at least) also stops at `extra`.
    extra = alone[1][6].item()
    config_eos = target.generation_config.eos_token_id
    eos = sorted({extra, *([config_eos] if isinstance(config_eos, int) else config_eos or [])})
    for group_size in [None] if strategy == "eqspec" else [None, 2]:
        out = speculative_generate(
            target,
            draft,
            ids,
            attention_mask=mask,
            max_new_tokens=20,
            num_draft_tokens=3,
            eos_token_id=eos,
            pad_token_id=0,
            strategy=strategy,
            group_size=group_size,
        )
        assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
        for row, continuation in enumerate(alone):
            hits = torch.isin(continuation, torch.tensor(eos)).nonzero()
            expected = continuation[: hits[0, 0] + 1] if hits.numel() else continuation
            got = out.sequences[row, ids.shape[1] :]
            assert torch.equal(got[: expected.numel()], expected), (name, strategy, row)
            assert (got[expected.numel() :] == 0).all()
        assert 0 < out.stats.acceptance_rate < 1 or name == "toy-trained"


def test_draft_equal_to_target_accepts_everything(pairs):
    target, _ = pairs["llama-noisy"]
    ids, mask = _prompts(3, 6, 64, seed=5)
    for strategy in ("eqspec", "exspec"):
        out = speculative_generate(
            target, target, ids, attention_mask=mask, max_new_tokens=13, num_draft_tokens=4, strategy=strategy
        )
        assert out.stats.acceptance_rate == 1.0 and out.stats.mean_accepted_length == 5.0
        assert out.stats.target_calls == 3  # ceil(13 / (k + 1)) steps, the whole batch each time


@pytest.mark.parametrize("strategy", ["eqspec", "exspec"])
def test_left_padded_batch_without_mask_equals_masked_call(pairs, strategy):
    """As ``generate`` does, the mask is inferred from a pad id that is not an EOS id (it was silently
    taken for prompt tokens); a pad id that is also an EOS id is ambiguous and raises."""
    target, draft = pairs["llama-noisy"]
    ids, mask = _prompts(4, 7, 64, seed=11)
    assert (mask == 0).any()
    kwargs = dict(max_new_tokens=9, num_draft_tokens=3, pad_token_id=0, eos_token_id=1, strategy=strategy)
    masked = speculative_generate(target, draft, ids, attention_mask=mask, **kwargs).sequences
    unmasked = speculative_generate(target, draft, ids, **kwargs).sequences
    assert torch.equal(unmasked, masked)
    # The pad id defaults to the target's generation config (0 here), as in generate.
    kwargs.pop("pad_token_id")
    assert torch.equal(speculative_generate(target, draft, ids, **kwargs).sequences, masked)
    with pytest.raises(ValueError, match="attention_mask"):  # pad id 0 is also an EOS id
        speculative_generate(target, draft, ids, **(kwargs | dict(pad_token_id=0, eos_token_id=[0, 1])))
    inner = ids.clone()
    inner[0, 3] = 0  # a pad id inside a prompt: not left padding
    with pytest.raises(ValueError, match="attention_mask"):
        speculative_generate(target, draft, inner, **kwargs)


# --------------------------------------------------------------------------------- bad input
def test_bad_input(pairs):
    target, draft = pairs["llama-noisy"]
    ids = torch.tensor([[5, 6, 7]])
    other_vocab = _tiny(LlamaForCausalLM, LlamaConfig, 16, 1, 80, seed=9)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, other_vocab, ids, max_new_tokens=3)
    with pytest.raises(ValueError, match="attention_mask"):
        speculative_generate(
            target, draft, ids, attention_mask=torch.ones(2, 3, dtype=torch.long), max_new_tokens=3
        )
    with pytest.raises(ValueError, match="attention_mask"):
        speculative_generate(target, draft, ids, attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=3)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        speculative_generate(target, draft, ids, max_new_tokens=3, num_draft_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(target, draft, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, draft, ids, max_new_tokens=3, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        speculative_generate(target, draft, ids, max_new_tokens=3, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="strategy"):
        speculative_generate(target, draft, ids, max_new_tokens=3, strategy="bsp")
    with pytest.raises(TypeError, match="draft"):
        speculative_generate(target, "draft", ids, max_new_tokens=3)
    with pytest.raises(TypeError, match="`target`"):
        speculative_generate("target", draft, ids, max_new_tokens=3)
    for pad in ("0", 1.0, -1, 10**6):  # checked before generating, not when the output is assembled
        with pytest.raises(ValueError, match="`pad_token_id`"):
            speculative_generate(target, draft, ids, max_new_tokens=3, pad_token_id=pad)
    with pytest.raises(ValueError, match="one device"):
        speculative_generate(target, copy.deepcopy(draft).to("meta"), ids, max_new_tokens=3)
    with pytest.raises(ValueError, match="input_ids"):
        speculative_generate(target, draft, ids.to("meta"), max_new_tokens=3)
    for bad in (64, -1):  # checked against both models' vocabularies before any forward
        with pytest.raises(ValueError, match=r"`input_ids`.*vocabulary"):
            speculative_generate(target, draft, torch.tensor([[5, bad, 7]]), max_new_tokens=3)

    logits, q, tokens, _, uniforms, noise = _verify_inputs(2, 3, 10, torch.float64, seed=0)
    with pytest.raises(ValueError, match="draft_tokens"):
        verify(logits, q, tokens[:1])
    with pytest.raises(ValueError, match="k\\+1"):
        verify(logits[:, :1], q[:, :0], tokens[:, :0])
    with pytest.raises(ValueError, match="draft_tokens"):
        verify(logits, q, tokens + 10)
    with pytest.raises(ValueError, match="uniforms"):
        verify(logits, q, tokens, do_sample=True)
    with pytest.raises(ValueError, match="exponentials"):
        verify(logits, q, tokens, do_sample=True, uniforms=uniforms, exponentials=noise[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        verify(logits, q, tokens, do_sample=True, temperature=-1.0, uniforms=uniforms, exponentials=noise)
    with pytest.raises(TypeError, match="target_logits"):
        verify(logits.numpy(), q, tokens)
    with pytest.raises(ValueError, match="one device"):
        verify(logits, q.to("meta"), tokens, do_sample=True, uniforms=uniforms, exponentials=noise)
