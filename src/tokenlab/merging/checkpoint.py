"""Streaming merges of Hugging Face checkpoint directories.

:func:`merge_checkpoints` merges safetensors checkpoints (one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``) one tensor at a time, and each tensor in row blocks: the merge
method (:mod:`tokenlab.merging.methods`) reads rows ``a:b`` of the inputs through
``safetensors.safe_open`` (file opened, rows copied out, file closed — no mapping keeps pages of the
inputs resident) and yields merged blocks whose bytes are appended to the output shard at once.
Output headers are computed up front from the input headers, so memory holds one block of the
``n`` task vectors plus, for the largest tensor, one float32 copy (TIES' trim threshold) or ``n``
boolean masks (DARE) — not the model, and not ``n`` copies of any tensor.

Every check runs before anything is written: tensor names, shapes and dtypes (errors name the
tensor), ``config.json`` architecture fields, parameter values, and that the output directory is
neither an input nor inside one nor contains one; a truncated or corrupt input file is named. The
output goes to a temporary directory beside ``out_dir`` (:func:`tokenlab._atomic.atomic_directory`:
created with the user's umask, removed on any error, ``Ctrl-C`` or ``SIGTERM``, and swept on the next
run if its process died) that is renamed into place at the end; config, generation config and
tokenizer files are copied from the base; a ``tokenlab_merge.json`` records the recipe. A merged
tensor with NaN or infinite entries (an input holds NaN or infinity there) raises naming the tensor,
and nothing is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from tokenlab._atomic import atomic_directory, publish
from tokenlab._checks import check_bool, check_choice, check_int
from tokenlab.merging.methods import MergeInputs, ReadRows
from tokenlab.merging.registry import merge_method
from tokenlab.merging.settings import jsonable, varies

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# config.json fields that do not describe the architecture (ignored when comparing inputs)
CONFIG_IGNORED = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "output_attentions"}
)
# weight files that are never copied from the base directory
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|.*\.safetensors\.index\.json$")

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# output dtypes a merge may be written in (``dtype=``), by their torch names
OUTPUT_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives in a checkpoint and what it is (read from the safetensors header)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _DTYPES[self.dtype].itemsize * math.prod(self.shape)


@dataclass(frozen=True)
class Checkpoint:
    """A Hugging Face model directory with safetensors weights: its config and tensor table."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(cls, path: str | os.PathLike, role: str) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{role} {str(path)!r} is not a directory")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{role} {str(path)!r} has no config.json")
        index = path / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{role}: {str(index)!r} is not a safetensors index ({err!r})") from None
            files = sorted(set(weight_map.values()))
        elif (path / SAFETENSORS_SINGLE).is_file():
            files = [SAFETENSORS_SINGLE]
        else:
            raise FileNotFoundError(
                f"{role} {str(path)!r} has neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX} "
                "(only safetensors checkpoints can be merged)"
            )
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            file = path / name
            if not file.is_file():
                raise FileNotFoundError(
                    f"{role} {str(path)!r}: shard {name!r} listed in the index is missing"
                )
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        s = f.get_slice(key)
                        if s.get_dtype() not in _DTYPES:
                            raise ValueError(f"{role}: tensor {key!r} has unsupported dtype {s.get_dtype()}")
                        tensors[key] = TensorInfo(file, s.get_dtype(), tuple(s.get_shape()))
            except SafetensorError as err:
                raise ValueError(
                    f"{role}: {str(file)!r} is not a complete safetensors file (truncated or corrupt: {err})"
                ) from None
        return cls(path, json.loads(config_file.read_text()), tensors)

    def read(self, name: str) -> torch.Tensor:
        """Copy one tensor out of its file (the file is closed again at once)."""
        with safe_open(str(self.tensors[name].file), framework="pt") as f:
            return f.get_tensor(name)

    def read_rows(self, name: str) -> ReadRows:
        """``read(a, b)``: rows ``a:b`` of tensor ``name`` (0-d tensors as shape ``(1,)``), each call
        opening the file, copying the rows out and closing it again."""
        file, scalar = str(self.tensors[name].file), not self.tensors[name].shape

        def read(a: int, b: int) -> torch.Tensor:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(name).reshape(1) if scalar else f.get_slice(name)[a:b]

        return read


# ------------------------------------------------------------------------------------ validation
def _architecture(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in CONFIG_IGNORED}


