"""Benchmark: KV-cache policies in long generation on the toy target.

    python benchmarks/kv_cache.py            # 2,000 generated tokens, 1,024-token streams, budgets 64/128/256
    python benchmarks/kv_cache.py --quick    # tiny world and sizes; checks the caches against DynamicCache

(a) Long generation (greedy, ``generate``): tokens/s, KV-cache bytes held at the end and peak memory
    (CUDA allocator on GPU; sampled RSS above the pre-call level on CPU) of ``DynamicCache``,
    StreamingLLM's ``SinkCache`` and H2O's ``HeavyHitterCache``, with ratios to ``DynamicCache``.
    Every model runs the ``"tokenlab"`` attention (H2O reads its fused per-key scores; on CPU the
    reference computes them), so the comparison is one attention implementation under three caches.
(b) Held-out loss of a stream of held-out stdlib tokens, BOS first, fed one token at a time
    (StreamingLLM's protocol): the mean next-token cross-entropy with the dense cache and, at
    budgets 64/128/256, with a plain window (``SinkCache(sinks=0)``), sinks + window (4 sinks;
    re-rotated in-cache positions as in the paper, and original positions), and H2O (half heavy
    hitters, half recent).
    StreamingLLM's claim: sinks + window keep the loss where a plain window collapses.
"""

from __future__ import annotations

import harness

harness.enable_interpreter_if_cpu()

import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from tokenlab._hf import cache_kwargs  # noqa: E402
from tokenlab.attention import HeavyHitterCache, SinkCache, register_attention  # noqa: E402
from tokenlab.tour.toy import load_toy_world  # noqa: E402

SINKS = 4


def policies(model, budget: int) -> dict[str, object]:
    """Cache factories by name, at ``budget`` tokens per layer."""
    return {
        "window": lambda: SinkCache(model, budget, sinks=0),
        "sinks + window": lambda: SinkCache(model, budget, sinks=SINKS),
        "sinks + window (original positions)": lambda: SinkCache(
            model, budget, sinks=SINKS, positions="original"
        ),
        "H2O": lambda: HeavyHitterCache(model, budget),
    }


def cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def bench_generation(model, prompt, new_tokens, budget, device, quick) -> list[dict]:
    makers = {"DynamicCache": lambda: DynamicCache(config=model.config)}
    makers.update({k: v for k, v in policies(model, budget).items() if k in ("sinks + window", "H2O")})
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    rows, outputs = [], {}
    for name, make in makers.items():
        warm_up = {**kw, "max_new_tokens": 4, "min_new_tokens": 4}
        model.generate(prompt, **cache_kwargs(model, make()), **warm_up)
        result = {}

        def run(make=make, result=result):
            cache = make()
            start = time.perf_counter()
            result["out"] = model.generate(prompt, **cache_kwargs(model, cache), **kw)
            harness.synchronize(device)
            result["seconds"] = time.perf_counter() - start
            result["cache"] = cache

        peak = harness.peak_memory(run, device)
        outputs[name] = result["out"]
        held = max(layer.keys.shape[-2] for layer in result["cache"].layers)
        if name != "DynamicCache":
            assert held <= budget, f"{name} holds {held} > {budget} tokens"
        rows.append({
            "part": "generation", "cache": name, "budget": None if name == "DynamicCache" else budget,
            "new_tokens": new_tokens, "tokens_per_s": new_tokens / result["seconds"],
            "kv_MiB": cache_bytes(result["cache"]) / 2**20, "peak_MiB": peak / 2**20, "tokens_held": held,
        })  # fmt: skip
    base = rows[0]
    for row in rows:
        row["speed_vs_dynamic"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["kv_vs_dynamic"] = row["kv_MiB"] / base["kv_MiB"]
    if quick:  # a budget above the whole sequence evicts nothing: token-identical to DynamicCache
        total = prompt.shape[1] + new_tokens
        for make in (lambda: SinkCache(model, total), lambda: HeavyHitterCache(model, total)):
            out = model.generate(prompt, **cache_kwargs(model, make()), **kw)
            assert torch.equal(out, outputs["DynamicCache"])
    return rows


@torch.no_grad()
def stream_loss(model, stream: torch.Tensor, cache) -> torch.Tensor:
    """Next-token cross-entropy of every token of ``stream [T]`` after the first, fed one at a time."""
    nll = torch.empty(stream.numel() - 1)
    for t in range(stream.numel() - 1):
        logits = model(stream[None, t : t + 1], **cache_kwargs(model, cache), use_cache=True).logits[0, -1]
        nll[t] = F.cross_entropy(logits.float(), stream[t + 1])
    return nll


def bench_loss(model, stream, budgets, quick) -> list[dict]:
    dense = stream_loss(model, stream, DynamicCache(config=model.config))
    half = dense.numel() // 2
    rows = [{"part": "loss", "cache": "dense (DynamicCache)", "budget": None,
             "loss": dense.mean().item(), "loss_second_half": dense[half:].mean().item()}]  # fmt: skip
    for budget in budgets:
        for name, make in policies(model, budget).items():
            nll = stream_loss(model, stream, make())
            rows.append({"part": "loss", "cache": name, "budget": budget, "loss": nll.mean().item(),
                         "loss_second_half": nll[half:].mean().item()})  # fmt: skip
    for row in rows:
        row["loss_vs_dense"] = row["loss"] - rows[0]["loss"]
        assert math.isfinite(row["loss"]), row
    if quick:  # nothing evicted: the same losses as the dense cache
        full = stream.numel()
        for make in (lambda: SinkCache(model, full, sinks=0), lambda: HeavyHitterCache(model, full)):
            torch.testing.assert_close(stream_loss(model, stream, make()), dense, rtol=1e-5, atol=1e-5)
    return rows


def main() -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args()
    device = harness.device_from(args)
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(1)
    preset = "tiny" if args.quick else ("gpu" if device.type == "cuda" else "default")
    world = load_toy_world(preset, device=device, progress=not args.quick)
    model = world.target
    model.set_attn_implementation(register_attention())
    bos = torch.tensor([world.tokenizer.bos_token_id])
    heldout = torch.cat([bos, world.heldout_ids]).to(device)  # streams and prompts start with BOS
    prompt_len, new_tokens, gen_budget = (16, 32, 16) if args.quick else (64, 2000, 256)
    stream_len, budgets = (48, (16,)) if args.quick else (1024, (64, 128, 256))

    rows = bench_generation(model, heldout[None, :prompt_len], new_tokens, gen_budget, device, args.quick)
    harness.print_table(rows, ["cache", "budget", "new_tokens", "tokens_per_s", "speed_vs_dynamic", "kv_MiB",
                               "kv_vs_dynamic", "peak_MiB", "tokens_held"])  # fmt: skip
    loss_rows = bench_loss(model, heldout[:stream_len], budgets, args.quick)
    harness.print_table(loss_rows, ["cache", "budget", "loss", "loss_vs_dense", "loss_second_half"])
    context = world.config.context_length
    print(f"# toy target trained on {context}-token windows; stream of {stream_len} held-out tokens")
    harness.finish(args, device, "kv_cache", rows + loss_rows)


if __name__ == "__main__":
    main()
