"""Benchmark: CAD / AdaCAD overhead over plain ``generate``.

    python benchmarks/context_aware.py            # toy world ("gpu" preset on GPU, "default" on CPU)
    python benchmarks/context_aware.py --quick    # "tiny" world, short runs, checks equivalences

Greedy generation of ``N`` tokens from ``B ∈ {1, 8}`` held-out prompts (context = a window of the
held-out corpus, query = its last ``Q`` tokens), tokens/s (median of ``--repeats`` runs after a
warm-up; default 3, 1 with ``--quick``) of:

* plain ``generate`` on the contextual prompts (the reference: one forward per token);
* ``generate`` + :class:`ContextAwareLogitsProcessor` (CAD) and :class:`AdaCADLogitsProcessor` — the
  processor's context-free stream has its own KV cache: two forwards per token (goal ≤ 2.2× plain);
* ``generate`` + a naive CAD processor that re-runs the whole context-free prefix every step (no
  cache: what a processor without its own stream must do);
* ``generate`` + HF's ``UnbatchedClassifierFreeGuidanceLogitsProcessor`` with guidance ``1 + α``
  (the same contrast; cached but unbatched, so B = 1 only);
* tokenlab's plain loop ``context_aware_generate``.

Every CAD variant's output is checked to equal the cached processor's (greedy, token for token).
"""

from __future__ import annotations

import harness

harness.enable_interpreter_if_cpu()

import torch  # noqa: E402
from transformers import LogitsProcessor, UnbatchedClassifierFreeGuidanceLogitsProcessor  # noqa: E402

from tokenlab.decoding import (  # noqa: E402
    AdaCADLogitsProcessor,
    ContextAwareLogitsProcessor,
    context_aware_generate,
)
from tokenlab.tour.toy import load_toy_world  # noqa: E402

ALPHA = 1.0


class NaiveCAD(LogitsProcessor):
    """CAD without a cache: every step re-encodes the context-free prompt and all generated tokens."""

    def __init__(self, model, ids, mask, prompt_length):
        self.model, self.ids, self.mask, self.prompt_length = model, ids, mask, prompt_length

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_length :]
        ids = torch.cat([self.ids, generated], dim=1)
        mask = torch.nn.functional.pad(self.mask, (0, generated.shape[1]), value=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        free = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
        logp_c, logp_q = scores.log_softmax(-1), free[:, -1].float().log_softmax(-1)
        return ((1 + ALPHA) * logp_c - ALPHA * logp_q).log_softmax(-1)


def prompts(world, batch: int, context_len: int, query_len: int, device, seed: int):
    """``batch`` held-out windows of ``context_len`` tokens and their last ``query_len`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, world.heldout_ids.numel() - context_len, (batch,), generator=gen).tolist()
    context = torch.stack([world.heldout_ids[s : s + context_len] for s in starts]).to(device)
    return context, context[:, -query_len:].clone()


def runs(model, context, query, new: int, pad: int) -> dict:
    """The timed variants for one batch of prompts (``generate`` calls and the plain loop)."""
    common = dict(max_new_tokens=new, do_sample=False, pad_token_id=pad, eos_token_id=[])

    def generate(processors):
        return model.generate(input_ids=context, logits_processor=processors, **common)

    variants = {
        "plain generate": lambda: generate([]),
        "CAD processor": lambda: generate([ContextAwareLogitsProcessor(model, query, alpha=ALPHA)]),
        "AdaCAD processor": lambda: generate([AdaCADLogitsProcessor(model, query)]),
        "naive CAD (no cache)": lambda: generate(
            [NaiveCAD(model, query, torch.ones_like(query), context.shape[1])]
        ),
        "context_aware_generate (loop)": lambda: (
            context_aware_generate(
                model, context, query, alpha=ALPHA, max_new_tokens=new, pad_token_id=pad, eos_token_id=[]
            ).sequences
        ),
    }
    if context.shape[0] == 1:
        cfg = UnbatchedClassifierFreeGuidanceLogitsProcessor
        variants["HF unbatched CFG"] = lambda: generate([cfg(1 + ALPHA, model, unconditional_ids=query)])
    return variants


@torch.no_grad()
def bench(args, device, repeats: int) -> list[dict]:
    preset = "tiny" if args.quick else ("gpu" if device.type == "cuda" else "default")
    world = load_toy_world(preset, device=device, progress=not args.quick)
    model, pad = world.target, world.tokenizer.pad_token_id
    context_len, query_len, new = (24, 6, 8) if args.quick else (96, 16, 64)
    rows = []
    for batch in (1, 8):
        context, query = prompts(world, batch, context_len, query_len, device, seed=batch)
        variants = runs(model, context, query, new, pad)
        outputs = {name: fn() for name, fn in variants.items()}  # also the warm-up
        for name in ("naive CAD (no cache)", "context_aware_generate (loop)", "HF unbatched CFG"):
            if name in outputs:
                assert torch.equal(outputs[name], outputs["CAD processor"]), (
                    f"{name} != CAD processor (B={batch})"
                )
        seconds = {
            name: harness.time_fn(fn, device, warmup=0, repeats=repeats) / 1e3
            for name, fn in variants.items()
        }
        plain = seconds["plain generate"]
        for name, s in seconds.items():
            rows.append({"B": batch, "method": name, "tokens/s": batch * new / s, "time_vs_plain": s / plain})
    return rows


def main() -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args()
    device = harness.device_from(args)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: one intra-op thread is fastest and steadiest
    rows = bench(args, device, args.repeats or (1 if args.quick else 3))
    harness.print_table(rows, ["B", "method", "tokens/s", "time_vs_plain"])
    harness.finish(args, device, "context_aware", rows)


if __name__ == "__main__":
    main()
