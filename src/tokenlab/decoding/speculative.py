"""Speculative decoding — chain and batched — for any pair of HF causal LMs sharing a vocabulary.

*Fast Inference from Transformers via Speculative Decoding* (Leviathan et al.) and *Accelerating
Large Language Model Decoding with Speculative Sampling* (Chen et al.): a draft model proposes
``k`` tokens autoregressively, the target scores all of them in one forward, and
:func:`tokenlab.kernels.speculative_verify.speculative_verify` accepts a prefix and emits one more token, so
every target call yields 1..k+1 tokens while the output law equals the target's (sampling) or
its greedy continuation exactly (greedy).

Batches follow *Batch Speculative Decoding Done Right* (Zhang et al.): sequences accept different
numbers of tokens (the *ragged tensor problem*), so after every step the batch is realigned:

* ``strategy="eqspec"`` — the whole batch steps together; after verification each sequence's
  tokens, attention mask and both KV caches are *unpadded and repadded* (gathered) so that every
  sequence is again right-aligned with left padding, and position ids follow from the mask.
* ``strategy="exspec"`` — a pool of sequences (the input batch); each step takes a group of up
  to ``group_size`` sequences of the *same* length (no padding, no realignment; caches are
  concatenated), topping the group up with the nearest lengths (realigned as in EQSPEC) only when
  too few share a length.

Token trees (``tree="static" | "rsd" | "dyspec"``, :mod:`tokenlab.decoding.token_tree`) replace the
chain by a drafted tree scored in one target forward and verified by
:func:`tokenlab.kernels.tree_verify.verify_tree_block`; the loop, the batching and the realignment
are the same: a step hands :func:`_commit` the accepted path (its tokens and the cache columns
that hold them), whatever drafted it.

A batch of one is the chain algorithm. Layout invariant of a group (tokens ``[G, L]``, left
padded): the target cache covers columns ``[0, L − 1)`` (all but the last token), the draft cache
``[0, C_d)`` with ``C_d ≤ L − 1``; each forward feeds the uncached columns, with
``position_ids = cumsum(mask) − 1``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from tokenlab._checks import check_choice, check_generator, check_int
from tokenlab.backend import Backend, resolve_backend
from tokenlab.decoding.incremental import check_causal_lm, check_prompts, eos_token_ids, pad_token_id_for
from tokenlab.decoding.token_tree import (
    DraftModelOracle,
    TreeSpec,
    draft_tree,
    score_tree,
    tree_forward,
    tree_spec,
)
from tokenlab.kernels.speculative_verify import verify_block
from tokenlab.kernels.tree_verify import child_links, verify_tree_block
from tokenlab.kernels.warping import Warping

Strategy = Literal["eqspec", "exspec"]
STRATEGIES: tuple[str, ...] = ("eqspec", "exspec")


@dataclass
class SpeculativeStats:
    """Counters of one :func:`speculative_generate` call.

    ``steps`` counts (sequence, target call) pairs; ``accepted``/``drafted`` count draft tokens
    (chain tokens or tree nodes) over all steps; ``new_tokens`` the tokens returned (after cutting
    at EOS / ``max_new_tokens``). ``phase_seconds`` splits the wall-clock time by phase: ``"draft"``
    (draft forwards), ``"tree"`` (tree bookkeeping and drawing between draft forwards), ``"target"``
    (the target forward), ``"verify"`` (the verification, its random numbers included) and
    ``"commit"`` (recording tokens, realigning the batch and its caches); on CUDA each phase ends
    with a synchronisation.
    """

    target_calls: int = 0
    draft_calls: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (for trees: accepted path nodes / tree nodes)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        """Tokens emitted per sequence per target call (accepted drafts + 1), before truncation."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """The same as :attr:`tokens_per_target_call`."""
        return self.tokens_per_target_call

    @property
    def mean_tree_size(self) -> float:
        """Draft tokens scored per sequence per target call (``k`` for a chain, the nodes of a tree)."""
        return self.drafted / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


@dataclass
class SpeculativeOutput:
    """``sequences [B, P + N]``: the prompt (as given) followed by the generated tokens, padded
    with ``pad_token_id`` after a sequence ends, as ``generate`` returns them; and the stats."""

    sequences: torch.Tensor
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)


@dataclass
class _Sampling:
    warping: Warping
    generator: torch.Generator | None
    backend: Backend
    impl: str  # the verification kernel's implementation, resolved once
    tree: TreeSpec | None  # None: chain drafting of k tokens


class _Clock:
    """Adds the time since the previous lap to ``stats.phase_seconds[phase]``."""

    def __init__(self, stats: SpeculativeStats, device: torch.device) -> None:
        self.stats, self.device, self.last = stats, device, time.perf_counter()

    def lap(self, phase: str, exclude: float = 0.0) -> None:
        """Close ``phase`` (minus ``exclude`` seconds, already counted elsewhere)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        seconds = self.stats.phase_seconds
        seconds[phase] = seconds.get(phase, 0.0) + now - self.last - exclude
        self.last = now


