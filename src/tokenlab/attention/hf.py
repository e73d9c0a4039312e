"""Hugging Face integration: run transformers models on :func:`tokenlab.attention.flash_attention`.

:func:`register_attention` registers the implementation ``"tokenlab"`` with transformers'
``AttentionInterface`` (the attention function) and ``AttentionMaskInterface`` (the mask it receives),
explicitly, as transformers' own pattern for custom attention is (``AttentionInterface.register``):
those registries are process-wide, so importing tokenlab changes nothing in them::

    from tokenlab.attention import register_attention
    register_attention()  # idempotent; returns "tokenlab"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="tokenlab")
    model.set_attn_implementation("tokenlab")  # or switch an existing model

Entry points that switch a model's implementation themselves (``analyze_sinks(method="fused")``)
register it first.

How masks reach the kernel:

* plain causal attention (optionally with the layer's ``sliding_window``): no mask; the kernel's
  bottom-right ``causal``/``window`` flags express it, also while decoding with a KV cache;
* padding: the mask function hands over the 2-D ``[B, S]`` padding mask, which becomes
  ``segment_ids`` (padding → 1, tokens → 2), so no real token sees a padding token (padding query
  rows see only padding; their outputs are meaningless, as with every implementation);
* anything else — a custom 4-D mask passed by the caller, packed sequences, mask overlays, static
  caches — arrives as a 4-D mask and runs on the *reference* (O(T·S) memory) with that mask
  (boolean, or additive with values 0 / −inf or the dtype's minimum) combined with the layer's flags.

Per-layer variants are attributes of the attention module, set with :func:`configure_attention`
and read on every call: ``tokenlab_<flag>`` for a field of
:class:`~tokenlab.kernels.attention.AttentionVariant` (``tokenlab_sinks``, an ``nn.Parameter [Hq]``,
learnable; ``tokenlab_softcap``; ``tokenlab_initial_token_scale``, a buffer ``[Hq]``) and
``tokenlab_backend``. A set attribute overrides what the model passes (``s_aux`` as sinks,
``softcap``, ``scaling``, ``sliding_window``, ``is_causal``); an unset (``None``) one leaves it.

A flag can also be given for one call, as the keyword ``tokenlab_<flag>`` of the model's forward
(transformers hands unknown keywords down to the attention function); it overrides the attribute.
Per-call data goes this way, e.g. a draft tree's ancestor bitmasks
``model(input_ids, ..., tokenlab_tree=bits)`` (see ``AttentionVariant.tree``), so that tree
verification runs on the fused kernel with the 2-D padding mask instead of a dense 4-D mask.

Per-key scores: a :class:`KeyScoreHook` installed with :func:`set_key_score_hook` receives, for every
layer that asks for them, the attention each key received summed over the queries of the call,
``[B, Hq, S]`` (``flash_attention(..., return_key_scores=True)``: on the Triton path from the LSE in
a key-block pass, never materialising ``[T, S]``). H2O's heavy-hitter cache and the attention-sink
analysis read them this way.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask

from tokenlab._checks import check_choice
from tokenlab.attention.flash import flash_attention
from tokenlab.backend import BACKENDS, Backend
from tokenlab.kernels.attention import FLAGS, PER_HEAD_FLAGS, AttentionVariant, attention_reference

ATTN_IMPLEMENTATION = "tokenlab"
ATTR_PREFIX = "tokenlab_"  # the attribute `tokenlab_<flag>` of an attention module sets that flag
BACKEND_ATTR = ATTR_PREFIX + "backend"
KEY_SCORE_HOOK_ATTR = ATTR_PREFIX + "key_score_hook"  # a weak reference to a KeyScoreHook
LEARNABLE_FLAGS = ("sinks",)  # stored as an nn.Parameter; other tensor flags as buffers

__all__ = [
    "ATTN_IMPLEMENTATION",
    "KeyScoreHook",
    "attention_implementation",
    "attention_modules",
    "check_pretrained_model",
    "configure_attention",
    "register_attention",
    "set_key_score_hook",
    "set_layer_flag",
    "tokenlab_attention_forward",
    "tokenlab_attention_mask",
]


class KeyScoreHook(Protocol):
    """Receives per-key attention scores from the ``"tokenlab"`` attention of the layers it wants."""

    def wants_key_scores(self, layer_idx: int) -> bool:
        """Whether the coming attention call of layer ``layer_idx`` should report its key scores."""
        ...

    def record_key_scores(self, layer_idx: int, key_scores: torch.Tensor) -> None:
        """``key_scores [B, Hq, S]``: ``Σ_i P_ij`` over the call's queries ``i``, for every key ``j`` of the
        (cache-updated) keys the layer attended to."""
        ...


def _key_score_hook(module: nn.Module) -> KeyScoreHook | None:
    ref = getattr(module, KEY_SCORE_HOOK_ATTR, None)
    hook = None if ref is None else ref()
    return hook if hook is not None and hook.wants_key_scores(module.layer_idx) else None


def tokenlab_attention_mask(
    *args: object, allow_is_causal_skip: bool = True, use_vmap: bool = False, **kwargs: object
) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: ``None`` or the 2-D padding mask when the pattern
    is causal (or sliding-window causal) plus padding, else the exact 4-D boolean mask of ``sdpa_mask``.

    transformers forbids skipping the mask (``allow_is_causal_skip=False``) or builds it with ``vmap``
    exactly when the pattern is more than causal + padding (overlays, packed sequences, static caches).
    """
    if allow_is_causal_skip and not use_vmap:
        return flash_attention_mask(*args, **kwargs)
    return sdpa_mask(*args, allow_is_causal_skip=False, use_vmap=use_vmap, **kwargs)


