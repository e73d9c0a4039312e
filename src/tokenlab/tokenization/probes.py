"""Probes of what tokenization hides from a model: character-level questions and adversarial
strings whose tokens straddle word boundaries.

**Character probes** (*CharBench: Evaluating the Role of Tokenization in Character-Level Tasks*):
four tasks over a word ``w`` and a character ``c`` drawn from it, with CharBench's question templates
and answers —

* ``count_character_frequency``: how many times ``c`` occurs in ``w`` (``w.count(c)``);
* ``count_unique_chars``: how many distinct characters ``w`` has (``len(set(w))``);
* ``find_first_occurrence`` / ``find_last_occurrence``: the 0-based index of the first / last ``c``.

CharBench asks chat models and parses a number from the reply. Here the model is an HF causal LM of
any size, so the reply is *scored*, not generated: every candidate answer ``k`` (``0 … len(w)``) is
appended to the prompt and the prediction is ``argmax_k log P(" k" | prompt)``. Each probe is asked
twice: with the word as written (the model sees its tokens) and **spelled out** (characters joined by
``separator``, so each character is its own token in most tokenizers); the gap between the two
accuracies is what tokenization costs. Each result also records the number of tokens of the word and
the length of the token that holds the queried character, the two properties CharBench relates to
correctness.

**Adversarial strings** (after ADT-Auto of *Tokenization Matters! Degrading Large Language Models
through Challenging Their Tokenization*): ADT places a *trap token* — a vocabulary entry such as
``stable`` — across the boundary of two words (``moves`` + ``table``), so the canonical tokenization
reads a different word than the writer meant. :func:`adversarial_strings` searches a word list for
pairs ``left + right`` (joined without a space, as in scripts without spaces or in code identifiers)
whose canonical tokenization contains a token that covers bytes of both words, and pairs from the same
words whose tokenization respects the boundary (controls). :func:`score_strings` reports the model's
loss on each (bits per byte, comparable across tokenizations): a model that reads through the
straddling token should show no gap.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenlab._checks import check_choice, check_int

CHAR_TASKS = (
    "count_character_frequency",
    "count_unique_chars",
    "find_first_occurrence",
    "find_last_occurrence",
)
QUESTION_TEMPLATES = {  # CharBench's templates (benchmark/benchmark.py)
    "count_character_frequency": (
        "How many times does the character '{character}' appear in the string '{word}'?"
    ),
    "count_unique_chars": "How many unique characters appear in the string '{word}'?",
    "find_first_occurrence": (
        "What is the index of the first occurrence of the character '{character}' in the string "
        "'{word}'?\nStart counting from 0."
    ),
    "find_last_occurrence": (
        "What is the index of the last occurrence of the character '{character}' in the string "
        "'{word}'?\nStart counting from 0."
    ),
}
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


# ------------------------------------------------------------------------------ character probes
@dataclass(frozen=True)
class CharProbe:
    """One character-level question: ``task`` (in :data:`CHAR_TASKS`), the word, the queried
    character (``None`` for ``count_unique_chars``) and the true answer."""

    task: str
    word: str
    character: str | None
    answer: int

    def question(self, separator: str | None = None) -> str:
        """The question text; with ``separator`` the word is spelled out (``'c-a-t'`` for ``'-'``)."""
        word = self.word if separator is None else separator.join(self.word)
        return QUESTION_TEMPLATES[self.task].format(word=word, character=self.character)

    def candidates(self) -> range:
        """The answers scored: ``0 … len(word)`` (every count and every index)."""
        return range(len(self.word) + 1)


def char_probes(
    words: Sequence[str], n: int, *, tasks: Sequence[str] = CHAR_TASKS, seed: int = 0
) -> list[CharProbe]:
    """``n`` probes per task over words drawn (seeded) from ``words`` (as CharBench: the queried
    character is drawn uniformly from the word's characters)."""
    check_int("n", n, low=1)
    for task in tasks:
        check_choice("tasks", task, CHAR_TASKS)
    pool = sorted({w for w in words if isinstance(w, str) and w and not any(c.isspace() for c in w)})
    if not pool:
        raise ValueError("`words` holds no non-empty word without whitespace")
    rng = random.Random(seed)
    probes = []
    for task in tasks:
        for _ in range(n):
            word = rng.choice(pool)
            if task == "count_unique_chars":
                probes.append(CharProbe(task, word, None, len(set(word))))
                continue
            c = rng.choice(word)
            answer = {"count_character_frequency": word.count(c), "find_first_occurrence": word.index(c),
                      "find_last_occurrence": word.rindex(c)}[task]  # fmt: skip
            probes.append(CharProbe(task, word, c, answer))
    return probes


@dataclass(frozen=True)
class CharProbeResult:
    """Predictions of one probe, as written and spelled out, with the tokenization features
    CharBench relates to correctness."""

    probe: CharProbe
    predicted: int
    predicted_spelled: int
    word_tokens: int
    token_length_at_character: int | None

    @property
    def correct(self) -> bool:
        return self.predicted == self.probe.answer

    @property
    def correct_spelled(self) -> bool:
        return self.predicted_spelled == self.probe.answer


@dataclass
class CharProbeReport:
    """Accuracy by task (``accuracy``, ``accuracy_spelled``; key ``"all"`` for every probe) and the
    per-probe results."""

    results: list[CharProbeResult]
    accuracy: dict[str, float] = field(init=False)
    accuracy_spelled: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        groups: defaultdict[str, list[CharProbeResult]] = defaultdict(list)
        for r in self.results:
            groups[r.probe.task].append(r)
            groups["all"].append(r)
        self.accuracy = {t: sum(r.correct for r in rs) / len(rs) for t, rs in groups.items()}
        self.accuracy_spelled = {t: sum(r.correct_spelled for r in rs) / len(rs) for t, rs in groups.items()}


@torch.no_grad()
def run_char_probes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    probes: Sequence[CharProbe],
    *,
    separator: str = " ",
    prompt_template: str = PROMPT_TEMPLATE,
    batch_size: int = 32,
) -> CharProbeReport:
    """Ask every probe as written and spelled out (characters joined by ``separator``), score the
    candidate answers ``" 0" … " len(word)"`` by ``log P(answer | prompt)`` and keep the argmax."""
    _check_model(model, tokenizer)
    if not probes or not all(isinstance(p, CharProbe) for p in probes):
        raise TypeError("`probes` must be a non-empty sequence of CharProbe (see char_probes)")
    if "{question}" not in prompt_template:
        raise ValueError("`prompt_template` must contain '{question}'")
    check_int("batch_size", batch_size, low=1)
    results = []
    for probe in probes:
        predictions = []
        for spelled in (None, separator):
            prompt = tokenizer.encode(
                prompt_template.format(question=probe.question(spelled)), add_special_tokens=False
            )
            answers = [tokenizer.encode(f" {k}", add_special_tokens=False) for k in probe.candidates()]
            sequences, starts = [prompt + a for a in answers], [len(prompt)] * len(answers)
            scores = continuation_log_probs(model, sequences, starts, _pad_id(tokenizer), batch_size)
            predictions.append(max(probe.candidates(), key=lambda k: scores[k]))
        word_ids = tokenizer.encode(probe.word, add_special_tokens=False)
        results.append(
            CharProbeResult(
                probe, predictions[0], predictions[1], len(word_ids), _token_length_at(tokenizer, probe)
            )
        )
    return CharProbeReport(results)


