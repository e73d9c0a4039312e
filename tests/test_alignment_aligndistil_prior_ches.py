"""Second-wave alignment pieces: PRIOR's token-weighted next-token loss (uniform weights give cross-entropy;
the paper's weights from a hand computation), the CHES diagnostic of *Unintentional Unalignment* (the
definition on synthetic states; on an HF model against the authors' per-example slicing; ranking and the
paper's filtering rule) and AlignDistil (the teacher's logit extrapolation, its fixed-weight cases, the
RLHF ↔ distillation identity of the paper's Theorem 1, chunked = reference). Each loss trains the toy target
a few steps. (chunked = reference in float64 at four chunk sizes and the declarations are checked for every
loss of LOSSES in test_alignment_fused.py.)"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from tokenlab.alignment import (
    AlignDistilTeacher,
    Completions,
    LinearHead,
    TokenLogps,
    aligndistil_loss,
    ches_filter,
    ches_scores,
    chunked_loss,
    completions,
    preference_ches,
    prior_loss,
    prior_weights,
)
from tokenlab.alignment.fused_linear import VOCAB_SLICE
from tokenlab.testing import assert_relative_error
from tokenlab.tour.preference import shuffled_continuation_pairs

B, T, H, V = 3, 7, 5, 13


def _records(seed: int = 0) -> TokenLogps:
    g = torch.Generator().manual_seed(seed)
    logps = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)[..., 0]
    ref_logps = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)[..., 0]
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, :2] = mask[2, 5:] = 0
    return TokenLogps(logps.requires_grad_(True), mask, ref_logps=ref_logps)


# ---------------------------------------------------------------------------------------------------------
# PRIOR


def test_prior_with_uniform_weights_is_cross_entropy():
    tokens = _records()
    ce = -(tokens.logps * tokens.mask).sum() / tokens.mask.sum()
    assert torch.allclose(prior_loss(tokens, alpha=0.0).loss, ce, rtol=1e-15, atol=0)
    same = TokenLogps(tokens.logps, tokens.mask, ref_logps=torch.full_like(tokens.logps, math.log(0.3)))
    assert torch.allclose(prior_loss(same).loss, ce, rtol=1e-14, atol=0)  # the reference equally sure
    assert torch.allclose(prior_loss(tokens).metrics["nll"], ce.detach(), rtol=1e-15, atol=0)


def test_prior_weights_are_the_papers():
    tokens = _records(1)
    got = prior_weights(tokens.ref_logps, tokens.mask, alpha=2.0)
    for i in range(B):
        idx = [t for t in range(T) if tokens.mask[i, t]]
        w = [(1 - math.exp(tokens.ref_logps[i, t].item())) ** 2 for t in idx]
        for t, wt in zip(idx, w):
            assert got[i, t].item() == pytest.approx(len(idx) * wt / sum(w), rel=1e-13)
        assert got[i][tokens.mask[i] == 0].abs().sum() == 0
    loss = prior_loss(tokens, alpha=2.0).loss
    assert loss.item() == pytest.approx((-(got * tokens.logps).sum() / tokens.mask.sum()).item(), rel=1e-14)
    (grad,) = torch.autograd.grad(loss, tokens.logps)
    assert torch.allclose(grad, -got / tokens.mask.sum(), rtol=1e-14, atol=0)  # weights carry no gradient


def test_prior_bad_input():
    tokens = _records()
    with pytest.raises(ValueError, match="alpha"):
        prior_loss(tokens, alpha=-1.0)
    with pytest.raises(ValueError, match="ref_logps"):
        prior_loss(TokenLogps(tokens.logps, tokens.mask))
    ref, mask = tokens.ref_logps, tokens.mask
    with pytest.raises(TypeError, match="`ref_logps`"):
        prior_weights(ref.tolist(), mask)
    with pytest.raises(ValueError, match="`ref_logps`"):  # was silently weight 0
        prior_weights(ref.masked_fill(mask == 0, math.nan), mask)
    with pytest.raises(ValueError, match="`mask`"):
        prior_weights(ref, 2 * mask)


# ---------------------------------------------------------------------------------------------------------
# CHES


def test_ches_on_synthetic_states_equals_the_definition():
    g = torch.Generator().manual_seed(0)
    hp = torch.randn(B, 6, H, generator=g, dtype=torch.float64)
    hm = torch.randn(B, 4, H, generator=g, dtype=torch.float64)
    mp, mm = torch.zeros(B, 6), torch.zeros(B, 4)
    mp[0, 1:5] = mp[1, 2:] = mp[2, :1] = 1
    mm[0, 2:] = mm[1, :3] = mm[2, 1:3] = 1
    for normalize in (False, True):
        got = ches_scores(hp, mp, hm, mm, length_normalize=normalize)
        for i in range(B):
            sp = sum(hp[i, t] for t in range(6) if mp[i, t])
            sm = sum(hm[i, t] for t in range(4) if mm[i, t])
            if normalize:
                sp, sm = sp / mp[i].sum(), sm / mm[i].sum()
            want = sum(sp[k] * sm[k] for k in range(H)) - sum(sp[k] ** 2 for k in range(H))
            assert got[i].item() == pytest.approx(want.item(), rel=1e-12)
    same = ches_scores(hp, mp, hp, mp)
    assert same.abs().max() < 1e-10  # identical completions: CHES = ⟨S, S⟩ − ‖S‖² = 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ches_of_half_precision_states_is_computed_in_float32(dtype):
    """Half-precision hidden states (as a bf16/fp16 model returns them) are summed and multiplied in float32:
    in float16 the squared sums overflowed to NaN, in bfloat16 the score was off by ~2%."""
    g = torch.Generator().manual_seed(0)
    base = 3 * torch.randn(B, 1, 64, generator=g, dtype=torch.float64)
    hp = (base + 0.3 * torch.randn(B, 50, 64, generator=g, dtype=torch.float64)).to(dtype)
    hm = (base + 0.3 * torch.randn(B, 40, 64, generator=g, dtype=torch.float64)).to(dtype)
    mp, mm = torch.ones(B, 50), torch.ones(B, 40)
    mp[0, :7] = mm[1, 30:] = 0
    for normalize in (False, True):
        got = ches_scores(hp, mp, hm, mm, length_normalize=normalize)
        want = ches_scores(hp.double(), mp, hm.double(), mm, length_normalize=normalize)
        assert got.dtype == torch.float32
        assert_relative_error(got.double(), want, 1e-4, "half-precision CHES vs float64")


def test_ches_bad_input():
    h, m = torch.randn(2, 3, 4), torch.ones(2, 3)
    with pytest.raises(ValueError, match="`chosen_mask`"):
        ches_scores(h, torch.ones(2, 4), h, m)
    with pytest.raises(ValueError, match="`rejected_mask`"):
        ches_scores(h, m, h, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`rejected_mask`"):
        ches_scores(h, m, h, torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="same number of pairs"):
        ches_scores(h, m, h[:1], m[:1])
    with pytest.raises(ValueError, match="keep_fraction"):
        ches_filter(torch.zeros(3), 0.0)


def test_ches_filter_keeps_the_lowest_scores():
    scores = torch.tensor([0.5, -2.0, 3.0, -1.0, 0.0])
    assert ches_filter(scores, 0.4).tolist() == [1, 3]
    assert ches_filter(scores, 0.01).tolist() == [1]
    assert len(ches_filter(torch.randn(380), 0.05)) == 19  # the paper's SORRY-Bench filtering: 19 of 380


def _authors_ches(model, prompt_ids, chosen_ids, rejected_ids, normalize):
    """The authors' reference slicing (ches/ches.py): per example, unpadded, the last hidden states from the
    last prompt position up to (excluding) the last position."""

    def states(ids):
        out = model(input_ids=torch.tensor([prompt_ids + ids]), output_hidden_states=True)
        return out.hidden_states[-1][0, len(prompt_ids) - 1 : -1].double()

    sp, sm = states(chosen_ids).sum(0), states(rejected_ids).sum(0)
    if normalize:
        sp, sm = sp / len(chosen_ids), sm / len(rejected_ids)
    return (sp @ sm - sp @ sp).item()


def test_preference_ches_on_an_hf_model_ranks_and_filters(tiny_world):
    model, tok = tiny_world.target, tiny_world.tokenizer
    prompts = ["def add(a, b):\n", "import os\n", "class Point:\n", "for i in range(3):\n"]
    chosen = ["    return a + b\n", "import sys\n", "    def __init__(self):\n", "    print(i)\n"]
    rejected = ["    return a + b \n", "sys sys os", "    def __init__(self, x):\n", " in in in in in"]
    scores = {}
    for normalize in (False, True):
        scores[normalize] = preference_ches(
            model, tok, prompts, chosen, rejected, length_normalize=normalize, batch_size=3
        )
        for i in range(len(prompts)):
            ids = [tok(t, add_special_tokens=False).input_ids for t in (prompts[i], chosen[i], rejected[i])]
            want = _authors_ches(model, *ids, normalize)
            assert scores[normalize][i].item() == pytest.approx(want, rel=2e-4, abs=1e-3)
    identical = preference_ches(model, tok, prompts, chosen, chosen)
    assert identical.abs().max() < 1e-3 * scores[True].abs().max()
    order = scores[False].argsort(descending=True)  # most similar first (Section 5 ranks by CHES)
    print("CHES", [round(x, 2) for x in scores[False].tolist()], "ranking", order.tolist())
    assert set(order[:2].tolist()) == {0, 2}  # the near-duplicate pairs look most alike to the model
    kept = ches_filter(scores[True], 0.5)  # Section 6 filters by LN-CHES, keeping the lowest
    assert kept.tolist() == scores[True].argsort()[:2].tolist()


def test_preference_ches_reads_only_hidden_states(tiny_world):
    """CHES needs the last hidden states, not the logits: a model that post-processes its logits (final
    soft-capping, as Gemma 2) is scored, not refused as the chunked losses refuse it."""
    model = copy.deepcopy(tiny_world.target)
    args = (tiny_world.tokenizer, ["def add(a, b):\n"], ["    return a + b\n"], ["    return a - b\n"])
    want = preference_ches(model, *args)
    model.config.final_logit_softcapping = 30.0  # ignored by this architecture: the scores stay the same
    assert torch.equal(preference_ches(model, *args), want)


# ---------------------------------------------------------------------------------------------------------
# AlignDistil


def _logits(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, V, generator=g, dtype=torch.float64) * 2 for _ in range(3)]


def test_aligndistil_teacher_formulas():
    z_dpo, z_neg, _ = _logits(6, 0)
    for contrastive, step in ((False, 0.7), (True, 1.7)):  # z_neg + step (z_dpo − z_neg)
        log_t, w = AlignDistilTeacher(weight=0.7, contrastive=contrastive)([z_dpo.clone(), z_neg.clone()])
        assert torch.allclose(log_t, torch.log_softmax(step * z_dpo + (1 - step) * z_neg, -1), atol=1e-14)
        assert (w == 0.7).all()
    log_t, w = AlignDistilTeacher(scale=3.0, eps=0.01)([z_dpo.clone(), z_neg.clone()])
    p, q = torch.softmax(z_dpo, -1), torch.softmax(z_neg, -1)
    for i in range(6):
        wi = 3.0 * sum(abs(p[i, v] - q[i, v]) for v in range(V)) + 0.01
        assert w[i].item() == pytest.approx(wi.item(), rel=1e-13)
        want = torch.log_softmax(z_dpo[i] + wi * (z_dpo[i] - z_neg[i]), -1)
        assert torch.allclose(log_t[i], want, atol=1e-13)


@pytest.mark.parametrize("contrastive", [False, True])
def test_aligndistil_theorem1_rlhf_objective_is_distillation(contrastive):
    """Per token, β KL(π_θ ‖ π*) = β KL(π_θ ‖ π_anchor) − β₀ E_{π_θ}[r] + β log Z (the paper's Theorem 1) with
    w = β₀/β: reward r = log π_dpo/π_ref and anchor π_ref (plain), or r = log π_dpo/π_rdpo and anchor π_dpo
    (contrastive, the authors' teacher). The constant β log Z does not depend on the policy."""
    beta0, beta = 0.1, 0.25
    z_dpo, z_neg, _ = _logits(5, 1)
    log_t, _ = AlignDistilTeacher(weight=beta0 / beta, contrastive=contrastive)(
        [z_dpo.clone(), z_neg.clone()]
    )
    lp_dpo, lp_neg = torch.log_softmax(z_dpo, -1), torch.log_softmax(z_neg, -1)
    anchor = lp_dpo if contrastive else lp_neg
    constants = []
    for seed in (2, 3):
        log_p = torch.log_softmax(_logits(5, seed)[2], -1)
        p = log_p.exp()
        distill = beta * (p * (log_p - log_t)).sum(-1)
        rlhf = beta * (p * (log_p - anchor)).sum(-1) - beta0 * (p * (lp_dpo - lp_neg)).sum(-1)
        constants.append(distill - rlhf)
    w = beta0 / beta
    log_z = torch.logsumexp(anchor + w * (lp_dpo - lp_neg), -1)
    for c in constants:
        assert torch.allclose(c, beta * log_z, rtol=1e-12, atol=1e-14)


def _teacher_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_(True)
    teachers = tuple(
        LinearHead(hidden.detach() + 0.3 * torch.randn(B, T, H, generator=g, dtype=torch.float64), w)
        for w in (
            weight.detach() + 0.4 * torch.randn(V, H, generator=g, dtype=torch.float64) for _ in range(2)
        )
    )
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = labels[2, 5:] = -100
    return Completions(LinearHead(hidden, weight), labels, teachers=teachers), hidden, weight


def test_aligndistil_with_weight_one_is_distillation_from_the_dpo_model():
    """w = 1 in Theorem 1 (β = β₀): the teacher is the DPO model itself and the loss is
    β₀ · mean_b Σ_t KL(π_θ ‖ π_dpo) / |y| — checked against torch.distributions, value and gradients, on the
    chunked path with sequences split across chunks."""
    c, hidden, weight = _teacher_batch()
    out = chunked_loss(
        aligndistil_loss, c, teacher=AlignDistilTeacher(weight=1.0, contrastive=False), beta=0.2, chunk_size=3
    )
    policy = Categorical(logits=hidden @ weight.T)
    dpo = Categorical(logits=(c.teachers[0].hidden @ c.teachers[0].weight.T))
    mask = (c.labels != -100).double()
    want = (0.2 * (kl_divergence(policy, dpo) * mask).sum(-1) / mask.sum(-1)).mean()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-13)
    for g_got, g_want in zip(
        torch.autograd.grad(out.loss, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))
    ):
        assert_relative_error(g_got, g_want, 1e-12, "gradient")
    assert out.metrics["teacher_weight"].item() == 1.0