def _check_inputs(base: Checkpoint, models: Sequence[Checkpoint]) -> None:
    arch = _architecture(base.config)
    for m in models:
        other = _architecture(m.config)
        diff = sorted(k for k in set(arch) | set(other) if arch.get(k) != other.get(k))
        if diff:
            detail = ", ".join(f"{k}: {arch.get(k)!r} vs {other.get(k)!r}" for k in diff[:4])
            raise ValueError(f"config.json of {str(m.path)!r} differs from the base's architecture: {detail}")
        missing = [k for k in base.tensors if k not in m.tensors]
        extra = [k for k in m.tensors if k not in base.tensors]
        if missing or extra:
            raise ValueError(
                f"{str(m.path)!r} and the base have different tensors: missing {missing[:3]} "
                f"({len(missing)} in all), unexpected {extra[:3]} ({len(extra)} in all)"
            )
        for key, info in base.tensors.items():
            other_info = m.tensors[key]
            if other_info.shape != info.shape:
                raise ValueError(
                    f"shape mismatch for {key!r}: base {info.shape} vs {other_info.shape} in {str(m.path)!r}"
                )
            if other_info.dtype != info.dtype:
                raise ValueError(
                    f"dtype mismatch for {key!r}: base {info.dtype} vs {other_info.dtype} in {str(m.path)!r}"
                )


def _check_out_dir(out_dir: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    out = out_dir.resolve()
    for inp in inputs:
        inp = inp.resolve()
        if out == inp or out.is_relative_to(inp) or inp.is_relative_to(out):
            raise ValueError(
                f"`out_dir` {str(out_dir)!r} must not be an input directory, inside one or contain one "
                f"(input {str(inp)!r})"
            )
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"`out_dir` {str(out_dir)!r} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"`out_dir` {str(out_dir)!r} exists and is not empty (pass overwrite=True)")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"500MB"``, ``"2GB"``, ``"1.5GiB"`` (at least 1)."""
    if isinstance(size, str):
        m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"`max_shard_size` must be bytes or like '2GB', got {size!r}")
        unit = (m.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        size = int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))
    return check_int("max_shard_size", size, low=1)


# ---------------------------------------------------------------------------------------- writing
def plan_shards(tensors: Mapping[str, TensorInfo], max_shard_size: int) -> list[list[str]]:
    """Split tensors (in order) into shards of at most ``max_shard_size`` bytes (a larger tensor gets
    a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, info in tensors.items():
        if shards[-1] and size + info.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += info.nbytes
    return shards


def _write_shard(path: Path, names: Sequence[str], tensors: Mapping[str, TensorInfo], produce, bar) -> None:
    """Write a safetensors file whose header is known in advance, streaming each tensor's bytes as
    ``produce(name)`` yields its row blocks (format: u64 header length, JSON header padded to 8
    bytes, data)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        info = tensors[name]
        header[name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "xb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            info, written = tensors[name], 0
            for block in produce(name):
                if _DTYPE_NAMES[block.dtype] != info.dtype:
                    raise RuntimeError(f"merged {name!r} has dtype {block.dtype}, expected {info.dtype}")
                data = block.contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data.data)
                written += data.nbytes
            if written != info.nbytes:
                raise RuntimeError(f"merged {name!r} has {written} bytes, expected {info.nbytes}")
            bar.update(1)


