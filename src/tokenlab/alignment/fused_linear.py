"""Per-token quantities and losses from an LM head, computed in chunks of tokens (never a full ``[N, V]``).

Every alignment loss in tokenlab is a function of, per completion token ``t``, some of

* ``logp_t = log softmax(h_t Wᵀ + b)[y_t]`` — the log-probability of the label;
* ``H_t = −Σ_v p_v log p_v`` — the entropy of the policy's next-token distribution;
* ``KL_t = Σ_v q_v (log q_v − log p_v)`` — the forward KL from a reference distribution ``q``
  (another head's ``softmax(h'_t W'ᵀ + b')``) to the policy ``p``, as in the sequential KL of
  *Token-level Direct Preference Optimization*.

The gradient of ``Σ_t g_t logp_t + gᴴ_t H_t + gᴷ_t KL_t`` with respect to a token's logits ``z``
(``p = softmax(z)``, ``e_y`` one-hot) is one expression, built in place by :func:`_logits_grad`::

    ∂/∂z = p ⊙ (a − gᴴ log p) + g e_y − gᴷ q          a = gᴷ − g − gᴴ H

Two entry points run the same per-chunk code (:class:`_Heads`):

* :func:`token_stats` returns the per-token quantities themselves, for any downstream use. Its autograd
  function keeps only its inputs, and backward, which learns ``g`` only then, recomputes each chunk's
  logits: 4 matmuls per chunk (logits; logits again, input and weight gradients).
* :func:`chunked_loss` evaluates a whole loss (a function of :class:`~tokenlab.alignment.common.TokenLogps`
  records such as ``dpo_loss``). A loss is a scalar, so its gradient can be computed *during the forward
  pass* and scaled by the upstream gradient afterwards (the scheme of Liger-Kernel's chunked losses): per
  chunk, logits → log-softmax in place → per-token quantities → ``g`` (autograd through the loss on
  ``[B, T]`` tensors) → ``∂/∂z`` in place → input and weight gradients. That is 3 matmuls and one
  ``[n, V]`` buffer per chunk (two with the KL), and only ``grad_input [N, H]`` and the weight gradient
  are kept. ``g`` is known once every token it depends on is scored: the loss's
  :func:`~tokenlab.alignment.common.token_loss` declaration says which (``sum_over="tokens"``: its own
  token; ``"sequences"``: its sequence, or pair of sequences; ``None``: the batch). Tokens are processed in
  groups of that kind; a group longer than ``chunk_size`` is scored chunk by chunk first and all its chunks
  but the last are recomputed once ``g`` is known. Exact in every case, memory ``O(chunk_size · V)``.

``backend="reference"`` materialises the logits and lets autograd differentiate the formulas
(:func:`_distribution_terms`); it is the readable specification both chunked paths are tested against.
The Hugging Face glue (a model and a batch in, :class:`Completions` out) is in :mod:`tokenlab.alignment.hf`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenlab._checks import check_bool, check_choice, check_finite, check_int, check_shape, check_tensor
from tokenlab.alignment.common import LossOutput, TokenLogps, loss_declaration

HeadBackend = Literal["chunked", "reference"]
HEAD_BACKENDS: tuple[str, ...] = ("chunked", "reference")
IGNORE_INDEX = -100


@dataclass
class LinearHead:
    """Hidden states ``[..., H]`` and the LM head mapping them to logits: ``weight [V, H]``, ``bias [V]``."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    def __post_init__(self) -> None:
        check_tensor("hidden", self.hidden)
        check_tensor("weight", self.weight)
        if self.weight.ndim != 2 or self.hidden.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"`weight` must be [V, H] with H = hidden.shape[-1] = {self.hidden.shape[-1]}, "
                f"got {tuple(self.weight.shape)}"
            )
        if self.bias is not None and tuple(self.bias.shape) != (self.weight.shape[0],):
            raise ValueError(f"`bias` must be [V] = [{self.weight.shape[0]}], got {tuple(self.bias.shape)}")


@dataclass
class TokenStats:
    """Per-token results of :func:`token_stats`, shaped like ``labels``; ignored tokens hold 0."""

    logps: Tensor
    entropy: Tensor | None = None
    kl: Tensor | None = None


