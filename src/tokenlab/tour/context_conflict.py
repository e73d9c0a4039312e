"""A context-conflict probe on the toy world, and the tour section of context-aware decoding.

The toy target learned Python from the standard library, so it has *parametric* habits — after
``if __name__ == "__main__":`` comes ``main()``, after ``raise`` a built-in exception, after
``return self.`` a common attribute. Each probe item pairs such a query ``x`` with a context ``c``
that defines a different name the query should use (an entry point, an exception class, an
attribute), so context and parameters conflict::

    context  c:  def launch():\\n    pass\\n\\n\\n
    query    x:  if __name__ == "__main__":\\n
    answer:          launch(        (the habit: main)

Queries end before the answer's leading whitespace, which BPE merges into the answer's first token.
:func:`context_conflict_probe` measures, for plain decoding of ``c + x``, CAD (fixed α), AdaCAD and
the query alone (the habit):

* **follows** — the fraction of items whose greedy continuation starts with the answer;
* **log p(answer)** — the mean log-probability (nats) of the answer's tokens, teacher-forced,
  under each method's next-token distribution (CAD's and AdaCAD's include the contrast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenlab.decoding import AdaCADLogitsProcessor, ContextAwareLogitsProcessor, context_aware_generate
from tokenlab.decoding.incremental import CachedStream
from tokenlab.tour.toy import ToyWorld

# kind → (context, query, answer as it follows the query, names); ``{name}`` is the defined name.
TEMPLATES: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "entry point": (
        "def {name}():\n    pass\n\n\n",
        'if __name__ == "__main__":\n',
        "    {name}(",
        ("launch", "start", "serve", "execute", "cli", "entry", "program", "go"),
    ),
    "exception": (
        "class {name}(Exception):\n    pass\n\n\n",
        "def check(value):\n    if not value:\n        raise",
        " {name}(",
        ("BadValue", "Missing", "Invalid", "Broken", "Failure", "Problem", "Denied", "Unknown"),
    ),
    "attribute": (
        "class Item:\n    def __init__(self, {name}):\n        self.{name} = {name}\n\n",
        "    def get(self):\n        return self.",
        "{name}\n",
        ("width", "owner", "colour", "radius", "price", "label", "budget", "speed"),
    ),
}
METHODS = ("query alone", "plain", "CAD", "AdaCAD")
MAX_NEW_TOKENS = 6


@dataclass(frozen=True)
class ProbeItem:
    """One conflict: the context ``c``, the query ``x``, and the answer text the context implies."""

    kind: str
    context: str
    query: str
    answer: str


def probe_items(per_kind: int | None = None) -> list[ProbeItem]:
    """The probe's items: every template with its first ``per_kind`` names (all by default)."""
    return [
        ProbeItem(kind, context.format(name=n), query, answer.format(name=n))
        for kind, (context, query, answer, names) in TEMPLATES.items()
        for n in names[:per_kind]
    ]


