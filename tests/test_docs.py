"""Every ```python block of README.md and docs/*.md runs as written (pytest-examples), on CPU in
seconds, and prints what its ``#>`` lines say it prints.

A block fenced ```python requires="gpu" runs only where CUDA is available. Blocks that need a
model use ``load_toy_world("tiny")``, here the tests' cached build (``TOKENLAB_CACHE``); each block
runs in a fresh temporary working directory, and what a block registers — merge methods, attention
implementations with transformers — is unregistered after it, so every block registers what it uses
itself. Nothing is linted or reformatted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytest_examples.run_code
import torch
from pytest_examples import CodeExample, EvalExample, find_examples
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from tokenlab.merging import MERGE_METHODS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = list(find_examples(ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))))


def test_the_docs_have_examples():
    assert len(EXAMPLES) >= 15


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.path.name}:{e.start_line}")
def test_example(example: CodeExample, eval_example: EvalExample, tiny_world, tmp_path, monkeypatch):
    if example.prefix_settings().get("requires") == "gpu" and not torch.cuda.is_available():
        pytest.skip('the block is marked requires="gpu"')
    monkeypatch.setenv("TOKENLAB_CACHE", str(tiny_world.path.parent))
    if sys.version_info[:2] == (3, 11):
        # pytest-examples 0.0.18 rebuilds a failing block's traceback with a 3.10-style line table,
        # which crashes pytest's report on 3.11 (INTERNALERROR); keep the block's own traceback.
        monkeypatch.setattr(pytest_examples.run_code, "create_example_traceback", lambda *args: None)
    monkeypatch.chdir(tmp_path)
    registered = dict(MERGE_METHODS)
    interfaces = [(i, dict(i._global_mapping)) for i in (AttentionInterface, AttentionMaskInterface)]
    for interface, mapping in interfaces:  # as in a fresh process: no tokenlab implementation yet
        interface._global_mapping = {k: v for k, v in mapping.items() if not k.startswith("tokenlab")}
    try:
        if "#>" in example.source:
            eval_example.run_print_check(example)
        else:
            eval_example.run(example)
    finally:
        MERGE_METHODS.clear()
        MERGE_METHODS.update(registered)
        for interface, mapping in interfaces:
            interface._global_mapping = mapping
