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
in order on them and continues learning. ``transition_vocab_size`` counts the whole vocabulary at the
transition (256 bytes + stage-1 merges + special tokens); SuperBPE's scripts count the inherited
*merges* (``num_inherit_merges``), i.e. ``transition_vocab_size = 256 + num_inherit_merges +
len(special_tokens)``. The exported tokenizer is one BPE model with the stage-2 pre-tokeniser and all
merges in rank order — and encoding by rank is what the replay reproduces, so the tokenizer encodes
text the way stage 2 saw it.

**Encoding** (:meth:`BPETokenizer.encode`, HF's semantics): split special tokens out, pre-tokenise,
and in each pre-token repeatedly merge the adjacent pair of lowest merge rank (leftmost first).
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from itertools import pairwise
from pathlib import Path

import regex
from tokenizers import Tokenizer, decoders, models
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from tokenlab._checks import check_int
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
class _MergeState:
    """Distinct pre-tokens as token-id lists with frequencies, their pair counts, the
    pair → words index and the lazy max-heap of pair counts."""

    def __init__(self, word_counts: dict[bytes, int]):
        self.words = [list(w) for w in word_counts]
        self.freqs = list(word_counts.values())
        self.counts: defaultdict[Pair, int] = defaultdict(int)
        self.where: defaultdict[Pair, set[int]] = defaultdict(set)
        for index, (word, freq) in enumerate(zip(self.words, self.freqs)):
            for pair in pairwise(word):
                self.counts[pair] += freq
                self.where[pair].add(index)
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
        for index in self.where.pop(pair, ()):
            word, freq = self.words[index], self.freqs[index]
            out: list[int] = []
            done, n = 0, len(word)  # word[:done] has been rewritten into out
            i = _find(word, a, 0)
            while i >= 0:
                if i + 1 < n and word[i + 1] == b:
                    out.extend(word[done:i])
                    deltas[pair] -= freq
                    if out:  # left neighbour, possibly a token this loop just created
                        deltas[out[-1], a] -= freq
                        deltas[out[-1], new] += freq
                        self.where[out[-1], new].add(index)
                    if i + 2 < n:  # right neighbour, still unmerged
                        deltas[b, word[i + 2]] -= freq
                        deltas[new, word[i + 2]] += freq
                        self.where[new, word[i + 2]].add(index)
                    out.append(new)
                    done = i + 2
                    i = _find(word, a, done)
                else:
                    i = _find(word, a, i + 1)
            if done:
                out.extend(word[done:])
                self.words[index] = out
        for changed, delta in deltas.items():
            count = self.counts[changed] + delta
            if count > 0:
                self.counts[changed] = count
                if delta > 0:
                    heapq.heappush(self.heap, (-count, changed))
            else:
                del self.counts[changed]


def _find(word: list[int], token: int, start: int) -> int:
    """Index of the first ``token`` in ``word[start:]``, or -1."""
    try:
        return word.index(token, start)
    except ValueError:
        return -1


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


def _check_training_args(
    texts: Sequence[str], vocab_size: int, special_tokens: Sequence[str]
) -> tuple[str, ...]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"`texts` must be a sequence of str, got {type(texts).__name__}")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("`texts` must contain only str")
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
    with tqdm(total=size - 256, desc="BPE merges", disable=not progress) as bar:
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
    with tqdm(total=size - 256, desc="superword BPE merges", disable=not progress) as bar:
        stage1_size = transition_vocab_size - len(specials)
        _learn(_MergeState(_count_pre_tokens(texts, pre_tokenizer)), vocab, stage1_size, bar)
        bar.set_description("superword BPE: replaying stage-1 merges on coarse pre-tokens")
        state = _MergeState(_count_pre_tokens(texts, superword_pre_tokenizer))
        for pair in vocab.merges:
            state.merge(pair, vocab.ids[vocab.tokens[pair[0]] + vocab.tokens[pair[1]]])
        bar.set_description("superword BPE merges (stage 2)")
        _learn(state, vocab, size, bar)
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
