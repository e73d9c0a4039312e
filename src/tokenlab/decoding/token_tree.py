"""Token trees for speculative decoding: one structure, three ways to draft it, one target forward.

A draft proposes a *tree* of continuations instead of one chain; the target scores every node in
one forward (each node attends to the committed tokens and its own ancestors, at the position of
its depth) and verification keeps the longest root path it accepts
(:mod:`tokenlab.kernels.tree_verify`). Three drafting modes share :class:`TokenTree`:

* ``"static"`` — a fixed shape, ``widths[d]`` children per node at depth ``d``; children are the
  draft's top tokens (greedy) or i.i.d. draws from its warped distribution, verified by the
  multi-candidate rule of *SpecInfer: Accelerating Large Language Model Serving with Tree-based
  Speculative Inference and Verification* (the baseline both papers below compare with).
* ``"rsd"`` — *Recursive Speculative Decoding: Accelerating LLM Inference via Sampling Without
  Replacement* (RSD with constant branching): the same shapes, but the children of a node are
  drawn *without replacement* by Gumbel-top-k (here the equivalent exponential race: the ``k``
  largest ``q_v / E_v``, ``E_v ~ Exp(1)``), and verified by recursive rejection sampling, which
  removes each rejected token from ``q``.
* ``"dyspec"`` — *DySpec: Faster Speculative Decoding with Dynamic Token Tree Structure*: the tree
  grows greedily, one node at a time, always at the open slot with the highest value, under a node
  budget and a depth cap. A node's value is its draft path probability ``Π q(token | path)``; the
  slot for the next child of node ``n`` is worth ``value(n) · (1 − Σ q_n(children drawn so far))``,
  the probability that verification reaches that slot under the paper's estimate "acceptance ≈
  draft probability". A slot's token is the draft's next most likely token (greedy) or the next
  draw without replacement (sampling, verified by RSD's recursive rule). The slot value never looks
  at the token the slot will draw: the shape depends on past draws only, which keeps verification
  exact.

Draft forwards are batched by rounds: a round opens slots in value order until the best slot belongs
to a node whose draft distribution is not computed yet, then one draft call scores every such node
of the batch (DySpec); or one draft call per level (static, RSD). A tree of depth ``D`` costs
``D`` draft calls for static/RSD, like a chain of ``D`` tokens.

The target forward (:func:`tree_forward`) feeds the committed tokens the cache lacks and the tree
nodes, with position ids ``(position of the root) + depth``, and an ancestor-only mask: a 4-D
boolean mask for any Hugging Face model, or — for models with ``attn_implementation="tokenlab"`` —
the packed ancestor bitmasks of :class:`~tokenlab.kernels.attention.AttentionVariant`'s ``tree``
flag with the ordinary 2-D padding mask, so no dense mask is built.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from transformers import Cache, PreTrainedModel

from tokenlab._checks import check_choice, check_int
from tokenlab._hf import cache_kwargs
from tokenlab.backend import Backend
from tokenlab.kernels.attention import MAX_TREE_NODES
from tokenlab.kernels.warping import Warping

TREE_MODES: tuple[str, ...] = ("static", "rsd", "dyspec")
DEFAULT_TREE_BUDGET = 16
TOKENLAB_ATTENTION = "tokenlab"  # attn_implementation whose kernel takes the packed `tree` flag
TREE_KWARG = "tokenlab_tree"  # the per-call flag keyword of the tokenlab attention


@dataclass(frozen=True)
class TreeSpec:
    """How to draft a tree (validated by :func:`tree_spec`): ``mode``, the node ``budget``, the depth
    cap ``depth``, and for static/RSD the ``widths`` (children per node at each depth)."""

    mode: str
    budget: int
    depth: int
    widths: tuple[int, ...] = ()

    @property
    def replacement(self) -> bool:
        """Whether siblings are drawn with replacement when sampling (static) or without (RSD, DySpec)."""
        return self.mode == "static"


def tree_spec(
    tree: str | None, budget: int | None, widths: Sequence[int] | None, depth: int
) -> TreeSpec | None:
    """Validate the tree arguments of :func:`~tokenlab.decoding.speculative_generate` (``None``: a
    chain, and then ``budget`` and ``widths`` must be ``None`` too).

    ``depth`` (its ``num_draft_tokens``) caps the depth. Static/RSD shapes are ``widths``, or by
    default two children per node on the first ``b`` levels and one below, down to ``depth``, with
    the largest ``b`` whose tree fits in ``budget`` (budget 16, depth 4: ``(2, 2, 1, 1)``, 14 nodes;
    budget 8: ``(2, 1, 1, 1)``). DySpec grows ``budget`` nodes (default 16). A tree has at most 64
    nodes.
    """
    if tree is None:
        if budget is not None or widths is not None:
            raise ValueError("`tree_budget` and `tree_widths` need a `tree` ('static', 'rsd' or 'dyspec')")
        return None
    check_choice("tree", tree, TREE_MODES)
    if widths is not None:
        if tree == "dyspec":
            raise ValueError("`tree_widths` sets the shape of static and rsd trees; dyspec grows its own")
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
            raise ValueError(f"`tree_widths` must be a non-empty sequence of ints >= 1, got {widths!r}")
        widths = tuple(check_int(f"tree_widths[{i}]", w, low=1) for i, w in enumerate(widths))
        nodes = _num_nodes(widths)
        if nodes > MAX_TREE_NODES:
            raise ValueError(
                f"`tree_widths` {widths} make {nodes} nodes; a tree has at most {MAX_TREE_NODES}"
            )
        if budget is not None and check_int("tree_budget", budget, low=1) != nodes:
            raise ValueError(f"`tree_budget`={budget} disagrees with `tree_widths` {widths} ({nodes} nodes)")
        return TreeSpec(tree, nodes, len(widths), widths)
    budget = DEFAULT_TREE_BUDGET if budget is None else budget
    budget = check_int("tree_budget", budget, low=1, high=MAX_TREE_NODES)
    if tree == "dyspec":
        return TreeSpec(tree, budget, depth)
    depth = min(depth, budget)
    branching = 0
    while branching < depth and _num_nodes(_binary_then_chains(branching + 1, depth)) <= budget:
        branching += 1
    widths = _binary_then_chains(branching, depth)
    return TreeSpec(tree, _num_nodes(widths), depth, widths)


def _binary_then_chains(levels: int, depth: int) -> tuple[int, ...]:
    return (2,) * levels + (1,) * (depth - levels)


def _num_nodes(widths: tuple[int, ...]) -> int:
    """Nodes of the tree with ``widths[d]`` children per node at depth ``d``."""
    return sum(math.prod(widths[: d + 1]) for d in range(len(widths)))


# --------------------------------------------------------------------------------- the tree
@dataclass
class TokenTree:
    """``B`` draft trees of ``N + 1`` node slots; slot 0 is the root (the last committed token),
    every other valid node has a parent of smaller index, siblings are in the order drawn.

    Attributes:
        tokens: ``[B, N+1]`` int64 (0 in invalid slots).
        parents: ``[B, N+1]`` int64, ``-1`` for the root and invalid slots.
        depths: ``[B, N+1]`` int64, 0 for the root.
        valid: ``[B, N+1]`` bool.
        ancestors: ``[B, N+1, N+1]`` bool, ``ancestors[b, i, j]``: ``j`` is ``i`` or one of its ancestors.
        draft_probs: ``[B, N+1, V]`` the draft's warped distribution at each node that has children
            (sampling), else ``None``.
        replacement: siblings drawn with replacement (verify with SpecInfer's rule) or without
            (RSD's rule).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    valid: torch.Tensor
    ancestors: torch.Tensor
    draft_probs: torch.Tensor | None
    replacement: bool

    @property
    def num_nodes(self) -> int:
        """``N``, the node slots after the root."""
        return self.tokens.shape[1] - 1

    def trimmed(self) -> TokenTree:
        """The same trees without the trailing slots that no sequence uses."""
        used = int(
            torch.where(self.valid, torch.arange(self.valid.shape[1], device=self.valid.device), 0).max()
        )
        n1 = used + 1
        probs = None if self.draft_probs is None else self.draft_probs[:, :n1]
        return replace(
            self, tokens=self.tokens[:, :n1], parents=self.parents[:, :n1], depths=self.depths[:, :n1],
            valid=self.valid[:, :n1], ancestors=self.ancestors[:, :n1, :n1], draft_probs=probs,
        )  # fmt: skip

    def visibility(self, column_nodes: torch.Tensor) -> torch.Tensor:
        """Attention among tree columns: ``[B, R, R]`` bool for ``column_nodes [B, R]`` (the node held by
        each column, ``-1`` for a padding column); column ``a`` sees column ``c`` when ``c`` holds ``a``'s
        node or an ancestor of it. Every column sees itself (padding rows stay finite)."""
        R = column_nodes.shape[1]
        node = column_nodes.clamp(min=0)
        rows = self.ancestors.gather(1, node[:, :, None].expand(-1, -1, self.ancestors.shape[2]))
        seen = rows.gather(2, node[:, None, :].expand(-1, R, -1))
        real = column_nodes >= 0
        eye = torch.eye(R, dtype=torch.bool, device=node.device)
        return (seen & real[:, :, None] & real[:, None, :]) | eye


def pack_bits(visible: torch.Tensor) -> torch.Tensor:
    """``[B, R, R]`` bool (R ≤ 64) → ``[B, R]`` int64 bitmasks, bit ``c`` of row ``a`` = ``visible[:, a, c]``
    (the ``tree`` flag of :class:`~tokenlab.kernels.attention.AttentionVariant`)."""
    R = visible.shape[-1]
    weights = torch.ones(R, dtype=torch.int64, device=visible.device) << torch.arange(
        R, device=visible.device
    )
    return (visible.long() * weights).sum(dim=-1)  # distinct bits: the sum is the bitwise or


class _TreeBuilder:
    """Growing trees: preallocated ``[B, budget + 1]`` slots, filled by :meth:`add`."""

    def __init__(self, root_tokens: torch.Tensor, budget: int, vocab: int | None, dtype: torch.dtype) -> None:
        B, n1, device = root_tokens.shape[0], budget + 1, root_tokens.device
        self.tokens = torch.zeros(B, n1, dtype=torch.long, device=device)
        self.tokens[:, 0] = root_tokens
        self.parents = torch.full((B, n1), -1, dtype=torch.long, device=device)
        self.depths = torch.zeros(B, n1, dtype=torch.long, device=device)
        self.valid = torch.zeros(B, n1, dtype=torch.bool, device=device)
        self.valid[:, 0] = True
        self.ancestors = torch.zeros(B, n1, n1, dtype=torch.bool, device=device)
        self.ancestors[:, 0, 0] = True
        self.draft_probs = None if vocab is None else torch.zeros(B, n1, vocab, dtype=dtype, device=device)

    def add(
        self, rows: torch.Tensor, slots: torch.Tensor, parents: torch.Tensor, tokens: torch.Tensor
    ) -> None:
        """New nodes ``(rows[i], slots[i])`` with existing parents ``parents[i]`` and ``tokens[i]``."""
        self.tokens[rows, slots] = tokens
        self.parents[rows, slots] = parents
        self.depths[rows, slots] = self.depths[rows, parents] + 1
        self.valid[rows, slots] = True
        self.ancestors[rows, slots] = self.ancestors[rows, parents]
        self.ancestors[rows, slots, slots] = True

    def tree(self, replacement: bool) -> TokenTree:
        return TokenTree(
            self.tokens, self.parents, self.depths, self.valid, self.ancestors, self.draft_probs, replacement
        )


# ------------------------------------------------------------------------------- drafting
class DraftOracle(Protocol):
    """What drafting asks of the draft: raw next-token logits at the root, then at tree nodes."""

    def root(self) -> torch.Tensor:
        """``[B, V]`` logits after the committed tokens (at the root)."""

    def expand(self, tree: TokenTree, nodes: torch.Tensor) -> torch.Tensor:
        """``[B, M, V]`` logits at the nodes ``nodes [B, M]`` of ``tree`` (``-1``: padding)."""


def _children(
    logits: torch.Tensor, k: int, warping: Warping, generator, backend: Backend, replacement: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``k`` children for each row of ``logits [R, V]``, in the order drawn: ``tokens [R, k]``, their
    draft probabilities ``[R, k]``, ``ok [R, k]`` (false past the support of ``q``) and the warped ``q
    [R, V]`` they come from (``None`` when greedy: then the top-``k`` tokens of ``softmax(logits)``)."""
    k = min(k, logits.shape[-1])
    if not warping.do_sample:
        top = torch.softmax(logits, dim=-1).topk(k, dim=-1)
        return top.indices, top.values, torch.ones_like(top.indices, dtype=torch.bool), None
    q = warping.probs(logits, backend=backend)
    if replacement:
        tokens = torch.multinomial(q, k, replacement=True, generator=generator)
        return tokens, q.gather(1, tokens), torch.ones_like(tokens, dtype=torch.bool), q
    # Without replacement: the k first arrivals of the exponential race (Gumbel-top-k).
    race = (q / torch.empty_like(q).exponential_(generator=generator)).topk(k, dim=-1)
    return race.indices, q.gather(1, race.indices), race.values > 0, q


def draft_tree(
    spec: TreeSpec,
    oracle: DraftOracle,
    root_tokens: torch.Tensor,
    warping: Warping,
    *,
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
) -> TokenTree:
    """Draft one tree per sequence (``root_tokens [B]``, the last committed tokens) as ``spec`` says,
    asking ``oracle`` for the draft's logits. Sampling draws come from ``generator``."""
    root_logits = oracle.root()
    acc = torch.promote_types(root_logits.dtype, torch.float32)
    vocab = root_logits.shape[-1] if warping.do_sample else None
    builder = _TreeBuilder(root_tokens, spec.budget, vocab, acc)
    draw = dict(warping=warping, generator=generator, backend=backend, replacement=spec.replacement)
    if spec.mode == "dyspec":
        _grow_dyspec(spec, builder, oracle, root_logits.to(acc), draw)
    else:
        _grow_levels(spec, builder, oracle, root_logits.to(acc), draw)
    return builder.tree(spec.replacement)


def _grow_levels(spec: TreeSpec, builder: _TreeBuilder, oracle: DraftOracle, root_logits, draw) -> None:
    """Static and RSD: ``widths[d]`` children for every node at depth ``d``, one draft call per level."""
    B, device = root_logits.shape[0], root_logits.device
    level = torch.zeros(B, 1, dtype=torch.long, device=device)
    logits = root_logits[:, None]
    first = 1
    for d, width in enumerate(spec.widths):
        if d:
            logits = oracle.expand(builder.tree(spec.replacement), level).to(root_logits.dtype)
        M, V = logits.shape[1:]
        tokens, _probs, ok, q = _children(logits.reshape(B * M, V), width, **draw)
        if q is not None:
            forwarded = (level >= 0).nonzero(as_tuple=True)
            builder.draft_probs[forwarded[0], level[forwarded]] = q.reshape(B, M, V)[forwarded]
        width = tokens.shape[1]
        parents = level.repeat_interleave(width, dim=1)
        ok = ok.reshape(B, M * width) & (parents >= 0)
        slots = first + torch.arange(M * width, device=device).expand(B, -1)
        hit = ok.nonzero(as_tuple=True)
        builder.add(hit[0], slots[hit], parents[hit], tokens.reshape(B, M * width)[hit])
        level = torch.where(ok, slots, -1)
        first += M * width


def _grow_dyspec(spec: TreeSpec, builder: _TreeBuilder, oracle: DraftOracle, root_logits, draw) -> None:
    """DySpec: best-first growth by slot value under the budget and the depth cap (see the module).

    Slot ``s`` of node ``n`` (its ``s``-th child, once drawn) is worth ``value(n) · (1 − Σ_{j<s} q_n(c_j))``,
    known before the token is drawn. A round pops slots in value order until the best one belongs
    to a node whose draft distribution is not computed yet; one draft call then scores every node
    the round created, for the whole batch, and the next round goes on. The result is the tree of
    the one-node-at-a-time algorithm."""
    B, device = root_logits.shape[0], root_logits.device
    budget, cap = spec.budget, spec.depth
    k = min(budget, root_logits.shape[-1])
    value = [[1.0] for _ in range(B)]  # draft path probability of each node
    depth = [[0] for _ in range(B)]
    # node -> (tokens in draw order, their draft probabilities, inside the support, reach of each slot)
    order: list[dict[int, tuple[list[int], list[float], list[bool], list[float]]]] = [{} for _ in range(B)]
    heaps: list[list[tuple[float, int, int, int]]] = [[] for _ in range(B)]
    tie = iter(range(1 << 62))  # first come, first served among equal values

    def register(nodes: list[list[int]], logits: torch.Tensor) -> None:
        """Record the order in which each forwarded node draws its children."""
        M, V = logits.shape[1:]
        tokens, probs, ok, q = _children(logits.reshape(B * M, V), k, **draw)
        reach = (1 - torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))).clamp(min=0)
        if q is not None:
            where = [(b, m, node) for b, row in enumerate(nodes) for m, node in enumerate(row)]
            b_, m_, node_ = torch.tensor(where, dtype=torch.long, device=device).unbind(1)
            builder.draft_probs[b_, node_] = q.reshape(B, M, V)[b_, m_]
        lists = [t.reshape(B, M, -1).tolist() for t in (tokens, probs, ok, reach)]
        for b, row in enumerate(nodes):
            for m, node in enumerate(row):
                order[b][node] = tuple(x[b][m] for x in lists)

    def push(b: int, priority: float, node: int, slot: int) -> None:
        heapq.heappush(heaps[b], (-priority, next(tie), node, slot))

    register([[0] for _ in range(B)], root_logits[:, None])
    for b in range(B):
        push(b, 1.0, 0, 0)
    count = [1] * B
    while True:
        rows, slots, parents, tokens = [], [], [], []
        pending: list[list[int]] = [[] for _ in range(B)]
        for b in range(B):
            heap = heaps[b]
            while count[b] <= budget and heap and heap[0][2] in order[b]:
                _, _, node, slot = heapq.heappop(heap)
                toks, probs, ok, reach = order[b][node]
                if not ok[slot]:  # the draft's support is used up at this node
                    continue
                child = count[b]
                count[b] += 1
                rows.append(b), slots.append(child), parents.append(node), tokens.append(toks[slot])
                value[b].append(value[b][node] * probs[slot])
                depth[b].append(depth[b][node] + 1)
                if depth[b][child] < cap:
                    push(b, value[b][child], child, 0)
                    pending[b].append(child)
                if slot + 1 < len(toks):
                    push(b, value[b][node] * reach[slot + 1], node, slot + 1)
        if rows:
            new = (torch.tensor(x, dtype=torch.long, device=device) for x in (rows, slots, parents, tokens))
            builder.add(*new)
        pending = [p if count[b] <= budget else [] for b, p in enumerate(pending)]
        width = max(len(p) for p in pending)
        if width == 0:
            return
        nodes = torch.tensor([p + [-1] * (width - len(p)) for p in pending], device=device)
        logits = oracle.expand(builder.tree(spec.replacement), nodes).to(root_logits.dtype)
        register(pending, logits)


# ----------------------------------------------------------------------------- forwards
def _attention_kwargs(
    model: PreTrainedModel, mask: torch.Tensor, region: torch.Tensor | None, num_queries: int
) -> dict[str, torch.Tensor]:
    """The mask arguments of a forward whose keys are ``mask [B, L]``'s committed columns then ``R``
    tree columns with visibility ``region [B, R, R]``, and whose queries are the last
    ``num_queries`` key columns: the 2-D mask plus the packed ``tree`` flag on tokenlab attention
    (R ≤ 64), else a 4-D boolean mask (causal among the committed columns, padding hidden, each
    query sees itself)."""
    if region is None:
        return {"attention_mask": mask}
    B, L = mask.shape
    R = region.shape[-1]
    keys = torch.cat([mask.bool(), torch.ones(B, R, dtype=torch.bool, device=mask.device)], dim=1)
    if getattr(model.config, "_attn_implementation", None) == TOKENLAB_ATTENTION and R <= MAX_TREE_NODES:
        return {"attention_mask": keys.long(), TREE_KWARG: pack_bits(region)}
    K = L + R
    query = torch.arange(K - num_queries, K, device=mask.device)[:, None]
    key = torch.arange(K, device=mask.device)[None, :]
    visible = ((key <= query) & keys[:, None, :]) | (key == query)
    in_tree = query[:, 0] >= L
    visible[:, in_tree, L:] = region[:, query[in_tree, 0] - L]
    return {"attention_mask": visible[:, None]}


def tree_forward(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cache: Cache,
    logits_to_keep: int,
    tokens: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """One forward over the committed columns of ``ids``/``mask [B, L]`` that ``cache`` lacks, then the
    tree columns ``tokens [B, M]`` at ``positions [B, M]``; ``region [B, R, R]`` is the visibility
    among the cache's tree columns and the new ones (the last ``R`` keys). Returns the logits of the
    last ``logits_to_keep`` columns; ``cache`` grows by every fed column."""
    start = min(cache.get_seq_length(), ids.shape[1])
    committed = (mask.cumsum(dim=-1) - 1).clamp(min=0)[:, start:]
    inputs, position_ids = ids[:, start:], committed
    if tokens is not None:
        inputs = torch.cat([inputs, tokens], dim=1)
        position_ids = torch.cat([committed, positions], dim=1)
    out = model(
        input_ids=inputs,
        position_ids=position_ids,
        use_cache=True,
        **cache_kwargs(model, cache),
        logits_to_keep=logits_to_keep,
        **_attention_kwargs(model, mask, region, inputs.shape[1]),
    )
    return out.logits


def score_tree(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, cache: Cache, tree: TokenTree
) -> torch.Tensor:
    """The target's one forward over a tree: logits ``[B, N+1, V]`` at the root and every node (the
    node columns follow the committed ones in the cache, node ``i`` at column ``L + i − 1``)."""
    N = tree.num_nodes
    nodes = torch.arange(1, N + 1, device=ids.device).expand(ids.shape[0], -1)
    root = mask.sum(dim=1, keepdim=True) - 1
    return tree_forward(
        model, ids, mask, cache, N + 1, tree.tokens[:, 1:], root + tree.depths[:, 1:], tree.visibility(nodes)
    )


class DraftModelOracle:
    """A draft model as a :class:`DraftOracle` over the committed ``ids``/``mask [B, L]`` and its
    ``cache``: :meth:`root` feeds the committed columns the cache lacks; :meth:`expand` appends the
    asked nodes as new cache columns (``column_nodes`` records which node each holds)."""

    def __init__(self, model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, cache: Cache) -> None:
        self.model, self.ids, self.mask, self.cache = model, ids, mask, cache
        self.root_positions = mask.sum(dim=1, keepdim=True) - 1
        self.column_nodes = ids.new_empty(ids.shape[0], 0)
        self.calls = 0
        self.seconds = 0.0

    def _timed(self, fn):
        start = time.perf_counter()
        out = fn()
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return out

    def root(self) -> torch.Tensor:
        return self._timed(lambda: tree_forward(self.model, self.ids, self.mask, self.cache, 1)[:, -1])

    def expand(self, tree: TokenTree, nodes: torch.Tensor) -> torch.Tensor:
        self.column_nodes = torch.cat([self.column_nodes, nodes], dim=1)
        index = nodes.clamp(min=0)
        tokens = tree.tokens.gather(1, index)
        positions = self.root_positions + tree.depths.gather(1, index)
        region = tree.visibility(self.column_nodes)
        return self._timed(
            lambda: tree_forward(
                self.model, self.ids, self.mask, self.cache, nodes.shape[1], tokens, positions, region
            )
        )

    def node_columns(self, num_slots: int) -> torch.Tensor:
        """``[B, num_slots]``: the cache column holding each node (``-1``: not in the cache)."""
        B, R = self.column_nodes.shape
        columns = torch.full((B, num_slots + 1), -1, dtype=torch.long, device=self.ids.device)
        held = torch.where(self.column_nodes >= 0, self.column_nodes, num_slots)  # padding → a spare slot
        position = self.ids.shape[1] + torch.arange(R, device=self.ids.device).expand(B, -1)
        columns.scatter_(1, held, position)
        return columns[:, :num_slots]
