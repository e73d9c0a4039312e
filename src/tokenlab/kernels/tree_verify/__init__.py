"""Draft-tree verification: accept a root path of a token tree and emit one more token, in one step.

``reference.py`` is the specification (greedy path matching; multi-candidate rejection sampling
with or without replacement, after *SpecInfer* and *Recursive Speculative Decoding*);
``kernel.py`` the fused Triton kernel, imported lazily. Warping comes from
:mod:`tokenlab.kernels.warping` as in :mod:`tokenlab.kernels.speculative_verify`: both backends get
the per-node cutoff and the temperature. Randomness comes from the caller (``uniforms [B, N+1]``,
one per node, and ``exponentials [B, V]``, one Exp(1) row per sequence for its one drawn token), so
both backends return the same tokens.

:func:`tree_verify` validates its arguments; :func:`verify_tree_block` is the unchecked step that a
decoding loop calls (with :func:`child_links` computed once per tree).
"""

from __future__ import annotations

import torch

from tokenlab._checks import check_bool, check_tensor
from tokenlab.backend import Backend, resolve_backend
from tokenlab.kernels.tree_verify.reference import SiblingRejection, child_links, tree_verify_reference
from tokenlab.kernels.warping import Warping, check_sampling_inputs

__all__ = ["SiblingRejection", "child_links", "tree_verify", "verify_tree_block"]


def tree_verify(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    do_sample: bool = False,
    replacement: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    uniforms: torch.Tensor | None = None,
    exponentials: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verify one draft token tree per sequence.

    Node 0 of each tree is the root (the last committed token); node ``i ≥ 1`` is a draft token with
    a parent of smaller index; siblings are tested in index order (the order the draft drew them).

    Args:
        target_logits: ``[B, N+1, V]`` raw target logits at every node (floating point).
        draft_probs: ``[B, N+1, V]`` the draft's *warped* distribution at every node with children
            (the one its children were drawn from); ignored (may be ``None``) when greedy.
        tokens: ``[B, N+1]`` integer tokens (the root's is not read).
        parents: ``[B, N+1]`` integer parent of each node, ``-1`` for the root (and invalid nodes).
        valid: ``[B, N+1]`` bool, nodes that exist (default: all); the root must be valid.
        do_sample: multi-candidate rejection sampling (``True``) or greedy path matching.
        replacement: how siblings were drawn: i.i.d. (``True``, *SpecInfer*'s rule, ``q`` unchanged
            after a rejection) or without replacement (``False``, *Recursive Speculative Decoding*'s
            rule: a rejected token leaves ``q``, which is renormalised). Sampling only.
        temperature, top_k, top_p: the warping of :class:`~tokenlab.kernels.warping.Warping`.
        uniforms: ``[B, N+1]`` U[0, 1) numbers, ``uniforms[b, i]`` for the test of node ``i``.
        exponentials: ``[B, V]`` Exp(1) noise for the one drawn token per sequence.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``num_accepted [B]``, ``path [B, N]`` (the accepted nodes, root excluded, then ``-1``) and
        ``next_tokens [B, N+1]`` (their tokens, then the emitted token, then ``-1``): the step emits
        ``num_accepted + 1`` tokens. Greedy: the longest root path whose every token is the
        target's argmax, then the argmax after it. Sampling: the emitted tokens follow the target's
        warped law exactly, when each node's children were drawn as ``replacement`` says.
    """
    check_tensor("target_logits", target_logits)
    check_tensor("tokens", tokens)
    check_tensor("parents", parents)
    check_bool("replacement", replacement)
    warping = Warping(do_sample, temperature, top_k, top_p)
    sample_inputs = {"draft_probs": draft_probs, "uniforms": uniforms, "exponentials": exponentials}
    if not do_sample:
        sample_inputs = dict.fromkeys(sample_inputs)
    impl = resolve_backend(
        backend, target_logits=target_logits, tokens=tokens, parents=parents, valid=valid, **sample_inputs
    )
    if target_logits.dim() != 3 or not target_logits.is_floating_point():
        raise ValueError(
            f"`target_logits` must be a floating-point [B, N+1, V] tensor, got {target_logits.shape}"
        )
    B, n1, V = target_logits.shape
    for name, value in (("tokens", tokens), ("parents", parents)):
        if value.shape != (B, n1) or value.is_floating_point() or value.is_complex():
            raise ValueError(
                f"`{name}` must be an integer tensor of shape {(B, n1)}, got {tuple(value.shape)}"
            )
    if valid is None:
        valid = torch.ones(B, n1, dtype=torch.bool, device=tokens.device)
    elif valid.shape != (B, n1) or valid.dtype != torch.bool or (B and not bool(valid[:, 0].all())):
        raise ValueError(
            f"`valid` must be a bool tensor of shape {(B, n1)} whose column 0 (the root) is True"
        )
    index = torch.arange(n1, device=parents.device)
    real = valid & (index > 0)
    if not bool(((parents >= 0) & (parents < index) | ~real).all()) or bool((parents[:, 0] != -1).any()):
        raise ValueError("`parents` must give every valid node i >= 1 a parent in [0, i) and the root -1")
    if tokens.numel() and not bool(((tokens[real] >= 0) & (tokens[real] < V)).all()):
        raise ValueError(f"`tokens` of valid nodes must lie in [0, {V}) (the vocabulary of `target_logits`)")
    if do_sample:
        shapes = {"draft_probs": (B, n1, V), "uniforms": (B, n1), "exponentials": (B, V)}
        check_sampling_inputs(sample_inputs, shapes)
    first_child, next_sibling = child_links(torch.where(real, parents, -1), real | (index == 0))
    return verify_tree_block(
        target_logits, draft_probs, tokens.long(), first_child, next_sibling, warping, replacement,
        uniforms, exponentials, impl,
    )  # fmt: skip


def verify_tree_block(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    tokens: torch.Tensor,
    first_child: torch.Tensor,
    next_sibling: torch.Tensor,
    warping: Warping,
    replacement: bool,
    uniforms: torch.Tensor | None,
    exponentials: torch.Tensor | None,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`tree_verify` without argument checks, on links from :func:`child_links` and the
    implementation ``impl`` (``"triton"`` or ``"reference"``)."""
    args = dict(
        do_sample=warping.do_sample,
        replacement=replacement,
        temperature=warping.temperature,
        cutoff=warping.cutoff(target_logits) if warping.do_sample else None,
        uniforms=uniforms,
        exponentials=exponentials,
    )
    if impl == "reference":
        return tree_verify_reference(target_logits, draft_probs, tokens, first_child, next_sibling, **args)
    from tokenlab.kernels.tree_verify.kernel import tree_verify_triton

    return tree_verify_triton(target_logits, draft_probs, tokens, first_child, next_sibling, **args)