@dataclass
class Completions:
    """A batch of completions as an LM head scores them: the input of :func:`chunked_loss`.

    Attributes:
        head: policy hidden states ``[B, T, H]`` and LM head (gradients flow into all three).
        labels: int64 ``[B, T]``, the token each position predicts; ``-100`` outside the completion. The
            loss's ``TokenLogps.mask`` is ``labels != -100``.
        reference: the reference model's hidden states ``[B, T, H]`` and head on the same tokens (no
            gradient): gives ``ref_logps`` and, to losses that need it, the per-token KL.
        ref_logps: ``[B, T]`` reference log-probabilities computed elsewhere (e.g. by a trainer), used
            instead of the reference head's.
    """

    head: LinearHead
    labels: Tensor
    reference: LinearHead | None = None
    ref_logps: Tensor | None = None

    def select(self, rows: slice) -> Completions:
        """The completions of ``rows`` (views; the heads' weights are the same tensors), e.g. the chosen and
        the rejected halves of a batch scored in one forward pass."""

        def part(head: LinearHead | None) -> LinearHead | None:
            return None if head is None else LinearHead(head.hidden[rows], head.weight, head.bias)

        ref_logps = None if self.ref_logps is None else self.ref_logps[rows]
        return Completions(part(self.head), self.labels[rows], part(self.reference), ref_logps)


