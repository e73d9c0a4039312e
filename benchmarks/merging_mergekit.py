"""Peer check: tokenlab and mergekit run the same mergekit configs — every method both tools share.

    python benchmarks/merging_mergekit.py            # mergekit from the private venv /tmp/venv-merge
    python benchmarks/merging_mergekit.py --quick    # tokenlab only: checkpoint == in-memory merge

Writes a small float32 Llama base and three fine-tunes (base + a shared update + each its own), then
for each config below runs ``mergekit-yaml CONFIG OUT --random-seed 0`` (in mergekit's own venv, a
subprocess) and tokenlab's ``merge_from_recipe(CONFIG, OUT)`` on the unchanged file, and compares
the outputs tensor by tensor: the largest relative difference ``‖ours − mergekit‖ / ‖mergekit‖``
over tensors, and the same relative to mergekit's merged task vector ``‖ours − mergekit‖ /
‖mergekit − base‖``.

Random methods (DARE, DELLA) draw different masks in the two runs (mergekit seeds the global RNG
once, tokenlab one generator per tensor), so their end-to-end outputs are compared by statistics:
the fraction of entries the merge changed and the L1 norm of the merged task vector (ratio ours /
mergekit). Their exact check calls mergekit's own method (``mergekit.merge_methods.merge_tensors``)
on every tensor of the same checkpoints after ``torch.manual_seed(s)``, with ``s`` the seed of
tokenlab's per-tensor generator (:func:`tokenlab.merging.tensor_generator`): both then draw the
same masks, and the outputs are compared tensor by tensor as above.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import harness
from merging import MERGEKIT, load_dir
from tokenlab.merging import load_recipe, merge_from_recipe, merge_state_dicts, tensor_generator

SRC = Path(__file__).resolve().parent.parent / "src"
M = ["./models/ft0", "./models/ft1", "./models/ft2"]  # fine-tunes, relative to the config file
BASE = "./models/base"


def configs() -> dict[str, dict]:
    """One mergekit config per case: mergekit's own examples (``examples/*.yml``) where they exist,
    with their model names replaced by the local checkpoints, else the method guide's parameters."""

    def models(*entries):
        return [{"model": m, "parameters": p} if p else {"model": m} for m, p in entries]

    gta = {"merge_method": None, "base_model": BASE, "dtype": "float32"}
    return {
        # examples/linear.yml
        "linear": {
            "models": models((M[0], {"weight": 1.0}), (M[1], {"weight": 0.3}), (M[2], {"weight": 0.5})),
            "merge_method": "linear",
            "dtype": "float32",
        },
        # examples/gradient-slerp.yml (a whole-model slice; filters and gradients over the layers)
        "slerp": {
            "slices": [
                {"sources": [{"model": BASE, "layer_range": [0, 4]}, {"model": M[0], "layer_range": [0, 4]}]}
            ],
            "merge_method": "slerp",
            "base_model": BASE,
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float32",
        },
        "task_arithmetic": {
            **gta,
            "merge_method": "task_arithmetic",
            "models": models((M[0], {"weight": 0.5}), (M[1], {"weight": 0.3}), (M[2], {"weight": 0.2})),
            "parameters": {"lambda": 0.9},
        },
        # examples/ties.yml (density and weight gradients, a filtered weight)
        "ties": {
            **gta,
            "merge_method": "ties",
            "models": models(
                (M[0], {"density": [1, 0.7, 0.1], "weight": 1.0}),
                (M[1], {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}),
                (M[2], {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}),
            ),
            "parameters": {"normalize": True, "int8_mask": True},
        },
        # examples/bio-merge.yml (normalize: false)
        "ties (normalize: false)": {
            **gta,
            "merge_method": "ties",
            "models": models(
                (M[0], {"density": 0.5, "weight": 0.5}), (M[1], {"density": 0.5, "weight": 0.5})
            ),
            "parameters": {"normalize": False, "int8_mask": True},
        },
        "breadcrumbs": {
            **gta,
            "merge_method": "breadcrumbs",
            "models": models((M[0], {"weight": 0.6}), (M[1], {"weight": 0.4})),
            "parameters": {"density": 0.9, "gamma": 0.01},
        },
        "breadcrumbs_ties": {
            **gta,
            "merge_method": "breadcrumbs_ties",
            "models": models(*((m, {"weight": 1.0, "density": 0.8, "gamma": 0.05}) for m in M)),
            "parameters": {"normalize": True},
        },
        "model_stock": {**gta, "merge_method": "model_stock", "models": models(*((m, None) for m in M))},
        "model_stock (filter_wise)": {
            **gta,
            "merge_method": "model_stock",
            "models": models(*((m, None) for m in M)),
            "parameters": {"filter_wise": True},
        },
        # docs/multimerge.md's final stage
        "dare_ties": {
            **gta,
            "merge_method": "dare_ties",
            "models": models(
                (M[0], {"density": 0.6, "weight": 0.5}), (M[1], {"density": 0.8, "weight": 0.5})
            ),
        },
        "dare_linear": {
            **gta,
            "merge_method": "dare_linear",
            "models": models(
                (M[0], {"density": 0.5, "weight": 0.7}), (M[1], {"density": 0.5, "weight": 0.3})
            ),
        },
        "della": {
            **gta,
            "merge_method": "della",
            "models": models(*((m, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}) for m in M)),
            "parameters": {"lambda": 1.0},
        },
        "della_linear": {
            **gta,
            "merge_method": "della_linear",
            "models": models(
                (M[0], {"weight": 0.6, "density": 0.4, "epsilon": 0.2}),
                (M[1], {"weight": 0.4, "density": 0.6, "epsilon": 0.1}),
            ),
        },
    }


RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")

# Run in mergekit's venv: the random methods through mergekit's own method objects, tensor by
# tensor, with the global RNG seeded as tokenlab seeds that tensor's generator.
MERGEKIT_TENSORWISE = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from mergekit.merge_methods import merge_tensors
job = json.load(open(sys.argv[1]))
load = lambda d: {k: v for f in job["files"][d] for k, v in load_file(f).items()}
base, models = load("base"), [load(m) for m in job["models"]]
out = {}
for name, seed in job["seeds"].items():
    torch.manual_seed(seed)
    out[name] = merge_tensors([base[name]] + [m[name] for m in models], job["method"],
                              parameters=job["parameters"], base_index=0)
save_file(out, job["out"])
"""


def write_checkpoints(root: Path, quick: bool) -> None:
    config = LlamaConfig(
        vocab_size=256 if quick else 1024, hidden_size=32 if quick else 128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64 if quick else 352,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / BASE)
    state = base.state_dict()
    shared = {k: 0.01 * torch.randn_like(v) for k, v in state.items()}
    for i, path in enumerate(M):
        model = LlamaForCausalLM(config)
        g = torch.Generator().manual_seed(100 + i)
        model.load_state_dict(
            {k: v + shared[k] + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        )
        model.save_pretrained(root / path)


def relative_differences(ours: dict, theirs: dict, base: dict) -> tuple[float, float]:
    """Largest ``‖ours − theirs‖ / ‖theirs‖`` and ``‖ours − theirs‖ / ‖theirs − base‖`` over tensors."""
    rel, rel_delta = 0.0, 0.0
    for k, t in theirs.items():
        diff = (ours[k].double() - t.double()).norm()
        rel = max(rel, float(diff / t.double().norm().clamp(min=1e-30)))
        rel_delta = max(rel_delta, float(diff / (t.double() - base[k].double()).norm().clamp(min=1e-30)))
    return rel, rel_delta


def statistics(merged: dict, base: dict) -> tuple[float, float]:
    """Fraction of entries the merge changed, and the L1 norm of the merged task vector."""
    changed = sum(int((merged[k] != base[k]).sum()) for k in base)
    total = sum(v.numel() for v in base.values())
    return changed / total, sum(float((merged[k].double() - base[k].double()).abs().sum()) for k in base)


def mergekit_parameters(config: dict) -> dict:
    """mergekit API parameters of a plain config (scalars per model, as the random cases use)."""
    params = dict(config.get("parameters") or {})
    per_model: dict[str, list] = {}
    for entry in config["models"]:
        for k, v in (entry.get("parameters") or {}).items():
            per_model.setdefault(k, []).append(v)
    return params | per_model


def main() -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args()
    device = torch.device("cpu")  # merges stream through the CPU
    torch.set_num_threads(1)
    have_mergekit = MERGEKIT.exists() and not args.quick
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tokenlab-mergekit-peer-") as tmp:
        root = Path(tmp)
        write_checkpoints(root, args.quick)
        base = load_dir(root / BASE)
        for case, config in configs().items():
            file = root / f"{case.replace(' ', '_').replace(':', '')}.yml"
            file.write_text(yaml.safe_dump(config, sort_keys=False))
            ours_dir = merge_from_recipe(file, root / f"tokenlab-{file.stem}", progress=False)
            ours = load_dir(ours_dir)
            row = {"case": case, "method": config["merge_method"], "tensors": len(ours)}
            if args.quick:  # the streamed checkpoint equals the in-memory merge of the same recipe
                r = load_recipe(file)
                expected = merge_state_dicts(
                    r["method"], load_dir(r["base"]), [load_dir(m) for m in r["models"]], r["weights"],
                    seed=r["seed"], **r["parameters"],
                )  # fmt: skip
                assert all(torch.equal(ours[k], expected[k]) for k in expected), case
                row["equal_in_memory"] = True
            if have_mergekit:
                mk_dir = root / f"mergekit-{file.stem}"
                cmd = [str(MERGEKIT), str(file), str(mk_dir), "--random-seed", "0", "--quiet", "--no-cuda"]
                proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"mergekit failed on {case}:\n{(proc.stdout + proc.stderr)[-3000:]}")
                theirs = load_dir(mk_dir)
                if config["merge_method"] in RANDOM:
                    (f_ours, l1_ours), (f_mk, l1_mk) = statistics(ours, base), statistics(theirs, base)
                    row |= {"changed_tokenlab": f_ours, "changed_mergekit": f_mk, "l1_ratio": l1_ours / l1_mk}
                    job = {
                        "files": {"base": [str(f) for f in sorted((root / BASE).glob("*.safetensors"))]}
                        | {m: [str(f) for f in sorted((root / m).glob("*.safetensors"))] for m in M},
                        "models": [e["model"] for e in config["models"]],
                        "method": config["merge_method"],
                        "parameters": mergekit_parameters(config),
                        "seeds": {k: tensor_generator(0, k).initial_seed() for k in base},
                        "out": str(root / f"api-{file.stem}.safetensors"),
                    }
                    (root / "job.json").write_text(json.dumps(job))
                    mk_python = str(MERGEKIT.parent / "python")
                    proc = subprocess.run(
                        [mk_python, "-c", MERGEKIT_TENSORWISE, str(root / "job.json")],
                        cwd=root, env=env, capture_output=True, text=True,
                    )  # fmt: skip
                    if proc.returncode != 0:
                        raise RuntimeError(f"mergekit API failed on {case}:\n{proc.stderr[-3000:]}")
                    theirs = load_file(str(root / f"api-{file.stem}.safetensors"))
                    row["compared"] = "same masks (mergekit API)"
                else:
                    row["compared"] = "mergekit-yaml"
                rel, rel_delta = relative_differences(ours, theirs, base)
                row |= {"max_rel_diff": rel, "max_rel_diff_of_delta": rel_delta}
            rows.append(row)
            print(row, flush=True)
    if not have_mergekit:
        why = "skipped in --quick mode" if args.quick else f"not installed ({MERGEKIT} missing)"
        print(f"mergekit: {why}")
    harness.print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    harness.finish(args, device, "merging_mergekit", rows)


if __name__ == "__main__":
    main()
