"""Benchmark: streaming checkpoint merges (TIES, DARE-TIES) — wall time and peak RSS, vs mergekit.

    python benchmarks/merging.py            # base + 3 fine-tunes of a ~160 M-param Llama (~320 MB bf16 each)
    python benchmarks/merging.py --quick    # tiny checkpoints; checks checkpoint merge == in-memory merge

The benchmark writes random checkpoints of a realistic Llama layout (bf16, sharded safetensors) into
a temporary directory, then runs each merge in a fresh subprocess (``python -m tokenlab.merging``
with a YAML recipe) that reports its own peak resident set size (``VmHWM``).
"RSS above import" subtracts the peak RSS of a process that only imports the tool. mergekit runs on
the same inputs when it is installed in the private venv ``/tmp/venv-merge`` (``mergekit-yaml``);
otherwise the output says so. The issue's goals: peak RSS ≤ 1.5× one input checkpoint for a 3-way
merge, time ≤ mergekit's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

import harness
from tokenlab.merging import merge_from_recipe, merge_state_dicts
from tokenlab.merging.checkpoint import plan_shards

MERGEKIT = Path("/tmp/venv-merge/bin/mergekit-yaml")
SRC = Path(__file__).resolve().parent.parent / "src"
METHODS = {"ties": {"density": 0.5}, "dare_ties": {"density": 0.5}}


def llama_config(quick: bool) -> LlamaConfig:
    if quick:
        config = LlamaConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=176, tie_word_embeddings=False,
        )  # fmt: skip
    else:
        config = LlamaConfig(
            vocab_size=32_000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=8, intermediate_size=2816, tie_word_embeddings=False,
        )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    return config


def llama_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of ``LlamaForCausalLM`` (the Hugging Face layout)."""
    h, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (c.intermediate_size, h),
            p + "mlp.up_proj.weight": (c.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, c.intermediate_size),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (c.vocab_size, h)}


def write_checkpoint(
    path: Path, config: LlamaConfig, seed: int, base_seed: int | None, shard_bytes: int
) -> int:
    """Random bf16 weights (``base_seed`` given: that base plus 10 % noise), sharded; returns bytes."""
    from tokenlab.merging.checkpoint import TensorInfo

    path.mkdir(parents=True)
    config.save_pretrained(path)
    shapes = llama_shapes(config)
    infos = {k: TensorInfo(path, "BF16", s) for k, s in shapes.items()}
    shards = plan_shards(infos, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(names, shards):
        tensors = {}
        for k in shard:
            g = torch.Generator().manual_seed(
                zlib.crc32(f"{seed if base_seed is None else base_seed}/{k}".encode())
            )
            t = torch.randn(shapes[k], generator=g) * 0.02
            if base_seed is not None:
                noise = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{k}".encode()))
                t += 0.1 * 0.02 * torch.randn(shapes[k], generator=noise)
            tensors[k] = t.to(torch.bfloat16)
        save_file(tensors, str(path / file), metadata={"format": "pt"})
    total = sum(i.nbytes for i in infos.values())
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: f for f, s in zip(names, shards) for k in s},
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


# Runs a module (``module:NAME``), a script (``path:FILE``) or an import (``import:NAME``) and prints
# the process's own peak RSS (VmHWM: per address space, so not inflated by the forking parent, as
# ru_maxrss of a child can be).
MEASURE = """
import importlib, runpy, sys
kind, _, target = sys.argv[1].partition(":")
sys.argv = [target, *sys.argv[2:]]
try:
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif kind == "path":
        runpy.run_path(target, run_name="__main__")
    else:
        importlib.import_module(target)
except SystemExit as e:
    if e.code not in (0, None):
        raise
finally:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print("VMHWM_KB", hwm.split()[1], flush=True)
"""


