"""Token-tree speculative decoding against its oracles.

* the attention ``tree`` flag equals a dense ancestor mask (reference) and the kernel equals the
  reference with every bit of the int64 used (forward and backward, float64);
* one tree forward (4-D mask on SDPA; packed bitmask on ``attn_implementation="tokenlab"``) gives
  the logits of running every root-to-node path alone, for the target and for the draft's
  incremental forwards;
* the tree verification kernel (interpreter) equals the reference token for token, and accepts a
  child exactly when ``u < α`` of the reference's SiblingRejection;
* exact laws by enumeration of every draft tree (V ≤ 6, a constructed draft): the first emitted
  token follows the target's warped law, and so does the pair of the first two, for static
  (i.i.d. children), RSD (Gumbel-top-k) and DySpec (dynamic shape); end to end through
  ``speculative_generate``, the joint law of two tokens passes a chi-square test at a fixed seed;
* greedy tree decoding equals ``target.generate(do_sample=False)`` for B = 1 and B = 4 mixed-length
  batches on random float64 pairs and the trained tiny pair;
* after a tree step both KV caches equal those of a plain forward over the accepted tokens;
* bad input raises errors naming the argument.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import pytest
import torch
from scipy.stats import chisquare
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import tokenlab.attention.hf
from tokenlab._hf import cache_kwargs
from tokenlab.attention import AttentionVariant, flash_attention, register_attention
from tokenlab.decoding import speculative_generate, token_tree
from tokenlab.decoding.speculative import _Clock, _commit, _Group, _Sampling, _tree_step
from tokenlab.decoding.token_tree import (
    DraftModelOracle,
    TokenTree,
    draft_tree,
    pack_bits,
    score_tree,
    tree_forward,
    tree_spec,
)
from tokenlab.kernels.attention import attention_reference
from tokenlab.kernels.tree_verify import SiblingRejection, child_links, tree_verify
from tokenlab.kernels.warping import Warping
from tokenlab.testing import assert_relative_error
from tokenlab.testing.tiny_models import left_padded_prompts, noisy_copy, tiny_causal_lm

MODES = ["static", "rsd", "dyspec"]


@pytest.fixture(scope="module")
def pairs(tiny_world):
    llama = tiny_causal_lm(LlamaForCausalLM, LlamaConfig, 32, 2, 64, seed=0)
    qwen = tiny_causal_lm(Qwen2ForCausalLM, Qwen2Config, 32, 2, 64, seed=1)
    return {
        "llama-noisy": (llama, noisy_copy(llama, 0.15, seed=2)),
        "qwen2-noisy": (qwen, noisy_copy(qwen, 0.15, seed=4)),
        "toy-trained": (tiny_world.target, tiny_world.draft),
    }


def _random_parents(B, N, seed, p_valid=1.0):
    """Random trees: node i's parent is a random earlier node; a node is invalid with prob
    1 − p_valid, and so are its descendants."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.full((B, N + 1), -1)
    valid = torch.ones(B, N + 1, dtype=torch.bool)
    for i in range(1, N + 1):
        parents[:, i] = torch.randint(0, i, (B,), generator=g)
        valid[:, i] = (torch.rand(B, generator=g) < p_valid) & valid.gather(1, parents[:, i : i + 1])[:, 0]
    return parents, valid


def _token_tree(tokens, parents, valid):
    """A TokenTree (greedy: no draft probabilities) from parents and validity."""
    B, n1 = parents.shape
    ancestors = torch.zeros(B, n1, n1, dtype=torch.bool)
    depths = torch.zeros(B, n1, dtype=torch.long)
    for i in range(n1):
        if i:
            p = parents[:, i].clamp(min=0)
            ancestors[:, i] = ancestors[torch.arange(B), p] & valid[:, i : i + 1]
            depths[:, i] = depths[torch.arange(B), p] + 1
        ancestors[:, i, i] = valid[:, i]
    return TokenTree(tokens, torch.where(valid, parents, -1), depths, valid, ancestors, None, False)


