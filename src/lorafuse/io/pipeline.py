"""diffusers pipeline folders: `model_index.json` plus one folder per component.

Components with safetensors weights (unet, transformer, text_encoder, text_encoder_2,
text_encoder_3, vae, ...) are opened as checkpoints; their tensors are named
'<component>/<key>' when matched against adapter modules. Everything else (scheduler,
tokenizer, configs) is copied as it is.

A plain checkpoint is a pipeline of one component named '' (`Pipeline.of_checkpoint`): its
tensors keep their own names, so every operation over a model takes one path.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorafuse._terminal import short
from lorafuse.errors import FormatError
from lorafuse.io.checkpoint import SAFETENSORS_SUFFIX, Checkpoint, is_pickle, names_ending, read_json

INDEX = "model_index.json"


def is_pipeline(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return os.path.isdir(p) and os.path.isfile(p / INDEX)  # False for a path that cannot be looked at


class Pipeline:
    single = False  # a plain checkpoint seen as a pipeline of one component named ''

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.directory = Path(path)
        index = read_json(self.directory / INDEX, "the pipeline index")
        if not isinstance(index, dict):
            raise FormatError(f"{self.directory / INDEX}: the pipeline index must be a JSON object")
        self.components: dict[str, Checkpoint] = {}
        self.unread: dict[str, str] = {}  # components holding weights lorafuse does not read: why (for messages)
        for name, value in index.items():
            if name.startswith("_") or not isinstance(value, list):  # _class_name, _diffusers_version, ...
                continue
            folder = self._component_folder(name)
            if folder is None:
                continue
            try:
                weights = names_ending(folder, SAFETENSORS_SUFFIX)
            except OSError as e:
                raise FormatError(f"{folder}: cannot read: {e.strerror or e}") from None
            if weights:
                self.components[name] = Checkpoint(folder)
            else:
                pickles = sorted(f.name for f in folder.iterdir() if is_pickle(f)) if folder.is_dir() else []
                if pickles:
                    self.unread[name] = (f"{name}/{pickles[0]} is a pickle checkpoint, which lorafuse does not read "
                                         "(convert it to .safetensors)")

    @classmethod
    def of_checkpoint(cls, ckpt: Checkpoint) -> Pipeline:
        """A checkpoint (a folder or one file) as a pipeline of one component named ''."""
        pipe = cls.__new__(cls)
        pipe.directory, pipe.components, pipe.single, pipe.unread = ckpt.directory, {"": ckpt}, True, {}
        return pipe

    @staticmethod
    def tensor_name(component: str, key: str) -> str:
        """How a component's tensor is named across the pipeline: '<component>/<key>' (a checkpoint's: key)."""
        return f"{component}/{key}" if component else key

    def _component_folder(self, name: str) -> Path | None:
        """The folder of component `name` (None when the pipeline has no such folder). Only the plain
        name of a folder inside the pipeline is accepted: not '', '.', '..', a path, a name with
        control characters, nor a symbolic link that leads out of the pipeline folder."""
        where = f"{self.directory / INDEX}: component {short(name)}"
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name or not name.isprintable():
            raise FormatError(f"{where} is not the plain name of a folder of the pipeline (no '.', '..', path "
                              "separators or control characters); fix model_index.json")
        folder = self.directory / name
        if not folder.is_dir():
            return None
        inside, target = self.directory.resolve(), folder.resolve()
        if target == inside:
            raise FormatError(f"{where}: its folder is a symbolic link to the pipeline folder itself")
        if inside not in target.parents:
            raise FormatError(f"{where}: its folder is a symbolic link to {target}, outside the pipeline folder "
                              f"{self.directory}; copy that folder into the pipeline instead")
        return folder

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """'<component>/<key>' (a checkpoint's: key) -> shape for every tensor of every component."""
        return {self.tensor_name(c, k): tuple(ck.info(k).shape) for c, ck in self.components.items()
                for k in ck.keys()}

    def split(self, name: str) -> tuple[str, str]:
        """(component, key) of a pipeline-wide tensor name."""
        if self.single:
            return "", name
        comp, key = name.split("/", 1)
        return comp, key

    def files(self) -> list[Path]:
        own = [] if self.single else [self.directory / INDEX]
        return [f for ck in self.components.values() for f in ck.files()] + own

    def total_bytes(self) -> int:
        return sum(ck.total_bytes() for ck in self.components.values())
