"""Per-token quantities from an LM head, computed in chunks over tokens (never a full ``[N, V]``).

Every alignment loss in tokenlab needs, per completion token ``t``, some of

* ``logp_t = log softmax(h_t Wᵀ + b)[y_t]`` — the log-probability of the label;
* ``H_t = −Σ_v p_v log p_v`` — the entropy of the policy's next-token distribution;
* ``KL_t = Σ_v q_v (log q_v − log p_v)`` — the forward KL from a reference distribution ``q``
  (another head's ``softmax(h'_t W'ᵀ + b')``) to the policy ``p``, as in the sequential KL of
  *Token-level Direct Preference Optimization*.

:func:`token_stats` computes them from hidden states ``[N, H]`` and the LM-head weight ``[V, H]``.
``backend="chunked"`` processes ``chunk_size`` tokens at a time inside ONE custom autograd function
(:class:`_ChunkedTokenStats`) that keeps only the inputs and recomputes each chunk's logits in
backward, so peak memory is ``O(chunk_size · V)`` instead of ``O(N · V)``. The gradient of every
requested term with respect to the chunk's logits ``z`` (``p = softmax(z)``, ``e_y`` one-hot):

    ∂logp_t/∂z = e_y − p          ∂H_t/∂z = −p ⊙ (log p + H_t)          ∂KL_t/∂z = p − q

``backend="reference"`` materialises the logits and lets autograd differentiate the same formulas;
it is the readable specification the chunked path is tested against. :func:`causal_lm_head` runs any
Hugging Face causal LM's body and returns its last hidden states with the LM head, ready for
:func:`token_stats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenlab._checks import check_choice, check_finite, check_int, check_shape, check_tensor

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


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Logits in at least float32 (float64 stays float64); the matmul follows autocast when it is on."""
    z = F.linear(hidden, weight, bias)
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _distribution_terms(
    logits: Tensor, labels: Tensor, ref_logits: Tensor | None, want_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(log p [n, V], logp of labels [n], entropy [n] | None, KL(q‖p) [n] | None)`` — the one home of
    the formulas, shared by the reference path and by each chunk of the chunked path."""
    log_p = torch.log_softmax(logits, dim=-1)
    logp = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1) if want_entropy else None
    kl = None
    if ref_logits is not None:
        log_q = torch.log_softmax(ref_logits.to(log_p.dtype), dim=-1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return log_p, logp, entropy, kl


def _chunk_logits_grad(
    logits: Tensor,
    labels: Tensor,
    valid: Tensor,
    g_logps: Tensor | None,
    entropy_term: tuple[Tensor, Tensor] | None,
    kl_term: tuple[Tensor, Tensor, Tensor, Tensor | None] | None,
) -> Tensor:
    """``∂(Σ_t g_t · term_t)/∂z`` for one chunk of logits ``z [C, V]``, built in place so that at most three
    ``[C, V]`` buffers are alive: ``g·(e_y − p)``, ``−g_H·p ⊙ (log p + H)`` and ``g_KL·(p − q)``."""
    log_p = torch.log_softmax(logits, dim=-1)
    del logits
    p = log_p.exp()
    w = valid.to(p.dtype)
    grad = None
    if kl_term is not None:
        g_kl, ref_hidden, ref_weight, ref_bias = kl_term
        q = torch.softmax(_logits(ref_hidden, ref_weight, ref_bias), dim=-1).to(p.dtype)
        grad = q.sub_(p).mul_(-(g_kl * w).unsqueeze(-1))
    if entropy_term is not None:
        g_entropy, entropy = entropy_term
        term = log_p.add_(entropy.unsqueeze(-1)).mul_(p).mul_(-(g_entropy * w).unsqueeze(-1))
        grad = term if grad is None else grad.add_(term)
    del log_p
    if g_logps is not None:
        coef = (g_logps * w).unsqueeze(-1)
        term = p.mul_(-coef).scatter_add_(-1, labels.unsqueeze(-1), coef)
        grad = term if grad is None else grad.add_(term)
    return torch.zeros_like(p) if grad is None else grad


class _ChunkedTokenStats(torch.autograd.Function):
    """One autograd function for every per-token quantity; backward recomputes each chunk's logits."""

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
        ctx.want_entropy, ctx.chunk_size = want_entropy, chunk_size
        ctx.has_ref = ref_hidden is not None
        valid = labels != IGNORE_INDEX
        safe = labels.masked_fill(~valid, 0)
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        logps = hidden.new_zeros(n, dtype=out_dtype)
        entropy = hidden.new_zeros(n if want_entropy else 0, dtype=out_dtype)
        kl = hidden.new_zeros(n if ctx.has_ref else 0, dtype=out_dtype)
        with torch.no_grad():
            for s in range(0, n, chunk_size):
                sl = slice(s, s + chunk_size)
                ref_logits = _logits(ref_hidden[sl], ref_weight, ref_bias) if ctx.has_ref else None
                _, lp, ent, k = _distribution_terms(
                    _logits(hidden[sl], weight, bias), safe[sl], ref_logits, want_entropy
                )
                logps[sl] = lp
                if want_entropy:
                    entropy[sl] = ent
                if ctx.has_ref:
                    kl[sl] = k
        logps, entropy, kl = (t * valid if t.numel() else t for t in (logps, entropy, kl))
        ctx.save_for_backward(hidden, weight, bias, safe, valid, ref_hidden, ref_weight, ref_bias, entropy)
        ctx.set_materialize_grads(False)
        return logps, entropy, kl

    @staticmethod
    def backward(ctx, g_logps, g_entropy, g_kl):
        hidden, weight, bias, labels, valid, ref_hidden, ref_weight, ref_bias, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        device_type, autocast_on, autocast_dtype = ctx.autocast
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = (
            torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
            if need_w
            else None
        )
        grad_b = (
            torch.zeros_like(bias, dtype=torch.promote_types(bias.dtype, torch.float32)) if need_b else None
        )
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            for s in range(0, hidden.shape[0], ctx.chunk_size):
                sl = slice(s, s + ctx.chunk_size)
                grad_z = _chunk_logits_grad(
                    _logits(hidden[sl], weight, bias),
                    labels[sl],
                    valid[sl],
                    None if g_logps is None else g_logps[sl],
                    None if g_entropy is None or not ctx.want_entropy else (g_entropy[sl], entropy[sl]),
                    None
                    if g_kl is None or not ctx.has_ref
                    else (g_kl[sl], ref_hidden[sl], ref_weight, ref_bias),
                )
                if need_h:
                    grad_h[sl] = (grad_z.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += (grad_z.T.to(hidden.dtype) @ hidden[sl]).to(grad_w.dtype)
                if need_b:
                    grad_b += grad_z.sum(0).to(grad_b.dtype)
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            *([None] * 6),
        )


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

    Args:
        head: policy hidden states ``[..., H]`` and LM head ``weight [V, H]`` (+ ``bias [V]``).
        labels: int64 ``[...]`` (same leading shape as ``head.hidden``); ``-100`` marks ignored tokens,
            whose outputs are 0 and which receive no gradient.
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
    check_tensor("labels", labels, integer=True)
    lead = tuple(head.hidden.shape[:-1])
    check_shape("labels", labels, lead, of="the leading shape of `head.hidden`")
    V = head.weight.shape[0]
    if ((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))).any():
        raise ValueError(f"`labels` must lie in [0, {V}) or be {IGNORE_INDEX}")
    if reference is not None and (
        tuple(reference.hidden.shape[:-1]) != lead or reference.weight.shape[0] != V
    ):
        raise ValueError(
            f"`reference` must cover the same tokens {lead} and vocabulary {V}, got hidden "
            f"{tuple(reference.hidden.shape)} and weight {tuple(reference.weight.shape)}"
        )
    check_int("chunk_size", chunk_size, low=1)
    check_choice("backend", backend, HEAD_BACKENDS)
    check_finite("head.hidden", head.hidden)
    if reference is not None:
        check_finite("reference.hidden", reference.hidden)

    H = head.hidden.shape[-1]
    hidden, flat_labels = head.hidden.reshape(-1, H), labels.reshape(-1).long()
    ref = None
    if reference is not None:
        ref = (reference.hidden.reshape(-1, H).detach(), reference.weight.detach(), reference.bias)
        ref = (*ref[:2], None if ref[2] is None else ref[2].detach())

    if backend == "reference":
        valid = flat_labels != IGNORE_INDEX
        with torch.no_grad():
            ref_logits = _logits(*ref) if ref is not None else None
        _, lp, ent, kl = _distribution_terms(
            _logits(hidden, head.weight, head.bias), flat_labels.masked_fill(~valid, 0), ref_logits, entropy
        )
        lp, ent, kl = (None if t is None else t * valid for t in (lp, ent, kl))
    else:
        lp, ent, kl = _ChunkedTokenStats.apply(
            hidden, head.weight, head.bias, flat_labels, *(ref or (None, None, None)), entropy, chunk_size
        )
        ent = ent if entropy else None
        kl = kl if ref is not None else None
    return TokenStats(*(None if t is None else t.reshape(lead) for t in (lp, ent, kl)))


def causal_lm_head(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None
) -> LinearHead:
    """Run a Hugging Face causal LM's body and return its last hidden states ``[B, T, H]`` with its LM head.

    Position ``t`` predicts token ``t + 1``; use :func:`shift_for_next_token` to align labels. Models that
    post-process logits (final logit soft-capping, logit scaling) are refused, since the head alone would
    not reproduce their logits.
    """
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1.0):
            raise ValueError(
                f"`model` post-processes its logits ({attr}={getattr(config, attr)}); unsupported"
            )
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"`model` must have an nn.Linear LM head, got {type(head).__name__}")
    body = model.get_decoder()
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return LinearHead(out.last_hidden_state, head.weight, head.bias)


def shift_for_next_token(
    head: LinearHead, input_ids: Tensor, completion_mask: Tensor
) -> tuple[LinearHead, Tensor]:
    """Align a :func:`causal_lm_head` output with next-token labels: hidden ``[B, T−1, H]``, labels
    ``[B, T−1]`` = ``input_ids[:, 1:]`` with ``-100`` where ``completion_mask[:, 1:]`` is 0."""
    labels = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, IGNORE_INDEX)
    return LinearHead(head.hidden[:, :-1], head.weight, head.bias), labels
