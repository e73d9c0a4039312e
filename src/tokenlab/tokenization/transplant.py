"""Tokenizer transplant: give a trained model a new tokenizer without training.

Tokens of the new vocabulary that the old one also has (*shared* tokens, matched by their string)
keep their exact embedding rows. Each *unique* new token gets a row from one of these methods:

* ``"omp"`` — *Training-Free Tokenizer Transplantation via Orthogonal Matching Pursuit* (Goddard &
  Neto): in the embedding space of a *donor* model that already uses the new tokenizer, write the
  unique token as a sparse combination of shared *anchor* tokens, ``d_new ≈ Σ_{j∈S} c_j d_j``
  (``|S| ≤ k``, chosen greedily by OMP), and reuse the coefficients with the base model's anchor
  rows: ``e_new = Σ_{j∈S} c_j e_j``.
* ``"tokenadapt"`` — the TokenAdapt hybrid of *Achieving Tokenizer Flexibility in Language Models
  through Heuristic Adaptation and Supertoken Learning* (Sharthak et al.). Similarities are cosines
  in an *auxiliary* embedding space ``φ`` (the paper embeds token strings with an external text
  encoder). The **local** estimate decomposes the token's bytes ``s`` with the old tokenizer into
  ``sub_1..sub_n`` and weights each by similarity and length share,
  ``w_i = softmax_i(((cos(φ(s), φ(sub_i)) + len(sub_i)/len(s)) / 2) / τ)``, ``e_loc = Σ_i w_i e_{sub_i}``.
  The **global** estimate searches the *whole* old vocabulary for the ``k`` tokens ``j`` most similar
  to ``φ(s)``, keeps those with ``cos_j ≥ θ`` and takes ``e_glob = Σ_j softmax_j(cos_j / τ) e_j``.
  Then ``e_new = (1 − w) e_loc + w e_glob``, or ``e_loc`` alone when no neighbour reaches ``θ``.
  Defaults are the authors' (``τ = 0.3``, ``k = 3``, ``θ = 0.6``, ``w = 0.3``). See
  :func:`transplant_tokenizer` for the auxiliary space used when no text embedder is given.
* ``"mean_of_subtokens"`` — ``e_new = mean_i e_{sub_i}`` over the old tokenizer's decomposition.
* ``"mean"`` — the mean of all old rows; ``"zero"`` — zeros.

Tied input/output embeddings stay tied; untied output rows are transplanted the same way (with the
same decompositions, neighbours and OMP codes). Both tokenizers must be byte-level BPE (decompositions
work on bytes, so tokens that end inside a UTF-8 character are handled exactly).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenlab._checks import (
    ArgumentTypeError,
    check_choice,
    check_int,
    check_number,
    check_positive,
    check_probability,
)
from tokenlab.tokenization.byte_level import ByteLevelBPE


def orthogonal_matching_pursuit(
    dictionary: torch.Tensor, targets: torch.Tensor, atoms: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Orthogonal Matching Pursuit: sparse codes of ``targets`` over the rows of ``dictionary``.

    For each target ``y`` (row of ``targets``, shape ``(N, d)``) greedily pick, ``atoms`` times, the
    dictionary row (``(A, d)``) most correlated (after normalisation) with the residual, then refit
    the coefficients on all picked rows by least squares: ``c = argmin ‖y − Σ_{j∈S} c_j D_j‖``.

    Returns:
        ``(indices, coefficients)``, both ``(N, atoms)``: picked rows and their coefficients.
    """
    if dictionary.dim() != 2 or targets.dim() != 2 or dictionary.shape[1] != targets.shape[1]:
        raise ValueError("`dictionary` (A, d) and `targets` (N, d) must be 2-D with the same d")
    if not 1 <= atoms <= dictionary.shape[0]:
        raise ValueError(f"`atoms` must be in [1, {dictionary.shape[0]}], got {atoms}")
    unit = dictionary / dictionary.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = targets.shape[0]
    indices = torch.zeros(n, atoms, dtype=torch.long, device=targets.device)
    chosen = torch.zeros(n, dictionary.shape[0], dtype=torch.bool, device=targets.device)
    residual, coefficients = targets, None
    for step in range(atoms):
        score = (residual @ unit.T).abs().masked_fill(chosen, -1.0)
        indices[:, step] = score.argmax(dim=1)
        chosen[torch.arange(n), indices[:, step]] = True
        basis = dictionary[indices[:, : step + 1]]  # (N, s, d)
        coefficients = torch.linalg.lstsq(basis.transpose(1, 2), targets.unsqueeze(2)).solution.squeeze(2)
        residual = targets - torch.einsum("ns,nsd->nd", coefficients, basis)
    return indices, coefficients


