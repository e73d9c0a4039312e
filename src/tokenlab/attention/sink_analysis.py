"""Attention-sink and head analysis of a Hugging Face causal LM: sink scores per layer and head,
active/dormant heads, value-state drains, residual-state peaks, and the BOS-decorrelation loss.

* *When Attention Sink Emerges in Language Models: An Empirical View* (Gu et al.) — the importance
  score of key ``k`` in head ``h`` of layer ``l``, the mean attention it receives from the queries that
  see it, ``α_k = Σ_{i ≥ k} A_ik / (T − k)`` (0-based; in a sliding-window layer of window ``w`` the
  ``min(T − k, w)`` queries that see it), and the sink rate ``Sink_k^ε``: the fraction of heads with
  ``α_k > ε`` (``ε = 0.3``).
* *Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs* (Guo
  et al.) — a head is dormant on an input when it dumps its attention on the sink token (here: its
  sink score exceeds the threshold) and active otherwise; the extreme tokens also show small value
  states (value-state drains) and large residual-state norms (residual-state peaks).
* *Mitigating Attention Sinks and Massive Activations in Audio-Visual Speech Recognition with LLMs* —
  :func:`bos_decorrelation_loss`, the auxiliary loss that pushes the hidden states of the other tokens
  away from the BOS token's direction.

Everything is computed from the per-key scores ``Σ_i P_ij`` (the attention each key receives summed
over the queries): with ``method="eager"`` from the probabilities of the model's eager attention
(``output_attentions``), with ``method="fused"`` from the ``"tokenlab"`` attention's fused per-key
score output, which never materialises the ``[T, T]`` probabilities.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from tokenlab._checks import check_choice, check_probability, check_tensor
from tokenlab.attention.hf import (
    KEY_SCORE_HOOK_ATTR,
    attention_implementation,
    attention_modules,
    check_pretrained_model,
    register_attention,
    set_key_score_hook,
)

__all__ = [
    "SINK_THRESHOLD",
    "SinkAnalysis",
    "analyze_sinks",
    "attention_map",
    "bos_decorrelation_loss",
]

SINK_THRESHOLD = 0.3  # ε of *When Attention Sink Emerges*: strict, and stable across lengths T
METHODS = ("eager", "fused")


@dataclass(frozen=True)
class SinkAnalysis:
    """Sink, head and extreme-token statistics of one batch ``[B, T]`` through a model with ``L``
    layers, ``Hq`` query heads and ``Hkv`` key/value heads.

    Attributes:
        key_scores: ``[B, L, Hq, T]``: ``Σ_i A_ij``, the attention key ``j`` receives summed over the
            queries ``i`` (causal: ``i ≥ j``).
        value_norms: ``[B, L, Hkv, T]``: ``‖v_j‖`` per key/value head (value-state drains: small at
            sink tokens); ``None`` when the attention modules have no ``v_proj``.
        residual_norms: ``[B, L, T]``: ``‖h_j‖`` of the residual stream entering each layer
            (residual-state peaks: large at sink tokens).
        max_activations: ``[B, L, T]``: ``max_d |h_jd|`` of the same residual states (massive
            activations are single features far above the rest).
        threshold: ``ε``, the sink-score threshold of :attr:`dormant` and :attr:`sink_rate`.
        query_counts: ``[L, T]``: how many queries see key ``j`` in each layer — ``T − j``, or
            ``min(T − j, w)`` in a layer with a sliding window ``w``; ``None``: ``T − j`` everywhere.
    """

    key_scores: torch.Tensor
    value_norms: torch.Tensor | None
    residual_norms: torch.Tensor
    max_activations: torch.Tensor
    threshold: float = SINK_THRESHOLD
    query_counts: torch.Tensor | None = None

    @property
    def importance(self) -> torch.Tensor:
        """``[B, L, Hq, T]``: ``α_k = Σ_i A_ik / n_k``, the mean attention key ``k`` receives from the
        ``n_k`` queries that see it (:attr:`query_counts`; ``T − k`` for causal attention) (*When
        Attention Sink Emerges*)."""
        T = self.key_scores.shape[-1]
        if self.query_counts is None:
            seen_by = torch.arange(T, 0, -1, device=self.key_scores.device, dtype=self.key_scores.dtype)
        else:
            seen_by = self.query_counts.to(self.key_scores)[:, None, :]  # [L, 1, T]
        return self.key_scores / seen_by

    @property
    def sink_scores(self) -> torch.Tensor:
        """``[B, L, Hq]``: ``α_0``, the share of attention on the first token, averaged over the queries."""
        return self.importance[..., 0]

    @property
    def top_keys(self) -> torch.Tensor:
        """``[B, L, Hq]``: the key with the largest share of all the attention ``Σ_i A_ik / T``."""
        return self.key_scores.argmax(dim=-1)

    @property
    def top_key_scores(self) -> torch.Tensor:
        """``[B, L, Hq]``: that key's share ``Σ_i A_ik / T`` (equal to the sink score when it is the
        first token)."""
        return self.key_scores.amax(dim=-1) / self.key_scores.shape[-1]

    @property
    def dormant(self) -> torch.Tensor:
        """``[B, L, Hq]`` bool: the heads that put more than ``threshold`` of their attention on the
        first token for this input (dormant, *Active-Dormant Attention Heads*); the others are active."""
        return self.sink_scores > self.threshold

    @property
    def sink_rate(self) -> float:
        """``Sink_1^ε``: the fraction of (layer, head) pairs with ``α_0 > ε``, averaged over the batch."""
        return self.dormant.float().mean().item()

    @property
    def residual_peak_ratio(self) -> torch.Tensor:
        """``[B, L]``: the largest residual norm over the tokens divided by their median."""
        return self.residual_norms.amax(dim=-1) / self.residual_norms.median(dim=-1).values


class _KeyScoreRecorder:
    """A :class:`~tokenlab.attention.hf.KeyScoreHook` that keeps every layer's scores."""

    def __init__(self) -> None:
        self.scores: dict[int, torch.Tensor] = {}

    def wants_key_scores(self, layer_idx: int) -> bool:
        return True

    def record_key_scores(self, layer_idx: int, key_scores: torch.Tensor) -> None:
        self.scores[layer_idx] = key_scores


