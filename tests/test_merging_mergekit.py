"""mergekit configs run by tokenlab: recipes from mergekit's own docs, unchanged, on tiny checkpoints
saved under the model names the recipes use; each result equals the merge computed directly with
the parameters mergekit's docs define (filters, layer gradients, defaults). Unsupported features
raise, naming the key. Per-tensor settings (filters, gradients, precedence) by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from tokenlab.merging import (
    TensorSetting,
    layer_positions,
    load_recipe,
    merge_from_recipe,
    merge_state_dicts,
    merge_tensors,
)
from tokenlab.merging.cli import main as cli_main
from tokenlab.merging.settings import NOT_SET

# mergekit's examples/*.yml and docs/multimerge.md, verbatim
LINEAR_YML = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""
TIES_YML = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""
BIO_MERGE_YML = """
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: BioMistral/BioMistral-7B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: float16
"""
GRADIENT_SLERP_YML = """
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
# or, the equivalent models: syntax:
# models:
#   - model: psmathur/orca_mini_v3_13b
#   - model: garage-bAInd/Platypus2-13B
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""
MULTIMERGE_FIRST = """
name: first-merge
merge_method: linear
models:
  - model: mistralai/Mistral-7B-v0.1
  - model: BioMistral/BioMistral-7B
parameters:
  weight: 0.5
"""
MULTIMERGE_FINAL = """
# Final merge (no name)
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
models:
  - model: second-merge
    parameters:
      density: 0.6
      weight: 0.5
  - model: teknium/OpenHermes-2.5-Mistral-7B
    parameters:
      density: 0.8
      weight: 0.5
"""
# the model names above, as the tiny checkpoints they stand for here
NAMES = {
    "TheBloke/Llama-2-13B-fp16": "base",
    "mistralai/Mistral-7B-v0.1": "base",
    "psmathur/orca_mini_v3_13b": "ft0",
    "mistralai/Mistral-7B-Instruct-v0.2": "ft0",
    "teknium/OpenHermes-2.5-Mistral-7B": "ft0",
    "garage-bAInd/Platypus2-13B": "ft1",
    "BioMistral/BioMistral-7B": "ft1",
    "WizardLM/WizardMath-13B-V1.0": "ft2",
    "WizardLM/WizardLM-13B-V1.2": "ft2",
    "second-merge": "ft2",
}


def _save_models(root: Path, layers: int, hidden: int) -> dict[str, dict[str, torch.Tensor]]:
    """A random tiny Llama base and three fine-tunes (base + shared + own noise) under ``root``, and
    links named as in mergekit's recipes; returns the state dicts by short name."""
    config = LlamaConfig(
        vocab_size=32, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=2 * hidden, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(layers)
    base = LlamaForCausalLM(config)
    shared = {k: 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()}
    states = {"base": {k: v.clone() for k, v in base.state_dict().items()}}
    base.save_pretrained(root / "ckpt" / "base")
    for i in range(3):
        sd = {k: v + shared[k] + 0.02 * torch.randn_like(v) for k, v in states["base"].items()}
        model = LlamaForCausalLM(config)
        model.load_state_dict(sd)
        model.save_pretrained(root / "ckpt" / f"ft{i}")
        states[f"ft{i}"] = sd
    for name, short in NAMES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(root / "ckpt" / short, target_is_directory=True)
    return states


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit-zoo")
    return root, _save_models(root, layers=2, hidden=16)


def _run(root: Path, text: str, tmp_path: Path, name: str = "config.yml") -> dict[str, torch.Tensor]:
    """Run a mergekit config file with tokenlab (the config lives beside the models, as mergekit's
    relative names need); return the merged tensors."""
    config = root / name
    config.write_text(text)
    out = merge_from_recipe(config, tmp_path / "merged", progress=False)
    return load_file(out / "model.safetensors")


def _by_tensor(states, method, base, models, params_of, dtype=torch.float16):
    """The expected merge, tensor by tensor, with explicit parameters ``params_of(name)``."""
    out = {}
    for name, b in states[base].items():
        weights, params = params_of(name)
        out[name] = merge_tensors(method, b, [states[m][name] for m in models], weights, **params).to(dtype)
    return out


def _assert_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)


