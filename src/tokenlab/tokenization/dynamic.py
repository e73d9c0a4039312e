"""Dynamic tokenization: batch-level BPE merges on top of a model's tokens, new embeddings from parts.

*Retrofitting (Large) Language Models with Dynamic Tokenization* (Feher, Vulić, Minixhofer) shortens
the sequences of a batch without retraining: starting from the static tokenization, it counts the
adjacent token pairs *within words* over the whole batch, merges the most frequent pair into a new
token, and repeats — byte-pair encoding run on the batch itself, with the tokenizer's tokens as the
alphabet. Merges never cross a word (pre-token) boundary, so a dynamic token is a run of original
tokens inside one word. Each new token needs an input embedding: the paper predicts it with a
hypernetwork from the token's decomposition; here it is a function of the parts' embeddings, the
mean by default (:func:`mean_of_parts`) and pluggable.

With ``c(x, y)`` the number of adjacent occurrences of units ``x, y`` inside one word anywhere in the
batch, step ``k`` merges ``argmax c`` (ties: the smallest pair of unit ids, where original tokens keep
their ids and merged units get ids above every id of the batch, in order of creation) and rewrites its
occurrences left to right — the same merge step as :func:`~tokenlab.tokenization.train_bpe`, whose
incremental pair counter it reuses. Merging stops after ``num_merges`` merges or when no pair occurs
``min_frequency`` times (default 2: a merge must shorten the batch by at least two tokens).

Running the model (:func:`run_dynamic`): the dynamic sequence ``u_1 … u_{L'}`` is embedded (original
rows for single tokens, the embedder for merged ones) and passed as ``inputs_embeds`` with positions
``0 … L'−1``; outputs come back per dynamic token, ``[B, L', …]``. :meth:`DynamicBatch.to_original`
maps them to the original positions ``[B, L, …]``: ``"broadcast"`` gives every original token the
output of the dynamic token containing it (encoder use); ``"last"`` puts the output of each dynamic
token at its last original position and ``fill`` elsewhere — for a causal LM, the output at ``u_j``
predicts the original token that follows ``u_j``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenlab._checks import check_choice, check_int, check_strings, check_tensor
from tokenlab.tokenization.bpe import _MergeState

Parts = tuple[int, ...]
Embedder = Callable[[Sequence[Parts], torch.Tensor], torch.Tensor]


def mean_of_parts(parts: Sequence[Parts], embeddings: torch.Tensor) -> torch.Tensor:
    """``e(u) = (1/|u|) Σ_{t ∈ u} E[t]`` for each new token ``u`` (a tuple of original ids): ``[N, d]``."""
    return torch.stack([embeddings[list(p)].mean(0) for p in parts]) if parts else embeddings[:0]


@dataclass
class DynamicBatch:
    """A batch after batch-level merges.

    Attributes:
        input_ids: the original token ids per sequence (unpadded), ``L_b`` each.
        spans: per sequence, the ``(start, end)`` original positions of each dynamic token (``L'_b``).
        merges: the merges in order, as pairs of original-id tuples.
    """

    input_ids: list[list[int]]
    spans: list[list[tuple[int, int]]]
    merges: list[tuple[Parts, Parts]] = field(default_factory=list)

    @property
    def units(self) -> list[list[Parts]]:
        """The original ids making up each dynamic token."""
        return [[tuple(ids[s:e]) for s, e in spans] for ids, spans in zip(self.input_ids, self.spans)]

    @property
    def new_tokens(self) -> list[Parts]:
        """The distinct merged units (two or more original tokens), in order of first appearance."""
        return list(dict.fromkeys(u for seq in self.units for u in seq if len(u) > 1))

    @property
    def original_length(self) -> int:
        return sum(map(len, self.input_ids))

    @property
    def dynamic_length(self) -> int:
        return sum(map(len, self.spans))

    @property
    def saved_fraction(self) -> float:
        """``1 − Σ L'_b / Σ L_b``: the share of tokens the merges removed."""
        return 1 - self.dynamic_length / self.original_length if self.original_length else 0.0

    def decode(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The text of each sequence, from the parts of its dynamic tokens."""
        return [tokenizer.decode([i for u in seq for i in u]) for seq in self.units]

    def inputs_embeds(
        self, embeddings: torch.Tensor, embedder: Embedder = mean_of_parts
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``inputs_embeds [B, L', d]`` (single tokens: their rows of ``embeddings
        [V, d]``; merged ones: ``embedder``) and ``attention_mask [B, L']``."""
        check_tensor("embeddings", embeddings, ndim=2, floating=True)
        new = self.new_tokens
        new_rows = embedder(new, embeddings)
        check_tensor("embedder(...)", new_rows, ndim=2, floating=True)
        if tuple(new_rows.shape) != (len(new), embeddings.shape[1]):
            raise ValueError(
                f"`embedder` must return [{len(new)}, {embeddings.shape[1]}], got {tuple(new_rows.shape)}"
            )
        index = {u: k for k, u in enumerate(new)}
        width = max(map(len, self.spans), default=0)
        ids = torch.zeros(len(self.spans), width, dtype=torch.long)  # original id, or the new token's row
        is_new = torch.zeros(len(self.spans), width, dtype=torch.bool)
        mask = torch.zeros(len(self.spans), width, dtype=torch.long)
        for row, seq in enumerate(self.units):
            ids[row, : len(seq)] = torch.tensor([u[0] if len(u) == 1 else index[u] for u in seq])
            is_new[row, : len(seq)] = torch.tensor([len(u) > 1 for u in seq])
            mask[row, : len(seq)] = 1
        ids, is_new = ids.to(embeddings.device), is_new.to(embeddings.device)
        out = embeddings[torch.where(is_new, 0, ids)]
        out[is_new] = new_rows.to(out.dtype)[ids[is_new]]
        return out, mask.to(embeddings.device)

    def to_original(
        self, values: torch.Tensor, mode: str = "broadcast", fill: float = math.nan
    ) -> torch.Tensor:
        """Map per-dynamic-token ``values [B, L', …]`` to original positions ``[B, L, …]`` (right
        padded with ``fill``): ``"broadcast"`` copies each dynamic token's value to all its original
        positions, ``"last"`` only to its last one."""
        check_choice("mode", mode, ("broadcast", "last"))
        check_tensor("values", values)
        if values.shape[0] != len(self.spans) or values.shape[1] < max(map(len, self.spans), default=0):
            raise ValueError(f"`values` must be [B={len(self.spans)}, L'≥{max(map(len, self.spans))}, …]")
        width = max(map(len, self.input_ids), default=0)
        out = values.new_full((len(self.spans), width, *values.shape[2:]), fill)
        for row, spans in enumerate(self.spans):
            for j, (start, end) in enumerate(spans):
                if mode == "broadcast":
                    out[row, start:end] = values[row, j]
                else:
                    out[row, end - 1] = values[row, j]
        return out


def batch_merges(
    input_ids: Sequence[Sequence[int]],
    word_ids: Sequence[Sequence[int | None]],
    *,
    num_merges: int | None = None,
    min_frequency: int = 2,
) -> DynamicBatch:
    """Batch-level BPE over ``input_ids`` (token ids per sequence) within the words given by
    ``word_ids`` (per token: its word index in the sequence, ``None`` for tokens never merged, e.g.
    special tokens; an HF fast tokenizer's ``BatchEncoding.word_ids(b)``)."""
    if num_merges is not None:
        check_int("num_merges", num_merges, low=0)
    check_int("min_frequency", min_frequency, low=1)
    if len(input_ids) != len(word_ids) or any(len(a) != len(b) for a, b in zip(input_ids, word_ids)):
        raise ValueError("`input_ids` and `word_ids` must have the same shape (one word id per token)")
    ids = [[int(i) for i in seq] for seq in input_ids]
    if any(i < 0 for seq in ids for i in seq):
        raise ValueError("`input_ids` must hold non-negative token ids")
    runs: list[list[tuple[int, int]]] = []  # per sequence: (start, end) of each word (or lone token)
    for words in word_ids:
        spans: list[tuple[int, int]] = []
        for pos, word in enumerate(words):
            if spans and word is not None and words[pos - 1] == word:
                spans[-1] = (spans[-1][0], pos + 1)
            else:
                spans.append((pos, pos + 1))
        runs.append(spans)
    counts: dict[Parts, int] = {}
    for seq, spans in zip(ids, runs):
        for s, e in spans:
            if e - s > 1:
                counts[tuple(seq[s:e])] = counts.get(tuple(seq[s:e]), 0) + 1
    words = list(counts)
    state = _MergeState.from_token_words([list(w) for w in words], list(counts.values()))
    parts: dict[int, Parts] = {}
    merges: list[tuple[Parts, Parts]] = []
    next_id = max((i for seq in ids for i in seq), default=-1) + 1
    while num_merges is None or len(merges) < num_merges:
        pair = state.best_pair()
        if pair is None or state.counts[pair] < min_frequency:
            break
        left, right = parts.get(pair[0], (pair[0],)), parts.get(pair[1], (pair[1],))
        parts[next_id] = left + right
        merges.append((left, right))
        state.merge(pair, next_id)
        next_id += 1
    merged = {w: [len(parts.get(u, (u,))) for u in final] for w, final in zip(words, state.words)}
    spans_out = []
    for seq, spans in zip(ids, runs):
        out: list[tuple[int, int]] = []
        for s, e in spans:
            start = s
            for size in merged.get(tuple(seq[s:e]), [1]):
                out.append((start, start + size))
                start += size
        spans_out.append(out)
    return DynamicBatch(ids, spans_out, merges)


def dynamic_tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    num_merges: int | None = None,
    min_frequency: int = 2,
    add_special_tokens: bool = True,
) -> DynamicBatch:
    """Tokenize ``texts`` with an HF fast tokenizer and apply :func:`batch_merges` within its
    pre-tokenizer's words."""
    if not isinstance(tokenizer, PreTrainedTokenizerBase) or not tokenizer.is_fast:
        raise TypeError(
            "`tokenizer` must be an HF fast tokenizer (its word ids mark the pre-token boundaries)"
        )
    texts = check_strings("texts", texts)
    encoding = tokenizer(texts, add_special_tokens=add_special_tokens)
    word_ids = [encoding.word_ids(b) for b in range(len(texts))]
    return batch_merges(encoding["input_ids"], word_ids, num_merges=num_merges, min_frequency=min_frequency)


def run_dynamic(
    model: PreTrainedModel, batch: DynamicBatch, embedder: Embedder = mean_of_parts, **kwargs: object
) -> object:
    """``model(inputs_embeds=…, attention_mask=…, **kwargs)`` on the dynamic batch; outputs are per
    dynamic token (``[B, L', …]``; map them back with :meth:`DynamicBatch.to_original`)."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"`model` must be an HF PreTrainedModel, got {type(model).__name__}")
    if not isinstance(batch, DynamicBatch):
        raise TypeError(f"`batch` must be a DynamicBatch (see dynamic_tokenize), got {type(batch).__name__}")
    embeddings = model.get_input_embeddings().weight
    inputs_embeds, attention_mask = batch.inputs_embeds(embeddings, embedder)
    return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
