"""Dynamic tokenization: batch-level merges against a recount reference, word boundaries, decoding,
length saved, and the model run (no merges = the plain run; merged tokens = the mean of their parts)."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import pytest
import torch

from tokenlab.tokenization import batch_merges, dynamic_tokenize, mean_of_parts, run_dynamic

TEXTS = [
    "def forward(self, hidden_states):\n    return self.forward_impl(hidden_states)\n",
    "    hidden_states = self.norm(hidden_states)\n    return hidden_states\n",
    "x = 1",
]


def _reference_merges(input_ids, word_ids, min_frequency=2):
    """Recount every pair inside words at every step; ties: smallest (left, right) unit ids."""
    words = []
    for ids, wids in zip(input_ids, word_ids):
        for k, (i, w) in enumerate(zip(ids, wids)):
            if k and w is not None and wids[k - 1] == w:
                words[-1].append(i)
            else:
                words.append([i])
    next_id = max(i for ids in input_ids for i in ids) + 1
    parts, merges = {}, []
    while True:
        counts = Counter(p for w in words for p in pairwise(w))
        if not counts or max(counts.values()) < min_frequency:
            return merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append((parts.get(pair[0], (pair[0],)), parts.get(pair[1], (pair[1],))))
        parts[next_id] = merges[-1][0] + merges[-1][1]
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if tuple(w[i : i + 2]) == pair:
                    out.append(next_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
        next_id += 1


def test_batch_merges_equal_recount_and_stay_inside_words(tiny_world):
    tok = tiny_world.tokenizer
    batch = dynamic_tokenize(tok, TEXTS)
    encoding = tok(TEXTS)
    word_ids = [encoding.word_ids(b) for b in range(len(TEXTS))]
    assert batch.merges == _reference_merges(encoding["input_ids"], word_ids)
    assert batch.merges, "no merge on repetitive text"
    for spans, wids in zip(batch.spans, word_ids):
        assert spans[0][0] == 0 and spans[-1][1] == len(wids)
        assert all(a[1] == b[0] for a, b in pairwise(spans))  # a partition of the sequence
        for start, end in spans:
            assert end - start == 1 or len({wids[k] for k in range(start, end)}) == 1  # never across words
            assert None not in wids[start:end] or end - start == 1
    assert batch.decode(tok) == [tok.decode(ids) for ids in encoding["input_ids"]] == TEXTS
    assert batch.dynamic_length < batch.original_length and batch.saved_fraction > 0.1
    assert batch_merges([[1, 2, 1, 2]], [[0, 0, 1, 1]], num_merges=0).merges == []
    limited = dynamic_tokenize(tok, TEXTS, num_merges=2)
    assert limited.merges == batch.merges[:2]


def test_word_boundaries_and_special_tokens_are_respected():
    # the pair (5, 6) occurs 3 times but twice across a word boundary or next to a special token
    batch = batch_merges([[5, 6, 5, 6], [5, 6, 9]], [[0, 0, 1, 1], [0, None, None]])
    assert batch.merges == [((5,), (6,))]  # (5, 6) inside words 0 and 1 of sequence 0: 2 occurrences
    assert batch.spans == [[(0, 2), (2, 4)], [(0, 1), (1, 2), (2, 3)]]
    assert batch_merges([[5, 6], [5, 6]], [[0, 1], [0, 1]]).merges == []  # only across words


def test_no_merges_equals_the_plain_run(tiny_world):
    model, tok = tiny_world.target.double(), tiny_world.tokenizer
    try:
        batch = dynamic_tokenize(tok, TEXTS, num_merges=0)
        with torch.no_grad():
            dynamic = run_dynamic(model, batch).logits
            padded = tok(TEXTS, return_tensors="pt", padding=True)
            plain = model(**padded).logits
        mask = padded["attention_mask"].bool()
        assert torch.equal(dynamic[mask], plain[mask])
        assert torch.equal(batch.to_original(dynamic)[mask], plain[mask])
    finally:
        model.float()


def test_merged_embeddings_are_the_mean_of_parts_and_outputs_map_back(tiny_world):
    model, tok = tiny_world.target, tiny_world.tokenizer
    batch = dynamic_tokenize(tok, TEXTS)
    table = model.get_input_embeddings().weight.detach()
    embeds, mask = batch.inputs_embeds(table)
    assert embeds.shape == (3, max(map(len, batch.spans)), table.shape[1])
    for row, units in enumerate(batch.units):
        assert int(mask[row].sum()) == len(units)
        for j, unit in enumerate(units):
            torch.testing.assert_close(embeds[row, j], table[list(unit)].mean(0), rtol=0, atol=1e-6)
    first = lambda parts, e: torch.stack([e[p[0]] for p in parts])  # a pluggable embedder
    embeds_first, _ = batch.inputs_embeds(table, first)
    assert torch.equal(embeds_first[0, 0], table[batch.units[0][0][0]])
    with torch.no_grad():
        out = run_dynamic(model, batch, embedder=mean_of_parts).logits
    values = torch.arange(out.shape[1], dtype=torch.float64).expand(3, -1)
    back = batch.to_original(values, "broadcast")
    last = batch.to_original(values, "last")
    for row, spans in enumerate(batch.spans):
        for j, (start, end) in enumerate(spans):
            assert (back[row, start:end] == j).all()
            assert last[row, end - 1] == j and torch.isnan(last[row, start : end - 1]).all()
    with pytest.raises(ValueError, match="`mode`"):
        batch.to_original(values, "first")
    with pytest.raises(ValueError, match="`embedder`"):
        batch.inputs_embeds(table, lambda parts, e: e[:1])


def test_bad_texts_are_named(tiny_world):
    for bad in (3, "one text", ["a", 3], ["a", None]):  # 3 used to fail iterating, without naming `texts`
        with pytest.raises(TypeError, match="`texts` must be a sequence of str"):
            dynamic_tokenize(tiny_world.tokenizer, bad)