def _visible_from_4d(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    masked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | masked).all()):
        raise ValueError(
            "`attention_mask`: additive 4-D masks must hold only 0 and -inf (or the dtype minimum); "
            "attention biases are not supported by the tokenlab implementation"
        )
    return ~masked


def tokenlab_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: ``query [B, Hq, T, D]``, ``key``/``value [B, Hkv, S, D]``
    (after the KV-cache update) → ``(out [B, T, Hq, D], None)``.

    Causality is the module's ``is_causal`` (default True) unless ``is_causal`` is passed; the window
    is the layer's ``sliding_window``. Attention weights are never materialised (``None`` is returned);
    the per-key scores go to the module's :class:`KeyScoreHook` when it wants them.
    """
    if dropout:
        raise ValueError(
            f"`dropout`={dropout}: the tokenlab attention has no dropout; set attention_dropout=0"
        )
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    flags = {"causal": causal, "window": sliding_window, "scale": scaling, "sinks": s_aux, "softcap": softcap}
    for name in FLAGS:  # a flag passed to this call, else the layer's configured one, overrides the model's
        configured = kwargs.get(ATTR_PREFIX + name)
        if configured is None:
            configured = getattr(module, ATTR_PREFIX + name, None)
        if configured is not None:
            flags[name] = configured
    backend: Backend = getattr(module, BACKEND_ATTR, "auto")
    hook = _key_score_hook(module)

    if attention_mask is None or (attention_mask.dim() == 2 and attention_mask.shape[1] == key.shape[2]):
        if attention_mask is not None:
            flags["segment_ids"] = attention_mask.to(torch.int32) + 1  # padding → 1, tokens → 2
        result = flash_attention(
            query, key, value, backend=backend, return_key_scores=hook is not None, **flags
        )
        out, scores = result if hook is not None else (result, None)
    else:
        if attention_mask.dim() != 4:
            shape = tuple(attention_mask.shape)
            raise ValueError(f"`attention_mask` must be 4-D, or 2-D [B, S={key.shape[2]}], got {shape}")
        visible = _visible_from_4d(attention_mask[..., : key.shape[2]])
        variant = AttentionVariant(**flags)
        out, _lse, *rest = attention_reference(
            query, key, value, variant, mask=visible, return_key_scores=hook is not None
        )
        scores = rest[0] if rest else None
    if hook is not None:
        hook.record_key_scores(module.layer_idx, scores)
    return out.transpose(1, 2).contiguous(), None


def set_key_score_hook(model: nn.Module, hook: KeyScoreHook | None) -> None:
    """Install ``hook`` (held by a weak reference: it does not keep the hook alive) on every attention
    module of ``model``, or remove it with ``None``. The ``"tokenlab"`` implementation then computes
    the per-key scores of a layer whenever ``hook.wants_key_scores(layer_idx)`` and hands them to
    ``hook.record_key_scores``; other implementations never call it."""
    for module in attention_modules(model):
        setattr(module, KEY_SCORE_HOOK_ATTR, None if hook is None else weakref.ref(hook))


def register_attention(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register the ``"tokenlab"`` attention function (:func:`tokenlab_attention_forward`) and its mask
    function (:func:`tokenlab_attention_mask`) with transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface`` under ``name`` (idempotent); returns ``name``, so that
    ``attn_implementation=register_attention()`` reads as one step."""
    AttentionInterface.register(name, tokenlab_attention_forward)
    AttentionMaskInterface.register(name, tokenlab_attention_mask)
    return name


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of ``model`` (those with a ``layer_idx`` and ``q_proj``), in order;
    raises ``ValueError`` when there is none."""
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    if not modules:
        raise ValueError("`model` has no attention modules (modules with `layer_idx` and `q_proj`)")
    return modules


def check_pretrained_model(model: object) -> PreTrainedModel:
    """``model`` if it is a transformers ``PreTrainedModel``, else ``TypeError`` naming ``model``."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"`model` must be a transformers PreTrainedModel, got {type(model).__name__}")
    return model


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str) -> Iterator[PreTrainedModel]:
    """Run ``model`` on the (registered) attention implementation ``name`` while the context is open;
    the previous one is restored on exit, also after an error."""
    previous = model.config._attn_implementation
    if previous != name:
        model.set_attn_implementation(name)
    try:
        yield model
    finally:
        if previous != name:
            model.set_attn_implementation(previous)