@dataclass
class _Group:
    """Sequences stepping together: ``rows`` (indices into the batch), left-padded ``ids``/``mask``
    ``[G, L]``, and the two caches (target covering ``L − 1`` columns, draft ``≤ L − 1``)."""

    rows: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    target_cache: DynamicCache
    draft_cache: DynamicCache

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


@dataclass
class _Verified:
    """A group right after verification: ``num_accepted [G]`` and ``next_tokens [G, D+1]`` (the
    accepted tokens, the emitted one, then ``-1``), and for the ``D`` path slots the cache column of
    each accepted token in the target's and the draft's cache (``-1``: not in the draft cache)."""

    group: _Group
    num_accepted: torch.Tensor
    next_tokens: torch.Tensor
    target_columns: torch.Tensor
    draft_columns: torch.Tensor


# ------------------------------------------------------------------------------------ caches
def _cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _gather_cache(cache: DynamicCache, rows: torch.Tensor, columns: torch.Tensor) -> DynamicCache:
    """New cache holding ``cache[rows, :, columns[i], :]`` for ``columns [G', C']``."""
    layers = []
    for keys, values in _cache_tensors(cache):
        index = columns[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        layers.append((keys[rows].gather(2, index), values[rows].gather(2, index)))
    return DynamicCache(ddp_cache_data=layers)


def _cat_caches(caches: list[DynamicCache], sizes: list[int], pads: list[int], length: int) -> DynamicCache:
    """Concatenate caches (of ``sizes[i]`` rows) along the batch after left-padding cache ``i`` by
    ``pads[i]`` columns, keeping the first ``length`` columns (an empty cache gives padding only)."""
    if length == 0:
        return DynamicCache()
    template = _cache_tensors(next(c for c in caches if c.get_seq_length() > 0))
    per_cache = [
        _cache_tensors(cache)
        if cache.get_seq_length() > 0
        else [tuple(x.new_zeros(size, x.shape[1], 0, x.shape[3]) for x in kv) for kv in template]
        for cache, size in zip(caches, sizes)
    ]
    layers = [
        tuple(
            torch.cat(
                [
                    torch.nn.functional.pad(kv[t], (0, 0, pad, 0))[:, :, :length]
                    for kv, pad in zip(per_layer, pads)
                ]
            )
            for t in (0, 1)
        )
        for per_layer in zip(*per_cache)
    ]
    return DynamicCache(ddp_cache_data=layers)


def _empty_cache(model: PreTrainedModel) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        raise ValueError(
            f"{type(model).__name__} uses sliding-window or other non-full cache layers; speculative "
            "decoding here needs full attention caches (DynamicLayer)"
        )
    return cache


# ------------------------------------------------------------------------------------- steps
def _step(
    target, draft, group: _Group, k: int, sampling: _Sampling, stats: SpeculativeStats, clock: _Clock
) -> _Verified:
    """Draft ``k`` tokens (or a tree), score them with one target call, verify."""
    if sampling.tree is not None:
        return _tree_step(target, draft, group, sampling, stats, clock)
    ids, mask = group.ids, group.mask
    G, L = ids.shape
    ones = torch.ones(G, 1, dtype=mask.dtype, device=mask.device)
    draft_tokens, draft_probs = [], []
    for _ in range(k):
        logits = tree_forward(draft, ids, mask, group.draft_cache, 1)[:, -1].float()
        if sampling.warping.do_sample:
            q = sampling.warping.probs(logits, backend=sampling.backend)
            token = torch.multinomial(q, 1, generator=sampling.generator)
            draft_probs.append(q)
        else:
            token = logits.argmax(dim=-1, keepdim=True)
        draft_tokens.append(token)
        ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, ones], dim=1)
    stats.draft_calls += k
    clock.lap("draft")
    target_logits = tree_forward(target, ids, mask, group.target_cache, k + 1).float()
    stats.target_calls += 1
    clock.lap("target")
    uniforms = exponentials = q_all = None
    if sampling.warping.do_sample:
        q_all = torch.stack(draft_probs, dim=1)
        uniforms = torch.rand(G, k, device=ids.device, generator=sampling.generator)
        exponentials = torch.empty_like(target_logits).exponential_(generator=sampling.generator)
    num_accepted, next_tokens = verify_block(
        target_logits, q_all, torch.cat(draft_tokens, dim=1), sampling.warping, uniforms, exponentials,
        sampling.impl,
    )  # fmt: skip
    stats.steps += G
    stats.drafted += G * k
    stats.accepted += int(num_accepted.sum())
    clock.lap("verify")
    # Draft j sits at column L + j of both caches; the draft never saw the last one.
    columns = L + torch.arange(k, device=ids.device).expand(G, -1)
    draft_columns = torch.where(columns < L + k - 1, columns, -1)
    return _Verified(group, num_accepted, next_tokens, columns, draft_columns)