# -------------------------------------------------------------------------- attention flag
def test_tree_flag_is_the_dense_ancestor_mask():
    B, H, T, S, D, n = 2, 2, 9, 14, 16, 7
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for L in (T, S, S))
    parents, valid = _random_parents(B, n - 1, seed=1)
    tree = _token_tree(torch.zeros(B, n, dtype=torch.long), parents, valid)
    dense = torch.ones(B, 1, T, S, dtype=torch.bool)
    dense[:, 0, T - n :, S - n :] = tree.ancestors
    for causal in (False, True):
        got = flash_attention(q, k, v, causal=causal, tree=pack_bits(tree.ancestors), backend="reference")
        expected, _ = attention_reference(q, k, v, AttentionVariant(causal=causal), mask=dense)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_tree_flag_kernel_uses_all_64_bits():
    """A 64-node tree (bit 63 is the int64 sign bit) after a committed prefix, causal, float64."""
    B, H, T, S, D, n = 1, 2, 70, 80, 16, 64
    g = torch.Generator().manual_seed(2)
    q, k, v = (
        torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True) for L in (T, S, S)
    )
    parents, valid = _random_parents(B, n - 1, seed=3)
    bits = pack_bits(_token_tree(torch.zeros(B, n, dtype=torch.long), parents, valid).ancestors)
    assert bits.min() < 0  # the last node's own bit is the sign bit
    dout = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    outs = {}
    for backend in ("reference", "triton"):
        out = flash_attention(q, k, v, causal=True, tree=bits, backend=backend)
        outs[backend] = (out, *torch.autograd.grad(out, (q, k, v), dout))
    for name, got, ref in zip(("out", "dq", "dk", "dv"), outs["triton"], outs["reference"]):
        err = assert_relative_error(got, ref, 1e-12, name)
        print(f"64-node tree {name}: relative error {err:.1e}")


# ---------------------------------------------------------------------------- tree forward
def _path_logits(model, prompt, tree, b, node):
    """Logits after the root-to-node path of sequence b, run alone (no padding, no cache)."""
    path = []
    while node > 0:
        path.append(int(tree.tokens[b, node]))
        node = int(tree.parents[b, node])
    ids = torch.cat([prompt, torch.tensor(path[::-1], dtype=torch.long)])[None]
    return model(ids).logits[0, -1]


@pytest.mark.parametrize("attn", ["sdpa", "tokenlab"])
def test_tree_forward_equals_each_path_alone(attn, monkeypatch):
    if attn == "tokenlab":
        register_attention()
    model = tiny_causal_lm(LlamaForCausalLM, LlamaConfig, 32, 2, 64, seed=5, attn_implementation=attn)
    ids, mask = left_padded_prompts(2, 6, 64, seed=6)
    parents, valid = _random_parents(2, 9, seed=7, p_valid=0.8)
    tokens = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(8))
    tokens[:, 0] = ids[:, -1]
    tree = _token_tree(tokens, parents, valid)
    seen = []
    if attn == "tokenlab":  # the kernel path: no 4-D mask, the packed tree flag instead
        original = tokenlab.attention.hf.tokenlab_attention_forward

        def spy(module, query, key, value, attention_mask, **kwargs):
            seen.append((None if attention_mask is None else attention_mask.dim(), "tokenlab_tree" in kwargs))
            return original(module, query, key, value, attention_mask, **kwargs)

        from transformers import AttentionInterface

        monkeypatch.setitem(AttentionInterface._global_mapping, "tokenlab", spy)
    cache = DynamicCache(config=model.config)
    tree_forward(model, ids[:, :3], mask[:, :3], cache, 1)  # a partly filled cache
    seen.clear()
    logits = score_tree(model, ids, mask, cache, tree)
    assert cache.get_seq_length() == 6 + 9
    if attn == "tokenlab":
        assert seen and all(dim != 4 and has_tree for dim, has_tree in seen)
    for b in range(2):
        prompt = ids[b, mask[b].bool()]
        for node in range(10):
            if valid[b, node]:
                expected = _path_logits(model, prompt, tree, b, node)
                torch.testing.assert_close(logits[b, node], expected, rtol=1e-10, atol=1e-10)


