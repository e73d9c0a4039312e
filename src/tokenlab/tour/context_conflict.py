"""A context-conflict probe on the toy world, and the tour section of context-aware decoding.

The toy target learned Python from the standard library, so it has *parametric* habits — after
``if __name__ == "__main__":`` comes ``main()``, after ``raise`` a built-in exception, after
``return self.`` a common attribute. Each probe item pairs such a query ``x`` with a context ``c``
that defines a different name the query should use (an entry point, an exception class, an
attribute), so context and parameters conflict:

    context  c:  def launch():\\n    pass\\n\\n\\n
    query    x:  if __name__ == "__main__":\\n
    answer:      launch      (the model's habit: main)

(Queries end before the answer's leading whitespace, which BPE merges into the answer's first token.)

An answer *follows the context* when the greedy continuation of ``c + x`` starts with the defined
name. :func:`context_conflict_probe` counts that for plain decoding, CAD (fixed α) and AdaCAD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenlab.decoding import ContextAwareLogitsProcessor, context_aware_generate
from tokenlab.tour.toy import ToyWorld

# (context template, query, names): the context defines ``{name}``, the query should use it.
TEMPLATES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "entry point": (
        "def {name}():\n    pass\n\n\n",
        'if __name__ == "__main__":\n',
        ("launch", "start", "serve", "execute", "cli", "entry", "program", "go"),
    ),
    "exception": (
        "class {name}(Exception):\n    pass\n\n\n",
        "def check(value):\n    if not value:\n        raise",
        ("BadValue", "Missing", "Invalid", "Broken", "Failure", "Problem", "Denied", "Unknown"),
    ),
    "attribute": (
        "class Item:\n    def __init__(self, {name}):\n        self.{name} = {name}\n\n",
        "    def get(self):\n        return self.",
        ("width", "owner", "colour", "radius", "price", "label", "budget", "speed"),
    ),
}


@dataclass(frozen=True)
class ProbeItem:
    """One conflict: the context ``c``, the query ``x`` and the name the context defines."""

    kind: str
    context: str
    query: str
    answer: str


def probe_items(kinds: tuple[str, ...] | None = None, per_kind: int | None = None) -> list[ProbeItem]:
    """The probe's items (all templates and names unless limited)."""
    items = []
    for kind, (context, query, names) in TEMPLATES.items():
        if kinds is not None and kind not in kinds:
            continue
        items += [ProbeItem(kind, context.format(name=n), query, n) for n in names[:per_kind]]
    return items


def _follows(text: str, answer: str) -> bool:
    return text.lstrip().startswith(answer)


@torch.no_grad()
def context_conflict_probe(
    world: ToyWorld,
    items: list[ProbeItem] | None = None,
    *,
    alpha: float = 1.0,
    max_new_tokens: int = 6,
) -> dict[str, dict[str, float]]:
    """Fraction of items whose greedy answer starts with the context's name, per decoding method.

    Returns ``{method: {"all": rate, <kind>: rate, ...}}`` for ``"context-free"`` (the query alone:
    the model's habit), ``"plain"`` (context + query), ``"CAD"`` (α = ``alpha``) and ``"AdaCAD"``.
    All rows of one method run as one left-padded batch.
    """
    items = probe_items() if items is None else items
    tok, model = world.tokenizer, world.target
    device = model.device
    pad = tok.pad_token_id

    def batch(texts):
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
        return enc.input_ids.to(device), enc.attention_mask.to(device)

    c_ids, c_mask = batch([i.context + i.query for i in items])
    x_ids, x_mask = batch([i.query for i in items])
    common = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=[])
    outputs = {
        "context-free": context_aware_generate(
            model, x_ids, x_ids, attention_mask=x_mask, context_free_attention_mask=x_mask, alpha=0.0, **common
        ).sequences[:, x_ids.shape[1] :],
    }
    for name, kwargs in (("plain", dict(alpha=0.0)), ("CAD", dict(alpha=alpha)), ("AdaCAD", dict(method="adacad"))):
        out = context_aware_generate(
            model, c_ids, x_ids, attention_mask=c_mask, context_free_attention_mask=x_mask, **kwargs, **common
        )
        outputs[name] = out.sequences[:, c_ids.shape[1] :]
    rates = {}
    for name, tokens in outputs.items():
        follows = [_follows(text, i.answer) for text, i in zip(tok.batch_decode(tokens), items)]
        kinds = {i.kind for i in items}
        per_kind = {
            k: sum(f for f, i in zip(follows, items) if i.kind == k) / sum(i.kind == k for i in items) for k in kinds
        }
        rates[name] = {"all": sum(follows) / len(items), **dict(sorted(per_kind.items()))}
    return rates


def tour_section(world: ToyWorld) -> list[str]:
    """The context-conflict probe (plain vs CAD vs AdaCAD) and the batched processor in ``generate``."""
    items = probe_items(per_kind=4 if world.config.vocab_size < 1024 else None)
    rates = context_conflict_probe(world, items)
    lines = [f"context-conflict probe: {len(items)} items ({', '.join(TEMPLATES)}); answers following the context:"]
    for name, r in rates.items():
        detail = ", ".join(f"{k} {v:.0%}" for k, v in r.items() if k != "all")
        lines.append(f"  {name:>12}: {r['all']:.0%}  ({detail})")
    tok, model = world.tokenizer, world.target
    enc = tok([i.context + i.query for i in items[:3]], return_tensors="pt", padding=True, padding_side="left")
    free = tok([i.query for i in items[:3]], return_tensors="pt", padding=True, padding_side="left")
    processor = ContextAwareLogitsProcessor(model, free.input_ids.to(model.device), free.attention_mask.to(model.device))
    model.generate(
        input_ids=enc.input_ids.to(model.device), attention_mask=enc.attention_mask.to(model.device),
        logits_processor=[processor], max_new_tokens=4, num_beams=2, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    lines.append(
        f"CAD as a LogitsProcessor in generate (3 left-padded prompts, 2 beams): context-free cache of "
        f"{processor.stream.cache.get_seq_length()} columns, advanced one token per step"
    )
    return lines
