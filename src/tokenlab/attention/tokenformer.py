"""TokenFormer: token–parameter attention (Pattention) in place of linear projections, and growth by
appending parameter tokens.

*TokenFormer: Rethinking Transformer Scaling with Tokenized Model Parameters* (Wang et al.). A
Pattention layer holds ``n`` key parameter tokens ``K_P [n, d_in]`` and value parameter tokens
``V_P [n, d_out]``; input tokens ``X [T, d_in]`` are its queries:

    A = X K_Pᵀ,     S_ij = GeLU(τ · A_ij / ‖A_i‖₂),     Pattention(X) = S V_P,

the paper's modified softmax (L2 normalisation over the parameter tokens, scaled by ``τ = √n``, then
GeLU — the ``l2_norm_gelu`` of the authors' code) in place of ``exp`` and L1 normalisation.

**Growth.** :meth:`Pattention.grow` appends ``m`` key/value pairs with zero keys and keeps ``τ``: the
new columns of ``A`` are 0, leave every ``‖A_i‖`` unchanged and give ``GeLU(0) = 0``, so the layer
computes exactly the same function; training then continues from there (progressive scaling,
Section 3.4 of the paper). Keeping ``τ`` is tokenlab's choice: the authors' ``l2_norm_gelu``
recomputes it from the current token count (``* math.sqrt(inputs.shape[dim])``), so after their
growth ``τ`` is ``√(n + m)`` and the grown layer is the old one only up to that rescaling of its
scores (set ``layer.scale.fill_(math.sqrt(layer.num_tokens))`` after :meth:`~Pattention.grow` to
follow their code instead). Values default to zero as well; with zero keys *and* values the new pairs
get no gradient at the first step (their keys' gradient is ``∝ V_new``), so ``value_std > 0`` draws the
new values from ``N(0, value_std²)`` — still function-preserving, and the new keys learn at once.

:class:`TokenFormerBlock` / :class:`TokenFormerLM` are a small TokenFormer language model: pre-norm
blocks (non-parametric layer norm) with Pattention for the query, key, value and output projections,
causal multi-head self-attention with RoPE through :func:`tokenlab.attention.flash_attention`, and a
single Pattention as the feed-forward layer, as in the paper's architecture.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenlab._checks import check_int, check_number, check_positive, check_tensor
from tokenlab.attention.flash import flash_attention
from tokenlab.attention.rope import apply_rope, rope_cos_sin

__all__ = ["Pattention", "TokenFormerBlock", "TokenFormerLM", "pattention_scores"]


def pattention_scores(logits: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """The modified softmax ``GeLU(τ · A / ‖A‖₂)`` over the last dimension (``A = 0`` rows give 0)."""
    return F.gelu(F.normalize(logits, dim=-1) * scale)


class Pattention(nn.Module):
    """Token–parameter attention, ``[..., d_in] → [..., d_out]``, a drop-in for ``nn.Linear``.

    Args:
        in_features: ``d_in``, the size of the input tokens and the key parameter tokens.
        out_features: ``d_out``, the size of the value parameter tokens and the output.
        num_tokens: ``n``, the number of key/value parameter pairs.
        scale: ``τ``; default ``√n`` at construction (kept by :meth:`grow`).
        init_std: standard deviation of the normal initialisation of both token sets.

    Attributes:
        key_tokens: ``K_P [n, d_in]`` (``nn.Parameter``).
        value_tokens: ``V_P [n, d_out]`` (``nn.Parameter``).
        scale: ``τ`` (a buffer).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_tokens: int,
        *,
        scale: float | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        in_features = check_int("in_features", in_features, low=1)
        out_features = check_int("out_features", out_features, low=1)
        num_tokens = check_int("num_tokens", num_tokens, low=1)
        scale = math.sqrt(num_tokens) if scale is None else check_positive("scale", scale)
        init_std = check_positive("init_std", init_std)
        self.key_tokens = nn.Parameter(torch.randn(num_tokens, in_features) * init_std)
        self.value_tokens = nn.Parameter(torch.randn(num_tokens, out_features) * init_std)
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))  # exact √n

    @property
    def num_tokens(self) -> int:
        return self.key_tokens.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d_in]`` → ``[..., d_out]``: ``GeLU(τ · x K_Pᵀ / ‖x K_Pᵀ‖₂) V_P``."""
        return pattention_scores(x @ self.key_tokens.T, self.scale.to(x.dtype)) @ self.value_tokens

    @torch.no_grad()
    def grow(self, num_new: int, *, value_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Append ``num_new`` parameter pairs with zero keys (values zero, or ``N(0, value_std²)``),
        keeping ``τ``: the layer's function is unchanged exactly. The parameters are replaced, so
        build the optimizer after growing."""
        num_new = check_int("num_new", num_new, low=1)
        value_std = check_number("value_std", value_std, low=0.0)
        keys = self.key_tokens.new_zeros(num_new, self.key_tokens.shape[1])
        values = self.value_tokens.new_zeros(num_new, self.value_tokens.shape[1])
        if value_std:
            values.normal_(0.0, value_std, generator=generator)
        self.key_tokens = nn.Parameter(torch.cat([self.key_tokens, keys]))
        self.value_tokens = nn.Parameter(torch.cat([self.value_tokens, values]))

    def extra_repr(self) -> str:
        d_in, d_out, n = self.key_tokens.shape[1], self.value_tokens.shape[1], self.num_tokens
        return f"in_features={d_in}, out_features={d_out}, num_tokens={n}, scale={self.scale.item():.4g}"