def test_draft_oracle_rounds_equal_each_path_alone(pairs):
    """DySpec's incremental draft forwards (new cache columns per round, B = 2) score each node as
    its path alone would; the recorded cache columns hold the nodes."""
    _, draft = pairs["llama-noisy"]
    ids, mask = left_padded_prompts(2, 5, 64, seed=9)
    oracle = DraftModelOracle(draft, ids, mask, DynamicCache(config=draft.config))
    calls = []
    expand = oracle.expand

    def recording(tree, nodes):
        out = expand(tree, nodes)
        calls.append((nodes.clone(), out))
        return out

    oracle.expand = recording
    spec = tree_spec("dyspec", 12, None, 6)
    tree = draft_tree(
        spec, oracle, ids[:, -1], Warping(True, 0.15), generator=torch.Generator().manual_seed(0)
    )
    assert len(calls) >= 2 and oracle.calls == len(calls) + 1
    for nodes, out in calls:
        for b in range(2):
            for m, node in enumerate(nodes[b].tolist()):
                if node >= 0:
                    expected = _path_logits(draft, ids[b, mask[b].bool()], tree, b, node)
                    torch.testing.assert_close(out[b, m], expected, rtol=1e-10, atol=1e-10)
    columns = oracle.node_columns(tree.num_nodes + 1)
    assert ((columns >= 0) == (tree.valid & (columns >= 0))).all() and (columns[:, 0] == -1).all()


# ---------------------------------------------------------------------------- verification
def _verify_inputs(B, N, V, dtype, seed, agree=0.7):
    g = torch.Generator().manual_seed(seed)
    parents, valid = _random_parents(B, N, seed, p_valid=0.9)
    logits = torch.randn(B, N + 1, V, generator=g, dtype=dtype) * 2
    q = torch.softmax(logits + torch.randn(B, N + 1, V, generator=g, dtype=dtype), dim=-1)
    # Each child drawn from its parent's q (so that acceptances are common); greedy: often the argmax.
    parent_q = q.gather(1, parents.clamp(min=0)[:, :, None].expand(-1, -1, V))
    tokens = torch.multinomial(parent_q.reshape(-1, V).double(), 1, generator=g).reshape(B, N + 1)
    best = logits.argmax(-1).gather(1, parents.clamp(min=0))
    greedy = torch.where(torch.rand(B, N + 1, generator=g) < agree, best, tokens)
    uniforms = torch.rand(B, N + 1, generator=g, dtype=dtype)
    noise = torch.empty(B, V, dtype=dtype).exponential_(generator=g)
    return logits, q, tokens, greedy, parents, valid, uniforms, noise


@pytest.mark.parametrize(
    ("B", "N", "V", "dtype"),
    [
        (3, 6, 8, torch.float64),
        (5, 12, 37, torch.float32),
        (2, 20, 1500, torch.float64),
        (2, 9, 2100, torch.float32),
    ],
)
def test_tree_verify_kernel_equals_reference(B, N, V, dtype):
    logits, q, tokens, greedy, parents, valid, uniforms, noise = _verify_inputs(B, N, V, dtype, seed=V + N)
    depths = set()
    for do_sample, replacement, top_k in [
        (False, False, None),
        (True, True, None),
        (True, False, 5),
        (True, False, None),
    ]:
        args = dict(valid=valid, do_sample=do_sample, replacement=replacement, temperature=0.9, top_k=top_k)
        drafted = tokens if do_sample else greedy
        ref = tree_verify(
            logits, q, drafted, parents, uniforms=uniforms, exponentials=noise, backend="reference", **args
        )
        out = tree_verify(
            logits, q, drafted, parents, uniforms=uniforms, exponentials=noise, backend="triton", **args
        )
        assert all(torch.equal(a, b) for a, b in zip(out, ref)), args
        n, path, next_tokens = ref
        depths.update(n.tolist())
        for b in range(B):  # the path is a chain of parents from the root, its tokens the emitted ones
            nodes = path[b, : n[b]].tolist()
            assert [int(parents[b, x]) for x in nodes] == [0, *nodes][: len(nodes)]
            assert next_tokens[b, : n[b]].tolist() == [int(drafted[b, x]) for x in nodes]
            assert 0 <= next_tokens[b, n[b]] < V and (next_tokens[b, n[b] + 1 :] == -1).all()
    assert len(depths) > 1, "inputs should give ragged acceptance"


