"""Hugging Face Hub ids wherever lorafuse takes an input path: `org/name` or `org/name@revision`.

The rule: a spec that exists on disk (a file, a folder, a link) is a path, always, so a local folder
named `org/name` wins. Otherwise a spec of exactly the shape `NAMESPACE/NAME[@REVISION]` (each part
letters, digits, `_`, `-` and `.`, starting and ending with a letter, digit or `_`, at most 96
characters, without `--` or `..`; not ending in `.safetensors` or `.git`) is a model repository on the
Hub; the revision is a branch, a tag or a commit sha. Anything else is a path, which fails later as any
missing path does.

A Hub id is resolved with `huggingface_hub.snapshot_download` into the Hugging Face cache, downloading
only the files lorafuse reads or copies (`HUB_FILES`: safetensors weights and their indexes, JSON
configs, tokenizer files, the model card). huggingface_hub itself decides where the cache is and
whether to go online (`HF_HUB_CACHE`, `HF_HOME`, `HF_HUB_OFFLINE`, ...), but it reads those variables
once, when it is imported: lorafuse reads the same variables at each call and hands huggingface_hub
what they say, so a variable set after the import counts too.

`hub_origin(path)` tells, for a path that a Hub resolution in this process gave (the snapshot folder or
anything inside it), which repository, revision and commit it came from (for provenance records).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

from lorafuse._terminal import short
from lorafuse._validate import check_path
from lorafuse.errors import FormatError, LorafuseValueError, UnsupportedError

# What lorafuse reads or copies from a model or adapter repository (huggingface_hub's fnmatch patterns: `*`
# matches `/` too, so each also finds the files of a diffusers pipeline's component folders).
WEIGHTS = "*.safetensors"
HUB_FILES: tuple[str, ...] = (
    WEIGHTS,  # weights, adapters (*.safetensors.index.json is among the *.json); only those needed: weights_wanted
    "*.json",  # config.json, adapter_config.json, model_index.json, shard indexes, tokenizer configs
    "*.txt",  # merges.txt, vocab.txt
    "*.model",  # sentencepiece tokenizers (tokenizer.model, spiece.model)
    "*.tiktoken",
    "*.jinja",  # chat templates
    "*.py",  # the code of a trust_remote_code model, which a loader of apply's output needs beside config.json
    "README.md",
    "LICENSE*",
)
CONFIG_FILES: tuple[str, ...] = ("config.json",)
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
INSTALL = "pip install 'lorafuse[hub]'"
LOGIN = "log in with `hf auth login` (`huggingface-cli login` before huggingface_hub 1.0) or set HF_TOKEN"

_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_SPEC = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[A-Za-z0-9_][A-Za-z0-9_./-]*))?")
_SHA = re.compile(r"[0-9a-f]{40}")


class HubOrigin(NamedTuple):
    """Where a local path came from: the repository, the revision asked for (None: the default branch) and
    the commit it resolved to."""

    repo_id: str
    revision: str | None
    commit_sha: str


@dataclass(frozen=True)
class Resolved:
    """A spec resolved to a local path; for a Hub id also the repository, the revision asked for (None: the
    default branch) and the commit sha it resolved to (all None for a local path)."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit_sha: str | None = None

    @property
    def origin(self) -> HubOrigin | None:
        if self.repo_id is None or self.commit_sha is None:
            return None
        return HubOrigin(self.repo_id, self.revision, self.commit_sha)


_origins: dict[str, HubOrigin] = {}  # absolute snapshot folder -> where it came from (this process)
_spec_origins: dict[str, HubOrigin] = {}  # spec text -> where its last resolution led
_lock = threading.Lock()
_quiet = 0  # how many quiet_downloads blocks are open (the CLI's -q / --json / --no-progress), under _bars_lock
_bars_lock = threading.Lock()
_downloads, _turned_off = 0, False  # quiet downloads under way; whether the first turned huggingface_hub's bars off


@contextmanager
def quiet_downloads(quiet: bool = True) -> Iterator[None]:
    """Inside this block (when `quiet`) a download draws no huggingface_hub progress bar on stderr: the CLI's -q,
    --json and --no-progress promise no bar, and huggingface_hub draws its own unless told not to (_bars_off)."""
    global _quiet
    with _bars_lock:
        _quiet += int(quiet)
    try:
        yield
    finally:
        with _bars_lock:
            _quiet -= int(quiet)


@contextmanager
def _bars_off(hub: ModuleType) -> Iterator[None]:
    """huggingface_hub's progress bars off for one download inside quiet_downloads, and back on after it when they
    were on before (HF_HUB_DISABLE_PROGRESS_BARS, or the caller's own disable_progress_bars, is left as it is)."""
    global _downloads, _turned_off
    utils = getattr(hub, "utils", None)
    if not _quiet or utils is None or not hasattr(utils, "disable_progress_bars"):
        yield
        return
    with _bars_lock:  # downloads at once (threads): the bars are turned off by the first, back on by the last
        if not _downloads:
            _turned_off = not utils.are_progress_bars_disabled()
            if _turned_off:
                utils.disable_progress_bars()
        _downloads += 1
    try:
        yield
    finally:
        with _bars_lock:
            _downloads -= 1
            if not _downloads and _turned_off:
                utils.enable_progress_bars()
                _turned_off = False


