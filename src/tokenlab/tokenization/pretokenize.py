"""Pre-tokenisation as a pipeline of small regex-split stages, each expressible in HF ``tokenizers``.

BPE merges never cross a pre-token boundary, so the pre-tokeniser decides which tokens can exist.
Each stage is one regular expression applied with *isolated* behaviour: every match becomes its own
piece and the text between matches becomes a piece too. A pipeline applies its stages in order,
each one splitting every piece the previous stage produced — exactly what HF's
``pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(p), "isolated"), ...])`` does, which is how
a pipeline is exported (:meth:`PreTokenizer.to_hf`).

Split stages (:data:`SPLITS`):

* ``"gpt2"`` — the GPT-2 regex (contractions, letter runs, number runs, punctuation runs, each
  with at most one leading space; whitespace runs leave their last space to the next word);
* ``"whitespace"`` — whitespace-bounded words, each with at most one leading space;
* ``"superbpe"`` — the stage-2 rule of *SuperBPE: Space Travel for Language Models* (its
  ``scripts/extend_tokenizer.sh``), applied isolated: ``\\p{N}{1,3}`` (digits in groups of at most
  three), `` ?[^\\s\\p{L}\\p{N}]{2,}[\\r\\n/]*`` (runs of two or more punctuation marks, with an
  optional leading space and trailing newlines/slashes) and `` +(?!\\S)`` (space runs, minus the space
  before a word) are pieces of their own; everything between them — words with their single spaces,
  single punctuation marks and line breaks — is one piece, so superword merges may cross spaces and
  single newlines. The default superword stage.
* ``"lines"`` — whole lines (each with its ``\\n``): coarse pre-tokens where merges may cross spaces
  but not line breaks, and digits, punctuation runs and space runs fuse with words.

Digit stages (:data:`DIGIT_SPLITS`, *Tokenization counts: the impact of tokenization on arithmetic
in frontier LLMs*): ``"single"`` (every digit alone), ``"l2r3"`` (groups of three from the left:
``12345 → 123|45``) and ``"r2l3"`` (groups of three from the right: ``12345 → 12|345``, a greedy
``{1,3}`` match that must leave a multiple of three digits behind it). Digits are ASCII ``0-9``.

The patterns use Unicode classes (``\\p{L}``, ``\\p{N}``); Python's ``regex`` module and HF's
Oniguruma agree on every character assigned in Python's Unicode database (checked in the tests);
characters assigned in newer Unicode versions than one of the two engines knows may differ.

Reading a tokenizer back (:meth:`PreTokenizer.from_hf`): the byte-level engine
(:mod:`tokenlab.tokenization.canonical`) re-runs a Hugging Face tokenizer's pre-tokeniser in Python
(``ByteLevel(use_regex=True)`` is the GPT-2 stage, ``Split(..., "isolated")`` a stage of its pattern,
``Digits`` a ``\\p{N}`` stage, ``Sequence`` their concatenation), and needs one character of every
class the patterns can tell apart (:meth:`PreTokenizer.representative_characters`): the patterns are
read as *atoms* — character classes, Unicode properties, literals — and two characters that every atom
accepts or rejects alike are interchangeable in every match.
"""

from __future__ import annotations

import itertools
import unicodedata
from dataclasses import dataclass
from functools import cache, cached_property

import regex
from tokenizers import Regex, pre_tokenizers

from tokenlab._checks import check_choice

SUPERBPE_PATTERN = r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]{2,}[\r\n/]*| +(?!\S)"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@dataclass(frozen=True)
class RegexSplit:
    """One pre-tokenisation stage: split a piece around the matches of ``pattern`` (isolated)."""

    name: str
    pattern: str

    @cached_property
    def compiled(self) -> regex.Pattern:
        return regex.compile(self.pattern)

    @cached_property
    def _splitter(self) -> regex.Pattern | None:
        """The pattern as one capturing group, for ``regex.split`` (C speed; ≈ 2.5× the Python loop);
        ``None`` when the pattern has groups of its own, which ``split`` would also return."""
        return None if self.compiled.groups else regex.compile(f"({self.pattern})")

    def split(self, piece: str) -> list[str]:
        """Matches and the (non-empty) text between them, in order; they concatenate to ``piece``.
        (Patterns are expected not to match the empty string.)"""
        if self._splitter is not None:
            return [part for part in self._splitter.split(piece) if part]
        out, start = [], 0
        for match in self.compiled.finditer(piece):
            if match.start() > start:
                out.append(piece[start : match.start()])
            out.append(match.group())
            start = match.end()
        if start < len(piece):
            out.append(piece[start:])
        return out

    def spans(self, piece: str, offset: int = 0) -> list[tuple[int, int]]:
        """:meth:`split` as ``(start, end)`` character offsets (shifted by ``offset``)."""
        out, start = [], 0
        for match in self.compiled.finditer(piece):
            lo, hi = match.span()
            if lo > start:
                out.append((offset + start, offset + lo))
            if hi > lo:
                out.append((offset + lo, offset + hi))
            start = hi
        if start < len(piece):
            out.append((offset + start, offset + len(piece)))
        return out

    def boundaries(self, piece: str) -> list[int]:
        """Offsets inside ``piece`` where :meth:`split` starts a new piece: every match starts and ends
        a piece (the text between matches is a piece too)."""
        out: list[int] = []
        last = 0
        for match in self.compiled.finditer(piece):
            lo, hi = match.span()
            if lo != last:
                out.append(lo)
            out.append(hi)
            last = hi
        if out and out[0] == 0:
            out.pop(0)
        if out and out[-1] == len(piece):
            out.pop()
        return out

    def to_hf(self) -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Split(Regex(self.pattern), behavior="isolated")


