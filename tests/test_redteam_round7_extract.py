"""Red-team round 7, extract / resize: what `lorafuse extract` does with checkpoints that are not two plain
float32 models of one layout (a diffusers pipeline folder, an LDM single file, integer weight matrices, fused 3-D
expert parameters, a weight of no rows, NaN in a weight), each against an independent reference (numpy float64)
or the promise that every failure is one line naming the file, the module and the shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from peft_fixtures import peft_folder_delta
from redteam_fixtures import run_cli
from safetensors.numpy import load_file, save_file

import lorafuse

pytestmark = pytest.mark.filterwarnings("ignore")


def _pair(tmp: Path, base: dict[str, np.ndarray], ft: dict[str, np.ndarray], name: str = "model.safetensors",
          config: dict[str, object] | None = None) -> tuple[Path, Path]:
    """Two checkpoint folders (base/, ft/) holding `base` and `ft` in one file `name` each."""
    for d, t in (("base", base), ("ft", ft)):
        (tmp / d).mkdir()
        save_file(t, str(tmp / d / name))
        if config is not None:
            (tmp / d / "config.json").write_text(json.dumps(config))
    return tmp / "base", tmp / "ft"


def _one_line(err: str) -> str:
    err = err.strip()
    assert err.startswith("lorafuse extract: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _best_error(d: np.ndarray, k: int) -> float:
    """numpy float64: ||D - D_k||_F / ||D||_F of the best rank-k approximation."""
    s = np.linalg.svd(d.reshape(d.shape[0], -1).astype(np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2)))


# ----------------------------------------------------------------------------- 1. a diffusers pipeline folder


def _pipeline(folder: Path, seed: int) -> Path:
    """A diffusers pipeline folder: model_index.json, unet/ and text_encoder/ (weights of seed 5, plus noise of
    `seed` when seed > 0)."""
    rng, noise = np.random.default_rng(5), np.random.default_rng(seed)
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"]}))
    for sub, key, name in (("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                            "diffusion_pytorch_model.safetensors"),
                           ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj.weight",
                            "model.safetensors")):
        w = rng.standard_normal((8, 8)).astype(np.float32)
        if seed:
            w = w + noise.standard_normal((8, 8)).astype(np.float32)
        save_file({key: w}, str(folder / sub / name))
    return folder


def test_extract_of_a_pipeline_folder_says_to_give_a_component(tmp_path: Path) -> None:
    """A diffusers pipeline folder holds its weights in its components' folders: extract compares one model, and
    says so, naming the components (it said `no .safetensors checkpoint found`, which is false)."""
    base, ft = _pipeline(tmp_path / "base", 0), _pipeline(tmp_path / "ft", 1)
    out = tmp_path / "out"
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "2", "-o", str(out)])
    msg = _one_line(err)
    assert code == 1 and not out.exists()
    assert "pipeline" in msg and "model_index.json" in msg and "unet" in msg and "text_encoder" in msg, msg
    assert "no .safetensors checkpoint found" not in msg, msg
    # each component as the base and the fine-tune: the exact rank-2 approximation of the difference
    code, _, err = run_cli(["extract", str(base / "unet"), str(ft / "unet"), "--rank", "8", "-o", str(out), "-q"])
    assert code == 0, err
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    d = (load_file(str(ft / "unet/diffusion_pytorch_model.safetensors"))[key + ".weight"].astype(np.float64)
         - load_file(str(base / "unet/diffusion_pytorch_model.safetensors"))[key + ".weight"])
    np.testing.assert_allclose(peft_folder_delta(out, key), d, atol=1e-5 * np.abs(d).max())


# ----------------------------------------------------------------------------- 2. weight matrices not of floats


@pytest.mark.parametrize(("base_dtype", "ft_dtype"), [(np.float32, np.int8), (np.int8, np.float32),
                                                      (np.float32, np.uint8), (np.int8, np.int8)])
def test_an_integer_weight_matrix_is_left_out_saying_why(tmp_path: Path, base_dtype: type, ft_dtype: type) -> None:
    """A weight matrix stored as integers in either checkpoint (quantized codes without a config saying so) is no
    weight: the float modules are extracted, that one is left out with a note naming both dtypes. Before, an
    F32 base and I8 fine-tune ended in `DtypeError: unsupported dtype 'I8'` (no file, no module), and an I8 base
    was called `a bias or a norm`."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((16, 12)).astype(np.float32)
    dq = (rng.standard_normal((16, 2)) @ rng.standard_normal((2, 12))).astype(np.float32)
    codes = rng.integers(-50, 50, (16, 12))
    other = np.random.default_rng(1).integers(-50, 50, (16, 12))
    base, ft = _pair(tmp_path, {"m.q.weight": q, "m.k.weight": codes.astype(base_dtype)},
                     {"m.q.weight": q + dq, "m.k.weight": (codes if base_dtype == ft_dtype else other).astype(ft_dtype)
                      + (1 if base_dtype == ft_dtype else 0)})
    out = tmp_path / "out"
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "2", "-o", str(out)])
    assert code == 0, err
    assert "Traceback" not in err and "DtypeError" not in err, err
    names = {"int8": "I8", "uint8": "U8", "float32": "F32"}
    line = next((x for x in err.splitlines() if "m.k.weight" in x), "")
    assert names[np.dtype(base_dtype).name] in line and names[np.dtype(ft_dtype).name] in line, err
    assert "a bias or a norm" not in line, line
    assert {k.split(".lora_")[0] for k in load_file(str(out / "adapter_model.safetensors"))} == {"base_model.model.m.q"}
    np.testing.assert_allclose(peft_folder_delta(out, "m.q"), dq, atol=1e-5 * np.abs(dq).max())


