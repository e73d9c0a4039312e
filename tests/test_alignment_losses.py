"""Every loss equals a direct float64 computation from materialised logits (written here independently,
per sequence, from the papers' formulas); token-weighted forms reduce to DPO; TDPO's sequential KL equals
an explicit KL; GTPO conflicts on constructed groups; IcePop's gradient vanishes outside its band; bad
input raises."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from tokenlab.alignment import (
    LOSSES,
    LinearHead,
    RewardShift,
    SparseTokenMask,
    TokenLogps,
    activation_token_mask,
    bco_loss,
    cdpo_loss,
    critical_token_weights,
    dpo_loss,
    grpo_loss,
    gtpo_conflict_tokens,
    gtpo_loss,
    icepop_loss,
    ipo_loss,
    kto_loss,
    sequence_kl,
    sparsepo_loss,
    tdpo_loss,
    token_stats,
    token_weighted_dpo_loss,
    treg_loss,
)

B, T, H, V = 4, 6, 8, 23
TOL = 1e-12


class World:
    """Policy and reference heads over B×T tokens, materialised logits, and the chunked TokenLogps."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).requires_grad_(True)
        self.weight = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
        self.ref_hidden = self.hidden.detach() + 0.3 * torch.randn(B, T, H, generator=g, dtype=torch.float64)
        self.labels = torch.randint(0, V, (B, T), generator=g)
        self.mask = torch.ones(B, T, dtype=torch.float64)
        for i in range(B):
            self.mask[i, 2 + i % (T - 2) :] = 0
        self.labels[self.mask == 0] = -100
        stats = token_stats(
            LinearHead(self.hidden, self.weight),
            self.labels,
            reference=LinearHead(self.ref_hidden, self.weight),
            entropy=True,
            chunk_size=5,
        )
        ref = token_stats(LinearHead(self.ref_hidden, self.weight), self.labels).logps
        self.tokens = TokenLogps(stats.logps, self.mask, ref_logps=ref, kl=stats.kl, entropy=stats.entropy)
        # materialised float64 logits: the direct computation starts here
        self.p = Categorical(logits=self.hidden @ self.weight.T)
        self.q = Categorical(logits=self.ref_hidden @ self.weight.T)

    def logp(self, i: int, t: int, model: str = "policy") -> torch.Tensor:
        dist = self.p if model == "policy" else self.q
        return dist.logits[i, t].log_softmax(-1)[self.labels[i, t]]

    def tokens_of(self, i: int) -> range:
        return range(int(self.mask[i].sum()))

    def logratio(self, i: int, weights=None) -> torch.Tensor:
        w = (lambda t: 1.0) if weights is None else (lambda t: weights[i, t])
        return sum(w(t) * (self.logp(i, t) - self.logp(i, t, "ref")) for t in self.tokens_of(i))

    def seq_kl(self, i: int, weights=None) -> torch.Tensor:
        w = (lambda t: 1.0) if weights is None else (lambda t: weights[i, t])
        kl = kl_divergence(self.q, self.p)
        return sum(w(t) * kl[i, t] for t in self.tokens_of(i))


@pytest.fixture(scope="module")
def pair():
    return World(0), World(1)


def logsig(x):
    return torch.nn.functional.logsigmoid(torch.as_tensor(x))


def close(got: torch.Tensor, want, tol: float = TOL) -> None:
    want = torch.as_tensor(want, dtype=torch.float64)
    assert abs(got.item() - want.item()) <= tol * max(1.0, abs(want.item())), (got.item(), want.item())


def test_dpo_and_ipo_direct(pair):
    c, r = pair
    beta = 0.3
    close(
        dpo_loss(c.tokens, r.tokens, beta=beta).loss,
        -sum(logsig(beta * (c.logratio(i) - r.logratio(i))) for i in range(B)) / B,
    )
    ipo = (
        sum(
            (c.logratio(i) / len(c.tokens_of(i)) - r.logratio(i) / len(r.tokens_of(i)) - 1 / (2 * beta)) ** 2
            for i in range(B)
        )
        / B
    )
    close(ipo_loss(c.tokens, r.tokens, beta=beta).loss, ipo)