def _tree_step(
    target, draft, group: _Group, sampling: _Sampling, stats: SpeculativeStats, clock: _Clock
) -> _Verified:
    """Draft a tree, score every node with one target call, verify; the accepted path's columns are
    node ``i`` at ``L + i − 1`` in the target cache and where the draft put it in its own."""
    G, L = group.ids.shape
    oracle = DraftModelOracle(draft, group.ids, group.mask, group.draft_cache)
    tree = draft_tree(
        sampling.tree, oracle, group.ids[:, -1], sampling.warping, generator=sampling.generator,
        backend=sampling.backend,
    ).trimmed()  # fmt: skip
    stats.draft_calls += oracle.calls
    clock.lap("tree", exclude=oracle.seconds)
    stats.phase_seconds["draft"] = stats.phase_seconds.get("draft", 0.0) + oracle.seconds
    target_logits = score_tree(target, group.ids, group.mask, group.target_cache, tree)
    target_logits = target_logits.to(torch.promote_types(target_logits.dtype, torch.float32))
    stats.target_calls += 1
    clock.lap("target")
    uniforms = exponentials = None
    if sampling.warping.do_sample:
        uniforms = torch.rand(tree.tokens.shape, device=group.ids.device, generator=sampling.generator)
        exponentials = torch.empty_like(target_logits[:, 0]).exponential_(generator=sampling.generator)
    num_accepted, path, next_tokens = verify_tree_block(
        target_logits, tree.draft_probs, tree.tokens, *child_links(tree.parents, tree.valid),
        sampling.warping, tree.replacement, uniforms, exponentials, sampling.impl,
    )  # fmt: skip
    D = int(num_accepted.max())
    path, next_tokens = path[:, :D], next_tokens[:, : D + 1]
    node = path.clamp(min=0)
    stats.steps += G
    stats.drafted += int(tree.valid[:, 1:].sum())
    stats.accepted += int(num_accepted.sum())
    clock.lap("verify")
    draft_columns = oracle.node_columns(tree.num_nodes + 1).gather(1, node)
    return _Verified(group, num_accepted, next_tokens, L + node - 1, draft_columns)


