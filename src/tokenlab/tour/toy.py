"""The toy world: real text, a BPE tokenizer and two tiny trained causal LMs, built offline.

No weights or datasets can be downloaded where tokenlab is tested, yet many techniques need a model
that has learned something (speculative acceptance, contrastive decoding, transplant quality). The
toy world is built from text every machine has — the running Python's standard-library sources:

* :func:`stdlib_documents` — the ``.py`` files of the standard library (tests and site-packages
  excluded), in a deterministic order (sorted by a hash of the relative path), split into train and
  held-out by that order;
* :func:`train_toy_tokenizer` — a byte-level BPE tokenizer trained with HF ``tokenizers``;
* :func:`build_toy_model` / :func:`train_causal_lm` — Llama-architecture causal LMs trained with a
  short seeded loop; a larger *target* and a smaller *draft*;
* :func:`load_toy_world` — all of it, saved with ``save_pretrained`` (safetensors) in a cache
  directory (``$TOKENLAB_CACHE`` or ``~/.cache/tokenlab``) and reloaded with ``from_pretrained``.
  A build says on stdout what it builds, roughly how long it takes and where it is cached, and shows
  one progress bar per stage (corpus and tokenizer, target, draft) when stderr is a terminal.

Example::

    from tokenlab.tour.toy import load_toy_world
    world = load_toy_world("default")        # trains once (≈ 2–3 min on 2 CPU cores), then cached
    ids = world.tokenizer("def main():", return_tensors="pt").input_ids
    out = world.target.generate(ids, max_new_tokens=20, do_sample=False)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from tokenlab._atomic import atomic_directory, publish

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# ----------------------------------------------------------------------------------------- corpus
def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(split: str = "train", *, max_bytes: int | None = None) -> list[tuple[str, str]]:
    """The standard library's ``.py`` sources as ``(relative_path, text)`` documents.

    Files are ordered by the SHA-1 of their relative path (deterministic, and mixes packages);
    every tenth file in that order is held out. Undecodable bytes are replaced (U+FFFD).

    Args:
        split: ``"train"``, ``"heldout"`` or ``"all"``.
        max_bytes: stop once this many UTF-8 bytes of text have been collected (``None``: all).
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"`split` must be 'train', 'heldout' or 'all', got {split!r}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"`max_bytes` must be positive, got {max_bytes}")
    root = stdlib_root()
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _EXCLUDED_DIRS]  # prune site-packages early
        rel = Path(folder).relative_to(root)
        paths.extend((rel / f).as_posix() for f in files if f.endswith(".py"))
    paths.sort(key=lambda rel: hashlib.sha1(rel.encode()).hexdigest())
    docs: list[tuple[str, str]] = []
    total = 0
    for index, rel in enumerate(paths):
        held_out = index % 10 == 0
        if (split == "train" and held_out) or (split == "heldout" and not held_out):
            continue
        text = (root / rel).read_bytes().decode("utf-8", errors="replace")
        docs.append((rel, text))
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            break
    if not docs:
        raise RuntimeError(f"no standard-library sources found under {root}")
    return docs


