"""The top-level Python API (issue #18): every public function documents each of its parameters, resize and
extract take the CLI's rank rules as keyword arguments, reports share one read-only shape, and the package
ships its type information (py.typed). Values are checked against numpy float64 SVDs and files read back
with the `safetensors` package."""

from __future__ import annotations

import fnmatch
import inspect
import json
import pydoc
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tomllib
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.errors import AdapterNote, LorafuseValueError
from lorafuse.formats import detect_format as formats_detect_format
from lorafuse.formats import load as formats_load
from lorafuse.ops.apply import ApplyReport
from lorafuse.ops.apply import apply as ops_apply
from lorafuse.ops.combine import combine as ops_combine
from lorafuse.ops.convert import convert as ops_convert
from lorafuse.ops.extract import ExtractResult as OpsExtractResult
from lorafuse.ops.info import describe as ops_describe
from lorafuse.ops.similarity import similarity as ops_similarity

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lorafuse"
PREFIX = "base_model.model.model.layers.0."
SHAPES = {"self_attn.q_proj": (12, 10), "mlp.up_proj": (16, 10)}
R, ALPHA = 4, 8.0  # PEFT scale alpha / r = 2


# ----------------------------------------------------------------------------- fixtures


def _peft(path: Path, seed: int = 0, targets: list[str] | None = None) -> dict[str, np.ndarray]:
    """A PEFT adapter folder with random float32 factors; returns its tensors."""
    g = np.random.default_rng(seed)
    path.mkdir(parents=True)
    tensors = {}
    for name, (o, i) in SHAPES.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = g.standard_normal((R, i)).astype(np.float32)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = g.standard_normal((o, R)).astype(np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    targets = targets if targets is not None else sorted({n.rsplit(".", 1)[-1] for n in SHAPES})
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": targets}))
    return tensors


def _delta64(tensors: dict[str, np.ndarray], module: str) -> np.ndarray:
    """The module's PEFT delta (alpha / r) B A in float64, from the raw tensors."""
    b = tensors[f"{PREFIX}{module}.lora_B.weight"].astype(np.float64)
    a = tensors[f"{PREFIX}{module}.lora_A.weight"].astype(np.float64)
    return ALPHA / R * b @ a


def _truncated(d: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def _close(x: np.ndarray, ref: np.ndarray, tol: float = 1e-5) -> None:
    assert np.linalg.norm(x - ref) <= tol * np.linalg.norm(ref), float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.fixture()
def adapter(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "lora"
    return path, _peft(path)


@pytest.fixture()
def checkpoints(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A base and a fine-tuned checkpoint: W_ft = W_base + U diag(0.5^i) V^T (rank 6) per matrix; one tensor
    only in the base. Returns the folders and D = W_ft - W_base (float64, from the stored float32 values)."""
    g = np.random.default_rng(7)
    base, ft = tmp_path / "base", tmp_path / "ft"
    base.mkdir()
    ft.mkdir()
    wb, wf, deltas = {}, {}, {}
    for i, (o, n) in enumerate([(48, 32), (32, 64)]):
        key = f"layers.{i}.proj.weight"
        u, _ = np.linalg.qr(g.standard_normal((o, 6)))
        v, _ = np.linalg.qr(g.standard_normal((n, 6)))
        wb[key] = g.standard_normal((o, n)).astype(np.float32)
        wf[key] = (wb[key] + (u * 0.5 ** np.arange(6)) @ v.T).astype(np.float32)
        deltas[key.removesuffix(".weight")] = wf[key].astype(np.float64) - wb[key]
    wb["layers.9.only_in_base.weight"] = np.ones((4, 4), np.float32)
    save_file(wb, str(base / "model.safetensors"))
    save_file(wf, str(ft / "model.safetensors"))
    return base, ft, deltas


# ----------------------------------------------------------------------------- docstrings


def _public_functions() -> dict[str, object]:
    return {n: getattr(lorafuse, n) for n in lorafuse.__all__ if inspect.isfunction(getattr(lorafuse, n))}


def _parameter_entries(doc: str) -> dict[str, tuple[str, list[str]]]:
    """numpy style: the `Parameters` section's entries, name -> (text after 'name : ', description lines)."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line == "Parameters" and lines[i + 1].startswith("---"))
    entries: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for i in range(start + 2, len(lines)):
        line = lines[i]
        if i + 1 < len(lines) and lines[i + 1].startswith("---") and line and not line.startswith(" "):
            break  # the next section
        head = re.match(r"^(\w+) : (.+)$", line)
        if head:
            current = head.group(1)
            entries[current] = (head.group(2), [])
        elif line.startswith("    ") and current is not None:
            entries[current][1].append(line.strip())
    return entries


def test_the_top_level_functions_are_the_documented_ones():
    assert set(_public_functions()) == {"apply", "combine", "convert", "describe", "detect_format", "extract", "load",
                                        "resize", "run", "similarity"}


@pytest.mark.parametrize("name", sorted(_public_functions()))
def test_every_public_function_documents_each_parameter_with_its_default(name):
    fn = _public_functions()[name]
    doc = inspect.getdoc(fn)
    assert doc, f"lorafuse.{name} has no docstring"
    entries = _parameter_entries(doc)
    params = inspect.signature(fn).parameters  # type: ignore[arg-type]
    assert list(entries) == list(params), f"lorafuse.{name}: documented {list(entries)}, takes {list(params)}"
    for p in params.values():
        header, text = entries[p.name]
        assert text and all(text), f"lorafuse.{name}: parameter {p.name!r} has no description"
        if p.default is inspect.Parameter.empty:
            assert "default" not in header, f"lorafuse.{name}: {p.name!r} is required, documented with a default"
        else:
            assert header.endswith(f", default {p.default!r}"), \
                f"lorafuse.{name}: {p.name!r} should read '{p.name} : <type>, default {p.default!r}', got {header!r}"
    assert re.search(r"^Returns\n-------\n\S", doc, re.M), f"lorafuse.{name}: no Returns section"


@pytest.mark.parametrize("name", ["combine", "apply", "resize", "extract", "convert", "load"])
def test_help_shows_each_parameter(name):
    fn = getattr(lorafuse, name)
    text = pydoc.render_doc(fn, renderer=pydoc.plaintext)
    for p in inspect.signature(fn).parameters.values():
        assert re.search(rf"^\s+{p.name} : ", text, re.M), f"help(lorafuse.{name}) does not document {p.name!r}"


@pytest.mark.parametrize("name, wrapped", [
    ("apply", ops_apply), ("combine", ops_combine), ("convert", ops_convert), ("describe", ops_describe),
    ("similarity", ops_similarity), ("detect_format", formats_detect_format), ("load", formats_load),
])
def test_the_documented_functions_take_what_the_operations_take(name, wrapped):
    """A parameter added to an operation must reach its top-level function (and its documentation)."""
    def shape(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert shape(getattr(lorafuse, name)) == shape(wrapped)


def test_load_warns_at_the_callers_line(tmp_path):
    _peft(tmp_path / "lora", targets=["q_proj"])  # up_proj is not targeted: PEFT ignores it, and so does load
    with pytest.warns(AdapterNote, match="does not target") as caught:
        adapter = lorafuse.load(tmp_path / "lora")
    assert [Path(w.filename) for w in caught] == [Path(__file__)]
    assert list(adapter.updates) == ["model.layers.0.self_attn.q_proj"]


# ----------------------------------------------------------------------------- resize


def test_resize_to_a_fixed_rank_is_the_truncated_svd(adapter):
    path, tensors = adapter
    result = lorafuse.resize(path, 2, threads=1, progress=False)
    assert isinstance(result, lorafuse.ResizeResult) and isinstance(result, lorafuse.AdapterReport)
    assert result.out is None and result.notes == [] and result.seconds > 0
    names = [f"model.layers.0.{m}" for m in SHAPES]
    assert result.ranks == dict.fromkeys(names, 2)
    assert [m.name for m in result.modules] == list(result.adapter.updates) == list(result.ranks)  # file order
    rows = {row.name: row for row in result.modules}
    for m in SHAPES:
        row = rows[f"model.layers.0.{m}"]
        d = _delta64(tensors, m)
        s = np.linalg.svd(d, compute_uv=False)
        _close(result.adapter.updates[f"model.layers.0.{m}"].delta(), _truncated(d, 2))
        assert (row.rank_in, row.rank_out) == (R, 2)
        assert row.fro_kept == pytest.approx(np.sqrt(np.sum(s[:2] ** 2) / np.sum(s**2)), rel=1e-6)


def test_resize_rules_choose_the_ranks_the_spectrum_gives(adapter):
    path, tensors = adapter
    spectra = {f"model.layers.0.{m}": np.linalg.svd(_delta64(tensors, m), compute_uv=False) for m in SHAPES}
    for kw, pick in [
        ({"sv_fro": 0.8}, lambda s: int(np.argmax(np.sqrt(np.cumsum(s**2) / np.sum(s**2)) >= 0.8)) + 1),
        ({"sv_cumulative": 0.6}, lambda s: int(np.argmax(np.cumsum(s) / np.sum(s) >= 0.6)) + 1),
        ({"sv_ratio": 2.0}, lambda s: int(np.sum(s > s[0] / 2.0))),
        ({"sv_fro": 1.0, "max_rank": 3}, lambda s: 3),
    ]:
        result = lorafuse.resize(path, threads=1, progress=False, **kw)
        assert result.ranks == {n: max(1, pick(s)) for n, s in spectra.items()}, kw


@pytest.mark.parametrize("kw, words", [
    ({}, "got none"),
    ({"max_rank": 3}, "max_rank=3 only caps"),
    ({"rank": 2, "sv_fro": 0.5}, "rank=2, sv_fro=0.5"),
    ({"sv_ratio": 2.0, "sv_cumulative": 0.5}, "sv_ratio=2.0, sv_cumulative=0.5"),
    ({"rank": 0}, "rank must be >= 1"),
    ({"rank": 2.5}, "rank must be an integer"),
    ({"sv_fro": 1.5}, "sv_fro must be a finite number > 0 and <= 1"),
    ({"sv_cumulative": 0.0}, "sv_cumulative must be"),
    ({"sv_ratio": 0.5}, "sv_ratio must be a finite number >= 1"),
    ({"rank": 2, "max_rank": 0}, "max_rank must be >= 1"),
])
def test_resize_rule_errors_name_the_parameter_and_write_nothing(adapter, tmp_path, kw, words):
    path, _ = adapter
    with pytest.raises(LorafuseValueError) as caught:
        lorafuse.resize(path, out=tmp_path / "out", **kw)
    assert words in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_resize_writes_out_with_the_clis_rules(adapter, tmp_path):
    path, tensors = adapter
    result = lorafuse.resize(path, 2, out=tmp_path / "small", progress=False)
    assert result.out == tmp_path / "small"
    config = json.loads((tmp_path / "small" / "adapter_config.json").read_text())
    written = load_file(str(tmp_path / "small" / "adapter_model.safetensors"))
    assert not config.get("rank_pattern") and not config.get("alpha_pattern") and config["r"] == 2
    for m in SHAPES:  # PEFT's rule, read with the safetensors package: delta = lora_alpha / r * B A
        b = written[f"{PREFIX}{m}.lora_B.weight"].astype(np.float64)
        a = written[f"{PREFIX}{m}.lora_A.weight"].astype(np.float64)
        assert b.shape[1] == a.shape[0] == 2
        _close(config["lora_alpha"] / config["r"] * b @ a, _truncated(_delta64(tensors, m), 2))
    # a .safetensors name no one-file format can hold these module names in: refused before any work
    with pytest.raises(LorafuseValueError, match="give a folder name"):
        lorafuse.resize(path, 2, out=tmp_path / "small.safetensors")
    assert not (tmp_path / "small.safetensors").exists()


def test_resize_passes_the_factor_dtype(adapter, tmp_path):
    path, tensors = adapter
    result = lorafuse.resize(path, 2, dtype="fp16", out=tmp_path / "half", progress=False)
    written = load_file(str(result.out / "adapter_model.safetensors"))
    assert {t.dtype for t in written.values()} == {np.dtype(np.float16)}
    m = "self_attn.q_proj"
    b = written[f"{PREFIX}{m}.lora_B.weight"].astype(np.float64)
    a = written[f"{PREFIX}{m}.lora_A.weight"].astype(np.float64)
    _close(ALPHA / R * b @ a, _truncated(_delta64(tensors, m), 2), tol=3e-3)


# ----------------------------------------------------------------------------- extract


def test_extract_with_keyword_rules_against_the_exact_svd(checkpoints, tmp_path):
    base, ft, deltas = checkpoints
    out = tmp_path / "extracted"
    result = lorafuse.extract(base, ft, out, rank=3, threads=1, progress=False)
    assert isinstance(result, OpsExtractResult) and isinstance(result, lorafuse.AdapterReport)
    assert result.out == out and result.seconds > 0
    assert result.ranks == dict.fromkeys(deltas, 3)
    assert result.notes == ["not extracted: layers.9.only_in_base.weight: only in the base"]
    config = json.loads((out / "adapter_config.json").read_text())
    written = load_file(str(out / "adapter_model.safetensors"))
    for name, d in deltas.items():
        s = np.linalg.svd(d, compute_uv=False)
        optimal = np.sqrt(np.sum(s[3:] ** 2) / np.sum(s**2))
        row = next(m for m in result.modules if m.name == name)
        assert row.rel_error == pytest.approx(optimal, rel=1e-2)
        b = written[f"base_model.model.{name}.lora_B.weight"].astype(np.float64)
        a = written[f"base_model.model.{name}.lora_A.weight"].astype(np.float64)
        _close(config["lora_alpha"] / config["r"] * b @ a, _truncated(d, 3), tol=1e-4)


def test_extract_spectrum_rules_and_errors(checkpoints, tmp_path):
    base, ft, deltas = checkpoints
    result = lorafuse.extract(base, ft, sv_fro=0.99, threads=1, progress=False)
    assert result.out is None
    want = {}
    for name, d in deltas.items():
        s = np.linalg.svd(d, compute_uv=False)
        want[name] = int(np.argmax(np.sqrt(np.cumsum(s**2) / np.sum(s**2)) >= 0.99 - 1e-12)) + 1
    assert result.ranks == want
    with pytest.raises(LorafuseValueError, match=r"out must be a path .*rank=3"):
        lorafuse.extract(base, ft, 3)  # type: ignore[arg-type]
    with pytest.raises(LorafuseValueError, match="exactly one rank rule"):
        lorafuse.extract(base, ft, tmp_path / "x", rank=3, sv_ratio=4.0)
    with pytest.raises(LorafuseValueError, match="max_rank must be"):
        lorafuse.extract(base, ft, tmp_path / "x", sv_fro=0.5, max_rank=-1)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- reports


def test_apply_reports_in_the_common_shape():
    report = ApplyReport(out=Path("merged"), merged=["w"], replaced=[], biases=[], tensors=1, bytes_written=10,
                         seconds=0.5, notes=["a note"])
    assert isinstance(report, lorafuse.Report)
    assert not isinstance(report, lorafuse.AdapterReport)  # it writes a model, not an adapter: no ranks


def test_combine_to_and_convert_report_in_the_adapter_shape(tmp_path):
    from lorafuse.ops.combine import CombineOptions, combine_to

    g = np.random.default_rng(21)
    files = []
    for i in range(2):
        path = tmp_path / f"k{i}.safetensors"
        save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight":
                   g.standard_normal((4, 8)).astype(np.float32),
                   "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight":
                   g.standard_normal((8, 4)).astype(np.float32),
                   "lora_unet_mid_block_attentions_0_proj_in.alpha": np.array(4, dtype=np.float32)}, str(path))
        files.append(path)
    report = combine_to(files, [1.0, 0.5], CombineOptions(method="cat"), tmp_path / "c.safetensors")
    assert isinstance(report, lorafuse.AdapterReport) and report.seconds > 0 and report.notes == []
    assert report.ranks == {"lora_unet_mid_block_attentions_0_proj_in": 8} == {
        n: u.rank for n, u in lorafuse.load(report.out).updates.items()}
    conv = ops_convert(files[0], tmp_path / "d.safetensors", to="peft", family="sd1")
    assert isinstance(conv, lorafuse.AdapterReport) and conv.seconds > 0
    assert conv.ranks == {n: u.rank for n, u in lorafuse.load(conv.out).updates.items()} and \
        set(conv.ranks.values()) == {4}


def test_report_protocols_name_the_shared_members():
    members = {n for n, v in vars(lorafuse.Report).items() if isinstance(v, property)}
    assert members == {"out", "notes", "seconds"}
    assert {n for n, v in vars(lorafuse.AdapterReport).items() if isinstance(v, property)} == {"ranks"}


# ----------------------------------------------------------------------------- packaging


def test_the_package_ships_py_typed():
    """PEP 561: py.typed in the package, which scikit-build-core's wheel.packages copies whole (every file
    git does not ignore and wheel.exclude does not exclude)."""
    assert (PACKAGE / "py.typed").is_file()
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["scikit-build"]
    assert "src/lorafuse" in cfg["wheel"]["packages"]
    for pattern in cfg.get("wheel", {}).get("exclude", []) + cfg.get("sdist", {}).get("exclude", []):
        assert not fnmatch.fnmatch("lorafuse/py.typed", pattern) and not fnmatch.fnmatch("py.typed", pattern)
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot ask git whether py.typed is tracked")
    rel = "src/lorafuse/py.typed"
    ignored = subprocess.run([git, "check-ignore", "-q", rel], cwd=ROOT, check=False)
    assert ignored.returncode == 1, "py.typed is git-ignored: scikit-build-core would leave it out"
    tracked = subprocess.run([git, "ls-files", "--error-unmatch", rel], cwd=ROOT, capture_output=True, check=False)
    assert tracked.returncode == 0, "py.typed is not tracked by git"


def test_the_installed_package_has_py_typed():
    """The lorafuse that runs these tests (in CI: installed from the wheel pip built) carries py.typed
    next to its modules and compiled core."""
    installed = Path(lorafuse.__file__).parent
    assert (installed / "py.typed").is_file(), f"{installed} has no py.typed"
    assert any(installed.glob("_core_generic*")), f"{installed} has no compiled core: not the installed package"
