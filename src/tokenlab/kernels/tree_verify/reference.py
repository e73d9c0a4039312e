"""Reference: verification of a draft token tree, the specification of the kernel.

A tree holds ``N + 1`` nodes per sequence: node 0 is the root (the last committed token), every
other node a draft token whose parent has a smaller index; siblings are ordered by index, which is
the order the draft drew them in. Walking from the root, each node either accepts one of its
children (and the walk continues there) or emits a token and the step ends; the step emits the
accepted tokens and that one more token.

* **greedy** — the child whose token equals ``argmax`` of the target's logits at the node is
  accepted; otherwise that argmax is emitted. The result is the longest root path on which every
  token is the target's greedy choice, then the target's next greedy token.
* **sampling** — *multi-candidate* rejection sampling over the siblings ``x_1, x_2, …`` in order,
  with the warped target distribution ``r_1 = p`` at the node and the draft's ``q``:

      accept x_i  when  u_i < r_i(x_i) / q_i(x_i);
      else        r_{i+1} = norm(max(0, r_i − q_i))            (r_i itself if that is all zero)

  and, when every child is rejected (or the node is a leaf), the token is drawn from the last
  ``r``. With ``replacement=True`` the siblings were drawn i.i.d. from ``q`` and ``q_i = q`` —
  the multi-step speculative sampling of *SpecInfer: Accelerating Large Language Model Serving
  with Tree-based Speculative Inference and Verification*. With ``replacement=False`` they were
  drawn *without* replacement and ``q_i`` is ``q`` with ``x_1..x_{i−1}`` removed and renormalised,
  ``q_i = q·1[v ∉ {x_<i}] / (1 − Σ_{j<i} q(x_j))`` — the recursive rejection sampling of
  *Recursive Speculative Decoding: Accelerating LLM Inference via Sampling Without Replacement*.
  Either way the emitted token at a node has law ``p`` exactly (by induction over the siblings:
  ``P(x_i accepted) = min(q_i, r_i)`` pointwise, and ``r_{i+1}`` is the law of the rest), whatever
  the number of siblings, provided the tree's shape depends on the draft's draws only.

Draws use the caller's random numbers: ``uniforms[b, i]`` for the test of node ``i`` and one Exp(1)
row ``exponentials[b]`` per sequence for the one token drawn (the exponential race
``argmax_v r_v / E_v``), so the kernel reproduces the reference token for token.

Two facts keep the kernel small: a rejected ``x_i`` has ``r_i(x_i) < q_i(x_i)``, so ``r_{i+1}(x_i) = 0``
and removing ``x_i`` from ``q`` changes no later residual; only the scalar mass ``Σ q(x_j)`` of the
removed tokens is needed.
"""

from __future__ import annotations

import torch

from tokenlab.kernels.speculative_verify.reference import exponential_race
from tokenlab.kernels.warping import apply_cutoff


