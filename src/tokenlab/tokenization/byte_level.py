"""Exact byte-level probabilities from a tokenized language model, with KV-cache reuse across bytes.

Implements *Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model
Ensembles* (Phan et al.). A tokenized LM defines a distribution over byte strings; its next-byte
distribution is *not* the first byte of the next-token distribution when the prompt ends inside a
token ("tokenization bias"). The Byte-Token Representation Lemma gives the exact byte-level law:

* a **cover encoding** of a byte prefix ``x`` is a canonical prefix (a prefix of the canonical
  encoding of some text; :mod:`tokenlab.tokenization.canonical`) ``t_1..t_k`` with
  ``decode(t_1..t_{k-1})`` a strict prefix of ``x`` and ``x`` a prefix of ``decode(t_1..t_k)``;
* ``P(x) = Σ_{t ∈ cover(x)} P(t_1..t_k)`` — the probability that generated text starts with ``x``;
* ``P(b | x) = P(x·b) / P(x)`` for each byte ``b``, plus an end-of-text outcome (index 256) whose
  mass is ``P(τ(x) EOS)``, the canonical encoding of ``x`` followed by EOS.

**Branches.** Every cover encoding is ``c + [t]`` with ``c`` a canonical prefix whose text is
``x[:i]`` — a *branch* at split ``i`` — and ``len(x) − i < L`` (the longest token). Canonical prefixes
are prefix-closed, so the branches at split ``n + 1`` are the branches at splits ``j > n + 1 − L``
extended by the token ``x[j:n+1]`` where that extension is canonical: each new byte adds the new
branches (usually one; a few where pre-token boundaries are still undecided) and drops the ones that
fell ``L`` bytes behind. Tokens before the last *stable cut* of ``x`` (a pre-token boundary that no
continuation moves) are shared by every branch: they form the **trunk**.

**KV cache.** The trunk's keys/values are computed once; each branch keeps the keys/values of its
own few tokens past the trunk. The new branches of a byte are evaluated in **one batched forward of
one new token each**: the trunk cache is expanded over the batch, each row's parent keys/values are
laid after it (right-padded, masked), and the rows get explicit position ids. Generating ``n`` bytes
costs ``n`` small forwards of about one token per branch, not ``n`` re-encodings of the prompt.
``kv_cache=False`` evaluates each new branch from scratch instead (the readable reference; same
laws).

The lemma assumes the model puts no mass on non-canonical sequences; for a real model the law is
the normalised sum over canonical cover encodings (the paper's practice).

Also here: byte-level greedy/sampled generation, fill-in-the-middle from a prefix that ends mid-token,
byte-level ensembles of models with different tokenizers — a fixed mixture (the paper's) or the
consistency weights of *Harnessing Consistency for Robust Test-Time LLM Ensemble* (CoRE) — and the
baselines, naive token completion and token healing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from tokenlab._checks import (
    check_bool,
    check_choice,
    check_generator,
    check_int,
    check_positive,
    check_tensor,
)
from tokenlab._hf import cache_kwargs
from tokenlab.tokenization.canonical import ByteLevelBPE

EOS_BYTE = 256
"""Index of the end-of-text outcome in a next-byte law (laws have 257 entries: bytes 0–255, EOS)."""

__all__ = [
    "EOS_BYTE",
    "ByteLevelBPE",
    "ByteLevelCost",
    "ByteLevelEnsemble",
    "ByteLevelLM",
    "core_weights",
    "fill_in_the_middle",
    "generate_bytes",
]


def _as_bytes(text: bytes | str, name: str) -> bytes:
    if isinstance(text, str):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate has no UTF-8 bytes
            raise ValueError(f"`{name}` is not valid Unicode ({err}); pass bytes instead") from None
    if isinstance(text, (bytes, bytearray)):
        return bytes(text)
    raise TypeError(f"`{name}` must be bytes or str, got {type(text).__name__}")


@dataclass
class ByteLevelCost:
    """Work done by a :class:`ByteLevelLM`: batched forwards, rows (branches) in them, input tokens,
    seconds in the model."""

    forward_calls: int = 0
    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0


Layers = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer: keys, values, (1, heads, T, dim)


@dataclass(eq=False)
class _Branch:
    """A canonical prefix ``trunk + ids`` whose text ends at byte ``end`` of the session text."""

    ids: tuple[int, ...]  # tokens after the trunk
    end: int
    cut: int  # its last stable cut (a token boundary), ≥ the trunk's
    window_ids: tuple[int, ...]  # its tokens after `cut`
    complete: bool  # the canonical encoding of its text (EOS may follow)
    logprob: float = math.nan  # log P(trunk + ids | context)
    next_logprobs: torch.Tensor | None = None  # (V,) float64
    kv: Layers | None = None  # keys/values of `ids` (KV-cache mode)


@dataclass(eq=False)
class _Session:
    """The branches of one byte prefix ``text`` after a fixed token ``context``."""

    context: tuple[int, ...]
    text: bytes
    trunk_ids: list[int]
    trunk_end: int
    trunk_kv: Layers | None
    branches: dict[tuple[int, ...], _Branch] = field(default_factory=dict)


class ByteLevelLM:
    """A tokenized causal LM viewed as a distribution over byte strings (Byte-Token Representation Lemma).

    Args:
        model: a Hugging Face causal LM (called with ``input_ids``, ``attention_mask``,
            ``position_ids`` and, with ``kv_cache``, a ``DynamicCache`` as ``cache`` or
            ``past_key_values``, whichever its ``forward`` declares).
        tokenizer: its byte-level BPE tokenizer (fast).
        context_ids: token ids every sequence starts with (default ``[bos_token_id]``); FIM sentinels
            and a tokenized suffix go here.
        eos_token_id: the token that ends text (default ``tokenizer.eos_token_id``); its probability is
            the law's end-of-text outcome.
        batch_size: most branches per forward.
        kv_cache: reuse keys/values across bytes (module docstring); ``False`` recomputes each new
            branch from its first token (the reference).

    ``cost`` accumulates the model work (:class:`ByteLevelCost`). Successive calls whose text extends
    the previous one (generation, scoring a text byte by byte) continue from the previous branches.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        context_ids: Sequence[int] | None = None,
        eos_token_id: int | None = None,
        batch_size: int = 64,
        kv_cache: bool = True,
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
        eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if eos_token_id is None:
            raise ValueError("`eos_token_id` is required when the tokenizer has no EOS token")
        self.eos_token_id = check_int("eos_token_id", eos_token_id, low=0, high=self.bpe.vocab_size - 1)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.kv_cache = check_bool("kv_cache", kv_cache)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.cost = ByteLevelCost()
        V, L = self.bpe.vocab_size, self.bpe.max_token_bytes
        self._byte_at = torch.full((V, L + 1), -1, dtype=torch.long)  # byte k of each token, −1 past its end
        for t in self.bpe.byte_token_ids:
            self._byte_at[t, : len(self.bpe.token_bytes[t])] = torch.tensor(list(self.bpe.token_bytes[t]))
        self._session: _Session | None = None

    def _check_context(self, context_ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in context_ids]
        if not ids:
            raise ValueError("`context_ids` must hold at least one token (e.g. BOS)")
        if any(not 0 <= i < self.bpe.vocab_size for i in ids):
            raise ValueError(f"`context_ids` must be token ids in [0, {self.bpe.vocab_size})")
        return ids

    # ------------------------------------------------------------------------------ sessions
    def _current(self, data: bytes, context: list[int]) -> _Session:
        """The session for ``data`` after ``context``: the previous one grown by the new bytes when
        ``data`` extends its text, else a new one from the last stable cut of ``data``."""
        s = self._session
        if s is None or s.context != tuple(context) or not data.startswith(s.text):
            s = self._session = self._start(data, context)
        if len(data) > len(s.text):
            self._grow(s, data[len(s.text) :])
            self._forward_pending(s)
            self._commit(s)
        return s

    def _start(self, data: bytes, context: list[int]) -> _Session:
        cut = self.bpe.stable_cut(data)
        trunk = self.bpe.encode(data[:cut])
        s = _Session(tuple(context), data[:cut], trunk, cut, None)
        root = _Branch((), cut, cut, (), True)
        if self.kv_cache:
            logp, s.trunk_kv = self._run_trunk(context + trunk)
            steps = torch.arange(len(context) - 1, len(context) + len(trunk) - 1)
            root.logprob = logp[steps, trunk].sum().item()
            root.next_logprobs = logp[-1]
            root.kv = tuple((k[:, :, :0], v[:, :, :0]) for k, v in s.trunk_kv)
        s.branches[()] = root
        self._forward_pending(s)
        return s

    def _grow(self, s: _Session, new: bytes) -> None:
        """Append ``new`` to the session text: add the branches that end at each new byte."""
        bpe, L = self.bpe, self.bpe.max_token_bytes
        for byte in new:
            s.text += bytes([byte])
            n = len(s.text)
            for parent in [b for b in s.branches.values() if b.end >= n - L]:
                token = bpe.token_id.get(s.text[parent.end : n])
                if token is None:
                    continue
                window = s.text[parent.cut : n]
                if bpe.is_canonical_prefix(window, [*parent.window_ids, token]):
                    cut = bpe.stable_cut(s.text, parent.cut)
                    ids = (*parent.window_ids, token)
                    window_ids = ids[bpe.tokens_covering(ids, cut - parent.cut) :]
                    complete = bpe.encode(s.text[cut:n]) == list(window_ids)
                    key = (*parent.ids, token)
                    s.branches[key] = _Branch(key, n, cut, window_ids, complete)
            # drop the branches that fell L bytes behind, but keep the ancestors of the others: the
            # root (the trunk) and the rows that KV-cached evaluation continues from
            keep = {k[:j] for k, b in s.branches.items() if b.end >= n - L for j in range(len(k) + 1)}
            s.branches = {k: b for k, b in s.branches.items() if k in keep}

    def _commit(self, s: _Session) -> None:
        """Move the trunk to the last stable cut of the text: its tokens are shared by every branch."""
        cut = self.bpe.stable_cut(s.text, s.trunk_end)
        if cut == s.trunk_end:
            return
        shared = tuple(self.bpe.encode(s.text[s.trunk_end : cut]))
        m = len(shared)
        kept = {k: b for k, b in s.branches.items() if b.end >= cut and k[:m] == shared}
        if not kept:
            return
        if self.kv_cache:
            donor = next(iter(kept.values())).kv
            s.trunk_kv = tuple(
                (torch.cat([k, dk[:, :, :m]], 2), torch.cat([v, dv[:, :, :m]], 2))
                for (k, v), (dk, dv) in zip(s.trunk_kv, donor)
            )
            for b in kept.values():
                b.kv = tuple((k[:, :, m:], v[:, :, m:]) for k, v in b.kv)
        for b in kept.values():
            b.ids = b.ids[m:]
        s.branches = {b.ids: b for b in kept.values()}
        s.trunk_ids += shared
        s.trunk_end = cut

    # ---------------------------------------------------------------------------- the model
    def _call(self, input_ids, attention_mask, position_ids, cache=None):
        """Log-probabilities ``(R, T, V)`` of one forward and, with a ``cache`` (KV-cache mode), the
        keys/values it holds afterwards (the model fills it in place)."""
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        kwargs = {**cache_kwargs(self.model, cache), "use_cache": True} if cache is not None else {}
        out = self.model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            **kwargs,
        )
        logp = torch.log_softmax(out.logits.double(), dim=-1)[..., : self.bpe.vocab_size].cpu()
        self._account(input_ids.shape[0], int(attention_mask[:, -input_ids.shape[1] :].sum()), start)
        layers = tuple((layer.keys, layer.values) for layer in cache.layers) if cache is not None else None
        return logp, layers

    def _account(self, rows: int, tokens: int, start: float) -> None:
        """Add one forward of ``rows`` sequences and ``tokens`` input tokens, begun at ``start``."""
        self.cost.forward_calls += 1
        self.cost.sequences += rows
        self.cost.tokens += tokens
        self.cost.seconds += time.perf_counter() - start

    @staticmethod
    def _empty_cache(layers: Layers | None = None) -> DynamicCache:
        """A cache of full-attention layers holding ``layers`` (the trunk, or trunk + parents per row)."""
        return DynamicCache(ddp_cache_data=layers) if layers else DynamicCache()

    @torch.no_grad()
    def _run_trunk(self, ids: list[int]) -> tuple[torch.Tensor, Layers]:
        """Log-probabilities (T, V) after each token of ``ids`` and their keys/values."""
        x = torch.tensor([ids])
        logp, layers = self._call(x, torch.ones_like(x), torch.arange(len(ids))[None], self._empty_cache())
        return logp[0], layers

    @torch.no_grad()
    def _forward_pending(self, s: _Session) -> None:
        """Evaluate the branches without model output, in batches: each row continues the nearest
        evaluated ancestor (KV cache) or starts from the context (reference); a pending branch that is
        a prefix of another one is read off that one's row."""
        pending = [b for b in s.branches.values() if b.next_logprobs is None]
        pending.sort(key=lambda b: -len(b.ids))
        rows: list[tuple[_Branch, int]] = []  # (deepest branch of the row, tokens already evaluated)
        covered: set[tuple[int, ...]] = set()
        for b in pending:
            if b.ids in covered:
                continue
            done = 0
            if self.kv_cache:  # the nearest evaluated ancestor; the root (the trunk) at worst
                done = max((k for k in range(len(b.ids)) if self._evaluated(s, b.ids[:k])), default=0)
            covered.update(b.ids[:k] for k in range(done + 1, len(b.ids) + 1))
            rows.append((b, done))
        for lo in range(0, len(rows), self.batch_size):
            chunk = rows[lo : lo + self.batch_size]
            if self.kv_cache:
                self._forward_cached(s, chunk)
            else:
                self._forward_reference(s, chunk)

    @staticmethod
    def _evaluated(s: _Session, ids: tuple[int, ...]) -> bool:
        branch = s.branches.get(ids)
        return branch is not None and branch.kv is not None

    def _forward_cached(self, s: _Session, rows: list[tuple[_Branch, int]]) -> None:
        T = len(s.context) + len(s.trunk_ids)
        past = max(done for _, done in rows)
        width = max(len(b.ids) - done for b, done in rows)
        B = len(rows)
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T + past + width), dtype=torch.long)
        mask[:, :T] = 1
        positions = torch.zeros((B, width), dtype=torch.long)
        for r, (b, done) in enumerate(rows):
            new = b.ids[done:]
            ids[r, : len(new)] = torch.tensor(new)
            mask[r, T : T + done] = 1
            mask[r, T + past : T + past + len(new)] = 1
            positions[r] = T + done + torch.arange(width)
        layers = []
        for li, (k, v) in enumerate(s.trunk_kv):
            ks, vs = [k.expand(B, -1, -1, -1)], [v.expand(B, -1, -1, -1)]
            if past:
                pk = k.new_zeros((B, k.shape[1], past, k.shape[3]))
                pv = v.new_zeros((B, v.shape[1], past, v.shape[3]))
                for r, (b, done) in enumerate(rows):
                    if done:
                        ak, av = s.branches[b.ids[:done]].kv[li]
                        pk[r, :, :done], pv[r, :, :done] = ak[0], av[0]
                ks.append(pk)
                vs.append(pv)
            layers.append((torch.cat(ks, 2), torch.cat(vs, 2)))
        logp, out = self._call(ids, mask, positions, self._empty_cache(tuple(layers)))
        for r, (b, done) in enumerate(rows):
            parent = s.branches[b.ids[:done]]
            new_kv = tuple((k[r : r + 1, :, T + past :], v[r : r + 1, :, T + past :]) for k, v in out)
            self._fill(s, b, done, parent.logprob, parent.next_logprobs, logp[r], parent.kv, new_kv)

    def _forward_reference(self, s: _Session, rows: list[tuple[_Branch, int]]) -> None:
        head = list(s.context) + s.trunk_ids
        width = max(len(head) + len(b.ids) for b, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (b, _) in enumerate(rows):
            seq = head + list(b.ids)
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        logp, _ = self._call(ids, mask, torch.arange(width).expand(len(rows), -1))
        C = len(s.context)
        for r, (b, _) in enumerate(rows):
            trunk = logp[r, torch.arange(C - 1, len(head) - 1), s.trunk_ids].sum().item()
            self._fill(s, b, 0, trunk, logp[r, len(head) - 1], logp[r, len(head) :], None, None)

    def _fill(self, s, b, done, logprob, before, logp_rows, base_kv, new_kv) -> None:
        """Set log-probabilities (and keys/values) of the branches ``b.ids[:k]``, ``k > done``, from one
        row: ``before`` is the law after ``b.ids[:done]``, ``logp_rows[j]`` the law after token ``done+j``."""
        for j, token in enumerate(b.ids[done:]):
            logprob += (before if j == 0 else logp_rows[j - 1])[token].item()
            node = s.branches.get(b.ids[: done + j + 1])
            if node is not None and node.next_logprobs is None:
                node.logprob, node.next_logprobs = logprob, logp_rows[j].clone()
                if new_kv is not None:
                    node.kv = tuple(
                        (torch.cat([bk, nk[:, :, : j + 1]], 2), torch.cat([bv, nv[:, :, : j + 1]], 2))
                        for (bk, bv), (nk, nv) in zip(base_kv, new_kv)
                    )
        if s.branches.get(()) is b and b.next_logprobs is None:  # reference mode: the root itself
            b.logprob, b.next_logprobs = logprob, before.clone()

    # ----------------------------------------------------------------------------------- laws
    def _covers(self, s: _Session, strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-masses of the cover encodings of the session text and the byte each one puts next
        (``EOS_BYTE`` for the canonical encoding followed by EOS; −1 when the cover ends with the text).
        ``strict``: only branches before the end (prefix probability)."""
        n = len(s.text)
        masses, outcomes = [], []
        for b in s.branches.values():
            depth = n - b.end
            if depth > self.bpe.max_token_bytes or (strict and depth == 0):
                continue
            window = s.text[b.cut : b.end]
            tokens = self.bpe.next_tokens(window, b.window_ids, s.text[b.end :])
            masses.append(b.logprob + b.next_logprobs[tokens])
            outcomes.append(self._byte_at[tokens, depth])
            if depth == 0 and b.complete:
                masses.append(b.logprob + b.next_logprobs[[self.eos_token_id]])
                outcomes.append(torch.tensor([EOS_BYTE]))
        if not masses:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
        return torch.cat(masses), torch.cat(outcomes)

    def prefix_log_probability(self, text: bytes | str, context_ids: Sequence[int] | None = None) -> float:
        """``log P(x)``: log-probability that the generated text starts with ``x`` — the log of the
        sum over the cover encodings of ``x`` (Byte-Token Representation Lemma)."""
        data = _as_bytes(text, "text")
        context = self.context_ids if context_ids is None else self._check_context(context_ids)
        if not data:
            return 0.0
        masses, _ = self._covers(self._current(data, context), strict=True)
        return torch.logsumexp(masses, 0).item() if masses.numel() else float("-inf")

    def next_byte_distribution(
        self, text: bytes | str, context_ids: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Exact law of the byte after ``x``: a float64 tensor of 257 probabilities (bytes, then EOS).

        ``P(b | x) ∝ Σ_{t ∈ cover(x·b)} P(t)``: a branch ``c`` at split ``i`` puts the mass
        ``P(c) p(t | c)`` of each canonical next token ``t`` that starts with ``x[i:]`` on the byte of
        ``t`` at position ``len(x) − i``; the canonical encoding of ``x`` adds ``P(τ(x)) p(EOS | τ(x))``.
        """
        data = _as_bytes(text, "text")
        context = self.context_ids if context_ids is None else self._check_context(context_ids)
        masses, outcomes = self._covers(self._current(data, context), strict=False)
        keep = outcomes >= 0
        masses, outcomes = masses[keep], outcomes[keep]
        if not masses.numel() or not torch.isfinite(masses.max()):
            raise ValueError(
                f"`text` has probability zero under the model (no cover encoding has mass): {data!r}"
            )
        weights = torch.exp(masses - masses.max())
        law = torch.zeros(EOS_BYTE + 1, dtype=torch.float64).index_add_(0, outcomes, weights)
        return law / law.sum()

    @torch.no_grad()
    def _full_logprobs(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids])
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=x.to(device), attention_mask=torch.ones_like(x).to(device)).logits
        self._account(1, len(ids), start)
        return torch.log_softmax(logits[0, -1].double(), -1)[: self.bpe.vocab_size].cpu()

    def naive_next_byte_distribution(
        self, text: bytes | str, context_ids: Sequence[int] | None = None
    ) -> torch.Tensor:
        """The biased baseline: encode ``x``, take the next-token distribution and read off the first
        byte of each token (257 entries, EOS last). Differs from the exact law when ``x`` ends mid-token."""
        data = _as_bytes(text, "text")
        context = self.context_ids if context_ids is None else self._check_context(context_ids)
        logp = self._full_logprobs(context + self.bpe.encode(data))
        ids = torch.tensor(self.bpe.byte_token_ids)
        outcome = torch.cat([self._byte_at[ids, 0], torch.tensor([EOS_BYTE])])
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
        allowed = torch.zeros(self.bpe.vocab_size, dtype=torch.bool)
        allowed[self.bpe.tokens_starting_with(removed)] = True
        generated: list[int] = []
        for step in range(max_new_tokens):
            scores = self._full_logprobs(ids + generated)
            if step == 0:
                scores = scores.masked_fill(~allowed, float("-inf"))
            nxt = int(scores.argmax())
            if nxt == self.eos_token_id:
                break
            generated.append(nxt)
        return self.bpe.decode(generated)[len(removed) :]