SPLITS: dict[str, RegexSplit] = {
    "gpt2": RegexSplit("gpt2", GPT2_PATTERN),
    "whitespace": RegexSplit("whitespace", r" ?\S+|\s+(?!\S)|\s+"),
    "superbpe": RegexSplit("superbpe", SUPERBPE_PATTERN),
    "lines": RegexSplit("lines", r"[^\n]*\n|[^\n]+"),
}

DIGIT_SPLITS: dict[str, RegexSplit] = {
    "single": RegexSplit("single digits", r"[0-9]"),
    "l2r3": RegexSplit("digits, groups of 3 from the left", r"[0-9]{1,3}"),
    "r2l3": RegexSplit("digits, groups of 3 from the right", r"[0-9]{1,3}(?=(?:[0-9]{3})*(?![0-9]))"),
}


@dataclass(frozen=True)
class PreTokenizer:
    """A pipeline of :class:`RegexSplit` stages applied in order (an empty pipeline: one piece)."""

    stages: tuple[RegexSplit, ...]

    def split(self, text: str) -> list[str]:
        """Pre-tokens of ``text``; they concatenate back to ``text``."""
        if len(self.stages) == 1:  # the common case, called once per distinct word in training
            return self.stages[0].split(text)
        pieces = [text] if text else []
        for stage in self.stages:
            pieces = [sub for piece in pieces for sub in stage.split(piece)]
        return pieces

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans ``(start, end)`` of the pre-tokens of ``text``, in order, covering it."""
        spans = [(0, len(text))] if text else []
        for stage in self.stages:
            spans = [sub for lo, hi in spans for sub in stage.spans(text[lo:hi], lo)]
        return spans

    def boundaries(self, text: str) -> list[int]:
        """Character offsets where a pre-token of ``text`` starts, except the first (``0``)."""
        if len(self.stages) == 1:
            return self.stages[0].boundaries(text)
        cuts = [0, len(text)]
        for stage in self.stages:
            inner = [lo + b for lo, hi in itertools.pairwise(cuts) for b in stage.boundaries(text[lo:hi])]
            cuts = sorted({*cuts, *inner})
        return cuts[1:-1]

    def to_hf(self) -> pre_tokenizers.PreTokenizer:
        """The same pipeline for HF ``tokenizers``, followed by the byte-level byte→char mapping."""
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([stage.to_hf() for stage in self.stages] + [byte_level])

    @classmethod
    def from_hf(cls, state: dict | None) -> PreTokenizer:
        """The pipeline of a Hugging Face tokenizer's ``pre_tokenizer`` (its JSON, as a dict).

        Supported: ``ByteLevel`` (the GPT-2 stage when ``use_regex``), ``Split`` with the ``Isolated``
        behaviour (a regex or a literal string), ``Digits`` and ``Sequence`` of these; ``None`` is the
        empty pipeline.

        Raises:
            ValueError: another pre-tokeniser type, another split behaviour, an inverted split.
        """
        if state is None:
            return cls(())
        kind = state.get("type")
        if kind == "Sequence":
            return cls(tuple(s for sub in state["pretokenizers"] for s in cls.from_hf(sub).stages))
        if kind == "ByteLevel":
            return cls((SPLITS["gpt2"],) if state.get("use_regex", True) else ())
        if kind == "Digits":
            pattern = r"\p{N}" if state.get("individual_digits") else r"\p{N}+"
            return cls((RegexSplit("digits", pattern),))
        if kind == "Split":
            if state.get("behavior") != "Isolated" or state.get("invert"):
                raise ValueError(
                    f"unsupported Split pre-tokenizer (behavior={state.get('behavior')!r}, "
                    f"invert={state.get('invert')!r}): only isolated, non-inverted splits keep every byte"
                )
            pattern = state["pattern"]
            source = pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])
            return cls((RegexSplit("split", source),))
        raise ValueError(f"unsupported pre-tokenizer type {kind!r}")

    def representative_characters(self) -> tuple[str, ...]:
        """One character of every class that the stages' patterns can tell apart (see the module
        docstring): ASCII characters first, then one character per Unicode general category (and
        whitespace property) and the case variants of literal letters under ``(?i)``."""
        return _representatives(tuple(stage.pattern for stage in self.stages))


def make_pre_tokenizer(split: str | None = "gpt2", digits: str | None = None) -> PreTokenizer:
    """The pipeline ``[digit stage] + [split stage]``.

    Args:
        split: a key of :data:`SPLITS` (``"gpt2"``, ``"whitespace"``, ``"superbpe"``, ``"lines"``) or
            ``None``.
        digits: a key of :data:`DIGIT_SPLITS` (``"single"``, ``"l2r3"``, ``"r2l3"``) or ``None``.
    """
    check_choice("split", split, [*sorted(SPLITS), None])
    check_choice("digits", digits, [*sorted(DIGIT_SPLITS), None])
    stages = ([DIGIT_SPLITS[digits]] if digits else []) + ([SPLITS[split]] if split else [])
    return PreTokenizer(tuple(stages))


# ------------------------------------------------------------------------- character classes
def _atoms(pattern: str) -> list[str]:
    """The character-level atoms of a regex: escapes, bracket classes, ``.`` and literal characters
    (group syntax, anchors, alternation and quantifiers are skipped)."""
    atoms, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1]
            if nxt in "pPN" and i + 2 < n and pattern[i + 2] == "{":
                end = pattern.index("}", i) + 1
            elif nxt == "x":
                end = pattern.index("}", i) + 1 if pattern[i + 2] == "{" else i + 4
            elif nxt in "uU":
                end = i + (6 if nxt == "u" else 10)
            elif nxt.isdigit() and nxt != "0":
                raise ValueError(f"back-references are not supported in pre-tokenizer patterns: {pattern!r}")
            else:
                end = i + 2
            atoms.append(r"\w" if pattern[i:end] in (r"\b", r"\B") else pattern[i:end])
            i = end
        elif c == "[":
            end = i + 1
            if end < n and pattern[end] == "^":
                end += 1
            if end < n and pattern[end] == "]":
                end += 1
            depth = 1
            while depth:
                if pattern[end] == "\\":
                    end += 2
                    continue
                depth += {"[": 1, "]": -1}.get(pattern[end], 0)
                end += 1
            atoms.append(pattern[i:end])
            i = end
        elif c == "(":
            i += 1
            if i < n and pattern[i] == "?":  # (?:  (?=  (?!  (?<=  (?<!  (?i:  (?i)  (?P<name>
                i += 1
                while i < n and pattern[i] not in ":)=!>":
                    i += 1
                i += 1
        elif c == "{":
            i = pattern.index("}", i) + 1
        elif c in ")|*+?^$":
            i += 1
        else:
            atoms.append("." if c == "." else regex.escape(c))
            i += 1
    return atoms


_SCANNED = 0x30000  # the BMP and the two planes after it hold every general category


@cache
def _probe_characters() -> tuple[str, ...]:
    """ASCII, then the first character of every (general category, whitespace) pair in Unicode."""
    seen, out = set(), [chr(c) for c in range(128)]
    for code in range(128, _SCANNED):
        ch = chr(code)
        key = (unicodedata.category(ch), ch.isspace())
        if key not in seen:
            seen.add(key)
            out.append(ch)
    return tuple(out)


@cache
def _case_variants() -> dict[str, tuple[str, ...]]:
    """Every character whose case folding is one ASCII letter, by that letter (``ſ`` → ``s``)."""
    out: dict[str, list[str]] = {}
    for code in range(_SCANNED):
        folded = chr(code).casefold()
        if len(folded) == 1 and folded.isascii() and folded.isalpha():
            out.setdefault(folded, []).append(chr(code))
    return {k: tuple(v) for k, v in out.items()}


@cache
def _representatives(patterns: tuple[str, ...]) -> tuple[str, ...]:
    atoms = [a for p in patterns for a in _atoms(p)]
    folding = any("(?i" in p for p in patterns)
    compiled = [regex.compile(a) for a in atoms]
    if folding:
        compiled += [regex.compile(a, regex.IGNORECASE) for a in atoms]
    probes = list(_probe_characters())
    literals = {a for a in atoms if len(a) == 1 or (len(a) == 2 and a[0] == "\\" and not a[1].isalnum())}
    for lit in literals:
        ch = lit[-1]
        probes.append(ch)
        if folding:  # every character that folds to a literal letter matches it under (?i)
            probes += _case_variants().get(ch.casefold(), ())
    reps: dict[tuple[bool, ...], str] = {}
    for ch in probes:
        reps.setdefault(tuple(bool(r.fullmatch(ch)) for r in compiled), ch)
    return tuple(reps.values())