@contextmanager
def _recording_key_scores(model: PreTrainedModel) -> Iterator[_KeyScoreRecorder]:
    modules = attention_modules(model)
    previous = [getattr(m, KEY_SCORE_HOOK_ATTR, None) for m in modules]
    recorder = _KeyScoreRecorder()
    set_key_score_hook(model, recorder)
    try:
        yield recorder
    finally:
        for module, hook in zip(modules, previous):
            setattr(module, KEY_SCORE_HOOK_ATTR, hook)


@contextmanager
def _recording_value_norms(model: PreTrainedModel) -> Iterator[dict[int, torch.Tensor]]:
    """``{layer: ‖v‖ [B, Hkv, T]}`` from forward hooks on the attention modules' ``v_proj``."""
    norms: dict[int, torch.Tensor] = {}
    handles = []
    for module in attention_modules(model):
        if not hasattr(module, "v_proj"):
            continue

        def hook(proj, args, out, layer=module.layer_idx, head_dim=module.head_dim):
            B, T, _ = out.shape
            norms[layer] = out.detach().float().view(B, T, -1, head_dim).norm(dim=-1).transpose(1, 2)

        handles.append(module.v_proj.register_forward_hook(hook))
    try:
        yield norms
    finally:
        for handle in handles:
            handle.remove()


def _query_counts(model: PreTrainedModel, T: int) -> torch.Tensor | None:
    """``[L, T]`` queries that see each key, from each attention module's ``sliding_window`` (query
    ``i`` sees ``i − w < j ≤ i``, transformers' convention); ``None`` when no layer has a window."""
    windows = [getattr(m, "sliding_window", None) for m in attention_modules(model)]
    if all(w is None for w in windows):
        return None
    causal = torch.arange(T, 0, -1)
    return torch.stack([causal if w is None else causal.clamp(max=w) for w in windows])


def _check_model_inputs(model: PreTrainedModel, input_ids: torch.Tensor) -> None:
    check_pretrained_model(model)
    check_tensor("input_ids", input_ids, ndim=2, integer=True)
    if input_ids.shape[1] < 1:
        raise ValueError("`input_ids` must hold at least one token per row")