# -------------------------------------------------------------------------------------- tokenizer
def train_toy_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (HF ``tokenizers``) on ``texts``.

    The vocabulary holds the 256 byte symbols, ``<|endoftext|>`` (BOS/EOS) and ``<|pad|>`` and
    merges up to ``vocab_size`` entries. Round-trips arbitrary text exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"`vocab_size` must be ≥ 258 (256 bytes + 2 special tokens), got {vocab_size}")
    if not texts:
        raise ValueError("`texts` is empty: cannot train a tokenizer on no text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """Concatenate the token ids of ``texts``, each document followed by EOS, as a 1-D int64 tensor."""
    ids: list[int] = []
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ToyModelSize:
    """Shape of a tiny Llama-architecture model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class ToyWorldConfig:
    """Everything that determines a toy world (its hash names the cache entry)."""

    corpus_bytes: int
    vocab_size: int
    context_length: int
    target: ToyModelSize
    draft: ToyModelSize
    train_steps: int
    batch_size: int
    learning_rate: float = 3e-3
    eval_tokens: int = 32_768
    seed: int = 0

    def key(self) -> str:
        """Cache key: the config plus the Python version (the stdlib corpus depends on it)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + sys.version.split()[0]
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


PRESETS: dict[str, ToyWorldConfig] = {
    # The tour's world: trains in about 2–3 minutes on 2 CPU cores.
    "default": ToyWorldConfig(
        corpus_bytes=3_000_000,
        vocab_size=2048,
        context_length=128,
        target=ToyModelSize(128, 4, 4, 2, 384),
        draft=ToyModelSize(64, 2, 2, 1, 192),
        train_steps=600,
        batch_size=16,
        learning_rate=2e-3,
    ),
    # Tests: seconds, still clearly below the unigram baseline.
    "tiny": ToyWorldConfig(
        corpus_bytes=300_000,
        vocab_size=384,
        context_length=64,
        target=ToyModelSize(64, 2, 4, 2, 128),
        draft=ToyModelSize(32, 1, 2, 1, 64),
        train_steps=300,
        batch_size=16,
        eval_tokens=8192,
    ),
    # A GPU run of the same code at a size where speedups are meaningful.
    "gpu": ToyWorldConfig(
        corpus_bytes=13_000_000,
        vocab_size=8192,
        context_length=512,
        target=ToyModelSize(768, 12, 12, 4, 2048),
        draft=ToyModelSize(256, 2, 4, 2, 768),
        train_steps=3000,
        batch_size=32,
        learning_rate=1e-3,
        eval_tokens=262_144,
    ),
}


def build_toy_model(
    size: ToyModelSize, vocab_size: int, context_length: int, tokenizer=None
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` of the given size (tied embeddings)."""
    special = {}
    if tokenizer is not None:
        special = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=max(4 * context_length, 1024),
        tie_word_embeddings=True,
        **special,
    )
    return LlamaForCausalLM(config)


def train_causal_lm(
    model: PreTrainedModel,
    token_ids: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    context_length: int,
    learning_rate: float = 3e-3,
    seed: int = 0,
    desc: str = "training",
    progress: bool = True,
) -> list[float]:
    """Train ``model`` on random windows of ``token_ids`` with AdamW (warm-up, cosine decay).

    Deterministic for a fixed ``seed`` on a given device. Returns the per-step training losses.
    """
    if token_ids.dim() != 1 or token_ids.numel() <= context_length + 1:
        raise ValueError(f"`token_ids` must be 1-D and longer than context_length + 1 = {context_length + 1}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))),
    )
    offsets = torch.arange(context_length)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=_bars_off(progress))
    for _ in bar:
        starts = torch.randint(0, token_ids.numel() - context_length, (batch_size, 1), generator=gen)
        batch = token_ids[starts + offsets].to(device)
        loss = model(input_ids=batch, labels=batch).loss  # HF shifts the labels by one internally
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def heldout_loss(
    model: PreTrainedModel, token_ids: torch.Tensor, context_length: int, max_tokens: int
) -> float:
    """Mean next-token cross-entropy (nats) over non-overlapping windows of ``token_ids``."""
    device = next(model.parameters()).device
    n_windows = max(1, min(token_ids.numel(), max_tokens) // context_length)
    windows = token_ids[: n_windows * context_length].view(n_windows, context_length)
    total, count = 0.0, 0
    for chunk in windows.split(32):
        logits = model(input_ids=chunk.to(device)).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1).to(device), reduction="sum"
        )
        total += nll.item()
        count += chunk[:, 1:].numel()
    return total / count


