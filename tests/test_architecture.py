"""The import rule of docs/architecture.md, enforced on every ``import`` in ``src/tokenlab`` (also the
ones inside functions): layers point one way, families do not import each other.

    tour, testing  →  families  →  kernels  →  backend, _checks, _atomic, _hf  →  torch, transformers, …

* ``tokenlab._checks``, ``tokenlab._atomic`` and ``tokenlab._hf`` import no tokenlab module;
  ``tokenlab.backend`` only ``_checks``;
* ``tokenlab.kernels`` imports only itself and the ground modules — no family;
* a family (attention, tokenization, decoding, alignment, merging) imports itself, ``kernels`` and the
  ground modules, never ``tour`` or ``testing``, and another family only through a shared mechanism
  listed in :data:`SHARED_MECHANISMS`;
* ``testing`` and ``tour`` may import anything but each other's upward direction (no family imports
  them; ``testing`` does not import ``tour``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import tokenlab

ROOT = Path(tokenlab.__file__).parent
FAMILIES = ("attention", "tokenization", "decoding", "alignment", "merging")
GROUND = ("_checks", "backend", "_atomic", "_hf")

# Cross-family imports allowed because the imported module is a mechanism both families share;
# each entry: (importing family, imported module) → why.
SHARED_MECHANISMS: dict[tuple[str, str], str] = {
    ("decoding", "tokenlab.tokenization.byte_level"): (
        "the byte view of a byte-level BPE vocabulary (ByteLevelBPE: the exact bytes of every token, the "
        "tokens starting with given bytes): constraints judge tokens by their bytes, and token healing "
        "backs a prompt up to tokens that some vocabulary token extends"
    ),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every tokenlab import in the file (absolute and relative)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return [(line, m) for line, m in found if m == "tokenlab" or m.startswith("tokenlab.")]


def _layer(module: str) -> str:
    """``tokenlab.attention.hf`` → ``attention``; ``tokenlab`` → ``tokenlab``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tokenlab"


def _allowed(importer: str, imported: str) -> bool:
    src, dst = _layer(importer), _layer(imported)
    if src == dst:
        return True
    if src in ("_checks", "_atomic", "_hf"):
        return False
    if src == "backend":
        return dst == "_checks"
    if src == "kernels":
        return dst in GROUND
    if src in FAMILIES:
        if dst in GROUND or dst == "kernels":
            return True
        if dst in FAMILIES:
            return (src, imported) in SHARED_MECHANISMS
        return False
    if src == "testing":
        return dst != "tour"
    return src in ("tour", "tokenlab") and dst != "tokenlab"


def test_every_import_points_down_or_within_its_family() -> None:
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        importer = _module_name(path)
        for line, imported in _imports(path):
            if not _allowed(importer, imported):
                violations.append(f"{path.relative_to(ROOT.parent)}:{line}: {importer} imports {imported}")
    assert not violations, "imports against the layer rule:\n" + "\n".join(violations)


def test_the_rule_itself_catches_upward_and_cross_family_imports() -> None:
    """The checker would flag the edges the rule forbids (a guard against a test that cannot fail)."""
    assert not _allowed("tokenlab.kernels.warping", "tokenlab.decoding.speculative")
    assert not _allowed("tokenlab.attention.set_based_prompting", "tokenlab.decoding")
    assert not _allowed("tokenlab.merging.methods", "tokenlab.tour.toy")
    assert not _allowed("tokenlab.alignment.common", "tokenlab.testing")
    assert not _allowed("tokenlab._checks", "tokenlab.backend")
    assert not _allowed("tokenlab._atomic", "tokenlab._checks")
    assert _allowed("tokenlab.merging.checkpoint", "tokenlab._atomic")
    assert _allowed("tokenlab.decoding.speculative", "tokenlab.kernels.warping")
    assert _allowed("tokenlab.tour.decoding", "tokenlab.decoding")


def test_shared_mechanisms_are_documented() -> None:
    text = (ROOT.parents[1] / "docs" / "architecture.md").read_text()
    for (_family, module), _why in SHARED_MECHANISMS.items():
        assert module in text, f"shared mechanism {module} is not named in docs/architecture.md"
