"""Merging: task arithmetic, magnitude pruning, TIES, DARE (linear and TIES) and SLERP behind one
registry, streaming merges of Hugging Face checkpoints, and Self-Positioning.

* :func:`merge_tensors` — one tensor, any method of :data:`MERGE_METHODS` (:mod:`.methods`; each
  method declares its parameters with :class:`Param` in :func:`register_merge_method`, :mod:`.registry`);
* :func:`merge_state_dicts` — whole state dicts in memory;
* :func:`merge_checkpoints` — safetensors directories, one tensor at a time, atomic output
  (:mod:`.checkpoint`); :func:`merge_from_recipe` — the same from a YAML/JSON recipe (:mod:`.recipe`);
  ``python -m tokenlab.merging`` — the command line (:mod:`.cli`);
* :func:`self_positioning` — task-vector coefficients learned by SGD on a probe set
  (:mod:`.self_positioning`).
"""

from tokenlab.merging.checkpoint import Checkpoint, merge_checkpoints
from tokenlab.merging.methods import (
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
    slerp,
    task_arithmetic,
    tensor_generator,
    ties,
    trim_,
    weight_,
)
from tokenlab.merging.recipe import load_recipe, merge_from_recipe
from tokenlab.merging.registry import MERGE_METHODS, Param, register_merge_method
from tokenlab.merging.self_positioning import SelfPositioningResult, probe_loss, self_positioning

__all__ = [
    "MERGE_METHODS",
    "Checkpoint",
    "MergeInputs",
    "Param",
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