def test_token_weighted_forms_reduce_to_dpo_under_uniform_weights(pair):
    c, r = pair
    ones = torch.ones(B, T, dtype=torch.float64)
    dpo = dpo_loss(c.tokens, r.tokens, beta=0.2).loss
    close(
        token_weighted_dpo_loss(
            c.tokens, r.tokens, beta=0.2, chosen_weights=ones, rejected_weights=ones
        ).loss,
        dpo,
    )
    zeros = torch.zeros(B, T, dtype=torch.float64)
    out = sparsepo_loss(
        c.tokens, r.tokens, beta=0.2, chosen_reward_mask=ones, rejected_reward_mask=ones,
        chosen_kl_mask=zeros, rejected_kl_mask=zeros,
    )  # fmt: skip
    close(out.loss, dpo)
    # cDPO where positive and negative models both give probability 1: score 1, rejected weights 0
    lp0 = torch.zeros(B, T, dtype=torch.float64)
    want = -sum(logsig(0.2 * c.logratio(i)) for i in range(B)) / B
    close(cdpo_loss(c.tokens, r.tokens, beta=0.2, positive_logps=lp0, negative_logps=lp0).loss, want)
    # SparsePO with all-ones masks is TDPO1
    close(
        sparsepo_loss(c.tokens, r.tokens, beta=0.2, chosen_reward_mask=ones, rejected_reward_mask=ones).loss,
        tdpo_loss(c.tokens, r.tokens, beta=0.2, variant="tdpo1").loss,
    )


