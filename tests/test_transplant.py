"""Tokenizer transplant: exact shared rows, identity on identical tokenizers, OMP
recovering planted sparse combinations, tied/untied embeddings, save/reload, bad input."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from tokenlab.tokenization.byte_level import ByteLevelBPE
from tokenlab.tokenization.transplant import (
    TRANSPLANT_METHODS,
    hf_text_embedder,
    orthogonal_matching_pursuit,
    transplant_tokenizer,
)
from tokenlab.tour.toy import ToyModelSize, build_toy_model, stdlib_documents, train_toy_tokenizer

SIZE = ToyModelSize(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def toks():
    docs = [t for _, t in stdlib_documents("train", max_bytes=80_000)]
    old = train_toy_tokenizer(docs[: len(docs) // 2], 300)
    new = train_toy_tokenizer(docs[len(docs) // 2 :], 340)
    return old, new


def model_for(tokenizer, seed: int, tied: bool = True):
    torch.manual_seed(seed)
    model = build_toy_model(SIZE, len(tokenizer), 32, tokenizer)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model.eval()


def shared_pairs(old_tok, new_tok):
    old_vocab = old_tok.get_vocab()
    return [(n, old_vocab[t]) for t, n in new_tok.get_vocab().items() if t in old_vocab]


def test_omp_recovers_planted_sparse_codes():
    """3-sparse codes over a random 48-atom dictionary in 96 dimensions (low coherence, where OMP's
    exact-recovery condition holds): supports and coefficients are recovered to 1e-10."""
    gen = torch.Generator().manual_seed(0)
    dictionary = torch.randn(48, 96, generator=gen, dtype=torch.float64)
    support = torch.stack([torch.randperm(48, generator=gen)[:3] for _ in range(16)])
    coef = torch.randn(16, 3, generator=gen, dtype=torch.float64).sign() * (
        1 + torch.rand(16, 3, generator=gen)
    )
    targets = torch.einsum("nk,nkd->nd", coef, dictionary[support])
    idx, got = orthogonal_matching_pursuit(dictionary, targets, atoms=3)
    for n in range(16):
        planted = dict(zip(support[n].tolist(), coef[n].tolist()))
        found = dict(zip(idx[n].tolist(), got[n].tolist()))
        assert planted.keys() == found.keys()
        assert max(abs(planted[k] - found[k]) for k in planted) < 1e-10


@pytest.mark.parametrize("method", sorted(TRANSPLANT_METHODS))
def test_shared_rows_exact_and_tied_stays_tied(toks, method):
    old_tok, new_tok = toks
    base = model_for(old_tok, 0)
    before = base.get_input_embeddings().weight.detach().clone()
    donor = model_for(new_tok, 1)
    model = transplant_tokenizer(
        copy.deepcopy(base), old_tok, new_tok, method=method, donor=donor, progress=False
    )
    emb = model.get_input_embeddings().weight
    assert emb.shape == (len(new_tok), SIZE.hidden_size) and model.config.vocab_size == len(new_tok)
    assert model.get_output_embeddings().weight is emb
    pairs = shared_pairs(old_tok, new_tok)
    assert 250 < len(pairs) < len(new_tok)
    new_ids, old_ids = map(list, zip(*pairs))
    assert torch.equal(emb[new_ids], before[old_ids])
    assert torch.isfinite(emb).all()
    assert model.config.eos_token_id == new_tok.eos_token_id


@pytest.mark.parametrize("method", sorted(TRANSPLANT_METHODS))
def test_identical_tokenizers_give_identical_logits(toks, method):
    old_tok, _ = toks
    base = model_for(old_tok, 0)
    same = copy.deepcopy(old_tok)
    model = transplant_tokenizer(
        copy.deepcopy(base), old_tok, same, method=method, donor=base, progress=False
    )
    ids = torch.randint(0, len(old_tok), (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_untied_output_embeddings_are_transplanted(toks):
    old_tok, new_tok = toks
    base = model_for(old_tok, 0, tied=False)
    out_before = base.lm_head.weight.detach().clone()
    model = transplant_tokenizer(
        copy.deepcopy(base), old_tok, new_tok, method="mean_of_subtokens", progress=False
    )
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert model.lm_head.weight.shape == (len(new_tok), SIZE.hidden_size)
    new_ids, old_ids = map(list, zip(*shared_pairs(old_tok, new_tok)))
    assert torch.equal(model.lm_head.weight[new_ids], out_before[old_ids])
    unique = next(i for i in range(len(new_tok)) if i not in set(new_ids))
    subtokens = ByteLevelBPE(old_tok).encode(ByteLevelBPE(new_tok).token_bytes[unique])
    assert len(subtokens) >= 2
    assert torch.allclose(model.lm_head.weight[unique], out_before[subtokens].mean(0), atol=1e-6)


def test_omp_transplant_reconstructs_linear_donor(toks):
    """Donor anchors equal to the base's anchor rows and unique donor rows planted as 2-sparse
    combinations of anchors: OMP must return exactly the planted base combinations."""
    old_tok, new_tok = toks
    base = model_for(old_tok, 0)
    old_rows = base.get_input_embeddings().weight.detach()
    donor = model_for(new_tok, 1)
    new_ids, old_ids = map(list, zip(*shared_pairs(old_tok, new_tok)))
    unique = [i for i in range(len(new_tok)) if i not in set(new_ids)]
    gen = torch.Generator().manual_seed(0)
    want = {}
    with torch.no_grad():
        d = donor.get_input_embeddings().weight
        d[new_ids] = old_rows[old_ids]
        for u in unique:
            j = torch.randperm(len(new_ids), generator=gen)[:2].tolist()
            c = [1.5, -0.7]
            d[u] = c[0] * old_rows[old_ids[j[0]]] + c[1] * old_rows[old_ids[j[1]]]
            want[u] = d[u].clone()
    model = transplant_tokenizer(
        copy.deepcopy(base), old_tok, new_tok, method="omp", donor=donor, omp_atoms=2
    )
    got = model.get_input_embeddings().weight
    err = max((got[u] - w).norm() / w.norm() for u, w in want.items())
    assert err < 1e-5


def _bpe_tokenizer(letters: str, merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """Byte-level BPE over ``letters`` with explicit ``merges`` (ids: <s>, letters, merged tokens)."""
    vocab = {"<s>": 0, **{c: i + 1 for i, c in enumerate(letters)}}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


# TokenAdapt's rule on one unique token: old vocabulary {a, b, c, x, ab}, new vocabulary adds "abc",
# which the old tokenizer splits into [ab, c]. Auxiliary vectors (unit after normalisation) chosen so
# that cos(φ(abc), ·) is exact: x 0.96, ab 0.8, c 0.6, a 0.28, b 0.
PHI = {
    "abc": [2.0, 0.0, 0.0],
    "x": [0.96, 0.0, 0.28],
    "ab": [0.8, 0.6, 0.0],
    "c": [0.6, 0.0, 0.8],
    "a": [0.28, 0.96, 0.0],
    "b": [0.0, 1.0, 0.0],
}


@pytest.fixture(scope="module")
def abc_pair():
    old = _bpe_tokenizer("abcx", [("a", "b")])
    new = _bpe_tokenizer("abcx", [("a", "b"), ("ab", "c")])
    assert ByteLevelBPE(old).encode(b"abc") == [
        old.convert_tokens_to_ids("ab"),
        old.convert_tokens_to_ids("c"),
    ]
    torch.manual_seed(0)
    base = model_for(old, 0).double()
    return old, new, base


def _tokenadapt_by_hand(rows: torch.Tensor, old_tok) -> torch.Tensor:
    """The rule computed by hand for "abc" (τ = 0.3, k = 3, θ = 0.7, w = 0.3).

    local: scores ((0.8 + 2/3)/2, (0.6 + 1/3)/2) = (0.7333, 0.4667) over [ab, c]; softmax of
    score/τ gives w_ab = 1/(1 + e^{-0.2667/0.3}) = 0.70866, w_c = 0.29134.
    global: top-3 = x 0.96, ab 0.8, c 0.6; c is below θ = 0.7 and dropped; softmax(0.96/τ, 0.8/τ)
    gives w_x = 1/(1 + e^{-0.16/0.3}) = 0.63026, w_ab = 0.36974.
    """
    w_ab = 1 / (1 + math.exp(-(0.8 + 2 / 3 - 0.6 - 1 / 3) / 2 / 0.3))
    w_c = 1 - w_ab
    g_x = 1 / (1 + math.exp(-(0.96 - 0.8) / 0.3))
    assert (round(w_ab, 5), round(g_x, 5)) == (0.70866, 0.63026)
    e = {t: rows[old_tok.convert_tokens_to_ids(t)] for t in ("ab", "c", "x")}
    local = w_ab * e["ab"] + w_c * e["c"]
    global_ = g_x * e["x"] + (1 - g_x) * e["ab"]
    return 0.7 * local + 0.3 * global_


def test_tokenadapt_rule_on_a_constructed_example(abc_pair):
    """Paper's local weights softmax(((cos + len share) / 2) / τ), global top-k over the whole old
    vocabulary above θ with softmax(cos / τ), hybrid (1 − w) local + w global: equal to the hand
    computation to 1e-12 with an external embedder, and the same with a donor whose rows are φ."""
    old_tok, new_tok, base = abc_pair
    rows = base.get_input_embeddings().weight.detach().clone()
    asked = []

    def embedder(texts: list[str]) -> torch.Tensor:
        asked.extend(texts)
        return torch.tensor([PHI[t] for t in texts], dtype=torch.float64)

    kwargs = dict(method="tokenadapt", top_k=3, temperature=0.3, similarity_threshold=0.7, global_weight=0.3)
    model = transplant_tokenizer(copy.deepcopy(base), old_tok, new_tok, text_embedder=embedder, **kwargs)
    abc = new_tok.convert_tokens_to_ids("abc")
    want = _tokenadapt_by_hand(rows, old_tok)
    assert (model.get_input_embeddings().weight[abc] - want).abs().max() < 1e-12
    assert sorted(set(asked)) == sorted(PHI)  # every old token but the special one, and the new token

    donor = model_for(new_tok, 1).double()
    with torch.no_grad():
        for text, phi in PHI.items():
            donor.get_input_embeddings().weight[new_tok.convert_tokens_to_ids(text)] = 0
            donor.get_input_embeddings().weight[new_tok.convert_tokens_to_ids(text), :3] = torch.tensor(
                phi, dtype=torch.float64
            )
    in_donor = transplant_tokenizer(copy.deepcopy(base), old_tok, new_tok, donor=donor, **kwargs)
    assert (in_donor.get_input_embeddings().weight[abc] - want).abs().max() < 1e-12

    # θ above every similarity: no neighbour survives and the row is the local estimate alone
    strict = transplant_tokenizer(
        copy.deepcopy(base),
        old_tok,
        new_tok,
        text_embedder=embedder,
        **{**kwargs, "similarity_threshold": 0.97},
    )
    w_ab = 1 / (1 + math.exp(-(0.8 + 2 / 3 - 0.6 - 1 / 3) / 2 / 0.3))
    local = (
        w_ab * rows[old_tok.convert_tokens_to_ids("ab")]
        + (1 - w_ab) * rows[old_tok.convert_tokens_to_ids("c")]
    )
    assert (strict.get_input_embeddings().weight[abc] - local).abs().max() < 1e-12
    defaults = inspect.signature(transplant_tokenizer).parameters
    assert [
        defaults[k].default for k in ("top_k", "temperature", "similarity_threshold", "global_weight")
    ] == [3, 0.3, 0.6, 0.3]


def test_tokenadapt_base_space_without_donor_or_embedder(abc_pair):
    """No embedder, no donor: φ is the base model's input embedding space, φ(abc) = mean of the rows
    of its old decomposition [ab, c], φ(old token) = its row."""
    old_tok, new_tok, base = abc_pair
    rows = base.get_input_embeddings().weight.detach().clone()
    ids = {t: old_tok.convert_tokens_to_ids(t) for t in ("a", "b", "c", "x", "ab")}
    unit = torch.nn.functional.normalize
    query = unit((rows[ids["ab"]] + rows[ids["c"]]) / 2, dim=0)
    cos = {t: float(unit(rows[i], dim=0) @ query) for t, i in ids.items()}
    score = torch.tensor([(cos["ab"] + 2 / 3) / 2, (cos["c"] + 1 / 3) / 2], dtype=torch.float64) / 0.3
    w = torch.softmax(score, 0)
    local = w[0] * rows[ids["ab"]] + w[1] * rows[ids["c"]]
    top = sorted(cos, key=cos.get, reverse=True)[:3]  # θ = −1 keeps all three
    g = torch.softmax(torch.tensor([cos[t] for t in top], dtype=torch.float64) / 0.3, 0)
    global_ = sum(gi * rows[ids[t]] for gi, t in zip(g, top))
    model = transplant_tokenizer(
        copy.deepcopy(base), old_tok, new_tok, method="tokenadapt", similarity_threshold=-1.0, progress=False
    )
    got = model.get_input_embeddings().weight[new_tok.convert_tokens_to_ids("abc")]
    assert (got - (0.7 * local + 0.3 * global_)).abs().max() < 1e-12


def test_hf_text_embedder_mean_pools_last_hidden_states(abc_pair):
    old_tok, _, base = abc_pair
    embed = hf_text_embedder(base.model, old_tok, batch_size=2)
    texts = ["abcx", "a", "xab"]
    got = embed(texts)
    assert got.shape == (3, SIZE.hidden_size)
    for text, vec in zip(texts, got):
        ids = old_tok(text, return_tensors="pt").input_ids
        want = base.model(input_ids=ids).last_hidden_state[0].mean(0)
        assert (vec - want).abs().max() < 1e-12


def test_save_and_reload_with_new_tokenizer(toks, tmp_path):
    old_tok, new_tok = toks
    model = transplant_tokenizer(
        model_for(old_tok, 0),
        old_tok,
        new_tok,
        method="tokenadapt",
        donor=model_for(new_tok, 1),
        progress=False,
    )
    model.save_pretrained(tmp_path)
    new_tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("def transplant(x):\n    return x", return_tensors="pt").input_ids
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    assert again.get_output_embeddings().weight is again.get_input_embeddings().weight


def _letters_tokenizer(letters: str, special: str) -> PreTrainedTokenizerFast:
    vocab = {special: 0, **{c: i + 1 for i, c in enumerate(letters)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([special])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special)


def test_bad_input(toks):
    old_tok, new_tok = toks
    base = model_for(old_tok, 0)
    with pytest.raises(ValueError, match="method"):
        transplant_tokenizer(base, old_tok, new_tok, method="magic")
    with pytest.raises(ValueError, match="donor"):
        transplant_tokenizer(base, old_tok, new_tok, method="omp")
    with pytest.raises(ValueError, match="donor"):
        transplant_tokenizer(
            base, old_tok, new_tok, method="omp", donor=model_for(_letters_tokenizer("ab", "<s>"), 0)
        )
    abc, xyz = _letters_tokenizer("abc", "<s>"), _letters_tokenizer("xyz", "</s>")
    with pytest.raises(ValueError, match="share no tokens"):
        transplant_tokenizer(model_for(abc, 0), abc, xyz, method="mean")
    wordlevel = Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="BPE"):
        transplant_tokenizer(
            base, old_tok, PreTrainedTokenizerFast(tokenizer_object=wordlevel), method="mean"
        )
    with pytest.raises(TypeError, match="model"):
        transplant_tokenizer(torch.nn.Linear(2, 2), old_tok, new_tok, method="mean")
    with pytest.raises(TypeError, match="`top_k`"):
        transplant_tokenizer(base, old_tok, new_tok, method="tokenadapt", top_k="5")
    with pytest.raises(ValueError, match="`omp_atoms`"):
        transplant_tokenizer(base, old_tok, new_tok, method="mean", omp_atoms=0)
    with pytest.raises(ValueError, match="`temperature`"):
        transplant_tokenizer(base, old_tok, new_tok, method="tokenadapt", temperature=0.0)
    with pytest.raises(ValueError, match="`global_weight`"):
        transplant_tokenizer(base, old_tok, new_tok, method="tokenadapt", global_weight=1.5)


def test_tour_lines_on_tiny_world(tiny_world):
    from tokenlab.tour.transplant import byte_level_and_transplant_lines, load_transplant_donor

    lines = byte_level_and_transplant_lines(tiny_world)
    text = "\n".join(lines)
    assert "exact next-byte law" in text and "naive token completion" in text
    for method in TRANSPLANT_METHODS:
        assert f"transplant: {method}" in text
    assert "tokenadapt (donor space)" in text and "tokenadapt (base space)" in text
    new_tok, donor = load_transplant_donor(tiny_world, progress=False)  # cached: the same donor again
    assert donor.config.vocab_size == len(new_tok) == len(tiny_world.tokenizer) + 64
