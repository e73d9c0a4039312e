"""chunked_loss (gradients computed during the forward pass) equals the reference path — materialised
logits and autograd — in float64 for every loss in LOSSES: value, every metric, and the gradient of every
hidden state, weight and bias, for chunk sizes that split tokens, group whole sequences, split sequences
(recompute) and hold everything; every loss's `token_loss` declaration is verified as a property of its
formula; upstream gradients scale the result; extra differentiable inputs get their gradient."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tokenlab.alignment import (
    LOSSES,
    Completions,
    LinearHead,
    LossOutput,
    SparseTokenMask,
    TokenLogps,
    chunked_loss,
    dpo_loss,
    fused_linear,
    grpo_loss,
    gtpo_loss,
    ipo_loss,
    loss_declaration,
    sequence_logratio,
    sparsepo_loss,
    tdpo_loss,
    token_loss,
    token_stats,
)
from tokenlab.alignment.fused_linear import _log_softmax_, _reference_record
from tokenlab.testing import assert_relative_error

B, T, H, V = 4, 7, 6, 19
TOL = 1e-12


class Batch:
    """Chosen and rejected completions (ragged, every row with ≥ 1 token) from one policy head with bias and
    one reference head, in float64."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float64):
        g = torch.Generator().manual_seed(seed)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

        self.weight = randn(V, H, scale=0.7).requires_grad_(True)
        self.bias = randn(V, scale=0.3).requires_grad_(True)
        self.ref_weight = self.weight.detach() + randn(V, H, scale=0.2)
        self.hidden = [randn(B, T, H).requires_grad_(True) for _ in range(2)]
        self.ref_hidden = [h.detach() + randn(B, T, H, scale=0.3) for h in self.hidden]
        self.labels = []
        for side in range(2):
            labels = torch.randint(0, V, (B, T), generator=g)
            for i in range(B):
                labels[i, : 1 + (i + side) % 3] = -100  # prompt positions
                labels[i, T - (i * 2 + side) % 4 :] = -100  # padding
            self.labels.append(labels)
        self.g = g

    def completions(self, side: int, reference: bool = True) -> Completions:
        ref = LinearHead(self.ref_hidden[side], self.ref_weight) if reference else None
        return Completions(LinearHead(self.hidden[side], self.weight, self.bias), self.labels[side], ref)

    def mask(self, side: int) -> torch.Tensor:
        return (self.labels[side] != -100).double()

    def rand(self, *shape, low=0.0, high=1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=self.g, dtype=torch.float64)

    def ref_logps(self, side: int) -> torch.Tensor:
        c = self.completions(side)
        return token_stats(c.reference, c.labels, backend="reference").logps


def _kwargs(name: str, b: Batch) -> tuple[int, dict]:
    """(number of input records, keyword arguments) of each loss on the batch."""
    tokens = (B, T)
    near_ref = b.ref_logps(0) + 0.2 * b.rand(*tokens, low=-1.0)
    return {
        "dpo": (2, dict(beta=0.3)),
        "ipo": (2, dict(beta=0.3)),
        "token_weighted_dpo": (
            2,
            dict(beta=0.3, chosen_weights=b.rand(*tokens), rejected_weights=b.rand(*tokens)),
        ),
        "tdpo": (2, dict(beta=0.3, alpha=0.7)),
        "cdpo": (
            2,
            dict(positive_logps=-b.rand(*tokens, high=3.0), negative_logps=-b.rand(*tokens, high=3.0)),
        ),
        "sparsepo": (
            2,
            dict(
                chosen_reward_mask=b.rand(*tokens),
                rejected_reward_mask=b.rand(*tokens),
                chosen_kl_mask=b.rand(*tokens),
                rejected_kl_mask=b.rand(*tokens),
            ),
        ),
        "treg": (
            2,
            dict(
                alpha=0.5,
                chosen_token_rewards=b.rand(*tokens, low=-1.0),
                rejected_token_rewards=b.rand(*tokens, low=-1.0),
            ),
        ),
        "kto": (  # with class weights, which TRL's fused path dropped (TRL#7063)
            1,
            dict(
                desirable=torch.tensor([1, 0, 1, 0]),
                kl_logratios=b.rand(3, low=0.1, high=2.0),
                desirable_weight=1.3,
                undesirable_weight=0.7,
            ),
        ),
        "bco": (1, dict(desirable=torch.tensor([1, 1, 0, 0]), reward_shift=0.05, weights=b.rand(B))),
        "grpo": (1, dict(advantages=b.rand(B, low=-1.0), old_logps=near_ref, beta=0.04, epsilon_low=0.1)),
        "gtpo": (
            1,
            dict(
                advantages=torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=torch.float64),
                completion_ids=b.labels[0].clamp(min=0) % 3,
                group_size=2,
                entropy_threshold=2.7,
            ),
        ),
        "icepop": (1, dict(advantages=b.rand(B, low=-1.0), inference_logps=near_ref, alpha=0.85, beta=1.2)),
    }[name]