def merge_checkpoints(
    method: str,
    base_dir: str | os.PathLike,
    finetuned_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    weights: Sequence[float] | None = None,
    *,
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **params,
) -> Path:
    """Merge Hugging Face checkpoint directories tensor by tensor into ``out_dir``.

    Args:
        method: a merge method of :data:`~tokenlab.merging.MERGE_METHODS`.
        base_dir: the base model's directory (``config.json`` + safetensors, single or sharded).
        finetuned_dirs: the fine-tuned models' directories (same architecture and tensors).
        out_dir: where the merged model is written; must not exist, be empty, or ``overwrite=True``.
        weights: per-model weights (default 1 each); each may be a
            :class:`~tokenlab.merging.TensorSetting` (a value per tensor).
        seed: seeds the random masks (DARE, DELLA), per tensor (see
            :func:`~tokenlab.merging.tensor_generator`).
        max_shard_size: shard size (bytes or ``"2GB"``); one ``model.safetensors`` when it all fits.
        dtype: the floating tensors' output dtype (``"float16"``, ``"bfloat16"``, ``"float32"``,
            ``"float64"``; default: each input tensor's own); ``config.json`` records it.
        overwrite: replace a non-empty ``out_dir`` (never an input).
        progress: tqdm bar over tensors.
        **params: the method's declared parameters (``density``, ``majority_sign``, ``t`` …; not the
            tensor-only ``generator``/``masks``); any value (or per-model entry) may be a
            :class:`~tokenlab.merging.TensorSetting`.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`; ``from_pretrained(out_dir)`` loads the merge.

    The result equals :func:`~tokenlab.merging.merge_state_dicts` on the loaded state dicts (cast to
    ``dtype``).
    """
    entry = merge_method(method)
    if isinstance(finetuned_dirs, (str, os.PathLike)) or not finetuned_dirs:
        raise TypeError("`finetuned_dirs` must be a non-empty list of directories")
    n = len(finetuned_dirs)
    seed = check_int("seed", seed)
    shard_bytes = parse_size(max_shard_size)
    out_code = None if dtype is None else OUTPUT_DTYPES[check_choice("dtype", dtype, tuple(OUTPUT_DTYPES))]
    overwrite, progress = check_bool("overwrite", overwrite), check_bool("progress", progress)
    out_dir = Path(out_dir)
    base = Checkpoint.open(base_dir, "`base_dir`")
    models = [Checkpoint.open(d, f"`finetuned_dirs[{i}]`") for i, d in enumerate(finetuned_dirs)]
    floating = [k for k, info in base.tensors.items() if _DTYPES[info.dtype].is_floating_point]
    plan = entry.plan(params, weights, n, floating, "checkpoint")
    _check_out_dir(out_dir, [base.path, *(m.path for m in models)], overwrite)
    _check_inputs(base, models)
    converted = set(floating) if out_code is not None else set()
    outputs = {
        k: TensorInfo(info.file, out_code, info.shape) if k in converted else info
        for k, info in base.tensors.items()
    }

    def produce(name: str) -> Iterator[torch.Tensor]:
        info = base.tensors[name]
        in_dtype, out_dtype = _DTYPES[info.dtype], _DTYPES[outputs[name].dtype]
        if not in_dtype.is_floating_point:
            yield base.read(name)
            return
        inputs = MergeInputs(
            name, info.shape, in_dtype, base.read_rows(name), tuple(m.read_rows(name) for m in models)
        )
        w, full = plan(name)
        for block in entry.fn(inputs, w, **(full | entry.seeded(seed, name))):
            if not bool(torch.isfinite(block).all()):
                raise ValueError(f"merged tensor {name!r} has NaN or infinite entries (from an input's)")
            yield block.to(out_dtype)

    with atomic_directory(out_dir, "merging") as tmp:
        shards = plan_shards(outputs, shard_bytes)
        names = (
            [SAFETENSORS_SINGLE]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        with tqdm(total=len(base.tensors), desc=f"merging ({method})", disable=not progress) as bar:
            for file, shard in zip(names, shards):
                _write_shard(tmp / file, shard, outputs, produce, bar)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(i.nbytes for i in outputs.values())},
                "weight_map": {k: f for f, shard in zip(names, shards) for k in shard},
            }
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        for f in base.path.iterdir():
            if f.is_file() and not _WEIGHT_FILE.fullmatch(f.name):
                shutil.copy2(f, tmp / f.name)
        if dtype is not None:  # the config states the weights' dtype (transformers reads "dtype")
            config = {**base.config, "dtype": dtype}
            if "torch_dtype" in config:
                config["torch_dtype"] = dtype
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        varying = varies(weights) or any(varies(v) for v in params.values())
        w, full = plan(floating[0]) if floating else (None, {})
        recipe = {
            "method": method,
            "base": str(base.path.resolve()),
            "models": [str(m.path.resolve()) for m in models],
            "weights": jsonable(weights) if varying else (w.tolist() if entry.weighted else None),
            "parameters": jsonable(params) if varying else entry.recorded(full),
            "seed": seed,
            "dtype": dtype,
        }
        (tmp / "tokenlab_merge.json").write_text(json.dumps(recipe, indent=2))
        publish(tmp, out_dir, replace=True)
    return out_dir
