"""Wan 2.1 / 2.2 LoRA names for convert (`--family wan`): kohya <-> diffusers, layer for layer (no fused layers).

musubi-tuner writes Wan LoRAs as kohya names of the original model's paths (`lora_unet_blocks_0_self_attn_q`), ComfyUI
/ ai-toolkit as `diffusion_model.blocks.0.self_attn.q.lora_A.weight` (read as the same kohya names); diffusers' Wan
loader reads both (`_convert_musubi_wan_lora_to_diffusers`, `_convert_non_diffusers_wan_lora_to_diffusers`) into the
names of formats.dit_keys.WAN (`blocks.0.attn1.to_q`), and reads its own (`transformer.blocks.0.attn1.to_q`). The
original names are not Wan's alone (other DiTs name `blocks.N.self_attn.q` too), so convert takes them as Wan's only
when told (`--family wan`). Functions take sd_keys' arguments (formats.sd_keys.to_diffusers / to_kohya).
"""

from __future__ import annotations

from collections.abc import Mapping

from lorafuse.errors import UnsupportedError
from lorafuse.formats.dit_keys import WAN

Shape = tuple[int, ...]
Rows = tuple[int, int]
KOHYA_PREFIX = "lora_unet_"
COMPONENT = "transformer"


def diffusers_path(name: str) -> str | None:
    """The Wan diffusers path of a kohya module (`lora_unet_blocks_0_self_attn_q` -> `blocks.0.attn1.to_q`), or of
    a diffusers one Wan has (`transformer.blocks.0.attn1.to_q`); None for a name that is no layer of Wan's tables."""
    if name.startswith(KOHYA_PREFIX):  # musubi-tuner's / ComfyUI's original paths, or ai-toolkit's diffusers ones
        spelled = name[len(KOHYA_PREFIX):]
        return WAN.diffusers_path(spelled) or WAN.spelled_diffusers_path(spelled)
    if name.startswith(COMPONENT + ".") and WAN.original_path(name[len(COMPONENT) + 1:]) is not None:
        return name[len(COMPONENT) + 1:]
    return None


def to_diffusers(module: str, shape: Shape, *, family: str | None = None) -> list[tuple[str, Rows | None]]:
    """The diffusers module (`transformer.<path>`) of a Wan module, all its rows; UnsupportedError for another name."""
    path = diffusers_path(module)
    if path is None:
        raise UnsupportedError(f"module {module!r} {tuple(shape)} is no layer of Wan 2.1 / 2.2 (WanTransformer3DModel) "
                               "that lorafuse names")
    return [(f"{COMPONENT}.{path}", None)]


def to_kohya(modules: Mapping[str, Shape], family: str = "wan") -> dict[str, list[tuple[str, Rows | None]]]:
    """kohya module (musubi-tuner's `lora_unet_blocks_0_self_attn_q`) -> the diffusers-named Wan module it is."""
    out: dict[str, list[tuple[str, Rows | None]]] = {}
    for name, shape in modules.items():
        original = None
        if name.startswith(COMPONENT + "."):
            original = WAN.original_path(name[len(COMPONENT) + 1:])
        if original is None:
            raise UnsupportedError(f"module {name!r} {tuple(shape)} is no diffusers layer of Wan 2.1 / 2.2 "
                                   "(WanTransformer3DModel) that lorafuse names")
        out[KOHYA_PREFIX + original.replace(".", "_")] = [(name, None)]
    return out


def to_kohya_shapes(modules: Mapping[str, Shape], family: str = "wan") -> dict[str, tuple[int, int]]:
    """No fused layer: no kohya delta's shape differs from its one module's."""
    return {}


__all__ = ["diffusers_path", "to_diffusers", "to_kohya", "to_kohya_shapes"]
