"""The data model under its first name: `lorafuse.adapter` re-exports lorafuse.model (Adapter,
LoraUpdate, Update, ...), where the classes now live. New code imports lorafuse.model."""

from __future__ import annotations

from lorafuse.model.adapter import Adapter
from lorafuse.model.lora import LoraUpdate
from lorafuse.model.names import MAX_NAME_LENGTH, Kind, check_module_name
from lorafuse.model.update import Update, stored_tensors

__all__ = ["MAX_NAME_LENGTH", "Adapter", "Kind", "LoraUpdate", "Update", "check_module_name", "stored_tensors"]