def _undeclared(name, *records, **kwargs):
    return LOSSES[name](*records, **kwargs)


def _run(loss_fn, b: Batch, sides: int, kwargs: dict, **options):
    out = chunked_loss(loss_fn, *(b.completions(s) for s in range(sides)), **options, **kwargs)
    params = [*b.hidden[:sides], b.weight, b.bias]
    return out, torch.autograd.grad(out.loss, params)


def test_every_loss_has_a_case():
    assert set(LOSSES) == set(CASES)


CASES = sorted(LOSSES)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("chunk_size", [3, 8, 1000, "undeclared"])
def test_chunked_loss_equals_reference_float64(name, chunk_size):
    b = Batch()
    sides, kwargs = _kwargs(name, b)
    loss_fn = LOSSES[name]
    if chunk_size == "undeclared":  # not a sum over tokens or sequences: the whole batch is one group
        needs = loss_declaration(loss_fn).needs
        loss_fn, chunk_size = token_loss(sum_over=None, needs=needs)(functools.partial(_undeclared, name)), 5
    want, want_grads = _run(loss_fn, b, sides, kwargs, backend="reference")
    got, got_grads = _run(loss_fn, b, sides, kwargs, chunk_size=chunk_size)
    assert abs(got.loss.item() - want.loss.item()) <= TOL * max(1.0, abs(want.loss.item()))
    assert set(got.metrics) == set(want.metrics)
    for key, value in want.metrics.items():
        torch.testing.assert_close(got.metrics[key], value, rtol=TOL, atol=TOL, equal_nan=True, msg=key)
    for g, w in zip(got_grads, want_grads):
        assert_relative_error(g, w, TOL, f"{name} gradient")


def _perturbed(tokens: TokenLogps, keep: torch.Tensor, g: torch.Generator) -> TokenLogps:
    """The same record with every per-token quantity changed outside ``keep`` (bool [B, T]); entropies rise
    by 3 to 6 nats, enough to cross any entropy threshold in the cases."""

    def move(x, shift):
        return (
            None
            if x is None
            else torch.where(keep, x, x + shift(torch.rand(x.shape, generator=g, dtype=x.dtype)))
        )

    return TokenLogps(
        move(tokens.logps, torch.neg),
        tokens.mask,
        tokens.ref_logps,
        move(tokens.kl, torch.neg),
        move(tokens.entropy, lambda r: 3 + 3 * r),
    )