@torch.no_grad()
def analyze_sinks(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    method: str = "eager",
    threshold: float = SINK_THRESHOLD,
) -> SinkAnalysis:
    """Per-layer, per-head sink statistics of ``model`` on ``input_ids [B, T]`` (rows of equal length,
    no padding; the first token is the candidate sink).

    Args:
        model: a causal LM. ``method="eager"`` switches it to eager attention for the call (the
            probabilities come from ``output_attentions``; ``"tokenlab"`` flags set with
            ``configure_attention`` do not apply there); ``method="fused"`` switches it to the
            ``"tokenlab"`` implementation (registered with transformers on the way), whose fused
            per-key scores are used — its configured flags apply. The implementation is restored
            afterwards.
        input_ids: ``[B, T]`` token ids.
        method: ``"eager"`` or ``"fused"``.
        threshold: ``ε`` in ``(0, 1)`` for dormant heads and the sink rate (default 0.3).

    Returns:
        A :class:`SinkAnalysis` (tensors in float32 on the model's device).
    """
    _check_model_inputs(model, input_ids)
    check_choice("method", method, METHODS)
    threshold = check_probability("threshold", threshold, zero=False, one=False)
    implementation = "eager" if method == "eager" else register_attention()
    with (
        attention_implementation(model, implementation),
        _recording_key_scores(model) as recorder,
        _recording_value_norms(model) as value_norms,
    ):
        out = model(
            input_ids, output_hidden_states=True, output_attentions=method == "eager", use_cache=False
        )
    if method == "eager":
        key_scores = [a.float().sum(dim=2) for a in out.attentions]
    else:
        key_scores = [recorder.scores[layer].float() for layer in sorted(recorder.scores)]
    residual = torch.stack([h.float() for h in out.hidden_states[: len(key_scores)]], dim=1)  # layer inputs
    return SinkAnalysis(
        key_scores=torch.stack(key_scores, dim=1),
        value_norms=torch.stack([value_norms[i] for i in sorted(value_norms)], dim=1)
        if value_norms
        else None,
        residual_norms=residual.norm(dim=-1),
        max_activations=residual.abs().amax(dim=-1),
        threshold=threshold,
        query_counts=_query_counts(model, input_ids.shape[1]),
    )


@torch.no_grad()
def attention_map(model: PreTrainedModel, input_ids: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """The attention probabilities ``[B, T, T]`` of one head (eager attention for the call), e.g. for
    :func:`tokenlab.attention.plots.plot_attention_map`."""
    _check_model_inputs(model, input_ids)
    with attention_implementation(model, "eager"):
        attentions = model(input_ids, output_attentions=True, use_cache=False).attentions
    if not (0 <= layer < len(attentions) and 0 <= head < attentions[layer].shape[1]):
        raise ValueError(
            f"`layer`/`head` ({layer}, {head}) out of range for {len(attentions)} layers × "
            f"{attentions[0].shape[1]} heads"
        )
    return attentions[layer][:, head].float()


def bos_decorrelation_loss(
    hidden_states: Sequence[torch.Tensor] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """The decorrelation loss of *Mitigating Attention Sinks and Massive Activations in Audio-Visual
    Speech Recognition with LLMs*: the mean squared cosine similarity between the BOS token's hidden
    state and every other token's, averaged over layers,

        L_dec = mean_l [ Σ_{b, j ≥ 1} m_bj cos²(h^l_b0, h^l_bj) / Σ_{b, j ≥ 1} m_bj ],

    added to the task loss with a weight λ (the paper's code uses 10⁴). It pushes intermediate tokens
    away from the BOS direction, which the paper finds is what turns them into secondary sinks with
    massive activations.

    Args:
        hidden_states: the ``hidden_states`` tuple of a model called with ``output_hidden_states=True``
            (``L + 1`` tensors ``[B, T, d]``: embeddings, then each layer's output, the last one after
            the final norm), or a tensor ``[N, B, T, d]``. The BOS token is at index 0 of every row.
        attention_mask: ``[B, T]``, 0 on (right) padding, which is left out.
        layers: which entries of ``hidden_states`` to use; default the intermediate ones,
            ``1 … len − 2`` (as the paper's code: neither the embeddings nor the normed output).

    Returns:
        A differentiable scalar in ``[0, 1]``.
    """
    states = list(hidden_states)  # a tuple of [B, T, d], or the rows of [N, B, T, d]
    if not states:
        raise ValueError("`hidden_states` is empty")
    for i, h in enumerate(states):
        check_tensor(f"hidden_states[{i}]", h, ndim=3, floating=True)
    B, T, _ = states[0].shape
    if T < 2:
        raise ValueError("`hidden_states` need at least two tokens (BOS and one other)")
    if layers is None:
        layers = range(1, len(states) - 1) if len(states) > 2 else range(len(states))
    layers = list(layers)
    if not layers or not all(0 <= i < len(states) for i in layers):
        raise ValueError(f"`layers` must be a non-empty selection of 0 … {len(states) - 1}, got {layers}")
    weights = torch.ones(B, T, device=states[0].device)
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2)
        if attention_mask.shape != (B, T):
            raise ValueError(
                f"`attention_mask` must be [B, T] = [{B}, {T}], got {tuple(attention_mask.shape)}"
            )
        weights = attention_mask.to(weights)
    weights = weights.clone()
    weights[:, 0] = 0.0  # not the BOS with itself
    losses = []
    for i in layers:
        h = torch.nn.functional.normalize(states[i].float(), dim=-1)
        cos = torch.einsum("bd,btd->bt", h[:, 0], h)
        losses.append((cos.square() * weights).sum() / weights.sum())
    return torch.stack(losses).mean()
