"""Flux.1 or Flux.2: which family's diffusers names a Flux-worded LoRA module takes, for convert.

Flux.2 (`Flux2Transformer2DModel`) LoRAs are written under Flux.1's words (kohya / musubi-tuner
`lora_unet_double_blocks_0_img_attn_qkv`, ComfyUI / ai-toolkit `diffusion_model.double_blocks.0.img_attn.qkv`).
Some layers are the same layer under the same diffusers name in both (their attention, `img_in`, `txt_in`,
`final_layer`): formats.flux_keys names them. Others keep the word and change the diffusers layer, which diffusers'
Flux.2 converters (`_convert_non_diffusers_flux2_lora_to_diffusers`, `_convert_kohya_flux2_lora_to_diffusers`) name
as formats.dit_keys.FLUX2 does: the MLP-bearing layers (`img_mlp.0` -> `ff.linear_in`, `linear1` ->
`attn.to_qkv_mlp_proj`: other widths, told apart by their shape) and the embedders (`time_in.in_layer` ->
`time_guidance_embed.timestep_embedder.linear_1` where Flux.1 has `time_text_embed...`: same shape, so only a layer
one family alone has, or the user, tells). Flux.1's modulation layers (`img_mod.lin`, `modulation.lin`) and
`vector_in` are Flux.1's alone, the shared modulation layers (`single_stream_modulation.lin`) Flux.2's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from lorafuse.errors import UnsupportedError
from lorafuse.formats import flux_keys
from lorafuse.formats.dit_keys import FLUX2

Shape = tuple[int, ...]
Rows = tuple[int, int]
Evidence = Literal["flux", "flux2", "either", "differs"]
# either: the same diffusers layer in both families; differs: the same kohya word, another diffusers layer, same shape

# Flux.1 layers that are Flux.2's under the same diffusers names (BFL paths; in a double block, or outside blocks)
_SHARED_DOUBLE = frozenset({"img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj"})
_SHARED_OUTSIDE = frozenset({"img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1"})
# (out, in) of the MLP-bearing layers in units of the hidden size: Flux.1 (MLP ratio 4) and Flux.2 (SwiGLU, ratio 3)
_WIDTHS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "img_mlp.0": ((4, 1), (6, 1)), "txt_mlp.0": ((4, 1), (6, 1)),
    "img_mlp.2": ((1, 4), (1, 3)), "txt_mlp.2": ((1, 4), (1, 3)),
    "linear1": ((7, 1), (9, 1)), "linear2": ((1, 5), (1, 4)),
}
COMPONENT = flux_keys.DIFFUSERS_COMPONENT


def _in_block(bfl: str) -> tuple[str | None, str]:
    """(block list, path inside the block) of a BFL path; (None, path) outside blocks."""
    parts = bfl.split(".")
    if len(parts) > 2 and parts[0] in ("double_blocks", "single_blocks") and parts[1].isdigit():
        return parts[0], ".".join(parts[2:])
    return None, bfl


def _fits(widths: tuple[int, int], shape: Shape) -> bool:
    if len(shape) != 2 and not (len(shape) == 4 and tuple(shape[2:]) == (1, 1)):
        return False
    (w_out, w_in), (out, fan_in) = widths, (int(shape[0]), int(shape[1]))
    return out * w_in == fan_in * w_out


def _shared(bfl: str) -> bool:
    block, rest = _in_block(bfl)
    return rest in _SHARED_DOUBLE if block == "double_blocks" else block is None and rest in _SHARED_OUTSIDE


def _flux2_path(name: str) -> str | None:
    """Flux.2's diffusers path of a kohya-spelled module (`lora_unet_double_blocks_0_img_mlp_0`) from dit_keys.FLUX2."""
    if not name.startswith(flux_keys.KOHYA_PREFIX):
        return None
    return FLUX2.diffusers_path(name[len(flux_keys.KOHYA_PREFIX):])


def kohya_evidence(name: str, shape: Shape) -> Evidence | None:
    """What a kohya module (ComfyUI files are read under these names) says of the family: 'flux' / 'flux2' for a layer
    (or a width) one family alone has, 'either' for a layer both name alike, 'differs' for a layer both have under
    other diffusers names and one shape; None for a name neither family has (or a width neither has)."""
    f2 = _flux2_path(name)
    if flux_keys.is_alias(name):
        return None
    bfl = flux_keys.bfl_module(name) if flux_keys.kohya_module(name) == name else None
    if bfl is None:
        return "flux2" if f2 is not None else None
    if _shared(bfl):
        return "either"
    rest = _in_block(bfl)[1]
    if rest in _WIDTHS:
        one, two = _WIDTHS[rest]
        return "flux" if _fits(one, shape) else "flux2" if _fits(two, shape) else None
    return "differs" if f2 is not None else "flux"


