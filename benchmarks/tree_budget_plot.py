"""Plot: tokens per target call against the node budget, chain vs static / RSD / DySpec token trees.

    python benchmarks/tree_budget_plot.py            # the 'default' toy pair → docs/token_tree_budget.png
    python benchmarks/tree_budget_plot.py --quick    # the 'tiny' pair, budgets 2 and 4; renders in memory

Runs :func:`speculative.tokens_per_call_by_budget` (16 held-out prompts × 64 new tokens, greedy, and
sampled at temperature 1 with three seeds pooled) at node budgets 4, 8, 16 and 32 under the
equal-budget rule of ``benchmarks/speculative.py`` (``BUDGET_RULE``), prints the table and draws one
panel per decoding mode. Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import harness

harness.enable_interpreter_if_cpu()

import torch  # noqa: E402

from speculative import BUDGET_RULE, tokens_per_call_by_budget  # noqa: E402
from tokenlab.tour.toy import load_toy_world  # noqa: E402

DEFAULT_PNG = Path(__file__).resolve().parent.parent / "docs" / "token_tree_budget.png"
STYLES = {"chain": "k--o", "static": "C0-s", "rsd": "C1-^", "dyspec": "C2-D"}


def plot(rows: list[dict], title: str, target) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decodings = list(dict.fromkeys(r["decoding"] for r in rows))
    fig, axes = plt.subplots(1, len(decodings), figsize=(5 * len(decodings), 3.8), sharey=True)
    for ax, decoding in zip(axes, decodings):
        for mode, style in STYLES.items():
            points = [
                (r["budget"], r["tokens/call"])
                for r in rows
                if r["decoding"] == decoding and r["mode"] == mode
            ]
            ax.plot(*zip(*points), style, label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(
            sorted({r["budget"] for r in rows}), [str(b) for b in sorted({r["budget"] for r in rows})]
        )
        ax.set_xlabel("node budget N (draft tokens scored per target call)")
        ax.set_title(decoding)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("tokens per target call")
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def main() -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--png", type=Path, default=None, help=f"where to save the figure (default {DEFAULT_PNG})")
    args = p.parse_args()
    device = harness.device_from(args)
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)
    preset = "tiny" if args.quick else "default"
    world = load_toy_world(preset, device=device, progress=not args.quick)
    budgets, n_prompts, max_new = ((2, 4), 2, 8) if args.quick else ((4, 8, 16, 32), 16, 64)
    seeds = (0,) if args.quick else (0, 1, 2)
    rows = tokens_per_call_by_budget(
        world, device, budgets, n_prompts=n_prompts, max_new=max_new, seeds=seeds
    )
    harness.print_table(rows, list(rows[0]))
    title = (
        f"toy pair '{preset}', {n_prompts} prompts × {max_new} tokens (sampling: {len(seeds)} seeds pooled); "
        f"{BUDGET_RULE}"
    )
    png = args.png or (None if args.quick else DEFAULT_PNG)
    plot(rows, textwrap.fill(title, 140), png or io.BytesIO())
    if png is not None:
        print(f"saved {png}")
    harness.finish(args, device, "tree_budget_plot", rows)


if __name__ == "__main__":
    main()