TextEmbedder = Callable[[list[str]], torch.Tensor]
"""TokenAdapt's external embedder: ``N`` token strings -> an ``(N, d)`` tensor of their vectors."""


def hf_text_embedder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 64
) -> TextEmbedder:
    """A :data:`TextEmbedder` from an HF encoder (or any HF model that returns hidden states): the mean
    of the last hidden states over a string's tokens, as TokenAdapt's tool embeds token strings with
    a text-embedding model. Strings are embedded ``batch_size`` at a time, right-padded (the padding
    is masked out of attention and of the mean; the tokenizer needs no pad token)."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"`model` must be a transformers PreTrainedModel, got {type(model).__name__}")
    check_int("batch_size", batch_size, low=1)

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        device = next(model.parameters()).device
        out = []
        for lo in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[lo : lo + batch_size])["input_ids"]
            width = max(1, max(map(len, encoded)))
            ids = torch.zeros(len(encoded), width, dtype=torch.long)
            mask = torch.zeros(len(encoded), width, dtype=torch.long)
            for row, seq in enumerate(encoded):
                ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq, dtype=torch.long), 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            weights = mask.unsqueeze(-1).to(torch.float64)
            out.append((hidden.double() * weights).sum(1).cpu() / weights.sum(1).clamp_min(1.0).cpu())
        return torch.cat(out)

    return embed


class AuxiliarySpace:
    """TokenAdapt's auxiliary space: unit vectors ``φ(s)`` of byte strings, and of every old token.

    Args:
        embed: byte strings -> ``(N, d)`` vectors.
        old_token_bytes: the old vocabulary's token bytes (``None`` for special tokens, which are
            left out of the global search).
    """

    def __init__(self, embed: Callable[[list[bytes]], torch.Tensor], old_token_bytes: Sequence[bytes | None]):
        self._embed = embed
        self._old_token_bytes = old_token_bytes

    def vectors(self, strings: Sequence[bytes]) -> torch.Tensor:
        """``(N, d)`` float64 unit vectors ``φ(s)`` of ``strings``."""
        return torch.nn.functional.normalize(self._embed(list(strings)).double(), dim=1)

    @functools.cached_property
    def old(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors (V_old, d), valid (V_old,))``: ``φ`` of every old token; zero rows and
        ``valid = False`` for tokens without bytes (special tokens)."""
        ids = [i for i, b in enumerate(self._old_token_bytes) if b]
        found = self.vectors([self._old_token_bytes[i] for i in ids])
        vectors = found.new_zeros(len(self._old_token_bytes), found.shape[1])
        valid = torch.zeros(len(self._old_token_bytes), dtype=torch.bool)
        vectors[ids], valid[ids] = found, True
        return vectors, valid

    @classmethod
    def from_text_embedder(
        cls, embedder: TextEmbedder, old_token_bytes: Sequence[bytes | None]
    ) -> AuxiliarySpace:
        """Strings go to ``embedder`` decoded as UTF-8 (an incomplete character becomes U+FFFD)."""
        return cls(
            lambda strings: embedder([s.decode("utf-8", errors="replace") for s in strings]), old_token_bytes
        )

    @classmethod
    def from_embeddings(
        cls, bpe: ByteLevelBPE, rows: torch.Tensor, old_token_bytes: Sequence[bytes | None]
    ) -> AuxiliarySpace:
        """The static space of an embedding matrix ``rows`` over ``bpe``'s vocabulary: ``φ(s)`` is the
        row of ``s`` when ``s`` is one of its tokens, else the mean of the rows of ``bpe``'s
        encoding of ``s``."""
        index = {b: i for i, b in enumerate(bpe.token_bytes) if b}

        def embed(strings: list[bytes]) -> torch.Tensor:
            out = rows.new_empty(len(strings), rows.shape[1])
            todo = [k for k, s in enumerate(strings) if s not in index]
            for k, s in enumerate(strings):
                if s in index:
                    out[k] = rows[index[s]]
            for k, ids in zip(todo, bpe.encode_many([strings[k] for k in todo])):
                out[k] = rows[ids].mean(0)
            return out

        return cls(embed, old_token_bytes)


