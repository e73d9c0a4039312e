"""The command line: ``python -m tokenlab.merging RECIPE [OUT] [--overwrite]`` (a tokenlab recipe or a
mergekit config, as ``mergekit-yaml CONFIG OUT`` takes it), or the recipe given as flags
(``--method``, ``--base``, ``--models``, ``--weights``, ``--param KEY=VALUE`` …). The help lists every
registered method with its declared parameters."""

from __future__ import annotations

import argparse

import yaml

from tokenlab.merging.recipe import merge_from_recipe
from tokenlab.merging.registry import MERGE_METHODS


def methods_help() -> str:
    """One paragraph per registered method: its paper, model-count rule and declared parameters
    (tensor-only ones, which a recipe cannot hold, left out)."""
    lines = ["merge methods and their --param parameters:"]
    for name, method in sorted(MERGE_METHODS.items()):
        mergekit = ", a mergekit merge_method too" if method.mergekit is not None else ""
        lines.append(f"  {name}  ({method.paper}{mergekit})")
        if (method.min_models, method.max_models) != (1, None) or not method.weighted or not method.uses_base:
            weights = "" if method.weighted else ", no --weights"
            layout = "" if method.uses_base else " (the base gives only the layout)"
            lines.append(f"      takes {method.model_count} fine-tuned model(s){weights}{layout}")
        for p in method.params:
            if not p.tensor_only:
                default = "required" if p.required else f"default {p.default!r}"
                lines.append(f"      {p.name} ({default}{', per model' if p.per_model else ''}): {p.doc}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m tokenlab.merging RECIPE [OUT] [--overwrite]``, or the recipe as flags."""
    p = argparse.ArgumentParser(
        prog="python -m tokenlab.merging",
        description="Merge Hugging Face safetensors checkpoints tensor by tensor.",
        epilog=methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", nargs="?", help="YAML or JSON recipe file, or a mergekit config")
    p.add_argument("out_dir", nargs="?", help="output directory (as mergekit-yaml takes it; or --out)")
    p.add_argument("--out", help="output directory (overrides the recipe's `out`)")
    p.add_argument("--method", choices=sorted(MERGE_METHODS), help="merge method (without a recipe)")
    p.add_argument("--base", help="base model directory (without a recipe)")
    p.add_argument("--models", nargs="+", help="fine-tuned model directories (without a recipe)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per model")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="e.g. density=0.5")
    p.add_argument("--seed", "--random-seed", type=int, default=None, help="seeds random masks (default 0)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.out_dir is not None and args.out is not None:
        p.error("give the output directory once: OUT or --out")
    out_dir = args.out if args.out is not None else args.out_dir
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
            "max_shard_size": args.max_shard_size,
        }
    out = merge_from_recipe(
        source, out_dir, seed=args.seed, overwrite=args.overwrite, progress=not args.no_progress
    )
    print(f"merged model written to {out}")