def test_aligndistil_bad_input():
    c, _, _ = _teacher_batch()
    with pytest.raises(ValueError, match="teacher"):
        chunked_loss(aligndistil_loss, c)  # no teacher composition
    with pytest.raises(ValueError, match="teacher"):
        chunked_loss(aligndistil_loss, Completions(c.head, c.labels), teacher=AlignDistilTeacher())
    with pytest.raises(ValueError, match="2 teacher heads"):
        one = Completions(c.head, c.labels, teachers=c.teachers[:1])
        chunked_loss(aligndistil_loss, one, teacher=AlignDistilTeacher())
    with pytest.raises(ValueError, match="teachers"):
        bad = LinearHead(c.teachers[0].hidden[:, :3], c.teachers[0].weight)
        chunked_loss(aligndistil_loss, Completions(c.head, c.labels, teachers=(bad, bad)), teacher=len)
    with pytest.raises(ValueError, match="does not need"):
        chunked_loss(prior_loss, Completions(c.head, c.labels, ref_logps=c.labels * 0.0), teacher=len)
    for kwargs in (dict(weight=0.0), dict(scale=-1.0), dict(eps=0.0)):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            AlignDistilTeacher(**kwargs)
    with pytest.raises(ValueError, match="teacher_kl"):
        aligndistil_loss(TokenLogps(c.head.hidden[..., 0], torch.ones(B, T)))


