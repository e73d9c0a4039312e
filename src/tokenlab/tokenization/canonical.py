"""Canonical token sequences of a byte-level BPE tokenizer, and the prefixes of canonical sequences.

A tokenizer maps every text ``s`` (here: every byte string; bytes that are not valid UTF-8 are
pre-tokenised as one private-use character each) to its **canonical** encoding ``τ(s)``:
pre-tokenise ``s`` into pieces ``p_1 … p_m`` (:class:`~tokenlab.tokenization.pretokenize.PreTokenizer`
read from the tokenizer), then BPE-encode each piece on its own, ``τ(s) = bpe(p_1) ⋯ bpe(p_m)``.
A language model trained on canonical encodings puts its mass on them, so the byte prefixes of its
text are covered by the **canonical prefixes**: token sequences ``c`` with ``c ⊑ τ(s)`` for some
``s`` (``⊑``: is a prefix of). *Exact Byte-Level Probabilities from Tokenized Language Models for
FIM-Tasks and Model Ensembles* (Phan et al.) sums over cover encodings that are canonical; without
pre-tokenisation a prefix of a canonical sequence is canonical, so "canonical" and "canonical
prefix" coincide. With a regex pre-tokeniser they do not: ``"  a"`` is ``[Ġ][Ġ][a]`` (pieces ``" "``,
``" a"``) while ``"  "`` alone is ``[ĠĠ]``; right-to-left digit groups regroup the whole run when a
digit arrives. This module decides canonical prefixes under pre-tokenisation.

**The argument.** Let ``c`` be a canonical prefix with text ``y = decode(c)``, and ``t`` a token with
bytes ``z``. ``c·t`` is a canonical prefix iff some continuation ``w`` has ``c·t ⊑ τ(y z w)``.

1. *Pieces and bigrams.* ``c·t ⊑ τ(y z w)`` iff (a) every piece boundary of ``y z w`` inside ``y z``
   is a token boundary of ``c·t``, (b) inside each piece the tokens are a BPE encoding, and (c) the
   piece that holds the end of ``y z`` keeps a token boundary there. For BPE, a token sequence is
   the encoding of its bytes iff each token is (its bytes encode to itself) and each adjacent pair
   is (*Language Models over Canonical Byte-Pair Encodings*, Vieira et al.: canonicality is
   decided by bigrams). A pair ``(l, r)`` is canonical iff no merge across the junction fires
   while encoding ``bytes(l)·bytes(r)``: with ``R_i`` the right spine of ``l``'s merge tree (``R_0``
   its last byte) and ``L_j`` the left spine of ``r``'s, ``R_i`` sits at the junction while
   ``ρ(R_i) < m < ρ(R_{i+1})`` and ``L_j`` while ``ρ(L_j) < m ≤ ρ(L_{j+1})`` (``ρ``: rank of the
   merge that created a token; equal ranks resolve leftmost first), and the pair is canonical iff
   no merge ``(R_i, L_j)`` of rank ``m`` falls in both windows (:meth:`ByteLevelBPE.canonical_pairs`).
2. *Stable cuts.* A position ``b`` of ``y`` is a stable cut when every continuation keeps it as a
   piece boundary and leaves the pieces before it alone: ``π(y w) = π(y[:b]) + π(y[b:] w)``. Then
   ``c = τ(y[:b]) + c'`` and only the short *window* ``y[b:]`` with its tokens ``c'`` matters
   (:meth:`ByteLevelBPE.stable_cut`).
3. *Continuations.* Which continuations ``w`` must be tried? The pre-tokenisers in use (GPT-2,
   Llama-3 and Qwen patterns, this library's whitespace/lines/digit stages) **decide whether a
   position is a piece boundary from at most two characters of text, the one before and the one
   after it, except inside a run of digits**, whose right-to-left groups depend on its length; and
   two characters that every atom of the patterns accepts or rejects alike are interchangeable
   (:meth:`~tokenlab.tokenization.pretokenize.PreTokenizer.representative_characters`). So the piece
   boundaries of ``y z w`` before the last character of ``y z`` (and before the trailing digit
   run) are those of ``y z`` itself, and the ones after are realised by continuations drawn from
   ``""``, one representative character, two equal representatives (digit phases), and the
   completions of a character that ``y z`` ends inside. If no such continuation satisfies (a)–(b),
   none does.
4. *The open piece.* A continuation may keep the last piece open past ``y z`` (``"  "`` followed by a
   letter: the second space starts ``" a"``). Then (c) asks for a next token ``t'`` in that piece
   with ``(t, t')`` canonical — by bigrams, the token boundary survives iff such a ``t'`` exists —
   and ``c·t·t'`` must itself be a canonical prefix: the same test, one token deeper
   (:data:`STRADDLE_DEPTH` levels; a piece forced open past two more tokens does not occur in
   these pre-tokenisers).

The set of canonical prefixes is prefix-closed, so the canonical prefixes with a given text are
built token by token from shorter ones — what :class:`~tokenlab.tokenization.byte_level.ByteLevelLM`
does as bytes arrive.
"""