# ---------------------------------------------------------------------------------------------------------
# The formulas. The reference path differentiates them with autograd; the chunked paths evaluate them in
# place, by vocabulary slices, and differentiate them by hand (_logits_grad).


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Logits in at least float32 (float64 stays float64); the matmul follows autocast when it is on."""
    z = F.linear(hidden, weight, bias)
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _distribution_terms(
    logits: Tensor, labels: Tensor, ref_logits: Tensor | None, want_entropy: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The specification: log-probabilities of ``labels``, entropy, and ``KL(q‖p)`` when ``ref_logits``
    are given, all ``[n]``."""
    log_p = torch.log_softmax(logits, dim=-1)
    logps = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1) if want_entropy else None
    kl = None
    if ref_logits is not None:
        log_q = torch.log_softmax(ref_logits.to(log_p.dtype), dim=-1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return logps, entropy, kl


VOCAB_SLICE = 4096
"""Vocabulary columns per step of the chunked paths' row reductions: their temporaries are
``[n, VOCAB_SLICE]``, so a chunk needs its one ``[n, V]`` buffer (two with the KL)."""


def _row_sum(fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """``fn(*tensors).sum(-1)`` ``[n]`` for ``[n, V]`` tensors, :data:`VOCAB_SLICE` columns at a time."""
    if torch.compiler.is_compiling():
        return fn(*tensors).sum(-1)
    total = fn(*(t[:, :VOCAB_SLICE] for t in tensors)).sum(-1)
    for s in range(VOCAB_SLICE, tensors[0].shape[-1], VOCAB_SLICE):
        total += fn(*(t[:, s : s + VOCAB_SLICE] for t in tensors)).sum(-1)
    return total


def _log_softmax_(logits: Tensor) -> Tensor:
    """``log_softmax(logits, -1)``, in place on CPU: the kernel reads each row before writing it, so
    aliasing its output with its input gives the same values bit for bit (tested) and no second buffer.
    Elsewhere, and under ``torch.compile``, the plain expression."""
    if torch.compiler.is_compiling() or logits.device.type != "cpu":
        return torch.log_softmax(logits, -1)
    return torch._log_softmax(logits, -1, False, out=logits)


def _label_logps(log_p: Tensor, labels: Tensor) -> Tensor:
    return log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _reference_terms(ref_logits: Tensor, labels: Tensor, want_kl: bool) -> tuple[Tensor | None, Tensor]:
    """A chunk's ``log q`` ``[n, V]`` (in place of ``ref_logits``; only kept for the KL) and the reference
    log-probabilities of ``labels`` ``[n]``."""
    log_q = _log_softmax_(ref_logits)
    return (log_q if want_kl else None), _label_logps(log_q, labels)


def _policy_terms(
    logits: Tensor, labels: Tensor, log_q: Tensor | None, want_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """A chunk's ``log p`` ``[n, V]`` (in place of ``logits``) and the formulas of
    :func:`_distribution_terms`: log-probabilities of ``labels``, entropy, ``KL(q‖p)`` ``[n]``."""
    log_p = _log_softmax_(logits)
    entropy = -_row_sum(lambda lp: lp.exp() * lp, log_p) if want_entropy else None
    kl = None if log_q is None else _row_sum(lambda lq, lp: lq.exp() * (lq - lp), log_q, log_p)
    return log_p, _label_logps(log_p, labels), entropy, kl


def _logits_grad(
    log_p: Tensor,
    log_q: Tensor | None,
    labels: Tensor,
    g_logps: Tensor | None,
    g_entropy: Tensor | None,
    entropy: Tensor | None,
    g_kl: Tensor | None,
) -> Tensor:
    """``∂(Σ_t g_t logp_t + gᴴ_t H_t + gᴷ_t KL_t)/∂z`` ``[n, V]`` for a chunk's logits, in place of ``log_p``
    (``log_q`` is overwritten too); a missing ``g`` counts as zero. No other ``[n, V]`` buffer is made."""
    a = torch.zeros_like(log_p[:, 0])
    if g_logps is not None:
        a = a - g_logps
    if g_kl is not None:
        a = a + g_kl
    if g_entropy is None:
        grad = log_p.exp_().mul_(a.unsqueeze(-1))
    else:  # p ⊙ (a − gᴴ H − gᴴ log p), slice by slice: p and log p are both needed
        a = (a - g_entropy * entropy).unsqueeze(-1)
        minus_g = -g_entropy.unsqueeze(-1)
        for s in range(0, log_p.shape[-1], VOCAB_SLICE):
            lp = log_p[:, s : s + VOCAB_SLICE]
            p = lp.exp()
            lp.mul_(minus_g).add_(a).mul_(p)
        grad = log_p
    if g_kl is not None:
        grad.sub_(log_q.exp_().mul_(g_kl.unsqueeze(-1)))
    if g_logps is not None:
        grad.scatter_add_(-1, labels.unsqueeze(-1), g_logps.unsqueeze(-1))
    return grad


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


# ---------------------------------------------------------------------------------------------------------
# The chunk loop, shared by token_stats (recompute in backward) and chunked_loss (gradients in forward).

Picks = list[Tensor]
"""A set of tokens: per side (e.g. chosen, rejected), a CPU tensor of indices into that side's flat tokens."""
Selection = list[slice | Tensor]
"""The same set as used to index device tensors: a slice where a side's indices are contiguous (a view, no
copy), else the indices on the device."""


def _valid_indices(labels: Tensor) -> Tensor:
    """Flat indices (CPU) of the tokens whose label is not ``-100``."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(-1).cpu()


def _chunks(picks: Picks, chunk_size: int) -> list[Picks]:
    """Split a set of tokens, side after side, into chunks of at most ``chunk_size`` tokens."""
    sizes = [len(p) for p in picks]
    offsets = [sum(sizes[:s]) for s in range(len(sizes))]
    return [
        [
            p[max(start - o, 0) : max(min(start + chunk_size - o, n), 0)]
            for p, o, n in zip(picks, offsets, sizes)
        ]
        for start in range(0, sum(sizes), chunk_size)
    ]


def _selection(picks: Picks, device: torch.device) -> Selection:
    def one(idx: Tensor) -> slice | Tensor:
        if len(idx) == 0:
            return slice(0, 0)
        first, last = int(idx[0]), int(idx[-1])
        return slice(first, last + 1) if last - first + 1 == len(idx) else idx.to(device)

    return [one(idx) for idx in picks]


def _sizes(selection: Selection) -> list[int]:
    return [s.stop - s.start if isinstance(s, slice) else len(s) for s in selection]


@dataclass
class _Terms:
    """One chunk's distributions (``log_p``, and ``log_q`` for the KL, ``[n, V]``), quantities ``[n]``, and
    its labels ``[n]`` and hidden states ``[n, H]`` (gathered once, used again in backward)."""

    log_p: Tensor | None
    log_q: Tensor | None
    logps: Tensor
    entropy: Tensor | None
    kl: Tensor | None
    ref_logps: Tensor | None
    labels: Tensor
    hidden: Tensor


class _HeadGrads:
    """Gradient accumulators: per-side input gradients ``[N_s, H]`` (input dtype), the weight gradient in
    ``promote_types(weight.dtype, float32)``, the bias gradient in ``promote_types(bias.dtype, float32)``."""

    def __init__(self, hiddens: Sequence[Tensor], weight: Tensor, bias: Tensor | None, need: Sequence[bool]):
        *need_h, need_w, need_b = need
        self.hiddens = [torch.zeros_like(h) if n else None for h, n in zip(hiddens, need_h)]
        self.weight = self.bias = None
        if need_w:
            self.weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        if need_b:
            self.bias = torch.zeros_like(bias, dtype=torch.promote_types(bias.dtype, torch.float32))

    def add(self, grad_z: Tensor, hidden: Tensor, weight: Tensor, selection: Selection) -> None:
        """Accumulate ``grad_z @ W`` (input), ``grad_zᵀ @ h`` (weight) and ``Σ grad_z`` (bias) of a chunk."""
        if any(g is not None for g in self.hiddens):
            grad_h = grad_z.to(weight.dtype) @ weight
            for dest, sel, part in zip(self.hiddens, selection, grad_h.split(_sizes(selection))):
                if dest is not None:
                    dest[sel] = part.to(dest.dtype)
        if self.weight is not None:
            same = hidden.dtype == self.weight.dtype == grad_z.dtype
            if same and not torch.is_autocast_enabled(hidden.device.type):
                self.weight.addmm_(grad_z.T, hidden)
            else:
                self.weight += (grad_z.T.to(hidden.dtype) @ hidden).to(self.weight.dtype)
        if self.bias is not None:
            self.bias += grad_z.sum(0).to(self.bias.dtype)

    def final(self, hiddens: Sequence[Tensor], weight: Tensor, bias: Tensor | None) -> list[Tensor | None]:
        """The gradients in the shapes and dtypes of their tensors: per side, then weight, then bias."""
        return [
            *(None if g is None else g.view_as(h) for g, h in zip(self.hiddens, hiddens)),
            None if self.weight is None else self.weight.to(weight.dtype),
            None if self.bias is None else self.bias.to(bias.dtype),
        ]


class _Heads:
    """The scored tokens of one call — one or more sides, each with flattened hidden states ``[N_s, H]`` and
    labels ``[N_s]`` (in range) — under one LM head and, optionally, one reference head (all detached)."""

    def __init__(
        self,
        hiddens: Sequence[Tensor],
        labels: Sequence[Tensor],
        weight: Tensor,
        bias: Tensor | None,
        reference: tuple[Sequence[Tensor], Tensor, Tensor | None] | None = None,
        compile: bool = False,
    ) -> None:
        self.hiddens, self.labels, self.weight, self.bias = hiddens, labels, weight, bias
        self.ref_hiddens, self.ref_weight, self.ref_bias = reference or (None, None, None)
        self.buffers: dict[str, Tensor] = {}
        kernels = (_reference_terms, _policy_terms, _logits_grad)
        if compile:
            kernels = tuple(_compiled(k) for k in kernels)
        self.reference_terms, self.policy_terms, self.logits_grad = kernels

    @staticmethod
    def gather(tensors: Sequence[Tensor], selection: Selection) -> Tensor:
        parts = [t[s] for t, s in zip(tensors, selection)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def scatter(dests: Sequence[Tensor], selection: Selection, values: Tensor) -> None:
        for d, s, v in zip(dests, selection, values.split(_sizes(selection))):
            d[s] = v.to(d.dtype)

    def logits(self, which: str, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """:func:`_logits`, written into one buffer per head kept for the whole call when no dtype changes
        (on CPU a fresh ``[n, V]`` allocation per chunk costs page faults; on GPU the allocator caches)."""
        if torch.is_autocast_enabled(hidden.device.type) or weight.dtype not in (
            torch.float32,
            torch.float64,
        ):
            return _logits(hidden, weight, bias)
        n, V = hidden.shape[0], weight.shape[0]
        buffer = self.buffers.get(which)
        if buffer is None or buffer.shape[0] < n:
            buffer = self.buffers[which] = hidden.new_empty(n, V, dtype=weight.dtype)
        hidden = hidden.to(weight.dtype)
        if bias is None:
            return torch.mm(hidden, weight.T, out=buffer[:n])
        return torch.addmm(bias, hidden, weight.T, out=buffer[:n])

    def forward(self, picks: Selection, want_entropy: bool, want_kl: bool, want_ref: bool) -> _Terms:
        """A chunk's terms. The reference's logits come first so that, without the KL, only one ``[n, V]``
        buffer exists at a time."""
        labels = self.gather(self.labels, picks)
        log_q = ref_logps = None
        if want_ref or want_kl:
            ref_hidden = self.gather(self.ref_hiddens, picks)
            # without the KL, log q is done with before the policy's logits exist: one buffer serves both
            ref_logits = self.logits(
                "reference" if want_kl else "policy", ref_hidden, self.ref_weight, self.ref_bias
            )
            log_q, ref_logps = self.reference_terms(ref_logits, labels, want_kl)
            del ref_logits
        hidden = self.gather(self.hiddens, picks)
        logits = self.logits("policy", hidden, self.weight, self.bias)
        log_p, logps, entropy, kl = self.policy_terms(logits, labels, log_q, want_entropy)
        return _Terms(log_p, log_q, logps, entropy, kl, ref_logps, labels, hidden)

    def backward(
        self, picks: Selection, terms: _Terms, grads: _HeadGrads, g: Sequence[Tensor | None]
    ) -> None:
        """Turn a chunk's ``g = (g_logps, g_entropy, g_kl)`` into logit gradients (in place of its
        distributions) and accumulate the input, weight and bias gradients."""
        g_logps, g_entropy, g_kl = g
        grad_z = self.logits_grad(
            terms.log_p, terms.log_q, terms.labels, g_logps, g_entropy, terms.entropy, g_kl
        )
        terms.log_p = terms.log_q = None
        grads.add(grad_z, terms.hidden, self.weight, picks)


class _ChunkedTokenStats(torch.autograd.Function):
    """Per-token quantities; backward recomputes each chunk's logits (it learns ``g`` only then)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, want_entropy, chunk_size
    ):
        device_type = hidden.device.type
        ctx.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        ctx.want_entropy, ctx.chunk_size, ctx.has_ref = want_entropy, chunk_size, ref_hidden is not None
        chunks = [_selection(c, hidden.device) for c in _chunks([_valid_indices(labels)], chunk_size)]
        safe = labels.clamp(min=0)
        heads = _Heads([hidden], [safe], weight, bias, ([ref_hidden], ref_weight, ref_bias))
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        logps = hidden.new_zeros(n, dtype=dtype)
        entropy = hidden.new_zeros(n if want_entropy else 0, dtype=dtype)
        kl = hidden.new_zeros(n if ctx.has_ref else 0, dtype=dtype)
        for selection in chunks:
            terms = heads.forward(selection, want_entropy, ctx.has_ref, False)
            (idx,) = selection
            logps[idx] = terms.logps
            if want_entropy:
                entropy[idx] = terms.entropy
            if ctx.has_ref:
                kl[idx] = terms.kl
        ctx.chunks = chunks
        ctx.save_for_backward(hidden, weight, bias, safe, ref_hidden, ref_weight, ref_bias, entropy)
        ctx.set_materialize_grads(False)
        return logps, entropy, kl

    @staticmethod
    def backward(ctx, g_logps, g_entropy, g_kl):
        hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, entropy = ctx.saved_tensors
        device_type, autocast_on, autocast_dtype = ctx.autocast
        g_entropy = g_entropy if ctx.want_entropy else None
        g_kl = g_kl if ctx.has_ref else None
        heads = _Heads([hidden], [labels], weight, bias, ([ref_hidden], ref_weight, ref_bias))
        grads = _HeadGrads([hidden], weight, bias, ctx.needs_input_grad[:3])
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            for selection in ctx.chunks:
                terms = heads.forward(selection, False, g_kl is not None, False)
                (idx,) = selection
                terms.entropy = None if g_entropy is None else entropy[idx]
                heads.backward(
                    selection,
                    terms,
                    grads,
                    [None if g is None else g[idx] for g in (g_logps, g_entropy, g_kl)],
                )
        return (*grads.final([hidden], weight, bias), *([None] * 6))


class _WithGradients(torch.autograd.Function):
    """Return ``loss`` unchanged; in backward, hand each of ``tensors`` its gradient — computed during the
    forward pass — times the upstream gradient (the loss is a scalar: that is the whole chain rule)."""

    @staticmethod
    def forward(ctx, loss, grads, *tensors):
        ctx.grads = grads
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("chunked_loss: backward through the same loss twice is not supported")
        grads, ctx.grads = ctx.grads, None
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return grad_loss, None, *scaled


# ---------------------------------------------------------------------------------------------------------
# Public entry points.


def _check_labels(name: str, labels: Tensor, lead: tuple[int, ...], vocab: int) -> None:
    check_tensor(name, labels, integer=True)
    check_shape(name, labels, lead, of="the leading shape of `head.hidden`")
    if ((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))).any():
        raise ValueError(f"`{name}` must lie in [0, {vocab}) or be {IGNORE_INDEX}")