def run_measured(python: str, target: str, args: list[str], env: dict) -> tuple[float, int]:
    """Run ``target`` under ``python``; return its wall time (s) and peak RSS (bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.run([python, "-c", MEASURE, target, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{target} {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    kb = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("VMHWM_KB")]
    return wall, int(kb[-1]) * 1024


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main() -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args()
    device = torch.device("cpu")  # merges stream through the CPU
    config = llama_config(args.quick)
    shard_bytes = 200_000 if args.quick else 200_000_000
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    have_mergekit = MERGEKIT.exists() and not args.quick
    rows = []
    with tempfile.TemporaryDirectory(prefix="tokenlab-merge-bench-") as tmp:
        root = Path(tmp)
        size = write_checkpoint(root / "base", config, 0, None, shard_bytes)
        fts = [root / f"ft{i}" for i in range(3)]
        for i, d in enumerate(fts):
            write_checkpoint(d, config, i + 1, 0, shard_bytes)
        print(
            f"4 checkpoints of {size / 1e6:.1f} MB each (bf16, {len(llama_shapes(config))} tensors) in {root}"
        )
        # --quick merges in this process (harness.peak_memory: RSS above the level before the call)
        import_rss = {
            "tokenlab": 0
            if args.quick
            else run_measured(sys.executable, "import:tokenlab.merging", [], env)[1]
        }
        if have_mergekit:
            mk_py = str(MERGEKIT.parent / "python")
            import_rss["mergekit"] = run_measured(mk_py, "import:mergekit.scripts.run_yaml", [], env)[1]
        for method, params in METHODS.items():
            out = root / f"out-tokenlab-{method}"
            recipe = {"method": method, "base": "base", "models": [d.name for d in fts], "parameters": params}
            recipe |= {"seed": 0, "max_shard_size": shard_bytes}
            (root / f"{method}.yaml").write_text(yaml.safe_dump(recipe))
            cmd = [str(root / f"{method}.yaml"), "--out", str(out), "--no-progress"]
            if args.quick:
                t0 = time.perf_counter()
                recipe_file = root / f"{method}.yaml"
                rss = harness.peak_memory(
                    lambda r=recipe_file, o=out: merge_from_recipe(r, o, progress=False), device
                )
                wall = time.perf_counter() - t0
            else:
                wall, rss = run_measured(sys.executable, "module:tokenlab.merging", cmd, env)
            row = {"method": method, "tool": "tokenlab", "wall_s": wall, "peak_rss_MB": rss / 1e6}
            row |= {"rss_above_import_MB": (rss - import_rss["tokenlab"]) / 1e6, "ckpt_MB": size / 1e6}
            row["rss_above_import/ckpt"] = (rss - import_rss["tokenlab"]) / size
            if args.quick:  # the streamed checkpoint equals the in-memory merge, tensor for tensor
                expected = merge_state_dicts(
                    method, load_dir(root / "base"), [load_dir(d) for d in fts], seed=0, **params
                )
                got = load_dir(out)
                assert got.keys() == expected.keys()
                for k in expected:
                    assert torch.equal(got[k], expected[k]), f"{method}: {k} differs from the in-memory merge"
                row["equal_in_memory"] = True
            rows.append(row)
            print(row, flush=True)
            if have_mergekit:
                mk_out = root / f"out-mergekit-{method}"
                mk = {
                    "merge_method": method,
                    "base_model": str(root / "base"),
                    "models": [{"model": str(d), "parameters": {"weight": 1.0, **params}} for d in fts],
                    "parameters": {"normalize": True},
                    "dtype": "bfloat16",
                }
                (root / f"{method}-mergekit.yaml").write_text(yaml.safe_dump(mk))
                mk_cmd = [str(root / f"{method}-mergekit.yaml"), str(mk_out), "--quiet", "--no-cuda"]
                mk_cmd += ["--random-seed", "0", "--out-shard-size", f"{shard_bytes // 2}"]
                wall_mk, rss_mk = run_measured(mk_py, f"path:{MERGEKIT}", mk_cmd, env)
                mk_row = {
                    "method": method,
                    "tool": "mergekit",
                    "wall_s": wall_mk,
                    "peak_rss_MB": rss_mk / 1e6,
                }
                mk_row |= {
                    "rss_above_import_MB": (rss_mk - import_rss["mergekit"]) / 1e6,
                    "ckpt_MB": size / 1e6,
                }
                mk_row["rss_above_import/ckpt"] = (rss_mk - import_rss["mergekit"]) / size
                if method == "ties":  # same formula (weights 1, normalize = disjoint mean): compare outputs
                    ours, theirs, base = load_dir(out), load_dir(mk_out), load_dir(root / "base")
                    diff = sum((ours[k].double() - theirs[k].double()).square().sum() for k in ours)
                    ref = sum((theirs[k].double() - base[k].double()).square().sum() for k in ours)
                    mk_row["rel_diff_of_delta_vs_tokenlab"] = float((diff / ref).sqrt())
                row["speedup_vs_mergekit"] = wall_mk / wall
                rows.append(mk_row)
                print(mk_row, flush=True)
    if not have_mergekit:
        why = "skipped in --quick mode" if args.quick else f"not installed ({MERGEKIT} missing)"
        print(f"mergekit: {why}")
    if not args.quick:
        rss_line = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in import_rss.items())
        print(f"peak RSS of an import-only process: {rss_line}")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    harness.print_table(rows, columns)
    harness.finish(args, device, "merging", rows)


if __name__ == "__main__":
    main()
