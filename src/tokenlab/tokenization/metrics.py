"""Intrinsic tokenizer metrics: compression, fertility, token premiums and parity, vocabulary use.

Every metric takes a *tokenizer* — an HF tokenizer (``PreTrainedTokenizerBase`` or a raw
``tokenizers.Tokenizer``), a tokenlab :class:`~tokenlab.tokenization.bpe.BPETokenizer`, or any callable
``str -> list[int]`` — and plain text; special tokens are never added. With ``t(s)`` the token ids of
text ``s`` and ``|·|`` a length:

* **bytes per token** of a corpus ``S``: ``Σ_s bytes(s) / Σ_s |t(s)|`` (UTF-8 bytes; higher = more
  compression);
* **fertility** (*How Good is Your Tokenizer?*, tokens per word): ``Σ_s |t(s)| / Σ_s words(s)``,
  words being whitespace-separated by default;
* **corpus token count** and **token premium** (*Explaining and Mitigating Crosslingual Tokenizer
  Inequities*, after *Language Model Tokenizers Introduce Unfairness Between Languages*): on a
  parallel corpus (the same content in each language, aligned segment by segment),
  ``CTC(L) = Σ_s |t(s_L)|`` and the premium of language ``L`` is ``CTC(L) / CTC(reference)``;
* **parity** (*Language Model Tokenizers Introduce Unfairness Between Languages*): the mean over
  aligned segments of ``|t_A(s_A)| / |t_B(s_B)|``; a tokenizer "achieves parity" for ``A`` with
  respect to ``B`` when it is close to 1. ``t_B`` defaults to ``t_A``; comparing one language under two
  tokenizers is the same formula with ``s_A = s_B``;
* **vocabulary utilisation**: the fraction of the (non-special) vocabulary that occurs at least once
  in the tokenized corpus.

:func:`compare_tokenizers` tabulates the metrics for several tokenizers on several corpora and
:func:`plot_tokenizer_comparison` draws them (matplotlib, the optional ``plot`` extra).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from tokenlab._checks import check_bool, check_choice, check_strings
from tokenlab.tokenization.bpe import BPETokenizer

TokenizerLike = PreTrainedTokenizerBase | Tokenizer | BPETokenizer | Callable[[str], Sequence[int]]
METRICS = ("bytes_per_token", "fertility", "vocabulary_utilisation")


def encode_texts(tokenizer: TokenizerLike, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (batched for HF tokenizers)."""
    texts = check_strings("texts", texts)
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    if isinstance(tokenizer, Tokenizer):
        return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    if isinstance(tokenizer, BPETokenizer):
        return [tokenizer.encode(t) for t in texts]
    if callable(tokenizer):
        return [list(tokenizer(t)) for t in texts]
    raise TypeError(
        "`tokenizer` must be an HF tokenizer, a tokenizers.Tokenizer, a BPETokenizer or a callable "
        f"str -> list[int], got {type(tokenizer).__name__}"
    )


def vocabulary_size(tokenizer: TokenizerLike) -> int:
    """Number of non-special tokens (the denominator of :func:`vocabulary_utilisation`)."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return len(tokenizer) - len(set(tokenizer.all_special_ids))
    if isinstance(tokenizer, Tokenizer):
        specials = [t for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        return tokenizer.get_vocab_size(with_added_tokens=True) - len(specials)
    if isinstance(tokenizer, BPETokenizer):
        return len(tokenizer.tokens)
    raise TypeError(
        f"the vocabulary size of a {type(tokenizer).__name__} is unknown; pass an HF or tokenlab tokenizer"
    )


def bytes_per_token(tokenizer: TokenizerLike, texts: Sequence[str]) -> float:
    """``Σ bytes(s) / Σ |t(s)|`` over ``texts`` (UTF-8 bytes per token)."""
    return _bytes_per_token(texts, encode_texts(tokenizer, texts))


def fertility(
    tokenizer: TokenizerLike, texts: Sequence[str], count_words: Callable[[str], int] | None = None
) -> float:
    """``Σ |t(s)| / Σ words(s)``: tokens per word (``count_words`` default: whitespace-separated words)."""
    return _fertility(texts, encode_texts(tokenizer, texts), count_words)


def corpus_token_count(tokenizer: TokenizerLike, texts: Sequence[str]) -> int:
    """``CTC = Σ |t(s)|``: the number of tokens needed to encode the corpus."""
    return sum(map(len, encode_texts(tokenizer, texts)))


def token_premiums(
    tokenizer: TokenizerLike, parallel: Mapping[str, Sequence[str]], reference: str
) -> dict[str, float]:
    """``CTC(L) / CTC(reference)`` for every language ``L`` of a parallel corpus
    (``{language: aligned segments}``); the reference's own premium is 1."""
    _check_parallel(parallel, reference)
    counts = {lang: corpus_token_count(tokenizer, texts) for lang, texts in parallel.items()}
    return {
        lang: _ratio(count, counts[reference], f"tokens in `{reference}`") for lang, count in counts.items()
    }