def parse(spec: str | os.PathLike[str]) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` has the shape of a Hub id, else None. Looks at the text only:
    `resolve` first asks whether a path of that name exists."""
    text = os.fsdecode(os.fspath(spec))
    m = _SPEC.fullmatch(text)
    if m is None:
        return None
    repo, rev = m.group("repo"), m.group("rev")
    if "--" in repo or ".." in repo or repo.lower().endswith((".safetensors", ".git")):
        return None
    if rev is not None and (".." in rev or "//" in rev or rev.endswith(("/", ".lock"))):
        return None
    return repo, rev


_URL = re.compile(r"(?:hf:/+|(?:https?:/+)?(?:www\.)?huggingface\.co/)")  # (a Path keeps one / of //)


def path_hint(text: str) -> str | None:
    """For a missing path that names something on the Hub in a form lorafuse does not read as an id: a file or
    folder inside a repository (`org/name/file.safetensors`, PEFT's `subfolder=`), a dataset or a space, a URL;
    what to give instead. None for anything else, and where the path's first folder exists here (a local path)."""
    url = _URL.match(text)
    bare = text[url.end():] if url else text
    parts = bare.split("/")
    if parts[0] in ("datasets", "spaces") and len(parts) >= 3 and parse("/".join(parts[1:3])) is not None:
        return f"Hub ids name model repositories; a {parts[0][:-1]} repository is not read"
    if len(parts) < 3 or os.path.isdir(parts[0]) or (found := parse("/".join(parts[:2]))) is None:
        return None if url is None or parse(bare) is None else f"give the Hub id as {bare}, without {text[:url.end()]}"
    repo, rev = found
    if len(parts) >= 4 and parts[2] in ("blob", "resolve", "tree"):  # a page's address: .../blob/REVISION/FILE
        rev, parts = parts[3], parts[:2] + parts[4:]
        if len(parts) == 2 or parts[2:] == [""]:  # the repository at a revision (.../tree/v1): the id names it
            return f"give the Hub id as {repo}@{rev}" if rev else None
    inside = "/".join(parts[2:])
    file = inside.lower().endswith(".safetensors")
    fetch = (f"hf download {repo} {inside}" if file else f"hf download {repo} --include '{inside}/*'") + (
        f" --revision {rev}" if rev else "")
    return (f"if {inside} is in the Hub repository {repo}: lorafuse reads a repository by its id, not a file or folder "
            f"inside it; fetch it with `{fetch}` and give " + ("the path that prints" if file else
                                                                f"the folder that prints followed by /{inside}"))


def check_spec(spec: object, what: str) -> str:
    """`spec` as text when it is a path (str, bytes or os.PathLike: _validate.check_path's rules, no empty string
    nor NUL) or a Hub id; else LorafuseValueError naming `what` ('adapter', 'base model', ...) and what is
    accepted: None, a number, an Adapter already in memory, ..."""
    if isinstance(spec, (str, bytes, os.PathLike)):
        return check_path(spec, what)
    if type(spec).__name__ == "Adapter":  # (io imports no model: the class is known by name)
        got = "an Adapter (an adapter in memory has no file to read here: save it first, or pass its path)"
    else:
        got = "None" if spec is None else f"{type(spec).__name__} {spec!r}"[:80]
    raise LorafuseValueError(f"{what}: expected a path (str or os.PathLike) or a Hub id ('org/name'), got {got}")


_LEGACY = re.compile(_PART)  # a repository id without a namespace (`gpt2`, `bert-base-uncased`)


def repo_of(name: str) -> str | None:
    """The Hub model repository id `name` names by its shape: `org/name` of `org/name[@revision]`, or a legacy
    one-part id (`gpt2`) as it is; None for any other text (a path: absolute, `./x`, `~/x`, more parts). The text
    only: whether a local path of that name exists is the caller's question."""
    parsed = parse(name)
    if parsed is not None:
        return parsed[0]
    plain = _LEGACY.fullmatch(name) is not None and ".." not in name and "--" not in name
    return name if plain and not name.lower().endswith((".safetensors", ".git")) else None


def is_hub_id(spec: str | os.PathLike[str]) -> bool:
    """Whether `spec` has the shape of a Hub id (`org/name`, `org/name@revision`); the text only, see parse."""
    return parse(spec) is not None


def resolve(spec: str | os.PathLike[str], *, what: str, patterns: Sequence[str] = HUB_FILES,
            adapter: bool | None = None) -> Resolved:
    """`spec` as a local path: itself when it exists on disk or is not shaped like a Hub id, else the
    snapshot folder of the Hub model repository it names, downloaded (only `patterns`) or found in the
    cache. `what` names the input in messages ('base model', 'adapter'); `adapter` says which weights of a
    repository holding both a PEFT adapter and a model are read (weights_wanted): True the adapter's, False the
    model's, None (either may be read) both.

    Raises UnsupportedError when huggingface_hub is not installed, and FormatError naming the id, the
    revision and what to do when the repository or revision does not exist, is gated or private, is not
    cached while offline, or cannot be reached."""
    text = check_spec(spec, what)
    parsed = None if os.path.lexists(text) else parse(text)
    if parsed is None:
        with _lock:  # a path now: spec_origin must not say where an earlier Hub resolution of this text led
            _spec_origins.pop(text, None)
        path = Path(text)
        if not os.path.lexists(text) and parse(str(path)) is not None:  # `./org/name`: Path drops the `./`, and
            path = Path(os.path.abspath(text))  # what reads it next must not take it for the Hub id `org/name`
        return Resolved(path)
    repo, revision = parsed
    hub = _import_hub(spec, what)
    cache, offline = _cache_dir(), _offline(hub)
    token = None if offline else _token(hub)

    def download(allow: Sequence[str], ignore: Sequence[str] = ()) -> Path:
        skip = {"ignore_patterns": list(ignore)} if ignore else {}  # (passed only when some: stand-ins in tests)
        try:
            with _bars_off(hub):
                return Path(hub.snapshot_download(repo, repo_type="model", revision=revision, cache_dir=cache,
                                                  local_files_only=offline, allow_patterns=list(allow),
                                                  endpoint=os.environ.get("HF_ENDPOINT") or None, token=token,
                                                  **skip))
        except Exception as e:  # only huggingface_hub's and its HTTP client's become ours; others (bugs) go on
            error = _error(e, text, what, repo, revision, cache or hub.constants.HF_HUB_CACHE, offline)
            if error is None:
                raise
            raise error from None

    if WEIGHTS in patterns:
        # Two steps, so that a repository's other copies of its weights are not fetched: the small files first,
        # then the weights those name (weights_wanted), then any component that got none (variants only).
        path = download([p for p in patterns if p != WEIGHTS])
        wanted = weights_wanted(path, adapter)
        # an adapter id of a repository holding its PEFT adapters in sub-folders only: not every adapter's weights
        # (local_adapter refuses it, naming them); a file at its top (a kohya file beside them) is still fetched
        nested = sub_adapters(path) if adapter and not (path / PEFT_CONFIG).is_file() else []
        if adapter and wanted == [WEIGHTS]:  # diffusers' adapter file, when there, is the one read (held_adapter_file)
            path = download([DIFFUSERS_LORA])
        if not (adapter and wanted == [WEIGHTS] and (path / DIFFUSERS_LORA).is_file()):
            path = download(wanted, [f"{s}/*" for s in nested])
        missing = weights_missing(path) if wanted != [WEIGHTS] else []
        if missing:
            path = download(missing)
        if offline:  # huggingface_hub returns a cached snapshot as it is when it has no listing of the commit
            _check_cached(path, wanted, f"{what} {text}", _named(repo, revision), cache or hub.constants.HF_HUB_CACHE)
    else:
        path = download(patterns)
    # the cache's layout: <cache>/models--org--name/snapshots/<commit sha>
    resolved = Resolved(path, repo, revision, path.name if _SHA.fullmatch(path.name) else None)
    origin = resolved.origin
    with _lock:
        if origin is not None:
            _origins[os.path.abspath(path)] = origin
            _spec_origins[text] = origin
        else:
            _spec_origins.pop(text, None)
    return resolved


# Each library's single-file checkpoint, and whether its loader looks for the shard index beside it first. A
# folder can hold both: transformers' save_pretrained of a model saved sharded before removes the old shards but
# keeps their index; its from_pretrained takes model.safetensors before model.safetensors.index.json
# (modeling_utils._get_resolved_checkpoint_files), diffusers' the index first (ModelMixin.from_pretrained,
# _fetch_index_file). lorafuse reads (io.checkpoint) and fetches (weights_wanted) what that library loads.
LOADERS = (("transformers", "model.safetensors", False), ("diffusers", "diffusion_pytorch_model.safetensors", True))
_INDEX_NAMES = tuple(single + ".index.json" for _, single, _ in LOADERS)
_WEIGHT_NAMES = tuple(single for _, single, _ in LOADERS)


_JSON_BYTES = 64 << 20  # a config or shard index read here (io.checkpoint reads them again, with its own limits)


def _json(path: Path) -> dict[str, object] | None:
    """The JSON object of a repository's config or index; None when it is absent, not a regular file (a FIFO is
    not waited on), over _JSON_BYTES, not JSON or nested too deeply."""
    try:
        if not path.is_file() or path.stat().st_size > _JSON_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


_GLOB = re.compile(r"[*?\[\]]")  # what huggingface_hub's allow_patterns (fnmatch) reads as a pattern


_SHARD_SUFFIX = ".safetensors"


def shard_name_problem(name: str) -> str | None:
    """Why `name`, a shard a `*.safetensors.index.json` lists, is not one lorafuse reads, or None: a shard is a
    FILE.safetensors in the index's own folder (what transformers and diffusers write and load; transformers
    torch.loads any other name). An output keeps the names, so another (README.md, lorafuse_manifest.json, a
    path) would land on a file lorafuse writes there, or outside the output."""
    if Path(name).name != name or name in (".", ".."):
        return "is not a file name in the index's folder (a path, '.' or '..')"
    if not name.lower().endswith(_SHARD_SUFFIX) or len(name) == len(_SHARD_SUFFIX):
        return f"is not a {_SHARD_SUFFIX} file name (shards are FILE{_SHARD_SUFFIX})"
    return None


def _index_shards(folder: Path, name: str, prefix: str) -> list[str] | None:
    """The shards the index `name` in `folder` lists, as download patterns; None when it is absent, not JSON or
    lists none. A shard name that is not a plain FILE.safetensors (shard_name_problem), or that holds a pattern
    character (`*` would fetch the whole repository), is a FormatError naming the index, before anything more
    is downloaded."""
    weight_map = (_json(folder / name) or {}).get("weight_map")
    if not isinstance(weight_map, dict):
        return None
    shards = sorted({v for v in weight_map.values() if isinstance(v, str)})
    for shard in shards:
        why = shard_name_problem(shard) or (
            "holds a pattern character (* ? [ ]), which would download other files of the repository"
            if _GLOB.search(shard) else None)
        if why is not None:
            raise FormatError(f"{folder / name}: shard {short(shard)} {why}; nothing more was downloaded")
    return [prefix + s for s in shards] or None


TRANSFORMERS_WEIGHTS = "transformers_weights"  # config.json: the weights file from_pretrained loads (transformers 5)


def _named_weights(folder: Path) -> str | None:
    """The weights file a transformers config.json names in `transformers_weights` (what from_pretrained loads
    first), when it is a plain file name; the reader (io.checkpoint.explicit_weights) refuses any other."""
    named = (_json(folder / "config.json") or {}).get(TRANSFORMERS_WEIGHTS)
    return named if isinstance(named, str) and Path(named).name == named and not _GLOB.search(named) else None


def _folder_weights(folder: Path, prefix: str) -> list[str] | None:
    """The weight files a transformers / diffusers model folder loads, as its library loads them (LOADERS): the
    shards its index lists, else its one weights file by name; None when the folder has neither an index nor a
    config.json (not such a folder). Where the library takes its single file before its index (transformers'
    model.safetensors), that file is asked for first: `weights_missing` asks for the index's shards only when
    the repository has no such file, so a repository holding both (a stale index beside a re-saved model) is
    read as transformers reads it, and its shards are not fetched. A config.json naming its weights file
    (transformers_weights) gets that file, or the shards of the index it names."""
    named = _named_weights(folder)
    if named is not None:
        if named.lower().endswith(".safetensors.index.json"):
            return _index_shards(folder, named, prefix) or [prefix + WEIGHTS]
        if named.lower().endswith(_SHARD_SUFFIX):
            return [prefix + named]
    for _, single, index_first in LOADERS:
        shards = _index_shards(folder, single + ".index.json", prefix)
        if shards is not None:
            return shards if index_first else [prefix + single]
    if (folder / "config.json").is_file():
        return [prefix + n for n in _WEIGHT_NAMES]
    return None


def _shards_instead(folder: Path, prefix: str) -> list[str]:
    """The index's shards, where `_folder_weights` asked for a single file first and the repository has none."""
    if _named_weights(folder) is not None:
        return []
    for _, single, index_first in LOADERS:
        if not index_first and not (folder / single).is_file():
            shards = _index_shards(folder, single + ".index.json", prefix)
            if shards is not None:
                return shards
    return []


def _pipeline_components(folder: Path) -> list[str]:
    """The component folders a diffusers pipeline's model_index.json names (those with a library and class)."""
    index = _json(folder / "model_index.json") or {}
    return sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                  and v[0] is not None and "/" not in k and ".." not in k and (folder / k).is_dir())


def weights_wanted(folder: Path, adapter: bool | None = None) -> list[str]:
    """Which .safetensors files of a snapshot (its small files fetched: the configs and shard indexes) lorafuse
    reads, as download patterns. A diffusers pipeline (model_index.json): each component's weights (its shard
    index's files, else its diffusion_pytorch_model / model.safetensors), not the fp16 / other variants beside
    them nor the single-file checkpoints at the top; a transformers model (config.json): its index's shards or
    model.safetensors, not other copies (consolidated.safetensors); a PEFT adapter: adapter_model.safetensors;
    anything else (a kohya / LyCORIS / diffusers LoRA file, a single-file checkpoint): every .safetensors file,
    as before. A repository holding a PEFT adapter beside a model (config.json or model_index.json): the adapter's
    file when `adapter` is True, the model's weights when False (what a checkpoint reader of the folder reads),
    both when None."""
    if (folder / PEFT_CONFIG).is_file():
        model = [] if adapter or not _is_model(folder) else _model_weights(folder)
        return model if adapter is False and model else [PEFT_WEIGHTS, *model]
    return _model_weights(folder)


def _is_model(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("config.json", "model_index.json"))


def _model_weights(folder: Path) -> list[str]:
    """weights_wanted for a folder without adapter_config.json."""
    components = _pipeline_components(folder)
    if components:
        wanted: list[str] = []
        for c in components:
            wanted += _folder_weights(folder / c, c + "/") or []
        return wanted or [WEIGHTS]
    return _folder_weights(folder, "") or [WEIGHTS]


def _safetensors_files(folder: Path) -> list[str]:
    """The names of the .safetensors files directly in `folder`, sorted (hidden ones left out); OSError when it
    cannot be listed."""
    return sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(".safetensors")
                  and not p.name.startswith("."))


def weights_missing(folder: Path) -> list[str]:
    """What weights_wanted's names did not find, as patterns fetched whole: the index's shards of a folder whose
    single file (asked for first, LOADERS) is not in the repository; a pipeline's components that have a
    config.json and no weights file (a repository of variants only, diffusion_pytorch_model.fp16.safetensors),
    or, outside a pipeline, every .safetensors file when no top-level one came (weights named otherwise). Nothing
    for a folder whose config.json names its weights file (transformers_weights): that file is the one read, and
    where the repository lacks it the reader refuses the folder; fetching the others would be for nothing."""
    def has_weights(d: Path) -> bool:
        try:
            return _named_weights(d) is not None or bool(_safetensors_files(d))
        except OSError:
            return False

    components = _pipeline_components(folder)
    if components:
        missing: list[str] = []
        for c in components:
            shards = _shards_instead(folder / c, c + "/")
            missing += shards or ([f"{c}/{WEIGHTS}"] if (folder / c / "config.json").is_file()
                                  and not has_weights(folder / c) else [])
        return missing
    return _shards_instead(folder, "") or ([] if has_weights(folder) else [WEIGHTS])


def _check_cached(folder: Path, wanted: Sequence[str], head: str, named: str, cache: str) -> None:
    """FormatError when a snapshot found in the cache offline lacks the weights lorafuse reads from it (an
    interrupted download, a download of other files only): said with the id and the commit, not later as a
    folder of the cache without them."""
    try:
        have = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        need = ([PEFT_WEIGHTS] if PEFT_WEIGHTS in wanted else []) + weights_missing(folder)
    except OSError:
        return  # the reader says what it cannot read
    absent = [p for p in dict.fromkeys(need) if not fnmatch.filter(have, p)]
    if PEFT_WEIGHTS in absent and WEIGHTS in absent:  # the adapter's file is the one named
        absent.remove(WEIGHTS)
    if PEFT_WEIGHTS not in wanted and (folder / PEFT_CONFIG).is_file() and not any(fnmatch.filter(have, p)
                                                                                   for p in wanted):
        absent.append(" or ".join(wanted))  # a model beside an adapter: the model's weights, not the adapter's
    if absent:
        files = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
        files = files.replace(WEIGHTS, "any .safetensors file")
        raise FormatError(f"{head}: the Hugging Face cache {cache} holds {named} (commit {folder.name}) without "
                          f"{files}, and HF_HUB_OFFLINE is set, so the Hub was not asked for them: unset "
                          "HF_HUB_OFFLINE to download them, or point HF_HOME or HF_HUB_CACHE at a cache that holds "
                          "them")


def local_path(spec: str | os.PathLike[str], *, what: str, patterns: Sequence[str] = HUB_FILES,
               adapter: bool | None = None) -> Path:
    """`resolve(spec).path`: the checkpoint (or pipeline, or any input) folder a Hub id names, else `spec`."""
    return resolve(spec, what=what, patterns=patterns, adapter=adapter).path


def held_adapter_file(folder: Path) -> Path | None:
    """The one adapter file a folder without adapter_config.json holds, by its name: diffusers'
    pytorch_lora_weights.safetensors (what save_lora_weights writes and load_lora_weights(folder) reads), else the
    folder's only .safetensors file; None when it holds none or several. The rule for a Hub id's snapshot
    (local_adapter) and for a local folder (formats.held, which takes the file where it is an adapter). OSError when
    the folder cannot be listed."""
    if (folder / DIFFUSERS_LORA).is_file():
        return folder / DIFFUSERS_LORA
    found = _safetensors_files(folder)
    return folder / found[0] if len(found) == 1 else None


def sub_adapters(folder: Path) -> list[str]:
    """The sub-folders of `folder` (relative, `/`-separated, sorted) that hold a PEFT adapter (adapter_config.json):
    what PEFT's save_pretrained of adapters not named 'default' writes, one folder per adapter; [] when it cannot
    be listed."""
    try:
        return sorted(p.parent.relative_to(folder).as_posix() for p in folder.glob(f"*/**/{PEFT_CONFIG}")
                      if p.is_file())
    except (OSError, ValueError):
        return []


def local_adapter(spec: str | os.PathLike[str], what: str = "adapter") -> Path:
    """The adapter a spec names, as a local path: `spec` itself when it is not a Hub id; for a Hub id the
    snapshot folder when it holds adapter_config.json (a PEFT adapter), else the one adapter file in it
    (pytorch_lora_weights.safetensors, diffusers' name, or the only .safetensors file: a kohya / LyCORIS /
    diffusers LoRA repository). FormatError when the repository holds no .safetensors file, or several and
    no adapter_config.json (the id cannot say which)."""
    r = resolve(spec, what=what, adapter=True)
    if r.repo_id is None:
        return r.path
    folder = r.path
    if (folder / PEFT_CONFIG).is_file():
        return folder
    try:
        held = held_adapter_file(folder)
        found = _safetensors_files(folder) if held is None else []
    except OSError as e:
        raise FormatError(f"{folder}: cannot read: {e.strerror or e}") from None
    if held is not None:
        return held
    at = _named(r.repo_id, r.revision)
    nested = sub_adapters(folder) if not found else []
    if nested:
        listed = ", ".join(nested[:5]) + (f" and {len(nested) - 5} more" if len(nested) > 5 else "")
        rev = f" --revision {r.revision}" if r.revision else ""
        raise FormatError(f"{what} {at} (commit {r.commit_sha}): not an adapter itself; the repository holds "
                          f"{len(nested)} PEFT adapter{'s' if len(nested) > 1 else ''} in sub-folders ({listed}), and "
                          f"lorafuse reads a repository by its id, not a folder inside it: fetch one with "
                          f"`hf download {r.repo_id} --include '{nested[0]}/*'{rev}` and give the folder that prints "
                          f"followed by /{nested[0]}")
    if not found:
        raise FormatError(f"{what} {at} (commit {r.commit_sha}, {folder}): the repository holds no {PEFT_CONFIG} "
                          "and no .safetensors file at its top level, so no adapter lorafuse reads (pickle .bin "
                          "adapters are not read)")
    listed = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    raise FormatError(f"{what} {at}: the repository holds several .safetensors files ({listed}) and no {PEFT_CONFIG}, "
                      f"so the id does not say which is the adapter: give the file's path instead (for example "
                      f"{folder / found[0]}, or `hf download {r.repo_id} {found[0]}`)")


def hub_origin(path: str | os.PathLike[str]) -> HubOrigin | None:
    """(repo_id, revision, commit_sha) when `path` is a snapshot folder that a Hub resolution in this process
    returned, or a file or folder inside one (an adapter file, a shard, a pipeline component); else None.
    `revision` is the one asked for (`org/name@revision`), None for the default branch; `commit_sha` is the
    40-hex commit it resolved to. Paths are compared as absolute paths, links not followed (the files of a
    snapshot are links into the cache's blobs: the link's own path is the one to give)."""
    p = os.path.abspath(os.fspath(path))
    with _lock:
        if not _origins:
            return None
        while True:
            origin = _origins.get(p)
            if origin is not None:
                return origin
            parent = os.path.dirname(p)
            if parent == p:
                return None
            p = parent


def spec_origin(spec: str | os.PathLike[str]) -> HubOrigin | None:
    """(repo_id, revision, commit_sha) of the last resolution of `spec` (the text given: `org/name@v1`) in this
    process when it was a Hub id; None when it was a path or was not resolved (see hub_origin)."""
    with _lock:
        return _spec_origins.get(os.fsdecode(os.fspath(spec)))


# ----------------------------------------------------------------------------- huggingface_hub and its settings


def _import_hub(spec: str | os.PathLike[str], what: str) -> ModuleType:
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401 - an attribute of the package only once imported
    except ImportError:
        raise UnsupportedError(
            f"{what} {os.fsdecode(os.fspath(spec))}: no such file or directory here, and reading it as a Hugging "
            f"Face Hub id needs the huggingface_hub package: {INSTALL}") from None
    return huggingface_hub


def _cache_dir() -> str | None:
    """The hub cache the environment names now (huggingface_hub's order: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE,
    HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub); None when it names none (huggingface_hub's default)."""
    env = os.environ
    named = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not named:
        home = _named_home()
        named = os.path.join(home, "hub") if home else None
    return os.path.expandvars(os.path.expanduser(named)) if named else None


def _named_home() -> str | None:
    """HF_HOME as the environment names it now (or XDG_CACHE_HOME/huggingface); None when it names neither."""
    env = os.environ
    return env.get("HF_HOME") or (os.path.join(env["XDG_CACHE_HOME"], "huggingface")
                                  if env.get("XDG_CACHE_HOME") else None)


_TRUE = {"1", "ON", "YES", "TRUE"}


def _token(hub: ModuleType) -> str | bool | None:
    """The token to hand snapshot_download: None (huggingface_hub's own choice) where the environment now names
    the token file huggingface_hub read the path of at its import, or names a token it reads at each call
    (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, HF_OIDC_RESOURCE); else, for a token file named since (HF_TOKEN_PATH, or
    the `token` file of HF_HOME / XDG_CACHE_HOME/huggingface), the token in it, or False (no token: not the one
    of the old home) when it holds none or cannot be read. False too when HF_HUB_DISABLE_IMPLICIT_TOKEN is set now.
    The token is passed on only, never written or shown."""
    env = os.environ
    if env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or env.get("HF_OIDC_RESOURCE") or \
            getattr(hub.constants, "_staging_mode", False):  # (staging: a home of its own, which it knows)
        return None
    if (env.get("HF_HUB_DISABLE_IMPLICIT_TOKEN") or "").strip().upper() in _TRUE:
        return False
    home = _named_home() or os.path.join("~", ".cache", "huggingface")
    path = os.path.expandvars(os.path.expanduser(env.get("HF_TOKEN_PATH") or os.path.join(home, "token")))
    if os.path.abspath(path) == os.path.abspath(str(getattr(hub.constants, "HF_TOKEN_PATH", ""))):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read(1 << 16).replace("\r", "").replace("\n", "").strip()
    except (OSError, ValueError):
        return False
    return token or False


def _offline(hub: ModuleType) -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the environment says now, else as huggingface_hub read it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value:
        return value.strip().upper() in _TRUE
    return bool(getattr(hub.constants, "HF_HUB_OFFLINE", False))


_HUB_MODULES = frozenset({"huggingface_hub", "httpx", "httpx2", "requests", "urllib3"})


def _named(repo: str, revision: str | None) -> str:
    return repo if revision is None else f"{repo}@{revision}"


def _causes(e: BaseException) -> set[str]:
    """The class names of the errors that led to `e` (its __cause__ / __context__ chain, `e` left out)."""
    names: set[str] = set()
    seen: set[int] = set()
    cause = e.__cause__ or e.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        names.add(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    return names


def _path_hint(spec: str) -> str:
    """For an id that was not found whose first part is a local folder (`loras/my-lora` typed for `loras/my_lora`):
    that it may be a misspelled path, with the closest name in that folder; else ''."""
    folder, name = os.path.split(spec)
    try:
        if not os.path.isdir(folder):
            return ""
        with os.scandir(folder) as entries:
            names = [entry.name for _, entry in zip(range(10_000), entries)]
    except OSError:
        return ""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    meant = f": did you mean {os.path.join(folder, close[0])}?" if close else ""
    return f" (a local folder {folder}{os.sep} exists{meant})"


_SHORT_SHA = re.compile(r"[0-9a-f]{4,39}")


def _cached_commit(cache: str, repo: str, revision: str | None) -> str | None:
    """The one commit of `repo` in the cache whose sha starts with `revision`, when that is a short sha; else None."""
    if revision is None or not _SHORT_SHA.fullmatch(revision):
        return None
    try:
        with os.scandir(os.path.join(cache, "models--" + repo.replace("/", "--"), "snapshots")) as entries:
            found = [e.name for e in entries if e.name.startswith(revision) and _SHA.fullmatch(e.name)]
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


def _cached_revisions(cache: str, repo: str, asked: str) -> str:
    """The revisions of `repo` but `asked` the cache holds a snapshot of, for a message: its branches and tags
    (refs/...) and the commits no ref names (at most 5 of each); '' when it holds none."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    try:
        with os.scandir(os.path.join(root, "snapshots")) as entries:
            commits = sorted(e.name for e in entries if _SHA.fullmatch(e.name))
        refs: dict[str, str] = {}
        for folder, _, files in os.walk(os.path.join(root, "refs")):
            for name in files:
                ref = os.path.relpath(os.path.join(folder, name), os.path.join(root, "refs")).replace(os.sep, "/")
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    refs[ref] = f.read(100).strip()
    except (OSError, ValueError):
        return ""
    named = sorted(r for r, c in refs.items() if c in commits and r != asked)
    bare = [c for c in commits if c not in refs.values()]
    listed = [*named[:5], *bare[:5]]
    more = len(named) + len(bare) - len(listed)
    return ", ".join(listed) + (f" and {more} more" if more > 0 else "")


def _error(e: Exception, spec: str, what: str, repo: str, revision: str | None, cache: str,
           offline: bool) -> FormatError | None:
    """A FormatError for what snapshot_download raised; None for anything that is neither an OSError nor from
    huggingface_hub or its HTTP client (a bug: raised as it is)."""
    module = type(e).__module__.split(".")[0]
    ours = module in _HUB_MODULES
    if not ours and not isinstance(e, OSError):
        return None
    kinds = {c.__name__ for c in type(e).__mro__}  # by name: huggingface_hub moved its error classes over time
    rev = f"revision {revision}" if revision else "default branch main"
    head = f"{what} {spec}"
    missing = f"{head}: no such file or directory, and as a Hugging Face Hub id"
    if "GatedRepoError" in kinds:
        return FormatError(f"{head}: the Hub repository {repo} is gated: accept its conditions on "
                           f"https://huggingface.co/{repo}, then {LOGIN}")
    if "RepositoryNotFoundError" in kinds:
        return FormatError(f"{missing}: the Hub has no model repository {repo} (or it is private: {LOGIN}); if you "
                           f"meant a local path, check its spelling{_path_hint(spec)}")
    if "RevisionNotFoundError" in kinds:
        return FormatError(f"{head}: the Hub repository {repo} has no {rev} (give a branch, a tag or a commit sha)")
    if "DisabledRepoError" in kinds:
        return FormatError(f"{head}: the Hub repository {repo} is disabled")
    if "IncompleteSnapshotError" in kinds:
        return FormatError(f"{head}: the cached snapshot of {repo} ({rev}) in {cache} misses files lorafuse reads, and "
                           f"the Hub {'is not asked (HF_HUB_OFFLINE is set)' if offline else 'cannot be reached'}: "
                           f"download it again online{' (unset HF_HUB_OFFLINE)' if offline else ''}. ({_said(e)})")
    full = _cached_commit(cache, repo, revision) if offline else None
    if "LocalEntryNotFoundError" in kinds and full is not None:
        return FormatError(f"{head}: the Hugging Face cache {cache} has no branch or tag {revision} of {repo}, and "
                           "huggingface_hub does not resolve a short commit sha offline (HF_HUB_OFFLINE is set); the "
                           f"cache holds commit {full}: give {repo}@{full}")
    if "LocalEntryNotFoundError" in kinds and offline:
        held = _cached_revisions(cache, repo, revision or "main")
        others = (f" (the cache holds {repo} at {held}: give one as {repo}@REVISION, or unset HF_HUB_OFFLINE)"
                  if held else "")
        return FormatError(f"{missing}: {repo} ({rev}) is not in the Hugging Face cache {cache}, and HF_HUB_OFFLINE "
                           "is set: unset HF_HUB_OFFLINE to download it, or point HF_HOME or HF_HUB_CACHE at the cache "
                           f"that holds it{others}{_path_hint(spec)}")
    if "LocalEntryNotFoundError" in kinds and "OfflineModeIsEnabled" in _causes(e):
        return FormatError(f"{missing}: {repo} ({rev}) is not in the Hugging Face cache {cache}, and huggingface_hub, "
                           "imported in this process while HF_HUB_OFFLINE was set, stays offline whatever "
                           "HF_HUB_OFFLINE says now: run again in a new process without HF_HUB_OFFLINE"
                           + _path_hint(spec))
    if "LocalEntryNotFoundError" in kinds:
        return FormatError(f"{missing}: the Hub cannot be reached and {repo} ({rev}) is not in the Hugging Face cache "
                           f"{cache}: check the connection (or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 with HF_HOME or "
                           f"HF_HUB_CACHE naming a cache that holds it{_path_hint(spec)}")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return FormatError(f"{head}: the Hub refused access to {repo} (HTTP {status}): {LOGIN}")
    if not ours:  # an OSError of the download itself: a full disk, a cache folder that cannot be written
        return FormatError(f"{head}: cannot download {repo} ({rev}) into {cache}: "
                           f"{_said(getattr(e, 'strerror', None) or e)}")
    return FormatError(f"{head}: cannot get {repo} ({rev}) from the Hub: {type(e).__name__}: {_said(e)}")


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"<>]*@")  # user:password@ of a URL
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}")  # a Hub token's shape (hf_ and 34 letters and digits)


def redact(text: str) -> str:
    """`text` without secrets: a URL's `user:password@` (HF_ENDPOINT, a proxy or a Ray address may carry one) as
    `***@`, anything shaped like a Hub token (hf_ and 30 or more letters and digits) as hf_***."""
    return _HF_TOKEN.sub("hf_***", _USERINFO.sub(r"\g<scheme>***@", text))


def _said(e: object) -> str:
    """What huggingface_hub or its HTTP client said, on one line and without secrets (redact)."""
    return redact(" ".join(str(e).split()))

__all__ = ["CONFIG_FILES", "HUB_FILES", "HubOrigin", "Resolved", "held_adapter_file", "hub_origin", "is_hub_id",
           "local_adapter", "local_path", "parse", "path_hint", "quiet_downloads", "redact", "repo_of", "resolve",
           "spec_origin", "sub_adapters"]