def _check_reference(name: str, reference: LinearHead, lead: tuple[int, ...], vocab: int) -> None:
    if tuple(reference.hidden.shape[:-1]) != lead or reference.weight.shape[0] != vocab:
        raise ValueError(
            f"`{name}` must cover the same tokens {lead} and vocabulary {vocab}, got hidden "
            f"{tuple(reference.hidden.shape)} and weight {tuple(reference.weight.shape)}"
        )
    check_finite(f"{name}.hidden", reference.hidden)


def _flat(head: LinearHead) -> Tensor:
    return head.hidden.reshape(-1, head.hidden.shape[-1])


def _detached(head: LinearHead) -> tuple[Tensor, Tensor, Tensor | None]:
    bias = None if head.bias is None else head.bias.detach()
    return _flat(head).detach(), head.weight.detach(), bias


def token_stats(
    head: LinearHead,
    labels: Tensor,
    *,
    reference: LinearHead | None = None,
    entropy: bool = False,
    chunk_size: int = 1024,
    backend: HeadBackend = "chunked",
) -> TokenStats:
    """Per-token log-probabilities of ``labels`` (and on request entropy, KL to ``reference``).

    Use it when the per-token values themselves are needed; to evaluate a loss, :func:`chunked_loss` is
    faster (gradients during the forward pass: 3 matmuls per chunk instead of 4).

    Args:
        head: policy hidden states ``[..., H]`` and LM head ``weight [V, H]`` (+ ``bias [V]``).
        labels: int64 ``[...]`` (same leading shape as ``head.hidden``); ``-100`` marks ignored tokens,
            whose outputs are 0, which receive no gradient and, chunked, cost no compute.
        reference: a second head on the same tokens (e.g. a frozen reference model); when given,
            ``kl`` holds ``KL(q‖p)`` per token, ``q = softmax`` of the reference logits. No gradient
            flows into the reference.
        entropy: also return the policy entropy per token.
        chunk_size: tokens per chunk for ``backend="chunked"`` (any positive value; need not divide N).
        backend: ``"chunked"`` (custom autograd, ``O(chunk_size·V)`` memory) or ``"reference"``
            (materialised logits + ``log_softmax``; the readable specification).

    Returns:
        :class:`TokenStats` with float32 (float64 for float64 inputs) tensors shaped like ``labels``.
    """
    lead = tuple(head.hidden.shape[:-1])
    V = head.weight.shape[0]
    _check_labels("labels", labels, lead, V)
    if reference is not None:
        _check_reference("reference", reference, lead, V)
    check_int("chunk_size", chunk_size, low=1)
    check_choice("backend", backend, HEAD_BACKENDS)
    check_bool("entropy", entropy)
    check_finite("head.hidden", head.hidden)

    hidden, flat_labels = _flat(head), labels.reshape(-1).long()
    ref = _detached(reference) if reference is not None else (None, None, None)
    if backend == "reference":
        valid = flat_labels != IGNORE_INDEX
        with torch.no_grad():
            ref_logits = _logits(*ref) if reference is not None else None
        terms = _distribution_terms(
            _logits(hidden, head.weight, head.bias), flat_labels.clamp(min=0), ref_logits, entropy
        )
        lp, ent, kl = (None if t is None else t * valid for t in terms)
    else:
        lp, ent, kl = _ChunkedTokenStats.apply(
            hidden, head.weight, head.bias, flat_labels, *ref, entropy, chunk_size
        )
        ent = ent if entropy else None
        kl = kl if reference is not None else None
    return TokenStats(*(None if t is None else t.reshape(lead) for t in (lp, ent, kl)))


