"""Running a recipe: each stage becomes the command line of its verb (`lorafuse combine ...`, `lorafuse apply
...`) and runs through the CLI's own command, so a recipe does exactly what those commands typed by hand do,
bit for bit, with the same checks and messages.

Stages run in order. Every stage but the last writes into an intermediate folder (a temporary folder
`.lorafuse-run-PID-XXXXXXXX` beside the output, locked while the run lives and removed at the end, or
`intermediate_dir`, kept); the last writes `out`. Before the first stage runs, so that a refused run costs no
work and creates nothing: the output is checked against everything any stage reads (not only the last
stage's inputs) and the recipe file; and each intermediate output in `intermediate_dir`, which may not be an
input, hold one or lie inside one, and which replaces only lorafuse's own earlier output (overwrite is for
`out` only). A failing stage leaves `out` as it was. The temporary folders of runs killed outright are
removed by the next run writing beside the same output. The whole run is recorded as the recipe, verbatim,
in every output's provenance.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lorafuse._terminal import printable
from lorafuse.errors import LorafuseError, LorafuseValueError, OutputError
from lorafuse.recipes.checks import CheckedStage, Input, check
from lorafuse.recipes.paths import is_absolute, is_hub_id, locate
from lorafuse.recipes.schema import DTYPES
from lorafuse.recipes.source import RecipeError, RecipeText, dumper, parse, read

RecipeLike = str | bytes | os.PathLike[str] | os.PathLike[bytes] | Mapping[str, Any] | Sequence[Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class StageRun:
    """One stage as it ran (or, in a dry run, as planned): its name, verb, command line and output."""

    name: str
    verb: str
    argv: list[str]
    out: Path | None
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class RunReport:
    """What `run` did (the Report protocol): the final output, each stage, the wall time and notes."""

    out: Path | None
    stages: list[StageRun]
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)
    dry_run: bool = False


def _is_text(recipe: str) -> bool:
    """Whether a string is YAML text rather than a file's name: it holds a newline, or it is one line of flow
    YAML (`{merge_method: svd, models: [...]}`, or a list `[...]` of stages) that names no file."""
    return "\n" in recipe or (recipe.lstrip().startswith(("{", "[")) and not os.path.lexists(recipe))


def _given_path(recipe: object) -> Path | None:
    """A recipe given as an os.PathLike (of str or bytes) or as bytes, as a Path (bytes decoded as the file system
    does: _validate.check_path; empty or holding a NUL: RecipeError); None for anything else. Bytes that hold a
    newline are not taken as a name (YAML text is a str: they are refused as data)."""
    from lorafuse._validate import check_path

    if not isinstance(recipe, os.PathLike) and not (isinstance(recipe, bytes) and b"\n" not in recipe):
        return None
    try:
        return Path(check_path(recipe, "recipe"))
    except LorafuseValueError as e:
        raise RecipeError(str(e)) from None


def _plain(value: object) -> object:
    """A recipe's data with what users naturally pass as YAML's own types: a path (os.PathLike) as its str, a numpy
    number or array as the Python number or list it holds (np.float32(0.5) is 0.5, np.int64(3) is 3)."""
    import numpy as np

    if isinstance(value, os.PathLike):
        return os.fsdecode(value)
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {k if isinstance(k, tuple) else _plain(k): _plain(v) for k, v in value.items()}  # a key stays hashable
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def load_recipe(recipe: RecipeLike) -> RecipeText:
    """A recipe from a path to a YAML file, YAML text (a string holding a newline, or one line of flow YAML
    starting with '{' or '[' that names no file), or the data itself (a mapping for one stage, a sequence of
    mappings for several). A path may be bytes or an os.PathLike of bytes (_given_path)."""
    path = _given_path(recipe)
    if path is not None:
        return read(path)
    if isinstance(recipe, Mapping) or (isinstance(recipe, Sequence) and not isinstance(recipe, str)):
        import yaml

        docs = [recipe] if isinstance(recipe, Mapping) else list(recipe)
        bad = next((d for d in docs if not isinstance(d, Mapping)), None)
        if bad is not None or not isinstance(recipe, Mapping | list | tuple):  # bytes are a Sequence too
            what = type(bad if isinstance(recipe, Mapping | list | tuple) else recipe).__name__
            raise RecipeError(f"a recipe given as data is a mapping (one stage) or a list of mappings, not {what}")
        try:  # written as the recipe's loader reads it back: a str '1e3' quoted (YAML 1.2's core schema, source.py)
            text = yaml.dump_all([_plain(d) for d in docs if isinstance(d, Mapping)], Dumper=dumper(),  # (all are)
                                 sort_keys=False)
        except (yaml.YAMLError, RecursionError, ValueError) as e:  # a set, a complex, a list that holds itself
            held = e.args[1] if isinstance(e, yaml.YAMLError) and len(e.args) > 1 else None
            which = (f"a {type(held).__name__} value" if held is not None else
                     "an integer of more digits than Python writes" if isinstance(e, ValueError) else
                     "a value nested too deeply")
            raise RecipeError(f"<recipe>: {which} cannot be a recipe's: give str, int, float, bool, lists and "
                              "mappings of them (a path and a numpy number are taken too)") from None
        return parse(text, "<recipe>", Path.cwd())
    if isinstance(recipe, str) and not recipe:  # Path('') would read the current folder
        raise RecipeError("recipe must be a path or YAML text, got an empty string")
    if isinstance(recipe, str) and _is_text(recipe):
        return parse(recipe, "<recipe>", Path.cwd())
    if isinstance(recipe, str):
        return read(Path(recipe))
    raise RecipeError(f"a recipe is a path, YAML text or a mapping, not {type(recipe).__name__}")


_NEGATABLE = {"requantize"}  # switches whose False differs from leaving them out (the verb's --no-X)
_PEFT_NAMED = ("ties", "dare_ties", "dare_linear")  # PEFT's, on the factors; mergekit's of these names: NAME_svd


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _number(x: float) -> str:
    """A number as the command line's word: an integer without its point; -0.0 keeps its sign (a weight of -0.0
    gives -0.0 entries, as `--weights=-0.0` does)."""
    f = float(x)
    return str(int(f)) if f.is_integer() and abs(f) < 2**53 and (f or math.copysign(1.0, f) > 0) else repr(f)


def _place(stage: CheckedStage, x: Input, recipe: RecipeText, outputs: Mapping[str, Path]) -> str:
    return str(outputs[x.stage]) if x.stage is not None else locate(recipe.folder, x.text)


def _names(stage: CheckedStage, recipe: RecipeText, outputs: Mapping[str, Path]) -> dict[str, str]:
    """How the stage's inputs are recorded in its output's provenance: a model by its name as the recipe gives
    it (not the path it was found at from the recipe's folder), an earlier stage's output by the stage's name:
    nothing recorded depends on where the recipe's folder or the intermediate outputs were. A model is recorded
    under the path its verb loads it as (_loaded_as: a PEFT weights file as its folder, a folder as the adapter
    file it holds), so each of those paths names it too."""
    places = {_place(stage, x, recipe, outputs): x.text for x in stage.models if x.stage is None}
    names = {loaded: text for place, text in places.items() for loaded in _loaded_as(place)}
    return {**names, **places, **{str(outputs[n]): n for n in stage.needs}}


def _loaded_as(place: str) -> list[str]:
    """The paths a verb may record the model at `place` under, besides `place`: the adapter it loads
    (formats.held.located_adapter: the adapter file a folder holds), and for a PEFT adapter's file its folder
    (the PEFT loader names an adapter by its folder, formats.peft)."""
    from lorafuse.formats import adapter_format, located_adapter

    if not os.path.lexists(place):  # a Hub id: recorded by its id (io.provenance), never resolved here
        return []
    try:
        found = located_adapter(place)
        peft = adapter_format(found) == "peft" and found.is_file()
    except (LorafuseError, OSError, ValueError):
        return []
    return [str(found), *([str(found.parent)] if peft else [])]


def argv_of(stage: CheckedStage, recipe: RecipeText, out: Path | str, outputs: Mapping[str, Path],
            extra: Sequence[str] = ()) -> list[str]:
    """The command line that runs `stage` writing `out` (`outputs`: earlier stages' outputs by name). Every
    option is one word (`--name=value`) and the inputs come after `--`, so that no text of the recipe (a model
    named `--overwrite`, an include pattern starting with `-`) can be taken for an option."""
    s, p = stage.stage, stage.stage.parameters
    places = [_place(stage, x, recipe, outputs) for x in stage.inputs]
    base = _place(stage, stage.base, recipe, outputs) if stage.base is not None else None
    opts: list[str] = [f"--out={out}"]
    if stage.verb == "combine":
        opts.append(f"--method={s.merge_method}")
    if stage.verb in ("combine", "apply"):
        weights = [1.0 if x.weight is None else x.weight for x in stage.inputs]
        if any(w != 1.0 for w in weights):
            opts.append("--weights=" + ",".join(_number(w) for w in weights))
    if stage.verb == "combine" and stage.inputs and stage.inputs[0].density is not None:
        opts.append(f"--density={_number(stage.inputs[0].density)}")
    for name in sorted(p.model_fields_set - {"weight", "density"}):
        value = getattr(p, name)
        if value is False and name in _NEGATABLE:  # False is not the default (None: the format's choice)
            opts.append(f"--no-{_flag(name).removeprefix('--')}")
            continue
        if value is None or value is False:
            continue
        opts.append(_flag(name) if value is True else
                    f"{_flag(name)}={_number(value) if isinstance(value, float) else value}")
    if s.dtype is not None:
        opts.append(f"--dtype={DTYPES[s.dtype]}")
    if s.format is not None:
        opts.append(f"--format={s.format}")
    positional = places if stage.verb in ("combine", "resize") else [str(base), *places]
    return [stage.verb, *opts, *extra, "--", *positional]


def _intermediate(stage: CheckedStage, recipe: RecipeText, outputs: Mapping[str, Path], work: Path) -> Path:
    """Where a stage other than the last writes: `work/NAME` for a folder output (a PEFT adapter, a checkpoint
    folder), `work/NAME.safetensors` for a one-file output (kohya / diffusers adapters, a one-file base)."""
    from lorafuse.formats import detect_format
    from lorafuse.ops.outputs import FOLDER_FORMATS

    if stage.verb == "extract":
        folder = True
    elif stage.verb == "apply":
        assert stage.base is not None
        folder = not Path(_place(stage, stage.base, recipe, outputs)).is_file()
    else:
        fmt = stage.stage.format or detect_format(_place(stage, stage.inputs[0], recipe, outputs))
        folder = fmt in FOLDER_FORMATS
    return work / stage.name if folder else work / f"{stage.name}.safetensors"


# a verb's hint "--skip-missing, Python: skip_missing=True" / "--dtype fp32 (Python: dtype='fp32')": the option
# named as the command line and as Python name it (one hyphenated, one underscored), with its value
_HINT = re.compile(r"--(?P<flag>[a-z][a-z0-9-]*)(?: [\w.-]+)?(?P<sep>, | \()Python: (?P<name>[a-z_]+)="
                   r"(?P<value>True|False|'[^']*'|-?[0-9][0-9.e+-]*)(?P<end>[,)])")


def in_recipe_terms(message: str) -> str:
    """A verb's message with its hints for an option (`--skip-missing, Python: skip_missing=True`) said as a recipe
    writes that option (`parameters: {skip_missing: true}`, or a stage field such as `dtype: fp32`): a stage runs
    as its verb's command, whose messages name the command line's options."""
    from lorafuse.recipes.schema import Parameters, Stage

    def recipe_form(m: re.Match[str]) -> str:
        name, value = m["name"], m["value"]
        if name != m["flag"].replace("-", "_") or name not in {*Parameters.model_fields, *Stage.model_fields}:
            return m[0]
        text = value.lower() if value in ("True", "False") else value.strip("'")
        said = f"{name}: {text}" if name in Stage.model_fields else f"parameters: {{{name}: {text}}}"
        return f"`{said}` in the recipe" + ("," if m["sep"] == ", " and m["end"] == "," else "")

    return _HINT.sub(recipe_form, message)


def _recipe_file(recipe: RecipeLike) -> Path | None:
    """The recipe's file when it was given as a path (load_recipe reads it), else None."""
    if isinstance(recipe, str) and not _is_text(recipe):
        return Path(recipe)
    return _given_path(recipe)


def _check_places(stages: Sequence[CheckedStage], recipe: RecipeText) -> None:
    """Refuse a model that is not beside the recipe (relative paths are read from the recipe's folder) but
    that the verb would find elsewhere: a name shaped like a Hub id (`org/name`) is passed on as one, and the
    verb takes a path of that name in the current folder first, so the recipe would silently read another
    adapter from each folder it is run in."""
    for s in stages:
        for x in s.models:
            if x.stage is not None or is_absolute(x.text):
                continue
            place = locate(recipe.folder, x.text)
            if place == x.text and os.path.lexists(x.text) and not os.path.lexists(recipe.folder / x.text):
                raise RecipeError(
                    f"{recipe.origin}, stage {s.name!r}: model {x.text!r} is not in the recipe's folder "
                    f"({recipe.folder / x.text} does not exist), but a path of that name is in the current folder: "
                    "a recipe reads relative paths from its own folder only; write the path from the recipe's "
                    "folder (or an absolute one)")


def _externals(stages: Sequence[CheckedStage], recipe: RecipeText, source: RecipeLike) -> list[Path]:
    """What the recipe reads that no stage of it writes: every stage's models, base and fine-tuned model named
    by path, where the verbs are given them (`locate`), and the recipe file itself. A Hub id is left out: its
    verb resolves it in the Hugging Face cache when it runs, and checks its own output against it."""
    found: dict[str, Path] = {}
    for s in stages:
        for x in s.models:
            if x.stage is not None:
                continue
            place = locate(recipe.folder, x.text)
            if not os.path.lexists(place) and is_hub_id(x.text):
                continue
            found.setdefault(place, Path(place))
    file = _recipe_file(source)
    if file is not None:
        found.setdefault(str(file), file)
    return list(found.values())


def _stage_kinds(stages: Sequence[CheckedStage], recipe: RecipeText) -> dict[str, str | None]:
    """What each stage writes (io.manifest.KINDS), by name: an adapter; apply's is what its base is, as apply's
    own check tells (output_kind: a merged pipeline for a pipeline folder, else a merged model), for a base that
    is an earlier apply stage's output what that stage writes; None where that cannot be told before the stages
    run (a Hub id, a missing base, an adapter stage as the base: the stage refuses it when it runs)."""
    from lorafuse.io.manifest import ADAPTER, CHECKPOINT, PIPELINE
    from lorafuse.io.pipeline import is_pipeline

    kinds: dict[str, str | None] = {}
    for s in stages:
        if s.verb != "apply":
            kinds[s.name] = ADAPTER
        elif s.base is not None and s.base.stage is not None:
            kinds[s.name] = kinds[s.base.stage] if kinds[s.base.stage] != ADAPTER else None
        else:
            assert s.base is not None
            place = locate(recipe.folder, s.base.text)
            kinds[s.name] = None if not os.path.lexists(place) else PIPELINE if is_pipeline(place) else CHECKPOINT
    return kinds


def _check_out(out: Path, overwrite: bool, externals: Sequence[Path], kind: str | None) -> None:
    """The output's own refusals (io.atomic's rules), before the first stage runs: an existing output that
    lorafuse did not write, or an earlier one of another kind (a merged model where the last stage writes an
    adapter), needs overwrite; and whatever `overwrite` says, the output may not be, hold or lie
    inside what any stage reads (`externals`: not only the last stage's inputs, which that stage checks again)
    nor the recipe file. `kind`: what the last stage writes (_stage_kinds)."""
    from lorafuse.io.atomic import check_output

    # os.path.isdir: False for a name the system refuses (too long), which check_output then says
    check_output(out, externals, folder=os.path.isdir(out), overwrite=overwrite, kind=kind)


def _overwrite_would_do(refusal: OutputError, stage: CheckedStage, recipe: RecipeText, out: Path,
                        externals: Sequence[Path], kind: str | None, extra: Sequence[str],
                        dispatch: Callable[[Sequence[str]], int]) -> None:
    """Before `refusal` (an existing `out` that --overwrite would replace) is raised with its advice to pass
    --overwrite: whether the last `stage` can write the name `out` at all. Its verb checks the name before
    the output (a PEFT adapter named x.safetensors), so its own dry run with --overwrite says, and its refusal
    is raised instead. A stage that reads an earlier stage's output cannot be planned yet: for a one-file name
    the advice then says that the name is checked when the stage starts."""
    from lorafuse.io.atomic import names_file

    try:
        _check_out(out, True, externals, kind)
    except OutputError:
        return  # refused whatever --overwrite says (an input): its message offers no --overwrite
    if stage.needs:
        if names_file(out):
            raise OutputError(f"{refusal}; whether stage {stage.name!r} ({stage.verb}) can write one file of that "
                              f"name is checked when it starts, after {', '.join(map(repr, stage.needs))} ran (a PEFT "
                              "adapter is a folder): a folder name is always taken") from None
        return
    _last_stage_takes(stage, recipe, str(out), [*extra, "--overwrite"], dispatch)


def _written_into(folder: Path) -> Path:
    """The file a one-file verb last put in `folder` (io.atomic.COMMITTED: `-o dir/` gets dir/NAME), else `folder`."""
    from lorafuse.io.atomic import COMMITTED

    inside = [p for p in COMMITTED if os.path.dirname(os.path.abspath(p)) == os.path.abspath(folder)]
    return Path(inside[-1]) if inside else folder


def _last_stage_takes(stage: CheckedStage, recipe: RecipeText, out: str, flags: Sequence[str],
                      dispatch: Callable[[Sequence[str]], int]) -> None:
    """The last `stage`, which reads no earlier stage's output, checked by its own dry run writing `out` (with
    `flags`): its verb's refusal of the output's name or place, raised naming the stage, before anything runs."""
    try:
        dispatch(argv_of(stage, recipe, out, {}, [*(f for f in flags if f != "-q"), "-q", "--dry-run"]))
    except LorafuseError as e:
        said = in_recipe_terms(str(e))
        raise type(e)(f"{recipe.origin}, stage {stage.name!r} ({stage.verb}): {said}") from None


def _format_of(x: Input, recipe: RecipeText, formats: Mapping[str, str | None]) -> str | None:
    """The adapter format of the model `x` before anything runs, or None when it cannot be told yet."""
    from lorafuse.formats import detect_format

    if x.stage is not None:
        return formats.get(x.stage)
    place = locate(recipe.folder, x.text)
    if not os.path.lexists(place):  # a Hub id (not resolved before the stage runs), or missing: the stage says so
        return None
    try:
        return detect_format(place)
    except (LorafuseError, OSError, ValueError):
        return None


def _planned_folders(stages: Sequence[CheckedStage], recipe: RecipeText) -> dict[str, bool | None]:
    """Whether each stage writes a folder (True) or one file (False), as _intermediate will decide it once the
    stages before it have run; None where that cannot be told before they run."""
    from lorafuse.ops.outputs import FOLDER_FORMATS

    formats: dict[str, str | None] = {}
    folders: dict[str, bool | None] = {}
    for s in stages:
        fmt: str | None = None
        folder: bool | None
        if s.verb == "extract":
            fmt, folder = "peft", True
        elif s.verb == "apply":
            assert s.base is not None
            folder = (folders.get(s.base.stage) if s.base.stage is not None
                      else not Path(locate(recipe.folder, s.base.text)).is_file())
        else:
            fmt = s.stage.format or _format_of(s.inputs[0], recipe, formats)
            folder = None if fmt is None else fmt in FOLDER_FORMATS
        formats[s.name], folders[s.name] = fmt, folder
    return folders


def _check_intermediate(work: Path, out: Path) -> None:
    """`intermediate_dir` must be a folder outside the output: the last stage replaces `out`, which would
    delete the intermediate outputs it reads (and leave a folder at `out` when it is refused)."""
    w, o = os.path.realpath(work), os.path.realpath(out)
    if w == o or w.startswith(o.rstrip(os.sep) + os.sep):
        raise OutputError(f"intermediate folder {work} is the output {out} or inside it (the last stage replaces the "
                          "output, deleting what the stages before it wrote): choose a folder outside the output")
    if os.path.lexists(work) and not work.is_dir():
        raise OutputError(f"intermediate folder {work} exists and is not a folder: choose a folder")


def _option_words() -> tuple[str, str]:
    """How messages name the intermediate folder and the output: `--intermediate-dir` and `-o` on the command
    line, `intermediate_dir` and `out` in Python (io.atomic.overwrite_words tells which is running)."""
    from lorafuse.io.atomic import overwrite_words

    return ("intermediate_dir", "out") if overwrite_words() == "overwrite=True" else ("--intermediate-dir", "-o")


def _check_intermediate_output(path: Path, folder: bool | None, name: str, work: Path, out: Path,
                               externals: Sequence[Path], kind: str | None) -> None:
    """What a stage before the last may write in `intermediate_dir` (`path`, a folder or one file; None: not
    known yet, so only what does not depend on it is checked): never an input of the recipe, a folder holding
    one, a path inside an input folder, or the current folder (io.atomic's rules, `overwrite` or not); never
    the output or a folder holding it; and an existing entry only when it is lorafuse's own earlier output of
    the same `kind` (io.manifest.KINDS; --overwrite replaces the output only, never an intermediate one)."""
    from lorafuse.io.atomic import check_output, check_output_path, overwrite_words

    option, output = _option_words()
    where = f"stage {name!r} writes its output to {path} (in {option} {work})"
    try:
        check_output_path(path, externals)
    except OutputError as e:
        raise OutputError(f"{where}, which is refused: {e}; nothing was written: choose another {option} "
                          "(or another name for the stage)") from None
    p, o = os.path.realpath(path), os.path.realpath(out)
    if o == p or o.startswith(p.rstrip(os.sep) + os.sep):
        raise OutputError(f"{where}, which is the output {out} or holds it (the stage would replace it before the "
                          f"last stage writes it): choose another output or another {option}")
    if folder is None or not os.path.lexists(path):
        return
    try:
        check_output(path, externals, folder=folder, overwrite=False, kind=kind)
    except OutputError as e:
        what = re.split(r"[:;.]? nothing was written", str(e), maxsplit=1)[0]
        raise OutputError(f"{where}, which exists and is not lorafuse's own earlier output of that kind: {what}. "
                          f"{overwrite_words()} "
                          f"replaces only the output ({output}), never what is in the intermediate folder: move "
                          f"{path} away, or choose another {option}; nothing was written") from None


def _check_intermediates(stages: Sequence[CheckedStage], recipe: RecipeText, work: Path, out: Path,
                         externals: Sequence[Path], kinds: Mapping[str, str | None]) -> None:
    """Every stage before the last, where it will write in `intermediate_dir`, checked before anything runs
    (both of the places a stage may write, a folder NAME and a file NAME.safetensors, when it cannot be told
    yet which: the stage is checked again, on the place it writes, just before it runs)."""
    _check_intermediate(work, out)
    planned = _planned_folders(stages, recipe)
    for s in stages[:-1]:
        folder = planned[s.name]
        for f in [True, False] if folder is None else [folder]:
            path = work / s.name if f else work / f"{s.name}.safetensors"
            _check_intermediate_output(path, f if folder is not None else None, s.name, work, out, externals,
                                       kinds[s.name])


_RUN_FOLDER = re.compile(r"\.lorafuse-run-(\d+)-[a-z0-9_]{8}\Z")


def _remove_dead_runs(folder: Path) -> None:
    """Remove the temporary folders (`.lorafuse-run-PID-XXXXXXXX`) of runs killed outright in `folder`: those
    whose process is gone and whose lock nobody holds (io.atomic's rule for its own temporary entries)."""
    from lorafuse.io.atomic import owner_gone, remove_entry

    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        m = _RUN_FOLDER.match(entry.name)
        if m and owner_gone(entry, int(m.group(1))):
            remove_entry(entry)


def _temporary_folder(out: Path) -> tuple[Path, int]:
    """A new folder `.lorafuse-run-PID-XXXXXXXX` beside `out` (in the system's temporary folder when the
    output's folder does not exist yet), and an open descriptor of it holding the lock that tells later runs
    this run is alive."""
    from lorafuse.io.atomic import lock_entry

    where = out.parent if os.path.lexists(out.parent) else Path(tempfile.gettempdir())
    if where != out.parent:  # (beside the output, run() has removed them)
        _remove_dead_runs(where)
    try:
        work = Path(tempfile.mkdtemp(prefix=f".lorafuse-run-{os.getpid()}-", dir=where))
    except OSError as e:
        raise OutputError(f"cannot create a temporary folder beside the output {out} (in {where}, for the outputs of "
                          f"the stages before the last): {e.strerror or e}; nothing was written") from e
    try:
        fd = os.open(work, os.O_RDONLY)
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise OutputError(f"cannot open the temporary folder {work}: {e.strerror or e}; nothing was written") from e
    lock_entry(fd)
    return work, fd


def _output_folder(out: Path) -> list[Path]:
    """Make the missing folders above `out` (its verb would make them for the last stage) so that the stages
    before the last write beside it, as the dry run plans and the docs say, not in the system's temporary folder
    (a tmpfs, in memory, on many systems); returns those made, for unmake_folders."""
    from lorafuse.io.atomic import make_folders

    if os.path.lexists(out.parent):
        return []
    try:
        return make_folders(out.parent)
    except OSError as e:
        raise OutputError(f"cannot create a temporary folder beside the output {out} (its folder {out.parent} cannot "
                          f"be made: {e.strerror or e}); nothing was written") from None


def _claim(work: Path) -> int | None:
    """An open descriptor of `intermediate_dir` holding an exclusive lock for this run: two runs writing their
    stages into one folder would read each other's outputs (the same stage names, each 'lorafuse's own')."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        fd = os.open(work, os.O_RDONLY)
    except OSError as e:
        raise OutputError(f"intermediate folder {work}: cannot open it: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"intermediate folder {work}: another lorafuse run is writing its stages there now; give "
                          "each run its own --intermediate-dir (intermediate_dir=)") from None
    except OSError:  # a file system without locks: go on unguarded
        pass
    return fd


def _make_folder(work: Path) -> list[Path]:
    """Make `intermediate_dir`; returns the folders made (removed again, if still empty, when the run fails:
    io.atomic.unmake_folders)."""
    from lorafuse.io.atomic import make_folders

    try:
        return make_folders(work)
    except OSError as e:
        raise OutputError(f"intermediate folder {work}: cannot make it: {e.strerror or e}") from None


def _show(line: str) -> None:
    """A line of the run's own output on stdout (a stage's command line), its controls escaped as every line the CLI
    shows is; a stdout that cannot take it is named in the error (`stdout: No space left on device`), as the CLI
    names it."""
    try:
        print(printable(line))
    except OSError as e:
        if e.filename is None:
            e.filename = "stdout"
        raise


def run(recipe: RecipeLike, out: str | bytes | os.PathLike[str] | os.PathLike[bytes], *, overwrite: bool = False,
        dry_run: bool = False, threads: int = 0, device: str | None = None, quiet: bool = True,
        intermediate_dir: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None = None,
        dispatch: Callable[[Sequence[str]], int] | None = None, progress: bool | None = None) -> RunReport:
    """Run a recipe (see lorafuse.recipes): every stage checked before the first runs, then each in order;
    the last writes `out`. `dry_run`: check everything, print each stage's plan (the verbs' --dry-run),
    write nothing. `quiet`: print nothing on success (the CLI passes False): each stage's command line and the
    verbs' output on stdout, the notes on stderr. `dispatch` runs one verb's command line, raising its
    LorafuseError (lorafuse.cli.dispatch: the CLI and lorafuse.run pass it; this layer does not import the CLI).
    `progress`: the stages' --progress (True) or --no-progress (False); None, their default (a bar when stderr
    is a terminal)."""
    if dispatch is None:
        raise RecipeError("run needs the CLI's dispatch (call lorafuse.run, or lorafuse run on the command line)")

    from lorafuse._validate import check_bool, check_path, check_threads
    from lorafuse.backends import check_device
    from lorafuse.io.atomic import check_output_path, names_folder
    from lorafuse.io.checkpoint import foreign_output
    from lorafuse.io.provenance import Invocation, Provenance, current_invocation, invoked, named_inputs, recorded_in

    # checked here, not by the verbs' parsers: a bad value must be a LorafuseValueError, not argparse's exit
    overwrite, dry_run, quiet = (check_bool(overwrite, "overwrite"), check_bool(dry_run, "dry_run"),
                                 check_bool(quiet, "quiet"))
    threads = check_threads(threads)
    out = check_path(out, "out")
    recipe = _given_path(recipe) or recipe  # a path as a Path, once (load_recipe and _recipe_file read it)
    if intermediate_dir is not None:  # '' would be the current folder
        intermediate_dir = check_path(intermediate_dir, "intermediate_dir")
    if device is not None:
        device = None if (named := check_device(device)) == "auto" else named
    start = time.perf_counter()
    text = load_recipe(recipe)
    stages = check(text, device)
    target = Path(out)
    notes = [f"stage {s.name!r}: base_model is not read by {s.verb} (the adapters' own config names their base); it "
             "is ignored" for s in stages if s.verb in ("combine", "resize") and s.stage.base_model is not None]
    notes += [f"stage {s.name!r}: merge_method linear is PEFT's: the A and the B factors are summed separately (each "
              "with the square root of its model's weight), which is not the weighted sum of the deltas (B_i A_j "
              "of different models enter too); mergekit's linear is that weighted sum divided by the weights' sum, "
              "as cat (exact) or svd (cut to a rank) give it here with weights that sum to 1"
              for s in stages if s.stage.merge_method == "linear" and len(s.inputs) > 1]
    notes += [f"stage {s.name!r}: merge_method {s.stage.merge_method} is PEFT's (on each LoRA factor); mergekit's "
              f"{s.stage.merge_method} works on the full deltas, as {s.stage.merge_method}_svd does here (then cut "
              "to a rank)"
              for s in stages if s.stage.merge_method in _PEFT_NAMED and len(s.inputs) > 1]
    if intermediate_dir is not None and len(stages) == 1:
        notes.append(f"{_option_words()[0]} {os.fsdecode(intermediate_dir)} is not used: a recipe of one stage "
                     "writes only the output")
    extra = (["--threads", str(threads)] if threads else []) + (["-q"] if quiet else [])
    if progress is not None:
        extra.append("--progress" if check_bool(progress, "progress") else "--no-progress")
    if device is not None:
        extra += ["--device", device]
    _check_places(stages, text)
    externals = _externals(stages, text, recipe)
    kinds = _stage_kinds(stages, text)
    one_file = _planned_folders(stages, text)[stages[-1].name] is False
    if (why := foreign_output(out, folder=not one_file)) is not None:  # (-o x.bin): every verb of a recipe refuses
        raise LorafuseValueError(f"{text.origin}, stage {stages[-1].name!r} ({stages[-1].verb}): {why}")
    if one_file and names_folder(out):
        # one file written into the folder -o names (`-o dir/`, an existing folder), as its verb does: the
        # file in it is checked by the verb, now by its dry run, or, reading an earlier stage, when it starts
        check_output_path(target, externals)
        if not stages[-1].needs:
            _last_stage_takes(stages[-1], text, out, [*extra, *(["--overwrite"] if overwrite else [])], dispatch)
    else:
        try:
            _check_out(target, overwrite, externals, kinds[stages[-1].name])
        except OutputError as e:
            if not overwrite:  # its advice is to pass --overwrite: said only where that would do
                _overwrite_would_do(e, stages[-1], text, target, externals, kinds[stages[-1].name], extra, dispatch)
            raise
    keep = intermediate_dir is not None and len(stages) > 1
    if keep:
        assert intermediate_dir is not None
        _check_intermediates(stages, text, Path(intermediate_dir), target, externals, kinds)
    if not dry_run and os.path.isdir(target.parent):
        _remove_dead_runs(target.parent)
    ran: list[StageRun] = []
    outputs: dict[str, Path] = {}
    records: dict[str, Provenance] = {}  # how each intermediate output was made (io.provenance)
    work: Path | None = None
    lock: int | None = None
    made: list[Path] = []
    done = False
    try:
        with invoked(text.text, "recipe"):
            for s in stages:
                last = s is stages[-1]
                if dry_run and s.needs:
                    ran.append(StageRun(s.name, s.verb, [], None))
                    if not quiet:
                        _show(f"stage {s.name!r} ({s.verb}): planned once {', '.join(map(repr, s.needs))} has run "
                              "(it reads that output; what its output may be named, a folder or one file, is checked "
                              "then)")
                    continue
                if not last and not dry_run and work is None:
                    if keep:
                        assert intermediate_dir is not None
                        work = Path(intermediate_dir)
                        made = _make_folder(work)
                        lock = _claim(work)
                    else:  # beside -o, where the dry run plans it: its folder made (and unmade if the run fails)
                        made = _output_folder(target)
                        work, lock = _temporary_folder(target)
                t0 = time.perf_counter()
                try:  # what goes wrong from here on names the recipe and the stage (reading its first model too)
                    if last:
                        stage_out = target
                    elif dry_run:  # planned where it would be written (never created): --intermediate-dir, else
                        # a temporary folder beside the output
                        stage_out = _intermediate(s, text, outputs, Path(intermediate_dir) if keep and intermediate_dir
                                                  is not None else target.parent / f".lorafuse-run-dry-{os.getpid()}")
                    else:
                        assert work is not None
                        stage_out = _intermediate(s, text, outputs, work)
                        if keep:  # checked before the first stage where it could be told; now where it writes
                            _check_intermediate_output(stage_out, stage_out == work / s.name, s.name, work, target,
                                                       externals, kinds[s.name])
                    flags = list(extra)
                    if dry_run:
                        flags.append("--dry-run")
                    if overwrite and last:  # --overwrite replaces the output, never an intermediate one
                        flags.append("--overwrite")
                    argv = argv_of(s, text, out if last else stage_out, outputs, flags)  # (-o as given: `dir/`)
                    if not quiet:
                        _show(f"stage {s.name!r}: {shlex.join(['lorafuse', *argv])}")  # as a shell reads it
                    with named_inputs(_names(s, text, outputs), {str(outputs[n]): records[n] for n in s.needs
                                                                 if n in records}):
                        dispatch(argv)
                except LorafuseError as e:
                    where = "" if keep or work is None or str(work) not in str(e) else (
                        f" ({work} is the run's temporary folder beside {target}, for the outputs of the stages "
                        "before the last; it is removed)")
                    said = in_recipe_terms(str(e))
                    head = f"{text.origin}, " if said.startswith(f"stage {s.name!r} ") else \
                        f"{text.origin}, stage {s.name!r} ({s.verb}): "  # (an intermediate output's check names it)
                    raise type(e)(f"{head}{said}{where}") from None
                wrote = None if dry_run else stage_out
                if wrote is not None and last and one_file and names_folder(out):
                    wrote = _written_into(wrote)  # the file its verb put in the folder -o names
                if wrote is not None:
                    outputs[s.name] = wrote
                    record = None if last else recorded_in(wrote, current_invocation())
                    if record is not None:  # its inputs: in the `stages` of the records of stages that read it
                        records[s.name] = dataclasses.replace(record,
                                                              invocation=Invocation("recipe", f"stage {s.name}"))
                ran.append(StageRun(s.name, s.verb, argv, wrote, time.perf_counter() - t0))
        done = True
    finally:
        from lorafuse.io.atomic import forget_outputs, remove_held, unmake_folders

        def end() -> None:
            if work is not None and not keep:
                shutil.rmtree(work, ignore_errors=True)
                forget_outputs(work)  # a stopped run's message names no stage output it removed
            if lock is not None:
                os.close(lock)
            if not done:
                unmake_folders(made)

        remove_held(end)  # a Ctrl-C meanwhile acts once the stages' folder is gone, not halfway through
    if not quiet:  # notes on stderr, as every verb's: stdout holds what a user pipes (the plan, the summaries)
        for note in notes:
            try:  # a stderr that cannot take it (a terminal that hung up) fails no finished run
                print(printable(f"note: {note}"), file=sys.stderr)
            except (OSError, ValueError):
                break
    final = ran[-1].out if ran and not dry_run else None
    return RunReport(final, ran, time.perf_counter() - start, notes, dry_run)


__all__ = ["RecipeLike", "RunReport", "StageRun", "argv_of", "load_recipe", "run"]