@pytest.mark.parametrize("name", CASES)
def test_declarations_hold(name):
    """`sum_over="tokens"`: a token's gradient ignores every other token's quantities; `"sequences"`: a
    sequence's gradient ignores the other sequences'. (chunked_loss is exact only if the claim holds.)"""
    b = Batch(1)
    sides, kwargs = _kwargs(name, b)
    declared = loss_declaration(LOSSES[name])
    assert declared.sum_over in ("tokens", "sequences")
    records = []
    for s in range(sides):
        c = b.completions(s)
        stats = token_stats(c.head, c.labels, reference=c.reference, entropy=True, backend="reference")
        records.append(
            TokenLogps(
                *(x.detach() for x in (stats.logps, b.mask(s), b.ref_logps(s), stats.kl, stats.entropy))
            )
        )
    keep = torch.zeros(B, T, dtype=torch.bool)
    if declared.sum_over == "tokens":
        keep.view(-1)[::3] = True
    else:
        keep[1] = True

    def grads(recs):
        leaves = [r.logps.clone().requires_grad_(True) for r in recs]
        recs = [TokenLogps(x, r.mask, r.ref_logps, r.kl, r.entropy) for x, r in zip(leaves, recs)]
        return torch.autograd.grad(LOSSES[name](*recs, **kwargs).loss, leaves)

    base = grads(records)
    moved = grads([_perturbed(r, keep, b.g) for r in records])
    for x, y in zip(base, moved):
        assert torch.allclose(x[keep], y[keep], rtol=1e-13, atol=1e-15), declared
        assert (x[keep] != 0).any()


def test_upstream_gradient_scales_and_extra_inputs_get_gradients():
    b = Batch(2)
    torch.manual_seed(0)
    masks = SparseTokenMask(H, independent=True).double()
    torch.nn.init.normal_(masks.proj.weight)

    def run(backend):
        reward, kl = masks(b.hidden[0])
        out = chunked_loss(
            sparsepo_loss,
            b.completions(0),
            b.completions(1),
            backend=backend,
            chunk_size=4,
            chosen_reward_mask=reward,
            rejected_reward_mask=reward,
            chosen_kl_mask=kl,
            rejected_kl_mask=kl,
        )
        params = [*b.hidden, b.weight, b.bias, *masks.parameters()]
        return torch.autograd.grad(3.0 * out.loss, params)

    for g, w in zip(run("chunked"), run("reference")):
        assert_relative_error(g, w, TOL, "gradient")


def test_precomputed_ref_logps_and_frozen_head():
    b = Batch(3)
    chosen, rejected = b.completions(0, reference=False), b.completions(1, reference=False)
    chosen.ref_logps, rejected.ref_logps = b.ref_logps(0), b.ref_logps(1)
    weight = b.weight.detach()
    frozen = [
        Completions(LinearHead(c.head.hidden, weight), c.labels, ref_logps=c.ref_logps)
        for c in (chosen, rejected)
    ]
    want = chunked_loss(dpo_loss, *frozen, beta=0.2, backend="reference").loss
    got = chunked_loss(dpo_loss, *frozen, beta=0.2, chunk_size=6).loss
    assert abs(got.item() - want.item()) <= TOL
    for g, w in zip(torch.autograd.grad(got, b.hidden), torch.autograd.grad(want, b.hidden)):
        assert_relative_error(g, w, TOL, "hidden gradient with a frozen head")


def test_bias_gradient_keeps_float64_without_weight_gradient():
    """The bias gradient accumulates in promote_types(bias.dtype, float32): float64 stays float64 even when
    the weight is frozen (it used to fall back to float32)."""
    b = Batch(4)
    head = LinearHead(b.hidden[0], b.weight.detach(), b.bias)
    labels = b.labels[0]
    want = torch.autograd.grad(token_stats(head, labels, backend="reference").logps.sum(), b.bias)[0]
    got = torch.autograd.grad(token_stats(head, labels, chunk_size=5).logps.sum(), b.bias)[0]
    assert got.dtype == torch.float64
    assert_relative_error(got, want, 1e-14, "bias gradient")
    c, advantages = Completions(head, labels, ref_logps=b.ref_logps(0)), b.rand(B)
    (want,) = torch.autograd.grad(
        chunked_loss(grpo_loss, c, backend="reference", advantages=advantages).loss, b.bias
    )
    (got,) = torch.autograd.grad(chunked_loss(grpo_loss, c, chunk_size=5, advantages=advantages).loss, b.bias)
    assert got.dtype == torch.float64
    assert_relative_error(got, want, 1e-14, "bias gradient of chunked_loss")


