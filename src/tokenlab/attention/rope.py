"""Rotary position embeddings: RoPE and its context-aware generalisation CARoPE.

**RoPE** (*RoFormer: Enhanced Transformer with Rotary Position Embedding*). Channel pair ``i`` of a
head of size ``D`` rotates at the fixed frequency ``θ_i = base^(−2i/D)`` (``i = 0 … D/2 − 1``); a token
at position ``m`` is rotated by the phase ``φ_i(m) = m·θ_i``. The pairs follow Hugging Face's
half-split layout (channel ``i`` pairs with channel ``i + D/2``)::

    rope(x, m) = x · cos φ(m) + rotate_half(x) · sin φ(m),    rotate_half([x₁, x₂]) = [−x₂, x₁]

so that ``⟨rope(q, m), rope(k, n)⟩`` depends on the positions only through ``m − n``.

**CARoPE** (*Context-aware Rotary Position Embedding*, Veisi et al. 2025). The paper writes RoPE's
frequencies as powers of one base frequency, ``θ_i = θ_1^i`` with ``θ_1 = base^(−2/D)``, and makes that
base frequency a bounded, head-specific function of the token embedding ``x_t``
(``W ∈ R^{d_model × H}``)::

    f(x_t) = 1 / (softplus(x_t W + b) + 1)          ∈ (0, 1)^H
    φ_i^{(h)}(m) = Σ_{t=1}^{m} f(x_t)_h^i           (phases accumulate over the positions 1 … m)

and rotates query and key of head ``h`` at position ``m`` by ``φ^{(h)}(m)`` exactly as RoPE does.

*Which exponents.* With ``θ_1`` the base frequency and ``θ_i = θ_1^i``, the paper's channel pairs carry
the exponents ``i = 1 … D/2`` (``first_exponent=1``, the default here): every pair rotates at a power
``f^i < 1`` of the token's frequency, so every pair depends on the context. RoFormer and Hugging Face
index RoPE from ``i = 0`` (``θ = base^(−2i/D)``, ``i = 0 … D/2 − 1``): pair 0 turns at frequency 1 for
every token. ``first_exponent=0`` uses that ladder; there pair 0's phase is the token count, the same
for every context. Either way ``f ≡ θ_1`` (``W = 0``) reduces CARoPE to RoPE: with
``first_exponent=0`` it is RoPE at the 1-based positions ``1 … T`` exactly; with the paper's
``first_exponent=1`` the phases are ``m·θ_1^i = (θ_1·m)·θ_1^{i−1}``, i.e. RoPE evaluated at the scaled
positions ``θ_1·m`` — the same rotations up to one constant rescaling of position. The bias ``b``
(zero weight, ``b = softplus⁻¹(1/θ_1 − 1)``) is how :class:`ContextAwareRotaryEmbedding` starts from
RoPE, the initialisation the paper uses.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from tokenlab._checks import check_choice, check_int, check_number, check_tensor

__all__ = [
    "ContextAwareRotaryEmbedding",
    "RotaryEmbedding",
    "apply_rope",
    "carope_cos_sin",
    "carope_frequencies",
    "carope_phases",
    "rope_cos_sin",
    "rotary_frequencies",
    "rotate_half",
]


def _check_head_dim(head_dim: int) -> int:
    if check_int("head_dim", head_dim, low=2) % 2:
        raise ValueError(f"`head_dim` must be a positive even int, got {head_dim!r}")
    return head_dim


def _check_base(base: float) -> float:
    return check_number("base", base, low=1.0, low_open=True)


def rotary_frequencies(
    head_dim: int,
    base: float = 10000.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """RoPE's inverse frequencies ``θ_i = base^(−2i/D)``, ``i = 0 … D/2 − 1``; shape ``[D/2]``.

    Computed in float64 and rounded once to ``dtype``.
    """
    head_dim, base = _check_head_dim(head_dim), _check_base(base)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return (base**-exponents).to(dtype)


def _cos_sin_from_phases(phases: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-split ``cos``/``sin`` tables ``[..., D]`` from phases ``[..., D/2]`` (halves share a phase)."""
    emb = torch.cat((phases, phases), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float = 10000.0, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ``cos`` and ``sin`` tables for integer (or real) ``positions [..., T]``.

    Returns two tensors of shape ``[..., T, D]``; the phases ``m·θ_i`` are computed in float32 (float64
    when ``dtype`` is float64) and cast to ``dtype``.
    """
    check_tensor("positions", positions)
    if positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"`positions` must hold integer or real positions, got dtype {positions.dtype}")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = rotary_frequencies(head_dim, base, device=positions.device, dtype=compute)
    return _cos_sin_from_phases(positions.to(compute)[..., None] * inv_freq, dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x₁, x₂] ↦ [−x₂, x₁]`` on the last dimension (the half-split pairing of Hugging Face models)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    x: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    base: float = 10000.0,
) -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` (any ``[..., T, D]``) by RoPE: ``x·cos + rotate_half(x)·sin``.

    Give either ``positions`` (``[T]`` or ``[B, T]``, broadcast over heads; tables built with ``base``)
    or precomputed ``cos``/``sin`` tables that broadcast against ``x`` (e.g. ``[T, D]``,
    ``[B, 1, T, D]``, or CARoPE's per-head ``[B, H, T, D]``).
    """
    check_tensor("x", x)
    if not x.is_floating_point():
        raise TypeError(f"`x` must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"`x` must have shape [..., T, D], got {tuple(x.shape)}")
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"the last dimension of `x` (head_dim) must be even, got {head_dim}")
    if positions is not None:
        if cos is not None or sin is not None:
            raise ValueError("give either `positions` or `cos`/`sin`, not both")
        check_tensor("positions", positions)
        if positions.ndim not in (1, 2) or positions.shape[-1] != x.shape[-2]:
            raise ValueError(
                f"`positions` must have shape [T] or [B, T] with T = {x.shape[-2]}, "
                f"got {tuple(positions.shape)}"
            )
        cos, sin = rope_cos_sin(positions, head_dim, base, dtype=x.dtype)
        if positions.ndim == 2 and x.ndim == 4:  # [B, T, D] -> [B, 1, T, D], broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
    elif cos is None or sin is None:
        raise ValueError("give `positions` or both `cos` and `sin`")
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(name, table)
        if table.shape[-1] != head_dim:
            raise ValueError(f"`{name}` must end in head_dim = {head_dim}, got shape {tuple(table.shape)}")
        try:
            fits = torch.broadcast_shapes(table.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"`{name}` of shape {tuple(table.shape)} does not broadcast to `x` {tuple(x.shape)}"
            )
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """RoPE as a module: ``forward(q, k, positions) -> (q_rot, k_rot)`` with ``q, k [B, H, T, D]``.

    *RoFormer: Enhanced Transformer with Rotary Position Embedding*; fixed frequencies
    ``θ_i = base^(−2i/D)``, half-split layout (as Hugging Face Llama/Qwen2).
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.base = _check_head_dim(head_dim), _check_base(base)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for name, t in (("q", q), ("k", k)):
            if check_tensor(name, t).shape[-1] != self.head_dim:
                raise ValueError(f"`{name}` must end in head_dim = {self.head_dim}, got {tuple(t.shape)}")
        return (
            apply_rope(q, positions=positions, base=self.base),
            apply_rope(k, positions=positions, base=self.base),
        )

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"


def carope_frequencies(
    hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """CARoPE's head-specific base frequencies ``f(x) = 1 / (softplus(x W + b) + 1)``.

    Args:
        hidden_states: token embeddings ``x [B, T, d_model]``.
        weight: ``W [H, d_model]`` (``nn.Linear`` layout: one row per head).
        bias: optional ``b [H]``.

    Returns:
        ``f [B, T, H]``, each entry in ``(0, 1)``.
    """
    check_tensor("hidden_states", hidden_states)
    check_tensor("weight", weight)
    if hidden_states.ndim != 3:
        raise ValueError(f"`hidden_states` must have shape [B, T, d_model], got {tuple(hidden_states.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden_states.shape[-1]:
        raise ValueError(
            f"`weight` must have shape [H, d_model={hidden_states.shape[-1]}], got {tuple(weight.shape)}"
        )
    if bias is not None and check_tensor("bias", bias).shape != weight.shape[:1]:
        raise ValueError(f"`bias` must have shape [H={weight.shape[0]}], got {tuple(bias.shape)}")
    return 1.0 / (F.softplus(F.linear(hidden_states, weight, bias)) + 1.0)


def carope_phases(
    frequencies: torch.Tensor,
    head_dim: int,
    *,
    initial_phase: torch.Tensor | None = None,
    first_exponent: int = 1,
) -> torch.Tensor:
    """Accumulated CARoPE phases ``φ_i^{(h)}(m) = φ_0 + Σ_{t≤m} f_{t,h}^i`` for the ``D/2`` exponents
    ``i = first_exponent … first_exponent + D/2 − 1``.

    Args:
        frequencies: ``f [B, T, H]`` in ``(0, 1)`` (from :func:`carope_frequencies`).
        head_dim: ``D`` (even).
        initial_phase: optional ``[B, H, D/2]`` phase already accumulated by earlier tokens (the last
            phase of a previous chunk), so that a sequence can be processed in chunks, e.g. when decoding
            with a KV cache.
        first_exponent: ``1`` (the paper's ``θ_i = θ_1^i``, ``i = 1 … D/2``) or ``0`` (RoFormer/HF's
            ladder, ``i = 0 … D/2 − 1``, whose pair 0 ignores the context); see the module docstring.

    Returns:
        ``φ [B, H, T, D/2]`` in float32 (float64 if ``frequencies`` is float64). The powers are computed
        as ``exp(i · log f)``.
    """
    check_tensor("frequencies", frequencies)
    head_dim = _check_head_dim(head_dim)
    if frequencies.ndim != 3:
        raise ValueError(f"`frequencies` must have shape [B, T, H], got {tuple(frequencies.shape)}")
    check_choice("first_exponent", first_exponent, (0, 1))
    compute = torch.float64 if frequencies.dtype == torch.float64 else torch.float32
    ladder = torch.arange(head_dim // 2, dtype=compute, device=frequencies.device) + first_exponent
    log_f = frequencies.to(compute).log().transpose(1, 2)  # [B, H, T]
    phases = torch.exp(log_f[..., None] * ladder).cumsum(dim=2)  # [B, H, T, D/2]
    if initial_phase is not None:
        batch, heads = frequencies.shape[0], frequencies.shape[2]
        if check_tensor("initial_phase", initial_phase).shape != (batch, heads, head_dim // 2):
            raise ValueError(
                f"`initial_phase` must have shape [B={batch}, H={heads}, D/2={head_dim // 2}], "
                f"got {tuple(initial_phase.shape)}"
            )
        phases = phases + initial_phase.to(compute)[:, :, None, :]
    return phases


def carope_cos_sin(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    head_dim: int,
    *,
    initial_phase: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    first_exponent: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CARoPE ``cos``/``sin`` tables ``[B, H, T, D]`` for :func:`apply_rope`, and the last phase.

    The last phase ``[B, H, D/2]`` (that of position ``T``) is what :func:`carope_phases` takes as
    ``initial_phase`` to continue the sequence. ``dtype`` defaults to that of ``hidden_states``;
    ``first_exponent`` as in :func:`carope_phases`.
    """
    phases = carope_phases(
        carope_frequencies(hidden_states, weight, bias),
        head_dim,
        initial_phase=initial_phase,
        first_exponent=first_exponent,
    )
    cos, sin = _cos_sin_from_phases(phases, dtype or hidden_states.dtype)
    return cos, sin, phases[:, :, -1]


def _inverse_softplus(y: float) -> float:
    """``softplus⁻¹(y) = log(eʸ − 1)`` for ``y > 0``."""
    return y + math.log(-math.expm1(-y))


class ContextAwareRotaryEmbedding(nn.Module):
    """CARoPE (*Context-aware Rotary Position Embedding*): RoPE with per-head, per-token frequencies.

    ``forward(hidden_states [B, T, d_model], q [B, H, T, D], k [B, H, T, D]) -> (q_rot, k_rot)``; the
    frequency projection ``W`` is an ``nn.Linear(d_model, H)``. With ``init_from_rope=True`` (default)
    ``W = 0`` and the bias is set so that ``f ≡ base^(−2/D)``: the module starts as RoPE (at positions
    ``θ_1·m`` with the paper's ``first_exponent=1``, at ``m = 1 … T`` exactly with ``first_exponent=0``,
    the choice for retrofitting a model pretrained with HF RoPE) and learns to depart from it
    (gradients reach ``W`` because ``∂f/∂W`` involves ``x``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        base: float = 10000.0,
        bias: bool = True,
        init_from_rope: bool = True,
        first_exponent: int = 1,
    ) -> None:
        super().__init__()
        check_int("hidden_size", hidden_size, low=1)
        self.num_heads = check_int("num_heads", num_heads, low=1)
        self.head_dim, self.base = _check_head_dim(head_dim), _check_base(base)
        self.first_exponent = check_choice("first_exponent", first_exponent, (0, 1))
        self.frequency_proj = nn.Linear(hidden_size, num_heads, bias=bias)
        if init_from_rope:
            if not bias:
                raise ValueError("`init_from_rope=True` needs `bias=True` (W = 0, f set by the bias)")
            theta_1 = base ** (-2.0 / head_dim)
            with torch.no_grad():
                self.frequency_proj.weight.zero_()
                self.frequency_proj.bias.fill_(_inverse_softplus(1.0 / theta_1 - 1.0))

    def frequencies(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``f(x) [B, T, H]``."""
        return carope_frequencies(hidden_states, self.frequency_proj.weight, self.frequency_proj.bias)

    def forward(
        self, hidden_states: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        expected = (*check_tensor("hidden_states", hidden_states).shape[:1], self.num_heads)
        for name, t in (("q", q), ("k", k)):
            check_tensor(name, t)
            if (
                t.ndim != 4
                or tuple(t.shape[:2]) != expected
                or t.shape[2:] != (hidden_states.shape[1], self.head_dim)
            ):
                raise ValueError(
                    f"`{name}` must have shape [B, H={self.num_heads}, T={hidden_states.shape[1]}, "
                    f"D={self.head_dim}] matching `hidden_states`, got {tuple(t.shape)}"
                )
        cos, sin, _ = carope_cos_sin(
            hidden_states,
            self.frequency_proj.weight,
            self.frequency_proj.bias,
            self.head_dim,
            dtype=q.dtype,
            first_exponent=self.first_exponent,
        )
        return apply_rope(q, cos=cos, sin=sin), apply_rope(k, cos=cos, sin=sin)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, base={self.base}, "
            f"first_exponent={self.first_exponent}"
        )
