"""Red-team round 11, similarity / info: what they print about files whose names hold a line break, and the
fields of their --json documented."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from redteam_fixtures import run_cli
from safetensors.numpy import save_file

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
HOSTILE = "z\nnote: all fine.safetensors"  # a file name holding a line break, and what looks like a note


def _kohya(path: Path, module: str, zero: bool = False, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    down = rng.standard_normal((2, 8)).astype(np.float32)
    up = np.zeros((8, 2), np.float32) if zero else rng.standard_normal((8, 2)).astype(np.float32)
    save_file({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
               f"{module}.alpha": np.array(2.0, np.float32)}, str(path))
    return path


def _section(name: str) -> str:
    text = DOCS.read_text()
    return text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]


def test_similarity_notes_are_not_python_warnings_when_a_path_holds_a_line_break(tmp_path: Path) -> None:
    # The CLI turns similarity()'s warnings into notes; its filter's `.*` did not cross the line break of a file
    # name, so the raw Python warning (`.../lorafuse_entry.py:68: UserWarning: ...` and a source line) leaked.
    z = _kohya(tmp_path / HOSTILE, "lora_unet_a", zero=True)
    o = _kohya(tmp_path / "o.safetensors", "lora_unet_b", seed=1)
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    p = subprocess.run([sys.executable, "-m", "lorafuse", "similarity", str(z), str(o), "--json"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "UserWarning" not in p.stderr and "cli_main" not in p.stderr, p.stderr
    assert json.loads(p.stdout)["share_no_module"] == [[0, 1]]


def test_similarity_text_keeps_one_line_per_row_and_note(tmp_path: Path) -> None:
    z = _kohya(tmp_path / HOSTILE, "lora_unet_a", zero=True)
    o = _kohya(tmp_path / "o.safetensors", "lora_unet_b", seed=1)
    code, out, err = run_cli(["similarity", str(z), str(o)])
    assert code == 0, err
    rows = out.splitlines()
    assert len(rows) == 3, out  # the header and one row per adapter
    assert all(re.search(r"\[\d\]$", r) for r in rows[1:]), out
    notes = [line for line in err.splitlines() if line.strip()]
    assert notes and all(line.startswith("note: ") for line in notes), err
    assert not any(line.startswith("note: all fine") for line in notes), err  # no line forged by the name


def test_info_path_line_stays_one_line(tmp_path: Path) -> None:
    z = _kohya(tmp_path / HOSTILE, "lora_unet_a", seed=2)
    code, out, err = run_cli(["info", str(z)])
    assert code == 0, err
    assert out.splitlines()[0].startswith("adapter ") and out.splitlines()[0].endswith("(kohya)"), out
    assert not any(line.startswith("note: all fine") for line in out.splitlines()), out


def test_similarity_json_fields_are_documented(tmp_path: Path) -> None:
    a = _kohya(tmp_path / "a.safetensors", "lora_unet_a", seed=3)
    b = _kohya(tmp_path / "b.safetensors", "lora_unet_a", seed=4)
    code, out, err = run_cli(["similarity", str(a), str(b), "--json"])
    assert code == 0, err
    doc = _section("similarity")
    missing = [k for k in json.loads(out) if f"`{k}`" not in doc]
    assert not missing, f"similarity --json fields not in docs/cli.md's similarity section: {missing}"


def test_info_json_fields_are_documented(tmp_path: Path) -> None:
    a = _kohya(tmp_path / "a.safetensors", "lora_unet_a", seed=5)
    code, out, err = run_cli(["info", str(a), "--json"])
    assert code == 0, err
    d = json.loads(out)
    doc = _section("info")
    keys = [k for k in d if k != "module_details"] + ["module_details"] + list(d["module_details"][0])
    missing = [k for k in dict.fromkeys(keys) if f"`{k}`" not in doc]
    assert not missing, f"info --json fields not in docs/cli.md's info section: {missing}"


def _dora(folder: Path) -> Path:
    from redteam_fixtures import peft_folder

    magnitude = {"base_model.model.model.layers.0.q_proj.lora_magnitude_vector": np.ones((8,), np.float32)}
    return peft_folder(folder, {"model.layers.0.q_proj": (8, 8)}, 1, extra={"use_dora": True}, tensors=magnitude)


def test_info_spectrum_refuses_a_dora_adapter_before_any_output(tmp_path: Path) -> None:
    # A DoRA delta is m (W + s B A) / ||W + s B A|| - W: info says its norm needs the base, but --spectrum drew the
    # singular values of s B A as "the singular values of every module's delta".
    adapter = _dora(tmp_path / "dora")
    plot = tmp_path / "s.png"
    code, out, err = run_cli(["info", str(adapter), "--spectrum", str(plot)])
    assert code == 1, (out, err)
    assert "DoRA" in err and "model.layers.0.q_proj" in err and out == "", (out, err)
    assert not plot.exists()


def test_plot_spectrum_api_refuses_a_dora_adapter(tmp_path: Path) -> None:
    import pytest

    from lorafuse.errors import UnsupportedError
    from lorafuse.formats import load
    from lorafuse.plot import plot_spectrum, spectra

    adapter = load(_dora(tmp_path / "dora"))
    with pytest.raises(UnsupportedError, match="DoRA"):
        spectra(adapter)
    with pytest.raises(UnsupportedError, match="DoRA"):
        plot_spectrum(adapter, tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_zero_note_gives_the_true_reason_for_a_zero_scale(tmp_path: Path) -> None:
    # lora_alpha 0: B @ A is far from 0, the scale is 0; the note said "B @ A is 0 in every module: saved before
    # training?", which sends a user looking at the wrong thing.
    from redteam_fixtures import peft_folder

    p0 = peft_folder(tmp_path / "p0", {"model.layers.0.q_proj": (8, 8)}, 1, alpha=0)
    p1 = peft_folder(tmp_path / "p1", {"model.layers.0.q_proj": (8, 8)}, 2)
    code, out, err = run_cli(["similarity", str(p0), str(p1)])
    assert code == 0, err
    assert "its delta is zero" in err and "scale is 0" in err, err
    assert "B @ A is 0" not in err, err