def test_weighted_dpo_cdpo_sparsepo_direct(pair):
    c, r = pair
    g = torch.Generator().manual_seed(7)
    wc, wr = (torch.rand(B, T, generator=g, dtype=torch.float64) for _ in range(2))
    mc, mr = (torch.rand(B, T, generator=g, dtype=torch.float64) for _ in range(2))
    beta = 0.5
    want = -sum(logsig(beta * (c.logratio(i, wc) - r.logratio(i, wr))) for i in range(B)) / B
    close(
        token_weighted_dpo_loss(c.tokens, r.tokens, beta=beta, chosen_weights=wc, rejected_weights=wr).loss,
        want,
    )
    want = (
        -sum(
            logsig(
                beta * (c.logratio(i, wc) - r.logratio(i, wr)) - beta * (r.seq_kl(i, mr) - c.seq_kl(i, mc))
            )
            for i in range(B)
        )
        / B
    )
    out = sparsepo_loss(
        c.tokens, r.tokens, beta=beta, chosen_reward_mask=wc, rejected_reward_mask=wr, chosen_kl_mask=mc,
        rejected_kl_mask=mr,
    )  # fmt: skip
    close(out.loss, want)
    pos, neg = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    weights = torch.tensor(
        [
            [1 - math.exp(min(0.0, 2 * pos[i, t].item() - neg[i, t].item())) for t in range(T)]
            for i in range(B)
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(critical_token_weights(pos, neg, ce_beta=1.0), weights, rtol=1e-12, atol=1e-14)
    want = -sum(logsig(beta * (c.logratio(i) - r.logratio(i, weights))) for i in range(B)) / B
    close(cdpo_loss(c.tokens, r.tokens, beta=beta, positive_logps=pos, negative_logps=neg).loss, want)


def test_tdpo_sequential_kl_equals_explicit_kl(pair):
    c, _ = pair
    explicit = torch.stack([sum(kl_divergence(c.q, c.p)[i, t] for t in c.tokens_of(i)) for i in range(B)])
    # and a brute-force sum over the vocabulary
    brute = torch.zeros(B, dtype=torch.float64)
    for i in range(B):
        for t in c.tokens_of(i):
            lq, lp = c.q.logits[i, t].log_softmax(-1), c.p.logits[i, t].log_softmax(-1)
            brute[i] += sum(lq[v].exp() * (lq[v] - lp[v]) for v in range(V))
    assert torch.allclose(sequence_kl(c.tokens), explicit.detach(), rtol=1e-12, atol=0)
    assert torch.allclose(sequence_kl(c.tokens), brute.detach(), rtol=1e-12, atol=0)


def test_tdpo_direct_and_stop_gradient(pair):
    c, r = pair
    beta, alpha = 0.4, 0.5
    u = [beta * (c.logratio(i) - r.logratio(i)) for i in range(B)]
    tdpo1 = -sum(logsig(u[i] - beta * (r.seq_kl(i) - c.seq_kl(i))) for i in range(B)) / B
    close(tdpo_loss(c.tokens, r.tokens, beta=beta, variant="tdpo1").loss, tdpo1)
    tdpo2 = (
        -sum(logsig(u[i] - alpha * (beta * r.seq_kl(i) - beta * c.seq_kl(i).detach())) for i in range(B)) / B
    )
    got = tdpo_loss(c.tokens, r.tokens, beta=beta, alpha=alpha, variant="tdpo2").loss
    close(got, tdpo2)
    (g_got,) = torch.autograd.grad(got, c.hidden, retain_graph=True)
    (g_want,) = torch.autograd.grad(tdpo2, c.hidden, retain_graph=True)
    assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-14)


def test_treg_direct(pair):
    c, r = pair
    g = torch.Generator().manual_seed(8)
    rc, rr = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    beta, alpha = 0.3, 0.7
    dpo = -sum(logsig(beta * (c.logratio(i) - r.logratio(i))) for i in range(B)) / B
    reg = (
        -0.5 * sum(logsig(beta * c.logratio(i, rc)) + logsig(beta * r.logratio(i, rr)) for i in range(B)) / B
    )
    out = treg_loss(
        c.tokens, r.tokens, beta=beta, alpha=alpha, chosen_token_rewards=rc, rejected_token_rewards=rr
    )
    close(out.loss, dpo + alpha * reg)
    close(out.metrics["loss/dpo"], dpo)


def test_kto_and_bco_direct(pair):
    c, _ = pair
    desirable = torch.tensor([True, False, True, False])
    kl = torch.tensor([0.3, -0.1, 0.5], dtype=torch.float64)
    beta, z0 = 0.2, max(0.0, kl.mean().item())
    want = (
        sum(
            (1 - torch.sigmoid(beta * (c.logratio(i) - z0)))
            if desirable[i]
            else 0.5 * (1 - torch.sigmoid(beta * (z0 - c.logratio(i))))
            for i in range(B)
        )
        / B
    )
    close(kto_loss(c.tokens, desirable, kl_logratios=kl, beta=beta, undesirable_weight=0.5).loss, want)
    shift = RewardShift()
    shift.update(torch.tensor([1.0, 2.0]))
    assert shift.update(torch.tensor([3.0, 6.0])) == pytest.approx(3.0)  # mean of everything seen
    delta = 0.05
    want = sum(-logsig((beta * c.logratio(i) - delta) * (1 if desirable[i] else -1)) for i in range(B)) / B
    close(bco_loss(c.tokens, desirable, reward_shift=delta, beta=beta).loss, want)


def test_grpo_direct(pair):
    c, _ = pair
    g = torch.Generator().manual_seed(9)
    old = c.tokens.logps.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.2, -1.5], dtype=torch.float64)
    beta, eps = 0.04, 0.2
    per_seq = []
    for i in range(B):
        terms = []
        for t in c.tokens_of(i):
            ratio = torch.exp(c.logp(i, t) - old[i, t])
            surrogate = -torch.min(ratio * adv[i], ratio.clamp(1 - eps, 1 + eps) * adv[i])
            d = c.logp(i, t, "ref") - c.logp(i, t)
            terms.append(surrogate + beta * (d.exp() - d - 1))
        per_seq.append(sum(terms) / len(terms))
    close(grpo_loss(c.tokens, adv, old_logps=old, beta=beta).loss, sum(per_seq) / B)


