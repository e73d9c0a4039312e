"""Merge recipes as YAML or JSON files, and the command line behind ``python -m tokenlab.merging``.

A recipe names the method, the base, the fine-tuned models (a path, or a path and a weight), the
method's parameters and, optionally, the output directory, seed and shard size::

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

Relative paths are resolved against the recipe file's directory.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from tokenlab.merging.checkpoint import merge_checkpoints
from tokenlab.merging.methods import MERGE_METHODS

RECIPE_KEYS = frozenset({"method", "base", "models", "parameters", "seed", "max_shard_size", "out"})


def _model_entry(entry, i: int) -> tuple[str, float | None]:
    if isinstance(entry, (str, os.PathLike)):
        return str(entry), None
    if isinstance(entry, Mapping) and "path" in entry and set(entry) <= {"path", "weight"}:
        return str(entry["path"]), entry.get("weight")
    raise ValueError(f"recipe `models[{i}]` must be a path or {{path: ..., weight: ...}}, got {entry!r}")


def load_recipe(source: str | os.PathLike | Mapping) -> dict:
    """Read a recipe (a ``.yaml``/``.yml``/``.json`` file, or a mapping) and check its fields.

    Returns a dict with ``method``, ``base``, ``models`` (paths), ``weights`` (list or ``None``),
    ``parameters``, ``seed``, ``max_shard_size`` and ``out`` (or ``None``).
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
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise ValueError(f"recipe has unknown key(s) {unknown}; allowed: {sorted(RECIPE_KEYS)}")
    for key in ("method", "base", "models"):
        if key not in recipe:
            raise ValueError(f"recipe is missing `{key}`")
    if recipe["method"] not in MERGE_METHODS:
        raise ValueError(
            f"recipe `method` {recipe['method']!r} is unknown; available: {sorted(MERGE_METHODS)}"
        )
    if not isinstance(recipe["models"], list) or not recipe["models"]:
        raise ValueError("recipe `models` must be a non-empty list")
    entries = [_model_entry(e, i) for i, e in enumerate(recipe["models"])]
    weights = [w for _, w in entries]
    params = recipe.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"recipe `parameters` must be a mapping, got {params!r}")
    out = recipe.get("out")
    return {
        "method": recipe["method"],
        "base": root / recipe["base"],
        "models": [root / p for p, _ in entries],
        "weights": None if all(w is None for w in weights) else [1.0 if w is None else w for w in weights],
        "parameters": dict(params),
        "seed": recipe.get("seed", 0),
        "max_shard_size": recipe.get("max_shard_size", "5GB"),
        "out": None if out is None else root / out,
    }


def merge_from_recipe(
    source: str | os.PathLike | Mapping,
    out_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run :func:`~tokenlab.merging.merge_checkpoints` as a recipe says (``out_dir`` overrides ``out``)."""
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
        seed=r["seed"],
        max_shard_size=r["max_shard_size"],
        overwrite=overwrite,
        progress=progress,
        **r["parameters"],
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m tokenlab.merging RECIPE [--out DIR] [--overwrite]``, or the recipe as flags."""
    p = argparse.ArgumentParser(
        prog="python -m tokenlab.merging",
        description="Merge Hugging Face safetensors checkpoints tensor by tensor.",
    )
    p.add_argument("recipe", nargs="?", help="YAML or JSON recipe file")
    p.add_argument("--out", help="output directory (overrides the recipe's `out`)")
    p.add_argument("--method", choices=sorted(MERGE_METHODS), help="merge method (without a recipe)")
    p.add_argument("--base", help="base model directory (without a recipe)")
    p.add_argument("--models", nargs="+", help="fine-tuned model directories (without a recipe)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per model")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="e.g. density=0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.recipe is not None:
        if args.method or args.base or args.models:
            p.error("give either a recipe file or --method/--base/--models, not both")
        source = args.recipe
    else:
        if not (args.method and args.base and args.models):
            p.error("without a recipe file, --method, --base and --models are required")
        params = {}
        for item in args.param:
            key, sep, value = item.partition("=")
            if not sep:
                p.error(f"--param must be KEY=VALUE, got {item!r}")
            params[key] = yaml.safe_load(value)
        models = args.models
        if args.weights is not None:
            if len(args.weights) != len(models):
                p.error(f"--weights needs one value per model ({len(models)})")
            models = [{"path": m, "weight": w} for m, w in zip(models, args.weights)]
        source = {
            "method": args.method,
            "base": args.base,
            "models": models,
            "parameters": params,
            "seed": args.seed,
            "max_shard_size": args.max_shard_size,
        }
    out = merge_from_recipe(source, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"merged model written to {out}")
