"""KV-cache eviction policies as transformers ``Cache`` subclasses, usable in ``generate``.

* :class:`SinkCache` — *Efficient Streaming Language Models with Attention Sinks* (StreamingLLM):
  the first ``sinks`` tokens plus a rolling window of the most recent tokens.
* :class:`HeavyHitterCache` — *H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
  Language Models*: a recent window plus the tokens with the largest accumulated attention (the
  heavy hitters), optionally with sinks as well (the combination named in *SinkLoRA*).

Both keep, per layer, keys and values ``[B, Hkv, L, D]`` with ``L ≤ budget`` between forward calls, so
memory stays bounded however long the generation runs; with ``budget`` at least the sequence length
nothing is evicted and both are token-for-token :class:`transformers.DynamicCache`.

**Positions.** Keys arrive rotated by RoPE at their original positions and queries are rotated at
their original (absolute) positions. ``positions="original"`` leaves the kept keys as they are (what
H2O's implementation and kvpress do). ``positions="cache"`` (StreamingLLM's choice, its Section 3.2:
"positions within the cache rather than those in the original text") re-rotates the kept keys so that
the distance from the newest token to the key in cache slot ``c`` of ``L`` is ``L − 1 − c``: the
window, contiguous with the new token, keeps its rotation, and the sinks are rotated forward by the
number of evicted tokens. RoPE scores depend only on the distance, so this is exactly the paper's
re-indexing ``[0, …, L−1]``; the query's own rotation stays absolute (``generate`` sets it), which
RoPE cannot tell apart. Keys are stored at their original rotation and rotated from it on every step,
so no rounding accumulates.

**Masks.** The model's mask is built from :meth:`get_mask_sizes`: the kept keys are presented as the
contiguous positions just before the new tokens, which is exact for causal decoding and prefill of
rows without padding. Rows of one batch must therefore have equal lengths (no padding), and every
layer must be a full-attention layer.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from tokenlab._checks import check_choice, check_int
from tokenlab.attention.hf import ATTN_IMPLEMENTATION, check_pretrained_model, set_key_score_hook
from tokenlab.attention.rope import rotate_half

__all__ = ["POSITIONS", "HeavyHitterCache", "SinkCache"]

POSITIONS = ("cache", "original")
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")  # inv_freq fixed in time


class _KeyRotation:
    """Rotates RoPE keys by per-token position offsets ``Δ``: ``R(Δ) k`` in the half-split layout, with
    the model's own inverse frequencies (``R(a) R(b) = R(a + b)``)."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq.detach().double()

    @classmethod
    def from_model(cls, model: PreTrainedModel, head_dim: int) -> _KeyRotation:
        config = model.config.get_text_config(decoder=True)
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        rotary = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
        if not rotary or rope_type not in _STATIC_ROPE_TYPES:
            raise ValueError(
                f"`positions='cache'` re-rotates RoPE keys and needs a model with a rotary embedding of a "
                f"static type {_STATIC_ROPE_TYPES} (got {rope_type!r}"
                f"{'' if rotary else ', no `inv_freq` buffer'}); use positions='original'"
            )
        inv_freq = rotary[0].inv_freq
        if 2 * inv_freq.numel() != head_dim:
            raise ValueError(
                f"`positions='cache'` needs RoPE on the whole head (2 × {inv_freq.numel()} frequencies "
                f"for head_dim {head_dim}); use positions='original'"
            )
        return cls(inv_freq)

    def __call__(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``keys [B, H, L, D]`` rotated by ``delta [B, H, L]`` positions (columns with Δ = 0 untouched)."""
        moved = (delta != 0).any(dim=(0, 1)).nonzero().squeeze(-1)
        if moved.numel() == 0:
            return keys
        compute = torch.float64 if keys.dtype == torch.float64 else torch.float32
        phases = delta[:, :, moved, None].to(compute) * self.inv_freq.to(keys.device, compute)
        emb = torch.cat((phases, phases), dim=-1)
        out = keys.clone()
        moving = keys[:, :, moved]  # RoPE's x·cos + rotate_half(x)·sin, unchecked in this per-step path
        cos, sin = emb.cos().to(keys.dtype), emb.sin().to(keys.dtype)
        out[:, :, moved] = moving * cos + rotate_half(moving) * sin
        return out


class _EvictingLayer(DynamicLayer):
    """One layer's kept keys/values ``[B, Hkv, L, D]`` with their original positions ``[B, Hkv, L]``
    (sorted along ``L``) and the number of tokens seen. Subclasses decide which tokens to keep."""

    is_croppable = False

    def __init__(self, budget: int, rotation: _KeyRotation | None) -> None:
        super().__init__()
        self.budget = budget
        self.rotation = rotation
        self.positions: torch.Tensor | None = None
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty(B, H, 0, D)
        self.values = value_states.new_empty(B, H, 0, value_states.shape[-1])
        self.positions = torch.empty(B, H, 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def _attending(self, query_length: int) -> int:
        """How many kept tokens the coming call of ``query_length`` new tokens attends to."""
        return self.get_cached_length()

    def _per_token_states(self) -> tuple[str, ...]:
        return ("keys", "values", "positions")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens (at positions ``seen …``) and return the keys/values this call attends
        to: the kept tokens and the new ones, keys re-rotated when ``positions='cache'``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._before_append(key_states.shape[-2])
        B, H, T, _ = key_states.shape
        new = torch.arange(self.seen, self.seen + T, device=self.device).expand(B, H, T)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new], dim=-1)
        self.seen += T
        keys = self.keys
        if self.rotation is not None:
            L = keys.shape[-2]
            target = (self.seen - L) + torch.arange(L, device=self.device)  # slot c ↦ distance L − 1 − c
            keys = self.rotation(keys, target - self.positions)
        returned = keys, self.values
        self._after_append()
        return returned

    def _before_append(self, query_length: int) -> None:
        raise NotImplementedError

    def _after_append(self) -> None:
        raise NotImplementedError

    def get_cached_length(self) -> int:
        """Tokens held now (``≤ budget`` between forward calls)."""
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        """Tokens seen so far: the position of the next token (``generate`` and the masks use it)."""
        return self.seen

    def get_max_length(self) -> int:
        return self.budget

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)``: the kept tokens of the coming call shown as the contiguous
        positions right before the new ones, so the causal mask is exact for unpadded rows."""
        kv_length = self._attending(query_length) + query_length
        return kv_length, self.seen + query_length - kv_length

    def reset(self) -> None:
        super().reset()
        self.positions = None
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} evicts tokens and cannot be rolled back (crop)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for name in self._per_token_states():
                setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for name in self._per_token_states():
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            for name in self._per_token_states():
                setattr(self, name, getattr(self, name)[indices, ...])


