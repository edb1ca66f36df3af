"""Tiny diffusers / transformers models with the real block structures, their single-file
(LDM / OpenCLIP) checkpoints and kohya names: shared by the SD naming and diffusion apply tests."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file as save_torch_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from lorafuse.formats.sd_keys import (
    unet_diffusers_path,
    unet_ldm_path,
)

Shapes = dict[str, tuple[int, ...]]


M = TypeVar("M", bound=torch.nn.Module)


HIDDEN = 8


def _unet(family: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=4,
                  cross_attention_dim=8, attention_head_dim=2)
    if family == "sd1":  # 4 levels, attention on the first three, 1x1 conv proj_in / proj_out
        return UNet2DConditionModel(block_out_channels=(8, 16, 16, 16),
                                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **common)
    # SDXL: 3 levels, no attention on the first, transformer depth > 1, linear proj, text_time embedding
    return UNet2DConditionModel(block_out_channels=(8, 16, 16),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=4 * 6 + 8, **common)


def _clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=HIDDEN, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                          vocab_size=20, max_position_embeddings=8, projection_dim=HIDDEN, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1)


def _randomized(model: M, seed: int) -> M:
    """Every parameter drawn anew, so that no two weights are equal and a tensor identifies its key."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _layers(model: torch.nn.Module) -> Shapes:
    """Every LoRA-targetable layer (Linear, Conv2d) -> its weight shape."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _hf_clip(name: str) -> str:
    """transformers' CLIP module path with `text_model.` (transformers 5 drops it from CLIPTextModel)."""
    return name if name.startswith(("text_model.", "text_projection")) else "text_model." + name


def _weights(model: torch.nn.Module, rename: Callable[[str], str] = lambda k: k) -> dict[str, torch.Tensor]:
    return {rename(k): v for k, v in model.state_dict().items()}


def _ldm_unet(unet: UNet2DConditionModel, family: str) -> dict[str, torch.Tensor]:
    """The UNet's state dict under LDM keys, written with sd_keys' map (module path + parameter name)."""
    out = {}
    for key, value in unet.state_dict().items():
        module, param = key.rsplit(".", 1)
        ldm = unet_ldm_path(module, family)
        assert ldm is not None, f"{family}: no LDM name for {module}"
        assert unet_diffusers_path(ldm, family) == module
        out[f"model.diffusion_model.{ldm}.{param}"] = value
    return out


def _openclip_ldm(model: CLIPTextModelWithProjection, prefix: str) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower in open_clip's own layout (fused in_proj, c_fc/c_proj, ln_*), random values."""
    g = torch.Generator().manual_seed(4)
    h, f = HIDDEN, 16
    shapes: Shapes = {"token_embedding.weight": (20, h), "positional_embedding": (8, h), "ln_final.weight": (h,),
                      "ln_final.bias": (h,), "text_projection": (h, h)}
    for i in range(model.config.num_hidden_layers):
        r = f"transformer.resblocks.{i}."
        shapes.update({r + "attn.in_proj_weight": (3 * h, h), r + "attn.in_proj_bias": (3 * h,),
                       r + "attn.out_proj.weight": (h, h), r + "attn.out_proj.bias": (h,),
                       r + "ln_1.weight": (h,), r + "ln_1.bias": (h,), r + "ln_2.weight": (h,), r + "ln_2.bias": (h,),
                       r + "mlp.c_fc.weight": (f, h), r + "mlp.c_fc.bias": (f,),
                       r + "mlp.c_proj.weight": (h, f), r + "mlp.c_proj.bias": (h,)})
    return {prefix + k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _kohya_unet_name(path: str, family: str, naming: str) -> str:
    ldm = unet_ldm_path(path, family) if naming == "ldm" else path
    assert ldm is not None
    return "lora_unet_" + ldm.replace(".", "_")


def _single_file(family: str, unets, clip_l, clip_g, openclip: bool) -> dict[str, torch.Tensor]:
    """An LDM / SGM single-file checkpoint: UNet, text encoder(s) and a few VAE weights."""
    tensors = _ldm_unet(unets[family], family)
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    clip_prefix = "cond_stage_model.transformer." if family == "sd1" else "conditioner.embedders.0.transformer."
    if family == "sd1" and openclip:  # SD 2.x: OpenCLIP-H is the only text encoder
        tensors.update(_openclip_ldm(clip_g, "cond_stage_model.model."))
    else:
        tensors.update(_weights(clip_l, lambda k: clip_prefix + _hf_clip(k)))
    if family == "sdxl":
        tensors.update(_openclip_ldm(clip_g, "conditioner.embedders.1.model."))
    return tensors


def _reference(family: str, tensors: dict[str, torch.Tensor], components, openclip: bool):
    """The tensor each diffusers module's weight has in `tensors`, by diffusers' own converters (single files)
    or directly (folders)."""
    if "unet/conv_in.weight" in tensors:
        ref = {k.replace("/", ".", 1): v for k, v in tensors.items()}
        ref.update({"text_encoder." + _hf_clip(k[len("text_encoder/"):]): v for k, v in tensors.items()
                    if k.startswith("text_encoder/")})
        return ref
    unet = convert_ldm_unet_checkpoint(tensors, dict(components["unet"].config))
    ref = {"unet." + k: v for k, v in unet.items()}
    if family == "sd1" and openclip:
        te = convert_open_clip_checkpoint(components["text_encoder_2"], tensors, prefix="cond_stage_model.model.")
        ref.update({"text_encoder." + k: v for k, v in te.items()})
    else:
        ref.update({"text_encoder." + k: v for k, v in convert_ldm_clip_checkpoint(tensors).items()})
    if family == "sdxl":
        te2 = convert_open_clip_checkpoint(components["text_encoder_2"], tensors,
                                           prefix="conditioner.embedders.1.model.")
        ref.update({"text_encoder_2." + k: v for k, v in te2.items()})
    return ref


def tiny_flux2() -> torch.nn.Module:
    """A Flux.2 transformer of one double and one single block, hidden 16 (seed 0), in eval mode."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                   timestep_guidance_channels=8, axes_dims_rope=(2, 2, 2, 2)).eval()


def kohya_unet_lora(modules: Mapping[str, tuple[int, int]], seed: int = 1, alpha: float = 2.0,
                    rank: int = 4) -> dict[str, torch.Tensor]:
    """A kohya LoRA's tensors (`lora_unet_<module>.lora_down / lora_up / alpha`) for modules -> (out, in), factors
    from torch.randn of a generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for m, (o, i) in modules.items():
        out[f"lora_unet_{m}.lora_down.weight"] = torch.randn(rank, i, generator=g)
        out[f"lora_unet_{m}.lora_up.weight"] = torch.randn(o, rank, generator=g)
        out[f"lora_unet_{m}.alpha"] = torch.tensor(alpha)
    return out


def lora_file(path: Path, factors: Mapping[str, tuple[np.ndarray, ...]], prefix: str,
              names: tuple[str, str] = ("lora_A.weight", "lora_B.weight"), alpha: float | None = None) -> Path:
    """A LoRA file of `factors` (module -> (A, B)) under `prefix` + module + names (and `.alpha` where given)."""
    tensors: dict[str, torch.Tensor] = {}
    for m, (a, b) in factors.items():
        tensors[f"{prefix}{m}.{names[0]}"] = torch.from_numpy(a)
        tensors[f"{prefix}{m}.{names[1]}"] = torch.from_numpy(b)
        if alpha is not None:
            tensors[f"{prefix}{m}.alpha"] = torch.tensor(alpha)
    save_torch_file(tensors, str(path))
    return path