def test_tree_verify_accepts_exactly_when_u_is_below_alpha():
    """The decisions of both backends are SiblingRejection's ``u < α`` (the bridge between the
    token-level verifier and the law computed with SiblingRejection below)."""
    V = 8
    g = torch.Generator().manual_seed(3)
    parents = torch.tensor([[-1, 0, 0, 0]])
    logits = torch.randn(1, 4, V, dtype=torch.float64, generator=g) * 2
    q = torch.softmax(torch.randn(1, 4, V, dtype=torch.float64, generator=g), -1)
    for replacement, kids in [(True, [2, 2, 5]), (False, [2, 5, 0])]:
        tokens = torch.tensor([[0, *kids]])
        p = torch.softmax(logits[0, 0], -1)
        rejection = SiblingRejection(p, q[0, 0], replacement=replacement)
        alphas = []
        for x in kids:
            alphas.append(float(rejection.acceptance(torch.tensor(x))))
            rejection.reject(torch.tensor(x))
        for first in range(3):  # reject the children before `first`, test `first` at its threshold
            alpha = alphas[first]
            for u, accepted in [
                (alpha * (1 - 1e-9), alpha > 0),
                (min(alpha * (1 + 1e-9), 1 - 1e-16), alpha >= 1),
            ]:
                uniforms = torch.zeros(1, 4, dtype=torch.float64)
                uniforms[0, 1 : first + 1] = 1 - 1e-16
                uniforms[0, first + 1] = u
                prior = all(a < 1 - 1e-16 for a in alphas[:first])
                for backend in ("reference", "triton"):
                    _n, path, _ = tree_verify(
                        logits, q, tokens, parents, do_sample=True, replacement=replacement,
                        uniforms=uniforms, exponentials=torch.ones(1, V, dtype=torch.float64),
                        backend=backend,
                    )  # fmt: skip
                    if prior:
                        assert (int(path[0, 0]) == first + 1) == accepted, (replacement, first, u, backend)


# ------------------------------------------------------------------- exact laws (enumeration)
class _Table:
    """A constructed model over V tokens: logits depend on the last two tokens of the context."""

    def __init__(self, V, seed, scale, base=None, noise=0.0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, V, dtype=torch.float64, generator=g) * scale
        if base is not None:
            self.table = base.table + noise * torch.randn(V, V, V, dtype=torch.float64, generator=g)

    def logits(self, context):
        return self.table[context[-2], context[-1]]


class _TableOracle:
    """The draft as a :class:`DraftOracle` for one sequence with context ``context``."""

    def __init__(self, table, context):
        self.table, self.context = table, context

    def root(self):
        return self.table.logits(self.context)[None]

    def expand(self, tree, nodes):
        return torch.stack([self.table.logits(self.context + _path(tree, int(n))) for n in nodes[0]])[None]


def _path(tree, node):
    path = []
    while node > 0:
        path.append(int(tree.tokens[0, node]))
        node = int(tree.parents[0, node])
    return path[::-1]


class _Exhausted(Exception):
    pass


