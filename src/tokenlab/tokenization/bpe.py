"""Byte-level BPE and superword (two-stage) BPE training, an encoder, and export to HF ``tokenizers``.

**BPE** (*Neural Machine Translation of Rare Words with Subword Units*, byte-level as in GPT-2):
the vocabulary starts as the 256 bytes; each step merges the most frequent adjacent pair of tokens
inside the pre-tokens of the corpus into a new token, until the vocabulary reaches ``vocab_size``
(special tokens included). With ``c(a, b) = Σ_w f(w) · #{i : w_i = a, w_{i+1} = b}`` over distinct
pre-tokens ``w`` of frequency ``f(w)``, step ``k`` picks ``argmax c`` and rewrites every occurrence of
the pair, left to right and non-overlapping. **Ties** are broken by the smallest pair
``(left id, right id)``, where ids ``0..255`` are the byte values and merged tokens follow in order
of creation. A merge whose bytes already exist as a token reuses that token's id (as HF does).

Counts are updated incrementally: an index ``pair → words that contain it`` names the only words a
merge can change, each changed word reports its pair-count deltas around each rewritten position,
and a lazy max-heap holds ``(count, pair)`` entries, with an entry pushed whenever a count grows;
a popped entry whose count is stale is pushed back with the current count. No step recounts the
corpus.

**Superword BPE** (the pre-tokenisation curriculum of *SuperBPE: Space Travel for Language Models*,
used as the superword tokenizers of *Explaining and Mitigating Crosslingual Tokenizer Inequities*;
cf. the Supertokens of *Achieving Tokenizer Flexibility in Language Models through Heuristic
Adaptation and Supertoken Learning*): stage 1 learns merges inside whitespace-bounded pre-tokens up
to ``transition_vocab_size``; stage 2 re-splits the corpus into coarser pre-tokens (by default
SuperBPE's own stage-2 rule, ``make_pre_tokenizer("superbpe")``: digit groups of ≤ 3, punctuation runs
and space runs stay apart, merges may cross spaces and single newlines), replays the stage-1 merges
in order on them and continues learning. The replay does not rewrite the coarse corpus merge by
merge: each distinct coarse pre-token is cut into stage-1 pieces, whose replays are the stage-1 words
already computed, and adjacent pieces are concatenated unless some stage-1 merge could ever fire
across their boundary (then they are replayed as one word, see ``_Replay``) — exactly the
merge-by-merge result. ``transition_vocab_size`` counts the whole vocabulary at the
transition (256 bytes + stage-1 merges + special tokens); SuperBPE's scripts count the inherited
*merges* (``num_inherit_merges``), i.e. ``transition_vocab_size = 256 + num_inherit_merges +
len(special_tokens)``. The exported tokenizer is one BPE model with the stage-2 pre-tokeniser and all
merges in rank order — and encoding by rank is what the replay reproduces, so the tokenizer encodes
text the way stage 2 saw it.

**Encoding** (:meth:`BPETokenizer.encode`, HF's semantics): split special tokens out, pre-tokenise,
and in each pre-token repeatedly merge the adjacent pair of lowest merge rank (leftmost first).
"""

from __future__ import annotations

import gc
import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from itertools import chain, pairwise
from pathlib import Path

import numpy as np
import regex
from tokenizers import Tokenizer, decoders, models
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from tokenlab._checks import check_int, check_strings
from tokenlab.tokenization.pretokenize import PreTokenizer, make_pre_tokenizer

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>",)
Pair = tuple[int, int]


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE vocabularies:
    printable Latin-1 bytes map to themselves, the other 68 bytes to ``chr(256 + k)`` in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    mapping = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + len(mapping) - len(printable))
    return mapping


# ---------------------------------------------------------------------------------------- training
class _PairIndex(dict):
    """pair → indices of the words that contain it; entries may be stale (a word that lost the pair),
    never missing. The initial groups (word indices sorted by pair) become sets on first access."""

    def __init__(self, pairs: list[Pair], bounds: list[int], word_ids: np.ndarray):
        super().__init__()
        self.group = dict(zip(pairs, pairwise(bounds)))
        self.word_ids = word_ids

    def __missing__(self, pair: Pair) -> set[int]:
        words = self[pair] = self._initial(pair)
        return words

    def take(self, pair: Pair) -> set[int]:
        """Remove and return the words of ``pair``."""
        words = self.pop(pair, None)
        return words if words is not None else self._initial(pair)

    def _initial(self, pair: Pair) -> set[int]:
        bounds = self.group.pop(pair, None)  # used once: later entries are added by merges
        return set() if bounds is None else set(self.word_ids[bounds[0] : bounds[1]].tolist())


