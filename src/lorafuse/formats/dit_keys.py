"""Original module names of diffusion transformers whose diffusers names differ, layer for layer (no fused layers).

LoRAs of these models are trained on the original code's modules: musubi-tuner writes them as kohya names
(`lora_unet_blocks_0_self_attn_q`), ComfyUI / ai-toolkit as `diffusion_model.blocks.0.self_attn.q.lora_A.weight`
(read as the same kohya names: formats.kohya.original_key). Onto a checkpoint in the original layout they land
by name (ops.match.UnderscoreNames); onto a diffusers transformer (`transformer/` of a pipeline folder, or a file of
that one model) through the tables here, which follow diffusers 0.42's own converters; diffusers LoRA names of
these models (`transformer.blocks.0.attn1.to_q`) land on an original / ComfyUI checkpoint through the same tables:

* Wan 2.1 / 2.2 (`WanTransformer3DModel`; `_convert_non_diffusers_wan_lora_to_diffusers`,
  `_convert_musubi_wan_lora_to_diffusers`): `blocks.{i}.self_attn.q` -> `blocks.{i}.attn1.to_q`, ...
* Flux.2 (`Flux2Transformer2DModel`; `_convert_non_diffusers_flux2_lora_to_diffusers`): the layers that Flux.1's
  diffusers names (formats.flux_keys) miss, `double_blocks.{i}.img_mlp.0` -> `transformer_blocks.{i}.ff.linear_in`, ...
* Lumina 2 (`Lumina2Transformer2DModel`; `_convert_non_diffusers_lumina2_lora_to_diffusers`): `layers.{i}.attention
  .out` -> `layers.{i}.attn.to_out.0`, ..., and its fused `attention.qkv` onto `to_q` | `to_k` | `to_v` (apply only).

A family's table is used only on a checkpoint that has the family's signature weight (a layer no other diffusers
transformer names so), and a name is looked up whole in the table, never split on `_`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class Family:
    """One model's original -> diffusers module paths (dotted), per block list and outside blocks."""

    name: str
    signature: str  # a diffusers weight path only this family's transformer has
    original_signature: str  # a weight path only this family's original (single-file / ComfyUI) checkpoint has
    blocks: Mapping[str, tuple[str, Mapping[str, str]]]  # original block list -> (diffusers list, path in a block)
    outside: Mapping[str, str]  # original path of a layer outside the blocks -> diffusers path
    # fused layer in a block (original path) -> the diffusers layers it is made of, in row order, each with the rows of
    # the checkpoint's weight of it (Lumina 2's `attention.qkv`: q | k | v of grouped-query attention, no equal thirds)
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @cached_property
    def _block(self) -> re.Pattern[str]:
        lists = "|".join(re.escape(b.replace(".", "_")) for b in self.blocks)
        return re.compile(rf"^({lists})_(0|[1-9][0-9]*)_(.+)$")

    @cached_property
    def _in_block_us(self) -> dict[tuple[str, str], str]:
        return {(b.replace(".", "_"), k.replace(".", "_")): f"{dif}.{{}}.{v}"
                for b, (dif, table) in self.blocks.items() for k, v in table.items()}

    @cached_property
    def _outside_us(self) -> dict[str, str]:
        return {k.replace(".", "_"): v for k, v in self.outside.items()}

    def diffusers_path(self, spelled: str) -> str | None:
        """The diffusers path of a layer spelled as kohya names spell the original path (`blocks_0_self_attn_q`
        -> `blocks.0.attn1.to_q`); None for a name the table does not have."""
        m = self._block.match(spelled)
        if m is not None:
            form = self._in_block_us.get((m.group(1), m.group(3)))
            return None if form is None else form.format(m.group(2))
        return self._outside_us.get(spelled)

    @cached_property
    def _fused_us(self) -> dict[tuple[str, str], tuple[str, ...]]:
        return {(b.replace(".", "_"), k.replace(".", "_")): tuple(f"{dif}.{{}}.{v}" for v in parts)
                for b, (dif, _) in self.blocks.items() for k, parts in self.fused.items()}

    def fused_parts(self, spelled: str) -> tuple[str, ...]:
        """The diffusers paths, in row order, of a fused layer spelled as kohya names spell the original path
        (`layers_0_attention_qkv` -> `layers.0.attn.to_q`, `.to_k`, `.to_v`); () for any other name."""
        m = self._block.match(spelled)
        forms = None if m is None else self._fused_us.get((m.group(1), m.group(3)))
        return () if forms is None or m is None else tuple(f.format(m.group(2)) for f in forms)

    @cached_property
    def _dif_us(self) -> tuple[re.Pattern[str], dict[tuple[str, str], str], dict[str, str]]:
        lists = "|".join(re.escape(dif.replace(".", "_")) for dif, _ in self.blocks.values())
        in_block = {(dif.replace(".", "_"), v.replace(".", "_")): f"{dif}.{{}}.{v}"
                    for dif, table in self.blocks.values() for v in table.values()}
        return (re.compile(rf"^({lists})_(0|[1-9][0-9]*)_(.+)$"), in_block,
                {v.replace(".", "_"): v for v in self.outside.values()})

    def spelled_diffusers_path(self, spelled: str) -> str | None:
        """The diffusers path of a layer spelled as kohya names spell a diffusers path (ai-toolkit's Wan files hold
        `diffusion_model.blocks.0.attn1.to_q`, read as `lora_unet_blocks_0_attn1_to_q` -> `blocks.0.attn1.to_q`);
        None for a name the table does not have."""
        block, in_block, outside = self._dif_us
        m = block.match(spelled)
        if m is not None:
            form = in_block.get((m.group(1), m.group(3)))
            return None if form is None else form.format(m.group(2))
        return outside.get(spelled)

    @cached_property
    def _dif_block(self) -> re.Pattern[str]:
        lists = "|".join(re.escape(dif) for dif, _ in self.blocks.values())
        return re.compile(rf"^({lists})\.(0|[1-9][0-9]*)\.(.+)$")

    @cached_property
    def _in_block_dif(self) -> dict[tuple[str, str], str]:
        return {(dif, v): f"{b}.{{}}.{k}" for b, (dif, table) in self.blocks.items() for k, v in table.items()}

    @cached_property
    def _outside_dif(self) -> dict[str, str]:
        return {v: k for k, v in self.outside.items()}

    def original_path(self, path: str) -> str | None:
        """The original path of a diffusers path (`blocks.0.attn1.to_q` -> `blocks.0.self_attn.q`); None for a
        path the table does not have."""
        m = self._dif_block.match(path)
        if m is not None:
            form = self._in_block_dif.get((m.group(1), m.group(3)))
            return None if form is None else form.format(m.group(2))
        return self._outside_dif.get(path)