# ----------------------------------------------------------------------------- 3. fused 3-D expert parameters


def test_a_changed_fused_expert_parameter_is_not_called_a_bias_or_a_norm(tmp_path: Path) -> None:
    """transformers 5's fused MoE experts (`mlp.experts.gate_up_proj`, 3-D, no `.weight`: GPT-OSS, Llama 4) are no
    bias or norm: the note says what it is (a LoRA of layers cannot hold it), and the refusal of a fine-tune that
    changed only them does not call them biases or norms either."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((16, 16)).astype(np.float32)
    experts = rng.standard_normal((4, 32, 16)).astype(np.float32)
    moved = experts + rng.standard_normal(experts.shape).astype(np.float32)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    base, ft = _pair(tmp_path, {"model.layers.0.self_attn.q_proj.weight": q, key: experts},
                     {"model.layers.0.self_attn.q_proj.weight": q + 1, key: moved})
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "1", "-o", str(tmp_path / "out")])
    assert code == 0, err
    line = next((x for x in err.splitlines() if key in x), "")
    assert "(4, 32, 16)" in line and "bias or a norm" not in line, err
    # only the experts changed: refused, not calling them biases or norms
    (tmp_path / "ft2").mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": q, key: moved}, str(tmp_path / "ft2/model.safetensors"))
    code, _, err = run_cli(["extract", str(base), str(tmp_path / "ft2"), "--rank", "1", "-o", str(tmp_path / "o2")])
    msg = _one_line(err)
    assert code == 1 and key in msg and "biases or norms" not in msg and not (tmp_path / "o2").exists(), msg


# ----------------------------------------------------------------------------- 4. a weight of no rows


@pytest.mark.parametrize("shape", [(0, 16), (0, 4, 3, 3), (16, 0), (4, 4, 0, 3)])
def test_a_weight_of_no_rows_or_columns_is_no_traceback(tmp_path: Path, shape: tuple[int, ...]) -> None:
    """A weight matrix with a dimension of 0 holds nothing to extract: the other modules are extracted (a weight of
    no rows ended in a traceback: `cannot reshape array of size 0`)."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((8, 8)).astype(np.float32)
    dq = np.outer(rng.standard_normal(8), rng.standard_normal(8)).astype(np.float32)
    empty = np.zeros(shape, np.float32)
    base, ft = _pair(tmp_path, {"m.q.weight": q, "m.z.weight": empty}, {"m.q.weight": q + dq, "m.z.weight": empty})
    out = tmp_path / "out"
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "2", "-o", str(out)])
    assert code == 0 and "Traceback" not in err, err
    np.testing.assert_allclose(peft_folder_delta(out, "m.q"), dq, atol=1e-5 * np.abs(dq).max())
    assert {k.split(".lora_")[0] for k in load_file(str(out / "adapter_model.safetensors"))} == {"base_model.model.m.q"}


# ----------------------------------------------------------------------------- 5. NaN in a weight


