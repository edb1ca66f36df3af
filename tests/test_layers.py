"""The import-layer contract of the package, checked over the source (AST), imports at any depth.

Every `import` and `from ... import` in src/lorafuse counts, also those inside functions, methods,
`if TYPE_CHECKING:` blocks and try/except: an edge goes from the importing module to the module it
names (`from lorafuse.x import y` names lorafuse.x.y when that is a module, else lorafuse.x; relative
imports are resolved against the importing module's package). A parent package is not an edge of
importing its submodule (as import-linter / grimp count it).

Checked: (a) no import cycle among lorafuse's modules, counting every import that runs (an import
under `if TYPE_CHECKING:` never runs and only names a type for annotations: it counts for (b) and (c),
not for cycles); (b) the layer order below, a module importing only from its own layer or lower ones;
(c) only lorafuse.backends.* (and lorafuse._core itself) import the compiled core (lorafuse._core,
lorafuse._core_*).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "lorafuse"

# Highest first. A module is in the layer of the longest prefix listed for it; a module importing
# from a higher layer breaks the contract. Modules of one layer may import each other (no cycles).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("api", ("lorafuse", "lorafuse.__main__", "lorafuse.cli", "lorafuse._run")),
    # recipes run the CLI's verbs through a dispatch function the CLI (or lorafuse.run) hands them
    ("front", ("lorafuse.recipes",)),
    ("ops", ("lorafuse.ops", "lorafuse.plot")),
    ("formats", ("lorafuse.formats",)),
    ("model/io", ("lorafuse.model", "lorafuse.adapter", "lorafuse.io")),
    # _version reads the compiled core's version (the build's pyproject version) through backends.native
    ("backends", ("lorafuse.backends", "lorafuse._version")),
    # _variants chooses the core's variant without loading it (the `import lorafuse` check); _core loads it
    ("leaf", ("lorafuse.errors", "lorafuse._core", "lorafuse._variants", "lorafuse._validate", "lorafuse._terminal",
              "lorafuse._progress", "lorafuse._lazy", "lorafuse._threads")),
]
CORE_IMPORTERS = ("lorafuse.backends", "lorafuse._core", "lorafuse._variants")  # who may import the compiled core


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _resolve_from(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines of the statements under `if TYPE_CHECKING:` (or `if typing.TYPE_CHECKING:`)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def imports_with_kind(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, runs) for every import in the file, at any depth; `runs` is False for
    an import under `if TYPE_CHECKING:`. One entry per module and line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    typing_only = _type_checking_lines(tree)
    is_package = path.name == "__init__.py"
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, name, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                out.append((sub if sub in known or _is_core(sub) else base, node.lineno))
    ours = [(m, line) for m, line in dict.fromkeys(out) if m == PACKAGE or m.startswith(PACKAGE + ".")]
    return [(m, line, line not in typing_only) for m, line in ours]


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth."""
    return [(m, line) for m, line, _ in imports_with_kind(name, path, known)]


def _is_core(module: str) -> bool:
    return module == "lorafuse._core" or module.startswith("lorafuse._core_")


def graph(runtime_only: bool = False) -> dict[str, list[tuple[str, int]]]:
    """Module -> (imported module, line) of every import (only those that run, with runtime_only)."""
    mods = modules()
    known = set(mods)
    return {name: [(m, line) for m, line, runs in imports_with_kind(name, path, known) if runs or not runtime_only]
            for name, path in mods.items()}


def layer_of(module: str) -> int:
    best, where = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or (module.startswith(p + ".") and p != PACKAGE)) and len(p) > best:
                best, where = len(p), i
    if _is_core(module):
        return len(LAYERS) - 1
    return where


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import), by Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    missing = [m for m in modules() if layer_of(m) < 0]
    assert not missing, f"modules in no layer of LAYERS (add them to the table): {missing}"


def test_no_import_cycles():
    g = graph(runtime_only=True)
    edges = {m: {t for t, _ in deps if t in g and t != m} for m, deps in g.items()}
    cycles = find_cycles(edges)
    lines = []
    for comp in cycles:
        inside = set(comp)
        lines.append(f"cycle of {len(comp)} modules: {', '.join(comp)}")
        lines += [f"    {m} -> {t} (line {line})" for m in comp for t, line in g[m] if t in inside and t != m]
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_layer_order():
    g = graph()
    bad = []
    for m, deps in g.items():
        lm = layer_of(m)
        for t, line in deps:
            lt = layer_of(t)
            if lt >= 0 and lt < lm:
                bad.append(f"{m} ({LAYERS[lm][0]}) imports {t} ({LAYERS[lt][0]}) at line {line}")
    assert not bad, "imports against the layer order " + " > ".join(n for n, _ in LAYERS) + ":\n" + "\n".join(bad)


def test_only_backends_import_the_core():
    g = graph()
    bad = [f"{m} imports {t} at line {line}" for m, deps in g.items() for t, line in deps
           if _is_core(t) and not any(m == p or m.startswith(p + ".") for p in CORE_IMPORTERS)]
    assert not bad, "only lorafuse.backends.* may import the compiled core:\n" + "\n".join(bad)


@pytest.mark.parametrize("text, importer, want", [
    ("from lorafuse import _core", "lorafuse.io.tensor", "lorafuse._core"),
    ("from lorafuse import _core_avx2", "lorafuse.io.tensor", "lorafuse._core_avx2"),
    ("from lorafuse.backends import native", "lorafuse.io.tensor", "lorafuse.backends.native"),
    ("from . import util", "lorafuse.formats.kohya", "lorafuse.formats.util"),
    ("from .lycoris import LOHA_PARTS", "lorafuse.formats.kohya", "lorafuse.formats.lycoris"),
    ("from ..ops import combine", "lorafuse.formats.kohya", "lorafuse.ops.combine"),
    ("import lorafuse.ops.combine as c", "lorafuse.adapter", "lorafuse.ops.combine"),
    ("from lorafuse.formats import load", "lorafuse.adapter", "lorafuse.formats"),
    ("def f():\n    if True:\n        from lorafuse.formats import load", "lorafuse.adapter", "lorafuse.formats"),
    ("class C:\n    def m(self):\n        import lorafuse.cli", "lorafuse.adapter", "lorafuse.cli"),
    ("import numpy\nfrom typing import TYPE_CHECKING", "lorafuse.adapter", None),
    ("if TYPE_CHECKING:\n    from lorafuse.model.adapter import Adapter", "lorafuse.adapter", "lorafuse.model.adapter"),
])
def test_edges_are_resolved(tmp_path, text, importer, want):
    """The checker itself: imports at any depth, relative and absolute, both statement forms."""
    f = tmp_path / "m.py"
    f.write_text(text + "\n")
    got = [m for m, _ in imports_of(importer, f, set(modules()))]
    assert got == ([] if want is None else [want])


def test_type_checking_imports_are_told_apart(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nimport lorafuse.io\nif TYPE_CHECKING:\n"
                 "    from lorafuse.ops import combine\n    import lorafuse.cli\ndef f():\n    import lorafuse.plot\n")
    got = imports_with_kind("lorafuse.model.x", f, set(modules()))
    assert got == [("lorafuse.io", 2, True), ("lorafuse.ops.combine", 4, False), ("lorafuse.cli", 5, False),
                   ("lorafuse.plot", 7, True)]


def test_cycles_are_found():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}) == [["a", "b", "c"], ["e"]]
