"""Running a recipe: each stage becomes the command line of its verb (`lorafuse combine ...`, `lorafuse apply
...`) and runs through the CLI's own command, so a recipe does exactly what those commands typed by hand do,
bit for bit, with the same checks and messages.

Stages run in order. Every stage but the last writes into an intermediate folder (a temporary folder beside
the output, removed at the end, or `intermediate_dir`, kept); the last writes `out`. The output is checked
before the first stage runs, so a refused output costs no work, and a failing stage leaves `out` as it was.
The whole run is recorded as the recipe, verbatim, in every output's provenance.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lorafuse.errors import LorafuseError, OutputError
from lorafuse.recipes.checks import CheckedStage, Input, check
from lorafuse.recipes.paths import locate
from lorafuse.recipes.schema import DTYPES
from lorafuse.recipes.source import RecipeError, RecipeText, parse, read

RecipeLike = str | os.PathLike[str] | Mapping[str, Any] | Sequence[Mapping[str, Any]]


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


def load_recipe(recipe: RecipeLike) -> RecipeText:
    """A recipe from a path to a YAML file, YAML text (a string holding a newline), or the data itself (a
    mapping for one stage, a sequence of mappings for several)."""
    if isinstance(recipe, Mapping) or (isinstance(recipe, Sequence) and not isinstance(recipe, str)):
        import yaml

        docs = [recipe] if isinstance(recipe, Mapping) else list(recipe)
        bad = next((d for d in docs if not isinstance(d, Mapping)), None)
        if bad is not None or not isinstance(recipe, Mapping | list | tuple):  # bytes are a Sequence too
            what = type(bad if isinstance(recipe, Mapping | list | tuple) else recipe).__name__
            raise RecipeError(f"a recipe given as data is a mapping (one stage) or a list of mappings, not {what}")
        try:
            text = yaml.safe_dump_all([dict(d) for d in docs], sort_keys=False)
        except (yaml.YAMLError, RecursionError) as e:  # a Path, a numpy scalar, a list that holds itself
            held = e.args[1] if isinstance(e, yaml.YAMLError) and len(e.args) > 1 else None
            which = f"a {type(held).__name__} value" if held is not None else "a value nested too deeply"
            raise RecipeError(f"<recipe>: {which} cannot be a recipe's: give str, int, float, bool, lists and "
                              "mappings of them (a path as str)") from None
        return parse(text, "<recipe>", Path.cwd())
    if isinstance(recipe, str) and "\n" in recipe:
        return parse(recipe, "<recipe>", Path.cwd())
    if isinstance(recipe, (str, os.PathLike)):
        return read(Path(recipe))
    raise RecipeError(f"a recipe is a path, YAML text or a mapping, not {type(recipe).__name__}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _number(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else str(int(x)) if abs(x) < 2**53 else repr(float(x))


def _place(stage: CheckedStage, x: Input, recipe: RecipeText, outputs: Mapping[str, Path]) -> str:
    return str(outputs[x.stage]) if x.stage is not None else locate(recipe.folder, x.text)


def argv_of(stage: CheckedStage, recipe: RecipeText, out: Path, outputs: Mapping[str, Path],
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


def _check_out(out: Path, overwrite: bool) -> None:
    """The output's own refusals (io.atomic's rules: an existing output that lorafuse did not write needs
    overwrite), before the first stage runs; the last stage checks it again, against its inputs."""
    from lorafuse.io.atomic import check_output

    if os.path.lexists(out):
        check_output(out, (), folder=out.is_dir(), overwrite=overwrite)


def _check_intermediate(work: Path, out: Path) -> None:
    """`intermediate_dir` must be a folder outside the output: the last stage replaces `out`, which would
    delete the intermediate outputs it reads (and leave a folder at `out` when it is refused)."""
    w, o = os.path.realpath(work), os.path.realpath(out)
    if w == o or w.startswith(o.rstrip(os.sep) + os.sep):
        raise OutputError(f"intermediate folder {work} is the output {out} or inside it (the last stage replaces the "
                          "output, deleting what the stages before it wrote): choose a folder outside the output")
    if os.path.lexists(work) and not work.is_dir():
        raise OutputError(f"intermediate folder {work} exists and is not a folder: choose a folder")


def run(recipe: RecipeLike, out: str | os.PathLike[str], *, overwrite: bool = False, dry_run: bool = False,
        threads: int = 0, device: str | None = None, quiet: bool = True,
        intermediate_dir: str | os.PathLike[str] | None = None,
        dispatch: Callable[[Sequence[str]], int] | None = None) -> RunReport:
    """Run a recipe (see lorafuse.recipes): every stage checked before the first runs, then each in order;
    the last writes `out`. `dry_run`: check everything, print each stage's plan (the verbs' --dry-run),
    write nothing. `quiet`: print nothing on success (the CLI passes False). `dispatch` runs one verb's
    command line, raising its LorafuseError (lorafuse.cli.dispatch: the CLI and lorafuse.run pass it; this
    layer does not import the CLI)."""
    if dispatch is None:
        raise RecipeError("run needs the CLI's dispatch (call lorafuse.run, or lorafuse run on the command line)")

    from lorafuse.io.provenance import invoked, named_inputs

    start = time.perf_counter()
    text = load_recipe(recipe)
    stages = check(text)
    target = Path(out)
    notes = [f"stage {s.name!r}: base_model is not read by combine (the adapters' own config names their base); it "
             "is ignored" for s in stages if s.verb == "combine" and s.stage.base_model is not None]
    extra = (["--threads", str(threads)] if threads else []) + (["-q"] if quiet else [])
    if device is not None:
        extra += ["--device", device]
    if not dry_run:
        _check_out(target, overwrite)
    if intermediate_dir is not None and len(stages) > 1:
        _check_intermediate(Path(intermediate_dir), target)
    ran: list[StageRun] = []
    outputs: dict[str, Path] = {}
    keep = intermediate_dir is not None
    work: Path | None = None
    try:
        with invoked(text.text, "recipe"):
            for s in stages:
                last = s is stages[-1]
                if dry_run and s.needs:
                    ran.append(StageRun(s.name, s.verb, [], None))
                    if not quiet:
                        print(f"stage {s.name!r} ({s.verb}): planned once {', '.join(map(repr, s.needs))} has run "
                              "(it reads that output)")
                    continue
                if last:
                    stage_out = target
                elif dry_run:  # planned beside the output, never created
                    parent = target.parent if str(target.parent) else Path(".")
                    stage_out = _intermediate(s, text, outputs, parent / f".lorafuse-run-dry-{os.getpid()}")
                else:
                    if work is None:
                        if keep:
                            assert intermediate_dir is not None
                            work = Path(intermediate_dir)
                            try:
                                work.mkdir(parents=True, exist_ok=True)
                            except OSError as e:
                                raise OutputError(f"intermediate folder {work}: cannot make it: "
                                                  f"{e.strerror or e}") from None
                        else:
                            parent = target.parent if str(target.parent) else Path(".")
                            work = Path(tempfile.mkdtemp(prefix=".lorafuse-run-", dir=parent if parent.exists() else
                                                         None))
                    stage_out = _intermediate(s, text, outputs, work)
                    if keep and stage_out.exists() and not overwrite:
                        raise OutputError(f"{stage_out} (stage {s.name!r}'s output) exists; give --overwrite or "
                                          "another --intermediate-dir")
                flags = list(extra)
                if dry_run:
                    flags.append("--dry-run")
                if overwrite and (last or keep):
                    flags.append("--overwrite")
                argv = argv_of(s, text, stage_out, outputs, flags)
                if not quiet:
                    print(f"stage {s.name!r}: lorafuse {' '.join(argv)}")
                t0 = time.perf_counter()
                try:
                    with named_inputs({str(outputs[n]): n for n in s.needs}):
                        dispatch(argv)
                except LorafuseError as e:
                    raise type(e)(f"{text.origin}, stage {s.name!r} ({s.verb}): {e}") from None
                wrote = None if dry_run else stage_out
                if wrote is not None:
                    outputs[s.name] = wrote
                ran.append(StageRun(s.name, s.verb, argv, wrote, time.perf_counter() - t0))
    finally:
        if work is not None and not keep:
            shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        for note in notes:
            print(f"note: {note}")
    final = ran[-1].out if ran and not dry_run else None
    return RunReport(final, ran, time.perf_counter() - start, notes, dry_run)


__all__ = ["RecipeLike", "RunReport", "StageRun", "argv_of", "load_recipe", "run"]