def test_gtpo_conflict_tokens_on_constructed_group():
    ids = torch.tensor(
        [
            [5, 6, 7, 8],  # A > 0
            [5, 9, 7, 1],  # A < 0: shares 5 (t=0) and 7 (t=2) with a positive completion
            [2, 6, 3, 8],  # A > 0: 6 (t=1), 8 (t=3) only with positives → no conflict... but 8 vs row 3
            [4, 4, 4, 8],  # A = 0: never conflicts
            # second group: tokens equal across groups must not count
            [5, 6, 7, 8],
            [0, 0, 0, 0],
            [1, 1, 1, 1],
            [3, 3, 3, 3],
        ]
    )
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0, -1.0, 1.0, 1.0, 1.0])
    mask = torch.ones(8, 4)
    mask[1, 3] = 0  # masked tokens never conflict
    want = torch.zeros(8, 4, dtype=torch.bool)
    want[0, 0] = want[0, 2] = want[1, 0] = want[1, 2] = True
    assert torch.equal(gtpo_conflict_tokens(ids, mask, adv, group_size=4, rule="anywhere"), want)
    # The authors' runs: row 0 and row 1 match at t = 0, miss at t = 1, so the coincidence at t = 2
    # is not a conflict; from the end (row 1 has 3 valid tokens) 8 vs 7 already differ.
    want[0, 2] = want[1, 2] = False
    assert torch.equal(gtpo_conflict_tokens(ids, mask, adv, group_size=4), want)


def test_gtpo_runs_from_the_end_align_completions_at_their_last_token():
    ids = torch.tensor(
        [
            [1, 2, 3, 9, 4, 5],  # A > 0, 6 tokens
            [7, 9, 4, 5, 0, 0],  # A < 0, 4 tokens (right-padded): ends "9 4 5" like row 0
            [1, 2, 8, 8, 8, 8],  # A < 0, shares the first two tokens with row 0
            [6, 6, 6, 6, 6, 6],  # A > 0, no match
        ]
    )
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    want = torch.zeros(4, 6, dtype=torch.bool)
    want[0, [0, 1, 3, 4, 5]] = True  # run from the start (1 2 with row 2), run from the end (9 4 5)
    want[1, [1, 2, 3]] = True
    want[2, [0, 1]] = True
    got = gtpo_conflict_tokens(ids, mask, adv, group_size=4)
    assert torch.equal(got, want)
    # 9 at column 3 of row 0 vs column 1 of row 1: matched only through the end alignment
    assert not gtpo_conflict_tokens(ids, mask, adv, group_size=4, rule="anywhere")[0, 3]


def test_gtpo_loss_follows_the_authors_rule(pair):
    """Entropy shaping Â = A − 0.1·H̄ (kept when H̄ ≤ 0.7), run weights multiplied, each completion's loss
    divided by its number of conflict tokens, sequence normalisation — against a loop over the formula."""
    c, _ = pair
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 9, 9, 9, 6], [7, 2, 8, 8, 5, 6], [0, 0, 0, 0, 0, 0]])
    adv = torch.tensor([1.0, -1.0, -0.5, 0.5], dtype=torch.float64)
    mean_entropy = (c.tokens.entropy * c.mask).sum(-1) / c.mask.sum(-1)
    threshold = mean_entropy.max().item() - 1e-9  # drops exactly the highest-entropy completion
    out = gtpo_loss(c.tokens, adv, ids, 4, entropy_threshold=threshold, entropy_penalty=0.1, amplify=3.0)
    conflict = gtpo_conflict_tokens(ids, c.mask, adv, 4)
    per_seq = []
    for i in range(B):
        toks = c.tokens_of(i)
        h = sum(c.p.entropy()[i, t] for t in toks) / len(toks)
        shaped = adv[i] - 0.1 * h if h <= threshold else 0.0
        n_conflict = max(1, sum(bool(conflict[i, t]) for t in toks))
        total = 0.0
        for t in toks:
            w = 1.0
            if conflict[i, t]:
                w = 0.0 if adv[i] < 0 else 3.0  # here no token lies in both runs
            total = total - w * shaped / n_conflict  # on-policy: ratio 1, no clipping
        per_seq.append(total / len(toks))
    assert conflict.any()
    close(out.loss, sum(per_seq) / B)


