"""*InfiGFusion: Graph-on-Logits Distillation via Efficient Gromov-Wasserstein for Model Fusion*: a student
learns the *structure* of its teachers' logits — which vocabulary channels fire together — besides the
logits themselves.

Per sequence, keep the top-``k`` logits ``z̃_t`` of every counted position ``t`` (the others are 0) and
aggregate their outer products: the co-activation graph ``A = (1/T) Σ_t z̃_t z̃_tᵀ`` over the ``n`` channels
that appear in some top-``k`` (:func:`coactivation_graph`). Two such graphs — of a student and of a teacher,
possibly over different vocabularies and tokenizations — are compared by the Gromov–Wasserstein distance
with the square loss and uniform node weights,

    GW(A, B) = min_π Σ_{i,j,k,l} (A_ik − B_jl)² π_ij π_kl        π ∈ Π(1/n, 1/m),

an ``O(n⁴)`` non-convex problem. It has a closed form on rank-one graphs ``A = f fᵀ``, ``B = g gᵀ`` (the
graph of a single position): expanding the square, ``GW(π) = (E f²)² + (E g²)² − 2 (E_π[f g])²``, and
``E_π[f g]`` is largest for the comonotone coupling and smallest for the antitone one (1-D optimal transport
with a supermodular cost), both given by sorting ``f`` and ``g``::

    GW(f fᵀ, g gᵀ) = (E f²)² + (E g²)² − 2 max(|∫₀¹ F⁻¹(u) G⁻¹(u) du|, |∫₀¹ F⁻¹(u) G⁻¹(1−u) du|)²

The sorting-based approximation (:func:`gw_sort_approximation`) applies it to any graphs through their
rank-one surrogates: ``Â = f fᵀ`` with ``f = d / √(mean d)`` is the one rank-one graph with ``A``'s node
strengths ``d(i) = (1/n) Σ_k A_ik`` (exactly ``±f`` when ``A = f fᵀ``). ``O(n log n)`` after the strengths,
exact on rank-one graphs, and since ``√GW`` is a metric and ``GW(A, Â)`` is at most the mean of
``(A − Â)²`` (the identity coupling), its error is bounded::

    |√GW(A, B) − √GW_sort(A, B)| ≤ rms(A − Â) + rms(B − B̂).

The node strengths never need ``A``: ``d(v) = (1/(n T)) Σ_t z̃_t[v] · Σ_u z̃_t[u]``, ``O(T k)`` per sequence.

:func:`graph_on_logits_loss` averages ``GW_sort`` over sequences and teachers; :func:`infigfusion_loss` adds
the token-level distillation term — a KL between teacher and student distributions renormalised over the
teacher's top-``k`` tokens, the teacher's vocabulary mapped to the student's by shared tokens
(:func:`shared_vocabulary`) — and takes the student's top-``k`` logits from hidden states and LM head in
chunks of positions (:func:`topk_logits`, :func:`logits_at`: no ``[N, V]`` logits exist at once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenlab._checks import check_choice, check_finite, check_int, check_number, check_shape, check_tensor
from tokenlab.alignment.common import LossOutput
from tokenlab.alignment.fused_linear import HEAD_BACKENDS, HeadBackend, LinearHead, _HeadGrads, _logits


@dataclass
class LogitSlice:
    """Some logits of every position of a batch: ``values [B, T, m]`` at vocabulary ``indices [B, T, m]``
    (int64), and ``mask [B, T]`` (1 where a position counts; None: all count)."""

    values: Tensor
    indices: Tensor
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        check_tensor("values", self.values, ndim=3, floating=True)
        check_tensor("indices", self.indices, integer=True)
        check_shape("indices", self.indices, self.values.shape, of="`values`")
        check_finite("values", self.values)
        if self.mask is None:
            self.mask = torch.ones(self.values.shape[:2], dtype=torch.bool, device=self.values.device)
        check_shape("mask", check_tensor("mask", self.mask), self.values.shape[:2], of="`values`[:2]")
        self.mask = self.mask.bool()
        if not self.mask.any(-1).all():
            raise ValueError("`mask` selects no position in some sequence")


# ---------------------------------------------------------------------------------------------------------
# Logits at chosen vocabulary entries, from hidden states and an LM head, chunk by chunk.


class _ChunkedLogitsAt(torch.autograd.Function):
    """Logits ``[N, m]`` at ``indices`` (or at each row's top ``k``, chosen here); only the indices are kept
    for backward, which recomputes nothing: ``∂/∂h = Σ_j g_j W[idx_j]``, ``∂/∂W[idx_j] += g_j h``,
    accumulated chunk by chunk as the chunked losses accumulate theirs (``fused_linear._HeadGrads``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, indices, k, chunk_size):
        n = hidden.shape[0]
        if indices is None:
            indices = torch.empty(n, k, dtype=torch.long, device=hidden.device)
        values = hidden.new_empty(indices.shape, dtype=torch.promote_types(hidden.dtype, torch.float32))
        for s in range(0, n, chunk_size):
            z = _logits(hidden[s : s + chunk_size], weight, bias)
            if k is not None:
                values[s : s + chunk_size], indices[s : s + chunk_size] = z.topk(k, dim=-1)
            else:
                values[s : s + chunk_size] = z.gather(-1, indices[s : s + chunk_size])
        ctx.save_for_backward(hidden, weight, bias, indices)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, g_values, _):
        hidden, weight, bias, indices = ctx.saved_tensors
        grads = _HeadGrads([hidden], weight, bias, ctx.needs_input_grad[:3])
        n = hidden.shape[0]
        for s in range(0, n, ctx.chunk_size):
            rows = slice(s, min(s + ctx.chunk_size, n))
            g = g_values[rows].new_zeros(len(g_values[rows]), weight.shape[0])
            grads.add(g.scatter_add_(-1, indices[rows], g_values[rows]), hidden[rows], weight, [rows])
        return (*grads.final([hidden], weight, bias), None, None, None)


