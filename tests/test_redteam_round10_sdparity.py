"""Red-team round 10, SD parity: kohya / diffusers LoRAs of SD 1.x / 2.x / SDXL applied to single files and
pipeline folders and converted between namings. Each refusal must name the module and say why (the issue
tracker's standard); merged weights are checked against numpy float64 and diffusers' single-file converters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from redteam_fixtures import run_cli
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

pytestmark = pytest.mark.filterwarnings("ignore")

H = 8  # hidden size of the tiny text towers
TE2 = "conditioner.embedders.1.model."  # SDXL's OpenCLIP-G in a single file


def _one_line(err: str, verb: str) -> str:
    err = err.strip()
    assert err.startswith(f"lorafuse {verb}: error: ") and "Traceback" not in err, err
    return err


def _lora(name: str, out: int, inp: int, rng: np.random.Generator, kohya: bool) -> dict[str, np.ndarray]:
    a = rng.standard_normal((2, inp)).astype(np.float32)
    b = rng.standard_normal((out, 2)).astype(np.float32)
    if kohya:
        return {f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b, f"{name}.alpha": np.array(1.0, np.float32)}
    return {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b}


def _sdxl_single_file(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The SDXL single-file keys that matter here: a UNet layer, CLIP-L, and OpenCLIP-G (one resblock, its
    projection `text_projection` (hidden x projection) as open_clip stores it: x @ P)."""
    t = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (16, 16),
         "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (H, H),
         TE2 + "transformer.resblocks.0.attn.in_proj_weight": (3 * H, H),
         TE2 + "transformer.resblocks.0.attn.out_proj.weight": (H, H),
         TE2 + "ln_final.weight": (H,), TE2 + "text_projection": (H, H)}
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()}
    save_file(tensors, str(path))
    return tensors


# ------------------------------------------------------------ 1. text_projection of OpenCLIP-G in a single file

@pytest.mark.parametrize("name,kohya", [("lora_te2_text_projection", True),
                                        ("text_encoder_2.text_projection", False)])
def test_a_text_projection_lora_on_a_single_file_is_refused_saying_why(tmp_path: Path, name: str,
                                                                       kohya: bool) -> None:
    """A LoRA on SDXL's text_encoder_2.text_projection (a Linear layer in diffusers, which lorafuse merges into a
    pipeline folder) was refused on an SDXL single file with '1 adapter module found no target in the base',
    although the file holds that layer (open_clip's `text_projection`, stored transposed): the user was told the
    layer is missing. The refusal must name the module, the base key and the reason."""
    rng = np.random.default_rng(0)
    base = _sdxl_single_file(tmp_path / "sdxl.safetensors", rng)
    lora = _lora(name, H, H, rng, kohya)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    before = (tmp_path / "sdxl.safetensors").read_bytes()
    code, _, err = run_cli(["apply", str(tmp_path / "sdxl.safetensors"), str(tmp_path / "lora.safetensors"),
                            "-o", str(tmp_path / "out.safetensors")])
    assert code == 1 and not (tmp_path / "out.safetensors").exists()
    assert (tmp_path / "sdxl.safetensors").read_bytes() == before
    err = _one_line(err, "apply")
    assert repr(name) in err and repr(TE2 + "text_projection") in err, err
    assert "transposed" in err and "pipeline folder" in err, err
    assert base[TE2 + "text_projection"].shape == (H, H)


