"""What a red-team found in `apply` on the bases people use, each on files this test writes: an FP8 block size
larger than the weight (gigabytes allocated for a small weight, or a traceback), an FP8 scale of the wrong
shape, a huge FP8 scale (numpy's warning on stderr), a LoRA on an integer weight (a dry run that passed and a
run that failed without naming the tensor), a module whose name spells two base weights, and a pipeline
component that holds only a pickle."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

from lorafuse.cli import main

R = 2


def _lora(folder: Path, module: str, rows: int, cols: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_file({f"base_model.model.{module}.lora_A.weight": torch.randn(R, cols, generator=g),
               f"base_model.model.{module}.lora_B.weight": torch.randn(rows, R, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": R,
                                                            "target_modules": [module.rsplit(".", 1)[-1]]}))
    return folder


def _kohya(path: Path, module: str) -> Path:
    """A kohya-style LoRA of one 4 x 4 module (rank R, alpha R)."""
    save_np({f"{module}.lora_down.weight": np.ones((R, 4), np.float32),
             f"{module}.lora_up.weight": np.ones((4, R), np.float32), f"{module}.alpha": np.array(R, np.float32)},
            str(path))
    return path


def _fp8_base(folder: Path, block: list[int], scale_shape: tuple[int, ...] | None = None,
              scale: float | None = None) -> tuple[torch.Tensor, float]:
    folder.mkdir(parents=True)
    w = torch.randn(24, 20, generator=torch.Generator().manual_seed(3))
    s = float(w.abs().max() / 448)
    codes = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = s if scale is None else scale  # a scale the codes were not made with: only its size matters
    save_file({"model.q_proj.weight": codes, "model.q_proj.weight_scale_inv": torch.full(scale_shape or (1, 1), s)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": block}}))
    return codes, s


@pytest.mark.parametrize("block", [[2**31, 2**40], [10**30, 8], [64, 64]])
def test_an_fp8_block_larger_than_the_weight_covers_it_whole(tmp_path, block):
    """A block larger than the weight is one block over it: the merge equals the float64 reference, in bounded
    memory (the old code padded the weight to the block's size: 192 GiB for 2**31 rows)."""
    grid = (1, 1) if block[1] > 20 else (1, 3)
    codes, s = _fp8_base(tmp_path / "base", block, grid)
    lora = _lora(tmp_path / "lora", "model.q_proj", 24, 20)
    script = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({2 << 30}, {2 << 30})); "
              "from lorafuse.cli import main; sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, "-c", script, "apply", str(tmp_path / "base"), str(lora), "--dtype", "fp32",
                          "-o", str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["model.q_proj.weight"].double().numpy()
    ad = load_file(str(lora / "adapter_model.safetensors"))
    b = ad["base_model.model.model.q_proj.lora_B.weight"].double().numpy()
    a = ad["base_model.model.model.q_proj.lora_A.weight"].double().numpy()
    want = codes.double().numpy() * s + b @ a
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 2 << 20  # KiB: well under 2 GiB


def test_an_fp8_scale_of_another_shape_is_refused_and_a_huge_one_warns_nothing(tmp_path, capsys):
    lora = _lora(tmp_path / "lora", "model.q_proj", 24, 20)
    _fp8_base(tmp_path / "flat", [8, 8], (9,))  # the grid is (3, 3): a flat scale's layout is a guess
    assert main(["apply", str(tmp_path / "flat"), str(lora), "-o", str(tmp_path / "o1")]) == 1
    err = capsys.readouterr().err
    assert "its scale has shape [9]; a 24x20 weight in blocks of 8x8 needs [3, 3]" in err, err
    _fp8_base(tmp_path / "lead", [8, 8], (1, 3, 3))  # the grid with a leading 1: the same layout, accepted
    assert main(["apply", str(tmp_path / "lead"), str(lora), "-o", str(tmp_path / "o2"), "-q"]) == 0
    _fp8_base(tmp_path / "huge", [8, 8], (3, 3), scale=1e38)
    res = subprocess.run([sys.executable, "-m", "lorafuse.cli", "apply", str(tmp_path / "huge"), str(lora), "--dtype",
                          "bf16", "-o", str(tmp_path / "o3")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "NonFiniteError" in res.stderr
    assert "RuntimeWarning" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.int8])
def test_a_lora_on_a_non_float_weight_is_refused_by_the_dry_run_too(tmp_path, capsys, dtype):
    base = tmp_path / "base.safetensors"
    save_np({"model.q_proj.weight": np.ones((8, 8), dtype=dtype)}, str(base))
    lora = _lora(tmp_path / "lora", "model.q_proj", 8, 8)
    for extra in (["--dry-run"], []):
        assert main(["apply", str(base), str(lora), "-o", str(tmp_path / "out.safetensors"), *extra]) == 1
        err = capsys.readouterr().err
        assert "DtypeError" in err and f"{base}: model.q_proj.weight is" in err and str(lora) in err, err
    assert not (tmp_path / "out.safetensors").exists()


def test_a_module_whose_name_spells_two_weights_is_called_ambiguous(tmp_path, capsys):
    base = tmp_path / "base.safetensors"
    save_np({"model.blk_0.proj.weight": np.ones((4, 4), np.float32),
             "model.blk.0_proj.weight": np.ones((4, 4), np.float32)}, str(base))
    lora = _kohya(tmp_path / "l.safetensors", "lycoris_model_blk_0_proj")
    assert main(["apply", str(base), str(lora), "-o", str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "ambiguous" in err and "'model.blk.0_proj.weight', 'model.blk_0.proj.weight'" in err


def test_a_pipeline_component_holding_only_a_pickle_is_named(tmp_path, capsys):
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "text_encoder").mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "text_encoder": ["transformers", "CLIPTextModel"]}))
    (pipe / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    save_np({"text_model.embeddings.position_ids": np.zeros((1, 4), np.int64)},
            str(pipe / "text_encoder" / "model.safetensors"))
    lora = _kohya(tmp_path / "l.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in")
    assert main(["apply", str(pipe), str(lora), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "not read: unet/diffusion_pytorch_model.bin is a pickle checkpoint" in err, err
    assert main(["info", str(pipe)]) == 0
    assert "unet: not read: unet/diffusion_pytorch_model.bin" in capsys.readouterr().out
