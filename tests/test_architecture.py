"""The package's layering rules, checked on its source with `ast` (nothing is imported).

- Lower layers do not reach up: `graph`, `io`, `export` and `bench` import nothing from
  `techniques` or `search`; the custom layers (`compressor.layers`) import nothing
  from the package at all, so a gated model loads with them alone.
- No module imports an underscore (private) name from another compressor module.
- No module is over MAX_LINES lines.
- Only `compressor/graph/keras_api.py` imports Keras' private API (`keras.src`), so a
  Keras upgrade touches one file.

Each rule lists every offender in its failure message. The sets named *_TO_FIX below are
offenders that belong to work in progress elsewhere; they are expected to fail the rule
until that work lands, and a test fails when an entry is no longer needed, so the sets
only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "compressor"
MAX_LINES = 500
KERAS_API = "compressor/graph/keras_api.py"

LOWER_LAYERS = ("compressor.graph", "compressor.io", "compressor.export", "compressor.bench")
UPPER_LAYERS = ("compressor.techniques", "compressor.search")

MODULES_TO_SPLIT: dict[str, str] = {}
"""Modules still over MAX_LINES, and why. Empty it as they are split."""

PRIVATE_IMPORTS_TO_FIX: dict[tuple[str, str], str] = {}
"""(module, imported private name) pairs still crossing modules, and what they wait for."""


SOURCES = {
    path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8") for path in sorted(PACKAGE.rglob("*.py"))
}
"""Path relative to the repository → source text, of every module of the package."""


def _trees() -> dict[str, ast.Module]:
    return {path: ast.parse(source, filename=path) for path, source in SOURCES.items()}


def _dotted(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: str, tree: ast.Module) -> list[tuple[str, str]]:
    """(module, name) of every import in a module, at any depth; name is "" for `import module`."""
    found = []
    package = _dotted(path) if path.endswith("__init__.py") else _dotted(path).rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, "") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found.extend((module, alias.name) for alias in node.names)
    return found


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


def test_lower_layers_do_not_import_techniques_or_search():
    offenders = [
        f"{path} imports {module}{'.' + name if name else ''}"
        for path, tree in _trees().items()
        if _within(_dotted(path), LOWER_LAYERS)
        for module, name in _imports(path, tree)
        if _within(module, UPPER_LAYERS) or _within(f"{module}.{name}", UPPER_LAYERS)
    ]
    assert not offenders, "lower layers reach up:\n" + "\n".join(offenders)


def test_custom_layers_import_nothing_from_the_package():
    offenders = [
        f"{path} imports {module}"
        for path, tree in _trees().items()
        if _within(_dotted(path), ("compressor.layers",))
        for module, _ in _imports(path, tree)
        if _within(module, ("compressor",))
    ]
    assert not offenders, "compressor.layers must stay a leaf:\n" + "\n".join(offenders)


def _private_imports() -> dict[tuple[str, str], str]:
    found = {}
    for path, tree in _trees().items():
        for module, name in _imports(path, tree):
            if not _within(module, ("compressor",)) or module == _dotted(path):
                continue
            private = [part for part in (module.split(".") + [name]) if part.startswith("_") and part != "__future__"]
            if private and not name.startswith("__"):
                found[(path, f"{module}.{name}" if name else module)] = ", ".join(private)
    return found


def test_no_private_name_is_imported_from_another_module():
    offenders = {key: why for key, why in _private_imports().items() if key not in PRIVATE_IMPORTS_TO_FIX}
    shown = [f"{path} imports {name}" for path, name in sorted(offenders)]
    assert not offenders, "private names imported across modules:\n" + "\n".join(shown)


def test_private_imports_to_fix_are_still_needed():
    stale = sorted(set(PRIVATE_IMPORTS_TO_FIX) - set(_private_imports()))
    assert not stale, f"remove these entries from PRIVATE_IMPORTS_TO_FIX, they are fixed: {stale}"


def _line_counts() -> dict[str, int]:
    return {path: len(source.splitlines()) for path, source in SOURCES.items()}


def test_no_module_is_over_the_line_limit():
    counts = _line_counts()
    offenders = {path: lines for path, lines in counts.items() if lines > MAX_LINES and path not in MODULES_TO_SPLIT}
    shown = [f"{path}: {lines} lines" for path, lines in sorted(offenders.items())]
    assert not offenders, f"modules over {MAX_LINES} lines (split them):\n" + "\n".join(shown)


def test_modules_to_split_are_still_over_the_limit():
    counts = _line_counts()
    stale = sorted(path for path in MODULES_TO_SPLIT if counts.get(path, 0) <= MAX_LINES)
    assert not stale, f"remove these entries from MODULES_TO_SPLIT, they are split: {stale}"


def test_only_the_keras_api_module_imports_keras_src():
    offenders = sorted(
        f"{path} imports {module}"
        for path, tree in _trees().items()
        if path != KERAS_API
        for module, name in _imports(path, tree)
        if _within(module, ("keras.src",)) or (module == "keras" and name == "src")
    )
    assert not offenders, f"Keras' private API outside {KERAS_API}:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "source, rule",
    [
        ("from compressor.search import gating\n", test_lower_layers_do_not_import_techniques_or_search),
        ("from keras.src.models import Functional\n", test_only_the_keras_api_module_imports_keras_src),
        ("from compressor.finetune import _secret\n", test_no_private_name_is_imported_from_another_module),
        ("x = 1\n" * (MAX_LINES + 1), test_no_module_is_over_the_line_limit),
    ],
)
def test_each_rule_fires(monkeypatch, source, rule):
    monkeypatch.setitem(SOURCES, "compressor/graph/_probe.py", source)
    with pytest.raises(AssertionError, match="_probe.py"):
        rule()
