"""Red-team round 8, attacker: hostile inputs and hostile file systems against every command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import llm_base, peft_folder, run_cli
from safetensors.numpy import load_file, save_file

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 6), "model.layers.0.self_attn.v_proj": (4, 6)}
BIG = {"model.layers.0.self_attn.q_proj": (512, 512), "model.layers.0.self_attn.v_proj": (512, 256)}  # > 1 MiB


def _same_size_file(path: Path, tensors: dict[str, np.ndarray], size: int) -> Path:
    """`tensors` saved by safetensors to `path`, padded through a metadata entry to exactly `size` bytes."""
    pad = 0
    while True:
        save_file(tensors, str(path), metadata={"format": "pt", "note": "x" * pad})
        have = path.stat().st_size
        if have >= size:
            assert have == size
            return path
        pad += size - have


# ----------------------------------------------------------------------------- lorafuse_manifest.json


def test_a_same_size_model_renamed_into_an_earlier_output_folder_is_not_deleted(tmp_path: Path) -> None:
    """A user's own fine-tuned model of the same architecture (same size), rsync'ed or saved-and-renamed into
    a folder lorafuse once wrote, carries no stamp: a re-run without --overwrite must not delete it."""
    base, ad, out = llm_base(tmp_path / "base", BIG), peft_folder(tmp_path / "ad", BIG, 1), tmp_path / "out"
    assert run_cli(["apply", str(base), str(ad), "-o", str(out), "-q"])[0] == 0
    weights = out / "model.safetensors"
    mine = {k: np.full_like(v, 7.0) for k, v in load_file(str(weights)).items()}
    tmp = _same_size_file(tmp_path / "mine.safetensors", mine, weights.stat().st_size)
    os.rename(tmp, weights)  # a new inode: no user.lorafuse.written stamp
    code, _, err = run_cli(["apply", str(base), str(ad), "-o", str(out), "-q"])
    assert code == 1 and "model.safetensors" in err and "--overwrite" in err, err
    assert np.array_equal(load_file(str(weights))["model.layers.0.self_attn.q_proj.weight"],
                          mine["model.layers.0.self_attn.q_proj.weight"])


def test_a_copied_big_output_folder_file_takes_overwrite(tmp_path: Path) -> None:
    base, ad, out = llm_base(tmp_path / "base", BIG), peft_folder(tmp_path / "ad", BIG, 1), tmp_path / "out"
    assert run_cli(["apply", str(base), str(ad), "-o", str(out), "-q"])[0] == 0
    record = json.loads((out / "lorafuse_manifest.json").read_text())["files"]["model.safetensors"]
    assert "sha256" not in record and len(record["sample_sha256"]) == 64
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes((out / "model.safetensors").read_bytes())
    os.rename(copy, out / "model.safetensors")  # the same bytes, without a stamp: a copy, maybe the user's only one
    code, _, err = run_cli(["apply", str(base), str(ad), "-o", str(out), "--weights", "0.5", "-q"])
    assert code == 1 and "model.safetensors" in err and "--overwrite" in err, err
    code, _, err = run_cli(["apply", str(base), str(ad), "-o", str(out), "--weights", "0.5", "-q", "--overwrite"])
    assert code == 0, err
    ref = load_file(str(base / "model.safetensors"))["model.layers.0.self_attn.v_proj.weight"].astype(np.float64)
    t = load_file(str(ad / "adapter_model.safetensors"))
    m = "base_model.model.model.layers.0.self_attn.v_proj"
    ref += 0.5 * t[f"{m}.lora_B.weight"].astype(np.float64) @ t[f"{m}.lora_A.weight"].astype(np.float64)
    got = load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.v_proj.weight"]
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_a_manifest_record_without_a_size_is_a_folder_of_yours_not_a_traceback(tmp_path: Path) -> None:
    base, ad, out = llm_base(tmp_path / "base", SHAPES), peft_folder(tmp_path / "ad", SHAPES, 1), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("hello\n")
    for record in ({}, {"size": 6.0}, {"size": True}, {"size": "6"}):
        manifest = {"written_by": "lorafuse", "kind": "checkpoint", "files": {"notes.txt": record}}
        (out / "lorafuse_manifest.json").write_text(json.dumps(manifest))
        code, _, err = run_cli(["apply", str(base), str(ad), "-o", str(out), "-q"])
        assert code == 1 and "notes.txt" in err and "Traceback" not in err, (record, err)
        assert (out / "notes.txt").read_text() == "hello\n"


# ----------------------------------------------------------------------------- module names no reader takes back


def _checkpoints(tmp_path: Path, odd: str) -> tuple[Path, Path]:
    """A base and a fine-tune (config.json + model.safetensors) whose weights `odd` and up_proj both changed."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    d = (rng.standard_normal((8, 1)) @ rng.standard_normal((1, 6))).astype(np.float32)
    folders = []
    for name, delta in (("base", 0 * d), ("ft", d)):
        folder = tmp_path / name
        folder.mkdir()
        save_file({odd: w + delta, "model.layers.0.mlp.up_proj.weight": w + delta}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text('{"model_type": "llama"}')
        folders.append(folder)
    return folders[0], folders[1]


@pytest.mark.parametrize("odd", [".weight", "a..b.weight", "x/y.weight", "../../evil.weight", "a\nb.weight",
                                 "\x00x.weight"])
def test_extract_refuses_a_weight_whose_module_name_no_reader_takes_back(tmp_path: Path, odd: str) -> None:
    """extract wrote an adapter with modules '', 'a..b', 'x/y', '../../evil' (target_modules ['/evil']) that
    lorafuse's own readers (and so apply, combine, resize) refuse: it is refused first, naming the tensor."""
    base, ft = _checkpoints(tmp_path, odd)
    out = tmp_path / "lora"
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "1", "-o", str(out), "-q"])
    assert code == 1 and "Traceback" not in err, err
    assert "model.safetensors" in err and repr(odd)[1:-1] in err and "--exclude" in err, err
    assert not out.exists()