def _logit_slice(
    head: LinearHead,
    k: int | None,
    indices: Tensor | None,
    mask: Tensor | None,
    chunk_size: int,
    backend: HeadBackend,
) -> LogitSlice:
    if head.hidden.ndim != 3:
        raise ValueError(f"`head.hidden` must be [B, T, H], got {tuple(head.hidden.shape)}")
    check_int("chunk_size", chunk_size, low=1)
    check_choice("backend", backend, HEAD_BACKENDS)
    check_finite("head.hidden", head.hidden)
    B, T, H = head.hidden.shape
    flat_indices = None if indices is None else indices.reshape(B * T, -1)
    if backend == "reference":
        z = _logits(head.hidden.reshape(B * T, H), head.weight, head.bias)
        values, flat_indices = z.topk(k, -1) if k is not None else (z.gather(-1, flat_indices), flat_indices)
    else:
        values, flat_indices = _ChunkedLogitsAt.apply(
            head.hidden.reshape(B * T, H), head.weight, head.bias, flat_indices, k, chunk_size
        )
    return LogitSlice(values.reshape(B, T, -1), flat_indices.reshape(B, T, -1), mask)


def topk_logits(
    head: LinearHead,
    k: int,
    *,
    mask: Tensor | None = None,
    chunk_size: int = 1024,
    backend: HeadBackend = "chunked",
) -> LogitSlice:
    """The ``k`` largest logits of every position and their vocabulary indices, ``[B, T, k]``.

    Args:
        head: hidden states ``[B, T, H]`` and LM head ``weight [V, H]`` (+ ``bias [V]``).
        k: how many logits per position, ``1 ≤ k ≤ V``.
        mask: ``[B, T]``, the positions that count downstream (stored in the result).
        chunk_size: positions whose ``[chunk, V]`` logits exist at once (``"chunked"``).
        backend: ``"chunked"`` (the values' gradient flows into hidden states and head without keeping any
            ``[N, V]`` tensor) or ``"reference"`` (materialised logits, ``torch.topk``, autograd).
    """
    check_int("k", k, low=1, high=head.weight.shape[0])
    return _logit_slice(head, k, None, mask, chunk_size, backend)


