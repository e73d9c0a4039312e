"""Benchmark: speculative verification kernel, and speculative decoding end to end.

    python benchmarks/speculative.py            # full sizes (GPU; on CPU the kernel column is skipped)
    python benchmarks/speculative.py --quick    # tiny sizes, interpreter on CPU, checks equivalence

(a) ``verify``: fused Triton kernel vs PyTorch reference vs a naive per-sequence loop, sampling
    with temperature 0.8, at B ∈ {1, 8, 32}, k ∈ {4, 8}, V ∈ {32k, 128k}; time and effective
    bandwidth (one read of logits, draft probabilities and noise) as a fraction of the measured
    device copy bandwidth (``clone`` of a tensor of the same size).
(a') ``tree_verify`` (RSD's rule, sampling): kernel vs reference at B ∈ {1, 8, 32}, N ∈ {16, 64}
    nodes, V ∈ {32k, 128k}; the same tokens are asserted.
(b) End to end on the toy target/draft pair (``gpu`` preset on GPU, ``default`` on CPU, ``tiny``
    with ``--quick``), greedy: tokens/s of plain ``generate``, HF assisted generation
    (``assistant_model=``, constant k), tokenlab chain, tokenlab batched (EQSPEC and EXSPEC)
    at B = 1/2/4/8, and token trees (static, RSD, DySpec; budget 16, depth 4) at B = 1/4, with
    acceptance rates, tokens and nodes per target call, and where the time goes (draft forwards,
    tree bookkeeping, target forward, verification, commit) per target call. Every output is
    checked against plain greedy.
(c) Tokens per target call against the node budget N ∈ {4, 8, 16, 32} for chain, static, RSD and
    DySpec, greedy and sampled (T = 1), at equal node budget (:data:`BUDGET_RULE`);
    ``benchmarks/tree_budget_plot.py`` plots it.
"""

from __future__ import annotations

import harness

harness.enable_interpreter_if_cpu()

import functools  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402

from tokenlab.decoding import speculative_generate, warped_probs  # noqa: E402
from tokenlab.kernels.speculative_verify import speculative_verify  # noqa: E402
from tokenlab.kernels.tree_verify import tree_verify  # noqa: E402
from tokenlab.tour.toy import load_toy_world  # noqa: E402

TEMPERATURE = 0.8


