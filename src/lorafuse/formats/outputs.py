"""What the name of an adapter output means (issue #18), decided before any work (the rules of the CLI's -o, and of
Adapter.save through model.registry.set_output_rule).

* A name ending in `.safetensors` (any case) names one file. When the output's format is a folder
  format (PEFT: adapter_config.json + adapter_model.safetensors) because the inputs are PEFT folders
  and no format was asked for, the adapter is written in the first one-file format whose writer can
  hold its modules (ONE_FILE_FORMATS: diffusers LoRA names `<component>.<module>`, kohya names
  `lora_unet_...`), with a note saying so; when none can, or the folder format was asked for
  (`--format peft`), the name is refused, saying why and what to give instead.
* A name ending in a path separator, or an existing folder, with a one-file format: the file is written
  inside that folder under a default name (file_name: `pytorch_lora_weights.safetensors` for diffusers,
  which diffusers' load_lora_weights(folder) looks for; else the first input's file name), never as a
  file named like the folder. The folder must be a place an output may be (io.atomic.output_file).
* Any other name is written as it is, in the format chosen.

Whether a writer can hold an adapter is asked of the writer itself: its WritePlan is made from the
adapter's modules as plain LoRA placeholders (model.layout), which reads no factor values.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorafuse.errors import LorafuseError, LorafuseValueError, UnsupportedError
from lorafuse.formats.diffusers import WEIGHT_NAME, diffusers_plan
from lorafuse.formats.held import extract_models
from lorafuse.formats.kohya import kohya_plan
from lorafuse.formats.peft import peft_plan
from lorafuse.formats.sd_keys import unet_folder_family
from lorafuse.formats.streaming import WritePlan, write_adapter
from lorafuse.io.atomic import check_output, check_output_path, names_file, output_file
from lorafuse.io.checkpoint import Checkpoint, foreign_output, read_config
from lorafuse.io.dtypes import DTYPES
from lorafuse.io.manifest import ADAPTER, PEFT_ADAPTER
from lorafuse.model import Adapter
from lorafuse.model.layout import ModuleLayout
from lorafuse.model.names import Kind
from lorafuse.model.patterns import NameFilter
from lorafuse.model.update import Update

ADAPTER_SUFFIX = ".safetensors"
FOLDER_FORMATS = {"peft": "a folder holding adapter_config.json and adapter_model.safetensors"}
ONE_FILE_FORMATS = ("diffusers", "kohya")  # tried in this order for a PEFT adapter given a .safetensors name
_PLANS: dict[str, Callable[[Adapter], WritePlan]] = {"peft": peft_plan, "kohya": kohya_plan,
                                                     "diffusers": diffusers_plan}


@dataclass(frozen=True)
class AdapterOutput:
    """Where an adapter output goes and in which format; `note` says what the name changed, if anything."""

    path: Path
    format: str
    note: str | None = None
    replaces: str | None = None  # checked_output: what overwrite=True replaces there (io.atomic.check_output)


def file_name(fmt: str, adapters: Sequence[Adapter]) -> str:
    """The name of a one-file output written into a folder: diffusers' own for a diffusers LoRA file, else the
    first input's file name (a folder input's name with .safetensors; an adapter computed from others (combine,
    resize, arithmetic): the first file it was computed from)."""
    if fmt == "diffusers":
        return WEIGHT_NAME
    first = next((p for a in adapters for p in a.sources()), None)  # a computed adapter: the first it came from
    if first is None:
        return "adapter" + ADAPTER_SUFFIX
    name = first.resolve().name if first.name in ("", ".", "..") else first.name
    return name if name.lower().endswith(ADAPTER_SUFFIX) and not first.is_dir() else name + ADAPTER_SUFFIX


def _placeholder(name: str, u: Update) -> Update:
    try:
        return dataclasses.replace(ModuleLayout.like(u, 1), name=name).placeholder()
    except LorafuseError:  # a kind no layout has: the writer judges the update itself
        return u


def _plain(adapter: Adapter) -> Adapter:
    """`adapter` with its modules as plain LoRA placeholders: what combine and resize write."""
    return dataclasses.replace(adapter, updates={n: _placeholder(n, u) for n, u in adapter.updates.items()},
                               randomized=[], notes=[])


def refusal(fmt: str, adapters: Sequence[Adapter]) -> str | None:
    """None when the writer of `fmt` can hold the modules of every adapter (as plain LoRA: names, kinds,
    full tensors), else its reason."""
    plan = _PLANS.get(fmt)
    if plan is None:
        return f"lorafuse has no writer called {fmt!r}"
    for a in adapters:
        try:
            plan(_plain(a))
        except LorafuseError as e:
            return str(e)
    return None


def _folder_suggestion(out: str | os.PathLike[str], inputs: Sequence[Path] = ()) -> str:
    """`out` without its .safetensors, as a folder name to suggest; beside the input folder that would hold it
    (a folder inside an input is refused: the suggestion must not be)."""
    p = Path(out)
    folder = p.with_name(p.name[: -len(ADAPTER_SUFFIX)])
    for i in inputs:
        try:
            check_output_path(folder, [i])
        except LorafuseError:
            if Path(i).is_dir():
                return str(Path(i).parent / f"{Path(i).name}-{folder.name}")
    return str(folder)


def adapter_output(out: str | os.PathLike[str], fmt: str, adapters: Sequence[Adapter], inputs: Sequence[Path] = (),
                   *, asked: str | None = None) -> AdapterOutput:
    """Where and how an adapter of format `fmt` (the one asked for, or the inputs' own) is written for the
    output name `out` (see the module's docstring). `asked`: the option that chose `fmt` ('--format peft'),
    None when it is the default. `adapters`: what the output will hold (its module names and kinds).
    Raises LorafuseValueError for a name the format cannot have, OutputError for a folder named to write
    into that may not be written into."""
    if (why := foreign_output(out, folder=fmt in FOLDER_FORMATS)) is not None:
        raise LorafuseValueError(why)
    if fmt in FOLDER_FORMATS:
        if not names_file(out, ADAPTER_SUFFIX):
            return AdapterOutput(Path(out), fmt)
        what = FOLDER_FORMATS[fmt]
        if asked is not None:
            raise LorafuseValueError(
                f"output {out} ends in {ADAPTER_SUFFIX}, which names one file, but {asked} writes {what}: give a "
                f"folder name (e.g. {_folder_suggestion(out, inputs)}), or a one-file format "
                f"({', '.join(ONE_FILE_FORMATS)}) for one file")
        reasons = []
        for candidate in ONE_FILE_FORMATS:
            why = refusal(candidate, adapters)
            if why is None:
                return AdapterOutput(Path(out), candidate,
                                     f"{out} ends in {ADAPTER_SUFFIX}: written as one {candidate} LoRA file, not as a "
                                     f"{fmt} adapter ({what}; give a folder name for that)")
            reasons.append(f"{candidate}: {why}")
        raise LorafuseValueError(
            f"output {out} ends in {ADAPTER_SUFFIX}, which names one file, but a {fmt} adapter is {what}, and no "
            f"one-file format can hold these modules ({'; '.join(reasons)}): give a folder name, e.g. "
            f"{_folder_suggestion(out, inputs)}")
    return AdapterOutput(output_file(out, file_name(fmt, adapters), inputs, ADAPTER_SUFFIX), fmt)


def checked_output(out: str | os.PathLike[str], fmt: str, adapters: Sequence[Adapter], inputs: Sequence[Path] = (),
                   *, asked: str | None = None, overwrite: bool = False, judged: bool = False) -> AdapterOutput:
    """adapter_output, then io.atomic.check_output on the path it names, then whether the format (asked for:
    LorafuseValueError, or the first input's: UnsupportedError, as its writer would) can name the modules of
    `adapters`, naming the input: everything a verb that writes an adapter checks of its output's name before
    any work (a real run and a dry run alike). The result's
    `replaces` is the note of what `overwrite` will replace there (None: nothing of the user's). `judged`: the
    caller has already found that `fmt` can name the modules (python_output)."""
    target = adapter_output(out, fmt, adapters, inputs, asked=asked)
    folder = target.format in FOLDER_FORMATS
    replaces = check_output(target.path, inputs, folder=folder, overwrite=overwrite,
                            kind=PEFT_ADAPTER if folder else ADAPTER)
    # before any work, naming the input whose modules it cannot name (a format adapter_output chose, with its
    # note, was chosen because it can: its plan is not made again; nor is one the caller judged)
    why = None if judged or target.note is not None else refusal(target.format, adapters)
    if why is not None and asked is not None:
        raise LorafuseValueError(f"{asked} cannot hold these modules: {why}")
    if why is not None:  # the writer's own refusal (UnsupportedError), said before any work
        raise UnsupportedError(f"the output format, {target.format} (the first adapter's; --format / format= chooses "
                               f"another), cannot hold these modules: {why}")
    return dataclasses.replace(target, replaces=replaces)


def python_output(out: str | os.PathLike[str], format: str | None, adapters: Sequence[Adapter],
                  inputs: Sequence[Path] = (), *, overwrite: bool = False) -> AdapterOutput:
    """checked_output for the Python API's writers (Adapter.save, ops.combine.combine_to), so that a name means
    there what it means to the CLI: `format` is the format asked for (the `format=` parameter; None: the first
    adapter's own, and a `.safetensors` name then gives a one-file format that can hold the modules, with a
    note), `adapters` what the output holds (its modules; the first one's source names a file written into a
    folder). A format asked for that cannot name the modules is an UnsupportedError, as its writer's refusal
    is (the CLI's --format: a usage error). A format registered without a writer plan here
    (model.registry.register) is written as named."""
    from lorafuse.model.registry import get_format

    fmt = get_format(adapters[0].format if format is None else format).name
    if fmt not in _PLANS:
        return AdapterOutput(Path(out), fmt)
    target = adapter_output(out, fmt, adapters, inputs, asked=None if format is None else f"format={format!r}")
    why = None if format is None else refusal(fmt, adapters)
    if why is not None:
        raise UnsupportedError(f"format={format!r} cannot hold these modules: {why}")
    checked = checked_output(target.path, target.format, adapters, inputs, overwrite=overwrite,  # the place itself
                             judged=format is not None or target.note is not None)
    return dataclasses.replace(checked, note=target.note)


def extract_output(out: str | os.PathLike[str], base: str | os.PathLike[str], finetuned: str | os.PathLike[str],
                   include: str | None = None, exclude: str | None = None, *,
                   overwrite: bool = False) -> AdapterOutput:
    """checked_output for extract: a PEFT folder, or for a name ending in .safetensors one file if a one-file
    format can name the base's modules (checkpoint_modules, from the headers). An adapter given as either model is
    refused first (formats.held.extract_models)."""
    base_path, _ = extract_models(base, finetuned)
    modules = [checkpoint_modules(base_path, include, exclude)] if names_file(out) else []
    if modules and (prefix := _single_file_prefix(modules[0])) is not None:  # ops.extract.kohya_named names them
        target = checked_output(out, "kohya", modules, [Path(base), Path(finetuned)], overwrite=overwrite,
                                judged=True)
        return dataclasses.replace(target, note=f"{out} ends in {ADAPTER_SUFFIX}: written as one kohya LoRA file "
                                   f"(lora_unet_ / lora_te*_ names, as sd-scripts' extract_lora_from_models.py; "
                                   f"{base} is a single-file Stable Diffusion checkpoint, its weights named "
                                   f"{prefix}*), not as a PEFT adapter (give a folder name for that)")
    if modules and Path(base_path).is_dir() and unet_folder_family(read_config(Path(base_path))) is not None:
        target = checked_output(out, "kohya", modules, [Path(base), Path(finetuned)], overwrite=overwrite,
                                judged=True)
        return dataclasses.replace(target, note=f"{out} ends in {ADAPTER_SUFFIX}: written as one kohya LoRA file "
                                   f"(lora_unet_ names, as sd-scripts' extract_lora_from_models.py; {base} is a "
                                   "diffusers UNet folder), not as a PEFT adapter (give a folder name for that)")
    return checked_output(out, "peft", modules, [Path(base), Path(finetuned)], overwrite=overwrite)


# The roots of an LDM / SGM single-file Stable Diffusion checkpoint (SD 1.x / 2.x, SDXL), as sd_keys reads them
_SINGLE_FILE_ROOTS = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.")


def _single_file_prefix(modules: Adapter) -> str | None:
    """The single-file Stable Diffusion root (_SINGLE_FILE_ROOTS) the modules of `modules` are under, else None."""
    return next((r for r in _SINGLE_FILE_ROOTS if any(n.startswith(r) for n in modules.updates)), None)


def write_plan(fmt: str, adapter: Adapter) -> WritePlan:
    """What saving `adapter` in the format `fmt` writes (Adapter.save, save_as and the streamed outputs go
    through this plan): its tensors' header entries, metadata and side files. Reads no factor value, so
    `adapter`'s updates may be placeholders (model.layout)."""
    plan = _PLANS.get(fmt)
    if plan is None:
        raise LorafuseValueError(f"lorafuse has no writer called {fmt!r}")
    return plan(adapter)


def save_as(adapter: Adapter, fmt: str, out: str | os.PathLike[str], inputs: Sequence[Path] = (),
            overwrite: bool = False) -> Path:
    """Write `adapter` in the format `fmt` (its writer's WritePlan), never over `inputs` (see io.atomic)."""
    return write_adapter(_PLANS[fmt](adapter), adapter.updates, out, inputs, overwrite)


def checkpoint_modules(base: str | os.PathLike[str], include: str | None = None,
                       exclude: str | None = None) -> Adapter:
    """The modules an extract from `base` may write, as plain LoRA placeholders (names from the weight keys,
    `include` / `exclude` applied as extract applies them): what adapter_output needs to judge a name
    before extracting. Reads the checkpoint's headers only."""
    inc = NameFilter(include, "--include (Python: include=) regular expression") if include is not None else None
    exc = NameFilter(exclude, "--exclude (Python: exclude=) regular expression") if exclude is not None else None
    ckpt = Checkpoint(base)
    updates: dict[str, Update] = {}
    for key in ckpt.keys():
        info = ckpt.info(key)
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or len(info.shape) not in (2, 4) or not DTYPES[info.dtype].is_float \
                or 0 in info.shape or (inc and not inc.search(module)) or (exc and exc.search(module)):
            continue
        kind: Kind = "conv" if len(info.shape) == 4 else "linear"
        updates[module] = ModuleLayout(module, kind, tuple(info.shape), 1).placeholder()
    return Adapter(updates=updates, path=Path(base))


__all__ = ["ADAPTER_SUFFIX", "FOLDER_FORMATS", "ONE_FILE_FORMATS", "AdapterOutput", "adapter_output",
           "checked_output", "checkpoint_modules", "extract_output", "file_name", "python_output", "refusal", "save_as",
           "write_plan"]