class _SinkWindowLayer(_EvictingLayer):
    """Keeps the tokens at positions ``< sinks`` and the ``budget − sinks`` most recent ones. The kept
    tokens are the same for every row and head: the first ``min(sinks, L)`` slots and a window."""

    def __init__(self, budget: int, rotation: _KeyRotation | None, sinks: int) -> None:
        super().__init__(budget, rotation)
        self.sinks = sinks
        self.window = budget - sinks

    def _held_sinks(self) -> int:
        return min(self.sinks, self.get_cached_length())

    def _attending(self, query_length: int) -> int:
        held = self._held_sinks()
        return held + min(self.get_cached_length() - held, max(self.window - query_length, 0))

    def _trim(self, window: int) -> None:
        """Keep the held sinks and the ``window`` most recent tokens."""
        L, held = self.get_cached_length(), self._held_sinks()
        if L - held > window:
            for name in self._per_token_states():
                state = getattr(self, name)
                setattr(self, name, torch.cat([state[:, :, :held], state[:, :, L - window :]], dim=2))

    def _before_append(self, query_length: int) -> None:
        # StreamingLLM evicts to make room: the new tokens attend to sinks + window, new ones included.
        self._trim(max(self.window - query_length, 0))

    def _after_append(self) -> None:
        self._trim(self.window)  # only a prompt longer than the window loses tokens here


