"""Third red-team round: each test is a finding that was wrong before, checked against an independent
reference (numpy float64, the real packages, the file system)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorafuse.cli import main

H, R = 16, 2
PREFIX = "base_model.model."


def _peft(folder: Path, shapes: dict[str, tuple[int, int]], seed: int, rank: int = R, alpha: float = R) -> Path:
    """A PEFT adapter folder: module -> (out, in), float32 factors from `seed`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    data = {}
    for module, (o, i) in shapes.items():
        data[f"{PREFIX}{module}.lora_A.weight"] = rng.standard_normal((rank, i)).astype(np.float32)
        data[f"{PREFIX}{module}.lora_B.weight"] = rng.standard_normal((o, rank)).astype(np.float32)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in shapes})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(data, str(folder / "adapter_model.safetensors"))
    return folder


LLM = {"model.layers.0.self_attn.q_proj": (H, H), "model.layers.0.mlp.up_proj": (2 * H, H)}


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv", [["-o", "{a}", "-o", "{b}"], ["--out={a}", "-o", "{b}"],
                                  ["-o", "{a}", "--rank", "1", "--rank", "2"]])
def test_a_single_valued_option_given_twice_is_refused(tmp_path: Path, argv: list[str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`-o a -o b` wrote b alone (argparse keeps the last); the user may have meant a. Refused, exit 2,
    nothing written."""
    ad = _peft(tmp_path / "ad", LLM, 1)
    a, b = tmp_path / "a", tmp_path / "b"
    words = [w.format(a=a, b=b) for w in argv]
    if "--rank" not in words:
        words += ["--rank", "1"]
    with pytest.raises(SystemExit) as e:
        main(["resize", str(ad), *words])
    assert e.value.code == 2
    assert "given twice" in capsys.readouterr().err
    assert not a.exists() and not b.exists()


def test_the_same_value_twice_is_taken(tmp_path: Path) -> None:
    """A repeated option with the same value is harmless (a shell alias plus the same flag typed again)."""
    ad = _peft(tmp_path / "ad", LLM, 1)
    out = tmp_path / "r1"
    assert main(["resize", str(ad), "-o", str(out), "-o", str(out), "--rank", "1", "-q"]) == 0
    assert (out / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- recipes


def test_a_recipe_key_yaml_reads_as_a_number_is_reported_at_its_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`7: 3` in a model's parameters was reported at the parameters' line (the validator's path holds the
    number 7, the line table the key's text '7')."""
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n"
                      "  - model: b\n    parameters:\n      weight: 0.5\n      7: 3\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "r.yml line 9, models[1].parameters" in err, err


def test_a_full_disk_in_an_intermediate_stage_says_what_the_temporary_folder_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An intermediate stage's write error named `.lorafuse-run-PID-XXXX/pooled`, a folder the user never
    asked for; the message now says it is the run's temporary folder beside -o."""
    import errno
    import os

    import lorafuse.io.safetensors as st_mod

    ad = _peft(tmp_path / "ad", LLM, 1)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"name: pooled\nmerge_method: linear\nmodels:\n  - model: {ad}\n---\nname: small\n"
                      "merge_method: resize\nmodels:\n  - model: pooled\nparameters:\n  rank: 1\n")

    def full(self: object, view: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(st_mod.SafetensorsWriter, "_write_all", full)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "stage 'pooled'" in err and "temporary folder beside" in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lorafuse-run-")]