def _token_length_at(tokenizer: PreTrainedTokenizerBase, probe: CharProbe) -> int | None:
    """Characters in the token that holds the first occurrence of the queried character."""
    if probe.character is None or not tokenizer.is_fast:
        return None
    position = probe.word.index(probe.character)
    offsets = tokenizer(probe.word, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return next((end - start for start, end in offsets if start <= position < end), None)


# --------------------------------------------------------------------------- adversarial strings
@dataclass(frozen=True)
class AdversarialString:
    """``left + right`` and its canonical tokens; ``trap`` is the text of the first token covering
    bytes of both words (``None`` for a control, whose tokens respect the boundary)."""

    left: str
    right: str
    tokens: tuple[str, ...]
    trap: str | None

    @property
    def text(self) -> str:
        return self.left + self.right


def adversarial_strings(
    tokenizer: PreTrainedTokenizerBase,
    words: Sequence[str],
    n: int,
    *,
    min_trap_chars: int = 3,
    seed: int = 0,
) -> tuple[list[AdversarialString], list[AdversarialString]]:
    """Up to ``n`` adversarial strings and ``n`` controls from ``words``.

    ADT-Auto's search, automated for any tokenizer: for each vocabulary token ``t`` (its text, leading
    space stripped, at least ``min_trap_chars`` letters) and each split ``t = a | b``, pair a word
    ending in ``a`` (and longer than it) with a word starting with ``b``; keep ``left + right`` if its
    canonical encoding holds a token covering bytes on both sides of ``len(left)``. Controls: random
    pairs of the same words whose tokens all end at or start from the boundary.
    """
    check_int("n", n, low=1)
    check_int("min_trap_chars", min_trap_chars, low=2)
    if not tokenizer.is_fast:
        raise TypeError("`tokenizer` must be a fast (Rust) HF tokenizer: offsets are needed")
    pool = sorted({w for w in words if isinstance(w, str) and w.isalpha()})
    if len(pool) < 2:
        raise ValueError("`words` must hold at least two alphabetic words")
    by_suffix: defaultdict[str, list[str]] = defaultdict(list)
    by_prefix: defaultdict[str, list[str]] = defaultdict(list)
    for w in pool:
        for k in range(1, len(w)):
            by_suffix[w[k:]].append(w)  # a left word ending in w[k:] and longer than it
        for k in range(1, len(w) + 1):
            by_prefix[w[:k]].append(w)
    specials = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer)) if i not in specials])
    traps = sorted({t.strip() for t in texts if len(t.strip()) >= min_trap_chars and t.strip().isalpha()})
    rng = random.Random(seed)
    rng.shuffle(traps)
    found: dict[str, AdversarialString] = {}
    for trap in traps:
        if len(found) >= n:
            break
        for k in range(1, len(trap)):
            lefts, rights = by_suffix.get(trap[:k]), by_prefix.get(trap[k:])
            if not lefts or not rights:
                continue
            left, right = rng.choice(lefts), rng.choice(rights)
            item = _segment(tokenizer, left, right)
            if item.trap is not None and item.text not in found:
                found[item.text] = item
                break
    controls: dict[str, AdversarialString] = {}
    for _ in range(50 * n):
        if len(controls) >= len(found):
            break
        item = _segment(tokenizer, rng.choice(pool), rng.choice(pool))
        if item.trap is None and item.text not in controls:
            controls[item.text] = item
    return list(found.values()), list(controls.values())