class TokenFormerBlock(nn.Module):
    """One pre-norm TokenFormer layer ``[B, T, d] → [B, T, d]``:

        h = x + P_out(Attention(P_q(n(x)), P_k(n(x)), P_v(n(x))))     (causal, RoPE, multi-head)
        y = h + P_ffn(n(h))

    with ``n`` a non-parametric layer norm and every ``P`` a :class:`Pattention`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        qkv_tokens: int,
        ffn_tokens: int,
        *,
        rope_base: float = 10000.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        hidden_size = check_int("hidden_size", hidden_size, low=1)
        num_heads = check_int("num_heads", num_heads, low=1)
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(
                f"`hidden_size` ({hidden_size}) must split into `num_heads` ({num_heads}) even heads"
            )
        self.num_heads, self.rope_base = num_heads, rope_base
        self.query, self.key, self.value, self.out = (
            Pattention(hidden_size, hidden_size, qkv_tokens, init_std=init_std) for _ in range(4)
        )
        self.ffn = Pattention(hidden_size, hidden_size, ffn_tokens, init_std=init_std)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        return x.view(B, T, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = F.layer_norm(x, (d,))
        cos, sin = rope_cos_sin(
            torch.arange(T, device=x.device), d // self.num_heads, self.rope_base, dtype=x.dtype
        )
        q = apply_rope(self._heads(self.query(h)), cos=cos, sin=sin)
        k = apply_rope(self._heads(self.key(h)), cos=cos, sin=sin)
        attended = flash_attention(q, k, self._heads(self.value(h)), causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(B, T, d))
        return x + self.ffn(F.layer_norm(x, (d,)))

    def grow(self, qkv_new: int = 0, ffn_new: int = 0, *, value_std: float = 0.0) -> None:
        """Append parameter tokens to the attention projections (``qkv_new`` each) and the feed-forward
        Pattention (``ffn_new``); the block's function is unchanged (see :meth:`Pattention.grow`)."""
        for layers, new in (((self.query, self.key, self.value, self.out), qkv_new), ((self.ffn,), ffn_new)):
            if new:
                for layer in layers:
                    layer.grow(new, value_std=value_std)


class TokenFormerLM(nn.Module):
    """A small TokenFormer causal language model: embeddings, ``num_layers`` :class:`TokenFormerBlock`,
    a final layer norm and a head tied to the embeddings.

    ``forward(input_ids [B, T], labels=None)`` returns ``(logits [B, T, V], loss)``; the loss is the
    mean next-token cross-entropy of ``labels`` shifted by one (as Hugging Face causal LMs), or
    ``None``. :meth:`grow` appends parameter tokens to every block.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        qkv_tokens: int = 64,
        ffn_tokens: int = 256,
        *,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        vocab_size = check_int("vocab_size", vocab_size, low=1)
        num_layers = check_int("num_layers", num_layers, low=1)
        self.embed = nn.Embedding(vocab_size, hidden_size)
        nn.init.normal_(self.embed.weight, std=init_std)
        self.blocks = nn.ModuleList(
            TokenFormerBlock(hidden_size, num_heads, qkv_tokens, ffn_tokens, init_std=init_std)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_tensor("input_ids", input_ids, ndim=2, integer=True)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        logits = self.norm(x) @ self.embed.weight.T
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return logits, loss

    def grow(self, qkv_new: int = 0, ffn_new: int = 0, *, value_std: float = 0.0) -> None:
        """Append parameter tokens to every block (:meth:`TokenFormerBlock.grow`); the model's function
        is unchanged exactly."""
        for block in self.blocks:
            block.grow(qkv_new, ffn_new, value_std=value_std)
