"""The project's shape, read from its source with ``ast``: ``training/`` never imports napari or Qt (at
module or function level), no import cycle among the project's modules, no module over 600 lines and
at most 15 modules directly in ``training/`` (the rest live in its wings: dicom, sampler, phantom, ssl,
evaluate; see docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGES = ("training", "napari_mammodino")
GUI = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy")
MAX_LINES = 600
MAX_TOP_LEVEL = 15  # modules directly in training/, __init__ and __main__ included


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (inside functions too), absolute names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import tissue`
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports(name, path) if m in mods and m != name} for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_training_never_imports_napari_or_qt():
    offenders = sorted(f"{name} imports {m}" for name, path in modules().items() if name.startswith("training")
                       for m in imports(name, path) if m.split(".")[0] in GUI)
    assert not offenders, offenders


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {[sorted(c) for c in found]}"


def test_no_module_is_a_house_of_many_rooms():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines (split them by idea): {long}"


def test_the_core_keeps_its_wings():
    top = sorted(path.name for path in (REPO / "training").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} modules directly in training/ (at most {MAX_TOP_LEVEL}): {top}"
    wings = {"dicom", "sampler", "phantom", "ssl", "evaluate"}
    assert wings <= {path.parent.name for path in (REPO / "training").glob("*/__init__.py")}


def test_the_checks_can_fail(tmp_path):
    """A two- and a three-module cycle are found and a chain is not; an import inside a function and a
    relative one are both seen."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [frozenset({"a", "b"})]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    module = tmp_path / "widget.py"
    module.write_text("from . import tissue\n\ndef f():\n    from napari.utils import progress\n")
    found = imports("training.widget", module)
    assert {"napari.utils", "training.tissue"} <= found