def test_autocast_bfloat16_close_to_reference_under_autocast():
    b = Batch(5, dtype=torch.float32)
    kwargs = dict(
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
        completion_ids=b.labels[0].clamp(min=0) % 3,
        group_size=2,
        entropy_threshold=5.0,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _run(gtpo_loss, b, 1, kwargs, backend="reference")
        got, got_grads = _run(gtpo_loss, b, 1, kwargs, chunk_size=5)
    assert got.loss.dtype == torch.float32
    assert abs(got.loss.item() - want.loss.item()) <= 1e-2 * abs(want.loss.item())
    for g, w in zip(got_grads, want_grads):
        assert_relative_error(g, w, 3e-2, "gradient under autocast")


def test_bad_inputs_raise_clear_errors():
    b = Batch(6)
    chosen, rejected = b.completions(0), b.completions(1)
    with pytest.raises(TypeError, match="Completions"):
        chunked_loss(dpo_loss, chosen, "rejected")
    with pytest.raises(ValueError, match="LM head"):
        other = Completions(LinearHead(b.hidden[1], b.weight.detach().clone(), b.bias), b.labels[1])
        chunked_loss(dpo_loss, chosen, other)
    with pytest.raises(ValueError, match="reference"):
        chunked_loss(tdpo_loss, b.completions(0, reference=False), b.completions(1, reference=False))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_loss(dpo_loss, chosen, rejected, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        chunked_loss(dpo_loss, chosen, rejected, backend="fast")
    with pytest.raises(ValueError, match="no completion token"):
        empty = b.labels[0].clone()
        empty[2] = -100
        chunked_loss(dpo_loss, Completions(chosen.head, empty, chosen.reference), rejected)
    with pytest.raises(TypeError, match="LossOutput"):
        chunked_loss(lambda c, r: c.logps.sum(), chosen, rejected)
    with pytest.raises(ValueError, match="needs"):
        token_loss(sum_over="tokens", needs=("logits",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_log_softmax_is_bitwise_equal(dtype):
    z = torch.randn(33, 1000, generator=torch.Generator().manual_seed(7), dtype=dtype) * 5
    want = torch.log_softmax(z, -1)
    got = _log_softmax_(z)
    assert got.data_ptr() == z.data_ptr() and torch.equal(got, want)


def test_compiled_kernels_trace_and_stay_exact(monkeypatch):
    """`compile=True` runs the per-chunk formulas under torch.compile. The suite traces them with the
    "eager" backend (Dynamo capture, the compile-time branches of the kernels); Inductor's code generation
    takes minutes on CPU and is measured by benchmarks/losses.py (candidate `compiled`) instead."""
    monkeypatch.setattr(
        fused_linear, "_compiled", lambda fn: torch.compile(fn, backend="eager", dynamic=True)
    )
    b = Batch(8)
    for name in ("tdpo", "gtpo"):
        sides, kwargs = _kwargs(name, b)
        want, want_grads = _run(LOSSES[name], b, sides, kwargs, backend="reference")
        got, got_grads = _run(LOSSES[name], b, sides, kwargs, chunk_size=8, compile=True)
        assert abs(got.loss.item() - want.loss.item()) <= TOL
        for g, w in zip(got_grads, want_grads):
            assert_relative_error(g, w, TOL, f"{name} gradient, compiled")


# TRL#7063 lists restrictions of TRL's Liger-based fused path that exist because the loss math was written a
# second time for it. chunked_loss runs the loss function itself, so none of these arise; each test below
# runs one of them on the chunked path and compares it with the reference path and, where TRL has the
# option, with TRL's own loss code (tokenlab.testing.trl).


@token_loss(sum_over="sequences")
def _dpo_plus_ipo(chosen: TokenLogps, rejected: TokenLogps, *, beta: float) -> LossOutput:
    """Two loss types at once (TRL's fused path allowed a single `loss_type`)."""
    dpo, ipo = dpo_loss(chosen, rejected, beta=beta), ipo_loss(chosen, rejected, beta=beta)
    return LossOutput(dpo.loss + 0.5 * ipo.loss, dpo.metrics)


@token_loss(sum_over="sequences")
def _js_dpo(chosen: TokenLogps, rejected: TokenLogps, *, beta: float) -> LossOutput:
    """f-DPO with the Jensen–Shannon divergence: f'(t) = log 2 + log σ(log t) on each log-ratio."""
    score = [math.log(2) + F.logsigmoid(sequence_logratio(t)) for t in (chosen, rejected)]
    return LossOutput(-F.logsigmoid(beta * (score[0] - score[1])).mean())


@token_loss(sum_over="sequences")
def _robust_dpo(
    chosen: TokenLogps, rejected: TokenLogps, *, beta: float, label_smoothing: float
) -> LossOutput:
    """Robust DPO: labels flipped with probability ε, ((1 − ε) ℓ(u) − ε ℓ(−u)) / (1 − 2ε), ℓ = −log σ."""
    u = beta * (sequence_logratio(chosen) - sequence_logratio(rejected))
    eps = label_smoothing
    return LossOutput(((-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)).mean())


@token_loss(sum_over="sequences", needs=("entropy",))
def _grpo_with_entropy_bonus(tokens: TokenLogps, advantages: Tensor, *, coef: float, **kwargs) -> LossOutput:
    """GRPO minus ``coef`` × the mean entropy of the completion tokens (TRL's `entropy_coef`)."""
    out = grpo_loss(tokens, advantages, **kwargs)
    bonus = (tokens.entropy * tokens.mask).sum() / tokens.mask.sum()
    return LossOutput(out.loss - coef * bonus, out.metrics)


def _chunked_vs_reference(loss_fn, b: Batch, sides: int, chunk_sizes=(3, 8, 1000), **kwargs):
    """The reference result and its gradients, after asserting every chunk size gives the same."""
    want, want_grads = _run(loss_fn, b, sides, kwargs, backend="reference")
    for chunk_size in chunk_sizes:
        got, got_grads = _run(loss_fn, b, sides, kwargs, chunk_size=chunk_size)
        assert abs(got.loss.item() - want.loss.item()) <= TOL * max(1.0, abs(want.loss.item()))
        for g, w in zip(got_grads, want_grads):
            assert_relative_error(g, w, TOL, f"gradient at chunk_size={chunk_size}")
    return want, want_grads


def test_restriction_single_loss_type_absent():
    b = Batch(9)
    want, _ = _chunked_vs_reference(_dpo_plus_ipo, b, 2, beta=0.3)
    records = [_reference_record(b.completions(s), False, False) for s in range(2)]
    direct = dpo_loss(*records, beta=0.3).loss + 0.5 * ipo_loss(*records, beta=0.3).loss
    assert abs(want.loss.item() - direct.item()) <= TOL


def _trl_value_and_grads(b: Batch, **trl_options):
    """TRL's DPOTrainer loss code on the reference path's per-token log-probs, and its gradients."""
    from tokenlab.testing.trl import trl_dpo_loss

    records = [_reference_record(b.completions(s), False, False) for s in range(2)]
    value = trl_dpo_loss(*records, **trl_options)
    return value, torch.autograd.grad(value, [*b.hidden, b.weight, b.bias])


@pytest.mark.parametrize(
    "loss_fn,trl_options",
    [
        (_js_dpo, dict(f_divergence_type="js_divergence")),
        (functools.partial(_robust_dpo, label_smoothing=0.2), dict(loss_type="robust", label_smoothing=0.2)),
    ],
    ids=["f_divergence", "label_smoothing"],
)
def test_restriction_f_divergence_and_label_smoothing_absent(loss_fn, trl_options):
    pytest.importorskip("trl")
    b = Batch(10)
    want, want_grads = _chunked_vs_reference(loss_fn, b, 2, beta=0.3)
    trl_value, trl_grads = _trl_value_and_grads(b, beta=0.3, **trl_options)
    assert abs(want.loss.item() - trl_value.item()) <= TOL
    for g, w in zip(want_grads, trl_grads):
        assert_relative_error(g, w, TOL, "gradient vs TRL")


def test_restriction_chunk_size_broadcasting_absent():
    """Chunks holding one, two or all four pairs (Liger's `chunk_size > 1` broadcast was wrong)."""
    b = Batch(11)
    _chunked_vs_reference(dpo_loss, b, 2, chunk_sizes=(5, 14, 1000), beta=0.3)


def test_restriction_entropy_bonus_absent():
    pytest.importorskip("trl")
    from tokenlab.testing.trl import trl_grpo_loss

    b = Batch(12)
    kwargs = dict(advantages=b.rand(B, low=-1.0), beta=0.0, normalization="sequence")
    want, want_grads = _chunked_vs_reference(_grpo_with_entropy_bonus, b, 1, coef=0.05, **kwargs)
    c = b.completions(0)
    stats = token_stats(c.head, c.labels, entropy=True, backend="reference")
    tokens = TokenLogps(stats.logps, b.mask(0), entropy=stats.entropy)
    value = trl_grpo_loss(tokens, kwargs["advantages"], old_logps=stats.logps.detach(), beta=0.0,
                          entropy=stats.entropy, entropy_coef=0.05)  # fmt: skip
    assert abs(want.loss.item() - value.item()) <= TOL
    for g, w in zip(want_grads, torch.autograd.grad(value, [b.hidden[0], b.weight, b.bias])):
        assert_relative_error(g, w, TOL, "gradient vs TRL's entropy bonus")


def test_lora_adapter_on_the_lm_head():
    """A LoRA adapter on the LM head (which TRL's fused DPO could not train, TRL PR #7243) gets the gradients
    of the model's own logits: chunked_loss through `completions` equals DPO from `model(ids).logits`, with
    the reference scored by the same model with its adapters disabled."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokenlab.alignment import completions

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    model = peft.get_peft_model(LlamaForCausalLM(config).double(), lora)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (4, 9), generator=g)
    mask = torch.zeros_like(ids)
    mask[:, 4:] = 1
    mask[3, 7:] = 0
    params = [p for p in model.parameters() if p.requires_grad]
    assert any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)

    def ref_model_logps(model_logits):
        logp = torch.log_softmax(model_logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return logp * mask[:, 1:]

    with torch.no_grad(), model.disable_adapter():
        ref_logps = ref_model_logps(model(ids).logits)
        scored_ref = completions(model, ids, mask)
    scored = completions(model, ids, mask)
    scored = Completions(scored.head, scored.labels, reference=scored_ref.head)
    got = chunked_loss(
        dpo_loss, scored.select(slice(0, 2)), scored.select(slice(2, 4)), beta=0.5, chunk_size=5
    )
    logps = ref_model_logps(model(ids).logits)
    margin = 0.5 * ((logps - ref_logps)[:2].sum(-1) - (logps - ref_logps)[2:].sum(-1))
    want = -F.logsigmoid(margin).mean()
    assert abs(got.loss.item() - want.item()) <= TOL
    for a, w in zip(torch.autograd.grad(got.loss, params), torch.autograd.grad(want, params)):
        assert_relative_error(a, w, 1e-11, "LoRA gradient")