def test_linear_yml(zoo, tmp_path):
    root, states = zoo
    got = _run(root, LINEAR_YML, tmp_path)
    expected = merge_state_dicts(
        "linear", states["ft0"], [states[m] for m in ("ft0", "ft2", "ft1")], [1.0, 0.3, 0.5]
    )
    _assert_equal(got, {k: v.to(torch.float16) for k, v in expected.items()})
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert LlamaForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.float16


def test_ties_yml_filters_and_gradients(zoo, tmp_path):
    """2 layers: layer 0 and the tensors outside the layers sit at t = 0, layer 1 at t = 1."""
    root, states = zoo

    def params_of(name):
        t = 1.0 if ".layers.1." in name else 0.0
        weights = [1.0, [0, 0.3, 0.7, 1][3 if t else 0], 0.5 if "mlp" in name else 0.0]
        density = [[1.0, 0.7, 0.1][2 if t else 0], 0.5, 0.33]
        return weights, {"density": density, "weighted_sign": True, "normalize": "weight"}

    got = _run(root, TIES_YML, tmp_path)
    _assert_equal(got, _by_tensor(states, "ties", "base", ["ft0", "ft1", "ft2"], params_of))


def test_bio_merge_yml(zoo, tmp_path):
    root, states = zoo
    got = _run(root, BIO_MERGE_YML, tmp_path)
    expected = merge_state_dicts(
        "ties", states["base"], [states["ft0"], states["ft1"]], [0.5, 0.5],
        density=0.5, weighted_sign=True, normalize="none",
    )  # fmt: skip
    _assert_equal(got, {k: v.to(torch.float16) for k, v in expected.items()})


def test_gradient_slerp_yml(tmp_path_factory, tmp_path):
    """The recipe slices layers [0, 40): run on 40-layer checkpoints. ``t`` per tensor: a gradient
    over the layers (position i / 39) chosen by the first filter the name contains, else 0.5."""
    root = tmp_path_factory.mktemp("slerp-zoo")
    states = _save_models(root, layers=40, hidden=8)
    positions = np.linspace(0, 1, 5)

    def params_of(name):
        i = int(name.split(".")[2]) if ".layers." in name else 0
        if "self_attn" in name:
            t = float(np.interp(i / 39, positions, [0, 0.5, 0.3, 0.7, 1]))
        elif "mlp" in name:
            t = float(np.interp(i / 39, positions, [1, 0.5, 0.7, 0.3, 0]))
        else:
            t = 0.5
        return None, {"t": t, "dot_threshold": 0.9995}

    got = _run(root, GRADIENT_SLERP_YML, tmp_path)
    expected = _by_tensor(states, "slerp", "ft0", ["ft1"], params_of)
    assert got.keys() == expected.keys()
    for k in expected:  # np.interp and mergekit's gradient rule round t differently in the last bit
        torch.testing.assert_close(got[k], expected[k], rtol=1e-3, atol=1e-6, msg=k)
    # partial slices (layer stacking) are refused
    with pytest.raises(ValueError, match=r"layer_range must span the whole model, \[0, 40\]"):
        (root / "partial.yml").write_text(GRADIENT_SLERP_YML.replace("[0, 40]", "[0, 24]"))
        load_recipe(root / "partial.yml")


def test_multimerge_stages(zoo, tmp_path):
    """docs/multimerge.md: a staged config names its stages (`name`), which tokenlab refuses; each
    stage's body is a config that runs — the final stage, DARE-TIES, bit for bit (same seed)."""
    root, states = zoo
    with pytest.raises(ValueError, match="mergekit-multi's `name`"):
        load_recipe(yaml.safe_load(MULTIMERGE_FIRST))
    first = _run(root, MULTIMERGE_FIRST.replace("name: first-merge\n", ""), tmp_path / "first")
    expected = merge_state_dicts("linear", states["base"], [states["base"], states["ft1"]], [0.5, 0.5])
    _assert_equal(first, expected)
    got = _run(root, MULTIMERGE_FINAL, tmp_path / "final")
    expected = merge_state_dicts(
        "dare_ties", states["base"], [states["ft2"], states["ft0"]], [0.5, 0.5], seed=0,
        density=[0.6, 0.8], rescale="l1", weighted_sign=True, normalize="none",
    )  # fmt: skip
    _assert_equal(got, expected)