# ---------------------------------------------------------------------------------------------------------
# Training the toy target


def _noisy_copy(model, scale: float, seed: int):
    copy_ = copy.deepcopy(model).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for p in copy_.parameters():
        p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return copy_


@pytest.mark.parametrize("loss", ["prior", "aligndistil"])
def test_each_loss_trains_the_toy_target(tiny_world, loss):
    torch.manual_seed(0)
    target = tiny_world.target
    pairs = shuffled_continuation_pairs(tiny_world.train_ids, 8, prompt_len=16, completion_len=12, seed=0)
    batch = pairs.batch(torch.arange(8))
    ids, mask = batch.chosen_ids, batch.completion_mask
    policy = copy.deepcopy(target).train().requires_grad_(True)
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3 if loss == "prior" else 1e-3)
    if loss == "prior":  # the reference: a copy of the target that knows less
        models, options = dict(reference_model=_noisy_copy(target, 0.3, 1)), dict(alpha=1.0)
    else:  # stand-ins for the DPO and the reverse DPO model
        models = dict(teacher_models=(_noisy_copy(target, 0.2, 2), _noisy_copy(target, 0.2, 3)))
        options = dict(teacher=AlignDistilTeacher(), beta=0.1)
    fn = prior_loss if loss == "prior" else aligndistil_loss
    losses = []
    for _ in range(5):
        out = chunked_loss(fn, completions(policy, ids, mask, **models), chunk_size=40, **options)
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    print(loss, [round(x, 4) for x in losses])
    assert losses[-1] < 0.8 * losses[0]


def test_aligndistil_chunked_equals_reference_across_vocabulary_slices():
    """A vocabulary wider than VOCAB_SLICE: the teacher KL's in-place gradient runs slice by slice."""
    g = torch.Generator().manual_seed(5)
    wide = VOCAB_SLICE + 37
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(wide, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    teachers = tuple(
        LinearHead(
            hidden.detach() + 0.2 * torch.randn(2, 3, 4, generator=g, dtype=torch.float64), weight.detach()
        )
        for _ in range(2)
    )
    labels = torch.randint(0, wide, (2, 3), generator=g)
    c = Completions(LinearHead(hidden, weight), labels, teachers=teachers)
    runs = [
        chunked_loss(aligndistil_loss, c, teacher=AlignDistilTeacher(), chunk_size=2, backend=backend).loss
        for backend in ("chunked", "reference")
    ]
    assert runs[0].item() == pytest.approx(runs[1].item(), rel=1e-12)
    for got, want in zip(*(torch.autograd.grad(r, (hidden, weight)) for r in runs)):
        assert_relative_error(got, want, 1e-11, "gradient")
