"""Merging: task arithmetic, TIES, DARE, SLERP, magnitude pruning and Self-Positioning behind one
registry, and streaming merges of Hugging Face checkpoints (catalogue section M).

* :func:`merge_tensors` — one tensor, any method of :data:`MERGE_METHODS`;
* :func:`merge_state_dicts` — whole state dicts in memory;
* :func:`merge_checkpoints` — safetensors directories, one tensor at a time, atomic output;
  :func:`merge_from_recipe` / ``python -m tokenlab.merging recipe.yaml`` — the same from a YAML/JSON recipe;
* :func:`self_positioning` — task-vector coefficients learned by SGD on a probe set.
"""

from tokenlab.merging.checkpoint import Checkpoint, merge_checkpoints
from tokenlab.merging.config import load_recipe, merge_from_recipe
from tokenlab.merging.methods import (
    MERGE_METHODS,
    MergeInputs,
    dare_linear,
    dare_masks,
    dare_ties,
    disjoint_mean_,
    drop_and_rescale_,
    elect_sign,
    magnitude_prune,
    magnitude_thresholds,
    merge_state_dicts,
    merge_tensors,
    register_merge_method,
    slerp,
    task_arithmetic,
    tensor_generator,
    ties,
    trim_,
    weight_,
)
from tokenlab.merging.self_positioning import SelfPositioningResult, probe_loss, self_positioning

__all__ = [
    "MERGE_METHODS",
    "Checkpoint",
    "MergeInputs",
    "SelfPositioningResult",
    "dare_linear",
    "dare_masks",
    "dare_ties",
    "disjoint_mean_",
    "drop_and_rescale_",
    "elect_sign",
    "load_recipe",
    "magnitude_prune",
    "magnitude_thresholds",
    "merge_checkpoints",
    "merge_from_recipe",
    "merge_state_dicts",
    "merge_tensors",
    "probe_loss",
    "register_merge_method",
    "self_positioning",
    "slerp",
    "task_arithmetic",
    "tensor_generator",
    "ties",
    "trim_",
    "weight_",
]
