"""Exact byte-level probabilities from a tokenized language model.

Implements *Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model
Ensembles* (Phan et al.). A tokenized LM defines a distribution over byte strings; its next-byte
distribution is *not* the first byte of the next-token distribution when the prompt ends inside a
token ("tokenization bias"). The Byte-Token Representation Lemma gives the exact byte-level law:

* a **cover encoding** of a byte prefix ``x`` is a canonical token sequence ``t_1..t_k`` with
  ``decode(t_1..t_{k-1})`` a strict prefix of ``x`` and ``x`` a prefix of ``decode(t_1..t_k)``;
* ``P(x) = Σ_{t ∈ cover(x)} P(t_1..t_k)`` — the probability that generated text starts with ``x``;
* ``P(b | x) = P(x·b) / P(x)`` for each byte ``b``, plus an end-of-text outcome (index 256).

For BPE, a canonical sequence's prefixes are canonical, so every cover encoding is
``encode(x[:i]) + [t]`` with ``t`` a token whose bytes start with ``x[i:]`` (``i ≥ len(x) − L``, ``L``
the longest token). One next-byte law therefore needs the model at ``≤ L + 1`` token prefixes,
``encode(x[:i])`` for each split ``i``; they are evaluated in **one batched forward**. The lemma
assumes the model puts no mass on non-canonical sequences; for a real model the law is the
normalised sum over canonical cover encodings (the paper's practice).

Also here: byte-level greedy/sampled generation, fill-in-the-middle from a prefix that ends mid-token,
a byte-level ensemble of models with different tokenizers, and the baselines — naive token
completion and token healing.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from tokenlab._checks import check_int, check_positive
from tokenlab.tokenization.bpe import bytes_to_unicode

EOS_BYTE = 256
"""Index of the end-of-text outcome in a next-byte law (laws have 257 entries: bytes 0–255, EOS)."""


def _as_bytes(text: bytes | str, name: str) -> bytes:
    if isinstance(text, str):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate has no UTF-8 bytes
            raise ValueError(f"`{name}` is not valid Unicode ({err}); pass bytes instead") from None
    if isinstance(text, (bytes, bytearray)):
        return bytes(text)
    raise TypeError(f"`{name}` must be bytes or str, got {type(text).__name__}")


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


class ByteLevelBPE:
    """The byte view of a Hugging Face byte-level BPE tokenizer.

    Reads the vocabulary and merges from the tokenizer's backend JSON and gives each token's bytes,
    the canonical encoding of arbitrary bytes (also invalid UTF-8 and strings that end inside a
    character) and the tokens that start with a given byte string.

    Raises:
        ValueError: the tokenizer is not a fast tokenizer with a BPE model and byte-level decoding.
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
        self._starting_with: dict[bytes, list[int]] = {}
        for idx in self.byte_token_ids:
            tb = self.token_bytes[idx]
            for end in range(len(tb) + 1):
                self._starting_with.setdefault(tb[:end], []).append(idx)
        # Valid UTF-8 goes through the tokenizer itself (Rust, batched) without added-token matching or
        # post-processing; other bytes are pre-tokenised here and fed to the bare BPE model.
        plain = {**state, "post_processor": None, "added_tokens": []}
        self._tokenizer = Tokenizer.from_str(json.dumps(plain))
        self._bpe = Tokenizer.from_str(json.dumps({**plain, "normalizer": None, "pre_tokenizer": None}))
        self._pre_tokenizer = backend.pre_tokenizer
        self._to_unicode = bytes_to_unicode()

    def tokens_starting_with(self, prefix: bytes) -> list[int]:
        """Ids of the (non-special) tokens whose bytes start with ``prefix`` (all of them for b"")."""
        return self._starting_with.get(prefix, [])

    def decode(self, ids: Sequence[int]) -> bytes:
        """Bytes of a token sequence (special tokens contribute nothing)."""
        return b"".join(self.token_bytes[i] or b"" for i in ids)

    def _spans(self, data: bytes) -> list[tuple[int, int]]:
        """Byte spans of the pre-tokens of ``data``."""
        if self._pre_tokenizer is None:
            return [(0, len(data))] if data else []
        text, offsets = _lossless_text(data)
        spans = [(offsets[s], offsets[e]) for _, (s, e) in self._pre_tokenizer.pre_tokenize_str(text)]
        return [(s, e) for s, e in spans if e > s]

    def _pieces(self, data: bytes) -> list[str]:
        return ["".join(self._to_unicode[b] for b in data[s:e]) for s, e in self._spans(data)]

    def stable_boundary(self, data: bytes) -> int:
        """A byte offset before which the pre-tokens of ``data`` do not change when bytes are appended:
        the start of its second-to-last pre-token (appending can only change the last pre-token and
        where the next one starts, for regex pre-tokenisers such as GPT-2's). Tokens never cross
        pre-tokens, so the canonical encoding up to this offset is fixed too."""
        if self._pre_tokenizer is None:
            return 0
        spans = self._spans(data)
        return spans[-2][0] if len(spans) >= 2 else 0

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

    def canonical_extensions(self, data: bytes, tokens: Sequence[int]) -> tuple[list[int], list[int]]:
        """``encode(data)`` and the tokens ``t`` for which ``encode(data) + [t]`` is canonical
        (re-encoding its bytes gives it back). Only the part after :meth:`stable_boundary` can
        change, so only that part is re-encoded, in one batch."""
        ids = self.encode(data)
        boundary = self.stable_boundary(data)
        tail, tail_ids = data[boundary:], ids[self.tokens_covering(ids, boundary) :]
        encs = self.encode_many([tail + self.token_bytes[t] for t in tokens])
        return ids, [t for t, enc in zip(tokens, encs) if enc == [*tail_ids, t]]

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

    def encode(self, data: bytes) -> list[int]:
        """Canonical encoding of one byte string."""
        return self.encode_many([data])[0]


