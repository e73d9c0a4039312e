"""mergekit configs: the YAML ``mergekit-yaml`` takes, run by tokenlab.

:func:`from_mergekit` turns a mergekit configuration into the tokenlab recipe computing the same
merge, for every method both tools share — the registered methods declared with ``mergekit=``
(:class:`~tokenlab.merging.registry.Mergekit`): ``linear``, ``slerp``, ``task_arithmetic``, ``ties``,
``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``,
``model_stock``. :func:`~tokenlab.merging.load_recipe` calls it for any recipe with a
``merge_method`` key, so ``merge_from_recipe`` and ``python -m tokenlab.merging`` run such configs.

How a config maps:

* ``models`` (each ``model`` a local directory, relative to the config file) and ``base_model``: an
  entry naming the base is the base (as in mergekit); ``linear`` averages every entry (a
  ``base_model`` not listed joins them, as mergekit adds it) and reads its layout from the base, or
  the first model. A ``slices`` list is accepted when it is the whole model: one slice whose
  sources each span ``layer_range: [0, L]`` of their model;
* ``parameters`` at the model (or slice source), slice and top level, in that precedence, each a
  scalar, a gradient (a list interpolated over the layers) or a list of ``{filter, value}``
  conditions: :class:`~tokenlab.merging.settings.TensorSetting` s, evaluated per tensor. Per-model
  parameters (``weight``, ``density``, ``gamma``, ``epsilon``) may sit at any level; shared ones
  (``normalize``, ``rescale``, ``lambda``, ``t``, ``filter_wise``, ``int8_mask``) at the slice or top
  level. ``weight`` is required for weighted methods, as in mergekit;
* values: ``lambda`` → ``scaling``; ``normalize: true/false`` → ``"weight"``/``"none"``;
  ``rescale: true/false`` → ``"l1"``/``"none"``; ``int8_mask`` (a boolean) changes nothing;
  parameters a config leaves out take mergekit's defaults (the method's ``Mergekit.defaults``:
  ``weighted_sign=True`` for the sign-electing methods, ``dot_threshold=0.9995`` for SLERP, …);
* ``dtype`` / ``out_dtype``: the output dtype (``out_dtype`` first). tokenlab computes in float32
  (float64 for float64 inputs) whatever ``dtype`` says, where mergekit computes in ``dtype``;
* ``tokenizer_source: base`` (or ``tokenizer: {source: base}``): the base's tokenizer files are
  copied, as tokenlab always does.

Everything else is an error naming the key: unknown keys and parameters, shared parameters in a
model entry, parameters on the base model's entry (mergekit ignores them), mergekit-only methods,
``modules``, partial ``slices``, ``residual_weight``, LoRA (``model+lora``) and hub references (no
downloads: point ``model`` at a local copy), vocabulary merging (``tokenizer_source: union`` or a
model, ``tokens``), ``chat_template`` and mergekit-multi's ``name``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from tokenlab._checks import check_bool
from tokenlab.merging.checkpoint import OUTPUT_DTYPES, Checkpoint
from tokenlab.merging.registry import MERGE_METHODS, REQUIRED, MergeMethod, Param
from tokenlab.merging.settings import NOT_SET, TensorSetting, layer_count

CONFIG_KEYS = frozenset(
    {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype"}
    | {"tokenizer_source", "tokenizer"}
)
UNSUPPORTED_KEYS = {
    "modules": "multi-module configs (`modules`) are not supported: merge each module's checkpoint",
    "chat_template": "`chat_template` is not supported: set the template on the merged tokenizer",
    "name": "multi-stage configs (mergekit-multi's `name`) are not supported: run each stage as a config",
}
MERGEKIT_ONLY_METHODS = frozenset(
    {
        "nuslerp",
        "multislerp",
        "karcher",
        "passthrough",
        "arcee_fusion",
        "nearswap",
        "sce",
        "ram",
        "ramplus_tl",
    }
)
# tokenlab parameters mergekit fixes (its conventions, set through ``Mergekit.defaults``) or lacks
TOKENLAB_ONLY = frozenset({"majority_sign", "weighted_sign", "eps", "dot_threshold"})
RENAMED = {"lambda": "scaling"}  # mergekit name → tokenlab name
VALUES = {"normalize": {True: "weight", False: "none"}, "rescale": {True: "l1", False: "none"}}


def _tokenlab_name(name: str) -> str:
    return RENAMED.get(name, name)


def _mergekit_name(name: str) -> str:
    return next((k for k, v in RENAMED.items() if v == name), name)


def _keys(mapping: object, allowed: set[str] | frozenset[str], where: str) -> Mapping:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"mergekit config: {where} must be a mapping, got {mapping!r}")
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ValueError(f"mergekit config: {where} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return mapping


def _convert(name: str, value: object) -> object:
    """A mergekit scalar as the tokenlab value (``normalize: true`` → ``"weight"`` …)."""
    table = VALUES.get(name)
    if table is None:
        return value
    if not isinstance(value, bool):
        raise ValueError(f"mergekit config: `{name}` must be true or false, got {value!r}")
    return table[value]


def _setting(name: str, raw: object, where: str) -> object:
    """A mergekit parameter setting (scalar, gradient, ``{filter, value}`` condition(s)) as a value or
    a :class:`TensorSetting`."""
    if isinstance(raw, Mapping):
        raw = [raw]
    if isinstance(raw, list) and raw and all(isinstance(c, Mapping) for c in raw):
        rules = []
        for i, cond in enumerate(raw):
            _keys(cond, {"filter", "value"}, f"{where}[{i}]")
            if "value" not in cond:
                raise ValueError(f"mergekit config: {where}[{i}] has a `filter` but no `value`")
            rules.append((cond.get("filter"), _leaf(name, cond["value"], f"{where}[{i}].value")))
        return TensorSetting(tuple(rules), label=f"`{name}` ({where})")
    value = _leaf(name, raw, where)
    return TensorSetting(((None, value),), label=f"`{name}` ({where})") if isinstance(value, list) else value


def _leaf(name: str, raw: object, where: str) -> object:
    """A scalar or a gradient (list of scalars), converted."""
    scalar = (bool, int, float, str)
    if isinstance(raw, list):
        if not all(isinstance(v, scalar) for v in raw):
            raise ValueError(f"mergekit config: {where} must be a scalar, a list of scalars or conditions")
        return [_convert(name, v) for v in raw]
    if not isinstance(raw, scalar):
        raise ValueError(f"mergekit config: {where} must be a scalar, a list of scalars or conditions")
    return _convert(name, raw)


def _chain(name: str, levels: Sequence[tuple[Mapping | None, str]], default: object) -> object:
    """The value of parameter ``name`` (mergekit's name) from ``levels`` (most specific first), each
    ``(parameters, where)``, falling back to ``default``: mergekit's precedence."""
    current = default
    for params, where in reversed(levels):
        if params is None or name not in params:
            continue
        value = _setting(name, params[name], f"{where}.{name}")
        current = dataclasses.replace(value, fallback=current) if isinstance(value, TensorSetting) else value
    return current


def _path(ref: object, root: Path, where: str) -> Path:
    if not isinstance(ref, str):
        raise ValueError(
            f"mergekit config: {where} must be a path (LoRA and override forms are not supported)"
        )
    path = root / ref
    if not path.is_dir():
        hint = " (LoRA `model+lora` references are not supported)" if "+" in ref else ""
        raise FileNotFoundError(
            f"mergekit config: {where} {ref!r} is not a local directory{hint}; tokenlab merges local "
            "checkpoints and downloads nothing: point it at a local copy (huggingface_hub.snapshot_download)"
        )
    return path.resolve()


def _inputs(
    config: Mapping, root: Path
) -> tuple[list[tuple[Path, Mapping | None, str]], Mapping | None, object]:
    """``([(path, parameters, where)], slice parameters, slice base_model)`` of ``models`` or of a
    whole-model ``slices`` list."""
    if ("models" in config) == ("slices" in config):
        raise ValueError("mergekit config: give exactly one of `models` and `slices`")
    if "models" in config:
        models = config["models"]
        if not isinstance(models, list) or not models:
            raise ValueError("mergekit config: `models` must be a non-empty list")
        entries = []
        for i, m in enumerate(models):
            _keys(m, {"model", "parameters"}, f"models[{i}]")
            entries.append(
                (_path(m.get("model"), root, f"models[{i}].model"), m.get("parameters"), f"models[{i}]")
            )
        return entries, None, None
    slices = config["slices"]
    if not isinstance(slices, list) or len(slices) != 1:
        raise ValueError(
            "mergekit config: `slices` is supported only as one slice spanning every layer of each model "
            "(layer stacking is not supported)"
        )
    out = _keys(slices[0], {"sources", "parameters", "base_model"}, "slices[0]")
    sources = out.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ValueError("mergekit config: `slices[0].sources` must be a non-empty list")
    entries = []
    for i, src in enumerate(sources):
        where = f"slices[0].sources[{i}]"
        _keys(src, {"model", "layer_range", "parameters"}, where)
        path = _path(src.get("model"), root, f"{where}.model")
        layers = layer_count(Checkpoint.open(path, f"{where}.model").tensors)
        if list(src.get("layer_range", [])) != [0, layers]:
            raise ValueError(
                f"mergekit config: {where}.layer_range must span the whole model, [0, {layers}], got "
                f"{src.get('layer_range')!r} (partial slices are not supported)"
            )
        entries.append((path, src.get("parameters"), where))
    return entries, out.get("parameters"), out.get("base_model")


def _output_dtype(config: Mapping) -> str | None:
    for key in ("out_dtype", "dtype"):
        value = config.get(key)
        if value is None:
            continue
        name = value.removeprefix("torch.") if isinstance(value, str) else value
        if name not in OUTPUT_DTYPES:
            raise ValueError(f"mergekit config: `{key}` must be one of {tuple(OUTPUT_DTYPES)}, got {value!r}")
        return name
    return None


def _check_tokenizer(config: Mapping) -> None:
    source = config.get("tokenizer_source")
    if "tokenizer" in config:
        tok = _keys(config["tokenizer"], {"source", "tokens", "pad_to_multiple_of"}, "`tokenizer`")
        if tok.get("tokens") or tok.get("pad_to_multiple_of"):
            raise ValueError("mergekit config: `tokenizer.tokens` / `pad_to_multiple_of` are not supported")
        source = tok.get("source")
    if source not in (None, "base"):
        raise ValueError(
            f"mergekit config: tokenizer source {source!r} is not supported (vocabulary merging); tokenlab "
            "copies the base model's tokenizer (`tokenizer_source: base`)"
        )


def _method(name: object) -> MergeMethod:
    if isinstance(name, str) and name in MERGE_METHODS and MERGE_METHODS[name].mergekit is not None:
        return MERGE_METHODS[name]
    shared = sorted(k for k, m in MERGE_METHODS.items() if m.mergekit is not None)
    if name in MERGEKIT_ONLY_METHODS:
        raise ValueError(
            f"mergekit config: `merge_method` {name!r} is not implemented in tokenlab; shared: {shared}"
        )
    raise ValueError(f"mergekit config: unknown `merge_method` {name!r}; tokenlab runs {shared}")


def from_mergekit(config: Mapping, root: str | Path = ".") -> dict:
    """The tokenlab recipe (as :func:`~tokenlab.merging.load_recipe` returns it) of a mergekit config.

    Args:
        config: the parsed mergekit YAML (a mapping with ``merge_method``).
        root: the directory relative model paths are resolved against (the config file's).

    Returns:
        ``{"method", "base", "models", "weights", "parameters", "dtype", "seed": 0,
        "max_shard_size": "5GB", "out": None}``; weights and parameters may hold
        :class:`~tokenlab.merging.TensorSetting` s.

    Raises ``ValueError`` naming the key for anything tokenlab would not merge as mergekit does (see
    the module docstring), ``FileNotFoundError`` for a model that is not a local directory.
    """
    _keys(config, CONFIG_KEYS | set(UNSUPPORTED_KEYS), "the top level")
    for key, why in UNSUPPORTED_KEYS.items():
        if key in config:
            raise ValueError(f"mergekit config: {why}")
    if "merge_method" not in config:
        raise ValueError("mergekit config: `merge_method` is missing")
    method = _method(config["merge_method"])
    _check_tokenizer(config)
    root = Path(root)
    entries, slice_params, slice_base = _inputs(config, root)
    base_ref = slice_base if slice_base is not None else config.get("base_model")
    base = None if base_ref is None else _path(base_ref, root, "`base_model`")
    if method.uses_base:
        if base is None:
            raise ValueError(f"mergekit config: merge_method {method.name!r} needs a `base_model`")
        for path, params, where in entries:
            if path == base and params:
                raise ValueError(
                    f"mergekit config: {where} is the base model; its `parameters` {sorted(params)} would "
                    "be ignored (mergekit ignores them too): remove them"
                )
        entries = [e for e in entries if e[0] != base]
    elif base is not None and base not in [e[0] for e in entries]:
        entries.append((base, None, "`base_model`"))  # mergekit merges a listed base like any model
    levels = [(slice_params, "slices[0].parameters"), (config.get("parameters"), "parameters")]
    weights, parameters = _parameters(method, entries, levels)
    return {
        "method": method.name,
        "base": base if base is not None else entries[0][0],
        "models": [path for path, _, _ in entries],
        "weights": weights,
        "parameters": parameters,
        "dtype": _output_dtype(config),
        "seed": 0,
        "max_shard_size": "5GB",
        "out": None,
    }


def _parameters(
    method: MergeMethod,
    entries: Sequence[tuple[Path, Mapping | None, str]],
    levels: list[tuple[Mapping | None, str]],
) -> tuple[list | None, dict[str, object]]:
    """``(weights, parameters)`` of ``method`` from the model entries' parameters and the shared
    ``levels`` (slice, top; most specific first), with mergekit's defaults and names checked."""
    declared = {p.name: p for p in method.params if not p.tensor_only and p.name not in TOKENLAB_ONLY}
    per_model = {_mergekit_name(k) for k, p in declared.items() if p.per_model}
    per_model |= {"weight"} if method.weighted else set()
    shared = {_mergekit_name(k) for k, p in declared.items() if not p.per_model}
    no_effect = set(method.mergekit.no_effect)
    for params, where in levels:
        if params is not None:
            _keys(params, per_model | shared | no_effect, where)
            for name in no_effect & set(params):
                check_bool(name, params[name])
    for _, params, where in entries:
        if params is not None:
            misplaced = sorted(
                set(_keys(params, per_model | shared | no_effect, f"{where}.parameters")) - per_model
            )
            if misplaced:
                raise ValueError(
                    f"mergekit config: {misplaced} in {where}.parameters apply to the whole merge: set them "
                    "in the top-level `parameters` (mergekit ignores them in a model entry)"
                )
    defaults = method.mergekit.defaults
    parameters: dict[str, object] = {k: v for k, v in defaults.items() if k in TOKENLAB_ONLY}
    for mk in sorted(shared):
        value = _chain(mk, levels, defaults.get(_tokenlab_name(mk), NOT_SET))
        if value is not NOT_SET:
            parameters[_tokenlab_name(mk)] = value
    weights = None
    for mk in sorted(per_model):
        name = _tokenlab_name(mk)
        values = [
            _settled(mk, _chain(mk, [(params, f"{where}.parameters"), *levels], defaults.get(name, NOT_SET)),
                     declared.get(name), where)
            for _, params, where in entries
        ]  # fmt: skip
        if mk == "weight":
            weights = values
        elif any(v is not None for v in values):
            parameters[name] = [declared[name].default if v is None else v for v in values]
    return weights, parameters


def _settled(name: str, value: object, param: Param | None, where: str) -> object:
    """A per-model value as the recipe holds it: ``None`` where unset (the tokenlab default applies);
    ``weight`` is required, as in mergekit."""
    required = name == "weight" or (param is not None and param.default is REQUIRED)
    if value is NOT_SET:
        if required:
            raise ValueError(
                f"mergekit config: `{name}` is required for {where} (set it there or in `parameters`)"
            )
        return None
    if isinstance(value, TensorSetting) and required:
        return dataclasses.replace(value, required=True, label=f"`{name}` of {where}")
    return value
