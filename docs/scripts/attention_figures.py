"""Render the attention-sink figures of docs/attention.md (and, given a benchmark record, the loss
figure of docs/benchmarks.md) into docs/images/.

    PYTHONPATH=src python docs/scripts/attention_figures.py [--kv-cache-record kv_cache.json]

The analysis runs the default toy world's target on a held-out window of 64 tokens that starts with
the BOS token; the record is the ``--out`` JSON of ``benchmarks/kv_cache.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch

from tokenlab.attention import analyze_sinks, attention_map
from tokenlab.attention.plots import plot_attention_map, plot_residual_norms, plot_sink_scores
from tokenlab.tour.toy import load_toy_world

IMAGES = Path(__file__).resolve().parent.parent / "images"


def sink_figures() -> None:
    world = load_toy_world("default", device="cpu", progress=False)
    bos = torch.tensor([world.tokenizer.bos_token_id])
    ids = torch.cat([bos, world.heldout_ids[:63]])[None]
    analysis = analyze_sinks(world.target, ids)
    print("sink scores (layers × heads):\n", analysis.sink_scores[0].numpy().round(3))
    print(
        "sink rate",
        analysis.sink_rate,
        "residual peak ratio",
        analysis.residual_peak_ratio[0].numpy().round(2),
    )
    plot_sink_scores(analysis).figure.savefig(IMAGES / "attention_sink_scores.png", dpi=120)
    layer, head = divmod(int(analysis.sink_scores[0].argmax()), analysis.sink_scores.shape[-1])
    tokens = [world.tokenizer.decode([t]).replace("\n", "⏎") for t in ids[0, :24].tolist()]
    ax = plot_attention_map(attention_map(world.target, ids[:, :24], layer, head)[0], tokens=tokens)
    ax.set_title(f"layer {layer}, head {head}: attention probabilities")
    ax.figure.savefig(IMAGES / "attention_map.png", dpi=120)
    plot_residual_norms(analysis).figure.savefig(IMAGES / "attention_residual_norms.png", dpi=120)


def kv_cache_figure(record: Path) -> None:
    rows = [r for r in json.loads(record.read_text())["results"] if r["part"] == "loss"]
    dense = next(r["loss"] for r in rows if r["budget"] is None)
    fig, ax = plt.subplots(figsize=(6.0, 3.6), layout="constrained")
    for name in dict.fromkeys(r["cache"] for r in rows if r["budget"] is not None):
        points = sorted((r["budget"], r["loss"]) for r in rows if r["cache"] == name)
        ax.plot(*zip(*points), marker="o", label=name)
    ax.axhline(dense, color="black", linestyle="--", label="dense (DynamicCache)")
    ax.set(xlabel="cache budget (tokens per layer)", ylabel="held-out loss (nats/token)")
    ax.set_xticks([64, 128, 256])
    ax.set_title("streaming loss on held-out stdlib tokens (toy target)")
    ax.legend(fontsize="small")
    fig.savefig(IMAGES / "kv_cache_loss.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-cache-record", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    IMAGES.mkdir(exist_ok=True)
    sink_figures()
    if args.kv_cache_record is not None:
        kv_cache_figure(args.kv_cache_record)


if __name__ == "__main__":
    main()