# ---------------------------------------------------------------------------------- ensembles
def core_weights(laws: torch.Tensor, beta: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token- and model-level consistency of *Harnessing Consistency for Robust Test-Time LLM Ensemble*
    (CoRE) for ``M`` next-outcome laws over one shared vocabulary (here: the 257 byte outcomes).

    With the reference law ``p* = mean_m p_m`` and disparities ``δ_m = |p_m − p*|``:

    * token consistency (a low-pass filter, the paper's RBF form)
      ``s_m(v) = (exp(−β δ_m(v)) − exp(−β)) / (1 − exp(−β))`` on the outcomes some member gives mass
      (``p*(v) > 0``; 0 elsewhere), rescaled to mean 1 over those outcomes;
    * model consistency ``c_m = Σ_v s_m(v) / H(p_m)`` (the unscaled sum, over the entropy in nats),
      and weights ``w_m = c_m / Σ_k c_k``.

    Args:
        laws: ``(M, K)`` probabilities, each row summing to 1.
        beta: the filter's sharpness ``β > 0``.

    Returns:
        ``(s, w)``: ``(M, K)`` token consistency and ``(M,)`` model weights. The ensemble law is
        ``Σ_m w_m s_m ⊙ p_m`` renormalised (:class:`ByteLevelEnsemble` with ``method="core"``).
    """
    beta = check_positive("beta", beta)
    laws = check_tensor("laws", laws, ndim=2, floating=True).double()
    if not bool(torch.isfinite(laws).all()) or bool((laws < 0).any()):
        raise ValueError("`laws` must hold finite non-negative probabilities")
    reference = laws.mean(0, keepdim=True)
    support = reference > 0
    floor = math.exp(-beta)
    scores = ((torch.exp(-beta * (laws - reference).abs()) - floor) / (1 - floor)) * support
    total = scores.sum(1)
    token = scores / total.clamp_min(1e-300)[:, None] * support.sum()
    p = laws.clamp_min(1e-300)
    entropy = -(laws * p.log()).sum(1)
    model = total / entropy.clamp_min(1e-12)
    return token, model / model.sum()


class ByteLevelEnsemble:
    """Byte-level ensemble of models with different tokenizers (Phan et al., model ensembles): every
    member's exact next-byte law lives on the same 257 outcomes, so they combine without any
    vocabulary alignment.

    Args:
        members: :class:`ByteLevelLM` objects (any tokenizers).
        weights: ``method="mixture"``: finite non-negative weights (default uniform), normalised —
            ``P(b | x) = Σ_m w_m P_m(b | x)``.
        method: ``"mixture"`` (the paper's fixed mixture) or ``"core"``: per-byte consistency weights of
            CoRE (:func:`core_weights`), ``P(b | x) ∝ Σ_m w_m(x) s_m(b | x) P_m(b | x)``.
        beta: CoRE's filter sharpness.

    ``last_weights`` holds the member weights used for the latest law.
    """

    def __init__(
        self,
        members: Sequence[ByteLevelLM],
        weights: Sequence[float] | None = None,
        *,
        method: str = "mixture",
        beta: float = 2.0,
    ):
        if not members or not all(isinstance(m, ByteLevelLM) for m in members):
            raise TypeError("`members` must be a non-empty sequence of ByteLevelLM")
        self.method = check_choice("method", method, ["mixture", "core"])
        self.beta = check_positive("beta", beta)
        if weights is not None and method == "core":
            raise ValueError("`weights` are computed per byte by method='core'; pass weights=None")
        w = (
            torch.ones(len(members), dtype=torch.float64)
            if weights is None
            else torch.tensor(weights, dtype=torch.float64)
        )
        if w.shape != (len(members),) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"`weights` must be {len(members)} non-negative numbers with a positive sum")
        self.members = list(members)
        self.weights = w / w.sum()
        self.last_weights = self.weights

    def next_byte_distribution(self, text: bytes | str) -> torch.Tensor:
        """The ensemble's law of the next byte (257 entries, EOS last)."""
        return self.combine(torch.stack([m.next_byte_distribution(text) for m in self.members]))

    def combine(self, laws: torch.Tensor) -> torch.Tensor:
        """The ensemble law from the members' laws ``(M, 257)`` (in the order of ``members``)."""
        if self.method == "mixture":
            self.last_weights = self.weights
            return self.weights @ laws
        token, self.last_weights = core_weights(laws, self.beta)
        law = self.last_weights @ (token * laws)
        return law / law.sum()


# --------------------------------------------------------------------------------- generation
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
    check_generator("generator", generator, "cpu")  # the laws are on the CPU
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
    if not isinstance(lm, ByteLevelLM):
        raise TypeError(f"`lm` must be a ByteLevelLM (it encodes the suffix), got {type(lm).__name__}")
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