def unigram_loss(
    train_ids: torch.Tensor, token_ids: torch.Tensor, vocab_size: int, context_length: int, max_tokens: int
) -> float:
    """Cross-entropy (nats) of the add-one unigram model of ``train_ids`` on the tokens that
    :func:`heldout_loss` scores — the baseline a trained model must beat."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    n_windows = max(1, min(token_ids.numel(), max_tokens) // context_length)
    targets = token_ids[: n_windows * context_length].view(n_windows, context_length)[:, 1:]
    return -logp[targets].mean().item()


# ------------------------------------------------------------------------------------------ world
@dataclass
class ToyWorld:
    """A loaded toy world. ``metrics`` holds corpus sizes, bytes/token, parameter counts, losses."""

    config: ToyWorldConfig
    path: Path
    tokenizer: PreTrainedTokenizerFast
    target: LlamaForCausalLM
    draft: LlamaForCausalLM
    train_ids: torch.Tensor
    heldout_ids: torch.Tensor
    metrics: dict = field(default_factory=dict)


def cache_dir() -> Path:
    """Where toy worlds are cached: ``$TOKENLAB_CACHE`` or ``~/.cache/tokenlab``."""
    return Path(os.environ.get("TOKENLAB_CACHE") or Path.home() / ".cache" / "tokenlab")


# Build times of the presets, measured on 2 idle CPU cores (a busy machine takes longer).
BUILD_TIMES = {"default": "about 3 min on 2 CPU cores", "tiny": "about 10 s on 2 CPU cores"}


def _bars_off(progress: bool) -> bool | None:
    """tqdm's ``disable``: off when not asked for, and (``None``) whenever stderr is not a terminal."""
    return None if progress else True


