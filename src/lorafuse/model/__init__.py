"""The data model: adapters, their module updates, and what can be computed from them alone.

Layer: imports lorafuse.io (tensors), lorafuse.backends (the math) and the leaf helpers, never
lorafuse.formats or lorafuse.ops. Modules:

- names       module names and kinds (check_module_name)
- experts     one rank for the per-expert LoRAs of a MoE model transformers fuses on load
- lora        LoraUpdate (also a Tucker LoCon, through model.tucker.TuckerFactor)
- lycoris     LycorisUpdate and its classes LohaUpdate, LokrUpdate
- update      the Update union and the protocol every update class follows
- half, structure, best, limits   an update's delta kept in its structure, and its bounds
- spectral    norms, inner products, spectra, structured SVD, backend batches
- adapter     Adapter; arithmetic: its exact +, -, *, to_rank, norm
- registry    the format registry (formats register themselves); state: per-format typed state
"""

from __future__ import annotations

from lorafuse.model.adapter import Adapter
from lorafuse.model.lora import LoraUpdate
from lorafuse.model.lycoris import LOHA_PARTS, LOKR_PARTS, LohaUpdate, LokrUpdate, LycorisUpdate
from lorafuse.model.names import MAX_NAME_LENGTH, Kind, check_module_name
from lorafuse.model.registry import FormatSpec, get_format, register
from lorafuse.model.state import DiffusersState, FormatState, KohyaState, PeftState
from lorafuse.model.tucker import TuckerFactor
from lorafuse.model.update import Update, UpdateProtocol, stored_tensors

__all__ = [
    "LOHA_PARTS", "LOKR_PARTS", "MAX_NAME_LENGTH", "Adapter", "DiffusersState", "FormatSpec", "FormatState", "Kind",
    "KohyaState", "LohaUpdate", "LokrUpdate", "LoraUpdate", "LycorisUpdate", "PeftState", "TuckerFactor", "Update",
    "UpdateProtocol", "check_module_name", "get_format", "register", "stored_tensors",
]