_WAN_ATTENTION = {f"{orig}.{o}": f"{dif}.{d}" for orig, dif in (("self_attn", "attn1"), ("cross_attn", "attn2"))
                  for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))}
WAN = Family(
    name="Wan",
    signature="condition_embedder.time_proj.weight",
    original_signature="time_projection.1.weight",
    blocks={"blocks": ("blocks", {**_WAN_ATTENTION, "cross_attn.k_img": "attn2.add_k_proj",
                                  "cross_attn.v_img": "attn2.add_v_proj", "ffn.0": "ffn.net.0.proj",
                                  "ffn.2": "ffn.net.2"})},
    outside={"time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out",
             "text_embedding.0": "condition_embedder.text_embedder.linear_1",
             "text_embedding.2": "condition_embedder.text_embedder.linear_2",
             "time_embedding.0": "condition_embedder.time_embedder.linear_1",
             "time_embedding.2": "condition_embedder.time_embedder.linear_2",
             "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
             "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2"},
)
# Flux.2 (`Flux2Transformer2DModel`; `_convert_non_diffusers_flux2_lora_to_diffusers`): Flux.1's words, other layers.
# Its attention layers (`img_attn.qkv`, `img_attn.proj`, ...), `img_in`, `txt_in` and `final_layer` are Flux.1's
# layer for layer and land through the Flux tables (formats.flux_keys, which swap the final (shift | scale) halves as
# diffusers' single-file converter does; its LoRA converter does not); these are the layers Flux.1's diffusers names
# miss: its SwiGLU MLP, the fused single-block projections, the shared modulation and the embedders.
FLUX2 = Family(
    name="Flux.2",
    signature="single_stream_modulation.linear.weight",
    original_signature="single_stream_modulation.lin.weight",
    blocks={"double_blocks": ("transformer_blocks", {"img_mlp.0": "ff.linear_in", "img_mlp.2": "ff.linear_out",
                                                     "txt_mlp.0": "ff_context.linear_in",
                                                     "txt_mlp.2": "ff_context.linear_out"}),
            "single_blocks": ("single_transformer_blocks", {"linear1": "attn.to_qkv_mlp_proj",
                                                            "linear2": "attn.to_out"})},
    outside={"time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
             "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
             "single_stream_modulation.lin": "single_stream_modulation.linear",
             "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
             "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear"},
)
# Lumina 2 (`Lumina2Transformer2DModel`; `_convert_non_diffusers_lumina2_lora_to_diffusers`, and the single-file
# `convert_lumina2_to_diffusers` for the layers outside the blocks): `layers.{i}.attention.qkv` -> `attn.to_q` |
# `to_k` | `to_v` (grouped-query attention: the rows of each diffusers weight), `feed_forward.w1` -> `linear_1`, ...
_LUMINA2_BLOCK = {"attention.out": "attn.to_out.0", "feed_forward.w1": "feed_forward.linear_1",
                  "feed_forward.w2": "feed_forward.linear_2", "feed_forward.w3": "feed_forward.linear_3",
                  "adaLN_modulation.1": "norm1.linear"}
LUMINA2 = Family(
    name="Lumina 2",
    signature="time_caption_embed.caption_embedder.1.weight",
    original_signature="cap_embedder.1.weight",
    blocks={b: (b, _LUMINA2_BLOCK) for b in ("layers", "noise_refiner", "context_refiner")},
    outside={"t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
             "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
             "cap_embedder.1": "time_caption_embed.caption_embedder.1",
             "final_layer.adaLN_modulation.1": "norm_out.linear_1", "final_layer.linear": "norm_out.linear_2"},
    fused={"attention.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")},
)
FAMILIES: tuple[Family, ...] = (WAN, FLUX2, LUMINA2)


def families_of(paths: Mapping[str, object] | set[str], original: bool = False) -> list[Family]:
    """The families whose signature weight is among `paths` (diffusers weight paths, without a component; with
    `original`, the original model's, without ComfyUI's prefix)."""
    return [f for f in FAMILIES if (f.original_signature if original else f.signature) in paths]


__all__ = ["FAMILIES", "FLUX2", "LUMINA2", "WAN", "Family", "families_of"]