def _enumerate_trees(spec, oracle, root, warping):
    """Every tree ``draft_tree`` can draw, with its probability: the children draws are replaced by
    a script of outcomes, and each run that asks past the script is re-run once per outcome."""
    results = []

    def outcomes(q, k, replacement):
        support = [v for v in range(q.numel()) if q[v] > 0]
        if replacement:
            for seq in itertools.product(range(q.numel()), repeat=k):
                yield seq, [True] * k, math.prod(float(q[v]) for v in seq)
            return
        for seq in itertools.permutations(support, min(k, len(support))):
            prob, left = 1.0, 1.0
            for v in seq:
                prob *= float(q[v]) / left
                left -= float(q[v])
            pad = k - len(seq)
            yield seq + (0,) * pad, [True] * len(seq) + [False] * pad, prob

    def run(script):
        used = iter(script)
        weight = [1.0]

        def scripted(logits, k, warping, generator, backend, replacement):
            k = min(k, logits.shape[-1])
            q = warping.probs(logits, backend="reference")
            tokens, oks = [], []
            for row in q:
                options = list(outcomes(row, k, replacement))
                choice = next(used, None)
                if choice is None:
                    raise _Exhausted(len(options))
                seq, ok, prob = options[choice]
                weight[0] *= prob
                tokens.append(seq), oks.append(ok)
            tokens = torch.tensor(tokens, dtype=torch.long)
            return tokens, q.gather(1, tokens), torch.tensor(oks), q

        original = token_tree._children
        token_tree._children = scripted
        try:
            tree = draft_tree(spec, oracle, torch.tensor([root]), warping)
        except _Exhausted as more:
            for choice in range(more.args[0]):
                run([*script, choice])
            return
        finally:
            token_tree._children = original
        if weight[0] > 0:
            results.append((weight[0], tree))

    run([])
    return results


def _emitted_law(tree, target, context, warping, node=0, tokens=2):
    """Law of the next ``tokens`` emitted tokens from ``node`` of ``tree``, computed with the
    reference's SiblingRejection; after the step ends, later tokens follow the target (next step)."""
    p = warping.probs(target.logits(context), backend="reference")
    law = defaultdict(float)
    first_child, next_sibling = child_links(tree.parents, tree.valid)
    kids, child = [], int(first_child[0, node])
    while child >= 0:
        kids.append(child)
        child = int(next_sibling[0, child])
    reach = 1.0
    rejection = SiblingRejection(p, tree.draft_probs[0, node], replacement=tree.replacement)
    for child in kids:
        token = int(tree.tokens[0, child])
        alpha = float(rejection.acceptance(torch.tensor(token)))
        rest = (
            _emitted_law(tree, target, [*context, token], warping, child, tokens - 1)
            if tokens > 1
            else {(): 1.0}
        )
        for seq, w in rest.items():
            law[(token, *seq)] += reach * alpha * w
        reach *= 1 - alpha
        rejection.reject(torch.tensor(token))
    r = rejection.r
    for token in range(p.numel()):
        if r[token] > 0:
            after = (
                warping.probs(target.logits([*context, token]), backend="reference") if tokens > 1 else None
            )
            for nxt in range(p.numel()) if tokens > 1 else [None]:
                key = (token,) if nxt is None else (token, nxt)
                law[key] += reach * float(r[token]) * (1.0 if nxt is None else float(after[nxt]))
    return law