@dataclass
class ByteLevelCost:
    """Work done by a :class:`ByteLevelLM`: batched forwards, sequences in them, tokens, seconds."""

    forward_calls: int = 0
    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class _Split:
    """One split ``i`` of a byte prefix: the model at ``context + encode(x[:i])``."""

    start: int  # i
    candidates: list[int]  # canonical next tokens t whose bytes start with x[i:]
    prefix_logprob: float  # log P(encode(x[:i]) | context)
    next_logprobs: torch.Tensor  # (V,) log p(· | context + encode(x[:i])), float64


class ByteLevelLM:
    """A tokenized causal LM viewed as a distribution over byte strings (Byte-Token Representation Lemma).

    Args:
        model: a causal LM called as ``model(input_ids=, attention_mask=).logits`` (any HF causal LM).
        tokenizer: its byte-level BPE tokenizer (fast).
        context_ids: token ids every sequence starts with (default ``[bos_token_id]``); FIM sentinels
            and a tokenized suffix go here.
        eos_token_id: the token that ends text (default ``tokenizer.eos_token_id``); its probability is
            the law's end-of-text outcome.
        batch_size: most sequences per forward.

    ``cost`` accumulates the model work (:class:`ByteLevelCost`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        context_ids: Sequence[int] | None = None,
        eos_token_id: int | None = None,
        batch_size: int = 64,
    ):
        if not callable(model):
            raise TypeError(f"`model` must be a callable causal LM, got {type(model).__name__}")
        self.bpe = ByteLevelBPE(tokenizer)
        self.tokenizer = tokenizer
        self.model = model
        if context_ids is None:
            if tokenizer.bos_token_id is None:
                raise ValueError("`context_ids` is required when the tokenizer has no BOS token")
            context_ids = [tokenizer.bos_token_id]
        self.context_ids = self._check_context(context_ids)
        self.eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if self.eos_token_id is None:
            raise ValueError("`eos_token_id` is required when the tokenizer has no EOS token")
        check_int("batch_size", batch_size, low=1)
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.cost = ByteLevelCost()
        byte_ids = torch.tensor(self.bpe.byte_token_ids)
        self._first_byte = torch.full((self.bpe.vocab_size,), -1, dtype=torch.long)
        self._first_byte[byte_ids] = torch.tensor(
            [self.bpe.token_bytes[i][0] for i in self.bpe.byte_token_ids]
        )

    def _check_context(self, context_ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in context_ids]
        if not ids:
            raise ValueError("`context_ids` must hold at least one token (e.g. BOS)")
        if any(not 0 <= i < self.bpe.vocab_size for i in ids):
            raise ValueError(f"`context_ids` must be token ids in [0, {self.bpe.vocab_size})")
        return ids

    # ------------------------------------------------------------------------------- model calls
    @torch.no_grad()
    def _score(self, sequences: list[list[int]], given: int) -> list[tuple[float, torch.Tensor]]:
        """For each sequence ``s``: (log P(s[given:] | s[:given]), log p(next | s)) in float64."""
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        out: list[tuple[float, torch.Tensor]] = []
        for lo in range(0, len(sequences), self.batch_size):
            chunk = sequences[lo : lo + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logp = torch.log_softmax(logits.double(), dim=-1).cpu()
            self.cost.forward_calls += 1
            self.cost.sequences += len(chunk)
            self.cost.tokens += int(mask.sum())
            for row, seq in enumerate(chunk):
                n = len(seq)
                steps = logp[row, torch.arange(given - 1, n - 1), ids[row, given:n]].sum().item()
                out.append((steps, logp[row, n - 1, : self.bpe.vocab_size]))
        self.cost.seconds += time.perf_counter() - start
        return out

    def _splits(self, data: bytes, context: list[int], with_continuations: bool) -> list[_Split]:
        """The model at ``context + encode(data[:i])`` for every split ``i`` that has cover encodings
        (and ``i = len(data)`` when ``with_continuations``), with the canonical candidate tokens."""
        n = len(data)
        last = n if with_continuations else n - 1
        plans: list[tuple[int, list[int], list[int]]] = []
        for i in range(max(0, n - self.bpe.max_token_bytes), last + 1):
            tokens = self.bpe.tokens_starting_with(data[i:])
            if not tokens:
                continue
            prefix_ids, canonical = self.bpe.canonical_extensions(data[:i], tokens)
            if canonical or i == n:
                plans.append((i, prefix_ids, canonical))
        scores = self._score([context + prefix for _, prefix, _ in plans], given=len(context))
        return [_Split(i, cands, lp, nxt) for (i, _, cands), (lp, nxt) in zip(plans, scores, strict=True)]

    # ----------------------------------------------------------------------------------- public
    def prefix_log_probability(self, text: bytes | str, context_ids: Sequence[int] | None = None) -> float:
        """``log P(x)``: log-probability that the generated text starts with ``x`` — the log of the
        sum over the cover encodings of ``x`` (Byte-Token Representation Lemma)."""
        data = _as_bytes(text, "text")
        if not data:
            return 0.0
        context = self.context_ids if context_ids is None else self._check_context(context_ids)
        terms = [
            s.prefix_logprob + s.next_logprobs[s.candidates]
            for s in self._splits(data, context, with_continuations=False)
        ]
        if not terms:
            return float("-inf")
        return torch.logsumexp(torch.cat(terms), 0).item()

    def next_byte_distribution(
        self, text: bytes | str, context_ids: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Exact law of the byte after ``x``: a float64 tensor of 257 probabilities (bytes, then EOS).

        ``P(b | x) ∝ Σ_{t ∈ cover(x·b)} P(t)``. Cover encodings ``encode(x[:i]) + [t]`` with ``t``
        reaching past ``x`` put their mass on the byte of ``t`` at position ``len(x) − i``; the
        encoding ``encode(x)`` itself spreads its mass over the first bytes of its canonical next
        tokens and over EOS.
        """
        data = _as_bytes(text, "text")
        context = self.context_ids if context_ids is None else self._check_context(context_ids)
        n = len(data)
        logmass, outcome = [], []
        for split in self._splits(data, context, with_continuations=True):
            depth = n - split.start
            if split.start == n:
                cands = torch.tensor(split.candidates, dtype=torch.long)
                outcome.append(torch.cat([self._first_byte[cands], torch.tensor([EOS_BYTE])]))
                lp = torch.cat([split.next_logprobs[cands], split.next_logprobs[[self.eos_token_id]]])
            else:
                longer = [t for t in split.candidates if len(self.bpe.token_bytes[t]) > depth]
                outcome.append(
                    torch.tensor([self.bpe.token_bytes[t][depth] for t in longer], dtype=torch.long)
                )
                lp = split.next_logprobs[longer]
            logmass.append(split.prefix_logprob + lp)
        logmass_t, outcome_t = torch.cat(logmass), torch.cat(outcome)
        if not torch.isfinite(logmass_t.max()):
            raise ValueError(
                f"`text` has probability zero under the model (no cover encoding has mass): {data!r}"
            )
        weights = torch.exp(logmass_t - logmass_t.max())
        law = torch.zeros(EOS_BYTE + 1, dtype=torch.float64).index_add_(0, outcome_t, weights)
        return law / law.sum()

    def naive_next_byte_distribution(
        self, text: bytes | str, context_ids: Sequence[int] | None = None
    ) -> torch.Tensor:
        """The biased baseline: encode ``x``, take the next-token distribution and read off the first
        byte of each token (257 entries, EOS last). Differs from the exact law when ``x`` ends mid-token."""
        data = _as_bytes(text, "text")
        context = self.context_ids if context_ids is None else self._check_context(context_ids)
        ((_, logp),) = self._score([context + self.bpe.encode(data)], given=len(context))
        ids = torch.tensor(self.bpe.byte_token_ids)
        outcome = torch.cat([self._first_byte[ids], torch.tensor([EOS_BYTE])])
        mass = torch.cat([logp[ids], logp[[self.eos_token_id]]]).exp()
        law = torch.zeros(EOS_BYTE + 1, dtype=torch.float64).index_add_(0, outcome, mass)
        return law / law.sum()

    @torch.no_grad()
    def token_healing_generate(self, prompt: bytes | str, max_new_tokens: int) -> bytes:
        """Token healing, the standard fix the paper compares with (greedy): drop the prompt's last
        token and require the first generated token to start with its bytes. Returns the bytes
        generated after ``prompt`` (stops at EOS)."""
        data = _as_bytes(prompt, "prompt")
        check_int("max_new_tokens", max_new_tokens, low=1)
        ids = self.bpe.encode(data)
        removed = self.bpe.decode(ids[-1:])
        ids = self.context_ids + ids[:-1]
        device = next(self.model.parameters()).device
        allowed = torch.zeros(self.bpe.vocab_size, dtype=torch.bool)
        allowed[self.bpe.tokens_starting_with(removed)] = True
        generated: list[int] = []
        for step in range(max_new_tokens):
            logits = self.model(input_ids=torch.tensor([ids + generated], device=device)).logits
            scores = logits[0, -1, : self.bpe.vocab_size].cpu()
            if step == 0:
                scores = scores.masked_fill(~allowed, float("-inf"))
            nxt = int(scores.argmax())
            if nxt == self.eos_token_id:
                break
            generated.append(nxt)
        return self.bpe.decode(generated)[len(removed) :]


