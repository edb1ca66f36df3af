"""Command-line manners a new user met: `--skip-missing` when no module finds a target (it wrote a copy of the
base without saying so), and `--density 0` (an all-zero adapter, or the core's own check text)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorafuse.cli import main

H, R = 8, 2


def _adapter(folder: Path, module: str, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": R,
                                                            "target_modules": [module.rsplit(".", 1)[-1]]}))
    save_file({f"base_model.model.{module}.lora_A.weight": rng.standard_normal((R, H)).astype(np.float32),
               f"base_model.model.{module}.lora_B.weight": rng.standard_normal((H, R)).astype(np.float32)},
              str(folder / "adapter_model.safetensors"))
    return folder


def test_skip_missing_with_no_module_found_says_so(tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": np.ones((H, H), np.float32)}, str(base / "model.safetensors"))
    other = _adapter(tmp_path / "other", "model.layers.0.mlp.gate_proj")  # for another model: nothing matches
    assert main(["apply", str(base), str(other), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "MissingModuleError" in err and "gate_proj" in err and not (tmp_path / "out").exists()
    # --skip-missing skipping every module writes the base unchanged, and says so
    assert main(["apply", str(base), str(other), "--skip-missing", "-o", str(tmp_path / "copy")]) == 0
    err = capsys.readouterr().err
    assert "no adapter module found a target" in err and "the output is the base unchanged" in err
    # with one module matching, --skip-missing merges it and names the other
    both = _adapter(tmp_path / "both", "model.layers.0.self_attn.q_proj")
    assert main(["apply", str(base), str(both), str(other), "--skip-missing", "-o", str(tmp_path / "out")]) == 0
    assert "skipped (no target)" in capsys.readouterr().err and (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("density", ["0", "0.0", "-0"])
def test_density_zero_is_refused_while_parsing(tmp_path, capsys, density):
    a = _adapter(tmp_path / "a", "model.layers.0.self_attn.q_proj")
    b = _adapter(tmp_path / "b", "model.layers.0.self_attn.q_proj", 1)
    with pytest.raises(SystemExit) as e:
        main(["combine", str(a), str(b), "--method", "ties", "--density", density, "-o", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "argument --density: must be a number > 0 and <= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_a_non_finite_combine_names_the_input_or_the_weights(tmp_path, capsys, dtype):
    """The core names the module; the message also says which adapter holds the NaN (in any stored dtype), or,
    when none does, that the weights overflow float32."""
    import torch
    from safetensors.torch import save_file as save_torch

    q = "model.layers.0.self_attn.q_proj"
    a = _adapter(tmp_path / "a", q)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    torch_dtype = torch.bfloat16 if dtype == "BF16" else torch.float32
    lora_a = torch.ones((R, H), dtype=torch_dtype)
    lora_a[1, 3] = float("nan")
    save_torch({f"base_model.model.{q}.lora_A.weight": lora_a,
                f"base_model.model.{q}.lora_B.weight": torch.ones((H, R), dtype=torch_dtype)},
               str(bad / "adapter_model.safetensors"))
    assert main(["combine", str(a), str(bad), "-o", str(tmp_path / "out")]) == 1
    assert f"adapter 2 ({bad}), module '{q}', holds NaN or Inf" in capsys.readouterr().err
    b = _adapter(tmp_path / "b", q, 1)
    assert main(["combine", str(a), str(b), "--weights", "1e300,1e300", "-o", str(tmp_path / "out2")]) == 2
    assert f"adapter 1 ({a}): module '{q}': weight 1e+300 times its scale 1 is beyond float32's range" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def _nan_adapter(tmp_path: Path, q: str) -> Path:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": R,
                                                         "target_modules": ["q_proj"]}))
    lora_b = np.ones((H, R), np.float32)
    lora_b[2, 1] = np.nan
    save_file({f"base_model.model.{q}.lora_A.weight": np.ones((R, H), np.float32),
               f"base_model.model.{q}.lora_B.weight": lora_b}, str(bad / "adapter_model.safetensors"))
    return bad


@pytest.mark.parametrize("extra", [["--passes", "3"], ["--passes", "2"], ["--passes", "1"],
                                   ["--method", "linear", "--engine", "stream"], ["--method", "cat"]])
def test_nan_in_a_listed_adapter_is_refused_naming_its_line(tmp_path, capsys, extra):
    """Every engine and method: the streamed sketches (which met NaN in numpy's SVD: a LinAlgError traceback)
    and cat and the streamed linear (which wrote NaN factors, exit 0) refuse, naming the list line or adapter."""
    q = "model.layers.0.self_attn.q_proj"
    a, b = _adapter(tmp_path / "a", q), _adapter(tmp_path / "b", q, 1)
    bad = _nan_adapter(tmp_path, q)
    (tmp_path / "list.txt").write_text(f"\ufeff{a}\r\n{bad}\r\n{b}\r\n")  # Notepad's UTF-8: a BOM, CRLF
    if "cat" in extra:
        code = main(["combine", str(a), str(bad), str(b), *extra, "-o", str(tmp_path / "out")])
        where = f"adapter 2 ({bad}), module '{q}'"
    else:
        code = main(["combine", "--from-list", str(tmp_path / "list.txt"), "--rank", "2", *extra, "-o",
                     str(tmp_path / "out")] if "linear" not in extra else
                    ["combine", "--from-list", str(tmp_path / "list.txt"), *extra, "-o", str(tmp_path / "out")])
        where = f"list.txt line 2: module '{q}'"
    err = capsys.readouterr().err
    assert code == 1 and where in err and "NaN or Inf" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_weights_that_overflow_float32_are_refused_in_every_engine(tmp_path, capsys):
    q = "model.layers.0.self_attn.q_proj"
    a, b = _adapter(tmp_path / "a", q), _adapter(tmp_path / "b", q, 1)
    (tmp_path / "list.txt").write_text(f"{a} 1e39\n{b} 1\n")
    for engine in (["--passes", "2"], []):  # either engine: the list's line (the header pass checks it)
        assert main(["combine", "--from-list", str(tmp_path / "list.txt"), "--rank", "2", *engine, "-o",
                     str(tmp_path / "o")]) == 2
        assert "list.txt line 1" in capsys.readouterr().err
    for method in ("cat", "svd"):  # a coefficient that fits float32 but whose products do not
        assert main(["combine", str(a), str(b), "--method", method, "--weights", "3.4e38,1", "-o",
                     str(tmp_path / "o")]) == 1
        assert "every input is finite, so the weighted sum overflows float32" in capsys.readouterr().err
    (tmp_path / "list2.txt").write_text(f"{a} 1e38\n{b} 1e38\n")
    assert main(["combine", "--from-list", str(tmp_path / "list2.txt"), "--rank", "2", "--passes", "2", "-o",
                 str(tmp_path / "o")]) == 1
    assert "overflows float32 (every input is finite)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_extract_reports_the_error_of_the_rank_it_kept(tmp_path):
    """At the full rank the error is 0 (it was float32's rounding of the singular values, ~1e-4, for a true error
    of ~1e-7); below it, the float64 reference's."""
    import lorafuse

    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((24, 64)).astype(np.float32)
    d = (rng.standard_normal((24, 12)) @ rng.standard_normal((12, 64)) + 0.1 * rng.standard_normal((24, 64)))
    w1 = (w0 + d).astype(np.float32)
    for name, w in (("base", w0), ("ft", w1)):
        (tmp_path / name).mkdir()
        save_file({"model.layers.0.self_attn.q_proj.weight": w}, str(tmp_path / name / "model.safetensors"))
    exact = w1.astype(np.float64) - w0.astype(np.float64)
    s = np.linalg.svd(exact, compute_uv=False)
    for rank, want in ((24, 0.0), (100, 0.0), (8, float(np.sqrt(np.sum(s[8:] ** 2)) / np.linalg.norm(exact)))):
        res = lorafuse.extract(tmp_path / "base", tmp_path / "ft", rank=rank)
        (module,) = res.modules
        assert module.rel_error == pytest.approx(want, abs=2e-6), rank


def test_similarity_says_why_a_norm_is_not_finite(tmp_path):
    """A NaN in the factors, or finite factors whose delta's norm overflows float64 (a scale of 1e299): two
    different reasons, each said."""
    import lorafuse
    from lorafuse import NonFiniteError

    q = "model.layers.0.self_attn.q_proj"
    huge = _adapter(tmp_path / "huge", q)
    config = json.loads((huge / "adapter_config.json").read_text())
    (huge / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e299}))
    # (round 7: a norm that overflows float64 only when squared is computed scaled: the cosine is measured)
    np.testing.assert_allclose(lorafuse.similarity([huge, huge]), np.ones((2, 2)), rtol=1e-12)
    with pytest.raises(NonFiniteError, match=r"has a delta holding NaN or Inf"):
        lorafuse.similarity([_nan_adapter(tmp_path, q), huge])