def test_gtpo_loss_weights_and_entropy_filter(pair):
    c, _ = pair
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 9, 9, 9, 9, 9], [7, 2, 8, 8, 8, 8], [0, 0, 0, 0, 0, 0]])
    adv = torch.tensor([1.0, -1.0, -0.5, 0.5], dtype=torch.float64)
    mean_entropy = (c.tokens.entropy * c.mask).sum(-1) / c.mask.sum(-1)
    threshold = mean_entropy.max().item() - 1e-9  # drops exactly the highest-entropy completion
    out = gtpo_loss(
        c.tokens, adv, ids, 4, entropy_threshold=threshold, amplify=3.0, rule="anywhere",
        entropy_penalty=0.0, conflict_normalization=False, normalization="token",
    )  # fmt: skip
    conflict = gtpo_conflict_tokens(ids, c.mask, adv, 4, rule="anywhere")
    total, count = 0.0, 0
    for i in range(B):
        mean_entropy = sum(c.p.entropy()[i, t] for t in c.tokens_of(i)) / len(c.tokens_of(i))
        for t in c.tokens_of(i):
            count += 1
            w = 0.0 if conflict[i, t] and adv[i] < 0 else 3.0 if conflict[i, t] and adv[i] > 0 else 1.0
            if mean_entropy > threshold:
                w = 0.0
            total = total - w * adv[i]  # on-policy: ratio 1, no clipping
    assert conflict[0, 0] and conflict[1, 0] and conflict[0, 1] and conflict[2, 1]
    close(out.loss, total / count)
    assert out.metrics["filtered_fraction"].item() == 1 / B


def test_icepop_zero_gradient_outside_band(pair):
    c, _ = pair
    g = torch.Generator().manual_seed(10)
    shift = torch.randn(B, T, generator=g, dtype=torch.float64) * 2
    inference = c.tokens.logps.detach() + shift  # k = exp(−shift)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.3], dtype=torch.float64)
    lp = c.tokens.logps.detach().clone().requires_grad_(True)
    tokens = TokenLogps(lp, c.mask)
    out = icepop_loss(tokens, adv, inference_logps=inference, alpha=0.5, beta=2.0)
    (grad,) = torch.autograd.grad(out.loss, lp)
    k = torch.exp(-shift)
    outside = ((k < 0.5) | (k > 2.0)) & (c.mask > 0)
    inside = ~outside & (c.mask > 0)
    assert outside.any() and inside.any()
    assert (grad[outside] == 0).all() and (grad[inside] != 0).all()
    # inside the band: d/dlogp of −k·ρ·A at ρ = 1 is −k·A / (number of tokens)
    assert torch.allclose(grad[inside], (-k * adv[:, None] / c.mask.sum()).expand(B, T)[inside], rtol=1e-12)
    close(out.metrics["masked_fraction"], outside.sum() / c.mask.sum())


