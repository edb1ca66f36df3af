"""Per-format state of an adapter, typed: what a format's reader keeps so that its writer (or a
conversion) can give the file back as it was. One small dataclass per format, held in
`Adapter.state` (never in `Adapter.config`, which is the user-facing adapter config).

The diffusers writer keeps a record of the kohya file a conversion came from inside the file's
metadata (`lorafuse_kohya`: {"family", "config": {"kohya_alpha_dtypes": ...}}); KohyaState's
`record_config` / `from_record_config` are that JSON form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

ALPHA_DTYPES_KEY = "kohya_alpha_dtypes"  # in a diffusers file's kohya record: module -> dtype of its .alpha


@dataclass
class KohyaState:
    """A kohya / LyCORIS file's: its metadata, the dtype of every module's `.alpha` (None: none), and the value
    of an `.alpha` the module's scale does not depend on (a LoKr of two full halves: LyCORIS's scale is 1), to be
    written back as it was."""

    metadata: dict[str, str] = field(default_factory=dict)
    alpha_dtypes: dict[str, str | None] = field(default_factory=dict)
    unused_alphas: dict[str, float] = field(default_factory=dict)

    def record_config(self) -> dict[str, object]:
        """The JSON form kept in a diffusers file's kohya record (the metadata travels as the file's own)."""
        return {ALPHA_DTYPES_KEY: dict(self.alpha_dtypes)}

    @classmethod
    def from_record_config(cls, config: object, metadata: Mapping[str, str]) -> KohyaState:
        """The state back from a kohya record's config (anything malformed in it is dropped: the record
        only refines how `.alpha` tensors are written)."""
        raw = config.get(ALPHA_DTYPES_KEY) if isinstance(config, Mapping) else None
        dtypes = {str(k): (None if v is None else str(v)) for k, v in raw.items()} if isinstance(raw, Mapping) else {}
        return cls(dict(metadata), dtypes)


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