class ByteLevelEnsemble:
    """Byte-level ensemble of models with different tokenizers (Phan et al., §model ensembles):
    ``P(b | x) = Σ_m w_m P_m(b | x)`` over the members' exact next-byte laws.

    Args:
        members: :class:`ByteLevelLM` objects (any tokenizers).
        weights: finite non-negative mixture weights (default uniform); normalised to sum to 1.
    """

    def __init__(self, members: Sequence[ByteLevelLM], weights: Sequence[float] | None = None):
        if not members or not all(isinstance(m, ByteLevelLM) for m in members):
            raise TypeError("`members` must be a non-empty sequence of ByteLevelLM")
        w = (
            torch.ones(len(members), dtype=torch.float64)
            if weights is None
            else torch.tensor(weights, dtype=torch.float64)
        )
        if w.shape != (len(members),) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"`weights` must be {len(members)} non-negative numbers with a positive sum")
        self.members = list(members)
        self.weights = w / w.sum()

    def next_byte_distribution(self, text: bytes | str) -> torch.Tensor:
        """The weighted mixture of the members' exact next-byte laws (257 entries, EOS last)."""
        return sum(w * m.next_byte_distribution(text) for w, m in zip(self.weights, self.members))


def generate_bytes(
    lm: ByteLevelLM | ByteLevelEnsemble,
    prompt: bytes | str,
    max_new_bytes: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> bytes:
    """Continue ``prompt`` byte by byte from the exact next-byte law (greedy or sampled).

    Stops at the end-of-text outcome or after ``max_new_bytes``. Returns the new bytes only.
    Sampling draws from ``law^(1/temperature)`` renormalised.
    """
    data = _as_bytes(prompt, "prompt")
    check_int("max_new_bytes", max_new_bytes, low=0)
    check_positive("temperature", temperature)
    new = bytearray()
    for _ in range(max_new_bytes):
        law = lm.next_byte_distribution(data + bytes(new))
        if do_sample:
            probs = law ** (1.0 / temperature)
            nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
        else:
            nxt = int(law.argmax())
        if nxt == EOS_BYTE:
            break
        new.append(nxt)
    return bytes(new)


def fill_in_the_middle(
    lm: ByteLevelLM,
    prefix: bytes | str,
    suffix: bytes | str,
    *,
    prefix_token_id: int,
    suffix_token_id: int,
    middle_token_id: int,
    max_new_bytes: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> bytes:
    """Fill in the middle in suffix-prefix-middle (SPM) order, where the prefix is followed directly by
    the middle and may end mid-token: the token context is ``[BOS?] <PRE> <SUF> encode(suffix) <MID>``
    and the middle is generated byte by byte after the byte prompt ``prefix``. Stops at
    ``lm.eos_token_id`` (set it to the end-of-middle token of the model's FIM format).
    """
    suffix_ids = lm.bpe.encode(_as_bytes(suffix, "suffix"))
    head = lm.context_ids
    context = [*head, prefix_token_id, suffix_token_id, *suffix_ids, middle_token_id]
    fim = _WithContext(lm, lm._check_context(context))
    return generate_bytes(
        fim, prefix, max_new_bytes, do_sample=do_sample, temperature=temperature, generator=generator
    )


@dataclass
class _WithContext:
    lm: ByteLevelLM
    context_ids: list[int]

    def next_byte_distribution(self, text: bytes | str) -> torch.Tensor:
        return self.lm.next_byte_distribution(text, self.context_ids)
