"""Benchmark: constrained generation — AWRS vs token masking vs genlm-control, on the toy world.

    python benchmarks/constrained.py            # toy world "default" (V = 2048)
    python benchmarks/constrained.py --quick    # toy world "tiny" (V = 384), checks correctness

For two constraints — a regular expression (a Python identifier followed by ``(``) and a finite set
of stdlib call heads (``print(``, ``len(``, …) — every method continues the same prompts, several
samples each, sampling at temperature 1, and we report constraint evaluations per generated token,
the time spent drawing tokens per generated token (constraint checks and sampling, without the model's
forwards: ``ConstrainedOutput.sampling_seconds``), generated tokens per second end to end, the share
of texts that end as members of the constraint's set, and the mean log-weight (log of the estimated
probability of the constraint under the model, per sequence).

* tokenlab AWRS (two-loop estimator, the paper's) and AWRS (recursive estimator);
* tokenlab token masking (every token checked each step);
* genlm-control's AWRS (its SMC loop without resampling, ``AsyncTransformer`` backend), on the same
  constraint object, when ``genlm-control`` is installed.

Two stopping rules: ``eos`` — a sequence ends at EOS, which the constraint allows only once the text
is a member (all methods; genlm's rule); ``complete`` — tokenlab's ``stop_when_complete``: end as
soon as the text is a member (saves the final EOS step, where few tokens are allowed).
"""

from __future__ import annotations

import harness

harness.enable_interpreter_if_cpu()

import torch  # noqa: E402

from tokenlab.decoding import (  # noqa: E402
    FiniteSetConstraint,
    RegexConstraint,
    TokenVocabulary,
    constrained_generate,
)
from tokenlab.tour.toy import load_toy_world  # noqa: E402

PROMPTS = ["    result = ", "        self.", "    return ", "        value = "]
CALLS = ["print(", "len(", "range(", "isinstance(", "super(", "getattr(", "open(", "str(", "int(",
         "list(", "dict(", "set(", "sorted(", "enumerate(", "zip(", "hasattr(", "type(", "repr("]  # fmt: skip
CONSTRAINTS = {
    "regex identifier(": RegexConstraint(r"[A-Za-z_][A-Za-z0-9_]*\("),
    "finite set of calls": FiniteSetConstraint(CALLS),
}


def tokenlab_rows(world, vocab, constraint, samples, max_new, device, quick) -> list[dict]:
    tokenizer = world.tokenizer
    batch = tokenizer([p for p in PROMPTS for _ in range(samples)], return_tensors="pt", padding=True,
                      padding_side="left").to(device)  # fmt: skip
    checkable = sum(b is not None for b in vocab.token_bytes) + len(vocab.eos_token_ids)
    rows = []
    methods = [
        ("tokenlab AWRS (two-loop)", "awrs", "two_loop"),
        ("tokenlab AWRS (recursive)", "awrs", "recursive"),
        ("tokenlab masking", "mask", "two_loop"),
    ]
    for stop in ("complete",) if quick else ("eos", "complete"):
        for name, method, estimator in methods:
            out = constrained_generate(
                world.target, vocab, batch.input_ids, constraint, attention_mask=batch.attention_mask,
                max_new_tokens=max_new, method=method, estimator=estimator,
                stop_when_complete=stop == "complete", generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
            assert all(constraint.allows_prefix(t) for t in out.texts), f"{name}: a text left the constraint"
            if method == "mask":
                assert out.calls_per_token == checkable, "masking must check every token with text, and EOS"
            finite = torch.isfinite(out.log_weights)
            rows.append(
                {
                    "method": name,
                    "stop": stop,
                    "sequences": len(out.texts),
                    "tokens": int(out.num_new_tokens.sum()),
                    "calls/token": out.calls_per_token,
                    "tokens/s": out.tokens_per_second,
                    "sampling ms/token": 1e3 * out.sampling_seconds / max(int(out.num_new_tokens.sum()), 1),
                    "complete": float(out.complete.float().mean()),
                    "mean log w": float(out.log_weights[finite].mean()) if finite.any() else float("-inf"),
                }
            )
    masked = {r["stop"]: r["calls/token"] for r in rows if r["method"] == "tokenlab masking"}
    for row in rows:
        row["calls vs masking"] = row["calls/token"] / masked[row["stop"]]
    if quick:
        for row in rows:
            if row["method"].startswith("tokenlab AWRS"):
                assert row["calls/token"] < masked[row["stop"]], "AWRS must need fewer calls than masking"
    return rows


def genlm_row(world, constraint, samples, max_new) -> dict | None:
    try:
        import genlm.control  # noqa: F401

        from tokenlab.testing.genlm import genlm_constrained_generate
    except ImportError:
        return None
    texts, tokens, calls, seconds, log_weights = [], 0, 0, 0.0, []
    for prompt in PROMPTS:
        ids = world.tokenizer(prompt).input_ids
        result = genlm_constrained_generate(world.target, world.tokenizer, ids, constraint,
                                            num_particles=samples, max_tokens=max_new)  # fmt: skip
        texts += result["texts"]
        tokens += result["tokens"]
        calls += result["calls"]
        seconds += result["seconds"]
        log_weights += result["log_weights"]
    finite = torch.tensor(log_weights)[torch.isfinite(torch.tensor(log_weights))]
    return {
        "method": "genlm-control AWRS",
        "stop": "eos",
        "sequences": len(texts),
        "tokens": tokens,
        "calls/token": calls / max(tokens, 1),
        "tokens/s": tokens / seconds,
        "complete": sum(constraint.allows_end(t) for t in texts) / len(texts),
        "mean log w": float(finite.mean()) if finite.numel() else float("-inf"),
    }


def main() -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args()
    device = harness.device_from(args)
    torch.set_num_threads(1)  # tiny models: extra threads only contend on a shared machine
    preset = "tiny" if args.quick else "default"
    world = load_toy_world(preset, device=device, progress=not args.quick)
    vocab = TokenVocabulary.from_tokenizer(world.tokenizer)
    samples, max_new = (2, 6) if args.quick else (8, 16)
    all_rows = []
    for label, constraint in CONSTRAINTS.items():
        rows = tokenlab_rows(world, vocab, constraint, samples, max_new, device, args.quick)
        if not args.quick and (peer := genlm_row(world, constraint, samples, max_new)) is not None:
            peer["calls vs masking"] = peer["calls/token"] / next(
                r["calls/token"] for r in rows if r["method"] == "tokenlab masking" and r["stop"] == "eos"
            )
            rows.append(peer)
        print(f"\n{label} — toy world '{preset}' (V = {len(vocab)}), {len(PROMPTS)} prompts × {samples} "
              f"samples, ≤ {max_new} tokens, {device.type}")  # fmt: skip
        columns = ["method", "stop", "tokens", "calls/token", "calls vs masking", "sampling ms/token",
                   "tokens/s", "complete", "mean log w"]  # fmt: skip
        harness.print_table(rows, columns)
        all_rows += [{"constraint": label, **r} for r in rows]
    harness.finish(args, device, "constrained", all_rows)


if __name__ == "__main__":
    main()