def diffusers_evidence(name: str) -> Evidence | None:
    """What a diffusers module name (`transformer.<path>`) says of the family: 'flux2' for a layer Flux.2 alone names
    so (`ff.linear_in`, `attn.to_qkv_mlp_proj`, `time_guidance_embed...`), 'either' for a Flux.1 name of a layer both
    have alike, 'flux' for another Flux.1 name; None otherwise."""
    if not name.startswith(COMPONENT + "."):
        return None
    if FLUX2.original_path(name[len(COMPONENT) + 1:]) is not None:
        return "flux2"
    if not flux_keys.is_flux_module(name) or flux_keys.kohya_module(name) == name:
        return None
    bfl = flux_keys.bfl_module(name)
    return None if bfl is None else "either" if _shared(bfl) else "flux"


def to_diffusers(module: str, shape: Shape, *, family: str | None = None) -> list[tuple[str, Rows | None]]:
    """Flux.2's diffusers modules for a kohya module, with the rows of its delta each takes (sd_keys.to_diffusers's
    form): the layers Flux.1 has alike through flux_keys (q | k | v split, the final (shift | scale) halves swapped),
    the others through dit_keys.FLUX2. A diffusers name Flux.2 has gives itself. Raises UnsupportedError for a layer
    Flux.2 has not (Flux.1's modulation, its MLP widths, another model's)."""
    evidence = diffusers_evidence(module)
    if evidence in ("flux2", "either"):
        return [(module, None)]
    evidence = kohya_evidence(module, shape)
    if evidence == "either":
        return flux_keys.to_diffusers(module, shape)
    path = _flux2_path(module) if evidence in ("flux2", "differs") else None
    if path is None:
        raise UnsupportedError(f"module {module!r} {tuple(shape)} is no layer of Flux.2 (Flux.1's modulation, MLP "
                               "widths or vector_in, or another model's)")
    return [(f"{COMPONENT}.{path}", None)]


def _split(modules: Mapping[str, Shape]) -> tuple[dict[str, Shape], dict[str, str]]:
    """(the Flux.1-named modules of layers Flux.2 has alike, Flux.2's own diffusers module -> its kohya name);
    UnsupportedError for any other module."""
    shared: dict[str, Shape] = {}
    own: dict[str, str] = {}
    for name, shape in modules.items():
        evidence = diffusers_evidence(name)
        if evidence == "either":
            shared[name] = shape
        elif evidence == "flux2":
            path = FLUX2.original_path(name[len(COMPONENT) + 1:])
            assert path is not None
            own[name] = flux_keys.KOHYA_PREFIX + path.replace(".", "_")
        else:
            raise UnsupportedError(f"module {name!r} {tuple(shape)} is no diffusers layer of Flux.2 "
                                   "(Flux2Transformer2DModel)")
    return shared, own


def to_kohya(modules: Mapping[str, Shape], family: str = "flux2") -> dict[str, list[tuple[str, Rows | None]]]:
    """kohya module -> the diffusers-named Flux.2 modules it is made of (flux_keys.to_kohya's form)."""
    shared, own = _split(modules)
    out = flux_keys.to_kohya(shared, "flux") if shared else {}
    for name, kohya in own.items():
        if kohya in out:  # pragma: no cover - the tables name no layer twice
            raise UnsupportedError(f"modules {out[kohya][0][0]!r} and {name!r} both have the kohya name {kohya!r}")
        out[kohya] = [(name, None)]
    return out


def to_kohya_shapes(modules: Mapping[str, Shape], family: str = "flux2") -> dict[str, tuple[int, int]]:
    """kohya module -> (out, in) of its delta, for the fused layers (attention q | k | v given in part)."""
    shared, _ = _split(modules)
    return flux_keys.to_kohya_shapes(shared, "flux") if shared else {}


__all__ = ["Evidence", "diffusers_evidence", "kohya_evidence", "to_diffusers", "to_kohya", "to_kohya_shapes"]
