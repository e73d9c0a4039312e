"""Tokenizer transplant: give a trained model a new tokenizer without training.

Tokens of the new vocabulary that the old one also has (*shared* tokens, matched by their string)
keep their exact embedding rows. Each *unique* new token gets a row from one of these methods:

* ``"omp"`` — *Training-Free Tokenizer Transplantation via Orthogonal Matching Pursuit* (Goddard &
  Neto): in the embedding space of a *donor* model that already uses the new tokenizer, write the
  unique token as a sparse combination of shared *anchor* tokens, ``d_new ≈ Σ_{j∈S} c_j d_j``
  (``|S| ≤ k``, chosen greedily by OMP), and reuse the coefficients with the base model's anchor
  rows: ``e_new = Σ_{j∈S} c_j e_j``.
* ``"tokenadapt"`` — the TokenAdapt hybrid of *Achieving Tokenizer Flexibility in Language Models
  through Heuristic Adaptation and Supertoken Learning*: a local estimate from the old tokenizer's
  decomposition of the token's bytes, ``e_loc = Σ_i (len_i / Σ len) e_{sub_i}``, and a global
  estimate from the top-``k`` shared tokens most similar in an auxiliary space,
  ``e_glob = Σ_j softmax(sim_j / τ) e_j``; ``e_new = (1 − w) e_loc + w e_glob`` (``w = 0.3``). The
  auxiliary space is the donor's embedding space when a donor is given, else the base space
  (unique tokens placed by their local estimate).
* ``"mean_of_subtokens"`` — ``e_new = mean_i e_{sub_i}`` over the old tokenizer's decomposition.
* ``"mean"`` — the mean of all old rows; ``"zero"`` — zeros.

Tied input/output embeddings stay tied; untied output rows are transplanted the same way (with the
same decompositions, neighbours and OMP codes). Both tokenizers must be byte-level BPE (decompositions
work on bytes, so tokens that end inside a UTF-8 character are handled exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenlab._checks import check_choice, check_int, check_positive, check_probability
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


@dataclass
class TransplantProblem:
    """Everything a method needs for the unique tokens of one chunk.

    ``anchor_old``/``anchor_new``: ids of the shared tokens in the old and new vocabularies;
    ``decompositions[i]``: old-token ids of unique token ``i``'s bytes (empty for special tokens);
    ``donor``: the donor's input embeddings (new vocabulary) or ``None``; ``unique``: new ids.
    """

    anchor_old: torch.Tensor
    anchor_new: torch.Tensor
    unique: torch.Tensor
    decompositions: list[list[int]]
    decomposition_lengths: list[list[int]]
    donor: torch.Tensor | None
    omp_atoms: int
    top_k: int
    temperature: float
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


def _tokenadapt(problem: TransplantProblem, old: torch.Tensor) -> torch.Tensor:
    local = _weighted_subtokens(problem, old, by_length=True)
    if problem.donor is not None:
        space = problem.donor.to(old.device, old.dtype)
        query, keys = space[problem.unique], space[problem.anchor_new]
    else:
        query, keys = local, old[problem.anchor_old]
    sim = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
    top = sim.topk(min(problem.top_k, keys.shape[0]), dim=1)
    weights = torch.softmax(top.values / problem.temperature, dim=1)
    global_ = torch.einsum("nk,nkd->nd", weights, old[problem.anchor_old[top.indices]])
    return (1 - problem.global_weight) * local + problem.global_weight * global_


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
    omp_atoms: int = 8,
    top_k: int = 8,
    temperature: float = 0.1,
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
        donor: a model using ``new_tokenizer`` (its input embeddings are the OMP / TokenAdapt space).
        omp_atoms: OMP sparsity ``k``; top_k, temperature, global_weight: TokenAdapt's global estimate.
        chunk_size: unique tokens per batch; progress: show a progress bar over tokens.

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
    check_probability("global_weight", global_weight)
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

    fn = TRANSPLANT_METHODS[method]
    bar = tqdm(total=len(unique), desc=f"transplant ({method})", unit="token", disable=not progress)
    for lo in range(0, len(unique), chunk_size):
        ids = unique[lo : lo + chunk_size]
        decompositions = [
            old_bpe.encode(new_bpe.token_bytes[i]) if new_bpe.token_bytes[i] else [] for i in ids
        ]
        problem = TransplantProblem(
            anchor_old=anchor_old,
            anchor_new=anchor_new,
            unique=torch.tensor(ids, dtype=torch.long),
            decompositions=decompositions,
            decomposition_lengths=[[len(old_bpe.token_bytes[t]) for t in d] for d in decompositions],
            donor=donor_rows,
            omp_atoms=omp_atoms,
            top_k=top_k,
            temperature=temperature,
            global_weight=global_weight,
        )
        for old, new in zip(old_matrices, new_matrices):
            new[problem.unique] = fn(problem, old.double()).to(old.dtype)
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