def _commit(v: _Verified, keep: torch.Tensor, pad_token_id: int) -> _Group:
    """Unpad-update-repad: the sequences at positions ``keep`` of ``v``, each extended by its
    accepted tokens and emitted token, right-aligned again with caches gathered to match.

    Old layout, extended: columns ``[0, L)`` the group's tokens, ``L + j`` the ``j``-th accepted token
    (held in cache column ``target_columns[:, j]`` / ``draft_columns[:, j]``), then the emitted one."""
    L = v.group.ids.shape[1]
    n, a = v.group.lengths[keep], v.num_accepted[keep]
    tokens = v.next_tokens[keep]
    ext = torch.cat([v.group.ids[keep], torch.where(tokens >= 0, tokens, pad_token_id)], dim=1)
    new_n = n + a + 1
    new_L = int(new_n.max())
    shift = ((L - n) - (new_L - new_n)).unsqueeze(1)  # old column = new column + shift
    columns = torch.arange(new_L, device=ext.device).unsqueeze(0)
    valid = columns >= (new_L - new_n).unsqueeze(1)
    source = (columns + shift).clamp(0, ext.shape[1] - 1)
    ids = torch.where(valid, ext.gather(1, source), pad_token_id)
    # Target cache: every real token except the emitted one. Draft cache: the context and the
    # accepted tokens it holds (a prefix of the path: it never saw the last chain draft or the tree
    # leaves), as many columns as every member has.
    committed = torch.arange(L, device=ext.device).expand(keep.numel(), -1)
    target_source = torch.cat([committed, v.target_columns[keep]], dim=1)
    draft_columns = v.draft_columns[keep]
    draft_source = torch.cat([committed, draft_columns], dim=1)
    accepted = torch.arange(draft_columns.shape[1], device=ext.device) < a[:, None]
    held = ((draft_columns >= 0) & accepted).sum(dim=1)
    draft_len = int(((new_L - new_n) + n + held).min())
    target_kept = target_source.gather(1, source[:, : new_L - 1])
    draft_kept = draft_source.gather(1, source[:, :draft_len])
    return _Group(
        rows=v.group.rows[keep],
        ids=ids,
        mask=valid.long(),
        target_cache=_gather_cache(v.group.target_cache, keep, target_kept),
        draft_cache=_gather_cache(v.group.draft_cache, keep, draft_kept),
    )


def _merge(groups: list[_Group], pad_token_id: int) -> _Group:
    """One group from several: left-pad to the longest and keep, per model, the cache columns
    that every member has computed (the rest is fed again by the next forward)."""
    if len(groups) == 1:
        return groups[0]
    L = max(g.ids.shape[1] for g in groups)
    pads = [L - g.ids.shape[1] for g in groups]
    sizes = [g.ids.shape[0] for g in groups]

    def merged_cache(caches: list[DynamicCache]) -> DynamicCache:
        uncached = max(g.ids.shape[1] - c.get_seq_length() for g, c in zip(groups, caches))
        return _cat_caches(caches, sizes, pads, L - uncached)

    return _Group(
        rows=torch.cat([g.rows for g in groups]),
        ids=torch.cat(
            [torch.nn.functional.pad(g.ids, (p, 0), value=pad_token_id) for g, p in zip(groups, pads)]
        ),
        mask=torch.cat([torch.nn.functional.pad(g.mask, (p, 0)) for g, p in zip(groups, pads)]),
        target_cache=merged_cache([g.target_cache for g in groups]),
        draft_cache=merged_cache([g.draft_cache for g in groups]),
    )


