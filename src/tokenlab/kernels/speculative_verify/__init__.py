"""Speculative verification: accept/reject ``k`` draft tokens against the target in one fused step.

``reference.py`` is the specification (speculative sampling of Leviathan et al. and Chen et al.,
greedy prefix matching); ``kernel.py`` the fused Triton kernel, imported lazily.

Design: warping (temperature, top-k, top-p) has one home, :mod:`tokenlab.kernels.warping`. Top-k
and top-p need an order statistic that a one-pass kernel cannot have, so both backends receive
the *cutoff* (a raw logit per row, computed beforehand by
:meth:`~tokenlab.kernels.warping.Warping.cutoff`; ``-inf`` without top-k/top-p, and then no extra
pass) and the temperature, and apply ``x = logits / T where logits ≥ cutoff`` themselves.
Randomness comes from the caller: ``uniforms [B, k]`` for the acceptance tests and Exp(1)
``exponentials [B, k+1, V]`` for the exponential races, so both backends return the same tokens.

:func:`speculative_verify` validates its arguments; :func:`verify_block` is the unchecked step that
a decoding loop calls after validating once at its own entry.
"""

from __future__ import annotations

import torch

from tokenlab._checks import check_tensor
from tokenlab.backend import Backend, resolve_backend
from tokenlab.kernels.speculative_verify.reference import verify_reference
from tokenlab.kernels.warping import Warping, check_sampling_inputs


def speculative_verify(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    uniforms: torch.Tensor | None = None,
    exponentials: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a block of ``k`` draft tokens per sequence.

    Args:
        target_logits: ``[B, k+1, V]`` raw target logits at the ``k`` draft positions and the
            position after them (floating point).
        draft_probs: ``[B, k, V]`` the *warped* draft distributions the draft tokens were sampled
            from (same warping as the target's); ignored (may be ``None``) when greedy.
        draft_tokens: ``[B, k]`` integer draft tokens, ``k ≥ 1``.
        do_sample: speculative sampling (``True``) or greedy prefix matching (``False``).
        temperature, top_k, top_p: the warping of :class:`~tokenlab.kernels.warping.Warping`
            (sampling only).
        uniforms: ``[B, k]`` U[0, 1) numbers for the acceptance tests (sampling only).
        exponentials: ``[B, k+1, V]`` Exp(1) noise for the residual and bonus draws (sampling only).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``num_accepted [B]`` (int64, in ``0..k``) and ``next_tokens [B, k+1]`` (int64): the
        accepted draft tokens, then the residual/bonus (or greedy) token, then ``-1`` padding;
        the step emits ``num_accepted + 1`` tokens.
    """
    check_tensor("target_logits", target_logits)
    check_tensor("draft_tokens", draft_tokens)
    warping = Warping(do_sample, temperature, top_k, top_p)
    sample_inputs = {"draft_probs": draft_probs, "uniforms": uniforms, "exponentials": exponentials}
    if not do_sample:
        sample_inputs = dict.fromkeys(sample_inputs)
    impl = resolve_backend(backend, target_logits=target_logits, draft_tokens=draft_tokens, **sample_inputs)
    if target_logits.dim() != 3 or not target_logits.is_floating_point():
        raise ValueError(
            f"`target_logits` must be a floating-point [B, k+1, V] tensor, got {target_logits.shape}"
        )
    B, k1, V = target_logits.shape
    k = k1 - 1
    if k < 1:
        raise ValueError(f"`target_logits` must have k+1 ≥ 2 positions (k ≥ 1 draft tokens), got {k1}")
    if draft_tokens.shape != (B, k) or draft_tokens.is_floating_point() or draft_tokens.is_complex():
        raise ValueError(
            f"`draft_tokens` must be an integer tensor of shape {(B, k)}, got {tuple(draft_tokens.shape)}"
        )
    if draft_tokens.numel() and not (int(draft_tokens.min()) >= 0 and int(draft_tokens.max()) < V):
        raise ValueError(f"`draft_tokens` must lie in [0, {V}) (the vocabulary of `target_logits`)")
    if do_sample:
        shapes = {"draft_probs": (B, k, V), "uniforms": (B, k), "exponentials": (B, k + 1, V)}
        check_sampling_inputs(sample_inputs, shapes)
    return verify_block(target_logits, draft_probs, draft_tokens, warping, uniforms, exponentials, impl)


def verify_block(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    warping: Warping,
    uniforms: torch.Tensor | None,
    exponentials: torch.Tensor | None,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`speculative_verify` without argument checks, on the implementation ``impl``
    (``"triton"`` or ``"reference"``, from :func:`tokenlab.backend.resolve_backend`)."""
    args = dict(
        do_sample=warping.do_sample,
        temperature=warping.temperature,
        cutoff=warping.cutoff(target_logits) if warping.do_sample else None,
        uniforms=uniforms,
        exponentials=exponentials,
    )
    draft_tokens = draft_tokens.long()
    if impl == "reference":
        return verify_reference(target_logits, draft_probs, draft_tokens, **args)
    from tokenlab.kernels.speculative_verify.kernel import verify_triton

    return verify_triton(target_logits, draft_probs, draft_tokens, **args)


__all__ = ["speculative_verify", "verify_block"]