class _MergeState:
    """Distinct pre-tokens as token-id lists with frequencies, their pair counts, the
    pair → words index and the lazy max-heap of pair counts."""

    def __init__(self, word_counts: dict[bytes, int]):
        self._index([list(w) for w in word_counts], list(word_counts.values()))

    @classmethod
    def from_token_words(cls, words: list[list[int]], freqs: list[int]) -> _MergeState:
        """The state of words that are already token-id lists (e.g. after replaying merges)."""
        state = cls.__new__(cls)
        state._index(words, freqs)
        return state

    def _index(self, words: list[list[int]], freqs: list[int]) -> None:
        """Count every adjacent pair (with numpy: one sort of all pair occurrences) and group the
        words that contain each pair; the groups become sets only when a merge needs them."""
        self.words, self.freqs = words, freqs
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        flat = np.fromiter(chain.from_iterable(words), dtype=np.int64, count=int(lengths.sum()))
        last = np.zeros(len(flat), dtype=bool)  # the last token of each word starts no pair
        last[np.cumsum(lengths)[lengths > 0] - 1] = True
        positions = np.flatnonzero(~last)
        width = int(flat.max()) + 1 if len(flat) else 1
        keys = flat[positions] * width + flat[positions + 1]
        word_of = np.repeat(np.arange(len(words)), lengths)[positions]
        order = np.argsort(keys, kind="stable")  # equal pairs together, their words in order
        keys, word_of = keys[order], word_of[order]
        starts = np.flatnonzero(np.diff(keys, prepend=-1))  # first occurrence of each distinct pair
        totals = np.add.reduceat(np.asarray(freqs, dtype=np.int64)[word_of], starts) if len(keys) else []
        unique = keys[starts]
        pairs = list(zip((unique // width).tolist(), (unique % width).tolist()))
        self.counts: defaultdict[Pair, int] = defaultdict(int, zip(pairs, np.asarray(totals).tolist()))
        self.where = _PairIndex(pairs, [*starts.tolist(), len(keys)], word_of)
        self.heap = [(-count, pair) for pair, count in self.counts.items()]
        heapq.heapify(self.heap)

    def best_pair(self) -> Pair | None:
        """The most frequent pair (ties: smallest ids), or ``None`` when no pair is left."""
        while self.heap:
            neg_count, pair = self.heap[0]
            count = self.counts.get(pair, 0)
            if count == -neg_count:
                return pair
            if count > 0:  # stale entry: put it back with the current count
                heapq.heapreplace(self.heap, (-count, pair))
            else:
                heapq.heappop(self.heap)
        return None

    def merge(self, pair: Pair, new: int) -> None:
        """Rewrite every occurrence of ``pair`` as ``new`` and update counts, index and heap."""
        a, b = pair
        deltas: defaultdict[Pair, int] = defaultdict(int)
        words, where = self.words, self.where
        for index in where.take(pair):
            word = words[index]
            try:
                i = word.index(a)
            except ValueError:  # a stale index entry: the pair left this word
                continue
            freq, n = self.freqs[index], len(word)
            out: list[int] = []
            done = 0  # word[:done] has been rewritten into out
            while True:
                if i + 1 < n and word[i + 1] == b:
                    out.extend(word[done:i])
                    deltas[pair] -= freq
                    if out:  # left neighbour, possibly a token this loop just created
                        left = out[-1]
                        deltas[left, a] -= freq
                        deltas[left, new] += freq
                        where[left, new].add(index)
                    if i + 2 < n:  # right neighbour, still unmerged
                        right = word[i + 2]
                        deltas[b, right] -= freq
                        deltas[new, right] += freq
                        where[new, right].add(index)
                    out.append(new)
                    done = i = i + 2
                else:
                    i += 1
                try:
                    i = word.index(a, i)
                except ValueError:
                    break
            if done:
                out.extend(word[done:])
                words[index] = out
        for changed, delta in deltas.items():
            count = self.counts[changed] + delta
            if count > 0:
                self.counts[changed] = count
                if delta > 0:
                    heapq.heappush(self.heap, (-count, changed))
            else:
                del self.counts[changed]


@dataclass
class _Vocabulary:
    """Token bytes by id (``0..255`` the bytes) and the merges learned so far, in rank order."""

    tokens: list[bytes] = field(default_factory=lambda: [bytes([b]) for b in range(256)])
    merges: list[Pair] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ids = {token: i for i, token in enumerate(self.tokens)}

    def add_merge(self, pair: Pair) -> int:
        """Record ``pair`` and return the id of the merged token (an existing id if its bytes exist)."""
        token = self.tokens[pair[0]] + self.tokens[pair[1]]
        if token not in self.ids:
            self.ids[token] = len(self.tokens)
            self.tokens.append(token)
        self.merges.append(pair)
        return self.ids[token]


class _Memo(dict):
    """A dict that fills itself: ``memo[key]`` computes ``fn(key)`` once."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __missing__(self, key):
        value = self[key] = self.fn(key)
        return value


class _Replay:
    """Apply a merge list to words exactly as training would (merge ``r`` rewrites every occurrence of
    its pair, left to right, before merge ``r + 1``), reusing the results of the shorter words those
    merges were learned on.

    A word ``w = u·v`` replays to ``replay(u)·replay(v)`` unless some merge fires on the pair that
    straddles the boundary. Before merge ``r`` the pair at the boundary is (last token of ``u``, first
    token of ``v``) at that time; tokens only grow, so the last token is always the token spelling a
    suffix of the *final* last token of ``replay(u)`` (ids are unique per byte string), and the first
    token a prefix of the final first token of ``replay(v)``. If no merge pairs such a suffix token with
    such a prefix token, nothing can ever fire across the boundary and the concatenation is exact;
    otherwise the two chunks are replayed as one word (the check is conservative, never wrong).
    A word is cut into the pieces of the stage-1 pre-tokeniser, whose replays are the stage-1 words
    themselves; chunks that had to be joined are replayed directly and memoised.
    """

    def __init__(self, vocab: _Vocabulary, replayed: dict[str, list[int]], split: PreTokenizer):
        self.tokens, self.ids, self.split = vocab.tokens, vocab.ids, split
        self.merges = list(vocab.merges)
        self.new_ids = [self.ids[self.tokens[a] + self.tokens[b]] for a, b in self.merges]
        self.rank: dict[Pair, int] = {}  # the last rank of each pair
        self.ranks: defaultdict[Pair, list[int]] = defaultdict(list)  # all of them: a pair can recur
        for rank, pair in enumerate(self.merges):
            self.rank[pair] = rank
            self.ranks[pair].append(rank)
        self.recurring = {pair for pair, ranks in self.ranks.items() if len(ranks) > 1}
        self.right_of: defaultdict[int, set[int]] = defaultdict(set)
        for a, b in self.merges:
            self.right_of[a].add(b)
        self.memo = dict(replayed)
        self.partners, self.prefixes = _Memo(self._partners), _Memo(self._prefixes)
        self.separable = _Memo(self._separable)  # (last token, first token) → no merge can cross

    def __call__(self, word: str) -> list[int]:
        """The token ids of ``word`` after all the merges."""
        pieces = self.split.split(word)
        chunks = [self.memo.get(piece) or self._replay(piece) for piece in pieces]
        if all(map(self.separable.__getitem__, [(x[-1], y[0]) for x, y in pairwise(chunks)])):
            return list(chain.from_iterable(chunks))
        joined: list[tuple[str, list[int]]] = []  # rare: join chunks until every boundary is separable
        for piece, ids in zip(pieces, chunks):
            while joined and not self.separable[joined[-1][1][-1], ids[0]]:
                piece = joined.pop()[0] + piece
                ids = self._replay(piece)
            joined.append((piece, ids))
        return list(chain.from_iterable(ids for _, ids in joined))

    def _separable(self, boundary: Pair) -> bool:
        """No merge pairs a suffix token of the left token with a prefix token of the right one."""
        return self.partners[boundary[0]].isdisjoint(self.prefixes[boundary[1]])

    def _partners(self, token: int) -> set[int]:
        """Tokens that some merge puts right of a token spelling a suffix of ``token``."""
        data = self.tokens[token]
        suffixes = (self.ids[data[k:]] for k in range(len(data)) if data[k:] in self.ids)
        return set().union(*(self.right_of.get(s, ()) for s in suffixes))

    def _prefixes(self, token: int) -> set[int]:
        """Tokens spelling a prefix of ``token`` (itself included)."""
        data = self.tokens[token]
        return {self.ids[data[:k]] for k in range(1, len(data) + 1) if data[:k] in self.ids}

    def _replay(self, text: str) -> list[int]:
        """The merges applied to one word: repeatedly the lowest rank above the last applied one that
        is present, rewriting all its occurrences (the training order restricted to this word)."""
        if text in self.memo:
            return self.memo[text]
        ids, last = list(text.encode("utf-8")), -1
        while len(ids) > 1:
            pairs = list(pairwise(ids))
            found = [
                (r, pair) for pair, r in zip(pairs, map(self.rank.get, pairs)) if r is not None and r > last
            ]
            if not found:
                break
            best = min(  # the first rank above `last`, which is an earlier one only for a recurring pair
                next(r for r in self.ranks[pair] if r > last) if pair in self.recurring else r
                for r, pair in found
            )
            (a, b), new, out, i = self.merges[best], self.new_ids[best], [], 0
            while i < len(ids):
                if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids, last = out, best
        self.memo[text] = ids
        return ids


def _count_pre_tokens(texts: Sequence[str], pre_tokenizer: PreTokenizer) -> dict[bytes, int]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(pre_tokenizer.split(text))
    return {piece.encode("utf-8"): count for piece, count in counts.items()}


def _learn(state: _MergeState, vocab: _Vocabulary, size: int, bar: tqdm) -> None:
    """Merge the most frequent pair until the vocabulary holds ``size`` tokens or no pair is left."""
    while len(vocab.tokens) < size and (pair := state.best_pair()) is not None:
        state.merge(pair, vocab.add_merge(pair))
        bar.update(1)


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: training allocates millions of small lists, tuples
    and sets that hold no cycles, and repeated full collections over them cost ~30 % of the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _learn_superword(
    texts: Sequence[str],
    vocab: _Vocabulary,
    sizes: tuple[int, int],
    pre_tokenizers: tuple[PreTokenizer, PreTokenizer],
    bar: tqdm,
) -> None:
    """Stage 1 up to ``sizes[0]`` tokens with ``pre_tokenizers[0]``, then the replay and stage 2 up to
    ``sizes[1]`` with ``pre_tokenizers[1]`` (a function of its own, so that its large state is freed
    before the garbage collector runs again)."""
    words = _count_pre_tokens(texts, pre_tokenizers[0])
    state = _MergeState(words)
    _learn(state, vocab, sizes[0], bar)
    bar.set_description("superword BPE: replaying stage-1 merges on coarse pre-tokens")
    replay = _Replay(vocab, {w.decode(): ids for w, ids in zip(words, state.words)}, pre_tokenizers[0])
    coarse = _count_pre_tokens(texts, pre_tokenizers[1])
    state = _MergeState.from_token_words([replay(w.decode()) for w in coarse], list(coarse.values()))
    bar.set_description("superword BPE merges (stage 2)")
    _learn(state, vocab, sizes[1], bar)


def _check_training_args(
    texts: Sequence[str], vocab_size: int, special_tokens: Sequence[str]
) -> tuple[str, ...]:
    check_strings("texts", texts)
    if not any(texts):
        raise ValueError("`texts` is empty: cannot train a tokenizer on no text")
    specials = tuple(special_tokens)
    if not all(isinstance(s, str) and s for s in specials) or len(set(specials)) != len(specials):
        raise ValueError(f"`special_tokens` must be distinct non-empty strings, got {specials!r}")
    minimum = 256 + len(specials)
    check_int("vocab_size", vocab_size, low=minimum)  # the 256-byte alphabet + the special tokens
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"`texts` contains a string that is not valid Unicode: {err}") from None
    return specials


def _check_pre_tokenizer(name: str, value: object) -> None:
    if value is not None and not isinstance(value, PreTokenizer):
        raise TypeError(
            f"`{name}` must be a PreTokenizer (e.g. make_pre_tokenizer('gpt2')) or None, "
            f"got {type(value).__name__}"
        )


def train_bpe(
    texts: Sequence[str],
    vocab_size: int,
    *,
    pre_tokenizer: PreTokenizer | None = None,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    progress: bool = True,
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer (see the module docstring for the algorithm and tie rule).

    Args:
        texts: the training corpus, one string per document.
        vocab_size: final vocabulary size: 256 bytes + merged tokens + ``special_tokens``.
        pre_tokenizer: pre-tokenisation pipeline (default: the GPT-2 regex, no digit stage).
        special_tokens: added after the learned tokens; the first one is BOS/EOS of the HF export.
        progress: show a tqdm bar over the merges.
    """
    specials = _check_training_args(texts, vocab_size, special_tokens)
    _check_pre_tokenizer("pre_tokenizer", pre_tokenizer)
    pre_tokenizer = pre_tokenizer or make_pre_tokenizer("gpt2")
    vocab = _Vocabulary()
    size = vocab_size - len(specials)
    with _no_gc(), tqdm(total=size - 256, desc="BPE merges", disable=not progress) as bar:
        _learn(_MergeState(_count_pre_tokens(texts, pre_tokenizer)), vocab, size, bar)
    return BPETokenizer(vocab.tokens, vocab.merges, pre_tokenizer, specials)


def train_superword_bpe(
    texts: Sequence[str],
    vocab_size: int,
    transition_vocab_size: int,
    *,
    pre_tokenizer: PreTokenizer | None = None,
    superword_pre_tokenizer: PreTokenizer | None = None,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    progress: bool = True,
) -> BPETokenizer:
    """Train a superword BPE tokenizer with the two-stage curriculum of *SuperBPE*.

    Stage 1 learns subword merges with ``pre_tokenizer`` (default: GPT-2 regex) until the vocabulary
    holds ``transition_vocab_size`` tokens (bytes and special tokens included; SuperBPE's
    ``num_inherit_merges`` is ``transition_vocab_size − 256 − len(special_tokens)``); stage 2 splits the
    corpus with ``superword_pre_tokenizer`` (default: SuperBPE's stage-2 rule,
    ``make_pre_tokenizer("superbpe")``; ``make_pre_tokenizer("lines")`` keeps whole lines), replays the
    stage-1 merges in rank order and learns merges across whitespace up to ``vocab_size``.
    """
    specials = _check_training_args(texts, vocab_size, special_tokens)
    _check_pre_tokenizer("pre_tokenizer", pre_tokenizer)
    _check_pre_tokenizer("superword_pre_tokenizer", superword_pre_tokenizer)
    check_int("transition_vocab_size", transition_vocab_size, low=256 + len(specials), high=vocab_size - 1)
    pre_tokenizer = pre_tokenizer or make_pre_tokenizer("gpt2")
    superword_pre_tokenizer = superword_pre_tokenizer or make_pre_tokenizer("superbpe")
    vocab = _Vocabulary()
    size = vocab_size - len(specials)
    with _no_gc(), tqdm(total=size - 256, desc="superword BPE merges", disable=not progress) as bar:
        _learn_superword(texts, vocab, (transition_vocab_size - len(specials), size),
                         (pre_tokenizer, superword_pre_tokenizer), bar)  # fmt: skip
    return BPETokenizer(vocab.tokens, vocab.merges, superword_pre_tokenizer, specials)


# ------------------------------------------------------------------------------- tokenizer object
@dataclass(frozen=True)
class BPETokenizer:
    """A trained byte-level BPE tokenizer: its own encoder/decoder and its HF export.

    Ids: ``0..255`` the bytes, then merged tokens in order of creation (``len(tokens)`` in all),
    then ``special_tokens``. ``merges[r] = (left id, right id)`` is the merge of rank ``r``.
    """

    tokens: list[bytes]
    merges: list[Pair]
    pre_tokenizer: PreTokenizer
    special_tokens: tuple[str, ...] = DEFAULT_SPECIAL_TOKENS

    def __len__(self) -> int:
        return len(self.tokens) + len(self.special_tokens)

    @cached_property
    def _ranks(self) -> dict[Pair, tuple[int, int]]:
        """pair → (rank, merged id); a pair merged twice keeps its later rank, as HF's BPE does."""
        ids = {token: i for i, token in enumerate(self.tokens)}
        return {
            pair: (rank, ids[self.tokens[pair[0]] + self.tokens[pair[1]]])
            for rank, pair in enumerate(self.merges)
        }

    @cached_property
    def _special_ids(self) -> dict[str, int]:
        return {s: len(self.tokens) + i for i, s in enumerate(self.special_tokens)}

    @cached_property
    def _special_pattern(self) -> regex.Pattern | None:
        if not self.special_tokens:
            return None
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        return regex.compile("(" + "|".join(regex.escape(s) for s in alternatives) + ")")

    def encode_pre_token(self, data: bytes) -> list[int]:
        """Token ids of one pre-token: repeatedly merge the lowest-rank adjacent pair (leftmost first)."""
        ids, ranks = list(data), self._ranks
        while len(ids) > 1:
            candidates = [(ranks[pair][0], i) for i, pair in enumerate(pairwise(ids)) if pair in ranks]
            if not candidates:
                break
            _, i = min(candidates)
            ids[i : i + 2] = [ranks[ids[i], ids[i + 1]][1]]
        return ids

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of ``text`` (a ``str``, or ``bytes`` that need not be valid UTF-8), without
        BOS/EOS; identical to the HF export's ``encode(text, add_special_tokens=False)``."""
        if isinstance(text, bytes):
            text, errors = text.decode("utf-8", errors="surrogateescape"), "surrogateescape"
        elif isinstance(text, str):
            errors = "strict"
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise ValueError(f"`text` is not valid Unicode ({err}); pass bytes instead") from None
        else:
            raise TypeError(f"`text` must be str or bytes, got {type(text).__name__}")
        parts = self._special_pattern.split(text) if self._special_pattern else [text]
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:  # the captured special tokens sit at odd positions
                ids.append(self._special_ids[part])
                continue
            for piece in self.pre_tokenizer.split(part):
                data = piece.encode("utf-8", errors=errors)
                if data not in self._cache:
                    self._cache[data] = self.encode_pre_token(data)
                ids.extend(self._cache[data])
        return ids

    @cached_property
    def _cache(self) -> dict[bytes, list[int]]:
        return {}

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes that ``ids`` stand for (special tokens as their UTF-8 text)."""
        out = []
        for i in ids:
            if 0 <= i < len(self.tokens):
                out.append(self.tokens[i])
            elif len(self.tokens) <= i < len(self):
                out.append(self.special_tokens[i - len(self.tokens)].encode())
            else:
                raise ValueError(f"`ids` contains {i}, outside the vocabulary [0, {len(self)})")
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        """``decode_bytes(ids)`` as UTF-8 text, invalid sequences replaced by U+FFFD (as HF does)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_hf(self) -> PreTrainedTokenizerFast:
        """The tokenizer as an HF ``PreTrainedTokenizerFast`` (byte-level BPE model, the same
        pre-tokeniser pipeline, the same ids); the first special token is BOS and EOS."""
        char = bytes_to_unicode()

        def as_str(token: bytes) -> str:
            return "".join(char[b] for b in token)

        vocab = {as_str(token): i for i, token in enumerate(self.tokens)}
        merges = [(as_str(self.tokens[a]), as_str(self.tokens[b])) for a, b in self.merges]
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tokenizer.pre_tokenizer = self.pre_tokenizer.to_hf()
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens(list(self.special_tokens))
        first = self.special_tokens[0] if self.special_tokens else None
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=first, eos_token=first)

    def save(self, directory: str | os.PathLike) -> Path:
        """Save the HF export (``tokenizer.json`` and config) into a new or empty ``directory``."""
        path = Path(directory)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"`directory` {path} exists and is not an empty directory; not overwriting")
        self.to_hf().save_pretrained(path)
        return path