def parity(
    tokenizer: TokenizerLike,
    texts: Sequence[str],
    reference_texts: Sequence[str],
    reference_tokenizer: TokenizerLike | None = None,
) -> float:
    """Mean over aligned segments of ``|t(texts_i)| / |t_ref(reference_texts_i)|`` (``t_ref`` defaults
    to ``tokenizer``); 1 means parity. Segments that encode to no reference token are skipped."""
    if len(texts) != len(reference_texts):
        raise ValueError(
            f"`texts` and `reference_texts` must be aligned: {len(texts)} vs {len(reference_texts)} segments"
        )
    ours = encode_texts(tokenizer, texts)
    theirs = encode_texts(
        reference_tokenizer if reference_tokenizer is not None else tokenizer, reference_texts
    )
    ratios = [len(a) / len(b) for a, b in zip(ours, theirs) if b]
    if not ratios:
        raise ValueError("no reference segment encodes to any token: parity is undefined")
    return sum(ratios) / len(ratios)


def vocabulary_utilisation(tokenizer: TokenizerLike, texts: Sequence[str]) -> float:
    """Fraction of the non-special vocabulary used at least once when encoding ``texts``."""
    return _utilisation(tokenizer, encode_texts(tokenizer, texts))


def compare_tokenizers(
    tokenizers: Mapping[str, TokenizerLike],
    corpora: Mapping[str, Sequence[str]],
    count_words: Callable[[str], int] | None = None,
) -> list[dict[str, Any]]:
    """One row per (tokenizer, corpus): ``tokenizer``, ``corpus``, ``tokens``, ``bytes_per_token``,
    ``fertility`` and ``vocabulary_utilisation`` (``None`` for a callable tokenizer)."""
    rows = []
    for name, tokenizer in tokenizers.items():
        has_vocabulary = isinstance(tokenizer, (PreTrainedTokenizerBase, Tokenizer, BPETokenizer))
        for corpus, texts in corpora.items():
            encoded = encode_texts(tokenizer, texts)
            rows.append(
                {
                    "tokenizer": name,
                    "corpus": corpus,
                    "tokens": sum(map(len, encoded)),
                    "bytes_per_token": _bytes_per_token(texts, encoded),
                    "fertility": _fertility(texts, encoded, count_words),
                    "vocabulary_utilisation": _utilisation(tokenizer, encoded) if has_vocabulary else None,
                }
            )
    return rows


def plot_tokenizer_comparison(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    metrics: Sequence[str] = ("bytes_per_token", "fertility"),
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Grouped bar charts (one panel per metric, one group per corpus, one bar per tokenizer) of
    :func:`compare_tokenizers` rows, saved as an image at ``path`` (needs matplotlib: the ``plot``
    extra). An existing file is replaced only with ``overwrite=True``."""
    for metric in metrics:
        check_choice("metrics", metric, METRICS)
    check_bool("overwrite", overwrite)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"`path` {path} exists; pass overwrite=True to replace it")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'tokenlab[plot]'") from err
    names = list(dict.fromkeys(r["tokenizer"] for r in rows))
    corpora = list(dict.fromkeys(r["corpus"] for r in rows))
    value = {(r["tokenizer"], r["corpus"], m): r[m] for r in rows for m in metrics}
    labels = {
        "bytes_per_token": "bytes / token (higher: more compression)",
        "fertility": "tokens / word (lower: fewer pieces)",
        "vocabulary_utilisation": "fraction of the vocabulary used",
    }
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    width = 0.8 / len(names)
    for ax, metric in zip(axes[0], metrics):
        for k, name in enumerate(names):
            xs = [c + (k - (len(names) - 1) / 2) * width for c in range(len(corpora))]
            ys = [value.get((name, corpus, metric)) or 0.0 for corpus in corpora]
            bars = ax.bar(xs, ys, width, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(corpora)), corpora)
        ax.set_ylabel(labels[metric])
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bytes_per_token(texts: Sequence[str], encoded: Sequence[Sequence[int]]) -> float:
    return _ratio(sum(len(t.encode("utf-8")) for t in texts), sum(map(len, encoded)), "tokens")


def _fertility(
    texts: Sequence[str], encoded: Sequence[Sequence[int]], count_words: Callable[[str], int] | None
) -> float:
    count_words = count_words or (lambda text: len(text.split()))
    return _ratio(sum(map(len, encoded)), sum(count_words(t) for t in texts), "words")


def _utilisation(tokenizer: TokenizerLike, encoded: Sequence[Sequence[int]]) -> float:
    return len({i for ids in encoded for i in ids}) / vocabulary_size(tokenizer)


def _ratio(numerator: float, denominator: float, what: str) -> float:
    if denominator == 0:
        raise ValueError(f"the corpus has no {what}: the ratio is undefined")
    return numerator / denominator


def _check_parallel(parallel: Mapping[str, Sequence[str]], reference: str) -> None:
    if reference not in parallel:
        raise ValueError(f"`reference` {reference!r} is not a language of `parallel` {sorted(parallel)}")
    sizes = {lang: len(texts) for lang, texts in parallel.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"`parallel` must be aligned (the same number of segments per language), got {sizes}"
        )
