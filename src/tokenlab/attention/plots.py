"""Plot helpers for the attention-sink analysis (:mod:`tokenlab.attention.sink_analysis`).

matplotlib is an optional dependency (``pip install tokenlab[plot]``), imported when a helper is
called. Each helper draws on ``ax`` (a new figure when ``None``) and returns the ``Axes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from tokenlab._checks import check_int, check_tensor
from tokenlab.attention.sink_analysis import SinkAnalysis

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_attention_map", "plot_residual_norms", "plot_sink_scores"]


def _axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the plot helpers need matplotlib: pip install 'tokenlab[plot]'") from err
    if ax is None:
        _, ax = plt.subplots(figsize=size, layout="constrained")
    return ax


def _check_row(analysis: SinkAnalysis, row: int) -> int:
    if not isinstance(analysis, SinkAnalysis):
        raise TypeError(f"`analysis` must be a SinkAnalysis, got {type(analysis).__name__}")
    return check_int("row", row, low=0, high=analysis.key_scores.shape[0] - 1)


def plot_sink_scores(analysis: SinkAnalysis, *, row: int | None = None, ax: Axes | None = None) -> Axes:
    """Heatmap of the sink scores ``α_0`` (share of attention on the first token), layers × heads,
    averaged over the batch (or for one ``row``); dormant heads (``α_0 > ε``) are marked with a dot."""
    scores = analysis.sink_scores
    scores = (scores.mean(dim=0) if row is None else scores[_check_row(analysis, row)]).cpu()
    L, H = scores.shape
    ax = _axes(ax, (1.2 + 0.45 * H, 1.0 + 0.4 * L))
    image = ax.imshow(scores.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
    layers, heads = (scores > analysis.threshold).nonzero(as_tuple=True)
    ax.scatter(heads.numpy(), layers.numpy(), s=12, c="white", marker="o")
    title = f"attention on the first token\n(• dormant: α₀ > {analysis.threshold:g})"
    ax.set(xlabel="head", ylabel="layer", xticks=range(H), yticks=range(L), title=title)
    ax.figure.colorbar(image, ax=ax, label="α₀")
    return ax


def plot_attention_map(
    attention: torch.Tensor, *, tokens: Sequence[str] | None = None, ax: Axes | None = None
) -> Axes:
    """One head's attention probabilities ``[T, T]`` (queries down, keys across), e.g. from
    :func:`~tokenlab.attention.sink_analysis.attention_map`; ``tokens`` label the axes."""
    check_tensor("attention", attention, ndim=2, floating=True)
    T = attention.shape[0]
    if tokens is not None and len(tokens) != T:
        raise ValueError(f"`tokens` must hold T = {T} labels, got {len(tokens)}")
    ax = _axes(ax, (4.5, 4.0))
    image = ax.imshow(attention.detach().float().cpu().numpy(), vmin=0.0, vmax=1.0, cmap="magma")
    ax.set(xlabel="key", ylabel="query", title="attention probabilities")
    if tokens is not None:
        ax.set_xticks(range(T), tokens, rotation=90, fontsize="x-small")
        ax.set_yticks(range(T), tokens, fontsize="x-small")
    ax.figure.colorbar(image, ax=ax)
    return ax


def plot_residual_norms(
    analysis: SinkAnalysis, *, row: int = 0, log: bool = True, ax: Axes | None = None
) -> Axes:
    """Residual-stream norm ``‖h_j‖`` per token, one line per layer (the stream entering it), for one
    ``row`` of the batch: the residual-state peaks of sink tokens stand out (log scale by default)."""
    norms = analysis.residual_norms[_check_row(analysis, row)].cpu().numpy()
    L, T = norms.shape
    ax = _axes(ax, (6.0, 3.2))
    colors = _viridis(L)
    for layer in range(L):
        ax.plot(range(T), norms[layer], marker=".", color=colors[layer], label=f"layer {layer}")
    ax.set(xlabel="token position", ylabel="‖h‖ (residual stream)", title="residual-state norms")
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize="small", ncol=max(1, L // 6))
    return ax


def _viridis(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]
