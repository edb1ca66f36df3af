"""Lead, round 15: the console script's entry (`lorafuse_entry.run`) ends the process without the interpreter's
teardown once a command is done; what a command wrote, printed and returned must be exactly what `main` gives."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
RUN = "import sys; from lorafuse_entry import run; sys.exit(run())"


def _model(tmp: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A float32 base of two q_proj weights and a rank-2 PEFT adapter on them; returns the float64 merge."""
    rng = np.random.default_rng(7)
    base, ad = tmp / "base", tmp / "ad"
    base.mkdir()
    ad.mkdir()
    weights = {f"model.layers.{i}.self_attn.q_proj.weight": rng.standard_normal((12, 10)).astype(np.float32)
               for i in range(2)}
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    factors: dict[str, np.ndarray] = {}
    want: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        stem = "base_model.model." + name.removesuffix(".weight")
        a = rng.standard_normal((2, 10)).astype(np.float32)
        b = rng.standard_normal((12, 2)).astype(np.float32)
        factors[f"{stem}.lora_A.weight"] = a
        factors[f"{stem}.lora_B.weight"] = b
        want[name] = w.astype(np.float64) + 3.0 / 2 * (b.astype(np.float64) @ a.astype(np.float64))
    save_file(factors, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 3,
                                                        "target_modules": ["q_proj"]}))
    return base, ad, want


def _script(code: str, *args: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)  # type: ignore[call-overload]


def test_the_installed_console_script_is_run() -> None:
    """pyproject's console script is lorafuse_entry:run (the entry these tests check), not main."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lorafuse"] == "lorafuse_entry:run"


def test_run_writes_the_merge_and_prints_all_of_its_output_to_a_pipe(tmp_path: Path) -> None:
    base, ad, want = _model(tmp_path)
    out = tmp_path / "out"
    p = _script(RUN, "apply", base, ad, "-o", out, "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)  # the whole JSON document reached the pipe before the process ended
    assert report["out"] == str(out) and sorted(report["merged"]) == sorted(want)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(want)
    for name, w in want.items():
        np.testing.assert_allclose(got[name].astype(np.float64), w, rtol=2e-6, atol=2e-6)
    assert (out / "lorafuse_manifest.json").is_file()


def test_run_gives_mains_status_and_one_line_on_failure(tmp_path: Path) -> None:
    base, _, _ = _model(tmp_path)
    p = _script(RUN, "apply", base, tmp_path / "missing-adapter", "-o", tmp_path / "o")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "missing-adapter" in p.stderr
    assert not (tmp_path / "o").exists()


def test_run_keeps_atexit_handlers_and_waits_for_other_threads(tmp_path: Path) -> None:
    """A caller's atexit handler still runs, and a thread still running when the command ends is not cut off:
    run then leaves through the interpreter's own exit."""
    base, ad, _ = _model(tmp_path)
    mark, late = tmp_path / "atexit.txt", tmp_path / "thread.txt"
    code = (f"import atexit, sys, threading, time, pathlib\n"
            f"atexit.register(lambda: pathlib.Path({str(mark)!r}).write_text('ran'))\n"
            f"def slow():\n    time.sleep(0.5)\n    pathlib.Path({str(late)!r}).write_text('done')\n"
            f"threading.Thread(target=slow).start()\n"
            f"from lorafuse_entry import run\nsys.exit(run())\n")
    p = _script(code, "apply", base, ad, "-o", tmp_path / "o")
    assert p.returncode == 0, p.stderr
    assert mark.read_text() == "ran"
    assert late.read_text() == "done"
    p = _script(f"import atexit, sys, pathlib\n"
                f"atexit.register(lambda: pathlib.Path({str(mark)!r}).write_text('again'))\n"
                f"from lorafuse_entry import run\nsys.exit(run())\n", "info", ad)
    assert p.returncode == 0 and "peft" in p.stdout
    assert mark.read_text() == "again"


def test_run_with_a_reader_that_left_is_quiet(tmp_path: Path) -> None:
    """`lorafuse info ... | head -1`: status 141 and no 'Exception ignored' from a flush at the exit."""
    _, ad, _ = _model(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", RUN, "info", str(ad)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # the reader left before anything was read
    err = p.stderr.read()
    p.stderr.close()
    assert p.wait(timeout=120) in (0, 141)
    assert "Exception ignored" not in err and "Traceback" not in err
