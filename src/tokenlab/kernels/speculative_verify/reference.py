"""Reference: the verification step of speculative decoding, the specification of the kernel.

Speculative sampling (*Fast Inference from Transformers via Speculative Decoding*, Leviathan et
al.; *Accelerating Large Language Model Decoding with Speculative Sampling*, Chen et al.): for
each sequence, with warped target distributions ``p_0..p_k`` and draft distributions ``q_0..q_{k-1}``
that proposed tokens ``d_0..d_{k-1}``,

* draft token ``d_j`` is accepted when ``u_j < min(1, p_j(d_j) / q_j(d_j))``; the first rejection
  at ``j = n`` ends the step;
* the token emitted at ``n`` is drawn from the residual ``norm(max(0, p_n − q_n))`` (from ``p_n``
  when the residual is empty), or from ``p_k`` (the bonus token) when all ``k`` were accepted.

Greedy verification accepts ``d_j`` while it equals ``argmax(logits_j)`` and emits that argmax.

Draws from a distribution ``w`` use the caller's Exp(1) noise ``E`` by the exponential race
``argmax_v w_v / E_v`` (``P(v wins) = w_v / Σ w``), so given ``uniforms`` and ``exponentials``
the step is deterministic and the kernel reproduces it token for token.
"""

from __future__ import annotations

import torch

from tokenlab.kernels.warping import apply_cutoff


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
    """``min(1, p(d) / q(d))`` for ``p, q [..., V]`` and tokens ``d [...]`` → ``[...]``."""
    index = draft_tokens.unsqueeze(-1)
    return (p.gather(-1, index) / q.gather(-1, index)).squeeze(-1).clamp(max=1.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p − q))`` over the last dimension; ``p`` where the residual is all zero."""
    residual = (p - q).clamp(min=0)
    total = residual.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(p.dtype).tiny), p)


def exponential_race(weights: torch.Tensor, exponentials: torch.Tensor) -> torch.Tensor:
    """Index ``argmax_v weights_v / E_v`` (first on ties): a draw from ``norm(weights)``."""
    return (weights / exponentials).argmax(dim=-1)


def assemble(
    accepted: torch.Tensor, replacement: torch.Tensor, draft_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-position decisions into the step's output.

    Args:
        accepted: ``[B, k]`` bool, the acceptance test of every draft position.
        replacement: ``[B, k+1]`` the token emitted if the step ends at that position.
        draft_tokens: ``[B, k]``.

    Returns:
        ``num_accepted [B]`` (accepted prefix length ``n``) and ``next_tokens [B, k+1]``:
        ``d_0..d_{n-1}``, then ``replacement[n]``, then ``-1``.
    """
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)
    positions = torch.arange(replacement.shape[-1], device=replacement.device)
    n = num_accepted.unsqueeze(-1)
    drafts = torch.nn.functional.pad(draft_tokens, (0, 1), value=-1)
    emitted = replacement.gather(-1, n)
    next_tokens = torch.where(positions < n, drafts, torch.where(positions == n, emitted, -1))
    return num_accepted, next_tokens


def verify_reference(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float,
    cutoff: torch.Tensor,
    uniforms: torch.Tensor | None,
    exponentials: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes: ``target_logits [B, k+1, V]``, ``draft_probs [B, k, V]``, ``draft_tokens [B, k]``,
    ``cutoff [B, k+1]`` (see :meth:`tokenlab.kernels.warping.Warping.cutoff`), ``uniforms [B, k]``,
    ``exponentials [B, k+1, V]`` → ``(num_accepted [B], next_tokens [B, k+1])``."""
    k = draft_tokens.shape[-1]
    if not do_sample:
        replacement = target_logits.argmax(dim=-1)
        return assemble(draft_tokens == replacement[:, :k], replacement, draft_tokens)
    acc = torch.promote_types(target_logits.dtype, torch.float32)
    p = torch.softmax(apply_cutoff(target_logits.to(acc), cutoff.to(acc), temperature), dim=-1)
    q = draft_probs.to(acc)
    accepted = uniforms.to(acc) < acceptance_probability(p[:, :k], q, draft_tokens)
    weights = torch.cat([residual_distribution(p[:, :k], q), p[:, k:]], dim=1)
    replacement = exponential_race(weights, exponentials.to(acc))
    return assemble(accepted, replacement, draft_tokens)