def naive_verify(logits, q, tokens, uniforms, noise):
    """The textbook loop, one sequence and one position at a time (same random numbers)."""
    B, k = tokens.shape
    num_accepted = torch.zeros(B, dtype=torch.long)
    next_tokens = torch.full((B, k + 1), -1, dtype=torch.long)
    for b in range(B):
        for j in range(k + 1):
            p = torch.softmax(logits[b, j].double() / TEMPERATURE, dim=-1)
            if j == k:
                next_tokens[b, j] = (p / noise[b, j]).argmax()
                break
            d = tokens[b, j]
            if uniforms[b, j] < min(1.0, (p[d] / q[b, j, d]).item()):
                next_tokens[b, j] = d
                num_accepted[b] += 1
                continue
            residual = (p - q[b, j]).clamp(min=0)
            next_tokens[b, j] = ((residual / residual.sum()) / noise[b, j]).argmax()
            break
    return num_accepted, next_tokens


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int) -> float:
    """Measured device copy bandwidth in GB/s (read + write of ``nbytes``)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    ms = harness.time_fn(lambda: x.clone(), device, repeats=repeats)
    return 2 * nbytes / 1e9 / (ms / 1e3)


def bench_verify(args, device, repeats) -> list[dict]:
    on_gpu = device.type == "cuda"
    cases = (
        [(1, 1, 37), (3, 2, 1500)]
        if args.quick
        else [(B, k, V) for B in (1, 8, 32) for k in (4, 8) for V in (32_000, 128_000)]
    )
    dtype = torch.float32 if args.quick else torch.bfloat16
    rows = []
    for B, k, V in cases:
        gen = torch.Generator(device=device).manual_seed(B * 1000 + k * 100 + V)
        logits = (torch.randn(B, k + 1, V, device=device, generator=gen) * 3).to(dtype)
        q = warped_probs(
            logits[:, :k].float() + torch.randn(B, k, V, device=device, generator=gen), TEMPERATURE
        )
        tokens = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, k)
        uniforms = torch.rand(B, k, device=device, generator=gen)
        noise = torch.empty(B, k + 1, V, device=device).exponential_(generator=gen)
        backends = ("reference", "triton") if args.quick or on_gpu else ("reference",)
        candidates = {
            name: functools.partial(
                speculative_verify,
                logits,
                q,
                tokens,
                do_sample=True,
                temperature=TEMPERATURE,
                uniforms=uniforms,
                exponentials=noise,
                backend=name,
            )
            for name in backends
        }
        ref = candidates["reference"]()
        if "triton" in candidates:
            out = candidates["triton"]()
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), "triton != reference"
        if args.quick or B * (k + 1) * V <= 8 * 5 * 32_000:
            cpu = [t.cpu() for t in (logits, q, tokens, uniforms, noise)]
            naive = naive_verify(*cpu)
            if args.quick:
                assert torch.equal(naive[0], ref[0].cpu()) and torch.equal(naive[1], ref[1].cpu()), (
                    "naive != ref"
                )
            candidates["naive"] = lambda cpu=cpu: naive_verify(*cpu)
        warmup = 1 if args.quick else 2
        ms = {
            name: harness.time_fn(fn, device, warmup=warmup, repeats=repeats)
            for name, fn in candidates.items()
        }
        nbytes = logits.numel() * logits.element_size() + (q.numel() + noise.numel()) * 4
        copy_gbs = copy_bandwidth(nbytes, device, repeats)
        row = {
            "B": B,
            "k": k,
            "V": V,
            "dtype": str(dtype).removeprefix("torch."),
            "accepted": ref[0].sum().item(),
        }
        row.update({f"{name}_ms": t for name, t in ms.items()})
        if "triton" in ms:
            row["triton_GB/s"] = nbytes / 1e9 / (ms["triton"] / 1e3)
            row["frac_of_copy"] = row["triton_GB/s"] / copy_gbs
            row["speedup_vs_ref"] = ms["reference"] / ms["triton"]
        row["copy_GB/s"] = copy_gbs
        rows.append(row)
    return rows


def _random_trees(B, N, V, device, dtype, seed):
    """Random trees (node ``i``'s parent uniform among earlier nodes), logits, draft distributions near
    the target's, children drawn from their parent's draft distribution, and the random numbers."""
    gen = torch.Generator(device=device).manual_seed(seed)
    parents = torch.full((B, N + 1), -1, device=device)
    for i in range(1, N + 1):
        parents[:, i] = torch.randint(0, i, (B,), device=device, generator=gen)
    logits = (torch.randn(B, N + 1, V, device=device, generator=gen) * 3).to(dtype)
    q = warped_probs(logits.float() + torch.randn(B, N + 1, V, device=device, generator=gen), TEMPERATURE)
    parent_q = q.gather(1, parents.clamp(min=0)[:, :, None].expand(-1, -1, V))
    tokens = torch.multinomial(parent_q.reshape(-1, V), 1, generator=gen).reshape(B, N + 1)
    uniforms = torch.rand(B, N + 1, device=device, generator=gen)
    noise = torch.empty(B, V, device=device).exponential_(generator=gen)
    return logits, q, tokens, parents, uniforms, noise


def bench_tree_verify(args, device, repeats) -> list[dict]:
    """Tree verification (RSD's rule, sampling): Triton kernel vs reference, same tokens asserted."""
    on_gpu = device.type == "cuda"
    if args.quick:
        cases = [(2, 6, 37), (3, 12, 1500)]
    elif on_gpu:
        cases = [(B, N, V) for B in (1, 8, 32) for N in (16, 64) for V in (32_000, 128_000)]
    else:  # the reference alone, at sizes a CPU holds comfortably
        cases = [(B, 16, 32_000) for B in (1, 8)]
    dtype = torch.float32 if args.quick else torch.bfloat16
    rows = []
    for B, N, V in cases:
        logits, q, tokens, parents, uniforms, noise = _random_trees(B, N, V, device, dtype, seed=B + N + V)
        run = {
            name: functools.partial(
                tree_verify,
                logits,
                q,
                tokens,
                parents,
                do_sample=True,
                temperature=TEMPERATURE,
                uniforms=uniforms,
                exponentials=noise,
                backend=name,
            )
            for name in (("reference", "triton") if args.quick or on_gpu else ("reference",))
        }
        ref = run["reference"]()
        if "triton" in run:
            out = run["triton"]()
            assert all(torch.equal(a, b) for a, b in zip(out, ref)), "tree verify: triton != reference"
        ms = {name: harness.time_fn(fn, device, warmup=1, repeats=repeats) for name, fn in run.items()}
        row = {
            "B": B,
            "N": N,
            "V": V,
            "dtype": str(dtype).removeprefix("torch."),
            "accepted": ref[0].sum().item(),
        }
        row |= {f"{name}_ms": t for name, t in ms.items()}
        if "triton" in ms:
            row["speedup_vs_ref"] = ms["reference"] / ms["triton"]
        rows.append(row)
    return rows


def _toy_prompts(world, n_prompts, device, *, lengths=(8, 25)):
    """Held-out slices of the toy corpus as ``[1, n]`` prompts (seeded)."""
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, world.heldout_ids.numel() - 64, (n_prompts,), generator=gen)
    sizes = torch.randint(lengths[0], lengths[1], (n_prompts,), generator=gen)
    return [world.heldout_ids[s : s + n].to(device)[None] for s, n in zip(starts.tolist(), sizes.tolist())]


def bench_end_to_end(args, device, world) -> tuple[list[dict], list[dict], dict]:
    """Every method over the same prompts, in ``rounds`` interleaved rounds (one run of each method
    per round; the median time is kept), so that a shared machine's changing load hits all alike."""
    target, draft = world.target, world.draft
    if args.quick:
        n_prompts, max_new, rounds = 4, 12, 1
    elif device.type == "cuda":
        n_prompts, max_new, rounds = 16, 128, 3
    else:
        n_prompts, max_new, rounds = 8, 64, 3
    k, budget = (3, 8) if args.quick else (4, 16)
    prompts = _toy_prompts(world, n_prompts, device)
    pad = world.tokenizer.pad_token_id
    eos = world.tokenizer.eos_token_id
    hf_kwargs = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    target.generate(prompts[0], **hf_kwargs)  # warm-up
    draft.generation_config.num_assistant_tokens = k
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    plain = [target.generate(p, **hf_kwargs)[0, p.shape[1] :] for p in prompts]
    total = sum(t.numel() for t in plain)

    def hf(assistant) -> tuple[dict, float]:
        extra = {} if assistant is None else {"assistant_model": assistant}
        out, seconds = harness.timed(
            lambda: [target.generate(p, **hf_kwargs, **extra)[0, p.shape[1] :] for p in prompts], device
        )
        assert all(torch.equal(a, b) for a, b in zip(out, plain)), "HF generate outputs differ"
        return {"acceptance": None}, seconds

    def tokenlab(B: int, strategy: str = "eqspec", **tree_kwargs) -> tuple[dict, float]:
        """All prompts in batches of ``B``, every output checked against plain greedy."""
        accepted = drafted = steps = calls = 0
        seconds = 0.0
        phases: dict[str, float] = {}
        for first in range(0, n_prompts, B):
            batch = prompts[first : first + B]
            width = max(p.shape[1] for p in batch)
            ids = torch.stack(
                [torch.nn.functional.pad(p[0], (width - p.shape[1], 0), value=pad) for p in batch]
            )
            mask = torch.stack(
                [torch.arange(width, device=device) >= width - p.shape[1] for p in batch]
            ).long()
            out = speculative_generate(
                target, draft, ids, attention_mask=mask, max_new_tokens=max_new, num_draft_tokens=k,
                eos_token_id=eos, pad_token_id=pad, strategy=strategy, **tree_kwargs,
            )  # fmt: skip
            for row, expected in enumerate(plain[first : first + B]):
                got = out.sequences[row, width:]
                same = (
                    torch.equal(got[: expected.numel()], expected) and (got[expected.numel() :] == pad).all()
                )
                assert same, f"{strategy} {tree_kwargs} B={B} != plain greedy"
            stats = out.stats
            accepted, drafted, steps = accepted + stats.accepted, drafted + stats.drafted, steps + stats.steps
            calls += stats.target_calls
            seconds += stats.seconds
            for phase, t in stats.phase_seconds.items():
                phases[phase] = phases.get(phase, 0.0) + t
        row = {
            "acceptance": accepted / drafted,
            "tokens/call": (accepted + steps) / steps,
            "nodes/call": drafted / steps,
        }
        return row | {f"{phase}_ms/call": 1e3 * t / calls for phase, t in phases.items()}, seconds

    methods = [
        ("plain greedy generate", 1, lambda: hf(None)),
        ("HF assisted generation", 1, lambda: hf(draft)),
        ("tokenlab chain", 1, lambda: tokenlab(1)),
    ]
    for strategy in ("eqspec", "exspec"):
        for B in (2, 4) if args.quick else (2, 4, 8):
            methods.append(
                (f"tokenlab batched {strategy.upper()}", B, lambda B=B, s=strategy: tokenlab(B, s))
            )
    tree_methods = [
        (f"tree {tree}", B, lambda B=B, tree=tree: tokenlab(B, tree=tree, tree_budget=budget))
        for tree in ("static", "rsd", "dyspec")
        for B in (1, 4)
    ]
    times: dict[int, list[float]] = {i: [] for i in range(len(methods) + len(tree_methods))}
    rows: dict[int, dict] = {}
    for _ in range(rounds):
        for i, (name, B, fn) in enumerate(methods + tree_methods):
            row, seconds = fn()
            rows[i] = {"method": name, "B": B} | row
            times[i].append(seconds)
    for i, row in rows.items():
        row["tokens/s"] = total / statistics.median(times[i])
    base = rows[0]["tokens/s"]
    for row in rows.values():
        row["speedup_vs_plain"] = row["tokens/s"] / base
    info = {"prompts": n_prompts, "max_new_tokens": max_new, "k": k, "budget": budget, "rounds": rounds}
    ordered = [rows[i] for i in range(len(rows))]
    return ordered[: len(methods)], ordered[len(methods) :], info


BUDGET_RULE = (
    "equal node budget N (draft tokens the target scores per call besides the root): chain of k = N; "
    "static and RSD: the default shape for budget N at depth 4 (binary levels, then chains; <= N nodes); "
    "DySpec: budget N, depth cap N"
)


def budget_configs(budget: int) -> dict[str, dict]:
    """The drafting modes at node budget ``budget`` under :data:`BUDGET_RULE`."""
    return {
        "chain": dict(num_draft_tokens=budget),
        "static": dict(tree="static", tree_budget=budget, num_draft_tokens=min(4, budget)),
        "rsd": dict(tree="rsd", tree_budget=budget, num_draft_tokens=min(4, budget)),
        "dyspec": dict(tree="dyspec", tree_budget=budget, num_draft_tokens=budget),
    }


def tokens_per_call_by_budget(world, device, budgets, *, n_prompts, max_new, seeds=(0, 1, 2)) -> list[dict]:
    """Tokens per target call and nodes per call of each drafting mode at each node budget, greedy
    and sampled (temperature 1, pooled over one run per seed in ``seeds``): one batch of equal-length
    prompts per run. Greedy outputs are checked to be the same for every mode."""
    ids = torch.cat(_toy_prompts(world, n_prompts, device, lengths=(16, 17)))
    rows = []
    for do_sample in (False, True):
        for budget in budgets:
            greedy = None
            for mode, kwargs in budget_configs(budget).items():
                accepted = drafted = steps = target_calls = draft_calls = 0
                for seed in seeds if do_sample else seeds[:1]:
                    gen = torch.Generator(device=device).manual_seed(seed)
                    out = speculative_generate(
                        world.target, world.draft, ids, max_new_tokens=max_new, eos_token_id=[],
                        do_sample=do_sample, generator=gen, **kwargs,
                    )  # fmt: skip
                    if not do_sample:
                        greedy = out.sequences if greedy is None else greedy
                        assert torch.equal(out.sequences, greedy), (
                            f"greedy {mode} at budget {budget} != chain"
                        )
                    stats = out.stats
                    accepted, drafted, steps = (
                        accepted + stats.accepted,
                        drafted + stats.drafted,
                        steps + stats.steps,
                    )
                    target_calls, draft_calls = (
                        target_calls + stats.target_calls,
                        draft_calls + stats.draft_calls,
                    )
                rows.append({
                    "decoding": "sampling T=1" if do_sample else "greedy",
                    "budget": budget,
                    "mode": mode,
                    "tokens/call": (accepted + steps) / steps,
                    "nodes/call": drafted / steps,
                    "draft_calls/call": draft_calls / target_calls,
                    "steps": steps,
                })  # fmt: skip
    return rows


def main() -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args()
    device = harness.device_from(args)
    repeats = args.repeats or (3 if args.quick else 20)
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # tiny sizes: one thread is fastest and spares the shared CI cores
    label = "GPU" if device.type == "cuda" else "CPU" + (" (Triton interpreter)" if args.quick else "")
    print(f"(a) verification kernel — {label}")
    verify_rows = bench_verify(args, device, repeats)
    harness.print_table(verify_rows, list(dict.fromkeys(c for r in verify_rows for c in r)))
    print(f"\n(a') tree verification kernel — {label}")
    tree_verify_rows = bench_tree_verify(args, device, repeats)
    harness.print_table(tree_verify_rows, list(dict.fromkeys(c for r in tree_verify_rows for c in r)))
    preset = "tiny" if args.quick else ("gpu" if device.type == "cuda" else "default")
    world = load_toy_world(preset, device=device, progress=not args.quick)
    end_rows, tree_rows, info = bench_end_to_end(args, device, world)
    print(
        f"\n(b) end to end, greedy, toy pair '{preset}', {info['prompts']} prompts × "
        f"{info['max_new_tokens']} tokens, k={info['k']}, tree budget {info['budget']}, median of "
        f"{info['rounds']} interleaved rounds — {label}"
    )
    columns = ["method", "B", "tokens/s", "speedup_vs_plain", "acceptance", "tokens/call", "nodes/call"]
    harness.print_table(end_rows + tree_rows, columns)
    print("\n    where the time goes, ms per target call (the whole batch):")
    phases = ["draft_ms/call", "tree_ms/call", "target_ms/call", "verify_ms/call", "commit_ms/call"]
    harness.print_table(end_rows[2:] + tree_rows, ["method", "B", *phases])
    budgets = (4,) if args.quick else (4, 8, 16, 32)
    n_prompts, max_new = (2, 8) if args.quick else (16, 64)
    seeds = (0,) if args.quick else (0, 1, 2)
    budget_rows = tokens_per_call_by_budget(
        world, device, budgets, n_prompts=n_prompts, max_new=max_new, seeds=seeds
    )
    print(
        f"\n(c) tokens per target call at {BUDGET_RULE}; toy pair '{preset}', {n_prompts} prompts × "
        f"{max_new} tokens, sampling pooled over seeds {seeds}"
    )
    harness.print_table(budget_rows, list(budget_rows[0]))
    harness.finish(
        args,
        device,
        "speculative",
        [{"part": "verify", **r} for r in verify_rows]
        + [{"part": "tree_verify", **r} for r in tree_verify_rows]
        + [{"part": "e2e", **r} for r in end_rows + tree_rows]
        + [{"part": "budget", **r} for r in budget_rows],
    )


if __name__ == "__main__":
    main()