@dataclass
class TransplantProblem:
    """Everything a method needs for the unique tokens of one chunk.

    ``anchor_old``/``anchor_new``: ids of the shared tokens in the old and new vocabularies;
    ``unique``: new ids; ``unique_bytes[i]``: unique token ``i``'s bytes (``None`` for special tokens);
    ``decompositions[i]``: old-token ids of those bytes (empty for special tokens) and
    ``decomposition_lengths[i]`` their byte lengths; ``donor``: the donor's input embeddings (new
    vocabulary) or ``None``; ``auxiliary``: TokenAdapt's auxiliary space (evaluated only when used).
    """

    anchor_old: torch.Tensor
    anchor_new: torch.Tensor
    unique: torch.Tensor
    unique_bytes: list[bytes | None]
    decompositions: list[list[int]]
    decomposition_lengths: list[list[int]]
    donor: torch.Tensor | None
    auxiliary: AuxiliarySpace
    omp_atoms: int
    top_k: int
    temperature: float
    similarity_threshold: float
    global_weight: float


Method = Callable[[TransplantProblem, torch.Tensor], torch.Tensor]
"""``(problem, old_rows (V_old, d)) -> rows of the unique tokens (len(problem.unique), d)``."""


def _zero(problem: TransplantProblem, old: torch.Tensor) -> torch.Tensor:
    return old.new_zeros(len(problem.unique), old.shape[1])


def _mean(problem: TransplantProblem, old: torch.Tensor) -> torch.Tensor:
    return old.mean(0).expand(len(problem.unique), -1).clone()


def _weighted_subtokens(problem: TransplantProblem, old: torch.Tensor, by_length: bool) -> torch.Tensor:
    rows = _mean(problem, old)
    for i, (ids, lengths) in enumerate(zip(problem.decompositions, problem.decomposition_lengths)):
        if ids:
            w = torch.tensor(lengths if by_length else [1] * len(ids), dtype=old.dtype, device=old.device)
            rows[i] = (w / w.sum()) @ old[ids]
    return rows


def _mean_of_subtokens(problem: TransplantProblem, old: torch.Tensor) -> torch.Tensor:
    return _weighted_subtokens(problem, old, by_length=False)


def _omp(problem: TransplantProblem, old: torch.Tensor) -> torch.Tensor:
    if problem.donor is None:
        raise ValueError("method 'omp' needs a `donor` model that uses the new tokenizer")
    donor = problem.donor.to(old.device, torch.float64)
    atoms = min(problem.omp_atoms, len(problem.anchor_new))
    idx, coef = orthogonal_matching_pursuit(donor[problem.anchor_new], donor[problem.unique], atoms)
    return torch.einsum("nk,nkd->nd", coef.to(old.dtype), old[problem.anchor_old[idx]])