@pytest.mark.parametrize("n", [16, 300])  # the exact dense path, the streamed randomized one
def test_a_weight_holding_nan_names_the_checkpoints_and_the_shape(tmp_path: Path, n: int) -> None:
    """NaN in a weight is refused in one line that names the checkpoints and the weight's shape, not the module
    alone (`a.q: the base and the fine-tuned weight hold NaN or Inf`)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((n, 12)).astype(np.float32)
    f = w + rng.standard_normal(w.shape).astype(np.float32)
    f[1, 2] = np.nan
    base, ft = _pair(tmp_path, {"a.q.weight": w}, {"a.q.weight": f})
    out = tmp_path / "out"
    code, _, err = run_cli(["extract", str(base), str(ft), "--rank", "2", "-o", str(out)])
    msg = _one_line(err)
    assert code == 1 and not out.exists()
    assert "NonFiniteError" in msg and "a.q" in msg and str(ft) in msg and f"({n}, 12)" in msg, msg


# ----------------------------------------------------------------------------- 6. an LDM single file


def test_extract_of_ldm_single_files_is_exact(tmp_path: Path) -> None:
    """Two single-file SD checkpoints (`model.diffusion_model.` names) are model checkpoints, not kohya LoRAs:
    extract reads them and its PEFT adapter holds each difference (at full rank, exactly); apply merges it back."""
    rng = np.random.default_rng(6)
    shapes = {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (16, 16, 1, 1),
              "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (16, 8, 3, 3),
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (16, 16),
              "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (8, 8)}
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    ft = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    save_file(base, str(tmp_path / "sd.safetensors"))
    save_file(ft, str(tmp_path / "sd_ft.safetensors"))
    out = tmp_path / "out"
    code, _, err = run_cli(["extract", str(tmp_path / "sd.safetensors"), str(tmp_path / "sd_ft.safetensors"),
                            "--rank", "72", "-o", str(out), "-q"])
    assert code == 0, err
    for key in shapes:
        d = ft[key].astype(np.float64) - base[key]
        np.testing.assert_allclose(peft_folder_delta(out, key.removesuffix(".weight")), d.reshape(d.shape[0], -1),
                                   atol=1e-5 * np.abs(d).max(), err_msg=key)


# ----------------------------------------------------------------------------- 7. the error of a near-exact module


@pytest.mark.parametrize("scale", [1e-20, 1e30])
@pytest.mark.parametrize("n", [40, 300])  # the exact dense path, the streamed randomized one
def test_reported_error_of_a_near_exact_module_of_any_scale(tmp_path: Path, scale: float, n: int) -> None:
    """The relative error reported for a near-exact module is computed from D - B A: its squares summed in float32
    came out 0 for a delta of 1e-20 and Inf for one of 1e30 (the CLI printed `relative error mean inf`), where
    numpy float64 gives ~1e-7 for the written factors."""
    rng = np.random.default_rng(7)
    d = (rng.standard_normal((n, 2)) @ rng.standard_normal((2, n)) * scale).astype(np.float32)
    zeros = np.zeros((n, n), np.float32)
    base, ft = _pair(tmp_path, {"a.q.weight": zeros}, {"a.q.weight": d})
    r = lorafuse.extract(base, ft, rank=2, progress=False)
    u = r.adapter.updates["a.q"]
    true = float(np.linalg.norm(u.B.f32().astype(np.float64) @ u.A.f32().astype(np.float64) - d)
                 / np.linalg.norm(d.astype(np.float64)))
    assert 0 < true < 1e-5
    got = r.modules[0].rel_error
    assert np.isfinite(got) and 0.5 * true <= got <= 2 * true + 2e-7, (got, true)


# ----------------------------------------------------------------------------- 8. a transposed convolution


def test_transposed_convolutions_are_left_out_and_the_adapter_loads_in_peft(tmp_path: Path) -> None:
    """PEFT's LoRA has no layer for a ConvTranspose (a HiFi-GAN's upsampler): an adapter targeting one is refused by
    PEFT (`Target module ConvTranspose1d(...) is not supported`). extract leaves them out with a note, and PEFT
    loads the adapter and reproduces the fine-tune of every other convolution (numpy float64 reference)."""
    import torch
    from peft import PeftModel
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    torch.manual_seed(0)
    cfg = SpeechT5HifiGanConfig(model_in_dim=8, upsample_initial_channel=16, upsample_rates=[2, 2],
                                upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3],
                                resblock_dilation_sizes=[[1, 3]])
    model = SpeechT5HifiGan(cfg)
    model.save_pretrained(tmp_path / "base")
    before = {k: v.detach().double().numpy().copy() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ft")
    out = tmp_path / "out"
    code, _, err = run_cli(["extract", str(tmp_path / "base"), str(tmp_path / "ft"), "--rank", "48", "-o", str(out)])
    assert code == 0, err
    assert "upsampler.0.weight" in err and "ConvTranspose" in err, err
    cfg_out = json.loads((out / "adapter_config.json").read_text())
    assert not any(t.startswith("upsampler") for t in cfg_out["target_modules"]), cfg_out["target_modules"]
    loaded = PeftModel.from_pretrained(SpeechT5HifiGan.from_pretrained(tmp_path / "base"), str(out))
    for name, module in loaded.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            want = model.state_dict()[f"{name}.weight"].double().numpy() - before[f"{name}.weight"]
            got = module.get_delta_weight("default").detach().double().numpy()
            np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), err_msg=name)