@pytest.mark.parametrize(
    ("mode", "V", "shape", "warping"),
    [
        ("static", 5, (3,), Warping(True, 1.0)),
        ("static", 4, (2, 1), Warping(True, 0.8, 3)),
        ("rsd", 6, (3,), Warping(True, 1.0)),
        ("rsd", 3, (2, 2), Warping(True, 1.3, None, 0.9)),
        ("dyspec", 4, 2, Warping(True, 1.0)),
        ("dyspec", 4, 3, Warping(True, 0.7, 3)),
    ],
)
def test_exact_law_of_the_first_two_tokens_by_enumeration(mode, V, shape, warping):
    """Σ over every draft tree of P(tree) · P(emitted tokens | tree) equals the target's law, for
    the first token and for the pair of the first two (to 1e-12)."""
    target = _Table(V, seed=V, scale=1.5)
    draft = _Table(V, seed=V + 1, scale=1.5, base=target, noise=1.0)
    context = [1, 2]
    if mode == "dyspec":
        spec = tree_spec("dyspec", shape, None, 2)
    else:
        spec = tree_spec(mode, None, shape, len(shape))
    trees = _enumerate_trees(spec, _TableOracle(draft, context), context[-1], warping)
    assert abs(sum(w for w, _ in trees) - 1) < 1e-12
    if mode == "dyspec":  # the shape depends on the draws: some trees are deep, some wide
        assert len({tuple(t.depths[0, t.valid[0]].tolist()) for _, t in trees}) > 1
    joint = defaultdict(float)
    for weight, tree in trees:
        for seq, w in _emitted_law(tree, target, list(context), warping).items():
            joint[seq] += weight * w
    p1 = warping.probs(target.logits(context), backend="reference")
    first = torch.zeros(V, dtype=torch.float64)
    expected = torch.zeros(V, V, dtype=torch.float64)
    got = torch.zeros(V, V, dtype=torch.float64)
    for (a, b), w in joint.items():
        got[a, b] += w
    for a in range(V):
        expected[a] = p1[a] * warping.probs(target.logits([*context, a]), backend="reference")
    first = got.sum(1)
    torch.testing.assert_close(first, p1, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------- chi-square, end to end
@pytest.mark.parametrize("mode", MODES)
def test_generate_two_token_law_chi_square(mode):
    """3000 sampled runs of one prompt through ``speculative_generate`` (one batch): the joint law
    of the first two tokens passes a chi-square test (fixed seed, p > 1e-3)."""
    V, N = 8, 3000
    target = tiny_causal_lm(LlamaForCausalLM, LlamaConfig, 32, 1, V, seed=11)
    draft = noisy_copy(target, 0.5, seed=12)
    prompt = torch.tensor([[3, 5, 7]])
    kw = {"tree_widths": (3, 1)} if mode != "dyspec" else {"tree_budget": 4}
    out = speculative_generate(
        target, draft, prompt.expand(N, -1), max_new_tokens=2, num_draft_tokens=2, do_sample=True,
        temperature=1.2, eos_token_id=[], tree=mode, generator=torch.Generator().manual_seed(5), **kw,
    )  # fmt: skip
    with torch.no_grad():
        p1 = torch.softmax(target(prompt).logits[0, -1] / 1.2, -1)
        nxt = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], dim=1)
        p2 = torch.softmax(target(nxt).logits[:, -1] / 1.2, -1)
    expected = (p1[:, None] * p2).flatten() * N
    pairs_ = out.sequences[:, 3] * V + out.sequences[:, 4]
    counts = torch.bincount(pairs_, minlength=V * V).double()
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    assert out.stats.tokens_per_target_call > 1


