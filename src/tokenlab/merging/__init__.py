"""Merging: task arithmetic, magnitude pruning, TIES, DARE, DELLA, Model Breadcrumbs (each linear and
with TIES' sign election), linear averaging, Model Stock and SLERP behind one registry, streaming
merges of Hugging Face checkpoints, mergekit-compatible configs, and Self-Positioning.

* :func:`merge_tensors` — one tensor, any method of :data:`MERGE_METHODS` (:mod:`.methods`; each
  method declares its parameters with :class:`Param` in :func:`register_merge_method`, :mod:`.registry`);
* :func:`merge_state_dicts` — whole state dicts in memory;
* :func:`merge_checkpoints` — safetensors directories, one tensor at a time, atomic output
  (:mod:`.checkpoint`); :func:`merge_from_recipe` — the same from a YAML/JSON recipe (:mod:`.recipe`)
  or a mergekit config (:mod:`.mergekit`); ``python -m tokenlab.merging`` — the command line
  (:mod:`.cli`); parameters that vary by tensor: :class:`TensorSetting` (:mod:`.settings`);
* :func:`self_positioning` — task-vector coefficients learned by SGD on a probe set
  (:mod:`.self_positioning`).
"""

from tokenlab.merging.checkpoint import Checkpoint, merge_checkpoints
from tokenlab.merging.mergekit import from_mergekit
from tokenlab.merging.methods import (
    MergeInputs,
    breadcrumbs,
    breadcrumbs_ties,
    combine_,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    draw_masks,
    elect_sign,
    keep_bands_,
    l1_rescaled,
    linear,
    magnitude_bands,
    magnitude_prune,
    magprune_probabilities,
    merge_state_dicts,
    merge_task_vectors,
    merge_tensors,
    model_stock,
    model_stock_ratio,
    slerp,
    task_arithmetic,
    tensor_generator,
    ties,
    weight_,
)
from tokenlab.merging.recipe import load_recipe, merge_from_recipe
from tokenlab.merging.registry import MERGE_METHODS, Mergekit, Param, register_merge_method
from tokenlab.merging.self_positioning import SelfPositioningResult, probe_loss, self_positioning
from tokenlab.merging.settings import TensorSetting, layer_positions

__all__ = [
    "MERGE_METHODS",
    "Checkpoint",
    "MergeInputs",
    "Mergekit",
    "Param",
    "SelfPositioningResult",
    "TensorSetting",
    "breadcrumbs",
    "breadcrumbs_ties",
    "combine_",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "draw_masks",
    "elect_sign",
    "from_mergekit",
    "keep_bands_",
    "l1_rescaled",
    "layer_positions",
    "linear",
    "load_recipe",
    "magnitude_bands",
    "magnitude_prune",
    "magprune_probabilities",
    "merge_checkpoints",
    "merge_from_recipe",
    "merge_state_dicts",
    "merge_task_vectors",
    "merge_tensors",
    "model_stock",
    "model_stock_ratio",
    "probe_loss",
    "register_merge_method",
    "self_positioning",
    "slerp",
    "task_arithmetic",
    "tensor_generator",
    "ties",
    "weight_",
]
