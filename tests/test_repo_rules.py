"""Rules about the repository itself: test modules stand alone (shared fixtures live in helper
modules, never in another test module), and pytest turns warnings into errors."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_no_test_module_imports_another():
    bad = {f"{p.name} imports {m}" for p in TESTS.rglob("*.py") for m in imported_modules(p)
           if m.split(".")[-1].startswith("test_") or m.startswith("tests.test_")}
    assert not bad, "shared test code belongs in a helper module: " + "; ".join(sorted(bad))


def test_the_rule_sees_an_import_of_a_test_module(tmp_path):
    p = tmp_path / "test_x.py"
    p.write_text("from test_other import helper\nimport tests.test_y\n")
    assert imported_modules(p) == {"test_other", "tests.test_y"}


def test_warnings_are_errors_except_named_ones():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    filters = cfg["tool"]["pytest"]["ini_options"]["filterwarnings"]
    assert filters[0] == "error"
    broad = [f for f in filters[1:] if f.split(":")[0] == "ignore" and f.count(":") < 2]
    assert not broad, f"an ignore must name the message or the module it silences: {broad}"


def test_builds_do_not_share_a_fixed_folder():
    """Two `pip install .` of one checkout at once (two environments, or a test beside an editable
    install) must not build in one folder: no fixed scikit-build build-dir (issue #18)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "build-dir" not in cfg["tool"]["scikit-build"]
