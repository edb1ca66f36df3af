"""Model checkpoints: one safetensors file, or shards listed by `*.safetensors.index.json`."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

from lorafuse._terminal import short
from lorafuse.errors import FormatError, InputChangedError
from lorafuse.io.hub import LOADERS, TRANSFORMERS_WEIGHTS, local_path, path_hint, shard_name_problem
from lorafuse.io.manifest import GGUF_MAGIC
from lorafuse.io.safetensors import (
    FileIdentity,
    SafetensorsFile,
    TensorInfo,
    file_kind,
    json_error,
    open_regular,
    read_header,
    read_header_identity,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
# A JSON side file costs up to a hundred bytes of Python objects per value ("{}," is one dict): the
# limits bound what parsing one can take. Configs (adapter_config.json, config.json,
# model_index.json) are kilobytes; the largest real ones (a rank_pattern for every expert of a big
# mixture-of-experts model) a few megabytes. A sharded checkpoint's index lists every tensor.
MAX_JSON_BYTES = 16 << 20  # configs
MAX_JSON_VALUES = 1 << 20
INDEX_JSON_BYTES = 64 << 20  # *.safetensors.index.json
INDEX_JSON_VALUES = 1 << 22


def json_values(data: bytes | bytearray) -> int:
    """An upper bound of the JSON values (and object keys) in `data`, from its commas and brackets."""
    return 2 * (data.count(b",") + data.count(b"{") + data.count(b"[")) + 1


def loads_json(text: str, where: str, values: int = MAX_JSON_VALUES) -> object:
    """A JSON value held in a string (safetensors metadata entries: diffusers' lora_adapter_metadata,
    kohya's records), with read_json's limit on the number of values, checked before parsing."""
    count = json_values(text.encode("utf-8", "surrogatepass"))
    if count > values:
        raise FormatError(f"{where} holds about {count:,} JSON values, more than the {values:,} lorafuse reads from "
                          "it (a corrupt or hostile file?)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, huge integers, deep nesting
        raise FormatError(f"{where} is not valid JSON ({json_error(e)})") from None


def read_bounded(path: Path, what: str, limit: int) -> bytearray:
    """The bytes of a small side file (a config, an index, an adapter list): a regular file (a FIFO or device is
    refused without waiting on it) of at most `limit` bytes, read in bounded pieces (a file that grows while read
    cannot make lorafuse allocate more); FormatError naming the file and the limit otherwise."""
    fd = open_regular(path, str(path))
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise FormatError(f"{path}: {what} is {size:,} bytes, more than the {limit:,}-byte limit for it "
                              "(real ones are far smaller: a corrupt or hostile file?)")
        data = bytearray()
        while len(data) <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - len(data)))  # os.read allocates what it is asked
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise FormatError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FormatError(f"{path}: {what} is more than the {limit:,}-byte limit for it")
    return data


def read_json(path: Path, what: str, limit: int = MAX_JSON_BYTES, values: int = MAX_JSON_VALUES) -> object:
    """The JSON value of a small side file (a config, a shard index), read with a size limit and a
    limit on its number of values (checked on the bytes, before parsing). Every way it can be
    wrong (not a file, too big, too many values, not UTF-8, not JSON, nested too deep, integers of
    thousands of digits) is a FormatError that names the file and the limit."""
    data = read_bounded(path, what, limit)
    count = json_values(data)
    if count > values:
        raise FormatError(f"{path}: {what} holds about {count:,} JSON values (counted from its commas and brackets), "
                          f"more than the {values:,} lorafuse reads from it (real ones hold far fewer: a corrupt or "
                          "hostile file?)")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: cannot read {what}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, huge integers, deep nesting
        raise FormatError(f"{path}: cannot read {what}: not valid JSON ({json_error(e)})") from None


def is_pickle(path: Path) -> bool:
    """A pickle checkpoint's name (model.bin, model.PT, ...): file name suffixes are matched in any case."""
    return path.suffix.lower() in PICKLE_SUFFIXES


def is_safetensors(path: Path) -> bool:
    """A .safetensors name, in any case (MODEL.SAFETENSORS, style.Safetensors)."""
    return path.name.lower().endswith(SAFETENSORS_SUFFIX)


# weight files of other formats and frameworks that Hugging Face repositories hold beside the safetensors ones
# (gpt2's tf_model.h5, flax_model.msgpack, rust_model.ot, 64-8bits.tflite, model.onnx; a .gguf; TensorFlow's
# model.ckpt.index / .data-00000-of-00001): a merged folder holding a copy of one would give its loader the model
# unmerged
OTHER_WEIGHT_SUFFIXES = (*PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, INDEX_SUFFIX, ".gguf", ".ggml", ".onnx", ".onnx_data",
                         ".onnx.data", ".h5", ".keras", ".msgpack", ".ot", ".tflite", ".mlmodel", ".pdparams")
# a TensorFlow checkpoint's files; the shard index of any of these, a variant's too (pytorch_model.bin.index.json,
# model.safetensors.index.fp16.json, tf_model.h5.index.json), which lists shards the output does not hold
_OTHER_WEIGHT_NAMES = re.compile(r".+\.ckpt\.(?:index|meta|data-\d+-of-\d+)|.+\.(?:safetensors|bin|pt|pth|h5|msgpack)"
                                 r"\.index(?:\.[^.]+)?\.json", re.IGNORECASE)


def is_weights_file(path: Path) -> bool:
    """Whether `path` is named as a file of model weights (safetensors, a pickle, another format's:
    OTHER_WEIGHT_SUFFIXES; a TensorFlow checkpoint; any of their shard indexes), in any case: a model folder's file
    never copied beside merged weights."""
    return path.name.lower().endswith(OTHER_WEIGHT_SUFFIXES) or _OTHER_WEIGHT_NAMES.fullmatch(path.name) is not None


def names_ending(directory: Path, suffix: str) -> list[str]:
    """The sorted names of the folder's entries that end with `suffix` in any case, hidden ones left out."""
    return sorted(p.name for p in directory.iterdir() if p.name.lower().endswith(suffix) and not p.name.startswith("."))


_VARIANT_INDEX = re.compile(r".+\.safetensors\.index\.[^./]+\.json", re.IGNORECASE)


def variant_indexes(directory: Path) -> list[str]:
    """The sorted names of the folder's variant shard indexes, as transformers and diffusers name them
    (`model.safetensors.index.fp16.json`, `diffusion_pytorch_model.safetensors.index.bf16.json`), hidden ones left
    out."""
    return [n for n in names_ending(directory, ".json") if _VARIANT_INDEX.fullmatch(n)]


def broken_link(path: Path) -> str | None:
    """'a symbolic link to T, which does not exist' (or '... that loops') when `path` is such a link, else None."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
        return None
    except FileNotFoundError:
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop (it leads back to itself)"
        return f"a symbolic link that cannot be followed ({e.strerror or e})"


def read_config(directory: Path, name: str = "config.json") -> dict[str, object]:
    """A folder's model config (transformers' / diffusers' config.json) as a dict, through `read_json`;
    {} when the folder has none. One that is there but cannot be read (a broken link, a FIFO, not
    JSON, not a JSON object) is a FormatError naming it: apply and extract act on what it says
    (tied embeddings, the dtype, the architecture) and apply writes it to its output."""
    path = directory / name
    if not os.path.lexists(path):
        return {}
    link = broken_link(path)
    if link is not None:
        raise FormatError(f"{path}: cannot read the model config: it is {link}; fix the link or remove it")
    cfg = read_json(path, "the model config")
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: the model config is not a JSON object (it is {type(cfg).__name__})")
    return cfg


# model files lorafuse reads no tensors from and never writes: an output named so would be safetensors under a name
# that says otherwise (a loader of that format would then fail on it, or unpickle it)
FOREIGN_SUFFIXES = {**{s: "pickle" for s in PICKLE_SUFFIXES}, ".gguf": "GGUF", ".onnx": "ONNX", ".h5": "HDF5",
                    ".msgpack": "Flax"}


def foreign_output(out: str | os.PathLike[str], folder: bool) -> str | None:
    """Why the output name `out` (not an existing folder, nor a name ending in a separator) cannot be what lorafuse
    writes there, safetensors (`folder`: a folder of them may be written too): it ends in another format's suffix
    (`merged.gguf`, `lora.bin`); else None."""
    text = os.fsdecode(os.fspath(out))
    stem, suffix = os.path.splitext(text)
    if suffix.lower() not in FOREIGN_SUFFIXES or os.path.basename(stem) in ("", ".") or os.path.isdir(text):
        return None
    names = f"a folder name or one ending in {SAFETENSORS_SUFFIX}, e.g. {stem} or " if folder else \
        f"a name ending in {SAFETENSORS_SUFFIX}, e.g. "
    hint = ("; llama.cpp's convert_hf_to_gguf.py makes a GGUF model of a merged folder, and lorafuse convert --to "
            "gguf writes a GGUF LoRA" if suffix.lower() == ".gguf" else "")
    return (f"output {text} ends in {suffix}, a {FOREIGN_SUFFIXES[suffix.lower()]} file's name, but lorafuse writes "
            f"safetensors there: give {names}{stem}{SAFETENSORS_SUFFIX}{hint}")


def one_shard(path: Path) -> str | None:
    """Why the file `path` is not a whole model: one shard of several (`model-00001-of-00004.safetensors`, with an
    index beside it), whose merge would write a model of that shard's tensors alone; else None."""
    m = re.fullmatch(r"(.+)-(\d+)-of-(\d+)\.safetensors", path.name, re.IGNORECASE)
    if m is None or int(m[3]) < 2 or not path.is_file():
        return None
    indexes = [path.parent / n for n in names_ending(path.parent, INDEX_SUFFIX) + variant_indexes(path.parent)]
    index = next((i for i in indexes if _lists(i, path.name)), None)
    if index is None:  # (an index of another model in the same folder does not make this file a shard of it)
        return None
    return (f"{path}: one shard of {int(m[3])} of a checkpoint ({index.name} beside it lists them): the model is the "
            f"folder, give {path.parent} (one shard alone would be merged into a model of its tensors only)")


def _lists(index: Path, name: str) -> bool:
    """Whether the shard index `index` names the file `name` in its weight_map (unreadable: no; a FIFO, a device,
    a huge or deeply nested file is not read through: read_json)."""
    try:
        data = read_json(index, "the shard index", INDEX_JSON_BYTES, INDEX_JSON_VALUES)
    except FormatError:
        return False
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    return isinstance(weight_map, dict) and name in weight_map.values()


# why a GGUF file is no base (a file given, or a folder holding only .gguf files)
GGUF_BASE = ("a GGUF model (llama.cpp), which lorafuse does not read or merge into; merge into the safetensors model "
             "the GGUF was converted from (then convert the result with llama.cpp's convert_hf_to_gguf.py), or convert "
             "the adapter for llama.cpp's --lora with `lorafuse convert ADAPTER --to gguf`")


def _starts_gguf(path: Path) -> bool:
    """Whether the regular file `path` starts with GGUF's magic (unreadable: no, the reader says why)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def refuse_pickle(path: Path) -> FormatError:
    return FormatError(
        f"{path}: pickle checkpoints are not read by lorafuse: loading them can run arbitrary code. "
        "Convert it to safetensors first (for example `model.save_pretrained(dir, safe_serialization=True)` "
        "in transformers, or `safetensors.torch.save_file(state_dict, 'model.safetensors')`)."
    )


# The file names transformers and diffusers write; variants such as `*.fp16.safetensors` beside them
# are other weights (left alone unless they are the only file).
PREFERRED = ("model.safetensors", "diffusion_pytorch_model.safetensors")


def _is_file(path: Path, index: Path) -> bool:
    """Whether the shard `path`, which `index` lists, is a file; FormatError naming both when it cannot be looked
    at (a name longer than the system takes, a folder that cannot be searched)."""
    try:
        return path.is_file()
    except OSError as e:
        raise FormatError(f"{index}: shard {short(path.name)} cannot be looked at in {path.parent}: "
                          f"{e.strerror or e}") from None


def read_index(index: Path) -> tuple[dict[str, str], dict[str, object]]:
    """(weight_map, metadata) of a `*.safetensors.index.json` (read_json's limits); FormatError naming it when it
    is not an object whose weight_map maps tensor names to shard file names."""
    data = read_json(index, "the shard index", INDEX_JSON_BYTES, INDEX_JSON_VALUES)
    if not isinstance(data, dict):
        raise FormatError(f"{index}: the shard index must be a JSON object")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FormatError(f"{index}: 'weight_map' must map tensor names to shard file names")
    meta = data.get("metadata", {})
    return {k: _beside(v) for k, v in weight_map.items()}, meta if isinstance(meta, dict) else {}


def _beside(shard: str) -> str:
    """A shard name as the file beside the index: './model-00001.safetensors' (which transformers reads, joining it
    to the folder) is 'model-00001.safetensors'; any other path stays as it is, for shard_name_problem to refuse."""
    while shard.startswith("./"):
        shard = shard[2:]
    return shard


def _lists_only(index: Path, shard: str) -> bool:
    """Whether `index` is readable and lists `shard` (the single file beside it) as its only shard."""
    try:
        return set(read_index(index)[0].values()) == {shard}
    except FormatError:
        return False


def explicit_weights(directory: Path) -> str | None:
    """The file a transformers config.json names in `transformers_weights`, which transformers' from_pretrained loads
    before any other (a FILE.safetensors or FILE.safetensors.index.json in the folder); None when the config names
    none. One lorafuse cannot read as transformers would (not a string, a path, not safetensors, not there) is a
    FormatError naming the config: merging another file would give a model whose loader reads the unmerged one."""
    config = directory / "config.json"
    if not config.is_file():
        return None
    value = read_config(directory).get(TRANSFORMERS_WEIGHTS)
    if value is None:
        return None
    where = f"{config}: {TRANSFORMERS_WEIGHTS} {short(value)}"
    if not isinstance(value, str):
        raise FormatError(f"{where} is not a file name (a string)")
    if Path(value).name != value or value in (".", ".."):
        raise FormatError(f"{where} is a path; lorafuse reads the weights file it names only from the folder itself")
    if not value.lower().endswith((SAFETENSORS_SUFFIX, INDEX_SUFFIX)) or value.lower() in (SAFETENSORS_SUFFIX,
                                                                                            INDEX_SUFFIX):
        raise FormatError(f"{where} is not a FILE{SAFETENSORS_SUFFIX} or FILE{INDEX_SUFFIX} (lorafuse reads "
                          "safetensors only)")
    if not _is_file(directory / value, config):
        raise FormatError(f"{where} is not a file in {directory} (transformers would not load this folder either)")
    return value


def no_such_path(path: str | os.PathLike[str]) -> str:
    """'PATH: no such file or directory', with the name quoted, and the name meant when there is one, where the
    path starts or ends with a space (invisible in a message). A symbolic link that leads nowhere is said as
    such: a loop of links (the system's words, as a read of it says), or a link to a missing path."""
    text = os.fsdecode(os.fspath(path))
    if os.path.islink(text):
        try:
            os.stat(text)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"{text}: cannot read: {e.strerror} (a loop of symbolic links)"
        try:
            return f"{text}: no such file or directory (a symbolic link to {os.readlink(text)!r}, which does not exist)"
        except OSError:
            pass
    weighted = re.fullmatch(r"(.+):([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", text)
    if weighted and os.path.lexists(weighted[1]):  # A1111's <lora:name:0.8>, other tools' PATH:WEIGHT
        return (f"{text}: no such file or directory ({weighted[1]} is: give its weight apart, --weights "
                f"{weighted[2]}; in a recipe parameters: {{weight: {weighted[2]}}}; Python: weights=[{weighted[2]}])")
    if text.startswith("~") and (home := os.path.expanduser(text)) != text:
        hint = f"did you mean {home!r}? " if os.path.lexists(home) else ""
        return f"{text}: no such file or directory ({hint}a leading ~ is read as a home folder by a shell, not in " \
               "Python)"
    if text == text.strip():
        on_hub = path_hint(text)  # a file inside a Hub repository, a dataset, a URL
        return f"{text}: no such file or directory" + (f" ({on_hub})" if on_hub else "")
    meant = text.strip()
    hint = f"did you mean {meant!r}? " if meant and os.path.lexists(meant) else ""
    return f"{text!r}: no such file or directory ({hint}the name starts or ends with a space)"


class Checkpoint:
    """Tensor names, shapes and dtypes of a checkpoint, read from headers only.

    `path` is a .safetensors file, or a folder with model.safetensors (or exactly one
    *.safetensors) or with a *.safetensors.index.json naming its shards. A folder holding both a library's single
    file and its index is read as that library loads it (LOADERS: transformers' model.safetensors, diffusers'
    index), with a note in `notes` saying so and whether the other lists the same tensors.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = local_path(path, what="checkpoint", adapter=False)  # a Hub id: its snapshot folder (io.hub)
        try:
            found = path.exists()
        except OSError as e:  # a name too long for the system, a folder that cannot be searched: said, not raised
            raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
        if not found:
            raise FormatError(no_such_path(path))
        self.path = path  # the file or folder given (`directory` is the folder holding the shards)
        self.index_name: str | None = None
        self.index_metadata: dict[str, object] = {}
        self.notes: list[str] = []  # what the user should know of how the folder was read
        self._unread: tuple[Path, str] | None = None  # the single file or index beside it that its loader skips
        if path.is_file():
            if is_pickle(path):
                raise refuse_pickle(path)
            if _starts_gguf(path):
                raise FormatError(f"{path}: {GGUF_BASE}")
            if path.suffix.lower() == ".json":  # config.json, model.safetensors.index.json: its folder was meant
                raise FormatError(f"{path}: a JSON file, not a checkpoint: give the model's folder ({path.parent}) or "
                                  "its .safetensors file")
            self.directory, shard_names = path.parent, [path.name]
        elif not path.is_dir():
            raise FormatError(f"{path}: it is {file_kind(path.stat().st_mode)}, not a checkpoint file or folder")
        else:
            self.directory = path
            try:
                shard_names = self._shards_of_directory(path)
            except OSError as e:  # an unreadable folder
                raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
        self.shards: list[str] = shard_names
        self.headers: dict[str, dict[str, TensorInfo]] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.shard_of: dict[str, str] = {}
        self.identities: dict[str, FileIdentity] = {}  # each shard as its header was read (open() checks it)
        st = os.stat(self.directory)
        self.folder_identity = (st.st_dev, st.st_ino)
        for shard in shard_names:
            tensors, metadata, _, self.identities[shard] = read_header_identity(self.directory / shard)
            self.headers[shard], self.metadata[shard] = tensors, metadata
            for name in tensors:
                if name in self.shard_of:
                    raise FormatError(f"{self.directory}: tensor {short(name)} is in both {self.shard_of[name]} and "
                                      f"{shard}")
                self.shard_of[name] = shard
        if self.index_name is not None:
            self._check_index()
        if self._unread is not None:
            self.notes.append(self._unread_note(*self._unread))

    def _shards_of_directory(self, directory: Path) -> list[str]:
        named = explicit_weights(directory)
        if named is not None:  # config.json's transformers_weights: the file transformers loads, whatever is beside it
            self.notes.append(f"{directory}: read {named}, which config.json's transformers_weights names (the file "
                              "transformers loads from this folder)")
            return self._index_shards(directory / named) if named.lower().endswith(INDEX_SUFFIX) else [named]
        for loader, single, index_first in LOADERS:
            index = directory / (single + ".index.json")
            whole, sharded = (directory / single).is_file(), index.is_file()
            if whole and sharded and _lists_only(index, single):  # one checkpoint, read either way: its index kept
                return self._index_shards(index)
            if whole and sharded:  # the one its loader does not take: compared once the headers are read
                self._unread = (directory / single if index_first else index, loader)
            if sharded and (index_first or not whole):
                try:
                    return self._index_shards(index)
                except FormatError as e:
                    if not whole:
                        raise
                    raise FormatError(f"{e} ({loader} loads {index.name} before {single}, which is beside it, and so "
                                      f"does lorafuse: remove the index if {single} holds the model)") from None
            if whole:
                return [single]
        found = names_ending(directory, INDEX_SUFFIX)
        if len(found) > 1:
            raise FormatError(f"{directory}: several safetensors index files ({', '.join(found)})")
        if found:
            return self._index_shards(directory / found[0])
        found = variant_indexes(directory)
        if len(found) > 1:
            raise FormatError(f"{directory}: several variants' safetensors index files ({', '.join(found)}) and no "
                              f"model{INDEX_SUFFIX}: keep one variant's index and shards in the folder")
        if found:  # save_pretrained(variant="fp16", max_shard_size=...): model.safetensors.index.fp16.json
            self.notes.append(f"{directory}: read {found[0]}, a variant's shard index (from_pretrained loads it with "
                              "variant=...); the output keeps its names")
            return self._index_shards(directory / found[0])
        found = names_ending(directory, SAFETENSORS_SUFFIX)
        if len(found) == 1:
            return found
        if found:
            raise FormatError(f"{directory}: several .safetensors files and no index.json to say which to use")
        pickles = sorted(p for p in directory.iterdir() if is_pickle(p))
        if pickles:
            raise refuse_pickle(pickles[0])
        gguf = names_ending(directory, ".gguf")
        if gguf:
            raise FormatError(f"{directory}: no .safetensors checkpoint found, only {', '.join(gguf[:3])}"
                              f"{' and more' if len(gguf) > 3 else ''}: {GGUF_BASE}")
        raise FormatError(f"{directory}: no .safetensors checkpoint found")

    def _index_shards(self, index: Path) -> list[str]:
        """The shards `index` lists, each a file beside it; the index's name, weight map and metadata kept."""
        self.index_name = index.name
        self._weight_map, self.index_metadata = read_index(index)
        shards = list(dict.fromkeys(self._weight_map.values()))
        if not shards:  # a model of no weights: its output would hold none, while the folder's shards hold them
            others = names_ending(index.parent, SAFETENSORS_SUFFIX)
            beside = f" ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''} beside it)" if others else ""
            raise FormatError(f"{index}: the shard index's weight_map lists no tensor, so it names no shard{beside}: "
                              "an empty or truncated index? Save the model again, or remove the index")
        for s in shards:
            why = shard_name_problem(s)
            if why is not None:
                raise FormatError(f"{index}: shard {short(s)} {why}")
            if not _is_file(index.parent / s, index):
                raise FormatError(f"{index}: shard {short(s)} is not a file in {index.parent}")
        return shards

    def _check_index(self) -> None:
        for name, shard in self._weight_map.items():
            if self.shard_of.get(name) != shard:
                where = self.shard_of.get(name)
                raise FormatError(
                    f"{self.directory / str(self.index_name)}: tensor {short(name)} is listed in {shard} but is not "
                    f"there ({f'it is in {where}' if where else 'no shard the index lists holds it'}: fix the index's "
                    "weight_map, or save the model again)"
                )

    def _unread_note(self, unread: Path, loader: str) -> str:
        """The note on a folder holding both a library's single file and its shard index: which one lorafuse reads
        (the one `loader` loads) and whether the other lists the same tensors."""
        read = self.directory / (self.index_name or self.shards[0])
        other = "the shards it lists" if unread.name.endswith(INDEX_SUFFIX) else "its tensors"
        head = f"{self.directory} holds both {read.name} and {unread.name}"
        loads = f"{loader} loads {'the shards ' + read.name + ' lists' if self.sharded else read.name}"
        try:
            names = set(read_index(unread)[0] if unread.name.endswith(INDEX_SUFFIX) else read_header(unread)[0])
        except FormatError as e:
            return (f"{head}: {loads}, and so does lorafuse; {unread.name} and {other} are left alone "
                    f"({unread.name} cannot be read: {e})")
        ours = set(self.shard_of)
        if names == ours:
            agree = f"both list the same {len(ours):,} tensors"
        else:
            parts = [f"{len(o):,} only in {n} (e.g. {short(min(o))})"
                     for o, n in ((ours - names, read.name), (names - ours, unread.name)) if o]
            agree = f"they list different tensors: {'; '.join(parts)}"
        return f"{head}: {loads}, and so does lorafuse; {unread.name} and {other} are left alone ({agree})"

    @property
    def sharded(self) -> bool:
        return self.index_name is not None

    @property
    def location(self) -> Path:
        """What names this checkpoint in messages: its one file when it is a single unsharded file, else its
        folder."""
        return self.directory / self.shards[0] if not self.sharded and len(self.shards) == 1 else self.directory

    def keys(self) -> list[str]:
        return list(self.shard_of)

    def __contains__(self, name: object) -> bool:
        return name in self.shard_of

    def info(self, name: str) -> TensorInfo:
        return self.headers[self.shard_of[name]][name]

    def open(self, shard: str) -> SafetensorsFile:
        """The shard mapped, refused (InputChangedError) when the file at its path is no longer the one whose
        header was read: a checkpoint replaced (a folder swapped in by rename, a shard re-downloaded) between
        the header pass and the read would mix two versions in one result."""
        f = SafetensorsFile(self.directory / shard)
        if shard in self.identities and f.identity != self.identities[shard]:
            f.close()
            raise InputChangedError(f"{self.directory / shard} was replaced since lorafuse read its header (another "
                                    "version of the checkpoint is there now): its tensors would mix two versions; "
                                    "nothing was written")
        return f

    def check_folder(self) -> None:
        """InputChangedError when the checkpoint's folder is no longer the folder read (swapped by rename): its
        other files (config.json, tokenizer) would come from another version."""
        try:
            st = os.stat(self.directory)
            same = (st.st_dev, st.st_ino) == self.folder_identity
        except OSError:
            same = False
        if not same:
            raise InputChangedError(f"{self.directory} was replaced while lorafuse read it (another folder is at its "
                                    "path now): the result would mix two versions; nothing was written")

    def files(self) -> list[Path]:
        out = [self.directory / s for s in self.shards]
        if self.index_name:
            out.append(self.directory / self.index_name)
        return out

    def total_bytes(self) -> int:
        return sum(t.nbytes for h in self.headers.values() for t in h.values())