def _is_sharded(weight: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(weight, DTensor)


def _check_completions(completions: Sequence[Completions]) -> None:
    if not completions:
        raise ValueError("`chunked_loss` needs at least one `Completions`")
    first = completions[0]
    for k, c in enumerate(completions):
        name = f"completions[{k}]"
        if not isinstance(c, Completions):
            raise TypeError(f"`{name}` must be a Completions, got {type(c).__name__}")
        if c.head.hidden.ndim != 3:
            raise ValueError(f"`{name}.head.hidden` must be [B, T, H], got {tuple(c.head.hidden.shape)}")
        lead, V = tuple(c.head.hidden.shape[:2]), c.head.weight.shape[0]
        _check_labels(f"{name}.labels", c.labels, lead, V)
        if (c.labels == IGNORE_INDEX).all(-1).any():
            raise ValueError(f"`{name}.labels` marks no completion token in some sequence")
        check_finite(f"{name}.head.hidden", c.head.hidden)
        if _is_sharded(c.head.weight):
            raise ValueError(
                f"`{name}.head.weight` is a sharded DTensor (FSDP2, outside the forward of the unit holding "
                "the LM head): score the batch with the model's own forward and keep the head in the root "
                "`fully_shard` unit, which FSDP2 does not reshard after its forward (see docs/alignment.md)"
            )
        if c.head.weight is not first.head.weight or c.head.bias is not first.head.bias:
            raise ValueError("every `Completions` must share one LM head (the same weight and bias tensors)")
        if lead[0] != first.head.hidden.shape[0]:
            raise ValueError("every `Completions` must hold the same number of sequences B")
        if (c.reference is None) != (first.reference is None) or (
            c.reference is not None
            and (
                c.reference.weight is not first.reference.weight
                or c.reference.bias is not first.reference.bias
            )
        ):
            raise ValueError("every `Completions` must share one reference head, or none has one")
        if c.reference is not None:
            _check_reference(f"{name}.reference", c.reference, lead, V)
        if c.ref_logps is not None:
            check_shape(
                f"{name}.ref_logps", check_tensor(f"{name}.ref_logps", c.ref_logps), lead, of="labels"
            )
            check_finite(f"{name}.ref_logps", c.ref_logps)


def _groups(completions: Sequence[Completions], sum_over: str | None, chunk_size: int) -> list[Picks]:
    """Sets of tokens whose loss gradient is known once they are scored: chunks of ``chunk_size`` tokens
    (``sum_over="tokens"``); runs of whole sequences — row ``i`` of every side together — of at most
    ``chunk_size`` tokens, or a single longer sequence (``"sequences"``); all tokens (``None``)."""
    if sum_over == "tokens":
        return _chunks([_valid_indices(c.labels) for c in completions], chunk_size)
    if sum_over is None:
        return [[_valid_indices(c.labels) for c in completions]]
    valid = [(c.labels != IGNORE_INDEX).cpu() for c in completions]
    counts = torch.stack([v.sum(-1) for v in valid]).sum(0).tolist()
    bounds, size = [0], 0
    for row, n in enumerate(counts):
        if size and size + n > chunk_size:
            bounds.append(row)
            size = 0
        size += n
    bounds.append(len(counts))
    return [
        [v[a:b].reshape(-1).nonzero().squeeze(-1) + a * v.shape[1] for v in valid]
        for a, b in itertools.pairwise(bounds)
    ]


class _LossOnQuantities:
    """A loss evaluated on per-token quantities held in flat per-side buffers (filled in as tokens are
    scored); :meth:`grads` differentiates it with respect to one group's entries."""

    def __init__(self, loss_fn, loss_kwargs: dict, completions: Sequence[Completions], quantities, ref_logps):
        self.loss_fn, self.loss_kwargs = loss_fn, loss_kwargs
        self.quantities = quantities
        self.shapes = [tuple(c.labels.shape) for c in completions]
        dtype = quantities["logps"][0].dtype
        self.masks = [(c.labels != IGNORE_INDEX).to(dtype) for c in completions]
        self.ref_logps = [
            None if r is None else r.view(shape).to(dtype) for r, shape in zip(ref_logps, self.shapes)
        ]

    def records(
        self, leaves: dict[tuple[str, int], tuple[slice | Tensor, Tensor]] | None = None
    ) -> list[TokenLogps]:
        """One :class:`TokenLogps` per side, checked; with ``leaves[name, side] = (selection, values)``
        replacing entries, unchecked (every input was checked once by :func:`chunked_loss`)."""
        records = []
        for s, shape in enumerate(self.shapes):
            fields = {}
            for name, per_side in self.quantities.items():
                value = per_side[s]
                if leaves and (name, s) in leaves:
                    value = value.clone()
                    value[leaves[name, s][0]] = leaves[name, s][1]
                fields[name] = value.view(shape)
            make = TokenLogps.trusted if leaves is not None else TokenLogps
            records.append(make(fields.pop("logps"), self.masks[s], self.ref_logps[s], **fields))
        return records

    def evaluate(self, records: list[TokenLogps]) -> LossOutput:
        out = self.loss_fn(*records, **self.loss_kwargs)
        if not isinstance(out, LossOutput):
            raise TypeError(f"`loss_fn` must return a LossOutput, got {type(out).__name__}")
        return out

    def grads(self, selection: Selection) -> dict[str, list[Tensor | None]]:
        """``∂loss/∂quantity`` per quantity and side at the tokens of ``selection`` (None: no dependence)."""
        sizes = _sizes(selection)
        leaves = {
            (name, s): (sel, per_side[s][sel].clone().requires_grad_(True))
            for name, per_side in self.quantities.items()
            for s, (sel, n) in enumerate(zip(selection, sizes))
            if n
        }
        with torch.enable_grad():
            loss = self.evaluate(self.records(leaves)).loss
            found = torch.autograd.grad(loss, [leaf for _, leaf in leaves.values()], allow_unused=True)
        g = {name: [None] * len(selection) for name in self.quantities}
        for (name, s), value in zip(leaves, found):
            g[name][s] = value
        return g


def chunked_loss(
    loss_fn: Callable[..., LossOutput],
    *completions: Completions,
    chunk_size: int = 1024,
    backend: HeadBackend = "chunked",
    compile: bool = False,
    **loss_kwargs,
) -> LossOutput:
    """Evaluate ``loss_fn`` on completions scored by an LM head, computing the gradients of hidden states
    and head chunk by chunk during the forward pass (no ``[N, V]`` logits; 3 matmuls per chunk).

    ``loss_fn(*records, **loss_kwargs)`` is any tokenlab loss (``dpo_loss``, ``grpo_loss``, …) or any
    function of :class:`~tokenlab.alignment.common.TokenLogps` records returning a
    :class:`~tokenlab.alignment.common.LossOutput`; it receives one record per ``Completions`` (chosen and
    rejected for paired losses). Its :func:`~tokenlab.alignment.common.token_loss` declaration says which
    per-token quantities it needs (entropy, KL) and what its value is a sum over (tokens, sequences, or
    neither): that decides how early the gradient of each chunk is known (module docstring). The value,
    metrics and gradients equal the reference path's in float64.

    Args:
        loss_fn: the loss.
        completions: one :class:`Completions` per input record of the loss, all with ``B`` sequences and
            sharing one LM head (and one reference head, or none).
        chunk_size: most tokens whose logits exist at once (``O(chunk_size · V)`` memory).
        backend: ``"chunked"`` or ``"reference"`` (materialised logits and autograd; the specification).
        compile: ``torch.compile`` the per-chunk formulas (:func:`_policy_terms`, :func:`_logits_grad`, …).
        loss_kwargs: passed to ``loss_fn`` (``beta=…``, ``advantages=…``).

    Returns:
        ``loss_fn``'s :class:`~tokenlab.alignment.common.LossOutput`; its loss carries the gradients of every
        ``Completions``' hidden states and of the head's weight and bias (and of any tensor in
        ``loss_kwargs`` that requires one).
    """
    check_int("chunk_size", chunk_size, low=1)
    check_choice("backend", backend, HEAD_BACKENDS)
    check_bool("compile", compile)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
    _check_completions(completions)
    declared = loss_declaration(loss_fn)
    want_entropy, want_kl = "entropy" in declared.needs, "kl" in declared.needs
    if want_kl and completions[0].reference is None:
        raise ValueError("this loss needs the per-token KL: give every `Completions` a `reference` head")
    if backend == "reference":
        return loss_fn(*(_reference_record(c, want_entropy, want_kl) for c in completions), **loss_kwargs)

    first = completions[0]
    weight, bias = first.head.weight, first.head.bias
    hiddens = [_flat(c.head) for c in completions]
    want_ref = first.reference is not None and any(c.ref_logps is None for c in completions)
    reference = None
    if want_kl or want_ref:
        _, ref_weight, ref_bias = _detached(first.reference)
        reference = ([_detached(c.reference)[0] for c in completions], ref_weight, ref_bias)
    heads = _Heads(
        [h.detach() for h in hiddens],
        [c.labels.reshape(-1).long().clamp(min=0) for c in completions],
        weight.detach(),
        None if bias is None else bias.detach(),
        reference,
        compile,
    )
    dtype = torch.promote_types(first.head.hidden.dtype, torch.float32)
    names = ["logps", *(["entropy"] if want_entropy else []), *(["kl"] if want_kl else [])]
    quantities = {name: [h.new_zeros(len(h), dtype=dtype) for h in hiddens] for name in names}
    scored_ref = [h.new_zeros(len(h), dtype=dtype) for h in hiddens] if want_ref else None
    ref_logps = [
        c.ref_logps if c.ref_logps is not None or scored_ref is None else r
        for c, r in zip(completions, scored_ref or [None] * len(completions))
    ]
    loss = _LossOnQuantities(loss_fn, loss_kwargs, completions, quantities, ref_logps)
    need = [h.requires_grad for h in hiddens] + [
        weight.requires_grad,
        bias is not None and bias.requires_grad,
    ]
    need = [n and torch.is_grad_enabled() for n in need]
    grads = _HeadGrads(hiddens, weight, bias, need)
    g_full = {name: [torch.zeros_like(q) for q in per_side] for name, per_side in quantities.items()}

    device = first.head.hidden.device
    with torch.no_grad():
        for group in _groups(completions, declared.sum_over, chunk_size):
            chunks = [_selection(c, device) for c in _chunks(group, chunk_size)]
            for picks in chunks:
                terms = heads.forward(picks, want_entropy, want_kl, want_ref)
                for name in names:
                    heads.scatter(quantities[name], picks, getattr(terms, name))
                if want_ref:
                    heads.scatter(scored_ref, picks, terms.ref_logps)
            if not any(need):
                continue
            group = _selection(group, device)
            g_group = loss.grads(group)
            for name, per_side in g_group.items():
                for s, value in enumerate(per_side):
                    if value is not None:
                        g_full[name][s][group[s]] = value
            present = [
                any(v is not None for v in g_group.get(name, [])) for name in ("logps", "entropy", "kl")
            ]
            for k, picks in enumerate([chunks[-1], *chunks[:-1]]):
                if k:  # the group's last chunk is still at hand; the others are recomputed
                    terms = heads.forward(picks, False, want_kl, False)
                if want_entropy:
                    terms.entropy = heads.gather(quantities["entropy"], picks)
                g = [
                    heads.gather(g_full[name], picks) if p else None
                    for name, p in zip(("logps", "entropy", "kl"), present)
                ]
                heads.backward(picks, terms, grads, g)
            del terms
    out = loss.evaluate(loss.records())
    originals = [c.head.hidden for c in completions]
    out.loss = _WithGradients.apply(out.loss, grads.final(originals, weight, bias), *originals, weight, bias)
    return out


def _reference_record(c: Completions, want_entropy: bool, want_kl: bool) -> TokenLogps:
    """The :class:`TokenLogps` of ``c`` from materialised logits (``backend="reference"``)."""
    ref_logps = c.ref_logps
    if ref_logps is None and c.reference is not None:
        with torch.no_grad():
            ref_logps = token_stats(c.reference, c.labels, backend="reference").logps
    stats = token_stats(
        c.head,
        c.labels,
        reference=c.reference if want_kl else None,
        entropy=want_entropy,
        backend="reference",
    )
    mask = (c.labels != IGNORE_INDEX).to(stats.logps.dtype)
    return TokenLogps(stats.logps, mask, ref_logps=ref_logps, kl=stats.kl, entropy=stats.entropy)