def _encode(tok, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def _answer_tokens(tok, items: list[ProbeItem], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, A]`` answer tokens (where the tokens of query + answer leave those of the query),
    right-padded with ``pad``, and their ``[N, A]`` 0/1 mask."""
    rows = []
    for i in items:
        query, full = tok(i.query).input_ids, tok(i.query + i.answer).input_ids
        start = next((k for k, (a, b) in enumerate(zip(query, full)) if a != b), len(query))
        rows.append(full[start:])
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return tokens, mask


def _answer_log_prob(stream: CachedStream, answer: torch.Tensor, processor=None) -> torch.Tensor:
    """``[N, A]`` log-probabilities of the answer tokens, teacher-forced through ``stream`` (and
    through ``processor``, which sees the stream's ids as ``generate``'s sequences would be)."""
    logits, out = stream.prefill(), []
    for j in range(answer.shape[1]):
        scores = logits.log_softmax(-1) if processor is None else processor(stream.ids, logits)
        out.append(scores.gather(-1, answer[:, j : j + 1]))
        logits = stream.advance(answer[:, j])
    return torch.cat(out, dim=1)


@torch.no_grad()
def context_conflict_probe(
    world: ToyWorld,
    items: list[ProbeItem] | None = None,
    *,
    alpha: float = 1.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, dict[str, float]]:
    """Per method (:data:`METHODS`): ``follows`` (fraction of greedy answers starting with the
    context's answer), per kind (``"follows: <kind>"``), ``log p(answer)`` (mean teacher-forced
    log-probability of the answer, nats) and ``mean α`` (over the greedy run's steps and rows).
    Each method runs all items as one left-padded batch."""
    items = probe_items() if items is None else items
    tok, model = world.tokenizer, world.target
    device, pad = model.device, tok.pad_token_id
    c_ids, c_mask = _encode(tok, [i.context + i.query for i in items], device)
    x_ids, x_mask = _encode(tok, [i.query for i in items], device)
    answer, answer_mask = _answer_tokens(tok, items, pad, device)
    scoring = {
        "query alone": (x_ids, x_mask, None),
        "plain": (c_ids, c_mask, None),
        "CAD": (c_ids, c_mask, ContextAwareLogitsProcessor(model, x_ids, x_mask, alpha=alpha)),
        "AdaCAD": (c_ids, c_mask, AdaCADLogitsProcessor(model, x_ids, x_mask)),
    }
    greedy = {"query alone": dict(alpha=0.0), "plain": dict(alpha=0.0), "CAD": dict(alpha=alpha)}
    greedy["AdaCAD"] = dict(method="adacad")
    kinds = sorted({i.kind for i in items})
    results = {}
    for method, (ids, mask, processor) in scoring.items():
        out = context_aware_generate(
            model, ids, x_ids, attention_mask=mask, context_free_attention_mask=x_mask,
            max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=[], **greedy[method],
        )  # fmt: skip
        texts = tok.batch_decode(out.sequences[:, ids.shape[1] :])
        follows = [text.startswith(i.answer.rstrip("\n(")) for text, i in zip(texts, items)]
        log_prob = (_answer_log_prob(CachedStream(model, ids, mask), answer, processor) * answer_mask).sum(-1)
        row = {
            "follows": sum(follows) / len(items),
            "log p(answer)": float(log_prob.mean()),
            "mean α": float(out.alphas.mean()),
        }
        for kind in kinds:
            picked = [f for f, i in zip(follows, items) if i.kind == kind]
            row[f"follows: {kind}"] = sum(picked) / len(picked)
        results[method] = row
    return results


def tour_section(world: ToyWorld) -> list[str]:
    """The context-conflict probe: plain vs CAD vs AdaCAD on the toy target."""
    items = probe_items(per_kind=3 if world.config.vocab_size < 1024 else None)
    results = context_conflict_probe(world, items)
    lines = [
        f"context-conflict probe: {len(items)} items ({', '.join(TEMPLATES)}), greedy, CAD α = 1",
        "method        follows context   mean log p(answer) (nats)   mean α",
    ]
    for method, row in results.items():
        lines.append(
            f"{method:<13} {row['follows']:>15.0%}   {row['log p(answer)']:>25.2f}   {row['mean α']:.4f}"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    """``python -m tokenlab.tour.context_conflict [--preset P] [--alpha A ...]``: the probe's table."""
    import argparse

    from tokenlab.tour.toy import PRESETS, load_toy_world

    parser = argparse.ArgumentParser(prog="python -m tokenlab.tour.context_conflict")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--device", default=None)
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="CAD's α values")
    args = parser.parse_args(argv)
    world = load_toy_world(args.preset, device=args.device)
    if world.target.device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: one intra-op thread is fastest (as the tour)
    items, kinds = probe_items(), sorted(TEMPLATES)
    runs = {alpha: context_conflict_probe(world, items, alpha=alpha) for alpha in args.alpha}
    first = runs[args.alpha[0]]
    rows = [("query alone", first["query alone"]), ("plain", first["plain"])]
    rows += [(f"CAD α={alpha:g}", result["CAD"]) for alpha, result in runs.items()]
    rows.append(("AdaCAD", first["AdaCAD"]))
    print(f"{len(items)} items; greedy, {MAX_NEW_TOKENS} new tokens; toy world '{args.preset}'")
    print(f"{'method':<12} {'follows':>8} " + " ".join(f"{k:>12}" for k in kinds) + "  log p(answer)  mean α")
    for name, row in rows:
        per_kind = " ".join(f"{row[f'follows: {k}']:>12.0%}" for k in kinds)
        scores = f"{row['log p(answer)']:>13.2f}  {row['mean α']:.4f}"
        print(f"{name:<12} {row['follows']:>8.0%} {per_kind}  {scores}")


if __name__ == "__main__":
    main()
