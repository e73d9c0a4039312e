"""Learned chunking: modules that let a model decide its own units instead of a fixed tokenizer.

Four mechanisms, each an ``nn.Module`` to put inside a byte- or token-level model:

* :class:`MrT5DeleteGate` and :class:`DeleteGateEncoder` — *MrT5: Dynamic Token Merging for
  Efficient Byte-level Language Models*. After encoder layer ``l`` a gate scores every position,
  ``G = k · σ(LayerNorm(H_l) w + b) ∈ (k, 0)`` with ``k < 0`` (default −30). In training the deletion
  is *soft*: ``G_j`` is added to the attention logits of every later layer for key ``j`` (a token with
  ``G_j ≈ k`` is invisible). In inference it is *hard*: positions with ``G_j < k/2`` are removed and the
  later layers run on the shorter sequence. The regulariser ``L_G = (1/N) Σ_j G_j`` (added as
  ``α · L_G``) pushes gates towards deletion; ``α`` sets the deletion rate. (MrT5 also replaces the
  attention softmax by ``softmax₁``; the encoder here keeps PyTorch's softmax attention.)
* :class:`DynamicChunking` — the dynamic chunking of *Dynamic Chunking for End-to-End Hierarchical
  Sequence Modeling* (H-Net). Routing: ``q_t = W_q x_t``, ``k_t = W_k x_t``,
  ``p_t = ½ (1 − cos(q_t, k_{t−1}))`` with ``p_1 = 1``, boundaries ``b_t = 1[p_t ≥ ½]`` (``W_q = W_k = I``
  at initialisation, as the authors' code). Downsampling keeps the vectors at boundaries. Upsampling
  smooths the chunk outputs with the EMA ``z̄_j = P_j ẑ_j + (1 − P_j) z̄_{j−1}`` (``P_j`` the boundary
  probability of chunk ``j``, clamped to ``[10⁻⁴, 1 − 10⁻⁴]``), repeats ``z̄`` over each chunk's
  positions and multiplies by the confidence ``c_t = p_t^{b_t} (1 − p_t)^{1−b_t}`` through a
  straight-through estimator (forward 1, gradient that of ``c_t``). The ratio loss
  ``L_ratio = N/(N−1) · ((N−1) F G + (1 − F)(1 − G))``, ``F`` the fraction of boundaries and ``G`` the
  mean ``p_t``, steers the compression towards ``1/N``.
* :class:`WordPooling` — *Learn Your Tokens: Word-Pooled Tokenization for Language Modeling*: pool
  byte (or character) vectors within each word into one word vector (mean, first or last position)
  and unpool word vectors back to the bytes; with ``shift=True`` every byte receives the vector of the
  *previous* word, which keeps a word-level model causal. :func:`word_ids_from_text` numbers the words
  of a text byte by byte (whitespace-bounded words, each with its leading space).
* :class:`LexinvariantEmbedding` — *Lexinvariant Language Models*: no fixed embeddings; every sequence
  draws its own Gaussian matrix ``E ∈ R^{V×d}`` (entries ``N(0, std²)``), so a token is the same vector
  within a sequence and an unrelated one across sequences. Rows are assigned by order of first
  appearance in the sequence (then the absent ids in increasing order); the rows are i.i.d., so this
  is the paper's distribution, and it makes the model exactly invariant to permuting the vocabulary
  for a given seed. :meth:`LexinvariantEmbedding.logits` scores hidden states against the same
  matrix (tied output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenlab._checks import check_choice, check_int, check_number, check_tensor
from tokenlab.tokenization.pretokenize import SPLITS


def _valid(mask: Tensor | None, like: Tensor) -> Tensor:
    """``mask`` as bool ``[B, T]`` (all ``True`` when ``None``)."""
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    check_tensor("attention_mask", mask, ndim=2)
    if tuple(mask.shape) != tuple(like.shape[:2]):
        raise ValueError(f"`attention_mask` must be {tuple(like.shape[:2])}, got {tuple(mask.shape)}")
    return mask.bool()


def _compact(hidden: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the positions where ``keep [B, T]`` is true, in order: ``(hidden [B, M, D], mask [B, M],
    positions [B, M])`` with ``M`` the largest count (padding rows point at position 0)."""
    counts = keep.sum(1)
    width = int(counts.max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    mask = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    positions = torch.where(mask, order, 0)
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1])), mask, positions