def _tokenadapt_local(problem: TransplantProblem, old: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``e_loc`` rows, ``w_i = softmax_i(((cos(φ(s), φ(sub_i)) + len_i / len(s)) / 2) / τ)``, padded
    over the decompositions (rows without one: the mean row)."""
    n, width = len(problem.unique), max(1, max(map(len, problem.decompositions)))
    ids = torch.zeros(n, width, dtype=torch.long)
    share = torch.zeros(n, width, dtype=torch.float64)
    present = torch.zeros(n, width, dtype=torch.bool)
    for i, (subs, lengths) in enumerate(zip(problem.decompositions, problem.decomposition_lengths)):
        ids[i, : len(subs)] = torch.tensor(subs, dtype=torch.long)
        share[i, : len(subs)] = torch.tensor(lengths, dtype=torch.float64) / max(1, sum(lengths))
        present[i, : len(subs)] = True
    keys = problem.auxiliary.old[0]  # similarities on the auxiliary space's device, rows on old's
    cos = torch.einsum("nd,nld->nl", query, keys[ids.to(keys.device)]).cpu()
    score = (((cos + share) / 2) / problem.temperature).masked_fill(~present, -torch.inf)
    weights = torch.softmax(score, dim=1).nan_to_num(0.0).to(old.device, old.dtype)  # no subtokens: 0
    local = torch.einsum("nl,nld->nd", weights, old[ids.to(old.device)])
    return torch.where(present.any(1, keepdim=True).to(old.device), local, old.mean(0))


def _tokenadapt_global(
    problem: TransplantProblem, old: torch.Tensor, query: torch.Tensor, has_query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e_glob rows, found (n,))``: top-``k`` old tokens by ``cos(φ(s), φ(t_j))`` over the whole old
    vocabulary, those with ``cos_j ≥ θ`` weighted by ``softmax_j(cos_j / τ)``."""
    keys, valid = problem.auxiliary.old
    sim = (query @ keys.T).masked_fill(~valid.to(keys.device), -torch.inf)
    top = sim.topk(min(problem.top_k, int(valid.sum())), dim=1)
    kept = (top.values >= problem.similarity_threshold) & has_query.to(keys.device).unsqueeze(1)
    weights = torch.softmax((top.values / problem.temperature).masked_fill(~kept, -torch.inf), dim=1)
    weights = weights.nan_to_num(0.0).to(old.device, old.dtype)  # no neighbour at or above θ: 0
    found = kept.any(1).to(old.device)
    return torch.einsum("nk,nkd->nd", weights, old[top.indices.to(old.device)]), found


def _tokenadapt(problem: TransplantProblem, old: torch.Tensor) -> torch.Tensor:
    has_bytes = torch.tensor([b is not None for b in problem.unique_bytes])
    keys = problem.auxiliary.old[0]
    query = keys.new_zeros(len(problem.unique), keys.shape[1])
    if has_bytes.any():  # special tokens have no string: no local or global estimate (mean row)
        found = problem.auxiliary.vectors([b for b in problem.unique_bytes if b is not None])
        query[has_bytes.to(keys.device)] = found.to(keys.device)
    local = _tokenadapt_local(problem, old, query)
    global_, found = _tokenadapt_global(problem, old, query, has_bytes)
    hybrid = (1 - problem.global_weight) * local + problem.global_weight * global_
    return torch.where(found.unsqueeze(1), hybrid, local)


TRANSPLANT_METHODS: dict[str, Method] = {
    "omp": _omp,
    "tokenadapt": _tokenadapt,
    "mean_of_subtokens": _mean_of_subtokens,
    "mean": _mean,
    "zero": _zero,
}
"""Registry of transplant methods; add a method by adding a function here."""


@torch.no_grad()
def transplant_tokenizer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    new_tokenizer: PreTrainedTokenizerBase,
    *,
    method: str = "omp",
    donor: PreTrainedModel | None = None,
    text_embedder: TextEmbedder | None = None,
    omp_atoms: int = 8,
    top_k: int = 3,
    temperature: float = 0.3,
    similarity_threshold: float = 0.6,
    global_weight: float = 0.3,
    chunk_size: int = 512,
    progress: bool = True,
) -> PreTrainedModel:
    """Replace ``model``'s vocabulary by ``new_tokenizer``'s, in place, and return the model.

    Args:
        model: an HF model with input (and tied or untied output) embeddings for ``tokenizer``.
        tokenizer: the model's byte-level BPE tokenizer.
        new_tokenizer: the byte-level BPE tokenizer to transplant to.
        method: a key of :data:`TRANSPLANT_METHODS`.
        donor: a model using ``new_tokenizer``; its input embeddings are OMP's space (required for
            ``"omp"``) and TokenAdapt's auxiliary space when no ``text_embedder`` is given.
        text_embedder: TokenAdapt's auxiliary space as the paper uses it: a callable mapping token
            strings to vectors (e.g. :func:`hf_text_embedder` of a sentence encoder).
        omp_atoms: OMP sparsity ``k``.
        top_k, temperature, similarity_threshold, global_weight: TokenAdapt's ``k``, ``τ``, ``θ`` and
            ``w`` (defaults: the authors' 3, 0.3, 0.6 and 0.3).
        chunk_size: unique tokens per batch; progress: show a progress bar over tokens.

    TokenAdapt's auxiliary space ``φ`` (where the local and global similarities are measured) is,
    in this order: ``text_embedder`` (the paper's choice: an external text encoder applied to the
    token strings); else the **donor's input embeddings**; else the **base model's own input
    embeddings**. In an embedding space, ``φ(s)`` is the row of ``s`` when ``s`` is a token of that
    vocabulary, else the mean of the rows of its encoding, so without a donor a unique token's
    ``φ(s) = mean_i e_{sub_i}`` and the local weights compare it with its own subtokens' rows.

    Shared tokens (same token string) keep their rows exactly. After the call the model has
    ``len(new_tokenizer)`` rows, its config's special-token ids are the new tokenizer's, and
    ``model.save_pretrained(d)`` + ``new_tokenizer.save_pretrained(d)`` give a loadable pair.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"`model` must be a transformers PreTrainedModel, got {type(model).__name__}")
    check_choice("method", method, sorted(TRANSPLANT_METHODS))
    if method == "omp" and donor is None:
        raise ValueError("method 'omp' needs a `donor` model that uses the new tokenizer")
    for name, value in (("omp_atoms", omp_atoms), ("top_k", top_k), ("chunk_size", chunk_size)):
        check_int(name, value, low=1)
    check_positive("temperature", temperature)
    check_number("similarity_threshold", similarity_threshold, low=-1.0, high=1.0)
    check_probability("global_weight", global_weight)
    if text_embedder is not None and not callable(text_embedder):
        raise ArgumentTypeError(
            f"`text_embedder` must be callable (strings -> vectors), got {text_embedder!r}"
        )
    old_bpe, new_bpe = ByteLevelBPE(tokenizer), ByteLevelBPE(new_tokenizer)
    old_vocab, new_vocab = tokenizer.get_vocab(), new_tokenizer.get_vocab()
    new_size = len(new_tokenizer)
    donor_rows = None
    if donor is not None:
        donor_rows = donor.get_input_embeddings().weight.detach()
        if donor_rows.shape[0] < new_size:
            raise ValueError(f"`donor` has {donor_rows.shape[0]} rows < new vocabulary size {new_size}")
    shared = sorted((new_id, old_vocab[tok]) for tok, new_id in new_vocab.items() if tok in old_vocab)
    if not shared:
        raise ValueError("`tokenizer` and `new_tokenizer` share no tokens: nothing to anchor the transplant")
    anchor_new = torch.tensor([n for n, _ in shared])
    anchor_old = torch.tensor([o for _, o in shared])
    shared_new = set(anchor_new.tolist())
    unique = [i for i in range(new_size) if i not in shared_new]

    inputs = model.get_input_embeddings()
    outputs = model.get_output_embeddings()
    tied = outputs is not None and outputs.weight is inputs.weight
    if outputs is not None and getattr(outputs, "bias", None) is not None:
        raise ValueError("output layers with a bias are not supported")
    old_matrices = [inputs.weight.detach().clone()]
    if outputs is not None and not tied:
        old_matrices.append(outputs.weight.detach().clone())
    new_matrices = [m.new_empty(new_size, m.shape[1]) for m in old_matrices]
    for old, new in zip(old_matrices, new_matrices):
        new[anchor_new] = old[anchor_old]
    old_float64 = [m.double() for m in old_matrices]  # the methods compute in float64
    if text_embedder is not None:
        auxiliary = AuxiliarySpace.from_text_embedder(text_embedder, old_bpe.token_bytes)
    elif donor_rows is not None:
        auxiliary = AuxiliarySpace.from_embeddings(new_bpe, donor_rows.double(), old_bpe.token_bytes)
    else:
        auxiliary = AuxiliarySpace.from_embeddings(old_bpe, old_float64[0], old_bpe.token_bytes)

    fn = TRANSPLANT_METHODS[method]
    bar = tqdm(total=len(unique), desc=f"transplant ({method})", unit="token", disable=not progress)
    for lo in range(0, len(unique), chunk_size):
        ids = unique[lo : lo + chunk_size]
        strings = [new_bpe.token_bytes[i] for i in ids]
        encoded = iter(old_bpe.encode_many([b for b in strings if b]))
        decompositions = [next(encoded) if b else [] for b in strings]
        problem = TransplantProblem(
            anchor_old=anchor_old,
            anchor_new=anchor_new,
            unique=torch.tensor(ids, dtype=torch.long),
            unique_bytes=strings,
            decompositions=decompositions,
            decomposition_lengths=[[len(old_bpe.token_bytes[t]) for t in d] for d in decompositions],
            donor=donor_rows,
            auxiliary=auxiliary,
            omp_atoms=omp_atoms,
            top_k=top_k,
            temperature=temperature,
            similarity_threshold=similarity_threshold,
            global_weight=global_weight,
        )
        for old, new in zip(old_float64, new_matrices):
            new[problem.unique] = fn(problem, old).to(new.dtype)
        bar.update(len(ids))
    bar.close()

    model.resize_token_embeddings(new_size, mean_resizing=False)
    model.get_input_embeddings().weight.copy_(new_matrices[0])
    if len(new_matrices) == 2:
        model.get_output_embeddings().weight.copy_(new_matrices[1])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(new_tokenizer, key)
        setattr(model.config, key, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, value)
    return model
