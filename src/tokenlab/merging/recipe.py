"""Merge recipes: a YAML or JSON file (or a mapping) that names a checkpoint merge.

A recipe names the method, the base, the fine-tuned models (a path, or a path with a weight and
any per-model parameters of the method), the method's parameters and, optionally, the output
directory, seed and shard size::

    method: ties
    base: checkpoints/base
    models:
      - path: checkpoints/python-tuned
        weight: 1.0
      - checkpoints/docs-tuned          # weight 1
    parameters: {density: 0.5, majority_sign: total}
    seed: 0
    max_shard_size: 2GB
    out: merged/ties

Relative paths are resolved against the recipe file's directory; ``dtype`` (optional) is the output
dtype. :func:`load_recipe` reads and checks the recipe's structure; the values themselves are checked
by :func:`~tokenlab.merging.merge_checkpoints`, against the method's declared parameters. A file (or
mapping) with a ``merge_method`` key is a mergekit config, read by
:func:`~tokenlab.merging.mergekit.from_mergekit`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path

import yaml

from tokenlab.merging.checkpoint import merge_checkpoints
from tokenlab.merging.mergekit import from_mergekit
from tokenlab.merging.registry import REQUIRED, merge_method

RECIPE_KEYS = frozenset({"method", "base", "models", "parameters", "seed", "max_shard_size", "dtype", "out"})


def _model_entry(entry: object, i: int, per_model: Collection[str]) -> tuple[str, dict]:
    """``(path, {weight and per-model parameters given})`` of recipe ``models[i]``."""
    if isinstance(entry, (str, os.PathLike)):
        return str(entry), {}
    if isinstance(entry, Mapping) and "path" in entry and set(entry) <= {"path", "weight", *per_model}:
        return str(entry["path"]), {k: v for k, v in entry.items() if k != "path"}
    allowed = ", ".join(f"{k}: ..." for k in ("path", "weight", *per_model))
    raise ValueError(f"recipe `models[{i}]` must be a path or {{{allowed}}}, got {entry!r}")


def load_recipe(source: str | os.PathLike | Mapping) -> dict:
    """Read a recipe (a ``.yaml``/``.yml``/``.json`` file, or a mapping) and check its fields.

    Returns a dict with ``method``, ``base``, ``models`` (paths), ``weights`` (list or ``None``),
    ``parameters`` (per-model parameters given in ``models`` as lists of one value per model),
    ``seed``, ``max_shard_size``, ``dtype`` and ``out`` (or ``None``). A mergekit config (a
    ``merge_method`` key) is read by :func:`~tokenlab.merging.mergekit.from_mergekit`.
    """
    root = Path.cwd()
    if isinstance(source, Mapping):
        recipe = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
        text = path.read_text()
        recipe = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        root = path.resolve().parent
        if not isinstance(recipe, Mapping):
            raise ValueError(f"recipe file {str(path)!r} must hold a mapping, got {type(recipe).__name__}")
    if "merge_method" in recipe:
        return from_mergekit(recipe, root)
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise ValueError(f"recipe has unknown key(s) {unknown}; allowed: {sorted(RECIPE_KEYS)}")
    for key in ("method", "base", "models"):
        if key not in recipe:
            raise ValueError(f"recipe is missing `{key}`")
    method = merge_method(recipe["method"])
    if not isinstance(recipe["models"], list) or not recipe["models"]:
        raise ValueError("recipe `models` must be a non-empty list")
    per_model = {p.name: p for p in method.params if p.per_model}
    entries = [_model_entry(e, i, per_model) for i, e in enumerate(recipe["models"])]
    weights = [given.get("weight") for _, given in entries]
    params = recipe.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"recipe `parameters` must be a mapping, got {params!r}")
    params = dict(params)
    for name, param in per_model.items():
        if any(name in given for _, given in entries):
            fallback = params.get(name, param.default)
            if fallback is REQUIRED and not all(name in given for _, given in entries):
                raise ValueError(f"recipe: `{name}` is given for some models only, and not in `parameters`")
            params[name] = [given.get(name, fallback) for _, given in entries]
    out = recipe.get("out")
    return {
        "method": recipe["method"],
        "base": root / recipe["base"],
        "models": [root / p for p, _ in entries],
        "weights": None if all(w is None for w in weights) else [1.0 if w is None else w for w in weights],
        "parameters": params,
        "seed": recipe.get("seed", 0),
        "max_shard_size": recipe.get("max_shard_size", "5GB"),
        "dtype": recipe.get("dtype"),
        "out": None if out is None else root / out,
    }


def merge_from_recipe(
    source: str | os.PathLike | Mapping,
    out_dir: str | os.PathLike | None = None,
    *,
    seed: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run :func:`~tokenlab.merging.merge_checkpoints` as a recipe (or mergekit config) says;
    ``out_dir`` overrides its ``out``, ``seed`` its ``seed`` (mergekit configs hold none: 0)."""
    r = load_recipe(source)
    out = out_dir if out_dir is not None else r["out"]
    if out is None:
        raise ValueError("no output directory: give `out` in the recipe or `out_dir`")
    return merge_checkpoints(
        r["method"],
        r["base"],
        r["models"],
        out,
        r["weights"],
        seed=r["seed"] if seed is None else seed,
        max_shard_size=r["max_shard_size"],
        dtype=r["dtype"],
        overwrite=overwrite,
        progress=progress,
        **r["parameters"],
    )
