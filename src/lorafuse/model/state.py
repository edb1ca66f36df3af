"""Per-format state of an adapter, typed: what a format's reader keeps so that its writer (or a
conversion) can give the file back as it was. One small dataclass per format, held in
`Adapter.state` (never in `Adapter.config`, which is the user-facing adapter config).

The diffusers writer keeps a record of the kohya file a conversion came from inside the file's
metadata (`lorafuse_kohya`: {"family", "config": {"kohya_alpha_dtypes": ...}}); KohyaState's
`record_config` / `from_record_config` are that JSON form.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

ALPHA_DTYPES_KEY = "kohya_alpha_dtypes"  # in a diffusers file's kohya record: module -> dtype of its .alpha
ALPHA_FORMS_KEY = "kohya_alpha_forms"  # and module -> [shape, value] of an .alpha stored as 0 or not as a scalar
LAYOUTS_KEY = "kohya_layouts"  # and a ComfyUI-layout module -> [its key stem, whether spelled lora_A / lora_B]


@dataclass
class KohyaState:
    """A kohya / LyCORIS file's: its metadata, the dtype of every module's `.alpha` (None: none), and the value
    of an `.alpha` the module's scale does not depend on (a LoKr of two full halves: LyCORIS's scale is 1), to be
    written back as it was; `alpha_forms`: the shape and value of an `.alpha` stored as 0 (alpha = r) or with a
    shape other than a scalar's ([1], as some trainers save it), written back as it was while it still means the
    module's scale (kohya's sd-scripts and LyCORIS read any of these)."""

    metadata: dict[str, str] = field(default_factory=dict)
    alpha_dtypes: dict[str, str | None] = field(default_factory=dict)
    unused_alphas: dict[str, float] = field(default_factory=dict)
    alpha_forms: dict[str, tuple[tuple[int, ...], float]] = field(default_factory=dict)
    # a ComfyUI-layout file's modules (formats.kohya.original_key): module -> (the key stem it was read under,
    # `diffusion_model.<path>`, and whether its factors were spelled lora_A / lora_B): written back so
    layouts: dict[str, tuple[str, bool]] = field(default_factory=dict)
    # modules whose `dora_scale` was stored (out, 1, 1, 1), a convolution's, where the delta reads 2-D (a LoHa / LoKr
    # of a generic 'lycoris_' layer stores its kernel flattened): written back so, as LyCORIS loads it
    conv_dora: frozenset[str] = frozenset()

    def record_config(self) -> dict[str, object]:
        """The JSON form kept in a diffusers file's kohya record (the metadata travels as the file's own)."""
        forms = {ALPHA_FORMS_KEY: {m: [list(shape), v] for m, (shape, v) in self.alpha_forms.items()}}
        layouts = {LAYOUTS_KEY: {m: [stem, peft] for m, (stem, peft) in self.layouts.items()}}
        return {ALPHA_DTYPES_KEY: dict(self.alpha_dtypes), **(forms if self.alpha_forms else {}),
                **(layouts if self.layouts else {})}

    @classmethod
    def from_record_config(cls, config: object, metadata: Mapping[str, str]) -> KohyaState:
        """The state back from a kohya record's config (anything malformed in it is dropped: the record
        only refines how `.alpha` tensors are written)."""
        raw = config.get(ALPHA_DTYPES_KEY) if isinstance(config, Mapping) else None
        dtypes = {str(k): (None if v is None else str(v)) for k, v in raw.items()} if isinstance(raw, Mapping) else {}
        raw = config.get(ALPHA_FORMS_KEY) if isinstance(config, Mapping) else None
        forms = {str(k): (tuple(v[0]), float(v[1])) for k, v in raw.items() if _alpha_form(v)} \
            if isinstance(raw, Mapping) else {}
        raw = config.get(LAYOUTS_KEY) if isinstance(config, Mapping) else None
        layouts = {str(k): (v[0], v[1]) for k, v in raw.items() if isinstance(v, list) and len(v) == 2
                   and isinstance(v[0], str) and isinstance(v[1], bool)} if isinstance(raw, Mapping) else {}
        return cls(dict(metadata), dtypes, alpha_forms=forms, layouts=layouts)


def _alpha_form(v: object) -> bool:
    """Whether a kohya record's [shape, value] is one: a shape of ones (at most 8), a finite number."""
    return (isinstance(v, list) and len(v) == 2 and isinstance(v[0], list) and len(v[0]) <= 8 and
            all(d == 1 and type(d) is int for d in v[0]) and type(v[1]) in (int, float) and math.isfinite(v[1]))


@dataclass
class DiffusersState:
    """A diffusers LoRA file's: its other metadata, each component's LoraConfig, and the record of the
    kohya file a conversion came from (None: none)."""

    metadata: dict[str, str] = field(default_factory=dict)
    components: dict[str, dict[str, object]] = field(default_factory=dict)
    kohya: dict[str, object] | None = None


@dataclass
class PeftState:
    """A PEFT folder keeps nothing beside its adapter_config.json (the adapter's `config`)."""


FormatState = KohyaState | DiffusersState | PeftState


def metadata_of(state: FormatState) -> dict[str, str]:
    """The file metadata a state carries (kohya ss_*, modelspec.*, ...; {} for PEFT), a copy."""
    return dict(state.metadata) if isinstance(state, KohyaState | DiffusersState) else {}


def as_kohya(state: FormatState) -> KohyaState:
    """`state` when it is a kohya file's, else a kohya state with the metadata it carries."""
    return state if isinstance(state, KohyaState) else KohyaState(metadata_of(state))


def as_diffusers(state: FormatState) -> DiffusersState:
    """`state` when it is a diffusers file's, else a diffusers state with the metadata it carries."""
    return state if isinstance(state, DiffusersState) else DiffusersState(metadata_of(state))


__all__ = ["ALPHA_DTYPES_KEY", "DiffusersState", "FormatState", "KohyaState", "PeftState", "as_diffusers", "as_kohya",
           "metadata_of"]
