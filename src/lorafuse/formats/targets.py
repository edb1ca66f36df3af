"""Where a module's delta lands in a checkpoint: the result of matching module names to base keys.

Most modules land whole on one base weight. Fused layers need row ranges: a text encoder's
q_proj lands on the first third of an OpenCLIP `in_proj_weight` (base_rows), and a Flux
`img_attn_qkv` LoRA lands on three diffusers weights `to_q`, `to_k`, `to_v`, each taking a
third of the module's delta rows (delta_rows).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    key: str  # checkpoint tensor name; in a diffusers folder '<component>/<key>' ('unet/conv_in.weight')
    base_rows: tuple[int, int] | None = None  # rows [start, stop) of that tensor the delta lands on; None: all
    delta_rows: tuple[int, int] | None = None  # rows [start, stop) of the module's delta that go there; None: all
