"""Provenance: how an output was made, recorded in the output itself (issue #16).

A `Provenance` is a frozen record of one run: lorafuse's version, the operation (apply, combine, resize,
extract, convert), its method, its parameters (the options that decide the result: never the thread count,
the time or the output's path), every input (its name as given, its role, its weight, the sha256 of the
file, or of each file read from a folder, and the Hub repository and commit it came from) and how the run
was invoked: the command line (`invoked(command_text(argv, out), "command")`, which the CLI's main() sets:
verbatim but for the output's path, written OUT), the recipe (`invoked(recipe_text, "recipe")`, which
`lorafuse run` sets around its stages; the inner one wins), or, for a Python call with neither, an
equivalent `lorafuse.<operation>(...)` call made from the record. A recipe's stages are recorded once each:
an input that is an earlier stage's output names that stage (`stage`), and the record's `stages` map holds
each such stage's record by name (its own inputs naming the stages before it the same way), so the record
grows with the recipe, however often a stage is read.

Where it goes (the writers call these): `stamp(metadata, provenance)` puts `Provenance.metadata()` (the
`lorafuse.*` keys, str -> str, lists and dicts as JSON) into a safetensors file's `__metadata__`, dropping
any `lorafuse.*` key an input carried; `model_card(...)` is the README.md of a folder output (YAML front
matter, the recipe or command verbatim, the inputs with their sha256). `from_metadata` reads a record back
(info, and the adapter readers, so that re-saving an adapter keeps it). Nothing here depends on the time or
on the output's path: two runs of the same job, invoked the same way, write the same bytes.

Hashing: `Recording` starts computing the inputs' sha256 on background threads when an operation starts
(hashlib releases the GIL on large buffers), so that reading a many-GB base for its hash overlaps the work
that reads it anyway; `result()` waits for them. A file in a Hugging Face cache is a link to
`blobs/<sha256>` (LFS files): that name is its sha256, verified by huggingface_hub when it downloaded it,
and is taken without reading the file. Files of 64 MiB or more keep their sha256 in a cache between runs
(`cached_sha256`: one entry per version of a file), so a base merged again is not read for it.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from lorafuse._terminal import plural
from lorafuse.errors import FormatError, LorafuseError, LorafuseValueError
from lorafuse.io import hub as hub_ids
from lorafuse.io.manifest import version

PREFIX = "lorafuse."  # of every metadata key this module writes (the ownership mark `lorafuse_version` is not one)
OPERATIONS = ("apply", "combine", "resize", "extract", "convert")
ROLES = ("base", "adapter", "fine-tuned", "config")
INVOCATION_KEYS = {"command": PREFIX + "command", "recipe": PREFIX + "recipe", "python": PREFIX + "python"}
CARD_NAME = "README.md"
BASE_CARD_NAME = "BASE_README.md"  # a base's own README.md, kept beside lorafuse's card in apply's output
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what lorafuse reads of a PEFT folder
HASH_CHUNK = 1 << 20
CARD_MAX_INPUTS = 100  # rows of the model card's table of inputs (the metadata holds every input)
PYTHON_CALL_MAX_INPUTS = 20  # a recorded Python call names more adapters than this as `adapters`
PLACEHOLDER = "0" * 64  # a sha256 not computed yet: same length as the hash (headers are rewritten in place)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NOT_PARAMETERS = ("threads", "progress", "group_bytes", "ray_address")  # how a run goes, not what it makes

InvocationKind = Literal["command", "recipe"]


# ----------------------------------------------------------------------------- how the run was invoked


@dataclass(frozen=True)
class Invocation:
    """`kind` 'command' (a lorafuse command line), 'recipe' (the text of a `lorafuse run` recipe) or 'python'
    (a call made from the record, for a Python call that set neither), and its text, verbatim."""

    kind: str
    text: str


_CURRENT: contextvars.ContextVar[Invocation | None] = contextvars.ContextVar("lorafuse_invocation", default=None)


@contextmanager
def invoked(text: str, kind: InvocationKind) -> Iterator[None]:
    """Record `text` as how the outputs written inside this block were invoked: `kind` 'command' (the command
    line, e.g. shlex.join(['lorafuse', *argv])) or 'recipe' (a recipe's text, verbatim). Nested blocks: the
    inner one wins. A context variable: each thread (and asyncio task) has its own. Verbatim but for secrets
    (io.hub.redact): a URL's `user:password@` and a Hub token are never written into an output."""
    if kind not in ("command", "recipe"):
        raise LorafuseValueError(f"invoked: kind must be 'command' or 'recipe', got {kind!r}")
    if not isinstance(text, str):
        raise LorafuseValueError(f"invoked: text must be a str, got {type(text).__name__}")
    token = _CURRENT.set(Invocation(kind, _text(hub_ids.redact(text))))  # verbatim but for secrets
    try:
        yield
    finally:
        _CURRENT.reset(token)


_ALIASES: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("lorafuse_input_names",
                                                                                  default=None)
_MADE: contextvars.ContextVar[Mapping[str, Provenance] | None] = contextvars.ContextVar("lorafuse_inputs_made",
                                                                                      default=None)


@contextmanager
def named_inputs(aliases: Mapping[str, str], made: Mapping[str, Provenance] | None = None) -> Iterator[None]:
    """Inside this block an input given as one of `aliases`' keys (a path, as given) is recorded under its
    value: `lorafuse run` records an earlier stage's output, which lies in a temporary folder, by the stage's
    name, so that nothing recorded depends on where the intermediate outputs were. `made`: for an input named
    by such a name, the record of how it was made (its own inputs and their sha256): the input names the
    stage (InputRecord.stage) and the record's `stages` map holds that record, once, with the stages it was
    made from: the output of a recipe's last stage then names every input of the recipe, however deep, each
    stage recorded once however many stages read it."""
    token = _ALIASES.set({**(_ALIASES.get() or {}), **aliases})
    made_token = _MADE.set({**(_MADE.get() or {}), **(made or {})})
    try:
        yield
    finally:
        _MADE.reset(made_token)
        _ALIASES.reset(token)


def recorded_in(path: Path, invocation: Invocation | None = None) -> Provenance | None:
    """The record a lorafuse output holds (the metadata of its file, or of the first .safetensors file of its
    folder, in name order; in a pipeline folder, of its components' files), or None. `invocation`: only a
    record of that invocation (a pipeline's untouched components are copied as they are, with whatever record
    their files carry: only those lorafuse wrote in this run tell how it was made)."""
    from lorafuse.io.safetensors import read_header

    try:
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*/*.safetensors"))
        for file in files:
            record = Provenance.from_metadata(read_header(file)[1])
            if record is not None and (invocation is None or record.invocation == invocation):
                return record
        return None
    except (LorafuseError, OSError, ValueError):
        return None


def recorded_name(name: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """How an input given as `name` (a path as str, bytes or os.PathLike, or a Hub id) is recorded (its name,
    its base_model, its model card): `name` itself as text UTF-8 can hold (path_text), or inside named_inputs
    the name it stands for (a recipe's model as the recipe names it, an intermediate output by its stage's
    name)."""
    text = os.fsdecode(name)
    aliases = _ALIASES.get()
    return path_text(aliases.get(text, text) if aliases else text)


def recorded_base(name: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str | None:
    """The base model an output made from the base given as `name` belongs to (its `base_model`, its card's,
    extract's base_model_name_or_path): recorded_name(name), but for a recipe's earlier stage (named_inputs)
    that stage's own base_model (an apply stage's base), or None when its record names none: the stage's
    output is gone once the recipe has run, so its name would name nothing."""
    made = _MADE.get()
    text = os.fsdecode(name)
    if made and text in made:
        return made[text].base_model
    return recorded_name(name)


OUT = "OUT"  # how a recorded command line writes its output's path


_SHORT_FLAGS = "qh"  # the short options that take no value, which may come before -o in a group (-qo OUT)


def command_text(argv: Sequence[str], out: str | None = None) -> str:
    """The command line `lorafuse ARGV` as recorded: verbatim (shlex.join), but for the output's path `out`
    (the value of -o / --out, in any of argparse's spellings: `-o OUT`, `--out OUT`, `--out=OUT`, `-oOUT`,
    `-o=OUT`, and in a group of short options, `-qo OUT`, `-qoOUT`; the CLI takes no abbreviated option),
    written OUT: nothing written depends on where it is written, so a rerun into another folder gives the same
    bytes."""
    import shlex

    words = list(argv)
    if out:
        for i, w in enumerate(words):
            if w == "--":
                break
            value = _short_out(w) if not w.startswith("--") else w[len("--out="):] if w.startswith("--out=") else None
            if w == "--out" or value == "":  # the value is the next word
                if i + 1 < len(words) and _names_out(words[i + 1], out):
                    words[i + 1] = OUT
            elif value is not None and _names_out(value, out):
                words[i] = w[: len(w) - len(value)] + OUT
    return shlex.join(["lorafuse", *words])


def _names_out(word: str, out: str) -> bool:
    """Whether the word given for -o is the output `out`: as typed, or as the CLI reads it (a leading `~` expanded,
    `./~/x` made absolute)."""
    return word == out or os.path.expanduser(word) == out or os.path.abspath(word) == out  # (cli._path)


def _short_out(word: str) -> str | None:
    """The value of -o in a word of short options (`-o`: '', `-oX` / `-o=X`: 'X', `-qoX`: 'X'), else None."""
    at = word.find("o")
    if not word.startswith("-") or at < 1 or any(c not in _SHORT_FLAGS for c in word[1:at]):
        return None
    value = word[at + 1:]
    return value[1:] if at == 1 and value.startswith("=") else value


def current_invocation() -> Invocation | None:
    """The innermost `invoked` block around the caller, or None."""
    return _CURRENT.get()


def _text(s: str) -> str:
    """`s` as text that UTF-8 can hold: a lone surrogate (an undecodable byte of a file name) as \\xNN, any other
    (a JSON escape \\ud800 in a file's text) as \\ud800."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def path_text(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """A path (str, bytes or os.PathLike of either) as text that UTF-8 can hold: bytes decoded as the file
    system does (os.fsdecode), then _text (a byte no encoding decodes, as \\xNN)."""
    return _text(os.fsdecode(path))


# ----------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class InputRecord:
    """One input of a run: `name` as given, `role` (base, adapter, fine-tuned, config), `weight` (None where
    the operation takes none), `sha256` of a file input, `files` ((relative name, sha256) of each file read
    from a folder input), the Hub `repo_id` / `revision` / `commit` it came from, `made_by`: the record of
    an in-memory adapter (no file) made by lorafuse (or, in records written before lorafuse kept a stage map,
    of a recipe's intermediate output), and `stage`: the name of the recipe stage whose output it is (its
    record in the enclosing record's `stages`; named_inputs)."""

    name: str
    role: str
    weight: float | None = None
    sha256: str | None = None
    files: tuple[tuple[str, str], ...] = ()
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    made_by: Provenance | None = None
    stage: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "role": self.role}
        if self.weight is not None:
            d["weight"] = self.weight
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        if self.files:
            d["files"] = dict(self.files)
        if self.repo_id is not None:
            d["hub"] = {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}
        if self.made_by is not None:
            d["made_by"] = self.made_by.as_dict()
        if self.stage is not None:
            d["stage"] = self.stage
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputRecord:
        raw_hub, raw_files = d.get("hub"), d.get("files")
        hub: Mapping[str, Any] = raw_hub if isinstance(raw_hub, Mapping) else {}
        files: Mapping[str, Any] = raw_files if isinstance(raw_files, Mapping) else {}
        weight = d.get("weight")
        made = d.get("made_by")
        return cls(str(d["name"]), str(d["role"]),
                   float(weight) if isinstance(weight, int | float) and not isinstance(weight, bool) else None,
                   _str_or_none(d.get("sha256")), tuple((str(k), str(v)) for k, v in files.items()),
                   _str_or_none(hub.get("repo_id")), _str_or_none(hub.get("revision")),
                   _str_or_none(hub.get("commit")),
                   Provenance.from_dict(made) if isinstance(made, Mapping) else None, _str_or_none(d.get("stage")))

    def hashes(self) -> list[tuple[str, str]]:
        """(what, sha256) of what was read: ('', sha) for a file, (relative name, sha) for each file of a folder."""
        return [("", self.sha256)] if self.sha256 is not None else list(self.files)


def _str_or_none(x: object) -> str | None:
    return x if isinstance(x, str) else None


@dataclass(frozen=True)
class Provenance:
    """How an output was made (see the module docstring). `parameters`: JSON values by name, as the
    operation's Python function names them (None values left out); `base_model`: the base the output
    belongs to when known (the Hub id or path of apply's / extract's base; None otherwise); `stages`: the
    record of each recipe stage an input (or a stage before it) names, by name (each
    without a `stages` of its own: this map holds them all)."""

    operation: str
    inputs: tuple[InputRecord, ...]
    invocation: Invocation
    parameters: dict[str, Any] = field(default_factory=dict, hash=False)
    method: str | None = None
    base_model: str | None = None
    version: str = field(default_factory=version)
    stages: dict[str, Provenance] = field(default_factory=dict, hash=False)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": self.version, "operation": self.operation}
        if self.method is not None:
            d["method"] = self.method
        d["parameters"] = dict(self.parameters)
        d["inputs"] = [i.as_dict() for i in self.inputs]
        if self.stages:
            d["stages"] = {name: s.as_dict() for name, s in self.stages.items()}
        if self.base_model is not None:
            d["base_model"] = self.base_model
        d[self.invocation.kind] = self.invocation.text
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Provenance:
        kind = next((k for k in INVOCATION_KEYS if isinstance(d.get(k), str)), None)
        if kind is None:  # (a StopIteration here would end the generator of an enclosing record's inputs)
            raise KeyError("no invocation (command, recipe or python)")
        params, stages = d.get("parameters"), d.get("stages")
        return cls(str(d["operation"]), tuple(InputRecord.from_dict(i) for i in d["inputs"]),
                   Invocation(kind, d[kind]), dict(params) if isinstance(params, Mapping) else {},
                   _str_or_none(d.get("method")), _str_or_none(d.get("base_model")), str(d["version"]),
                   {str(k): cls.from_dict(v) for k, v in stages.items() if isinstance(v, Mapping)}
                   if isinstance(stages, Mapping) else {})

    def metadata(self) -> dict[str, str]:
        """The `lorafuse.*` keys of a safetensors `__metadata__`: lorafuse.version, .operation, .method (when
        there is one), .parameters and .inputs (JSON), .stages (JSON: a recipe's earlier stages, when an input
        is one), .base_model (when known), and .command, .recipe or .python (how it was invoked), in this order.
        A record nested too deeply for JSON (a Python chain of thousands of in-memory adapters) is a
        LorafuseValueError."""
        meta = {PREFIX + "version": self.version, PREFIX + "operation": self.operation}
        if self.method is not None:
            meta[PREFIX + "method"] = self.method
        try:
            meta[PREFIX + "parameters"] = _json(self.parameters)
            meta[PREFIX + "inputs"] = _json([i.as_dict() for i in self.inputs])
            if self.stages:
                meta[PREFIX + "stages"] = _json({name: s.as_dict() for name, s in self.stages.items()})
        except RecursionError:
            raise LorafuseValueError(f"the provenance of this {self.operation} output is nested too deeply to be "
                                     "written (an input made in memory from one made in memory, thousands deep): "
                                     "save an intermediate result to a file and read it back") from None
        if self.base_model is not None:
            meta[PREFIX + "base_model"] = self.base_model
        meta[INVOCATION_KEYS[self.invocation.kind]] = self.invocation.text
        return meta

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None) -> Provenance | None:
        """The record a file's `__metadata__` holds, or None when it holds none (or a malformed one: a file's
        metadata is whatever its writer put there; this never raises)."""
        if not metadata or PREFIX + "operation" not in metadata:
            return None
        try:
            d: dict[str, Any] = {"version": metadata[PREFIX + "version"],
                                 "operation": metadata[PREFIX + "operation"],
                                 "parameters": json.loads(metadata.get(PREFIX + "parameters", "{}")),
                                 "inputs": json.loads(metadata[PREFIX + "inputs"])}
            for key in ("method", "base_model", *INVOCATION_KEYS):
                if PREFIX + key in metadata:
                    d[key] = metadata[PREFIX + key]
            if PREFIX + "stages" in metadata:
                d["stages"] = json.loads(metadata[PREFIX + "stages"])
            if not isinstance(d["inputs"], list) or not all(isinstance(i, Mapping) for i in d["inputs"]):
                return None
            return cls.from_dict(d)
        except (KeyError, ValueError, TypeError, StopIteration, RecursionError, AttributeError, OverflowError):
            return None

    def python_call(self) -> str:
        """An equivalent call of lorafuse's Python API (`out` stands for the output's path)."""
        return python_call(self.operation, self.inputs, self.parameters, self.method)


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def is_provenance_key(key: str) -> bool:
    return key.startswith(PREFIX)


def stamp(metadata: Mapping[str, str], provenance: Provenance | None) -> dict[str, str]:
    """`metadata` without the `lorafuse.*` keys it carried (an input's record, which describes another file),
    with `provenance`'s keys after it (none when None)."""
    out = {k: v for k, v in metadata.items() if not is_provenance_key(k)}
    if provenance is not None:
        out.update(provenance.metadata())
    return out


def parameters(options: Mapping[str, Any], drop: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON form of an operation's options: None values, how the run goes (threads, progress, ...) and
    `drop` left out; tuples as lists. Refuses a value JSON cannot hold."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if v is None or k in _NOT_PARAMETERS or k in drop:
            continue
        out[k] = _jsonable(v, k)
    return out


def _jsonable(v: object, where: str) -> Any:
    if isinstance(v, bool | str) or v is None:
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise LorafuseValueError(f"parameter {where}: {v!r} is not a finite number")
        return float(v)
    if isinstance(v, os.PathLike):
        return path_text(v)
    if isinstance(v, list | tuple):
        return [_jsonable(x, where) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x, where) for k, x in v.items()}
    if hasattr(v, "item") and callable(v.item) and not isinstance(v, type):  # a numpy scalar (not its class)
        return _jsonable(v.item(), where)
    raise LorafuseValueError(f"parameter {where}: {type(v).__name__} values cannot be recorded")


# ----------------------------------------------------------------------------- the Python call


def python_call(operation: str, inputs: Sequence[InputRecord], params: Mapping[str, Any],
                method: str | None = None) -> str:
    """`lorafuse.<operation>(...)` with the inputs' names, the method and the parameters (`out`: the output's
    path, which no record holds)."""
    adapters = [i for i in inputs if i.role == "adapter"]
    bases = [i.name for i in inputs if i.role == "base"]
    tuned = [i.name for i in inputs if i.role == "fine-tuned"]
    weights = [1.0 if i.weight is None else i.weight for i in adapters]
    weighted = any(w != 1.0 for w in weights)
    args: list[str] = []
    preface = ""
    if operation == "combine" and len(adapters) > PYTHON_CALL_MAX_INPUTS:  # named, not spelled out
        args = ["adapters"] + (["weights"] if weighted else [])
        preface = (f"# adapters{', weights' if weighted else ''}: the {len(adapters)} inputs (and their weights) "
                   "listed under Inputs, in order\n")
    elif operation == "combine":
        args = [repr([a.name for a in adapters])] + ([repr(weights)] if weighted else [])
    elif operation == "apply":
        args = [repr(bases[0] if bases else None), repr([a.name for a in adapters])]
        args += [f"weights={weights!r}"] if weighted else []
    elif operation == "extract":
        args = [repr(bases[0] if bases else None), repr(tuned[0] if tuned else None)]
    else:  # resize, convert
        args = [repr(adapters[0].name if adapters else None)]
    if operation != "combine":
        args.append("out=out")
    if method is not None:
        args.append(f"method={method!r}")
    args += [f"{k}={v!r}" for k, v in params.items()]
    return f"import lorafuse\n\n{preface}lorafuse.{operation}({', '.join(args)})"


# ----------------------------------------------------------------------------- inputs and their hashes


class _AdapterLike(Protocol):
    """What recording an adapter input needs of it (model.Adapter; io does not import the model)."""

    path: Path | None
    provenance: Provenance | None

    @property
    def label(self) -> str: ...


@dataclass(frozen=True)
class InputSpec:
    """An input to record before its hash is known: its name as given, role, weight, the path read (a file,
    or a folder with `files`: the relative names of the files read from it) and an in-memory adapter's
    own record; or, for a recipe's earlier stage (named_inputs), `stage` (its name) and its record in
    `made_by` (kept in the new record's `stages`, not in the input)."""

    name: str
    role: str
    weight: float | None = None
    path: Path | None = None
    files: tuple[str, ...] = ()
    made_by: Provenance | None = None
    stage: str | None = None

    def __post_init__(self) -> None:
        given = self.name
        object.__setattr__(self, "name", recorded_name(given))
        made = _MADE.get()
        if self.made_by is None and made and given in made:
            object.__setattr__(self, "made_by", made[given])
            object.__setattr__(self, "stage", self.name)

    def paths(self) -> list[Path]:
        if self.path is None:
            return []
        return [self.path / f for f in self.files] if self.files else [self.path]


def adapter_input(item: str | bytes | os.PathLike[str] | os.PathLike[bytes] | _AdapterLike,
                  weight: float | None = None, role: str = "adapter",
                  name: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None = None) -> InputSpec:
    """An adapter input: a path as given (a file, or a PEFT folder: its config and weights file) or a loaded
    Adapter (its path; an in-memory one: no file, its own record). `name`: how the user named it, when
    `item` is the Adapter loaded from that name."""
    path: Path | None
    made_by: Provenance | None = None
    if isinstance(item, str | bytes | os.PathLike):
        name, path = path_text(item), Path(os.fsdecode(item))
        # the adapter read: a Hub id's in its snapshot (io.hub), a folder's one adapter file (formats.held)
        if not os.path.isfile(path):  # a file is the adapter itself (what loading read): no header read again
            path = _local_adapter(os.fsdecode(item)) or (path if os.path.lexists(path) else None)
    else:
        name, path, made_by = _text(item.label), item.path, item.provenance
        origin = hub_origin(path) if path is not None else None
        if origin is not None:  # loaded from a Hub id: named as the id, not by the cache's path
            name = origin[0] + (f"@{origin[1]}" if origin[1] else "")
    if isinstance(name, str | bytes | os.PathLike) and os.fspath(name):
        name = path_text(name)
    if path is None:
        return InputSpec(name, role, weight, made_by=made_by)
    if not isinstance(item, str | bytes | os.PathLike) and not os.path.lexists(path):  # a loaded adapter's file is gone
        from lorafuse.io.safetensors import mapped_bytes

        kept = tuple(f for f in PEFT_FILES if mapped_bytes(path / f) is not None)  # the bytes read, still mapped
        if kept:
            return InputSpec(name, role, weight, path, kept)
        return InputSpec(name, role, weight, None if mapped_bytes(path) is None else path, made_by=made_by)
    if os.path.isdir(path):  # os.path: False for a name the system refuses (too long), which the reader then says
        return InputSpec(name, role, weight, path, tuple(f for f in PEFT_FILES if (path / f).is_file()))
    return InputSpec(name, role, weight, path)


# How a spec names its local adapter (formats.held.located_adapter, set when lorafuse.formats is imported: formats
# reads through io, so io does not import it; an adapter named by a path was loaded through formats before its
# input is recorded).
_LOCATOR: list[Callable[[str], Path]] = []


def set_adapter_locator(locate: Callable[[str], Path]) -> None:
    """Set how adapter_input finds the adapter a spec names (formats.held calls this once)."""
    _LOCATOR[:] = [locate]


def _local_adapter(spec: str) -> Path | None:
    """The local adapter a spec names (the locator formats.held set: what the adapter's loading used too, a Hub
    id's in its snapshot, a folder's one adapter file), else None."""
    if not _LOCATOR:
        return None
    try:
        return _LOCATOR[0](spec)
    except (LorafuseError, OSError):
        return None


def folder_input(name: str | bytes | os.PathLike[str] | os.PathLike[bytes], path: Path, role: str,
                 files: Sequence[Path]) -> InputSpec:
    """A checkpoint or pipeline input: `name` as given, `path` where it is (a folder, or one file; a Hub id's
    snapshot) and the files read from it (a file: itself)."""
    if path.is_file():
        return InputSpec(path_text(name), role, path=path)
    rel = sorted(dict.fromkeys(os.path.relpath(f, path).replace(os.sep, "/") for f in files if Path(f).is_file()))
    return InputSpec(path_text(name), role, path=path, files=tuple(rel))


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 of a file of a Hugging Face cache snapshot from its blob's name (LFS files are stored as
    blobs/<sha256>), or None: not such a file (small files are stored under their git sha1, 40 digits)."""
    try:
        if path.name not in ("", ".", "..") and not _HEX64.fullmatch(path.name) and not os.path.islink(path):
            return None  # its resolved name is its own (no link to follow last), and not a blob's (1000s of inputs)
        real = Path(os.path.realpath(path))
    except (OSError, ValueError):
        return None
    return real.name if real.parent.name == "blobs" and _HEX64.fullmatch(real.name) else None


def hub_origin(path: Path) -> tuple[str, str | None, str] | None:
    """(repo id, revision asked for, commit) of a path inside a Hugging Face cache snapshot that a Hub id
    resolved to in this process (io.hub.hub_origin), or None."""
    try:
        found = hub_ids.hub_origin(path)
    except (LorafuseError, OSError, ValueError):
        return None
    if not found:
        return None
    repo, revision, commit = found
    return str(repo), (None if revision is None else str(revision)), str(commit)


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """The sha256 of a file's bytes (read in 1 MiB chunks, the GIL released while hashing). FormatError
    naming the file when it cannot be read; `stop` set: gives up (returns '')."""
    import hashlib

    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if stop is not None and stop.is_set():
                    return ""
                h.update(view[:n])
    except OSError as e:
        raise FormatError(f"{path}: cannot read it to record its sha256: {e.strerror or e}") from None
    return h.hexdigest()


def _read_version_sha256(path: Path) -> str | None:
    """The sha256 of the version of `path` this process mapped and read, where the file at `path` is another one
    now or none (an adapter loaded, then its file replaced or its folder deleted), else None."""
    import hashlib

    from lorafuse.io.safetensors import mapped_bytes

    mapping = mapped_bytes(path)
    if mapping is None:
        return None
    h = hashlib.sha256()
    view = memoryview(mapping)
    try:
        for at in range(0, len(view), HASH_CHUNK):
            h.update(view[at: at + HASH_CHUNK])
    finally:
        view.release()
    return h.hexdigest()


CACHE_MIN_BYTES = 64 << 20  # files at least this large have their sha256 kept in the hash cache
CACHE_ENV = "LORAFUSE_HASH_CACHE"  # a folder for the hash cache; '0' or '' turns it off
# A file changed less than this before it was hashed is not cached: on a file system with coarse times a
# rewrite within the same tick could keep its times (git's "racy" files).
CACHE_SETTLED_NS = 3_000_000_000


def hash_cache_dir() -> Path | None:
    """Where the sha256 of large input files are kept between runs: $LORAFUSE_HASH_CACHE, else
    $XDG_CACHE_HOME/lorafuse/sha256 (~/.cache/lorafuse/sha256); None when LORAFUSE_HASH_CACHE is '0' or ''."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env in ("", "0") else Path(env)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lorafuse" / "sha256"


def _cache_key(st: os.stat_result) -> str:
    """A file's identity and version: device, inode, size, modification and change times (the change time
    moves on any write, and no user tool can set it back), hashed into an entry name."""
    import hashlib

    ident = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    return hashlib.sha256(ident.encode("ascii")).hexdigest()


def cached_sha256(path: Path, stop: threading.Event | None = None) -> str:
    """sha256_file, through the hash cache for files of CACHE_MIN_BYTES or more (a base applied to again and
    again is read for its hash once): an entry per file version (hash_cache_dir, _cache_key), written for a
    file that had not changed for CACHE_SETTLED_NS when it was read. The cache is only an accelerator: an
    entry that cannot be read or written is ignored."""
    try:
        st = os.stat(path)
    except OSError:
        return sha256_file(path, stop)  # says why it cannot be read
    folder = hash_cache_dir() if st.st_size >= CACHE_MIN_BYTES else None
    if folder is None:
        return sha256_file(path, stop)
    entry = folder / _cache_key(st)
    value = _read_entry(entry)
    if value is not None:
        return value
    value = sha256_file(path, stop)
    settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > CACHE_SETTLED_NS
    try:
        if value and settled and os.stat(path) == st:  # unchanged while it was read
            _write_entry(folder, entry, value)
    except OSError:
        pass
    return value


def _read_entry(entry: Path) -> str | None:
    """A cache entry's hash: a regular file (a link is not followed) holding 64 hex digits, else None."""
    try:
        fd = os.open(entry, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        value = os.read(fd, 80).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)
    return value if _HEX64.fullmatch(value) else None


def _write_entry(folder: Path, entry: Path, value: str) -> None:
    """Write a cache entry through a new temporary file of its own (never a name someone else made: the cache
    folder may be shared), renamed into place; removed again when anything fails."""
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{entry.name}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(value + "\n")
        os.replace(name, entry)
    except BaseException:
        try:
            os.unlink(name)
        except OSError:
            pass
        raise


class Recording:
    """A Provenance being made: the inputs' sha256 are computed on `workers` background threads (the adapters
    first, then the other inputs in order, each one's files in order) from the moment it is made, while the
    operation runs;
    `draft()` is the record with a placeholder for each hash not known yet (the same length, for a header
    written before the data and rewritten in place), `result()` waits for the hashes. The invocation is
    the one current when it is made. As a context manager, leaving it stops the hashing (an error: at once)."""

    def __init__(self, operation: str, inputs: Sequence[InputSpec], params: Mapping[str, Any], *,
                 method: str | None = None, base_model: str | None = None, workers: int = 1,
                 hashing: bool = True) -> None:
        if operation not in OPERATIONS:
            raise LorafuseValueError(f"unknown operation {operation!r}; one of {', '.join(OPERATIONS)}")
        bad = [i.role for i in inputs if i.role not in ROLES]
        if bad:
            raise LorafuseValueError(f"unknown input role {bad[0]!r}; one of {', '.join(ROLES)}")
        # the base model's name as text UTF-8 can hold (a folder name no encoding decodes: its bytes as \\xNN)
        self.operation, self.method = operation, method
        self.base_model = None if base_model is None else _text(base_model)
        self.params = parameters(params, drop=("method",) if method is not None else ())
        self.specs = list(inputs)
        self._invocation = current_invocation()
        self._origins = {i: hub_origin(s.path) if s.path is not None else None for i, s in enumerate(self.specs)}
        self._known: dict[Path, str] = {}
        todo: dict[Path, None] = {}  # ordered, and a set: thousands of adapters stay linear
        for spec in sorted(self.specs, key=lambda i: i.role != "adapter"):  # adapters (small) first
            for p in spec.paths():
                if p in self._known or p in todo:
                    continue
                blob = hub_blob_sha256(p)
                if blob is not None:
                    self._known[p] = blob
                else:
                    todo[p] = None
        self._stop = threading.Event()
        self._futures: dict[Path, Future[str]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._todo = list(todo)
        self._check_size()
        if todo and hashing:
            try:
                self._pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo))),
                                                thread_name_prefix="lorafuse-sha256")
                for p in todo:
                    self._futures[p] = self._pool.submit(cached_sha256, p, self._stop)
            except RuntimeError:  # no thread can be started (a process or thread limit): hashed in result()
                self._futures.clear()
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = None

    def _check_size(self) -> None:
        """LorafuseValueError when the record (its hashes as placeholders of their length) would not fit the
        metadata of a safetensors header that lorafuse reads back: refused before any input is read or hashed,
        not once the output is written. The record names every input (nothing of it is left out)."""
        from lorafuse.io.safetensors import metadata_problem  # (io.safetensors does not read this module)

        why = metadata_problem(self._make(False).metadata())
        if why is None:
            return
        more = ("; combine fewer adapters at once, or name them by shorter paths (the record holds each input's name "
                "as given)" if self.operation == "combine" else "")
        raise LorafuseValueError(f"the provenance record of this {self.operation} names each of its "
                                 f"{plural(len(self.specs), 'input')} with its sha256 and weight, which would take "
                                 f"{why} from a header: its output could not be read back{more}; nothing was written")

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(cancel=exc is not None)

    def close(self, cancel: bool = True) -> None:
        """Stop hashing (what is running gives up after its current chunk) and join the threads."""
        if cancel:
            self._stop.set()
            for f in self._futures.values():
                f.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _hash(self, p: Path, wait: bool) -> str:
        if p in self._known:
            return self._known[p]
        if not wait:
            return PLACEHOLDER
        read = _read_version_sha256(p)  # the file read was replaced or deleted since: its own bytes count
        f = self._futures.get(p)
        value = read if read is not None else f.result() if f is not None else cached_sha256(p)
        if not value:
            raise LorafuseValueError(f"{p}: its sha256 was not computed (the recording was stopped)")
        self._known[p] = value
        return value

    def _make(self, wait: bool) -> Provenance:
        records = []
        for i, spec in enumerate(self.specs):
            origin = self._origins[i]
            repo, revision, commit = origin if origin is not None else (None, None, None)
            made = None if spec.stage is not None else spec.made_by  # a stage's record goes to `stages`
            if spec.path is None:
                records.append(InputRecord(spec.name, spec.role, spec.weight, made_by=made, stage=spec.stage))
            elif spec.files:
                files = tuple((f, self._hash(spec.path / f, wait)) for f in spec.files)
                records.append(InputRecord(spec.name, spec.role, spec.weight, files=files, repo_id=repo,
                                           revision=revision, commit=commit, made_by=made, stage=spec.stage))
            else:
                records.append(InputRecord(spec.name, spec.role, spec.weight, self._hash(spec.path, wait),
                                           repo_id=repo, revision=revision, commit=commit, made_by=made,
                                           stage=spec.stage))
        inputs = tuple(records)
        invocation = self._invocation or Invocation("python", python_call(self.operation, inputs, self.params,
                                                                          self.method))
        return Provenance(self.operation, inputs, invocation, dict(self.params), self.method, self.base_model,
                          stages=_stage_map(self.specs))

    def draft(self) -> Provenance:
        """The record now, a placeholder for each hash not computed yet (same length as the final one)."""
        return self._make(False)

    def result(self) -> Provenance:
        """The record, every hash computed (waits for the background threads)."""
        try:
            return self._make(True)
        finally:
            self.close(cancel=False)


def record(operation: str, inputs: Sequence[InputSpec], params: Mapping[str, Any], *, method: str | None = None,
           base_model: str | None = None, workers: int = 1) -> Provenance:
    """Recording(...).result(): the record, hashing the inputs now (small inputs: adapters)."""
    with Recording(operation, inputs, params, method=method, base_model=base_model, workers=workers) as rec:
        return rec.result()


def given_name(item: object) -> str | None:
    """The name an input was given by, when it is a path (str, bytes or os.PathLike: path_text), else None."""
    return path_text(item) if isinstance(item, str | bytes | os.PathLike) else None


def rewrite_metadata(path: Path, specs: Sequence[Any], metadata: Mapping[str, str]) -> None:
    """Replace the header of the safetensors file `path` (written with tensors `specs`, in order) by one with
    `metadata`, which must encode to the same length (placeholders replaced by their values)."""
    import struct

    from lorafuse.io.safetensors import encode_header

    fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        head = os.pread(fd, 8, 0)
        written = 8 + struct.unpack("<Q", head)[0] if len(head) == 8 else None
        header, _ = encode_header(specs, metadata, written)  # padded as the header written (encode_header)
        if written != len(header):
            raise LorafuseValueError(f"{path}: the final metadata makes a header of {len(header)} bytes, not the "
                                     "length already written")
        if os.pwrite(fd, header, 0) != len(header):
            raise OSError(5, "short write of the header", str(path))
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the model card


_YAML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")


def _yaml_str(s: str) -> str:
    """A YAML double-quoted scalar for `s` (JSON's escapes, which YAML reads the same; characters YAML does
    not allow in a document escaped too)."""
    return _YAML_BAD.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(s, ensure_ascii=False))


def _fence(text: str, lang: str) -> str:
    """A fenced code block holding `text` verbatim (the fence longer than any run of backticks in it)."""
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, run + 1)
    return f"{ticks}{lang}\n{text.rstrip(chr(10))}\n{ticks}"


def _code(text: str) -> str:
    """`text` as an inline code span for a table cell (pipes escaped, one line)."""
    text = " ".join(text.split()).replace("|", "\\|")
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


_WHAT = {"apply": ("model", "merged"), "combine": ("LoRA adapter", "combined"), "resize": ("LoRA adapter", "resized"),
         "extract": ("LoRA adapter", "extracted"), "convert": ("LoRA adapter", "converted")}


def _stage_map(specs: Sequence[InputSpec]) -> dict[str, Provenance]:
    """The `stages` of a record whose inputs are `specs`: the record of each stage an input is the output of,
    after the stages that record names (its own `stages`), each once, without a `stages` of its own."""
    import dataclasses

    out: dict[str, Provenance] = {}
    for spec in specs:
        if spec.stage is None or spec.made_by is None:
            continue
        for name, made in spec.made_by.stages.items():
            out.setdefault(name, made)
        out.setdefault(spec.stage, dataclasses.replace(spec.made_by, stages={}))
    return out


def flat_inputs(inputs: Sequence[InputRecord], prefix: str = "",
                stages: Mapping[str, Provenance] | None = None) -> list[tuple[str, InputRecord]]:
    """The inputs with their numbers ('1', '2', ...), each followed by the inputs it was made from when it is a
    recipe's intermediate output ('2.1', '2.2', ...), however deep: the stage's record in `stages` (its inputs
    listed once, under the first input that names the stage: see listed_under), or, in a record written
    before the stage map, the input's own `made_by`."""
    rows: list[tuple[str, InputRecord]] = []
    expanded: set[str] = set()
    todo: list[tuple[str, Iterator[tuple[int, InputRecord]]]] = [(prefix, iter(enumerate(inputs, 1)))]
    while todo:  # depth first, without recursion: a chain of thousands of stages
        at, items = todo[-1]
        step = next(items, None)
        if step is None:
            todo.pop()
            continue
        label = f"{at}{step[0]}"
        i = step[1]
        rows.append((label, i))
        made: Provenance | None = None
        if i.stage is not None and stages and i.stage in stages:
            if i.stage not in expanded:
                expanded.add(i.stage)
                made = stages[i.stage]
        elif i.made_by is not None and i.hashes():  # an output on disk made by an earlier stage (older records)
            made = i.made_by
        if made is not None:
            todo.append((label + ".", iter(enumerate(made.inputs, 1))))
    return rows


def listed_under(rows: Sequence[tuple[str, InputRecord]], stages: Mapping[str, Provenance]) -> dict[str, str]:
    """For each row of flat_inputs that names a stage listed already (a stage read twice), the number of the row
    its inputs are listed under."""
    first: dict[str, str] = {}
    again: dict[str, str] = {}
    for label, i in rows:
        if i.stage is None or i.stage not in stages:
            continue
        if i.stage in first:
            again[label] = first[i.stage]
        else:
            first[i.stage] = label
    return again


def card_base_model(base: str) -> str | None:
    """The `base_model` of a model card's front matter for a base named `base`: the Hub repository id it names
    (`org/name`; `org/name@revision` as `org/name`, the revision being in the provenance record), or None where
    it is a local path (absolute, `./x`, more parts, or naming something on disk here). The Hub refuses a card
    whose base_model is not a model id (uploading the output fails), and a path would publish where the base
    lay on the author's disk: transformers leaves a local base out of its cards the same way. The card's text and
    the metadata keep the name as given; PEFT's adapter_config.json keeps base_model_name_or_path."""
    if os.path.lexists(base):
        return None
    return hub_ids.repo_of(base)


def model_card(provenance: Provenance, *, base_model: str | None = None, library_name: str | None = None,
               base_card: str | None = None) -> str:
    """README.md of a folder output: YAML front matter (`base_model` when known and a Hub id: card_base_model;
    `library_name` when given, `tags` lorafuse, lora, merge and the operation), how it was made (the recipe or
    command verbatim, or the equivalent Python call), the inputs with their sha256 and weights, and the
    parameters. `base_card`: the name of the base's own card kept beside it (apply), linked."""
    p = provenance
    base = base_model if base_model is not None else p.base_model
    front = ["---"]
    hub_base = card_base_model(base) if base else None
    if hub_base:
        front.append(f"base_model: {_yaml_str(hub_base)}")
    if library_name:
        front.append(f"library_name: {_yaml_str(library_name)}")
    front += ["tags:"] + [f"- {t}" for t in dict.fromkeys(("lorafuse", "lora", "merge", p.operation))] + ["---"]
    how = f"`lorafuse {p.operation}`" + (f" (method `{p.method}`)" if p.method else "")
    noun, done = _WHAT.get(p.operation, ("output", "made"))
    lines = front + ["", f"# {noun[0].upper()}{noun[1:]} {done} with lorafuse", "",
                     f"This {noun} was made by {how}, lorafuse {p.version}, from the inputs listed below."]
    if base:
        lines += ["", f"Base model: {_code(base)}."]
    if base_card:
        lines += ["", f"The base model's own card is kept beside this one: [{base_card}]({base_card})."]
    lines += ["", "## How it was made", ""]
    if p.invocation.kind == "recipe":
        lines += ["The recipe (`lorafuse run`):", "", _fence(p.invocation.text, "yaml")]
    elif p.invocation.kind == "command":
        lines += ["The command:", "", _fence(p.invocation.text, "sh")]
    else:
        lines += ["The Python call (`out`: the output's path):", "", _fence(p.invocation.text, "python")]
    lines += ["", "## Inputs", "", "| # | Input | Role | Weight | sha256 |", "|---|---|---|---|---|"]
    rows = flat_inputs(p.inputs, stages=p.stages)
    again = listed_under(rows, p.stages)
    for n, i in rows[:CARD_MAX_INPUTS]:
        hashes = i.hashes()
        if hashes:
            cell = "<br>".join((f"{_code(what)}: " if what else "") + _code(sha) for what, sha in hashes)
        elif i.made_by is not None:
            cell = f"(in memory: made by lorafuse {i.made_by.operation})"
        else:
            cell = "(in memory)"
        name = _code(i.name) + (f" (Hub {_code(i.repo_id)} at {_code(i.commit or '?')})" if i.repo_id else "")
        name += f" (stage; made from the inputs under {again[n]})" if n in again else ""
        weight = "" if i.weight is None else f"{i.weight:g}"
        lines.append(f"| {n} | {name} | {i.role} | {weight} | {cell} |")
    if len(rows) > CARD_MAX_INPUTS:
        lines += ["", f"... and {len(rows) - CARD_MAX_INPUTS} more: all {len(rows)} inputs, with their sha256, "
                  "are in the metadata (`lorafuse info --json`)."]
    if len(rows) > len(p.inputs):  # named by the first input made by an earlier stage (1.1 under a resize's input 1)
        made = next(n for n, _ in rows if "." in n).rsplit(".", 1)[0]
        lines += ["", f"Inputs numbered {made}.1, {made}.2, ... are those input {made} was made from (an earlier stage "
                  "of the recipe), and so on at every level."]
    if p.parameters:
        lines += ["", "## Parameters", "", "| Parameter | Value |", "|---|---|"]
        lines += [f"| {k} | {_code(_json(v))} |" for k, v in sorted(p.parameters.items())]
    lines += ["", "The same facts are in the `__metadata__` of the output's .safetensors files (the `lorafuse.*` "
              "keys); `lorafuse info` shows them.", ""]
    return "\n".join(lines)


def keep_base_card(folder: Path) -> str | None:
    """Move a README.md copied from the base into `folder` aside, so that lorafuse's card can take its name:
    to BASE_README.md, or BASE_README.2.md, ... when the base kept one already. Returns the name it got."""
    card = folder / CARD_NAME
    if not card.is_file() or card.is_symlink():
        return None
    n = 1
    while True:
        name = BASE_CARD_NAME if n == 1 else f"{BASE_CARD_NAME[:-3]}.{n}.md"
        if not os.path.lexists(folder / name):
            os.rename(card, folder / name)
            return name
        n += 1


def _one_line(s: str) -> str:
    """A name read from a file, on one line of `lorafuse info` (a line feed in it would forge a line)."""
    return s.replace("\n", "\\n")


def describe_lines(d: object) -> list[str]:
    """How `lorafuse info` shows a record (Provenance.as_dict): a few indented lines; [] for anything else."""
    if not isinstance(d, Mapping) or not d:
        return []
    try:
        p = Provenance.from_dict(d)
        shown = {k: json.dumps(v, sort_keys=True, ensure_ascii=False) for k, v in sorted(p.parameters.items())}
    except (KeyError, ValueError, TypeError, StopIteration, RecursionError, AttributeError, OverflowError):
        return []
    one = _one_line
    how = f"lorafuse {one(p.version)} {one(p.operation)}" + (f" (method {one(p.method)})" if p.method else "")
    lines = [f"  made by     {how}"]
    if p.parameters:
        lines.append("  options     " + ", ".join(f"{one(k)}={one(v)}" for k, v in shown.items()))
    rows = flat_inputs(p.inputs, stages=p.stages)
    again = listed_under(rows, p.stages)
    for n, i in rows:
        weight = "" if i.weight is None else f", weight {i.weight:g}"
        hub = f", Hub {one(i.repo_id)}@{one(str(i.commit))}" if i.repo_id else ""
        lines.append(f"  input {n:<5} {one(i.name)} ({one(i.role)}{weight}{hub})")
        for what, sha in i.hashes():
            lines.append(f"      sha256 {one(sha)}" + (f"  {one(what)}" if what else ""))
        if n in again:
            lines.append(f"      made from the inputs under input {again[n]} (the same stage)")
        if not i.hashes() and i.made_by is not None:
            lines.append(f"      in memory, made by lorafuse {i.made_by.operation}")
    label = {"command": "command", "recipe": "recipe", "python": "python"}[p.invocation.kind]
    text = p.invocation.text.rstrip("\n").split("\n")
    lines.append(f"  {label:<11} {text[0]}")
    lines += [f"              {t}".rstrip() for t in text[1:]]
    return lines


__all__ = ["BASE_CARD_NAME", "CACHE_ENV", "CARD_NAME", "OPERATIONS", "OUT", "PLACEHOLDER", "PREFIX", "ROLES",
           "InputRecord", "InputSpec", "Invocation", "Provenance", "Recording", "adapter_input", "cached_sha256",
           "card_base_model",
           "command_text", "current_invocation", "describe_lines", "flat_inputs", "folder_input", "given_name",
           "hash_cache_dir", "hub_blob_sha256", "hub_origin", "invoked", "is_provenance_key", "keep_base_card",
           "listed_under", "model_card", "parameters", "path_text", "python_call", "record", "recorded_base",
           "recorded_name", "rewrite_metadata", "sha256_file", "stamp"]