def _per_head(name: str, value: torch.Tensor | float, heads: int, like: torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if tensor.dim() == 0:
        tensor = tensor.expand(heads)
    if tensor.shape != (heads,):
        raise ValueError(
            f"`{name}` must be a number or a tensor of shape [{heads}], got {tuple(tensor.shape)}"
        )
    return tensor.detach().clone()


def set_layer_flag(module: nn.Module, name: str, value: torch.Tensor | float | None) -> None:
    """Set ``module.tokenlab_<name>`` (``name`` a field of :class:`AttentionVariant`, unchecked): a
    learnable flag as an ``nn.Parameter``, another tensor as a buffer, a number as a plain attribute;
    ``None`` unsets the flag. The other flags of the module are left as they are."""
    attr = ATTR_PREFIX + name
    for store in (module._parameters, module._buffers, module.__dict__):
        store.pop(attr, None)
    if name in LEARNABLE_FLAGS:
        module.register_parameter(attr, None if value is None else nn.Parameter(value))
    elif isinstance(value, torch.Tensor):
        module.register_buffer(attr, value)
    else:
        setattr(module, attr, value)


def configure_attention(
    model: nn.Module,
    *,
    sinks: torch.Tensor | float | None = None,
    softcap: float | None = None,
    initial_token_scale: torch.Tensor | float | None = None,
    backend: Backend = "auto",
    layers: Iterable[int] | None = None,
) -> list[nn.Module]:
    """Set the per-layer variant flags read by the ``"tokenlab"`` implementation.

    Args:
        model: a transformers model (or any module holding attention modules with ``layer_idx``).
        sinks: initial sink logits, one number for every head or ``[Hq]``; stored as a learnable
            ``nn.Parameter`` named ``tokenlab_sinks`` (*When Attention Sink Emerges in Language Models*).
            ``None`` removes them.
        softcap: ``c`` of ``c·tanh(s/c)``; ``None`` removes it.
        initial_token_scale: ZeroTuning's ``γ`` (> 0), a number or ``[Hq]`` (a buffer); ``None`` removes it.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` for these layers.
        layers: the ``layer_idx`` values to configure (default: all).

    Returns:
        The configured attention modules. The model must use ``attn_implementation="tokenlab"``.
    """
    check_choice("backend", backend, BACKENDS)
    flags = {"sinks": sinks, "softcap": softcap, "initial_token_scale": initial_token_scale}
    modules = attention_modules(model)
    chosen = None if layers is None else set(layers)
    if chosen is not None and not chosen <= {m.layer_idx for m in modules}:
        raise ValueError(f"`layers` {sorted(chosen)} not all in {[m.layer_idx for m in modules]}")
    selected = [m for m in modules if chosen is None or m.layer_idx in chosen]
    per_layer = []  # validated for every module before any module is changed
    for module in selected:
        heads, weight = module.config.num_attention_heads, module.q_proj.weight
        layer = dict(flags)
        for name in PER_HEAD_FLAGS:
            if layer.get(name) is not None:  # a number for every head, or [Hq]
                layer[name] = _per_head(name, layer[name], heads, weight)
        AttentionVariant(**layer)  # checks the values: softcap > 0, initial_token_scale > 0, ...
        per_layer.append(layer)
    for module, layer in zip(selected, per_layer):
        for name, value in layer.items():
            set_layer_flag(module, name, value)
        setattr(module, BACKEND_ATTR, backend)
    return selected