# the methods mergekit's docs give no recipe for: configs with the parameters its method guide lists
# (per-model parameters, shared parameters, and the tokenlab parameters they stand for)
GUIDE = {
    "task_arithmetic": ({"weight": 0.7}, {"lambda": 0.8}, {"normalize": "none", "scaling": 0.8}),
    "dare_linear": ({"weight": 0.7, "density": 0.5}, {"rescale": True}, {"rescale": "l1"}),
    "breadcrumbs": (
        {"weight": 0.7, "density": 0.9, "gamma": 0.01},
        {"lambda": 1.0},
        {"rescale": "none", "normalize": "none"},
    ),
    "breadcrumbs_ties": (
        {"weight": 0.7, "density": 0.8, "gamma": 0.05},
        {"normalize": True},
        {"rescale": "none", "normalize": "weight", "weighted_sign": True},
    ),
    "della": (
        {"weight": 0.7, "density": 0.5, "epsilon": 0.1},
        {"lambda": 1.1},
        {"rescale": "l1", "normalize": "weight", "weighted_sign": True, "scaling": 1.1},
    ),
    "della_linear": (
        {"weight": 0.7, "density": 0.5, "epsilon": 0.2},
        {"rescale": False},
        {"rescale": "none", "normalize": "none"},
    ),
    "model_stock": ({}, {"filter_wise": False}, {"filter_wise": False}),
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(GUIDE))
def test_method_guide_configs(zoo, tmp_path, method):
    root, states = zoo
    per_model, shared, params = GUIDE[method]
    models = [
        {"model": name} | ({"parameters": per_model} if per_model else {})
        for name in ("psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B")
    ]
    config = {"merge_method": method, "base_model": "TheBloke/Llama-2-13B-fp16", "models": models}
    got = _run(root, yaml.safe_dump(config | {"parameters": shared}), tmp_path)
    extra = {k: v for k, v in per_model.items() if k != "weight"}
    weights = [0.7, 0.7] if "weight" in per_model else None
    expected = merge_state_dicts(
        method, states["base"], [states["ft0"], states["ft1"]], weights, seed=0, **params, **extra
    )
    _assert_equal(got, expected)


def _ties(**changes) -> dict:
    config = yaml.safe_load(BIO_MERGE_YML)
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    return config


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (_ties(merge_method="nuslerp"), "'nuslerp' is not implemented in tokenlab"),
        (_ties(merge_method="average"), "unknown `merge_method` 'average'"),
        (_ties(chat_template="chatml"), "`chat_template` is not supported"),
        (_ties(modules={}), r"\(`modules`\) are not supported"),
        (_ties(lora_rank=8), r"unknown key\(s\) \['lora_rank'\]"),
        (_ties(tokenizer_source="union"), "tokenizer source 'union' is not supported"),
        (_ties(tokenizer={"source": "base", "tokens": {"<x>": {"source": "base"}}}), "tokenizer.tokens"),
        (_ties(parameters={"normalize": True, "majority_sign": "x"}), r"key\(s\) \['majority_sign'\]"),
        (_ties(parameters={"lambda": [{"filter": "mlp", "valeu": 1}]}), r"unknown key\(s\) \['valeu'\]"),
        (_ties(dtype="int8"), "`dtype` must be one of"),
        (_ties(base_model=None), "needs a `base_model`"),
        (_ties(base_model="meta-llama/Llama-2-7b"), "'meta-llama/Llama-2-7b' is not a local directory"),
        (_ties(models=[{"model": "BioMistral/BioMistral-7B+a/lora", "parameters": {}}]), "LoRA"),
        (_ties(models=[{"model": "BioMistral/BioMistral-7B", "parameters": {"normalize": True}}]),
         r"\['normalize'\] in models\[0\].parameters apply to the whole merge"),
        (_ties(models=[{"model": "BioMistral/BioMistral-7B", "parameters": {"density": 0.5}}]),
         "`weight` is required for models"),
        (_ties(models=[{"model": "BioMistral/BioMistral-7B", "params": {"weight": 1}}]),
         r"models\[0\] has unknown key\(s\) \['params'\]"),
        (_ties(models=[{"model": "mistralai/Mistral-7B-v0.1", "parameters": {"weight": 1}},
                       {"model": "BioMistral/BioMistral-7B", "parameters": {"weight": 1}}]),
         r"models\[0\] is the base model; its `parameters` \['weight'\] would be ignored"),
        (_ties(models=None, slices=[{"sources": [], "residual_weight": 0.1}]), r"\['residual_weight'\]"),
    ],
)  # fmt: skip
def test_unsupported_features_raise_naming_the_key(zoo, config, match):
    root, _ = zoo
    (root / "bad.yml").write_text(yaml.safe_dump(config))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_recipe(root / "bad.yml")


