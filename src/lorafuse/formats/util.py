"""Small helpers the format writers share."""

from __future__ import annotations

import os
from pathlib import Path

from lorafuse.errors import FormatError
from lorafuse.io.safetensors import read_header
from lorafuse.model.arithmetic import most_common

__all__ = ["COMFY_TEXT_ENCODERS", "COMFY_TEXT_WHY", "ORIGINAL_PREFIXES", "ORIGINAL_WHY", "most_common",
           "safetensors_keys"]

ORIGINAL_PREFIXES = ("diffusion_model.", "model.diffusion_model.")  # ComfyUI's: the original model's own paths
ORIGINAL_WHY = ("named in ComfyUI's layout (diffusion_model. + the original model's module path, as ComfyUI, "
                "ai-toolkit and musubi-tuner write LoRAs of Flux, Wan, HunyuanVideo, ...) but not as a LoRA factor "
                "(lora_A.weight / lora_B.weight, lora_down.weight / lora_up.weight, alpha) nor a LyCORIS one; lorafuse "
                "reads those factors of that layout as kohya names (lora_unet_<path with _>), nothing else of it")

COMFY_TEXT_ENCODERS = "text_encoders."  # ComfyUI's text encoders: text_encoders.<name>.transformer.<module path>
COMFY_TEXT_WHY = ("ComfyUI's text-encoder LoRA layout (text_encoders.<clip_l|clip_g|t5xxl>.transformer.<path>), whose "
                  "LoRA / LyCORIS factors lorafuse reads as kohya's lora_te1_ / lora_te2_ / lora_te3_ names, nothing "
                  "else of it (no other text encoder's)")


def safetensors_keys(path: str | os.PathLike[str]) -> list[str]:
    """The tensor names of a readable `.safetensors` file (header only); [] for anything else."""
    p = Path(path)
    if not (p.is_file() and p.name.lower().endswith(".safetensors")):  # suffixes in any case
        return []
    try:
        tensors, _, _ = read_header(p)
    except FormatError:
        return []
    return list(tensors)