# ------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("name", ["llama-noisy", "qwen2-noisy", "toy-trained"])
def test_greedy_tree_decoding_equals_hf_generate(pairs, name):
    target, draft = pairs[name]
    vocab = target.config.vocab_size
    ids, mask = left_padded_prompts(4, 9, vocab, seed=len(name))
    alone = []
    for row in range(4):
        prompt = ids[row : row + 1, mask[row].bool()]
        ref = target.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=[])
        alone.append(ref[0, prompt.shape[1] :])
    stop = int(alone[1][5])  # an EOS inside sequence 1's continuation: it (at least) ends early
    ended = []
    for continuation in alone:
        hits = (continuation == stop).nonzero()
        ended.append(continuation[: hits[0, 0] + 1] if hits.numel() else continuation)
    configs = [
        ("static", {"tree_budget": 8}, "eqspec", []),
        ("rsd", {"tree_widths": (3, 2, 1)}, "eqspec", [stop]),
        ("dyspec", {"tree_budget": 10}, "eqspec", []),
        ("dyspec", {"tree_budget": 6}, "exspec", [stop]),
    ]
    for tree, kw, strategy, eos in configs:
        if strategy == "eqspec":  # a batch of one
            one = speculative_generate(
                target,
                draft,
                ids[:1],
                max_new_tokens=16,
                num_draft_tokens=4,
                eos_token_id=[],
                tree=tree,
                **kw,
            )
            assert torch.equal(one.sequences[0, 9:], alone[0]), (name, tree)
        out = speculative_generate(
            target, draft, ids, attention_mask=mask, max_new_tokens=16, num_draft_tokens=4, eos_token_id=eos,
            pad_token_id=0, tree=tree, strategy=strategy, **kw,
        )  # fmt: skip
        for row in range(4):
            expected = ended[row] if eos else alone[row]
            got = out.sequences[row, 9:]
            assert torch.equal(got[: expected.numel()], expected), (name, tree, strategy, row)
            assert (got[expected.numel() :] == 0).all()
        stats = out.stats
        assert stats.target_calls < 16 and stats.tokens_per_target_call > 1
        spec = tree_spec(tree, kw.get("tree_budget"), kw.get("tree_widths"), 4)
        assert 1 <= stats.mean_tree_size <= spec.budget
        assert set(stats.phase_seconds) == {"draft", "tree", "target", "verify", "commit"}


def test_tokenlab_attention_models_verify_trees_through_the_tree_flag(pairs, monkeypatch):
    """Target and draft on ``attn_implementation="tokenlab"``: every tree forward reaches the
    attention with the packed ``tree`` flag and a 2-D mask, and greedy output equals generate."""
    attn = register_attention()
    target = tiny_causal_lm(LlamaForCausalLM, LlamaConfig, 32, 2, 64, seed=0, attn_implementation=attn)
    draft = noisy_copy(target, 0.15, seed=2)
    seen = []
    original = tokenlab.attention.hf.tokenlab_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((None if attention_mask is None else attention_mask.dim(), "tokenlab_tree" in kwargs))
        return original(module, query, key, value, attention_mask, **kwargs)

    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, "tokenlab", spy)
    ids, mask = left_padded_prompts(2, 7, 64, seed=14)
    out = speculative_generate(
        target, draft, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], pad_token_id=0,
        tree="dyspec", tree_budget=6,
    )  # fmt: skip
    assert any(has_tree for _, has_tree in seen) and all(dim != 4 for dim, _ in seen)
    monkeypatch.undo()
    for row in range(2):
        prompt = ids[row : row + 1, mask[row].bool()]
        ref = target.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=[])
        assert torch.equal(out.sequences[row, 7:], ref[0, prompt.shape[1] :])


# ------------------------------------------------------------------------------------ caches
@pytest.mark.parametrize("mode", ["rsd", "dyspec"])
def test_caches_after_a_tree_step_equal_a_plain_forward(pairs, mode):
    """One tree step with realignment (B = 3, ragged): each sequence's target cache equals the
    cache of a plain forward over its committed tokens, and the draft cache over the prefix it
    holds."""
    target, draft = pairs["llama-noisy"]
    ids, mask = left_padded_prompts(3, 7, 64, seed=13)
    group = _Group(
        torch.arange(3), ids, mask, DynamicCache(config=target.config), DynamicCache(config=draft.config)
    )
    warping = Warping(True, 0.3)
    spec = tree_spec(mode, 12, None, 4)
    sampling = _Sampling(warping, torch.Generator().manual_seed(2), "reference", "reference", spec)
    from tokenlab.decoding.speculative import SpeculativeStats

    stats = SpeculativeStats()
    accepted = set()
    for _ in range(3):
        verified = _tree_step(target, draft, group, sampling, stats, _Clock(stats, torch.device("cpu")))
        accepted.update(verified.num_accepted.tolist())
        group = _commit(verified, torch.arange(3), 0)
        for model, cache in ((target, group.target_cache), (draft, group.draft_cache)):
            length = cache.get_seq_length()
            assert length >= 1
            for b in range(3):
                real = group.mask[b, :length].bool()
                tokens = group.ids[b, :length][real]
                plain = DynamicCache(config=model.config)
                model(tokens[None], **cache_kwargs(model, plain))
                for layer, fresh in zip(cache.layers, plain.layers):
                    torch.testing.assert_close(layer.keys[b][:, real], fresh.keys[0], rtol=1e-10, atol=1e-10)
                    torch.testing.assert_close(
                        layer.values[b][:, real], fresh.values[0], rtol=1e-10, atol=1e-10
                    )
        assert group.target_cache.get_seq_length() == group.ids.shape[1] - 1
    assert len(accepted) > 1


