"""Experiments for exact byte-level probabilities and tokenizer transplant on the toy world.

:func:`next_byte_bias` and :func:`transplant_comparison` are run by the tour
(:func:`byte_level_and_transplant_lines`) and by ``benchmarks/transplant.py``, at different sizes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tokenlab.tokenization.byte_level import EOS_BYTE, ByteLevelBPE, ByteLevelLM
from tokenlab.tokenization.transplant import TRANSPLANT_METHODS, transplant_tokenizer
from tokenlab.tour.toy import (
    PRESETS,
    ToyModelSize,
    ToyWorld,
    _transformers_bars_off,
    build_once,
    build_toy_model,
    encode_documents,
    heldout_loss,
    stdlib_documents,
    train_causal_lm,
    train_toy_tokenizer,
)


def _show(outcome: int) -> str:
    return "EOS" if outcome == EOS_BYTE else repr(chr(outcome))


def describe_law(law: torch.Tensor, k: int = 3) -> str:
    """The ``k`` most likely outcomes of a 257-entry next-byte law, e.g. ``'m' 0.94, 'n' 0.03``."""
    top = law.topk(k)
    return ", ".join(f"{_show(int(i))} {p:.2f}" for p, i in zip(top.values.tolist(), top.indices))


def mid_token_cuts(tokenizer: PreTrainedTokenizerBase, text: str, count: int, seed: int = 0) -> list[bytes]:
    """``count`` prefixes of ``text`` cut strictly inside a multi-byte token of its encoding."""
    bpe = ByteLevelBPE(tokenizer)
    data = text.encode()
    ids = bpe.encode(data)
    cuts, offset = [], 0
    for idx in ids:
        size = len(bpe.token_bytes[idx] or b"")
        cuts.extend(range(offset + 1, offset + size))
        offset += size
    gen = torch.Generator().manual_seed(seed)
    chosen = sorted(cuts[i] for i in torch.randperm(len(cuts), generator=gen)[:count].tolist())
    return [data[:c] for c in chosen]


@dataclass
class NextByteBias:
    """Next-byte prediction at mid-token cuts of held-out text: exact law vs naive token completion."""

    prompts: int
    exact_accuracy: float  # argmax of the exact law == true next byte
    naive_accuracy: float
    healing_accuracy: float  # first byte generated greedily with token healing
    exact_nll: float  # mean −log P(true next byte), nats
    naive_nll: float
    forward_calls_per_byte: float
    sequences_per_byte: float
    ms_per_byte: float
    model_ms_per_byte: float


def next_byte_bias(lm: ByteLevelLM, text: str, count: int, context_bytes: int = 256) -> NextByteBias:
    """Cut ``text`` at ``count`` mid-token points (keeping the last ``context_bytes`` bytes as the
    prompt) and score the true next byte under the exact law and naive token completion (accuracy
    of the argmax, NLL) and token healing (accuracy of its greedy first byte)."""
    data = text.encode()
    hits = {"exact": 0, "naive": 0, "healing": 0}
    nll = {"exact": 0.0, "naive": 0.0}
    calls = sequences = 0
    seconds = model_seconds = 0.0
    prompts = mid_token_cuts(lm.tokenizer, text, count)
    for cut in prompts:
        truth, prompt = data[len(cut)], cut[-context_bytes:]
        before = dataclasses.replace(lm.cost)
        start = time.perf_counter()
        exact = lm.next_byte_distribution(prompt)
        seconds += time.perf_counter() - start
        calls += lm.cost.forward_calls - before.forward_calls
        sequences += lm.cost.sequences - before.sequences
        model_seconds += lm.cost.seconds - before.seconds
        naive = lm.naive_next_byte_distribution(prompt)
        hits["healing"] += lm.token_healing_generate(prompt, 2)[:1] == bytes([truth])
        for name, law in (("exact", exact), ("naive", naive)):
            hits[name] += int(law.argmax()) == truth
            nll[name] -= math.log(max(law[truth].item(), 1e-300))
    n = len(prompts)
    return NextByteBias(
        prompts=n,
        exact_accuracy=hits["exact"] / n,
        naive_accuracy=hits["naive"] / n,
        healing_accuracy=hits["healing"] / n,
        exact_nll=nll["exact"] / n,
        naive_nll=nll["naive"] / n,
        forward_calls_per_byte=calls / n,
        sequences_per_byte=sequences / n,
        ms_per_byte=1e3 * seconds / n,
        model_ms_per_byte=1e3 * model_seconds / n,
    )


@torch.no_grad()
def bits_per_byte(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    context_length: int,
    max_tokens: int,
) -> tuple[float, float]:
    """``(nats/token, bits/byte)`` of ``model`` on ``texts`` encoded with ``tokenizer`` — bits per byte
    compares models with different tokenizers on the same text (scored tokens' bytes, EOS = 0 bytes)."""
    ids = encode_documents(tokenizer, texts)
    loss = heldout_loss(model, ids, context_length, max_tokens)
    bpe = ByteLevelBPE(tokenizer)
    n_windows = max(1, min(ids.numel(), max_tokens) // context_length)
    scored = ids[: n_windows * context_length].view(n_windows, context_length)[:, 1:].reshape(-1)
    n_bytes = sum(len(bpe.token_bytes[t] or b"") for t in scored.tolist())
    return loss, loss * scored.numel() / n_bytes / math.log(2)


@dataclass(frozen=True)
class DonorRecipe:
    """A new tokenizer and a donor model that uses it, for transplanting a toy world's target.

    The tokenizer (``new_vocab_size`` entries) is trained on the ``new_corpus_bytes`` of stdlib training
    files that follow the world's own training slice (:func:`other_training_documents`: text the
    world's tokenizer was not trained on); the donor, a toy model of ``size``, is trained on the same
    text with it for ``steps`` steps (the world's batch size and context length).
    """

    new_vocab_size: int
    new_corpus_bytes: int
    size: ToyModelSize
    steps: int
    learning_rate: float

    def key(self) -> str:
        """Cache key of the recipe."""
        return hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def tour_donor_recipe(world: ToyWorld) -> DonorRecipe:
    """The tour's recipe: 512 more tokens than the world's (64 for the tiny world), 2 MB of other files
    (150 KB), and a donor of the world's draft size (a 32-wide one-layer model), trained as many steps
    as the world's models at twice their learning rate (200 steps for the tiny world)."""
    if world.config.vocab_size < 1024:
        return DonorRecipe(world.config.vocab_size + 64, 150_000, ToyModelSize(32, 1, 2, 1, 64), 200, 6e-3)
    return DonorRecipe(
        world.config.vocab_size + 512,
        2_000_000,
        world.config.draft,
        world.config.train_steps,
        2 * world.config.learning_rate,
    )


def other_training_documents(world: ToyWorld, max_bytes: int) -> list[str]:
    """Up to ``max_bytes`` of stdlib training documents after those the world was trained on."""
    skip = world.metrics["train_bytes"]
    docs = [t for _, t in stdlib_documents("train", max_bytes=skip + max_bytes)]
    offset = int((torch.tensor([len(t.encode()) for t in docs]).cumsum(0) < skip).sum()) + 1
    return docs[offset:]


def train_donor(
    world: ToyWorld, recipe: DonorRecipe, *, progress: bool = False
) -> tuple[PreTrainedTokenizerFast, PreTrainedModel]:
    """The new tokenizer and the donor of ``recipe`` (trained now, seeded by the world's seed)."""
    docs = other_training_documents(world, recipe.new_corpus_bytes)
    new_tok = train_toy_tokenizer(docs, recipe.new_vocab_size)
    torch.manual_seed(world.config.seed)
    ctx = world.config.context_length
    donor = build_toy_model(recipe.size, len(new_tok), ctx, new_tok).to(world.target.device)
    train_causal_lm(
        donor,
        encode_documents(new_tok, docs),
        steps=recipe.steps,
        batch_size=world.config.batch_size,
        context_length=ctx,
        learning_rate=recipe.learning_rate,
        seed=world.config.seed,
        desc="training transplant donor",
        progress=progress,
    )
    return new_tok, donor


def load_transplant_donor(
    world: ToyWorld, recipe: DonorRecipe | None = None, *, progress: bool = True
) -> tuple[PreTrainedTokenizerFast, PreTrainedModel]:
    """The new tokenizer and donor of ``recipe`` (default: :func:`tour_donor_recipe`), trained once and
    cached beside the world (:func:`tokenlab.tour.toy.build_once`)."""
    recipe = recipe if recipe is not None else tour_donor_recipe(world)
    path = world.path.parent / f"donor-{world.config.key()}-{recipe.key()}"

    def build(out):
        new_tok, donor = train_donor(world, recipe, progress=progress)
        new_tok.save_pretrained(out / "tokenizer")
        donor.save_pretrained(out / "donor")
        (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))

    default = world.config == PRESETS["default"] and recipe == tour_donor_recipe(world)
    took = "about 45 s on 2 CPU cores" if default else ""  # estimated from the world's build time
    with _transformers_bars_off():
        build_once(
            path, build, complete="recipe.json", name="the transplant donor", took=took, progress=progress
        )
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
        donor = LlamaForCausalLM.from_pretrained(path / "donor").to(world.target.device).eval()
    return tokenizer, donor


def transplant_comparison(
    world: ToyWorld,
    new_tok: PreTrainedTokenizerFast,
    heldout: list[str],
    *,
    donor: PreTrainedModel | None,
    eval_tokens: int,
    progress: bool = False,
) -> list[dict]:
    """Transplant the world's target to ``new_tok`` with each method and score the ``heldout`` texts
    in bits/byte (``eval_tokens`` tokens).

    Without a ``donor`` (a model that uses ``new_tok``) OMP is left out. TokenAdapt runs in the base
    model's embedding space and, with a donor, in the donor's too. Rows: the original target (its own
    tokenizer), the donor, then each method; each with nats/token, bits/byte, and for the methods
    seconds and shared/unique token counts.
    """
    ctx = world.config.context_length
    rows = []
    for label, model, tokenizer in (
        ("target (own tokenizer)", world.target, world.tokenizer),
        ("donor", donor, new_tok),
    ):
        if model is not None:
            loss, bpb = bits_per_byte(model, tokenizer, heldout, ctx, eval_tokens)
            rows.append({"model": label, "nats/token": loss, "bits/byte": bpb})
    shared = len(set(new_tok.get_vocab()) & set(world.tokenizer.get_vocab()))
    runs = [(m, donor) for m in TRANSPLANT_METHODS if donor is not None or m != "omp"]
    if donor is not None:  # TokenAdapt in both default auxiliary spaces
        runs.insert(runs.index(("tokenadapt", donor)) + 1, ("tokenadapt", None))
    for method, space in runs:
        start = time.perf_counter()
        model = transplant_tokenizer(
            copy.deepcopy(world.target),
            world.tokenizer,
            new_tok,
            method=method,
            donor=space,
            progress=progress,
        )
        seconds = time.perf_counter() - start
        loss, bpb = bits_per_byte(model, new_tok, heldout, ctx, eval_tokens)
        label = f"transplant: {method}"
        if method == "tokenadapt":
            label += " (donor space)" if space is not None else " (base space)"
        rows.append(
            {"model": label, "nats/token": loss, "bits/byte": bpb, "seconds": seconds,
             "shared": shared, "unique": len(new_tok) - shared}
        )  # fmt: skip
    return rows


def world_texts(world: ToyWorld, ids: torch.Tensor, max_bytes: int) -> list[str]:
    """The documents behind a toy world's token ids (split at EOS, decoded), up to ``max_bytes``."""
    ends = (ids == world.tokenizer.eos_token_id).nonzero().flatten().tolist()
    docs, total, start = [], 0, 0
    for end in ends:
        docs.append(world.tokenizer.decode(ids[start:end]))
        total += len(docs[-1].encode())
        start = end + 1
        if total >= max_bytes:
            break
    return docs


def byte_level_and_transplant_lines(world: ToyWorld) -> list[str]:
    """Next-byte law for a prompt ending mid-token (exact vs naive token completion), and held-out
    bits/byte of the target transplanted with each method to the tokenizer of the cached tour donor
    (:func:`load_transplant_donor`)."""
    lm = ByteLevelLM(world.target, world.tokenizer)
    prompt = b"    def __init__(self, name):\n        self.na"
    lines = [
        f"prompt ending mid-token: {prompt.decode()[-20:]!r}",
        f"  exact next-byte law (cover encodings): {describe_law(lm.next_byte_distribution(prompt))}",
        f"  naive token completion:                {describe_law(lm.naive_next_byte_distribution(prompt))}",
    ]
    tiny = world.config.vocab_size < 1024
    heldout = world_texts(world, world.heldout_ids, 20_000)
    bias = next_byte_bias(lm, "".join(heldout), count=4 if tiny else 8)
    lines.append(
        f"  {bias.prompts} held-out mid-token cuts: next-byte accuracy exact {bias.exact_accuracy:.2f}, "
        f"naive {bias.naive_accuracy:.2f}, token healing {bias.healing_accuracy:.2f}; "
        f"NLL exact {bias.exact_nll:.2f} vs naive {bias.naive_nll:.2f} nats; "
        f"{bias.forward_calls_per_byte:.0f} batched forward ({bias.sequences_per_byte:.1f} sequences) "
        f"and {bias.ms_per_byte:.0f} ms per byte"
    )
    new_tok, donor = load_transplant_donor(world)
    heldout = world_texts(world, world.heldout_ids, 30_000 if tiny else 100_000)
    rows = transplant_comparison(world, new_tok, heldout, donor=donor, eval_tokens=2048 if tiny else 16_384)
    recipe = tour_donor_recipe(world)
    lines.append(
        f"transplant to a tokenizer with {rows[-1]['unique']} new tokens (trained on other stdlib files, "
        f"vocab {len(new_tok)}); donor: {sum(p.numel() for p in donor.parameters()) / 1e6:.2f} M params,"
    )
    lines.append(f"{recipe.steps} steps with the new tokenizer (cached); held-out bits/byte:")
    lines.extend(f"  {r['model']:<36} {r['bits/byte']:.3f}" for r in rows)
    by_name = {r["model"].removeprefix("transplant: "): r["bits/byte"] for r in rows}
    best = min(("mean", "mean_of_subtokens", "zero"), key=by_name.get)
    lines.append(
        f"  vs the best baseline ({best}): OMP {by_name['omp'] - by_name[best]:+.3f}, "
        f"TokenAdapt (donor space) {by_name['tokenadapt (donor space)'] - by_name[best]:+.3f} bits/byte"
    )
    return lines