def _pick_exspec(pool: list[_Group], group_size: int) -> list[int]:
    """Indices of the pool entries (single sequences) to step next: the most common length
    (ties: the shortest), topped up with the nearest lengths when fewer than ``group_size``."""
    lengths = [int(g.mask.sum()) for g in pool]
    counts = Counter(lengths)
    length = min(counts, key=lambda n: (-counts[n], n))
    order = sorted(range(len(pool)), key=lambda i: (abs(lengths[i] - length), lengths[i], i))
    return order[:group_size]


# ----------------------------------------------------------------------------------- checks
def _model_vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _check_models(target, draft) -> torch.device:
    """Both HF causal LMs, one vocabulary, one device; returns the device."""
    check_causal_lm("target", target)
    check_causal_lm("draft", draft)
    vocab = (_model_vocab(target), _model_vocab(draft))
    if vocab[0] != vocab[1]:
        raise ValueError(f"`target` and `draft` must share a vocabulary, got sizes {vocab[0]} and {vocab[1]}")
    device = next(target.parameters()).device
    if next(draft.parameters()).device != device:
        raise ValueError(
            f"`target` and `draft` must be on one device, got {device} and {next(draft.parameters()).device}"
        )
    return device


# ------------------------------------------------------------------------------------ public
@torch.no_grad()
def speculative_generate(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    num_draft_tokens: int = 4,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    strategy: Strategy = "eqspec",
    group_size: int | None = None,
    backend: Backend = "auto",
    tree: str | None = None,
    tree_budget: int | None = None,
    tree_widths: Sequence[int] | None = None,
) -> SpeculativeOutput:
    """Generate with speculative decoding — a chain or a token tree per step; a batch is handled by
    EQSPEC or EXSPEC.

    Args:
        target, draft: HF causal LMs with the same vocabulary, on one device (full-attention
            caches). Greedy output equals ``target.generate(do_sample=False)`` token for token;
            sampled output follows the target's warped distribution.
        input_ids: ``[B, P]`` prompts (token ids of both models' vocabulary), left-padded.
        attention_mask: ``[B, P]`` 0/1, zeros on the left padding. Without it, as in ``generate``,
            padding is where ``input_ids`` holds the pad id (``pad_token_id`` or the target's
            generation config) if that id is no EOS id; a pad id that is also an EOS id counts as
            text, and raises when the rows start with different numbers of it (pass the mask).
        max_new_tokens: tokens to generate per sequence (fewer when it emits an EOS).
        num_draft_tokens: ``k ≥ 1`` draft tokens per target call; with a ``tree``, its largest depth.
        do_sample, temperature, top_k, top_p: the warping of :class:`tokenlab.kernels.warping.Warping`,
            applied identically to the target and the draft.
        eos_token_id: token id(s) that end a sequence (kept in the output); ``None`` takes the
            target's ``generation_config.eos_token_id``, as ``generate`` does; ``[]`` never stops.
        pad_token_id: the prompts' padding (see ``attention_mask``) and the filler of the output
            after a sequence ends (default: the target's generation config, then for the filler
            only the first EOS id, then 0).
        generator: the random source of sampling (draft tokens, uniforms, Exp(1) noise).
        strategy: ``"eqspec"`` (lockstep with realignment) or ``"exspec"`` (same-length groups).
        group_size: EXSPEC's largest group (default: the batch size); ignored by EQSPEC.
        backend: of the verification kernel and the warped softmax.
        tree: ``None`` (a chain of ``k`` tokens), or draft a token tree each step
            (:mod:`tokenlab.decoding.token_tree`): ``"static"`` (fixed widths, i.i.d. children,
            SpecInfer's verification), ``"rsd"`` (*Recursive Speculative Decoding*: fixed widths,
            children without replacement by Gumbel-top-k, recursive rejection sampling) or
            ``"dyspec"`` (*DySpec*: greedy best-first growth under ``tree_budget`` and depth ``k``).
        tree_budget: nodes per tree, at most 64 (default 16). Static/RSD without ``tree_widths``
            branch in two on the first levels and continue as chains to depth ``k``, as many
            binary levels as the budget allows (:func:`~tokenlab.decoding.token_tree.tree_spec`).
        tree_widths: static/RSD only: children per node at each depth, e.g. ``(4, 2, 1)``.

    Returns:
        :class:`SpeculativeOutput` with ``sequences [B, P + N]`` and :class:`SpeculativeStats`.
    """
    device = _check_models(target, draft)
    eos = eos_token_ids(target, eos_token_id)
    declared_pad = target.generation_config.pad_token_id if pad_token_id is None else pad_token_id
    pad_token_id = pad_token_id_for(target, pad_token_id, eos)  # the output's filler, checked here
    input_ids, mask = check_prompts(target, input_ids, attention_mask, pad_token_id=declared_pad, eos=eos)
    check_prompts(draft, input_ids, mask)  # the draft embeds every prompt token too
    check_int("max_new_tokens", max_new_tokens, low=1)
    check_int("num_draft_tokens", num_draft_tokens, low=1)
    check_generator("generator", generator, device)
    check_choice("strategy", strategy, STRATEGIES)
    if group_size is not None:
        check_int("group_size", group_size, low=1)
    spec = tree_spec(tree, tree_budget, tree_widths, num_draft_tokens)
    warping = Warping(do_sample, temperature, top_k, top_p)
    sampling = _Sampling(warping, generator, backend, resolve_backend(backend, input_ids=input_ids), spec)
    B = input_ids.shape[0]
    stats = SpeculativeStats()
    generated: list[list[int]] = [[] for _ in range(B)]
    eos_set = set(eos)
    start = time.perf_counter()
    clock = _Clock(stats, device)

    def emit(v: _Verified) -> torch.Tensor:
        """Record each sequence's new tokens; return the positions (in ``v``) still active."""
        tokens = v.next_tokens.tolist()
        counts = (v.num_accepted + 1).tolist()
        active = []
        for i, row in enumerate(v.group.rows.tolist()):
            out = generated[row]
            for token in tokens[i][: counts[i]]:
                out.append(token)
                if token in eos_set or len(out) == max_new_tokens:
                    break
            else:
                active.append(i)
        return torch.tensor(active, dtype=torch.long, device=device)

    def new_group(rows: torch.Tensor) -> _Group:
        width = int(mask[rows].sum(dim=1).max())
        return _Group(
            rows, input_ids[rows, -width:], mask[rows, -width:], _empty_cache(target), _empty_cache(draft)
        )

    all_rows = torch.arange(B, device=device)
    if strategy == "eqspec":
        group: _Group | None = new_group(all_rows)
        while group is not None:
            verified = _step(target, draft, group, num_draft_tokens, sampling, stats, clock)
            active = emit(verified)
            group = _commit(verified, active, pad_token_id) if active.numel() else None
            clock.lap("commit")
    else:
        size = group_size or B
        pool = [new_group(all_rows[i : i + 1]) for i in range(B)]
        while pool:
            chosen = _pick_exspec(pool, size)
            group = _merge([pool[i] for i in chosen], pad_token_id)
            pool = [g for i, g in enumerate(pool) if i not in chosen]
            verified = _step(target, draft, group, num_draft_tokens, sampling, stats, clock)
            pool.extend(_commit(verified, i.view(1), pad_token_id) for i in emit(verified))
            clock.lap("commit")

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = sum(len(g) for g in generated)
    width = max(len(g) for g in generated)
    new = torch.full((B, width), pad_token_id, dtype=torch.long, device=device)
    for row, tokens in enumerate(generated):
        new[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=device)
    return SpeculativeOutput(torch.cat([input_ids, new], dim=1), stats)