@contextmanager
def _transformers_bars_off() -> Iterator[None]:
    """Silence transformers' own "Loading weights" / "Writing model shards" bars (the toy models are
    saved and loaded in moments; the build's stage bars are its progress report)."""
    enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def build_once(
    path: Path,
    build: Callable[[Path], None],
    *,
    complete: str,
    name: str,
    took: str = "",
    progress: bool = True,
) -> Path:
    """The cache entry ``path``, built on first use — the toy world's cache mechanism, also for artefacts
    built from a toy world (the tour's transplant donor).

    ``build(directory)`` fills a temporary directory beside ``path`` that is then renamed to ``path``
    (:func:`tokenlab._atomic.atomic_directory`: removed on an error, ``Ctrl-C`` or ``SIGTERM``, swept
    by a later build if its process died; created with the user's umask), so an interrupted or
    concurrent build never leaves a half-written entry. The entry is complete when it holds the file
    ``complete`` (written last by ``build``). With ``progress``, stdout says what is built (``name``),
    roughly how long it takes (``took``), where it is cached and how long it took.
    """
    if (path / complete).exists():
        return path
    if progress:
        print(f"tokenlab: building {name} once{f' ({took})' if took else ''}; cached in {path}", flush=True)
    start = time.perf_counter()
    with atomic_directory(path, "building") as tmp:
        build(tmp)
        # not published: another process finished the same build first (or left a broken entry)
        if not publish(tmp, path, replace=False) and not (path / complete).exists():
            raise FileExistsError(
                f"{path} exists but holds no complete build ({complete} missing): remove it"
            )
    if progress:
        print(f"tokenlab: {name} built in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def _build(config: ToyWorldConfig, out: Path, device: torch.device, progress: bool) -> None:
    start = time.perf_counter()
    with tqdm(total=4, desc="toy world: corpus and tokenizer", disable=_bars_off(progress)) as bar:
        train_docs = [t for _, t in stdlib_documents("train", max_bytes=config.corpus_bytes)]
        heldout_docs = [
            t for _, t in stdlib_documents("heldout", max_bytes=max(config.corpus_bytes // 10, 50_000))
        ]
        bar.update()
        tokenizer = train_toy_tokenizer(train_docs, config.vocab_size)
        bar.update()
        train_ids = encode_documents(tokenizer, train_docs)
        heldout_ids = encode_documents(tokenizer, heldout_docs)
        bar.update()
        tokenizer.save_pretrained(out / "tokenizer")
        bar.update()
    save_file({"train": train_ids, "heldout": heldout_ids}, str(out / "corpus_ids.safetensors"))

    metrics: dict = {
        "train_bytes": sum(len(t.encode()) for t in train_docs),
        "heldout_bytes": sum(len(t.encode()) for t in heldout_docs),
        "train_tokens": train_ids.numel(),
        "heldout_tokens": heldout_ids.numel(),
        "vocab_size": len(tokenizer),
        "unigram_heldout_loss": unigram_loss(
            train_ids, heldout_ids, len(tokenizer), config.context_length, config.eval_tokens
        ),
        "device": str(device),
    }
    metrics["bytes_per_token"] = metrics["train_bytes"] / metrics["train_tokens"]
    for role, size in (("target", config.target), ("draft", config.draft)):
        torch.manual_seed(config.seed)
        model = build_toy_model(size, len(tokenizer), config.context_length, tokenizer).to(device)
        losses = train_causal_lm(
            model,
            train_ids,
            steps=config.train_steps,
            batch_size=config.batch_size,
            context_length=config.context_length,
            learning_rate=config.learning_rate,
            seed=config.seed,
            desc=f"toy world: training {role}",
            progress=progress,
        )
        metrics[f"{role}_parameters"] = sum(p.numel() for p in model.parameters())
        metrics[f"{role}_final_train_loss"] = losses[-1]
        metrics[f"{role}_heldout_loss"] = heldout_loss(
            model, heldout_ids, config.context_length, config.eval_tokens
        )
        model.save_pretrained(out / role)
    metrics["build_seconds"] = time.perf_counter() - start
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def load_toy_world(
    preset: str | ToyWorldConfig = "default",
    *,
    cache: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ToyWorld:
    """Load the toy world for ``preset`` from the cache, building (training) it on first use.

    Args:
        preset: a name in :data:`PRESETS` (``"default"``, ``"tiny"``, ``"gpu"``) or a config.
        cache: cache directory (default :func:`cache_dir`).
        device: where models are trained and loaded (default: CUDA if available, else CPU).
        progress: on a build, print what is built, roughly how long it takes and where it is
            cached (stdout), and show one tqdm bar per stage when stderr is a terminal.

    The build is written to a temporary directory and renamed into place, so an interrupted or
    concurrent build never leaves a half-written entry (:func:`tokenlab._atomic.atomic_directory`:
    removed on an error, ``Ctrl-C`` or ``SIGTERM``, swept by a later build if its process died; the
    entry is created with the user's umask). transformers' own loading/saving bars are silenced.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"`preset` must be one of {sorted(PRESETS)} or a ToyWorldConfig, got {preset!r}")
        config = PRESETS[preset]
    elif isinstance(preset, ToyWorldConfig):
        config = preset
    else:
        raise TypeError(f"`preset` must be a str or ToyWorldConfig, got {type(preset).__name__}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    root = Path(cache) if cache is not None else cache_dir()
    path = root / f"toy-{config.key()}"
    name = f"toy world {preset!r}" if isinstance(preset, str) else "a custom toy world"
    with _transformers_bars_off():
        build_once(
            path,
            lambda tmp: _build(config, tmp, device, progress),
            complete="metrics.json",
            name=f"{name} on {device.type}",
            took=BUILD_TIMES.get(preset, "") if isinstance(preset, str) else "",
            progress=progress,
        )
        ids = load_file(str(path / "corpus_ids.safetensors"))
        return ToyWorld(
            config=config,
            path=path,
            tokenizer=PreTrainedTokenizerFast.from_pretrained(path / "tokenizer"),
            target=LlamaForCausalLM.from_pretrained(path / "target").to(device).eval(),
            draft=LlamaForCausalLM.from_pretrained(path / "draft").to(device).eval(),
            train_ids=ids["train"],
            heldout_ids=ids["heldout"],
            metrics=json.loads((path / "metrics.json").read_text()),
        )