def test_an_adapter_saved_with_a_module_name_its_reader_refuses_is_not_written(tmp_path: Path) -> None:
    from lorafuse.errors import LorafuseError
    from lorafuse.io.tensor import Tensor
    from lorafuse.model import Adapter, LoraUpdate

    rng = np.random.default_rng(0)
    for name in ("x/y", "a..b", "", "model.\x1b[2Jq"):
        update = LoraUpdate(name, Tensor.from_array(rng.standard_normal((2, 6)).astype(np.float32)),
                            Tensor.from_array(rng.standard_normal((4, 2)).astype(np.float32)), 1.0)
        out = tmp_path / "out"
        with pytest.raises(LorafuseError, match="module name"):
            Adapter({name: update}).save(out, format="peft")
        assert not out.exists()
    good = LoraUpdate("model.q", Tensor.from_array(np.ones((2, 6), np.float32)),
                      Tensor.from_array(np.ones((4, 2), np.float32)), 1.0)
    Adapter({"model.q": good}).save(tmp_path / "good", format="peft")  # the control: a plain name is written
    got = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))
    assert np.array_equal(got["base_model.model.model.q.lora_B.weight"] @ got["base_model.model.model.q.lora_A.weight"],
                          np.full((4, 6), 2.0, np.float32))


# ----------------------------------------------------------------------------- adapter_config.json values PEFT refuses


@pytest.mark.parametrize("bias", ["some", None, "NONE", "", 0, ["none"]])
def test_an_adapter_config_bias_peft_cannot_load_is_refused(tmp_path: Path, bias: object) -> None:
    """PEFT loads bias 'none', 'all' and 'lora_only' alone (PeftModel.from_pretrained raises NotImplementedError
    'Requested bias: some, is not implemented.', AttributeError for null): lorafuse merged such an adapter silently."""
    base = llm_base(tmp_path / "base", SHAPES)
    ad = peft_folder(tmp_path / "ad", SHAPES, 1)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["bias"] = bias
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    for argv in (["apply", str(base), str(ad), "-o", str(out)], ["resize", str(ad), "--rank", "1", "-o", str(out)]):
        code, _, err = run_cli([*argv, "-q"])
        assert code == 1 and "adapter_config.json" in err and "'bias'" in err and "Traceback" not in err, err
        assert not out.exists()
    cfg["bias"] = "none"  # the control
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    assert run_cli(["apply", str(base), str(ad), "-o", str(out), "-q"])[0] == 0


@pytest.mark.parametrize("dropout", [2, 1.5, "0.1", None, [0.1]])
def test_an_adapter_config_lora_dropout_peft_cannot_load_is_refused(tmp_path: Path, dropout: object) -> None:
    """PEFT builds nn.Dropout(lora_dropout) where lora_dropout > 0: a value past 1 raises ValueError, a non-number
    TypeError, so PeftModel.from_pretrained cannot load the adapter; lorafuse merged it silently."""
    base = llm_base(tmp_path / "base", SHAPES)
    ad = peft_folder(tmp_path / "ad", SHAPES, 1)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    out = tmp_path / "out"
    cfg["lora_dropout"] = dropout
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["apply", str(base), str(ad), "-o", str(out), "-q"])
    assert code == 1 and "adapter_config.json" in err and "'lora_dropout'" in err and "Traceback" not in err, err
    assert not out.exists()
    for fine in (1, 0.05, -0.1):  # PEFT loads these (a value up to 0 is nn.Identity)
        cfg["lora_dropout"] = fine
        (ad / "adapter_config.json").write_text(json.dumps(cfg))
        assert run_cli(["apply", str(base), str(ad), "-o", str(out), "-q"])[0] == 0, fine
