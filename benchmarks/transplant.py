"""Benchmark: exact byte-level next-byte cost and tokenizer-transplant quality on the toy world.

    python benchmarks/transplant.py            # default toy world (CPU: several minutes)
    python benchmarks/transplant.py --quick    # tiny toy world, checks

Part 1 — exact next-byte law (Byte-Token Representation Lemma) at mid-token cuts of held-out text:
batched forwards and sequences per byte, ms per byte (total and model), next-byte accuracy / NLL vs
naive token completion, and accuracy of token healing's first byte. Part 2 — the toy target
transplanted to a tokenizer trained on another corpus slice with another vocabulary size, held-out
bits/byte per method (OMP donor: a toy model trained with the new tokenizer; TokenAdapt in the donor's
and in the base model's embedding space). Goal: OMP and TokenAdapt beat the mean and
mean-of-subtokens baselines.
"""

from __future__ import annotations

import copy
import math
import time

import torch

import harness
from tokenlab.tokenization import ByteLevelLM, transplant_tokenizer
from tokenlab.tour.toy import ToyModelSize, load_toy_world, stdlib_documents
from tokenlab.tour.transplant import DonorRecipe, next_byte_bias, train_donor, transplant_comparison


def check(world, heldout: list[str]) -> None:
    """Quick-mode correctness: the law sums to 1; P(x·b)/P(x) from the lemma's prefix probabilities
    matches the law (up to the mass a real model leaks to non-canonical tokens); a transplant between
    identical tokenizers keeps the logits."""
    lm = ByteLevelLM(world.target, world.tokenizer)
    prompt = heldout[0].encode()[:40]
    law = lm.next_byte_distribution(prompt)
    assert abs(law.sum().item() - 1) < 1e-12
    b = int(law[:256].argmax())
    ratio = lm.prefix_log_probability(prompt + bytes([b])) - lm.prefix_log_probability(prompt)
    assert abs(math.exp(ratio) - law[b].item()) < 0.05, "P(x·b)/P(x) vs law"
    same = transplant_tokenizer(
        copy.deepcopy(world.draft), world.tokenizer, world.tokenizer, method="tokenadapt", progress=False
    )
    ids = world.tokenizer(heldout[0][:200], return_tensors="pt").input_ids
    assert torch.equal(same(input_ids=ids).logits, world.draft(input_ids=ids).logits)


def main() -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args()
    device = harness.device_from(args)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: intra-op threads only contend on shared CPUs
    world = load_toy_world("tiny" if args.quick else "default", device=device, progress=not args.quick)
    heldout = [t for _, t in stdlib_documents("heldout", max_bytes=30_000 if args.quick else 200_000)]
    if args.quick:
        check(world, heldout)

    lm = ByteLevelLM(world.target, world.tokenizer)
    bias = next_byte_bias(lm, "".join(heldout), count=8 if args.quick else 200)
    byte_rows = [{"preset": "tiny" if args.quick else "default", "vocab": len(world.tokenizer), **vars(bias)}]
    print("exact next-byte law at mid-token cuts (vs naive token completion):")
    harness.print_table(byte_rows, list(byte_rows[0]))

    # the new tokenizer and its donor: other stdlib training files than the world's; a target-sized donor
    recipe = DonorRecipe(
        new_vocab_size=world.config.vocab_size + (64 if args.quick else 512),
        new_corpus_bytes=150_000 if args.quick else 2_000_000,
        size=ToyModelSize(32, 1, 2, 1, 64) if args.quick else world.config.target,
        steps=20 if args.quick else world.config.train_steps,
        learning_rate=world.config.learning_rate,
    )
    start = time.perf_counter()
    new_tok, donor = train_donor(world, recipe, progress=not args.quick)
    donor_seconds = time.perf_counter() - start
    rows = transplant_comparison(
        world,
        new_tok,
        heldout,
        donor=donor,
        eval_tokens=2048 if args.quick else 32_768,
        progress=not args.quick,
    )
    rows[1]["seconds"] = donor_seconds
    rows[1]["model"] = f"donor ({recipe.steps} steps)"
    print("\ntransplant to a new tokenizer, held-out loss:")
    harness.print_table(rows, ["model", "nats/token", "bits/byte", "seconds", "shared", "unique"])
    by_name = {r["model"].removeprefix("transplant: "): r["bits/byte"] for r in rows}
    baseline = min(by_name["mean_of_subtokens"], by_name["mean"])
    goal = by_name["omp"] < baseline and by_name["tokenadapt (donor space)"] < baseline
    print(f"goal (OMP and TokenAdapt beat mean and mean-of-subtokens): {'met' if goal else 'NOT met'}")
    if args.quick:
        assert all(torch.isfinite(torch.tensor(r["bits/byte"])) for r in rows)
    harness.finish(args, device, "transplant", byte_rows + rows)


if __name__ == "__main__":
    main()
