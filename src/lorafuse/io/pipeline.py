"""diffusers pipeline folders: `model_index.json` plus one folder per component.

Components with safetensors weights (unet, transformer, text_encoder, text_encoder_2,
text_encoder_3, vae, ...) are opened as checkpoints; their tensors are named
'<component>/<key>' when matched against adapter modules. Everything else (scheduler,
tokenizer, configs) is copied as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorafuse.errors import FormatError
from lorafuse.io.checkpoint import Checkpoint, read_json

INDEX = "model_index.json"


def is_pipeline(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / INDEX).is_file()


class Pipeline:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.directory = Path(path)
        index = read_json(self.directory / INDEX, "the pipeline index")
        if not isinstance(index, dict):
            raise FormatError(f"{self.directory / INDEX}: the pipeline index must be a JSON object")
        self.components: dict[str, Checkpoint] = {}
        for name, value in index.items():
            folder = self.directory / name
            if name.startswith("_") or not isinstance(value, list) or not folder.is_dir():
                continue
            if Path(name).name != name:
                raise FormatError(f"{self.directory / INDEX}: component {name!r} is not a folder name")
            if any(folder.glob("*.safetensors")):
                self.components[name] = Checkpoint(folder)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """'<component>/<key>' -> shape for every tensor of every component."""
        return {f"{c}/{k}": tuple(ck.info(k).shape) for c, ck in self.components.items() for k in ck.keys()}

    def files(self) -> list[Path]:
        return [f for ck in self.components.values() for f in ck.files()] + [self.directory / INDEX]

    def total_bytes(self) -> int:
        return sum(ck.total_bytes() for ck in self.components.values())