def test_the_same_text_projection_lora_merges_into_a_pipeline_folder(tmp_path: Path) -> None:
    """Parity for the refusal above: in a diffusers pipeline folder the projection is a Linear weight
    (projection x hidden, diffusers' single-file converter transposes open_clip's P into it), and the LoRA
    merges there as W + alpha / r * B @ A (float64 reference)."""
    rng = np.random.default_rng(1)
    _sdxl_single_file(tmp_path / "sdxl.safetensors", rng)
    cfg = CLIPTextConfig(hidden_size=H, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=20, max_position_embeddings=8, projection_dim=H)
    model = CLIPTextModelWithProjection(cfg)
    ckpt = {k: torch.from_numpy(v) for k, v in load_np(str(tmp_path / "sdxl.safetensors")).items()}
    ckpt.update({TE2 + k: torch.zeros(s) for k, s in (("token_embedding.weight", (20, H)),
                                                        ("positional_embedding", (8, H)), ("ln_final.bias", (H,)))})
    te2 = convert_open_clip_checkpoint(model, ckpt, prefix=TE2)  # diffusers' own reading of the single file
    w = te2["text_projection.weight"].numpy()
    assert np.array_equal(w, ckpt[TE2 + "text_projection"].numpy().T)
    pipe = tmp_path / "pipe"
    (pipe / "text_encoder_2").mkdir(parents=True)
    save_file({"text_projection.weight": w, "text_model.encoder.layers.0.self_attn.q_proj.weight":
               rng.standard_normal((H, H)).astype(np.float32)}, str(pipe / "text_encoder_2" / "model.safetensors"))
    (pipe / "text_encoder_2" / "config.json").write_text("{}")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2":
                                                       ["transformers", "CLIPTextModelWithProjection"]}))
    lora = _lora("lora_te2_text_projection", H, H, rng, kohya=True)
    lora["lora_te2_text_projection.alpha"] = np.array(3.0, np.float32)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    code, _, err = run_cli(["apply", str(pipe), str(tmp_path / "lora.safetensors"), "-o", str(tmp_path / "out")])
    assert code == 0, err
    got = load_np(str(tmp_path / "out" / "text_encoder_2" / "model.safetensors"))["text_projection.weight"]
    want = w.astype(np.float64) + 1.5 * (lora["lora_te2_text_projection.lora_up.weight"].astype(np.float64)
                                         @ lora["lora_te2_text_projection.lora_down.weight"].astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------ 2. convert: a family the names do not tell

def test_convert_of_a_lora_whose_family_is_ambiguous_names_the_option(tmp_path: Path) -> None:
    """A diffusers LoRA on layers that SD 1.x and SDXL both have (here one attention of down_blocks.1) cannot be
    converted to kohya names without the family (SD 1.x: lora_unet_down_blocks_1_..., SDXL:
    lora_unet_input_blocks_4_1_...). The refusal said 'name it explicitly' without saying how: it must name
    --family (and the Python keyword) and the candidates."""
    rng = np.random.default_rng(2)
    save_file(_lora("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 16, 16, rng, kohya=False),
              str(tmp_path / "lora.safetensors"))
    code, _, err = run_cli(["convert", str(tmp_path / "lora.safetensors"), "--to", "kohya",
                            "-o", str(tmp_path / "k.safetensors")])
    assert code != 0 and not (tmp_path / "k.safetensors").exists()
    err = _one_line(err, "convert")
    assert "lora.safetensors" in err and "sd1, sdxl" in err, err
    assert "--family sd1" in err and "--family sdxl" in err and "family=" in err, err
    # and following the advice works, with the names of the family named
    code, _, err = run_cli(["convert", str(tmp_path / "lora.safetensors"), "--to", "kohya", "--family", "sdxl",
                            "-o", str(tmp_path / "k.safetensors")])
    assert code == 0, err
    assert set(load_np(str(tmp_path / "k.safetensors"))) == {
        f"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.{s}"
        for s in ("lora_down.weight", "lora_up.weight", "alpha")}


# ------------------------------------------------------------ 3. old attention-processor files without `unet.`

def test_an_old_unprefixed_attention_processor_file_is_refused_for_what_it_is(tmp_path: Path) -> None:
    """diffusers <= 0.14's save_attn_procs wrote a UNet LoRA as `<attention>.processor.to_q_lora.down.weight`,
    with no `unet.` prefix (pytorch_lora_weights of 2023 DreamBooth / text-to-image LoRAs). lorafuse refused it
    saying it was written by `save_lora_adapter` and to save it again with `save_lora_weights`: false (and no
    help to whoever downloaded the file). The refusal must say what the file is and what to do: these keys are
    the UNet's; with a `unet.` prefix lorafuse (and diffusers) read them."""
    rng = np.random.default_rng(3)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    lora = {}
    for proj in ("to_q", "to_k", "to_v", "to_out"):
        lora[f"{attn}.processor.{proj}_lora.down.weight"] = rng.standard_normal((4, 32)).astype(np.float32)
        lora[f"{attn}.processor.{proj}_lora.up.weight"] = rng.standard_normal((32, 4)).astype(np.float32)
    save_file(lora, str(tmp_path / "pytorch_lora_weights.safetensors"))
    code, _, err = run_cli(["convert", str(tmp_path / "pytorch_lora_weights.safetensors"), "--to", "kohya",
                            "-o", str(tmp_path / "k.safetensors")])
    assert code != 0 and not (tmp_path / "k.safetensors").exists()
    err = _one_line(err, "convert")
    assert "save_lora_adapter" not in err and "save_attn_procs" in err and "'unet.'" in err, err

    # the advice holds: prefixed, the file is read as the UNet's LoRA, with scale 1 (no alphas in the file)
    save_file({"unet." + k: v for k, v in lora.items()}, str(tmp_path / "prefixed.safetensors"))
    code, _, err = run_cli(["convert", str(tmp_path / "prefixed.safetensors"), "--to", "kohya", "--family", "sd1",
                            "-o", str(tmp_path / "k.safetensors")])
    assert code == 0, err
    k = load_np(str(tmp_path / "k.safetensors"))
    name = "lora_unet_" + attn.replace(".", "_") + "_to_out_0"
    got = (k[name + ".lora_up.weight"].astype(np.float64) @ k[name + ".lora_down.weight"].astype(np.float64)
           * (float(k[name + ".alpha"]) / 4))
    want = (lora[f"{attn}.processor.to_out_lora.up.weight"].astype(np.float64)
            @ lora[f"{attn}.processor.to_out_lora.down.weight"].astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-6)