class _HeavyHitterLayer(_EvictingLayer):
    """Keeps sinks, the ``window`` most recent tokens and, per row and KV head, the heavy hitters: the
    tokens with the largest attention accumulated over every query so far."""

    def __init__(self, budget: int, rotation: _KeyRotation | None, sinks: int, window: int) -> None:
        super().__init__(budget, rotation)
        self.sinks = sinks
        self.window = window
        self.scores: torch.Tensor | None = None  # [B, Hkv, L], accumulated Σ_i P_ij
        self.awaiting_scores = False

    def _per_token_states(self) -> tuple[str, ...]:
        return ("keys", "values", "positions", "scores")

    def _select(self, index: torch.Tensor) -> None:
        """Keep the tokens at ``index [B, H, L']`` (sorted) of every per-token state."""
        for name in self._per_token_states():
            state = getattr(self, name)
            idx = index if state.dim() == 3 else index[..., None].expand(-1, -1, -1, state.shape[-1])
            setattr(self, name, state.gather(2, idx))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B, H = key_states.shape[:2]
        dtype = torch.promote_types(key_states.dtype, torch.float32)  # as the attention's key scores
        self.scores = torch.empty(B, H, 0, dtype=dtype, device=self.device)

    def _before_append(self, query_length: int) -> None:
        if self.awaiting_scores:
            raise RuntimeError(
                "HeavyHitterCache received no attention scores for the previous call: run the model with "
                f"attn_implementation={ATTN_IMPLEMENTATION!r} (tokenlab.attention.register_attention), and "
                "build the cache for this model right before using it (the newest cache of a model "
                "receives the scores)"
            )
        B, H = self.keys.shape[:2]
        self.scores = torch.cat([self.scores, self.scores.new_zeros(B, H, query_length)], dim=-1)

    def _after_append(self) -> None:
        self.awaiting_scores = True  # eviction waits for this call's attention (record_scores)

    def record_scores(self, key_scores: torch.Tensor) -> None:
        """Add ``key_scores [B, Hq, L]`` (summed over each GQA group) and evict down to ``budget``."""
        B, H, L = self.scores.shape
        self.scores += key_scores.view(B, H, -1, L).sum(dim=2).to(self.scores.dtype)
        self.awaiting_scores = False
        if self.budget >= L:
            return
        heavy = self.budget - self.sinks - self.window
        middle = torch.arange(self.sinks, L - self.window, device=self.device)
        chosen = self.scores[:, :, middle].topk(heavy, dim=-1).indices + self.sinks if heavy else middle[:0]
        ends = torch.cat([torch.arange(self.sinks), torch.arange(L - self.window, L)]).to(self.device)
        index = torch.cat([ends.expand(B, H, -1), chosen.expand(B, H, -1)], dim=-1).sort(dim=-1).values
        self._select(index)

    def reset(self) -> None:
        super().reset()
        self.scores = None
        self.awaiting_scores = False