def logits_at(
    head: LinearHead,
    indices: Tensor,
    *,
    mask: Tensor | None = None,
    chunk_size: int = 1024,
    backend: HeadBackend = "chunked",
) -> LogitSlice:
    """The logits at ``indices [B, T, m]`` (int64 vocabulary ids per position), like :func:`topk_logits`."""
    check_tensor("indices", indices, integer=True)
    check_shape("indices", indices, (*head.hidden.shape[:2], indices.shape[-1]), of="[B, T, m]")
    if ((indices < 0) | (indices >= head.weight.shape[0])).any():
        raise ValueError(f"`indices` must lie in [0, {head.weight.shape[0]})")
    return _logit_slice(head, None, indices.long(), mask, chunk_size, backend)


# ---------------------------------------------------------------------------------------------------------
# Graphs and the sorting-based Gromov–Wasserstein distance.


def coactivation_graph(values: Tensor, indices: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The co-activation graph of one sequence's top-``k`` logits ``values, indices [T, k]`` (positions
    where ``mask [T]`` is 1): its nodes, the ``n`` distinct channels (sorted vocabulary ids ``[n]``), and
    ``A = (1/T) Σ_t z̃_t z̃_tᵀ`` ``[n, n]`` (``z̃_t``: position ``t``'s retained logits on the nodes).
    For inspection and tests; the losses use the node strengths, which need no ``A``."""
    nodes, inverse, rows = _nodes(values, indices, mask)
    x = rows.new_zeros(len(rows), len(nodes)).scatter_add_(1, inverse, rows)
    return nodes, x.T @ x / len(rows)


def _nodes(values: Tensor, indices: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct channels ``[n]``, each retained logit's node ``[T', k]`` and the logits ``[T', k]`` of
    the counted positions, in at least float32 (half-precision sums and ``GW_sort``, a difference of squares,
    lose percents)."""
    if mask is not None:
        values, indices = values[mask.bool()], indices[mask.bool()]
    nodes, inverse = torch.unique(indices, return_inverse=True)
    return nodes, inverse, values.to(torch.promote_types(values.dtype, torch.float32))


def _node_strengths(values: Tensor, indices: Tensor, mask: Tensor | None) -> Tensor:
    """``d = A·1/n`` ``[n]`` of :func:`coactivation_graph`'s graph, in ``O(T k)``."""
    nodes, inverse, rows = _nodes(values, indices, mask)
    weighted = rows * rows.sum(-1, keepdim=True)
    d = rows.new_zeros(len(nodes)).scatter_add_(0, inverse.reshape(-1), weighted.reshape(-1))
    return d / (len(rows) * len(nodes))


def _quantile_dot(xs: Tensor, ys: Tensor) -> Tensor:
    """``∫₀¹ X(u) Y(u) du`` for the step quantile functions of sorted ``xs [n]`` and ``ys [m]`` (uniform
    weights), integrated over the pieces cut at ``i/n`` and ``j/m``."""
    n, m = len(xs), len(ys)
    arange = torch.arange(1, max(n, m) + 1, device=xs.device)
    cuts = torch.unique(torch.cat([arange[:n] * m, arange[:m] * n]))  # in units of 1/(n·m), exact
    starts = torch.cat([cuts.new_zeros(1), cuts[:-1]])
    widths = (cuts - starts).to(xs.dtype) / (n * m)
    return (widths * xs[starts // m] * ys[starts // n]).sum()


def _sorted_gw(d: Tensor, e: Tensor) -> Tensor:
    """The closed-form GW between the rank-one graphs with node strengths ``d [n]`` and ``e [m]``."""
    f, g = (s / s.mean().clamp(min=torch.finfo(s.dtype).tiny).sqrt() for s in (d, e))
    fs, gs = f.sort().values, g.sort().values
    best = torch.maximum(_quantile_dot(fs, gs).abs(), _quantile_dot(fs, gs.flip(0)).abs())
    return (f**2).mean() ** 2 + (g**2).mean() ** 2 - 2 * best**2


def gw_sort_approximation(a: Tensor, b: Tensor) -> Tensor:
    """The sorting-based Gromov–Wasserstein approximation between two weighted graphs (square loss, uniform
    node weights; module docstring): the closed-form GW between the rank-one graphs with the node strengths
    ``a.mean(1) [n]`` and ``b.mean(1) [m]`` — exact when ``a`` and ``b`` are rank-one, within
    ``rms(a − â) + rms(b − b̂)`` of ``√GW`` in general.

    Args:
        a: symmetric ``[n, n]`` adjacency with ``a.sum() > 0`` (true of co-activation graphs unless every
            position's top-``k`` logits sum to 0).
        b: symmetric ``[m, m]`` adjacency, likewise.
    """
    for name, graph in (("a", a), ("b", b)):
        check_tensor(name, graph, ndim=2, floating=True)
        if graph.shape[0] != graph.shape[1] or graph.shape[0] == 0:
            raise ValueError(f"`{name}` must be a non-empty square matrix, got {tuple(graph.shape)}")
        check_finite(name, graph)
        if graph.sum() <= 0:
            raise ValueError(f"`{name}` must have a positive sum (its rank-one surrogate is then defined)")
    return _sorted_gw(a.mean(1), b.mean(1))


# ---------------------------------------------------------------------------------------------------------
# Losses.


def _teacher_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if count == 0:
        raise ValueError("`teachers` must hold at least one LogitSlice")
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"`teacher_weights` must hold one weight per teacher ({count}), got {len(weights)}")
    return [check_number(f"teacher_weights[{j}]", w, low=0.0) for j, w in enumerate(weights)]


def _check_teachers(batch: int, teachers: Sequence[LogitSlice]) -> None:
    for j, teacher in enumerate(teachers):
        if not isinstance(teacher, LogitSlice):
            raise TypeError(f"`teachers[{j}]` must be a LogitSlice, got {type(teacher).__name__}")
        if teacher.values.shape[0] != batch:
            raise ValueError(
                f"`teachers[{j}]` must hold the student's {batch} sequences, got {teacher.values.shape[0]}"
            )


def graph_on_logits_loss(
    student: LogitSlice, teachers: Sequence[LogitSlice], *, teacher_weights: Sequence[float] | None = None
) -> LossOutput:
    """InfiGFusion's Graph-on-Logits Distillation loss ``Σ_j w_j · mean_b GW_sort(A_b, A_b^(j))`` between the
    student's graphs ``A_b`` and teacher ``j``'s ``A_b^(j)``.

    Each sequence's co-activation graph is built from its top-``k`` logits (module docstring); graphs of
    different vocabularies, ``k`` and sequence lengths compare (GW needs no node correspondence).

    Args:
        student: the student's top-``k`` logits ``[B, T, k]`` (from :func:`topk_logits`; differentiable).
        teachers: one top-``k`` :class:`LogitSlice` ``[B, T_j, k_j]`` per teacher, on the same ``B`` texts.
        teacher_weights: ``w_j ≥ 0`` (default ``1/J`` each).

    Returns:
        :class:`~tokenlab.alignment.common.LossOutput` with metrics ``gld/teacher{j}``.
    """
    if not isinstance(student, LogitSlice):
        raise TypeError(f"`student` must be a LogitSlice, got {type(student).__name__}")
    weights = _teacher_weights(teacher_weights, len(teachers))
    _check_teachers(student.values.shape[0], teachers)
    mine = [_node_strengths(*s) for s in zip(student.values, student.indices, student.mask)]
    per_teacher = []
    for teacher in teachers:
        theirs = [_node_strengths(*s) for s in zip(teacher.values, teacher.indices, teacher.mask)]
        per_teacher.append(torch.stack([_sorted_gw(x, y) for x, y in zip(mine, theirs)]).mean())
    loss = sum(w * g for w, g in zip(weights, per_teacher))
    return LossOutput(loss, {f"gld/teacher{j}": g.detach() for j, g in enumerate(per_teacher)})


def shared_vocabulary(student_vocab: Mapping[str, int], teacher_vocab: Mapping[str, int]) -> Tensor:
    """Map a teacher's vocabulary onto a student's by shared tokens (equal token strings, as
    ``tokenizer.get_vocab()`` spells them): ``[V_teacher]`` int64, the student id of each teacher id, or
    ``-1`` where the student has no such token. Ids must be ``0 … V−1`` without gaps or repeats."""
    for name, vocab in (("student_vocab", student_vocab), ("teacher_vocab", teacher_vocab)):
        if not isinstance(vocab, Mapping):
            kind = type(vocab).__name__
            raise TypeError(f"`{name}` must be a mapping from token strings to ids, got {kind}")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError(f"`{name}` ids must be 0 … {len(vocab) - 1}, each once")
    mapping = torch.full((len(teacher_vocab),), -1, dtype=torch.long)
    for token, teacher_id in teacher_vocab.items():
        mapping[teacher_id] = student_vocab.get(token, -1)
    return mapping


def shared_topk_kd(student: LogitSlice, teacher: LogitSlice, shared: Tensor) -> Tensor:
    """``mean_t KL(p̂_teacher ‖ p̂_student)`` over the counted positions, both distributions renormalised
    over the teacher's top-``k`` tokens that the student shares (``shared [B, T, k]`` bool), the student's
    logits taken at the same tokens (``student`` = :func:`logits_at` of the mapped ids). Positions without
    a shared token count 0."""
    for name, value in (("student", student), ("teacher", teacher)):
        if not isinstance(value, LogitSlice):
            raise TypeError(f"`{name}` must be a LogitSlice, got {type(value).__name__}")
    check_shape("student.values", student.values, teacher.values.shape, of="`teacher.values`")
    check_shape("shared", check_tensor("shared", shared), teacher.values.shape, of="`teacher.values`")
    shared = shared.bool()
    log_q, log_p = (  # in at least float32, each masked in its own dtype
        torch.log_softmax(v.masked_fill(~shared, torch.finfo(v.dtype).min), -1)
        for v in (s.values.to(torch.promote_types(s.values.dtype, torch.float32)) for s in (teacher, student))
    )
    kl = (log_q.exp() * (log_q - log_p)).masked_fill(~shared, 0.0).sum(-1)
    counted = teacher.mask & student.mask & shared.any(-1)
    return (kl * counted).sum() / counted.sum().clamp(min=1)


def _student_ids(j: int, teacher: LogitSlice, vocab_map: Tensor | None, student: LinearHead) -> Tensor:
    """Teacher ``j``'s top-``k`` ids in the student's vocabulary (``-1``: not shared), after checking that
    it covers the student's positions (the KD term compares position by position)."""
    if tuple(teacher.values.shape[:2]) != tuple(student.hidden.shape[:2]):
        raise ValueError(
            f"`teachers[{j}]` covers positions {tuple(teacher.values.shape[:2])}, the student "
            f"{tuple(student.hidden.shape[:2])}: the KD term needs them aligned (or `kd_weight=0`)"
        )
    if vocab_map is None:
        return teacher.indices
    check_tensor(f"vocab_maps[{j}]", vocab_map, ndim=1, integer=True)
    if int(teacher.indices.max()) >= len(vocab_map):
        raise ValueError(
            f"`vocab_maps[{j}]` has {len(vocab_map)} entries; teacher ids reach {int(teacher.indices.max())}"
        )
    if int(vocab_map.max()) >= student.weight.shape[0]:
        raise ValueError(f"`vocab_maps[{j}]` must hold student ids < {student.weight.shape[0]} (or -1)")
    return vocab_map.to(teacher.indices.device)[teacher.indices]


def infigfusion_loss(
    student: LinearHead,
    teachers: Sequence[LogitSlice],
    *,
    k: int,
    mask: Tensor | None = None,
    vocab_maps: Sequence[Tensor | None] | None = None,
    teacher_weights: Sequence[float] | None = None,
    gld_weight: float = 1.0,
    kd_weight: float = 1.0,
    chunk_size: int = 1024,
    backend: HeadBackend = "chunked",
) -> LossOutput:
    """InfiGFusion's distillation objective from a student's hidden states and LM head:
    ``gld_weight · L_GLD + kd_weight · Σ_j w_j KD_j`` (add the SFT cross-entropy, e.g. from
    :func:`~tokenlab.alignment.fused_linear.token_stats`, for the paper's total loss).

    ``L_GLD`` is :func:`graph_on_logits_loss` on the student's top-``k`` logits; ``KD_j`` is
    :func:`shared_topk_kd` on teacher ``j``'s top-``k`` tokens mapped into the student's vocabulary by
    ``vocab_maps[j]`` (:func:`shared_vocabulary`; None: same vocabulary). The KD term compares position by
    position, so with ``kd_weight > 0`` every teacher must cover the student's ``[B, T]`` positions.

    Args:
        student: hidden states ``[B, T, H]`` and LM head (the gradients flow here).
        teachers: per teacher, :func:`topk_logits` of its head (computed without gradient).
        k: the student's top-``k``.
        mask: ``[B, T]`` counted positions (e.g. ``labels != -100``).
        vocab_maps: per teacher, ``[V_teacher]`` student ids (``-1``: not shared) or None.
        teacher_weights: ``w_j ≥ 0`` (default ``1/J``).
        gld_weight, kd_weight: the two terms' weights (≥ 0).
        chunk_size, backend: as in :func:`topk_logits`.

    Returns:
        :class:`~tokenlab.alignment.common.LossOutput`: metrics ``gld``, ``kd``, ``gld/teacher{j}``,
        ``kd/teacher{j}``.
    """
    if not isinstance(student, LinearHead):
        raise TypeError(f"`student` must be a LinearHead, got {type(student).__name__}")
    gld_weight = check_number("gld_weight", gld_weight, low=0.0)
    kd_weight = check_number("kd_weight", kd_weight, low=0.0)
    weights = _teacher_weights(teacher_weights, len(teachers))
    vocab_maps = [None] * len(teachers) if vocab_maps is None else list(vocab_maps)
    if len(vocab_maps) != len(teachers):
        raise ValueError(
            f"`vocab_maps` must hold one entry per teacher ({len(teachers)}), got {len(vocab_maps)}"
        )
    _check_teachers(student.hidden.shape[0], teachers)
    pairs = enumerate(zip(teachers, vocab_maps))
    student_ids = [_student_ids(j, t, m, student) for j, (t, m) in pairs] if kd_weight > 0 else []
    mine = topk_logits(student, k, mask=mask, chunk_size=chunk_size, backend=backend)
    gld = graph_on_logits_loss(mine, teachers, teacher_weights=weights)
    metrics = {"gld": gld.loss.detach(), **gld.metrics}
    kd = gld.loss.new_zeros(())
    for j, (teacher, ids) in enumerate(zip(teachers, student_ids)):  # none when kd_weight = 0
        at = logits_at(student, ids.clamp(min=0), mask=mask, chunk_size=chunk_size, backend=backend)
        term = shared_topk_kd(at, teacher, ids >= 0)
        metrics[f"kd/teacher{j}"] = term.detach()
        kd = kd + weights[j] * term
    metrics["kd"] = kd.detach()
    return LossOutput(gld_weight * gld.loss + kd_weight * kd, metrics)