from __future__ import annotations

import itertools
import json
import unicodedata
from collections.abc import Sequence

import numpy as np
import regex
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from tokenlab.tokenization.bpe import bytes_to_unicode
from tokenlab.tokenization.pretokenize import PreTokenizer

STRADDLE_DEPTH = 3
"""How many tokens past the text a forced-open piece is followed to find a surviving boundary."""

_NEVER = float("inf")
_LAID, _UNLAID = 1, 2  # the states of a token in a window's laid-end-to-end table
_CACHE_ITEMS = 4_000_000


class _Memo(dict):
    """A memo table that empties itself when the items it holds (tokens, pairs …) pass ``_CACHE_ITEMS``."""

    items = 0

    def put(self, key, value, cost: int = 1):
        if self.items + cost > _CACHE_ITEMS:
            self.clear()
            self.items = 0
        self.items += cost
        self[key] = value
        return value


def _lossless_text(data: bytes) -> tuple[str, list[int]]:
    """Decode ``data`` as UTF-8 with each invalid byte mapped to a private-use character, and the byte
    offset of every character (so pre-tokenizer character offsets map back to bytes)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if text.isascii():
            return text, list(range(len(data) + 1))
        return text, [0, *itertools.accumulate(len(c.encode()) for c in text)]
    chars: list[str] = []
    offsets: list[int] = []
    pos = 0
    while pos < len(data):
        for width in (1, 2, 3, 4):
            try:
                ch = data[pos : pos + width].decode("utf-8")
            except UnicodeDecodeError:
                continue
            break
        else:
            ch, width = chr(0xE000 + data[pos]), 1
        chars.append(ch)
        offsets.append(pos)
        pos += width
    offsets.append(pos)
    return "".join(chars), offsets


def _partial_tail(data: bytes) -> bytes:
    """The bytes of an unfinished UTF-8 character at the end of ``data`` (``b""`` if none)."""
    for back in (1, 2, 3):
        if back > len(data):
            break
        lead = data[-back]
        if lead < 0x80:
            return b""
        if lead >= 0xC0:
            width = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            return data[-back:] if back < width else b""
    return b""


def _undecided_from(data: bytes) -> int:
    """The first byte offset whose piece-boundary status may still change as text is appended (module
    docstring, step 3): the start of the last character — of the unfinished one, if any — or of the
    trailing run of digits it ends."""
    if data.isascii():
        first = len(data) - 1
        while first > 0 and data[first : first + 1].isdigit() and data[first - 1 : first].isdigit():
            first -= 1
        return max(first, 0)
    text, offsets = _lossless_text(data)
    first = len(text) - 1
    while first > 0 and text[first].isnumeric() and text[first - 1].isnumeric():
        first -= 1
    return min(offsets[max(first, 0)], len(data) - len(_partial_tail(data)))


def _match_ends(pattern: regex.Pattern, text: str) -> np.ndarray:
    """The start and end offsets of every match of ``pattern`` in ``text`` (repeats allowed). When the
    matches tile the text (the usual pre-tokeniser), they are the running sums of the matched lengths —
    ``findall`` builds no match objects."""
    if not pattern.groups:
        lengths = np.fromiter(map(len, pattern.findall(text)), dtype=np.int64)
        if int(lengths.sum()) == len(text):
            return np.concatenate([[0], np.cumsum(lengths)])
    spans = [match.span() for match in pattern.finditer(text)]
    return np.asarray(spans, dtype=np.int64).reshape(-1)


class ByteLevelBPE:
    """The byte view of a Hugging Face byte-level BPE tokenizer, with its canonical prefixes.

    Reads the vocabulary, merges and pre-tokeniser from the tokenizer's backend JSON and gives each
    token's bytes, the canonical encoding of arbitrary bytes (also invalid UTF-8 and strings that end
    inside a character), the canonical bigram test, stable cuts and the canonical one-token
    extensions of a canonical prefix (see the module docstring).

    Raises:
        ValueError: the tokenizer is not a fast tokenizer with a BPE model and byte-level decoding, or
            its pre-tokeniser is not one :meth:`PreTokenizer.from_hf` reads.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise ValueError("`tokenizer` must be a fast (Rust-backed) Hugging Face tokenizer")
        state = json.loads(backend.to_str())
        model_type = state["model"].get("type")
        if model_type != "BPE":
            raise ValueError(f"`tokenizer` must be a BPE tokenizer, got a {model_type} model")
        if "ByteLevel" not in json.dumps(state.get("decoder")):
            raise ValueError("`tokenizer` must be a byte-level BPE tokenizer (ByteLevel decoder)")
        pre = state.get("pre_tokenizer")
        if pre is not None and '"add_prefix_space": true' in json.dumps(pre):
            raise ValueError("`tokenizer` adds a prefix space: decode(encode(x)) != x, unsupported")
        self.pre_tokenizer = PreTokenizer.from_hf(pre)
        unicode_to_byte = {c: b for b, c in bytes_to_unicode().items()}
        special = {a["content"] for a in state.get("added_tokens", [])}
        vocab: dict[str, int] = state["model"]["vocab"]
        size = max(len(tokenizer), max(vocab.values()) + 1)
        self.vocab_size = size
        self.token_bytes: list[bytes | None] = [None] * size
        for token, idx in vocab.items():
            if token not in special and all(c in unicode_to_byte for c in token):
                self.token_bytes[idx] = bytes(unicode_to_byte[c] for c in token)
        self.byte_token_ids = [i for i, b in enumerate(self.token_bytes) if b]
        self.max_token_bytes = max(len(self.token_bytes[i]) for i in self.byte_token_ids)
        self.token_id = {self.token_bytes[i]: i for i in self.byte_token_ids}
        self._token_texts: list[tuple[str, list[int] | None] | None] = [None] * size
        for i in self.byte_token_ids:  # each token's text on its own (ASCII: offsets are None)
            text, offsets = _lossless_text(self.token_bytes[i])
            self._token_texts[i] = (text, None if len(text) == len(self.token_bytes[i]) else offsets)
        token_bytes = self.token_bytes
        self._token_length = np.array([len(b or b"") for b in token_bytes], dtype=np.int64)
        self._text_length = np.array([len(t[0]) if t else 0 for t in self._token_texts], dtype=np.int64)
        # ASCII tokens not ending in a digit: after ASCII text, `_undecided_from` is their last byte
        self._plain_end = np.array(
            [b is not None and b.isascii() and not b[-1:].isdigit() for b in token_bytes]
        )
        self._starting_with: dict[bytes, list[int]] = {}
        for idx in sorted(self.byte_token_ids, key=lambda i: (len(self.token_bytes[i]), i)):
            tb = self.token_bytes[idx]
            for end in range(len(tb) + 1):
                self._starting_with.setdefault(tb[:end], []).append(idx)
        # Valid UTF-8 goes through the tokenizer itself (Rust, batched) without added-token matching or
        # post-processing; other bytes are pre-tokenised here and fed to the bare BPE model.
        plain = {**state, "post_processor": None, "added_tokens": []}
        self._tokenizer = Tokenizer.from_str(json.dumps(plain))
        self._bpe = Tokenizer.from_str(json.dumps({**plain, "normalizer": None, "pre_tokenizer": None}))
        self._to_unicode = bytes_to_unicode()
        self._init_merges(state["model"].get("merges", []), vocab)
        witnesses = [c.encode("utf-8") for c in self.pre_tokenizer.representative_characters()]
        self._witnesses = tuple(witnesses + [w + w for w in witnesses])
        self._finishes = _Memo()
        self._prefix_memo = _Memo()
        self._next_memo = _Memo()
        self._cut_memo = _Memo()
        self._laid_memo = _Memo()
        self._prefix_masks = _Memo()

    # --------------------------------------------------------------------------- vocabulary
    def tokens_starting_with(self, prefix: bytes) -> list[int]:
        """Ids of the (non-special) tokens whose bytes start with ``prefix`` (all of them for b""),
        shortest first."""
        return self._starting_with.get(prefix, [])

    def decode(self, ids: Sequence[int]) -> bytes:
        """Bytes of a token sequence (special tokens contribute nothing)."""
        return b"".join(self.token_bytes[i] or b"" for i in ids)

    def boundaries(self, data: bytes) -> list[int]:
        """Byte offsets of the piece boundaries strictly inside ``data`` (pre-tokenisation)."""
        if data.isascii():
            return self.pre_tokenizer.boundaries(data.decode("ascii"))
        text, offsets = _lossless_text(data)
        cuts = self.pre_tokenizer.boundaries(text)
        return cuts if len(text) == len(data) else [offsets[p] for p in cuts]

    def _pieces(self, data: bytes) -> list[str]:
        cuts = [0, *self.boundaries(data), len(data)]
        return ["".join(self._to_unicode[b] for b in data[s:e]) for s, e in itertools.pairwise(cuts) if e > s]

    def encode_many(self, datas: Sequence[bytes]) -> list[list[int]]:
        """Canonical encodings (what the tokenizer produces) of several byte strings."""
        texts, raw = [], []
        for i, data in enumerate(datas):
            try:
                texts.append((i, data.decode("utf-8")))
            except UnicodeDecodeError:
                raw.append((i, self._pieces(data)))
        out: list[list[int]] = [[] for _ in datas]
        if texts:
            encs = self._tokenizer.encode_batch([t for _, t in texts], add_special_tokens=False)
            for (i, _), enc in zip(texts, encs):
                out[i] = enc.ids
        raw = [(i, pieces) for i, pieces in raw if pieces]
        if raw:
            encs = self._bpe.encode_batch([p for _, p in raw], is_pretokenized=True, add_special_tokens=False)
            for (i, _), enc in zip(raw, encs):
                out[i] = enc.ids
        return out

    def encode(self, data: bytes) -> list[int]:
        """Canonical encoding of one byte string."""
        return self.encode_many([data])[0]

    def tokens_covering(self, ids: Sequence[int], offset: int) -> int:
        """Number of leading tokens of ``ids`` whose bytes make up exactly the first ``offset`` bytes."""
        total = 0
        for k, idx in enumerate(ids):
            if total == offset:
                return k
            total += len(self.token_bytes[idx] or b"")
        if total != offset:
            raise ValueError(f"no token boundary at byte {offset}")
        return len(ids)

    # ------------------------------------------------------------------------------ bigrams
    def _init_merges(self, merges: list, vocab: dict[str, int]) -> None:
        """Merge ranks, the merge that creates each token (its rank ``ρ``), the tokens that encode to
        themselves, and the left spines of all tokens as padded tables."""
        V = self.vocab_size
        self._merge_rank: dict[tuple[int, int], int] = {}
        created = torch.full((V,), -1, dtype=torch.long)  # ρ: −1 for bytes (present from the start)
        children: dict[int, tuple[int, int]] = {}
        for rank, merge in enumerate(merges):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            a, b, ab = vocab.get(left), vocab.get(right), vocab.get(left + right)
            if a is None or b is None or ab is None:
                continue
            self._merge_rank[a, b] = rank  # a pair listed twice keeps its later rank, as HF's BPE does
            if ab not in children:
                children[ab] = (a, b)
                created[ab] = rank
        self._children = children
        self._created = created
        by_left: dict[int, list[tuple[int, int]]] = {}
        for (a, b), rank in self._merge_rank.items():
            by_left.setdefault(a, []).append((b, rank))
        self._merges_by_left = {
            a: (torch.tensor([b for b, _ in rs]), torch.tensor([r for _, r in rs], dtype=torch.float64))
            for a, rs in by_left.items()
        }
        ids = self.byte_token_ids
        encs = self._bpe.encode_batch(
            [["".join(self._to_unicode[b] for b in self.token_bytes[i])] for i in ids],
            is_pretokenized=True,
            add_special_tokens=False,
        )
        self.self_encoding = torch.zeros(V, dtype=torch.bool)
        """``self_encoding[t]``: the bytes of token ``t`` BPE-encode to ``[t]`` (else ``t`` never occurs)."""
        self.self_encoding[[i for i, enc in zip(ids, encs) if enc.ids == [i]]] = True
        self._self_encoding = self.self_encoding.tolist()
        self._self_encoding_array = self.self_encoding.numpy()
        depth = self.max_token_bytes
        spine = torch.full((V + 1, depth), V, dtype=torch.long)  # padded with the sentinel V
        after = torch.full((V + 1, depth), _NEVER, dtype=torch.float64)  # ρ of the next spine node
        for t in ids:
            chain = [t]
            while chain[-1] in children:
                chain.append(children[chain[-1]][0])
            chain.reverse()  # first byte … t
            spine[t, : len(chain)] = torch.tensor(chain)
            after[t, : len(chain) - 1] = created[chain[1:]].double()
        self._left_spine, self._left_spine_next = spine, after
        self._pair_rows, self._pair_lists = _Memo(), _Memo()

    def canonical_pairs(self, left: int) -> torch.Tensor:
        """``(V,)`` bool: the tokens ``r`` for which ``[left, r]`` is the BPE encoding of its bytes
        (both tokens encode to themselves and no merge across the junction fires; module docstring)."""
        row = self._pair_rows.get(left)
        if row is not None:
            return row
        V = self.vocab_size
        threshold = torch.full((V + 1,), _NEVER, dtype=torch.float64)  # lowest firing rank per L_j
        node, upper = left, _NEVER
        while True:  # walk the right spine of `left` from the top: R_k = left, …, R_0 = last byte
            if node in self._merges_by_left:
                rights, ranks = self._merges_by_left[node]
                lower = float(self._created[node])
                live = (ranks > lower) & (ranks < upper)
                threshold.scatter_reduce_(0, rights[live], ranks[live], reduce="amin")
            if node not in self._children:
                break
            upper = float(self._created[node])
            node = self._children[node][1]
        firing = threshold[self._left_spine]
        fires = ((firing <= self._left_spine_next) & (firing < _NEVER)).any(dim=1)[:V]
        row = ~fires & self.self_encoding & bool(self.self_encoding[left])
        return self._pair_rows.put(left, row, self.vocab_size)

    def _pair_row(self, left: int) -> list[bool]:
        row = self._pair_lists.get(left)
        if row is None:
            row = self._pair_lists.put(left, self.canonical_pairs(left).tolist(), self.vocab_size)
        return row

    # ------------------------------------------------------------------- canonical prefixes
    def _continuations(self, data: bytes, doubled: bool = True) -> tuple[bytes, ...]:
        """The continuations tried after ``data`` besides ``b""`` (module docstring, step 3): the
        representatives, doubled representatives (``doubled``: needed after a digit, for the phase of
        a digit run) and, when ``data`` ends inside a character, that character finished as each of
        its classes (alone and followed by a representative)."""
        tail = _partial_tail(data)
        if not tail:
            return self._witnesses if doubled else self._witnesses[: len(self._witnesses) // 2]
        finishes = self._finishes.get(tail)
        if finishes is None:
            width = 2 if tail[0] < 0xE0 else 3 if tail[0] < 0xF0 else 4
            lowest = {2: 0x80, 3: 0x800, 4: 0x10000}[width]
            first = max(lowest, ((tail[0] & (0x7F >> width)) << (6 * (width - 1))))
            classes: dict[tuple, bytes] = {}
            for code in range(first, min(first + (1 << (6 * (width - 1))), 0x110000)):
                if 0xD800 <= code < 0xE000:
                    continue
                ch = chr(code)
                data_ch = ch.encode()
                if data_ch.startswith(tail):
                    folded = ch.casefold()
                    key = (unicodedata.category(ch), ch.isspace(), folded if folded.isascii() else "")
                    classes.setdefault(key, data_ch[len(tail) :])
            singles = self._witnesses[: len(self._witnesses) // 2]
            finishes = tuple(f + w for f in classes.values() for w in (b"", *singles))
            self._finishes[tail] = finishes
        return finishes + self._witnesses

    @staticmethod
    def _violations(cuts: list[int], token_ends: set[int], needed: list[int]) -> list[int]:
        """Positions where tokens ending at ``token_ends``, with non-canonical pairs at ``needed``, do not
        fit the piece boundaries ``cuts``: a boundary inside a token, or a non-canonical pair inside a
        piece."""
        bad = [p for p in cuts if p not in token_ends]
        if needed:
            inside = set(cuts)
            bad += [p for p in needed if p not in inside]
        return bad

    def is_canonical_prefix(self, window: bytes, ids: Sequence[int]) -> bool:
        """Whether ``ids`` (whose bytes are ``window``) is a prefix of the canonical encoding of some
        text that starts with ``window`` — ``window`` starting at a stable cut (module docstring)."""
        return self._is_prefix(window, list(ids), 0)

    def _is_prefix(self, window: bytes, ids: list[int], depth: int) -> bool:
        key = (window, tuple(ids))
        known = self._prefix_memo.get(key)
        if known is not None:
            return known
        result = self._decide_prefix(window, ids, depth)
        if result or depth == 0:  # a deeper "no" may only mean the depth ran out
            self._prefix_memo.put(key, result)
        return result

    def _decide_prefix(self, window: bytes, ids: list[int], depth: int) -> bool:
        """The test of the module docstring."""
        encodes = self._self_encoding
        if not all(encodes[i] for i in ids):
            return False
        ends = list(itertools.accumulate(len(self.token_bytes[i]) for i in ids))
        token_ends = set(ends)
        needed = [ends[k] for k in range(len(ids) - 1) if not self._pair_row(ids[k])[ids[k + 1]]]
        n = len(window)
        bad = self._violations(self.boundaries(window), token_ends, needed)
        if not bad:  # the text may end here
            return True
        if min(bad) < _undecided_from(window):
            return False
        open_piece = False
        for more in self._continuations(window, doubled=_lossless_text(window)[0][-1:].isnumeric()):
            cuts = self.boundaries(window + more)
            if self._violations([p for p in cuts if p < n], token_ends, needed):
                continue
            if n in cuts:
                return True
            open_piece = True
        if not open_piece or depth >= STRADDLE_DEPTH:
            return False
        pairs = self._pair_row(ids[-1])
        return any(
            self._is_prefix(window + self.token_bytes[t], [*ids, t], depth + 1)
            for t in self.tokens_starting_with(b"")
            if pairs[t]
        )

    def stable_cut(self, data: bytes, start: int = 0) -> int:
        """The last byte offset ``b ≥ start`` such that every continuation ``w`` of ``data`` has
        ``π(data·w) = π(data[:b]) + π(data[b:]·w)`` (``start`` must itself be one; module docstring)."""
        tail = data[start:]
        known = self._cut_memo.get(tail)
        if known is not None:
            return start + known
        cut = 0
        continuations = [b"", *self._continuations(tail)]
        for b in reversed(self.boundaries(tail)):
            if all(self._cuts_at(tail, b, more) for more in continuations):
                cut = b
                break
        self._cut_memo.put(tail, cut)
        return start + cut

    def _cuts_at(self, tail: bytes, b: int, more: bytes) -> bool:
        whole = self.boundaries(tail + more)
        right = [b + p for p in self.boundaries(tail[b:] + more)]
        return (
            b in whole
            and [p for p in whole if p > b] == right
            and self.boundaries(tail[:b]) == [p for p in whole if p < b]
        )

    def next_tokens(self, window: bytes, ids: Sequence[int], prefix: bytes = b"") -> torch.Tensor:
        """Ids of the tokens ``t`` whose bytes start with ``prefix`` and for which ``ids + [t]`` is a
        canonical prefix (``ids`` a canonical prefix with bytes ``window``, from a stable cut)."""
        ids = tuple(ids)
        key = (window, ids, prefix)
        known = self._next_memo.get(key)
        if known is not None:
            return known
        whole = self._next_memo.get((window, ids, b""))
        if whole is not None:
            out = whole[self._starts_with_mask(prefix)[whole]]
        else:
            found = self._extensions(window, ids, self.tokens_starting_with(prefix))
            out = torch.tensor(found, dtype=torch.long)
        self._next_memo.put(key, out, len(out) + 1)
        return out

    def _starts_with_mask(self, prefix: bytes) -> torch.Tensor:
        mask = self._prefix_masks.get(prefix)
        if mask is None:
            mask = self._prefix_masks.put(
                prefix, torch.zeros(self.vocab_size, dtype=torch.bool), self.vocab_size
            )
            mask[self.tokens_starting_with(prefix)] = True
        return mask

    def _extensions(self, window: bytes, ids: tuple[int, ...], candidates: list[int]) -> list[int]:
        """The candidates ``t`` with ``ids + [t]`` a canonical prefix.

        Fast path, for ASCII text: the pieces of all the texts ``window + bytes(t)`` come from one
        pre-tokenisation of them laid end to end (:meth:`_laid_end_to_end`), and every candidate's fit
        is read off that table at once (numpy, no loop over the vocabulary). A fit there is a witness
        (a real text that starts with ``window + bytes(t)``, piece boundary after it); a violation
        before the last character (or the trailing digit run) is final for every continuation (module
        docstring, step 3). Everything else goes through the full test.
        """
        n = len(window)
        ends = list(itertools.accumulate(len(self.token_bytes[i]) for i in ids))
        needed = [e for k, e in enumerate(ends[:-1]) if not self._pair_row(ids[k])[ids[k + 1]]]
        joins = (self.canonical_pairs(ids[-1]) if ids else self.self_encoding).numpy()
        cand = np.asarray(candidates, dtype=np.int64)
        cand = cand[self._self_encoding_array[cand]]
        accepted = np.zeros(len(cand), dtype=bool)
        laid = self._laid_end_to_end(window, cand)
        if laid is None:
            check = range(len(cand))
        else:
            state, cuts = laid[0][cand], laid[1][cand]
            allowed = np.zeros(cuts.shape[1], dtype=bool)
            allowed[[*ends, n]] = True
            bad = cuts & ~allowed  # a piece boundary inside a token
            bad[:, needed] |= ~cuts[:, needed]  # a non-canonical pair that no piece boundary splits
            bad[:, n] |= ~(joins[cand] | cuts[:, n])  # the new pair: canonical, or split
            fits = ~bad.any(1)
            laid_rows = state == _LAID
            accepted = laid_rows & fits
            doubtful = np.flatnonzero(laid_rows & ~fits)
            first_bad = bad[doubtful].argmax(1)  # the first violation
            # where it may still move (module docstring, step 3): the last byte of ASCII text that does
            # not end in a digit; else ask `_undecided_from`
            tokens = cand[doubtful]
            undecided = n + self._token_length[tokens] - 1
            plain = self._plain_end[tokens] & window.isascii()
            for k in np.flatnonzero(~plain).tolist():
                undecided[k] = _undecided_from(window + self.token_bytes[tokens[k]])
            retry = doubtful[first_bad >= undecided]
            check = np.union1d(np.flatnonzero(~laid_rows), retry).tolist()
        for k in check:
            t = int(cand[k])
            accepted[k] = self._decide_prefix(window + self.token_bytes[t], [*ids, t], 0)
        return cand[accepted].tolist()

    def _laid_end_to_end(self, window: bytes, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """For the candidates ``t``: the piece boundaries (byte offsets) inside ``window + bytes(t)``, its
        end excluded, from one pre-tokenisation of ``window z_1 s window z_2 s …`` (separator character
        ``s``) where that has piece boundaries at both ends of the segment — then they are the pieces of
        a real text that starts with ``window z`` and has a boundary after it. Segments whose end merges
        with the separator are tried again with the next separator. Single-stage pipelines and windows
        of whole characters only (else ``None``); remembered per window.

        Returns ``(state, cuts)`` over the whole vocabulary: ``state[t]`` is ``_LAID`` where ``cuts[t]``
        (bool, one column per byte offset) holds the boundaries, ``_UNLAID`` where no separator gave a
        bounded segment, 0 for tokens not asked about yet.
        """
        if len(self.pre_tokenizer.stages) != 1 or _partial_tail(window):
            return None
        n, V = len(window), self.vocab_size
        known = self._laid_memo.get(window)
        if known is None:
            width = n + self.max_token_bytes + 1
            known = (np.zeros(V, dtype=np.int8), np.zeros((V, width), dtype=bool))
            self._laid_memo.put(window, known, V + V * width // 8)  # an item per token, per 8 cells
        state, cuts = known
        head, head_offsets = _lossless_text(window)
        stage, texts = self.pre_tokenizer.stages[0], self._token_texts
        todo = candidates[state[candidates] == 0]
        for sep in ("\n", "\x00", "a", "0"):
            if not len(todo):
                break
            if head and 1 not in stage.boundaries(sep + head):
                continue
            big = sep + head + (sep + head).join([texts[t][0] for t in todo.tolist()]) + sep
            is_bound = np.zeros(len(big) + 1, dtype=bool)
            is_bound[_match_ends(stage.compiled, big)] = True
            lengths = len(head) + self._text_length[todo]  # of each segment `window z`, in characters
            lo = np.cumsum(lengths + 1) - lengths  # where each segment starts in `big`
            bounded = is_bound[lo] & is_bound[lo + lengths]
            ascii_rows = (self._token_length[todo] == self._text_length[todo]) & (len(head) == n)
            rows = np.flatnonzero(bounded & ascii_rows)  # characters are bytes: offsets read off directly
            offsets = np.arange(cuts.shape[1])
            inside = (offsets >= 1) & (offsets < lengths[rows, None])
            at = np.minimum(lo[rows, None] + offsets, len(big))
            cuts[todo[rows]] = is_bound[at] & inside
            for r in np.flatnonzero(bounded & ~ascii_rows).tolist():
                z_offsets = texts[todo[r]][1]
                where = head_offsets[:-1] + [n + o for o in (z_offsets or range(len(texts[todo[r]][0]) + 1))]
                inner = np.flatnonzero(is_bound[lo[r] + 1 : lo[r] + lengths[r]]) + 1
                cuts[todo[r], [where[b] for b in inner.tolist()]] = True
            state[todo[bounded]] = _LAID
            todo = todo[~bounded]
        state[todo] = _UNLAID
        return state, cuts