class _EvictingCache(Cache):
    """Shared construction and inspection of the eviction caches."""

    @staticmethod
    def _layer_args(model: PreTrainedModel, budget: int, positions: str) -> tuple[int, _KeyRotation | None]:
        check_pretrained_model(model)
        budget = check_int("budget", budget, low=1)
        check_choice("positions", positions, POSITIONS)
        config = model.config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(config)  # as DynamicCache(config=...) reads them
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"`model` must have full-attention layers only (the eviction caches replace its sliding "
                f"windows), got layer types {sorted(set(layer_types))}"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return config.num_hidden_layers, (
            _KeyRotation.from_model(model, head_dim) if positions == "cache" else None
        )

    def positions(self, layer_idx: int) -> torch.Tensor:
        """Original positions ``[B, Hkv, L]`` of the tokens layer ``layer_idx`` keeps, ascending."""
        return self.layers[layer_idx].positions

    def cached_lengths(self) -> list[int]:
        """Tokens each layer holds now."""
        return [layer.get_cached_length() for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of the kept keys and values of every layer."""
        return sum(
            t.nbytes for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values)
        )


class SinkCache(_EvictingCache):
    """StreamingLLM's KV cache (*Efficient Streaming Language Models with Attention Sinks*): the first
    ``sinks`` tokens ("attention sinks") and a rolling window of the ``budget − sinks`` most recent
    tokens, new ones included; everything in between is evicted. ``sinks=0`` is plain window attention,
    the baseline the paper shows collapsing once the first tokens leave the cache.

    Each decoding step attends to at most ``budget`` tokens (the oldest window token is evicted before
    the new one is appended, as in the paper's Figure 4); a prompt longer than ``budget`` is attended in
    full and then cut to sinks + window. Positions follow ``positions`` (default ``"cache"``, the
    paper's: sinks re-rotated so that distances are those within the cache; see the module doc).

    Example::

        cache = SinkCache(model, budget=256, sinks=4)
        out = model.generate(ids, cache=cache, max_new_tokens=2000)   # 256 tokens per layer at most

    Args:
        model: the causal LM it will serve (full-attention layers; RoPE for ``positions="cache"``).
        budget: tokens kept per layer (``> sinks``).
        sinks: initial tokens always kept (the paper uses 4).
        positions: ``"cache"`` or ``"original"``.
    """

    def __init__(self, model: PreTrainedModel, budget: int, sinks: int = 4, positions: str = "cache") -> None:
        num_layers, rotation = self._layer_args(model, budget, positions)
        sinks = check_int("sinks", sinks, low=0)
        if sinks >= budget:
            raise ValueError(f"`sinks` ({sinks}) must be < `budget` ({budget}) to leave room for a window")
        self.budget, self.sinks, self.window = budget, sinks, budget - sinks
        super().__init__(layers=[_SinkWindowLayer(budget, rotation, sinks) for _ in range(num_layers)])


class HeavyHitterCache(_EvictingCache):
    """H2O's KV cache (*H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
    Models*): the ``window`` most recent tokens plus the heavy hitters — the tokens whose attention,
    summed over every query so far (``Σ_i P_ij``, prefill queries included), is largest — chosen per
    batch row and KV head (a GQA group sums its query heads' scores); ``sinks`` initial tokens can be
    pinned as well (StreamingLLM's sinks with H2O's heavy hitters, as *SinkLoRA* combines them).

    Each step attends to the kept tokens and the new ones, then adds this step's per-key scores and
    evicts the lowest-scoring non-recent tokens down to ``budget`` (the paper's greedy Algorithm 1).
    The scores come from the ``"tokenlab"`` attention implementation
    (``flash_attention(..., return_key_scores=True)``: on GPU the fused kernel's key-block pass from
    the forward's log-sum-exp, without materialising ``[T, S]``), so the model must run with
    ``attn_implementation="tokenlab"``; constructing the cache installs it as the model's
    :class:`~tokenlab.attention.hf.KeyScoreHook` (held weakly; the newest cache of a model receives
    the scores). Positions default to ``"original"``, as in H2O's implementation.

    Example::

        model.set_attn_implementation(register_attention())   # "tokenlab"
        cache = HeavyHitterCache(model, budget=256)      # 128 heavy hitters + 128 recent tokens
        out = model.generate(ids, cache=cache, max_new_tokens=2000)

    Args:
        model: the causal LM it will serve (full-attention layers, ``"tokenlab"`` attention).
        budget: tokens kept per layer, row and KV head between steps.
        window: most recent tokens always kept (default ``budget // 2``, H2O's even split).
        sinks: initial tokens always kept (default 0: plain H2O).
        positions: ``"original"`` or ``"cache"``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        budget: int,
        window: int | None = None,
        sinks: int = 0,
        positions: str = "original",
    ) -> None:
        num_layers, rotation = self._layer_args(model, budget, positions)
        window = budget // 2 if window is None else check_int("window", window, low=0)
        sinks = check_int("sinks", sinks, low=0)
        if sinks + window > budget:
            raise ValueError(f"`sinks` + `window` ({sinks} + {window}) must be <= `budget` ({budget})")
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"HeavyHitterCache needs the per-key attention scores of attn_implementation="
                f"{ATTN_IMPLEMENTATION!r} (tokenlab.attention.register_attention(), then "
                f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r})); got "
                f"{model.config._attn_implementation!r}"
            )
        self.budget, self.sinks, self.window = budget, sinks, window
        super().__init__(
            layers=[_HeavyHitterLayer(budget, rotation, sinks, window) for _ in range(num_layers)]
        )
        set_key_score_hook(model, self)

    def wants_key_scores(self, layer_idx: int) -> bool:
        """:class:`~tokenlab.attention.hf.KeyScoreHook`: the layer's last update awaits its scores."""
        return layer_idx < len(self.layers) and self.layers[layer_idx].awaiting_scores

    def record_key_scores(self, layer_idx: int, key_scores: torch.Tensor) -> None:
        """:class:`~tokenlab.attention.hf.KeyScoreHook`: accumulate ``[B, Hq, L]`` and evict."""
        self.layers[layer_idx].record_scores(key_scores)

    def heavy_hitter_scores(self, layer_idx: int) -> torch.Tensor:
        """Accumulated attention ``[B, Hkv, L]`` of the tokens layer ``layer_idx`` keeps."""
        return self.layers[layer_idx].scores
