"""The attention variant: every flag of the fused attention in one typed, validated structure.

The public op (:func:`tokenlab.attention.flash_attention`), the reference, the Triton launcher and the
Hugging Face adapter all take an :class:`AttentionVariant`; none of them lists the flags again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from tokenlab._checks import check_bool, check_choice, check_int, check_number, check_positive, check_tensor

__all__ = ["DTYPES", "FLAGS", "MAX_TREE_NODES", "PER_HEAD_FLAGS", "SCORE_FNS", "AttentionVariant"]

SCORE_FNS: tuple[str, ...] = ("softmax", "sigmoid", "relu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_TREE_NODES = 64  # the `tree` flag packs one node's ancestors in the bits of one int64


@dataclass(frozen=True, eq=False)
class AttentionVariant:
    """The flags of exact attention, checked on construction (values, and which flags apply to
    ``score_fn``) and by :meth:`validate` (shapes against ``q``/``k``/``v``).

    Query ``i`` of ``q [B, Hq, T, D]`` sits at key position ``p_i = i + S − T`` of ``k``/``v
    [B, Hkv, S, D]`` (bottom-right alignment, as in prefill or decoding with a KV cache). The scores
    ``s_ij = scale · q_i·k_j`` pass through ``softcap``, then ``initial_token_scale``; keys outside the
    visibility of ``causal``, ``window`` and ``segment_ids`` are dropped; ``score_fn`` turns the rest
    into weights ``P_ij`` and ``out_i = Σ_j P_ij v_j``. A row with no visible key outputs 0.

    Attributes:
        causal: query ``i`` sees key ``j`` only if ``j ≤ p_i``.
        window: ``w > 0``. With ``causal``, ``p_i − w < j ≤ p_i`` (the ``w`` most recent keys, the
            query's own included, as in Mistral/Qwen2 sliding windows); without it, ``|j − p_i| < w``.
        scale: the score scale; ``None`` means ``D^-1/2``.
        sinks: ``[Hq]`` logits, one per head, that join every softmax denominator with no value:
            ``L_i = log(Σ_j exp s_ij + exp sink_h)`` (*When Attention Sink Emerges in Language Models:
            An Empirical View*). ``sink → −∞`` is plain softmax, ``sink = 0`` softmax-plus-one.
            Softmax only.
        softcap: ``c > 0``: ``s ← c·tanh(s/c)`` (*Gemma 2: Improving Open Language Models at a
            Practical Size*).
        score_fn: ``"softmax"``: ``P_ij = exp(s_ij − L_i)`` with ``L_i = log Σ_j exp s_ij`` (plus the
            sink) over the visible ``j``; ``"sigmoid"``: ``P_ij = σ(s_ij + b_h)`` (*When Attention Sink
            Emerges in Language Models*); ``"relu"``: ``P_ij = max(s_ij, 0)`` (*Active-Dormant
            Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs*). Sigmoid
            and ReLU weights are not normalised.
        sigmoid_bias: ``b`` of the sigmoid scores, a number or ``[Hq]`` (default 0). Sigmoid only.
        initial_token_scale: ``γ [Hq] > 0``: ``s_i0 ← s_i0 + log γ_h``, so the softmax weight of key 0
            is multiplied by ``γ_h`` and the row renormalised (*ZeroTuning: Unlocking the Initial
            Token's Power to Enhance Large Language Models Without Training*). Softmax only.
        segment_ids: ``[B, S]`` integer ids, one per key. Query ``i`` takes the id of key position
            ``p_i`` (the last ``T`` ids; needs ``T ≤ S``) and sees key ``j`` iff either id is 0 (shared)
            or both are equal (*Set-Based Prompting: Provably Solving the Language Model Order
            Dependency Problem*).
        tree: ``[B, n]`` int64 packed ancestor bitmasks of a token tree, ``1 ≤ n ≤ 64`` (*SpecInfer:
            Accelerating Large Language Model Serving with Tree-based Speculative Inference and
            Verification*). The last ``n`` keys are tree nodes ``0..n−1``; the query at key position
            ``S − n + a`` (node ``a``) sees tree key ``b`` only if bit ``b`` of ``tree[:, a]`` is set
            (its ancestors and itself). Keys before the tree, and queries before it, are left to the
            other flags. One target forward thus scores every root-to-leaf path of a draft tree.

    Numbers are normalised on construction (``window`` to ``int``; ``scale``, ``softcap`` and a
    numeric ``sigmoid_bias`` to ``float``). Tensors are held as given: the variant does not copy them,
    and instances compare by identity.

    Raises:
        TypeError / ValueError naming the flag: a wrong kind of value, ``window ≤ 0``, ``softcap ≤ 0``,
        ``initial_token_scale ≤ 0``, an unknown ``score_fn``, a flag that does not apply to
        ``score_fn``.
    """

    causal: bool = False
    window: int | None = None
    scale: float | None = None
    # Field metadata: `per_head`, a tensor [Hq] (one value per query head); `score_fn`, the only score
    # function the flag is defined for.
    sinks: torch.Tensor | None = field(default=None, metadata={"per_head": True, "score_fn": "softmax"})
    softcap: float | None = None
    score_fn: str = "softmax"
    sigmoid_bias: torch.Tensor | float | None = field(
        default=None, metadata={"per_head": True, "score_fn": "sigmoid"}
    )
    initial_token_scale: torch.Tensor | None = field(
        default=None, metadata={"per_head": True, "score_fn": "softmax"}
    )
    segment_ids: torch.Tensor | None = None
    tree: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_bool("causal", self.causal)
        check_choice("score_fn", self.score_fn, SCORE_FNS)
        if self.window is not None:
            self._normalise("window", check_int("window", self.window, low=1))
        if self.scale is not None:
            self._normalise("scale", check_number("scale", self.scale))
        if self.softcap is not None:
            self._normalise("softcap", check_positive("softcap", self.softcap))
        if self.sinks is not None:
            check_tensor("sinks", self.sinks, floating=True)
        if isinstance(self.sigmoid_bias, torch.Tensor):
            check_tensor("sigmoid_bias", self.sigmoid_bias, floating=True)
        elif self.sigmoid_bias is not None:
            self._normalise("sigmoid_bias", check_number("sigmoid_bias", self.sigmoid_bias))
        if self.initial_token_scale is not None:
            gamma = check_tensor("initial_token_scale", self.initial_token_scale, floating=True)
            if not bool((gamma > 0).all()):
                raise ValueError("`initial_token_scale` must be > 0 (it multiplies the weight of key 0)")
        if self.segment_ids is not None:
            check_tensor("segment_ids", self.segment_ids, integer=True)
        if self.tree is not None:
            check_tensor("tree", self.tree, ndim=2)
            if self.tree.dtype != torch.int64:
                raise TypeError(f"`tree` must be an int64 tensor of bitmasks, got {self.tree.dtype}")
        for f in fields(self):
            if f.metadata.get("score_fn") and getattr(self, f.name) is not None:
                self.require_score_fn(f.name, f.metadata["score_fn"])

    def _normalise(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # frozen: set once, while constructing

    def require_score_fn(self, name: str, score_fn: str) -> None:
        """Raise a ``ValueError`` naming ``name`` unless this variant's ``score_fn`` is ``score_fn``."""
        if self.score_fn != score_fn:
            raise ValueError(f"`{name}` is defined for score_fn={score_fn!r} only, got {self.score_fn!r}")

    def validate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Check ``q [B, Hq, T, D]`` and ``k``/``v [B, Hkv, S, D]`` (floating dtypes, one dtype,
        ``Hq % Hkv == 0``) and the shapes of the tensor flags against them (per-head flags ``[Hq]``,
        ``segment_ids [B, S]`` with ``T ≤ S``, ``tree [B, n]`` with ``n ≤ min(S, 64)``); raises naming
        the argument."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_tensor(name, t, ndim=4)
            if t.dtype not in DTYPES:
                raise TypeError(f"`{name}` must be float16/bfloat16/float32/float64, got {t.dtype}")
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"`q`, `k`, `v` must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if k.shape != v.shape:
            raise ValueError(f"`k` and `v` must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        B, Hq, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        if k.shape[0] != B or k.shape[3] != D:
            raise ValueError(f"`k` must be [B={B}, Hkv, S, D={D}] to match `q`, got {tuple(k.shape)}")
        if Hkv == 0 or Hq % Hkv:
            raise ValueError(f"`q` heads ({Hq}) must be a multiple of `k`/`v` heads ({Hkv})")
        for name in PER_HEAD_FLAGS:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.shape != (Hq,):
                shape = tuple(value.shape)
                raise ValueError(f"`{name}` must be a tensor of shape [Hq] = [{Hq}], got {shape}")
        if self.segment_ids is not None:
            if self.segment_ids.shape != (B, S):
                raise ValueError(
                    f"`segment_ids` must be [B, S] = [{B}, {S}] (one id per key), "
                    f"got {tuple(self.segment_ids.shape)}"
                )
            if T > S:
                raise ValueError(
                    f"`segment_ids` needs T <= S (query i takes the id of key position i + S - T), "
                    f"got T={T}, S={S}"
                )
        if self.tree is not None:
            n = self.tree.shape[1]
            if self.tree.shape[0] != B or not 1 <= n <= min(S, MAX_TREE_NODES):
                raise ValueError(
                    f"`tree` must be [B={B}, n] with 1 <= n <= min(S={S}, {MAX_TREE_NODES}) (one bitmask "
                    f"per tree node, the last n keys), got {tuple(self.tree.shape)}"
                )

    def scale_for(self, head_dim: int) -> float:
        """The score scale for heads of size ``head_dim``: ``scale``, or ``head_dim^-1/2`` when unset."""
        return head_dim**-0.5 if self.scale is None else self.scale

    def tensors(self) -> dict[str, torch.Tensor]:
        """The flags that hold a tensor, by name (for device checks and dispatch)."""
        return {name: value for name in FLAGS if isinstance(value := getattr(self, name), torch.Tensor)}


FLAGS: tuple[str, ...] = tuple(f.name for f in fields(AttentionVariant))
PER_HEAD_FLAGS: tuple[str, ...] = tuple(f.name for f in fields(AttentionVariant) if "per_head" in f.metadata)
