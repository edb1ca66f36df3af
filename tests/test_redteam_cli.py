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
    assert main(["combine", str(a), str(b), "--weights", "1e300,1e300", "-o", str(tmp_path / "out2")]) == 1
    assert "every input is finite, so the weighted sum overflows float32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