def child_links(parents: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Children lists as links: ``first_child [B, N+1]`` and ``next_sibling [B, N+1]`` (``-1``: none).

    ``parents [B, N+1]`` (``-1`` for the root and for invalid nodes), ``valid [B, N+1]`` bool; the
    children of a node are its valid nodes of that parent, in index order.
    """
    n = parents.shape[-1]
    index = torch.arange(n, device=parents.device)
    # same[b, i, j]: j is a valid later sibling of i; is_child[b, p, j]: j is a valid child of p.
    sibling = (
        (parents[:, :, None] == parents[:, None, :]) & valid[:, None, :] & (index[None, :] > index[:, None])
    )
    is_child = (parents[:, None, :] == index[None, :, None]) & valid[:, None, :]
    none = torch.full_like(parents, n)

    def first(hit: torch.Tensor) -> torch.Tensor:
        found = torch.where(hit, index, n).amin(dim=-1) if n else none
        return torch.where(found == n, -1, found)

    return first(is_child), torch.where(valid & (parents >= 0), first(sibling), -1)


class SiblingRejection:
    """Multi-candidate rejection sampling at one node per row, one sibling at a time.

    Built from the target's ``p [..., V]`` and the draft's ``q [..., V]`` at the node; ``r`` is the
    current target-side distribution (``p`` at first). For each sibling ``x [...]`` in draft order,
    :meth:`acceptance` gives ``min(1, r(x) / q_i(x))``; after a rejection, :meth:`reject` moves the
    rejecting rows to ``r ← norm(max(0, r − q_i))`` (kept when that is all zero) and, without
    replacement, removes ``x`` from ``q``. When every sibling is rejected, the emitted token is
    drawn from ``r``.
    """

    def __init__(self, p: torch.Tensor, q: torch.Tensor, *, replacement: bool) -> None:
        self.r, self.q, self.replacement = p, q, replacement
        self.removed = torch.zeros_like(q[..., 0])  # Σ q over the removed tokens
        self.tried = torch.zeros_like(q, dtype=torch.bool)

    def q_i(self) -> torch.Tensor:
        """The draft's distribution of the next sibling: ``q``, less the removed tokens, renormalised."""
        return self.q.masked_fill(self.tried, 0.0) / (1 - self.removed[..., None])

    def acceptance(self, x: torch.Tensor) -> torch.Tensor:
        """``min(1, r(x) / q_i(x))`` for tokens ``x [...]``."""
        x = x[..., None]
        return (self.r.gather(-1, x) / self.q_i().gather(-1, x)).squeeze(-1).clamp(max=1.0)

    def reject(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Sibling ``x [...]`` is rejected (in the ``rows [...]`` where given, bool)."""
        rows = torch.ones_like(x, dtype=torch.bool) if rows is None else rows
        residual = (self.r - self.q_i()).clamp(min=0)
        total = residual.sum(dim=-1, keepdim=True)
        moves = rows[..., None] & (total > 0)
        self.r = torch.where(moves, residual / total.clamp(min=torch.finfo(total.dtype).tiny), self.r)
        if not self.replacement:
            removed = torch.zeros_like(self.tried).scatter_(-1, x[..., None], rows[..., None])
            self.removed = self.removed + torch.where(rows, self.q.gather(-1, x[..., None]).squeeze(-1), 0.0)
            self.tried |= removed


def tree_verify_reference(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    tokens: torch.Tensor,
    first_child: torch.Tensor,
    next_sibling: torch.Tensor,
    *,
    do_sample: bool,
    replacement: bool,
    temperature: float,
    cutoff: torch.Tensor | None,
    uniforms: torch.Tensor | None,
    exponentials: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes: ``target_logits [B, N+1, V]`` (at the root and every node), ``draft_probs [B, N+1, V]``
    (the draft's warped distribution at every node that has children), ``tokens``, ``first_child``,
    ``next_sibling``, ``cutoff``, ``uniforms`` ``[B, N+1]``, ``exponentials [B, V]`` →
    ``(num_accepted [B], path [B, N], next_tokens [B, N+1])``: the accepted nodes (``-1`` after),
    and their tokens followed by the emitted token (``-1`` after).

    All sequences walk their trees in lockstep: a round visits the current node of every sequence
    still walking and tests its children in order."""
    B, n1, _V = target_logits.shape
    acc = torch.promote_types(target_logits.dtype, torch.float32)
    rows = torch.arange(B, device=tokens.device)
    path = torch.full((B, n1 - 1), -1, dtype=torch.long, device=tokens.device)
    next_tokens = torch.full((B, n1), -1, dtype=torch.long, device=tokens.device)
    node = torch.zeros(B, dtype=torch.long, device=tokens.device)
    depth = torch.zeros_like(node)
    walking = torch.ones(B, dtype=torch.bool, device=tokens.device)
    while bool(walking.any()):
        logits = target_logits[rows, node].to(acc)
        if do_sample:
            p = torch.softmax(apply_cutoff(logits, cutoff[rows, node].to(acc), temperature), dim=-1)
            rejection = SiblingRejection(p, draft_probs[rows, node].to(acc), replacement=replacement)
        else:
            best = logits.argmax(dim=-1)
        child = first_child[rows, node]
        chosen = torch.full_like(node, -1)
        while True:
            testing = walking & (child >= 0) & (chosen < 0)
            if not bool(testing.any()):
                break
            x = tokens[rows, child.clamp(min=0)]
            if do_sample:
                accept = uniforms[rows, child.clamp(min=0)].to(acc) < rejection.acceptance(x)
                rejection.reject(x, testing & ~accept)
            else:
                accept = x == best
            chosen = torch.where(testing & accept, child, chosen)
            child = torch.where(testing & ~accept, next_sibling[rows, child.clamp(min=0)], child)
        emitted = exponential_race(rejection.r, exponentials.to(acc)) if do_sample else best
        moving, ending = walking & (chosen >= 0), walking & (chosen < 0)
        path[moving, depth[moving]] = chosen[moving]
        next_tokens[moving, depth[moving]] = tokens[moving, chosen[moving]]
        next_tokens[ending, depth[ending]] = emitted[ending]
        node = torch.where(moving, chosen, node)
        depth = depth + moving.long()
        walking = moving
    return depth, path, next_tokens