# ------------------------------------------------------------------------------------------ MrT5
class MrT5DeleteGate(nn.Module):
    """MrT5's delete gate ``G = k · σ(LayerNorm(H) w + b)``, shape ``[B, T]``, values in ``(k, 0)``.

    Args:
        hidden_size: ``D``.
        k: the gate's floor (< 0; MrT5 uses −30).
        threshold: hard deletion removes positions with ``G < threshold`` (default ``k/2``).
        layer_norm: normalise ``H`` first (as MrT5).
    """

    def __init__(
        self, hidden_size: int, k: float = -30.0, threshold: float | None = None, layer_norm: bool = True
    ):
        super().__init__()
        check_int("hidden_size", hidden_size, low=1)
        self.k = check_number("k", k, high=0.0, high_open=True)
        self.threshold = k / 2 if threshold is None else check_number("threshold", threshold, low=k, high=0.0)
        self.norm = nn.LayerNorm(hidden_size) if layer_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.constant_(self.proj.bias, -1.0)  # G = k σ(−1) ≈ 0.27 k where LN(H) w = 0: kept

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Gate values ``[B, T]`` for ``hidden [B, T, D]``; padding positions get ``k``."""
        check_tensor("hidden", hidden, ndim=3, floating=True)
        gate = self.k * torch.sigmoid(self.proj(self.norm(hidden)).squeeze(-1))
        return gate.masked_fill(~_valid(attention_mask, hidden), self.k)

    @staticmethod
    def attention_bias(gate: Tensor) -> Tensor:
        """Soft deletion: the additive attention bias ``[B, 1, 1, T]`` (``G_j`` on key ``j``)."""
        return gate[:, None, None, :]

    def keep_mask(self, gate: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Positions that hard deletion keeps: ``G ≥ threshold`` (and not padding), ``[B, T]``."""
        return (gate >= self.threshold) & _valid(attention_mask, gate[..., None])

    def hard_delete(
        self, hidden: Tensor, gate: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Remove deleted positions: ``(hidden [B, T', D], mask [B, T'], positions [B, T'])``, where
        ``positions`` are the kept positions' original indices."""
        return _compact(hidden, self.keep_mask(gate, attention_mask))

    @staticmethod
    def regularizer(gate: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``L_G = (1/N) Σ_j G_j`` over the ``N`` non-padding positions (minimising it deletes)."""
        valid = _valid(attention_mask, gate[..., None])
        return gate[valid].mean()

    def deletion_rate(self, gate: Tensor, attention_mask: Tensor | None = None) -> float:
        """Fraction of non-padding positions with ``G < threshold``."""
        valid = _valid(attention_mask, gate[..., None])
        return float((gate[valid] < self.threshold).float().mean())


@dataclass
class DeleteGateOutput:
    """``hidden [B, T*, D]`` and ``attention_mask [B, T*]`` after the encoder (``T* = T`` with soft
    deletion, ``T'`` after hard deletion), ``gate [B, T]`` and ``positions [B, T*]`` (original index of
    each output position)."""

    hidden: Tensor
    attention_mask: Tensor
    gate: Tensor
    positions: Tensor


class DeleteGateEncoder(nn.Module):
    """A stack of ``nn.TransformerEncoderLayer`` (``batch_first=True``) with MrT5's delete gate after
    the first ``gate_layer`` layers: soft deletion in training, hard deletion in eval (or as asked).

    Args:
        layers: the encoder layers (all with the same number of heads).
        gate_layer: how many layers run before the gate (``0 < gate_layer ≤ len(layers)``).
        gate: the :class:`MrT5DeleteGate`.
        causal: add a causal mask (a decoder-only use; hard deletion then removes positions too).
    """

    def __init__(self, layers: nn.ModuleList, gate_layer: int, gate: MrT5DeleteGate, causal: bool = False):
        super().__init__()
        if not isinstance(layers, nn.ModuleList) or not all(
            isinstance(layer, nn.TransformerEncoderLayer) for layer in layers
        ):
            raise TypeError("`layers` must be an nn.ModuleList of nn.TransformerEncoderLayer")
        check_int("gate_layer", gate_layer, low=1, high=len(layers))
        self.layers, self.gate_layer, self.gate, self.causal = layers, gate_layer, gate, causal

    def forward(
        self, hidden: Tensor, attention_mask: Tensor | None = None, hard: bool | None = None
    ) -> DeleteGateOutput:
        """Run the stack on ``hidden [B, T, D]``; ``hard`` defaults to ``not self.training``."""
        check_tensor("hidden", hidden, ndim=3, floating=True)
        mask = _valid(attention_mask, hidden)
        hard = not self.training if hard is None else hard
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        gate, bias = None, None
        for index, layer in enumerate(self.layers):
            if index == self.gate_layer:
                gate = self.gate(hidden, mask)
                if hard:
                    hidden, mask, positions = self.gate.hard_delete(hidden, gate, mask)
                else:
                    bias = gate
            hidden = layer(hidden, src_mask=self._attention_mask(mask, bias, layer.self_attn.num_heads))
        if gate is None:  # the gate sits after the last layer
            gate = self.gate(hidden, mask)
            if hard:
                hidden, mask, positions = self.gate.hard_delete(hidden, gate, mask)
        return DeleteGateOutput(hidden, mask, gate, positions)

    def _attention_mask(self, mask: Tensor, bias: Tensor | None, heads: int) -> Tensor:
        """Float mask ``[B·heads, T, T]``: padding keys (and the future, when causal) get a large
        negative value, and the gate's soft-deletion bias is added on every key."""
        batch, length = mask.shape
        floor = torch.finfo(self.gate.proj.weight.dtype).min / 2
        out = torch.zeros(batch, length, length, dtype=self.gate.proj.weight.dtype, device=mask.device)
        out = out.masked_fill(~mask[:, None, :], floor)
        if self.causal:
            future = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
            out = out.masked_fill(future, floor)
        if bias is not None:
            out = out + bias[:, None, :].to(out.dtype)
        return out.repeat_interleave(heads, dim=0)


# ----------------------------------------------------------------------------------------- H-Net
class _StraightThrough(torch.autograd.Function):
    """Forward: ones; backward: the incoming gradient unchanged (H-Net's STE on the confidence)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.ones_like(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


@dataclass
class ChunkingOutput:
    """``chunks [B, M, D]`` (the vectors at boundaries), ``chunk_mask [B, M]``, ``boundary_prob``
    ``p [B, T]``, ``boundary_mask`` ``b [B, T]`` and ``attention_mask [B, T]``."""

    chunks: Tensor
    chunk_mask: Tensor
    boundary_prob: Tensor
    boundary_mask: Tensor
    attention_mask: Tensor


class DynamicChunking(nn.Module):
    """H-Net's routing module, downsampler and smoothing upsampler (see the module docstring)."""

    def __init__(self, d_model: int):
        super().__init__()
        check_int("d_model", d_model, low=1)
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        with torch.no_grad():
            self.q.weight.copy_(torch.eye(d_model))
            self.k.weight.copy_(torch.eye(d_model))

    def boundary_probability(self, x: Tensor) -> Tensor:
        """``p_t = ½ (1 − cos(W_q x_t, W_k x_{t−1}))``, ``p_1 = 1``: ``[B, T]`` for ``x [B, T, D]``."""
        cos = F.cosine_similarity(self.q(x[:, 1:]), self.k(x[:, :-1]), dim=-1)
        return F.pad(((1 - cos) / 2).clamp(0.0, 1.0), (1, 0), value=1.0)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> ChunkingOutput:
        """Route and downsample ``x [B, T, D]`` (right-padded)."""
        check_tensor("x", x, ndim=3, floating=True)
        mask = _valid(attention_mask, x)
        p = self.boundary_probability(x)
        b = (p >= 0.5) & mask
        chunks, chunk_mask, _ = _compact(x, b)
        return ChunkingOutput(chunks, chunk_mask, p, b, mask)

    @staticmethod
    def smooth(z: Tensor, probability: Tensor) -> Tensor:
        """The EMA ``z̄_j = P_j z_j + (1 − P_j) z̄_{j−1}`` over chunks, ``z [B, M, D]``, ``P [B, M]``,
        as one matrix product: ``z̄_j = Σ_{i ≤ j} P_i Π_{i < l ≤ j} (1 − P_l) z_i``."""
        log_keep = torch.log1p(-probability).cumsum(1)  # Σ_{l ≤ j} log(1 − P_l)
        exponent = log_keep[:, :, None] - log_keep[:, None, :]  # [B, j, i]: Σ_{i < l ≤ j} log(1 − P_l)
        lower = torch.ones(z.shape[1], z.shape[1], dtype=torch.bool, device=z.device).tril()
        weights = torch.where(lower, exponent, float("-inf")).exp() * probability[:, None, :]
        return weights.to(z.dtype) @ z

    def upsample(self, z: Tensor, routed: ChunkingOutput) -> Tensor:
        """Chunk outputs ``z [B, M, D]`` back to ``[B, T, D]``: smooth, repeat each chunk over its
        positions, multiply by ``STE(c_t)``."""
        check_tensor("z", z, ndim=3, floating=True)
        if z.shape[:2] != routed.chunks.shape[:2]:
            raise ValueError(
                f"`z` must be [B, M, ·] = {tuple(routed.chunks.shape[:2])}, got {tuple(z.shape)}"
            )
        b, p = routed.boundary_mask, routed.boundary_prob
        _, _, positions = _compact(p[..., None], b)
        chunk_p = p.gather(1, positions).clamp(1e-4, 1 - 1e-4)
        smoothed = self.smooth(z, chunk_p)
        owner = (b.long().cumsum(1) - 1).clamp(min=0)  # chunk of each position
        out = smoothed.gather(1, owner[..., None].expand(-1, -1, z.shape[-1]))
        confidence = torch.where(b, p, 1 - p)
        return out * _StraightThrough.apply(confidence)[..., None].to(out.dtype)

    @staticmethod
    def ratio_loss(routed: ChunkingOutput, target_ratio: float) -> Tensor:
        """``N/(N−1) · ((N−1) F G + (1 − F)(1 − G))`` for the compression target ``N > 1``."""
        n = check_number("target_ratio", target_ratio, low=1.0, low_open=True)
        valid = routed.attention_mask
        g = routed.boundary_prob[valid].mean()
        f = routed.boundary_mask[valid].to(g.dtype).mean()
        return n / (n - 1) * ((n - 1) * f * g + (1 - f) * (1 - g))


# ------------------------------------------------------------------------------ Learn Your Tokens
def word_ids_from_text(text: str) -> list[int]:
    """The word index of every UTF-8 byte of ``text``: words are whitespace-bounded, each with its
    leading space (the ``"whitespace"`` pre-tokeniser's pieces), so ``"a bc"`` → ``[0, 1, 1, 1]``."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}")
    return [k for k, piece in enumerate(SPLITS["whitespace"].split(text)) for _ in piece.encode("utf-8")]


class WordPooling(nn.Module):
    """Pool byte vectors ``[B, T, D]`` into word vectors ``[B, W, D]`` and back (*Learn Your Tokens*).

    ``word_ids [B, T]`` numbers the words of each sequence ``0, 1, …`` in order (``−1`` for padding);
    ``mode`` is ``"mean"`` (average of the word's positions), ``"first"`` (its first position, where the
    paper puts a prefix token) or ``"last"``.
    """

    def __init__(self, mode: str = "mean"):
        super().__init__()
        self.mode = check_choice("mode", mode, ("mean", "first", "last"))

    def forward(self, hidden: Tensor, word_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(words [B, W, D], word_mask [B, W])`` with ``W`` the largest number of words."""
        check_tensor("hidden", hidden, ndim=3, floating=True)
        ids = self._check_ids(word_ids, hidden)
        if ids.shape[1] != hidden.shape[1]:
            raise ValueError(f"`word_ids` must be [B, T] = {tuple(hidden.shape[:2])}, got {tuple(ids.shape)}")
        batch, _, dim = hidden.shape
        width = int(ids.max()) + 1 if ids.numel() and int(ids.max()) >= 0 else 0
        valid = ids >= 0
        slot = torch.where(valid, ids, width)  # padding goes to a spare slot, dropped below
        counts = torch.zeros(batch, width + 1, dtype=hidden.dtype, device=hidden.device)
        counts.scatter_add_(1, slot, valid.to(hidden.dtype))
        if self.mode == "mean":
            sums = hidden.new_zeros(batch, width + 1, dim).scatter_add_(
                1, slot[..., None].expand(-1, -1, dim), hidden
            )
            words = sums / counts.clamp(min=1)[..., None]
        else:
            position = torch.arange(hidden.shape[1], device=hidden.device).expand(batch, -1)
            pick = torch.full(
                (batch, width + 1), -1 if self.mode == "last" else hidden.shape[1], device=hidden.device
            )
            if self.mode == "first":
                pick = pick.scatter_reduce(1, slot, position, reduce="amin")
            else:
                pick = pick.scatter_reduce(1, slot, position, reduce="amax")
            pick = pick.clamp(0, hidden.shape[1] - 1)
            words = hidden.gather(1, pick[..., None].expand(-1, -1, dim))
        word_mask = counts[:, :width] > 0
        return words[:, :width] * word_mask[..., None], word_mask

    def unpool(self, words: Tensor, word_ids: Tensor, shift: bool = False) -> Tensor:
        """Word vectors ``[B, W, D]`` to positions ``[B, T, D]``: each position gets its word's vector,
        or with ``shift`` the previous word's (zeros for the first word and for padding)."""
        check_tensor("words", words, ndim=3, floating=True)
        ids = self._check_ids(word_ids, words)
        if ids.numel() and int(ids.max()) >= words.shape[1]:
            raise ValueError(f"`word_ids` name word {int(ids.max())} but `words` holds {words.shape[1]}")
        source = ids - 1 if shift else ids
        valid = (source >= 0) & (ids >= 0)
        out = words.gather(
            1, source.clamp(0, max(words.shape[1] - 1, 0))[..., None].expand(-1, -1, words.shape[-1])
        )
        return out * valid[..., None]

    @staticmethod
    def _check_ids(word_ids: Tensor, like: Tensor) -> Tensor:
        check_tensor("word_ids", word_ids, ndim=2, integer=True)
        if word_ids.shape[0] != like.shape[0]:
            raise ValueError(f"`word_ids` batch {word_ids.shape[0]} must equal {like.shape[0]}")
        return word_ids.to(like.device).long()


# ---------------------------------------------------------------------------------- Lexinvariant
class LexinvariantEmbedding(nn.Module):
    """Per-sequence random Gaussian embeddings (*Lexinvariant Language Models*); no parameters.

    Args:
        vocab_size: ``V``.
        dim: ``d``.
        std: standard deviation of the entries.
    """

    def __init__(self, vocab_size: int, dim: int, std: float = 1.0):
        super().__init__()
        self.vocab_size = check_int("vocab_size", vocab_size, low=1)
        self.dim = check_int("dim", dim, low=1)
        self.std = check_number("std", std, low=0.0, low_open=True)

    def symbols(self, input_ids: Tensor) -> Tensor:
        """Row of each token in its sequence's matrix: the rank of the token's first appearance, then
        the absent ids in increasing order. ``[B, V]`` (``rows[b, v]`` for token ``v``)."""
        rows = []
        for seq in input_ids.tolist():
            order = list(dict.fromkeys(seq))
            present = set(order)
            order += [v for v in range(self.vocab_size) if v not in present]
            rank = torch.empty(self.vocab_size, dtype=torch.long)
            rank[torch.tensor(order)] = torch.arange(self.vocab_size)
            rows.append(rank)
        return torch.stack(rows).to(input_ids.device)

    def matrices(self, input_ids: Tensor, seeds: Tensor | list[int]) -> Tensor:
        """The per-sequence matrices ``E_b [B, V, d]``, rows assigned by :meth:`symbols`."""
        ids = self._check(input_ids)
        seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, Tensor) else seeds)]
        if len(seeds) != ids.shape[0]:
            raise ValueError(f"`seeds` must hold one seed per sequence ({ids.shape[0]}), got {len(seeds)}")
        draws = (
            torch.stack(
                [
                    torch.randn(self.vocab_size, self.dim, generator=torch.Generator().manual_seed(s))
                    for s in seeds
                ]
            ).to(ids.device)
            * self.std
        )
        rows = self.symbols(ids)
        return draws.gather(1, rows[..., None].expand(-1, -1, self.dim))

    def forward(self, input_ids: Tensor, seeds: Tensor | list[int]) -> Tensor:
        """Embeddings ``[B, T, d]`` of ``input_ids [B, T]`` under the matrices of ``seeds`` (one per
        sequence: the same seed and sequence give the same vectors)."""
        table = self.matrices(input_ids, seeds)
        return table.gather(1, input_ids[..., None].expand(-1, -1, self.dim))

    def logits(self, hidden: Tensor, input_ids: Tensor, seeds: Tensor | list[int]) -> Tensor:
        """Tied output ``hidden [B, T, d] @ E_bᵀ``: ``[B, T, V]``."""
        check_tensor("hidden", hidden, ndim=3, floating=True)
        return hidden @ self.matrices(input_ids, seeds).transpose(1, 2).to(hidden.dtype)

    def _check(self, input_ids: Tensor) -> Tensor:
        check_tensor("input_ids", input_ids, ndim=2, integer=True)
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(f"`input_ids` must lie in [0, {self.vocab_size})")
        return input_ids