@pytest.mark.parametrize("command", ["combine", "resize", "extract"])
def test_progress_switches_are_the_same_on_every_long_command(tmp_path, command):
    """--progress draws a bar even when stderr is not a terminal, --no-progress and -q never, as apply's do."""
    import subprocess
    import sys

    q = "model.layers.0.self_attn.q_proj"
    a = _adapter(tmp_path / "a", q)
    if command == "extract":
        for name, w in (("base", np.zeros((H, H), np.float32)), ("ft", np.ones((H, H), np.float32))):
            (tmp_path / name).mkdir()
            save_file({f"{q}.weight": w}, str(tmp_path / name / "model.safetensors"))
        argv = ["extract", str(tmp_path / "base"), str(tmp_path / "ft"), "--rank", "1"]
    elif command == "combine":
        (tmp_path / "list.txt").write_text(f"{a}\n{_adapter(tmp_path / 'b', q, 1)}\n")
        argv = ["combine", "--from-list", str(tmp_path / "list.txt"), "--passes", "2", "--rank", "2"]
    else:
        argv = ["resize", str(a), "--rank", "1"]
    runs = {}
    for i, flags in enumerate((["--progress"], ["--no-progress"], ["--progress", "-q"], [])):
        res = subprocess.run([sys.executable, "-m", "lorafuse.cli", *argv, *flags, "-o", str(tmp_path / f"o{i}")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        runs[" ".join(flags)] = "100" in res.stderr and "%" in res.stderr
    assert runs == {"--progress": True, "--no-progress": False, "--progress -q": False, "": False}  # "": no tty
