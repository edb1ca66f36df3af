"""Small helpers the format writers share."""

from __future__ import annotations

import os
from pathlib import Path

from lorafuse.errors import FormatError
from lorafuse.io.safetensors import read_header
from lorafuse.model.arithmetic import most_common

__all__ = ["ORIGINAL_PREFIXES", "ORIGINAL_WHY", "most_common", "safetensors_keys"]

ORIGINAL_PREFIXES = ("diffusion_model.", "model.diffusion_model.")  # ComfyUI's: the original model's own paths
ORIGINAL_WHY = ("LoRA factors named after the original (non-diffusers) model with ComfyUI's diffusion_model. prefix, "
                "as ComfyUI, ai-toolkit and musubi-tuner write LoRAs of Flux, Flux.2, Wan, HunyuanVideo, LTX-Video, "
                "Qwen-Image, ...; lorafuse does not read that layout (it reads kohya lora_unet_... files and diffusers "
                "files named transformer.<module>...: diffusers' load_lora_weights converts this one to its names, "
                "and save_lora_weights writes those)")


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