def _segment(tokenizer: PreTrainedTokenizerBase, left: str, right: str) -> AdversarialString:
    encoding = tokenizer(left + right, add_special_tokens=False, return_offsets_mapping=True)
    text, cut = left + right, len(left)
    pieces = tuple(text[s:e] for s, e in encoding["offset_mapping"])
    trap = next((text[s:e] for s, e in encoding["offset_mapping"] if s < cut < e), None)
    return AdversarialString(left, right, pieces, trap)


@dataclass(frozen=True)
class StringScores:
    """Per-string model loss in bits per UTF-8 byte (``bits_per_byte``) and its mean."""

    strings: list[str]
    bits_per_byte: list[float]

    @property
    def mean(self) -> float:
        return sum(self.bits_per_byte) / len(self.bits_per_byte)


@torch.no_grad()
def score_strings(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    strings: Sequence[str | AdversarialString],
    *,
    context: str = "",
    batch_size: int = 32,
) -> StringScores:
    """``−log₂ P(s | context) / bytes(s)`` for each string under its canonical tokenization (the
    context, e.g. a sentence start, is encoded on its own and prepended)."""
    _check_model(model, tokenizer)
    if isinstance(strings, str):
        raise TypeError("`strings` must be a sequence of str or AdversarialString, not one str")
    texts = [s.text if isinstance(s, AdversarialString) else s for s in strings]
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise TypeError("`strings` must be a non-empty sequence of non-empty str or AdversarialString")
    check_int("batch_size", batch_size, low=1)
    prefix = tokenizer.encode(context, add_special_tokens=False) if context else []
    if not prefix:
        if tokenizer.bos_token_id is None:
            raise ValueError("an empty `context` needs a tokenizer with a BOS token to condition on")
        prefix = [tokenizer.bos_token_id]
    sequences = [prefix + tokenizer.encode(t, add_special_tokens=False) for t in texts]
    logps = continuation_log_probs(
        model, sequences, [len(prefix)] * len(texts), _pad_id(tokenizer), batch_size
    )
    bits = [-lp / math.log(2) / len(t.encode("utf-8")) for lp, t in zip(logps, texts)]
    return StringScores(texts, bits)


# --------------------------------------------------------------------------------- model scoring
def continuation_log_probs(
    model: PreTrainedModel,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    pad_id: int,
    batch_size: int = 32,
) -> list[float]:
    """``Σ_{i ≥ start} log p(s_i | s_<i)`` for each token sequence (``start ≥ 1``; float64;
    right-padded batches)."""
    if len(starts) != len(sequences):
        raise ValueError(f"`starts` must hold one start per sequence ({len(sequences)}), got {len(starts)}")
    for seq, start in zip(sequences, starts):
        check_int("starts", start, low=1, high=len(seq))  # start 0: no position predicts token 0
    check_int("batch_size", batch_size, low=1)
    device = next(model.parameters()).device
    out: list[float] = []
    for lo in range(0, len(sequences), batch_size):
        chunk, chunk_starts = sequences[lo : lo + batch_size], starts[lo : lo + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(list(seq))
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits.double(), dim=-1).cpu()
        for row, (seq, start) in enumerate(zip(chunk, chunk_starts)):
            positions = torch.arange(start, len(seq))
            out.append(logp[row, positions - 1, ids[row, positions]].sum().item())
    return out


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def _check_model(model: object, tokenizer: object) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"`model` must be an HF PreTrainedModel, got {type(model).__name__}")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"`tokenizer` must be an HF tokenizer, got {type(tokenizer).__name__}")