# --------------------------------------------------------------------------------- bad input
def test_bad_tree_arguments(pairs):
    target, draft = pairs["llama-noisy"]
    ids = torch.tensor([[5, 6, 7]])
    cases = [
        (dict(tree="beam"), ValueError, "`tree`"),
        (dict(tree="dyspec", tree_budget=65), ValueError, "`tree_budget`"),
        (dict(tree="dyspec", tree_budget=0), ValueError, "`tree_budget`"),
        (dict(tree="dyspec", tree_widths=(2, 1)), ValueError, "`tree_widths`"),
        (dict(tree="rsd", tree_widths=(2, 0)), ValueError, r"`tree_widths\[1\]`"),
        (dict(tree="rsd", tree_widths=(8, 8)), ValueError, "at most 64"),
        (dict(tree="static", tree_widths=()), ValueError, "`tree_widths`"),
        (dict(tree="static", tree_widths=(2, 2), tree_budget=5), ValueError, "disagrees"),
        (dict(tree="static", tree_widths=(2.0,)), TypeError, r"`tree_widths\[0\]`"),
        (dict(tree_budget=8), ValueError, "need a `tree`"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            speculative_generate(target, draft, ids, max_new_tokens=3, **kwargs)
    assert tree_spec("rsd", 16, None, 4).widths == (2, 2, 1, 1)
    assert tree_spec("rsd", 8, None, 4).widths == (2, 1, 1, 1)
    assert tree_spec("static", 32, None, 4) == tree_spec("static", None, (2, 2, 2, 2), 9)
    assert tree_spec("static", 3, None, 4).widths == (1, 1, 1)

    logits, q, tokens, _, parents, valid, uniforms, noise = _verify_inputs(2, 4, 10, torch.float64, seed=0)
    bad_parents = parents.clone()
    bad_parents[0, 3] = 3
    with pytest.raises(ValueError, match="`parents`"):
        tree_verify(logits, q, tokens, bad_parents)
    with pytest.raises(ValueError, match="`tokens`"):
        tree_verify(logits, q, tokens[:, :3], parents)
    with pytest.raises(ValueError, match="`tokens`"):
        tree_verify(logits, q, tokens + 10, parents)
    with pytest.raises(ValueError, match="`valid`"):
        tree_verify(logits, q, tokens, parents, valid=~valid)
    with pytest.raises(ValueError, match="`exponentials`"):
        tree_verify(logits, q, tokens, parents, do_sample=True, uniforms=uniforms, exponentials=noise[:, :3])
    with pytest.raises(TypeError, match="`replacement`"):
        tree_verify(logits, q, tokens, parents, replacement=1)
    with pytest.raises(ValueError, match="`tree`"):
        flash_attention(*(torch.randn(1, 1, 4, 16),) * 3, tree=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="`tree`"):
        flash_attention(*(torch.randn(1, 1, 4, 16),) * 3, tree=torch.zeros(1, 2, dtype=torch.int32))