def test_sparsepo_masks():
    hidden = [torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    m = activation_token_mask(hidden, mask)
    act = torch.stack([h.mean(-1) for h in hidden]).mean(0)
    row = act[0, 1:4]
    assert torch.allclose(m[0, 1:4], (row - row.min()) / (row.max() - row.min()))
    assert (m[0, [0, 4]] == 0).all() and m.max() == 1
    learned = SparseTokenMask(4, independent=True)
    reward_mask, kl_mask = learned(hidden[0])
    assert torch.equal(reward_mask, torch.ones(2, 5)) and torch.equal(kl_mask, torch.ones(2, 5))


@pytest.mark.parametrize("name", ["dpo", "ipo", "tdpo"])
def test_bad_inputs(pair, name):
    c, r = pair
    loss = LOSSES[name]
    with pytest.raises(ValueError, match="beta"):
        loss(c.tokens, r.tokens, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        loss(c.tokens, r.tokens, beta=-1.0)
    short = TokenLogps(
        r.tokens.logps[:2], r.tokens.mask[:2], ref_logps=r.tokens.ref_logps[:2], kl=r.tokens.kl[:2]
    )
    with pytest.raises(ValueError, match="pairs"):
        loss(c.tokens, short, beta=0.1)
    with pytest.raises(ValueError, match="no token"):
        TokenLogps(c.tokens.logps, torch.zeros(B, T), ref_logps=c.tokens.ref_logps)
    with pytest.raises(ValueError, match="ref_logps"):
        TokenLogps(c.tokens.logps, c.mask, ref_logps=c.tokens.ref_logps[:, :-1])
    bad = c.tokens.logps.detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        TokenLogps(bad, c.mask)
    with pytest.raises(ValueError, match="ref_logps"):
        loss(TokenLogps(c.tokens.logps, c.mask), r.tokens, beta=0.1)


def test_bad_inputs_unpaired_and_policy(pair):
    c, r = pair
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(c.tokens, torch.ones(3, dtype=torch.bool), kl_logratios=torch.zeros(2))
    with pytest.raises(ValueError, match="kl_logratios"):
        kto_loss(c.tokens, torch.ones(B, dtype=torch.bool), kl_logratios=torch.tensor([float("nan")]))
    shift = RewardShift()
    shift.update(torch.tensor([1.0, 3.0]))
    for bad in (torch.tensor([]), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError, match="`rewards`"):
            shift.update(bad)
    assert shift.value == 2.0 and shift.count == 2  # state untouched by the rejected batches
    with pytest.raises(ValueError, match="`reward_shift`"):
        bco_loss(c.tokens, torch.ones(B, dtype=torch.bool), reward_shift=float("inf"))
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(c.tokens, torch.zeros(B), beta=-0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(c.tokens, torch.zeros(B + 1))
    with pytest.raises(ValueError, match="normalization"):
        grpo_loss(c.tokens, torch.zeros(B), normalization="per-word")
    with pytest.raises(ValueError, match="normalization"):  # checked with the inputs, before any work
        icepop_loss(c.tokens, torch.zeros(B), inference_logps=c.tokens.logps.detach(), normalization="x")
    lp = r.tokens.logps.detach()
    with pytest.raises(ValueError, match="`positive_logps` shape"):  # used to blame `rejected_weights`
        cdpo_loss(c.tokens, r.tokens, positive_logps=lp[:, :-1], negative_logps=lp[:, :-1])
    with pytest.raises(TypeError, match="`negative_logps`"):
        critical_token_weights(lp, lp.tolist())
    with pytest.raises(ValueError, match=r"`positive_logps`.*same shape"):
        critical_token_weights(lp, lp[:, :-1])
    with pytest.raises(ValueError, match="`old_logps` shape"):
        grpo_loss(c.tokens, torch.zeros(B), old_logps=c.tokens.logps.detach()[:, :-1])
    nan = torch.full_like(c.tokens.logps.detach(), float("nan"))
    with pytest.raises(ValueError, match="`inference_logps` contains NaN"):
        icepop_loss(c.tokens, torch.zeros(B), inference_logps=nan)
    with pytest.raises(ValueError, match="alpha"):
        icepop_loss(c.tokens, torch.zeros(B), inference_logps=c.tokens.logps.detach(), alpha=1.5)
    with pytest.raises(ValueError, match="entropy"):
        gtpo_loss(
            TokenLogps(c.tokens.logps, c.mask), torch.zeros(B), torch.zeros(B, T), 2, entropy_threshold=1.0
        )


def test_gtpo_bad_group_size_and_ids_are_named():
    ids, mask, adv = torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3), torch.ones(4)
    for group_size in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="`group_size` must be an int >= 1"):
            gtpo_conflict_tokens(ids, mask, adv, group_size)
    with pytest.raises(ValueError, match="`completion_ids` must be"):
        gtpo_conflict_tokens(torch.zeros(4, dtype=torch.long), mask, adv, 2)
    with pytest.raises(TypeError, match="completion_ids"):
        gtpo_conflict_tokens(ids.tolist(), mask, adv, 2)


def test_losses_under_autocast_bfloat16(pair):
    c, r = pair
    hidden = c.hidden.detach().float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = token_stats(LinearHead(hidden, c.weight.float()), c.labels, chunk_size=4)
        tokens = TokenLogps(stats.logps, c.mask.float(), ref_logps=c.tokens.ref_logps.float())
        rejected = TokenLogps(
            r.tokens.logps.detach().float(), r.mask.float(), ref_logps=r.tokens.ref_logps.float()
        )
        out = dpo_loss(tokens, rejected, beta=0.1)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(hidden.grad).all()
    close(out.loss, dpo_loss(c.tokens, r.tokens, beta=0.1).loss, tol=2e-2)