def test_cli_runs_a_mergekit_config_as_mergekit_yaml_does(zoo, tmp_path):
    """``python -m tokenlab.merging CONFIG OUT`` (mergekit-yaml's form), seeded like --random-seed."""
    root, _ = zoo
    (root / "final.yml").write_text(MULTIMERGE_FINAL)
    cli_main([str(root / "final.yml"), str(tmp_path / "cli"), "--random-seed", "3", "--no-progress"])
    api = merge_from_recipe(root / "final.yml", tmp_path / "api", seed=3, progress=False)
    got, expected = load_file(tmp_path / "cli" / "model.safetensors"), load_file(api / "model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    record = json.loads((tmp_path / "cli" / "tokenlab_merge.json").read_text())
    assert record["method"] == "dare_ties" and record["seed"] == 3


# ------------------------------------------------------------------------ per-tensor settings
def test_tensor_settings_by_hand():
    names = [
        "model.embed_tokens.weight",
        *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)),
        "lm_head.weight",
    ]
    assert layer_positions(names) == {names[0]: 0.0, names[1]: 0.0, names[2]: 1 / 3, names[3]: 2 / 3,
                                      names[4]: 1.0, names[5]: 0.0}  # fmt: skip
    gradient = TensorSetting(((None, [0.0, 0.3, 0.7, 1.0]),))
    assert [gradient.at("x", t) for t in (0.0, 1 / 3, 0.5, 1.0)] == pytest.approx([0.0, 0.3, 0.5, 1.0])
    assert TensorSetting(((None, [True, False]),)).at("x", 0.9) is True  # booleans pick, not blend
    filters = TensorSetting((("mlp", 0.5), ("attn", [1.0, 3.0])), fallback=0.1)
    assert [filters.at(n, 0.5) for n in ("l.mlp.w", "l.self_attn.q", "l.norm")] == [0.5, 2.0, 0.1]
    chained = TensorSetting((("mlp", 1.0),), fallback=TensorSetting((("norm", 2.0),)))
    assert chained.at("a.norm", 0) == 2.0 and chained.at("a.q", 0) is NOT_SET
    with pytest.raises(ValueError, match=r"`weight` of models\[1\] is not set for tensor 'a.q'"):
        TensorSetting((("mlp", 1.0),), label="`weight` of models[1]", required=True).at("a.q", 0)
    # in a merge: an unset per-model value takes the default; an unset required one raises naming the tensor
    base = {"layers.0.mlp.w": torch.zeros(3), "layers.0.attn.w": torch.zeros(3)}
    model = {k: torch.tensor([1.0, -2.0, 3.0]) for k in base}
    out = merge_state_dicts("breadcrumbs", base, [model], density=1.0, gamma=[TensorSetting((("mlp", 0.5),))])
    assert torch.equal(out["layers.0.attn.w"], model["layers.0.attn.w"])
    with pytest.raises(
        ValueError, match=r"`density` is not set for model\(s\) \[0\] at tensor 'layers.0.attn.w'"
    ):
        merge_state_dicts("ties", base, [model], density=[TensorSetting((("mlp", 0.5),))])
