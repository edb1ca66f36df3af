"""A recipe's text as YAML documents, with the line of every field, so that every error names its line.

PyYAML composes each document into nodes that carry their position; the positions are collected per path
(('models', 0, 'parameters', 'weight') -> line), then the same nodes are constructed into plain data. A key
given twice in one mapping is refused (PyYAML would silently keep the last).

Plain values are read by YAML 1.2's core schema, as the command line reads numbers, not by PyYAML's YAML 1.1
rules: `010` is 10 (not octal 8), `1e-3` is a number, `1_5` and `1:30` are text (not 15 and 90), a date is text
(a folder may be named `2024-02-30`), only true / false are booleans (`on`, `no` are text), and a number too small
for a float64 (`1e-400`, which would be 0) is refused as `--weights` refuses it. A value that cannot be read
(`!!int x`, an integer of more digits than Python reads) is refused naming its line. Merge keys (`<<: *defaults`)
copy the fields of the mapping they name; a recipe whose merges would copy more than MAX_MERGED_FIELDS fields
in all (each level of `<<: [*a, *a]` doubles them) is refused before it is built. JSON is YAML: a document that is
a list of mappings is a list of stages (JSON has one document), tabs between a JSON text's tokens are spaces, and
the surrogate pairs of `\\u` escapes are joined (a lone one is refused). A recipe file is read in the encoding YAML
tells from its first bytes (UTF-8, UTF-16, UTF-32: _decode); bytes that are no character of it are refused at their
line and column.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import functools
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorafuse.errors import RecipeError, RecipeFileError

PathKey = tuple[str | int, ...]
MAX_RECIPE_CHARS = 1 << 20  # a recipe longer than this is refused (not read whole): YAML parsing costs ~1 GB and
# ~15 s per Mi characters of hostile flow-style text; a hand-written recipe of 10,000 models is ~350 KiB
MAX_MERGED_FIELDS = 1 << 18  # the fields merge keys (`<<`) may copy in one document, in all: as many as 1 Mi
# characters could write out (a recipe of 10,000 models each merging 5 defaults copies 50,000)


@dataclasses.dataclass(frozen=True)
class Document:
    """One YAML document: its data, where it starts, and the line of each path inside it."""

    data: Any
    line: int
    lines: Mapping[PathKey, int]

    @functools.cached_property
    def _texts(self) -> dict[tuple[str, ...], int]:
        """`lines` keyed by its paths' elements as text, built once (line_of is asked once per error)."""
        return {tuple(_text(x) for x in k): v for k, v in self.lines.items()}

    def line_of(self, path: Sequence[str | int]) -> int:
        """The line of `path`, or of its nearest enclosing field that has one."""
        p = tuple(path)
        # a mapping key YAML reads as a number or a boolean (`7: 3`) is that value in a validator's path and
        # the key's text here: paths compare by their elements' text (a list index and a mapping key never
        # share a parent)
        texts = self._texts
        while p:
            line = self.lines.get(p, texts.get(tuple(_text(x) for x in p)))
            if line is not None:
                return line
            p = p[:-1]
        return self.line


def _text(x: object) -> str:
    return str(x).lower() if isinstance(x, bool) else str(x)


@dataclasses.dataclass(frozen=True)
class RecipeText:
    """A recipe's text, where it came from (for messages and relative paths) and its documents."""

    text: str
    origin: str  # the file name, or '<recipe>' for text given in Python
    folder: Path  # relative model paths are taken from here
    documents: list[Document]

    def where(self, doc: int, path: Sequence[str | int] = ()) -> str:
        """'recipe.yml line 7, models[0].parameters.weight' (the field part only when there is a path)."""
        line = self.documents[doc].line_of(path)
        field = dotted(path)
        return f"{self.origin} line {line}" + (f", {field}" if field else "")


def dotted(path: Sequence[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _positions(node: Any, path: PathKey, out: dict[PathKey, int], origin: str, walked: set[int]) -> None:
    import yaml

    if isinstance(node, yaml.CollectionNode):  # an alias is the node itself again: walked once (billion laughs)
        if id(node) in walked:
            return
        walked.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            line = key.start_mark.line + 1
            if not isinstance(key, yaml.ScalarNode) or key.tag not in (_STR_TAG, _MERGE_TAG):  # `<<: *defaults`
                raise RecipeError(f"{origin} line {line}: {_key_text(key, path)}")
            name = key.value
            if name in seen:
                raise RecipeError(f"{origin} line {line}: {dotted((*path, name))} is given twice (first on line "
                                  f"{seen[name]})")
            seen[name] = line
            out[(*path, name)] = line
            _positions(value, (*path, name), out, origin, walked)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*path, i)] = item.start_mark.line + 1
            _positions(item, (*path, i), out, origin, walked)


_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _key_text(key: Any, path: PathKey) -> str:
    """Why a mapping key that is not text is refused (every key of a recipe is a field's name)."""
    import yaml

    where = f"in {dotted(path)}, " if path else ""
    if not isinstance(key, yaml.ScalarNode):
        return f"{where}a key is a {'mapping' if isinstance(key, yaml.MappingNode) else 'list'}, not a field name"
    kind = {_NULL_TAG: "null", "tag:yaml.org,2002:bool": "a boolean", "tag:yaml.org,2002:int": "an integer",
            "tag:yaml.org,2002:float": "a number"}.get(key.tag, key.tag)
    return (f"{where}the key {key.value!r} is read by YAML as {kind}, not as a field name (every key of a recipe "
            "is a field's name: quote it if it is one)")


# YAML 1.2's core schema (https://yaml.org/spec/1.2.2/#1023-core-schema): what a plain value is read as
_CORE = {
    "tag:yaml.org,2002:null": (r"~|null|Null|NULL|", "~nN"),
    "tag:yaml.org,2002:bool": (r"true|True|TRUE|false|False|FALSE", "tTfF"),
    "tag:yaml.org,2002:int": (r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    "tag:yaml.org,2002:float": (r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)", "-+.0123456789"),
    _MERGE_TAG: (r"<<", "<"),
}
_CORE_RE = {tag: re.compile(rf"(?:{rx})\Z") for tag, (rx, _) in _CORE.items()}
_SURROGATE = re.compile("[\ud800-\udfff]")


class _BadValue(Exception):
    """A value the recipe's YAML cannot be read as (raised while constructing, with the node it is about)."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message, self.mark = message, mark


def _shown(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= 40 else text[:20] + "..." + text[-10:])


@functools.cache
def _loader() -> type:
    """yaml.SafeLoader reading plain values by YAML 1.2's core schema (_CORE), and refusing a value that cannot
    be read (a bad `!!int`, `!!float`, `!!bool`, `!!timestamp`, an integer of more digits than Python reads)
    with its position instead of a Python error."""
    import yaml

    from lorafuse._validate import rounds_to_zero

    class RecipeLoader(yaml.SafeLoader):
        yaml_implicit_resolvers: dict[Any, Any] = {}

        def flatten_mapping(self, node: Any) -> None:
            """Merge keys (`<<`) as the YAML merge-key spec says and PyYAML 6.0.3 built them: the mapping's own
            fields win over merged ones, and of a list of mappings merged, an earlier one's over a later one's.
            Written here so a recipe means the same under every PyYAML (6.0.4 lets a later one win)."""
            merged: list[list[Any]] = []  # the merged mappings' fields, highest priority first
            own: list[Any] = []
            merging: set[int] = self.__dict__.setdefault("_merging", set())  # the mappings being flattened now
            merging.add(id(node))
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                    for sub in sources:
                        if not isinstance(sub, yaml.MappingNode):
                            raise yaml.constructor.ConstructorError(
                                "while constructing a mapping", node.start_mark,
                                f"expected a mapping or list of mappings for merging, but found {sub.id}",
                                sub.start_mark)
                        if id(sub) in merging:  # `&a {<<: *a}`: it would copy itself into itself without end
                            raise yaml.constructor.ConstructorError(
                                "while constructing a mapping", node.start_mark, "a merge (`<<`) names a mapping "
                                "that holds this merge: a mapping cannot merge itself", key_node.start_mark)
                        self.flatten_mapping(sub)
                        merged.append(list(sub.value))
                else:
                    if key_node.tag == "tag:yaml.org,2002:value":
                        key_node.tag = "tag:yaml.org,2002:str"
                    own.append((key_node, value_node))
            merging.discard(id(node))
            if merged:  # a later field wins when the mapping is built: the lowest priority goes first
                node.value = [pair for fields in reversed(merged) for pair in fields] + own

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep)
            except (ValueError, OverflowError, TypeError, KeyError, ArithmeticError) as e:
                tag = str(node.tag).removeprefix("tag:yaml.org,2002:")
                raise _BadValue(f"{_shown(node.value)} cannot be read as {tag} ({e})", node.start_mark) from None

    def construct_int(loader: Any, node: Any) -> int:
        text = loader.construct_scalar(node)
        if not _CORE_RE["tag:yaml.org,2002:int"].match(text):
            raise _BadValue(f"{_shown(text)} is not an integer (YAML's core schema: decimal digits, 0o octal or 0x "
                            "hexadecimal)", node.start_mark)
        digits = text.lstrip("+-")
        try:
            n = int(digits[2:], 8 if digits[1] == "o" else 16) if digits[1:2] in ("o", "x") else int(digits, 10)
        except ValueError:  # more digits than Python reads (sys.get_int_max_str_digits)
            raise _BadValue(f"{_shown(text)}: an integer of {len(digits)} digits is too large for any value of a "
                            "recipe", node.start_mark) from None
        return -n if text.startswith("-") else n

    def construct_float(loader: Any, node: Any) -> float:
        text = loader.construct_scalar(node)
        if not _CORE_RE["tag:yaml.org,2002:float"].match(text) and not _CORE_RE["tag:yaml.org,2002:int"].match(text):
            raise _BadValue(f"{_shown(text)} is not a number (YAML's core schema: 0.5, -1, 1e-3, .inf)",
                            node.start_mark)
        if text.lstrip("+-").startswith(("0o", "0x")):
            return float(construct_int(loader, node))
        if text.lstrip("+-").lower() in (".inf", ".nan"):
            return float(text.replace(".", "", 1))
        x = float(text)
        if rounds_to_zero(text, x):  # as --weights: 1e-400 would be 0 (write 0 for that)
            raise _BadValue(f"{text} is too small for a float64: it would be 0 (write 0 for that)", node.start_mark)
        return x

    def construct_bool(loader: Any, node: Any) -> bool:
        text = loader.construct_scalar(node)
        if not _CORE_RE["tag:yaml.org,2002:bool"].match(text):
            raise _BadValue(f"{_shown(text)} is not a boolean (true or false)", node.start_mark)
        return text.lower() == "true"

    def construct_str(loader: Any, node: Any) -> str:
        """Text, with the UTF-16 surrogate pairs of its escapes joined (JSON's `"\\ud83d\\ude00"`, json.dumps's
        output for a character beyond U+FFFF, is one character; PyYAML reads each escape alone); a lone
        surrogate, which is no character, refused."""
        text = str(loader.construct_scalar(node))
        if not _SURROGATE.search(text):
            return text
        joined = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
        lone = _SURROGATE.search(joined)
        if lone is not None:
            raise _BadValue(f"{_shown(joined)} holds a lone surrogate "
                            f"(\\u{ord(lone.group()):04x}), which is not a character", node.start_mark)
        return joined

    _add_core_resolvers(RecipeLoader)
    RecipeLoader.add_constructor("tag:yaml.org,2002:str", construct_str)
    RecipeLoader.add_constructor("tag:yaml.org,2002:int", construct_int)
    RecipeLoader.add_constructor("tag:yaml.org,2002:float", construct_float)
    RecipeLoader.add_constructor("tag:yaml.org,2002:bool", construct_bool)
    return RecipeLoader


def _add_core_resolvers(cls: Any) -> None:
    """YAML 1.2 core schema's implicit resolvers (_CORE) on a loader or dumper class."""
    for tag, (_, first) in _CORE.items():
        cls.add_implicit_resolver(tag, _CORE_RE[tag], list(first) + ([""] if tag == _NULL_TAG else []))


@functools.cache
def dumper() -> type:
    """yaml.SafeDumper that quotes a string which either the recipe's loader (YAML 1.2's core schema: `1e3`, `0x10`)
    or YAML 1.1 (`yes`, `2024-01-01`) reads as something other than text: the text reads back the same by both."""
    import yaml

    class RecipeDumper(yaml.SafeDumper):
        pass

    _add_core_resolvers(RecipeDumper)
    # a subclass of int, float or str (np.float64, an IntEnum, np.str_) is the plain value it stands for: the
    # message for what cannot be written asks for int, float or str, which these are
    def plain(d: yaml.SafeDumper, x: Any) -> Any:
        return d.represent_data(bool(x) if isinstance(x, bool) else int(x) if isinstance(x, int) else
                                float(x) if isinstance(x, float) else str(x))

    for kind in (int, float, str):
        RecipeDumper.add_multi_representer(kind, plain)
    return RecipeDumper


def _check_merges(root: Any, origin: str) -> None:
    """Refuse a document whose merge keys (`<<`) would copy more than MAX_MERGED_FIELDS fields in all, before
    PyYAML builds it: a merge copies every field of the mapping it names (that mapping's own merges included),
    and PyYAML keeps duplicates, so `{<<: [*a, *a]}` doubles them at each level (2^n fields from n lines).
    Counted once per node (memoised), in the order PyYAML builds them; the line is the merge that passes the
    limit."""
    import yaml

    size: dict[int, int] = {}  # a mapping node -> the fields it has once its merges are copied in
    seen: set[int] = set()
    total = 0
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if not isinstance(node, yaml.CollectionNode):
            continue
        if not done:
            if id(node) in seen:  # an alias, or a merge of a mapping into itself (PyYAML refuses that)
                continue
            seen.add(id(node))
            stack.append((node, True))
            children = [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else node.value
            stack.extend((c, False) for c in reversed(children))
            continue
        if not isinstance(node, yaml.MappingNode):
            continue
        own = copied = 0
        for key, value in node.value:
            if key.tag != _MERGE_TAG:
                own += 1
                continue
            sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
            fields = sum(size.get(id(s), 0) for s in sources if isinstance(s, yaml.MappingNode))
            copied += fields
            total += fields
            if total > MAX_MERGED_FIELDS:
                raise RecipeError(f"{origin} line {key.start_mark.line + 1}: not a recipe: its merge keys (`<<`) would "
                                  f"copy more than {MAX_MERGED_FIELDS:,} fields (each merge copies every field of the "
                                  "mappings it names, their own merges included)")
        size[id(node)] = own + copied


def _json_tabs(text: str) -> str:
    """A JSON recipe's text with its tabs read as spaces: JSON is YAML, but PyYAML takes no tab between the
    tokens of a flow collection (`json.dumps(..., indent="\\t")`). Only text that JSON reads whole, whose tabs
    are then all between tokens (JSON's strings hold none), so lines and columns stay those of the file."""
    body = text.removeprefix("\ufeff")  # a byte order mark (Windows' editors write one), which YAML skips
    if "\t" not in body or body.lstrip()[:1] not in ("{", "["):
        return text
    import json

    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return text
    return text.replace("\t", " ")


def parse(text: str, origin: str, folder: Path) -> RecipeText:
    """The YAML documents of `text` (empty documents, which hold nothing or only comments, are skipped). Raises
    RecipeError naming the line for text that is not YAML, or for a mapping key YAML does not read as text."""
    import yaml

    if len(text) > MAX_RECIPE_CHARS:  # YAML text given as a string: the bound a recipe file has
        raise RecipeError(f"{origin}: larger than {MAX_RECIPE_CHARS >> 20} Mi characters: not a recipe")
    if "\r" in text:  # recorded with \n line ends, as a file's text (YAML reads \r\n and \r as line breaks too)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    docs: list[Document] = []
    loader = None
    try:
        loader = _loader()(_json_tabs(text))  # refuses a character YAML does not allow (NUL, a lone surrogate) here
        while loader.check_node():
            node = loader.get_node()
            if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG):
                continue  # an empty document: a trailing '---', or a stage commented out between two
            _check_merges(node, origin)
            # a list of stages (JSON has one document: `[{...}, {...}]`, as lorafuse.run takes a list): each a stage
            many = isinstance(node, yaml.SequenceNode) and node.value and all(
                isinstance(x, yaml.MappingNode) for x in node.value)
            for part in node.value if many else [node]:
                lines: dict[PathKey, int] = {}
                _positions(part, (), lines, origin, set())
                docs.append(Document(loader.construct_document(part), part.start_mark.line + 1, lines))
    except _BadValue as e:
        raise RecipeError(f"{origin} line {e.mark.line + 1}, column {e.mark.column + 1}: {e.message}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        tab = " (YAML indents and separates with spaces: replace the tab)" if "'\\t'" in str(e.problem) else ""
        raise RecipeError(f"{origin}{at}: not valid YAML: {e.problem or e.context}{tab}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{origin}: not valid YAML: {e}") from None
    except RecursionError:
        raise RecipeError(f"{origin}: not a recipe: its YAML is nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not docs:
        raise RecipeError(f"{origin}: the recipe is empty (expected merge_method and models)")
    return RecipeText(text, origin, folder, docs)


_MAX_RECIPE_BYTES = 4 * MAX_RECIPE_CHARS + 4  # MAX_RECIPE_CHARS characters of 4 bytes each, and a BOM
# YAML's encodings (https://yaml.org/spec/1.2.2/#52-character-encodings): a byte order mark names one, else the
# NUL bytes an ASCII first character has in UTF-16 or UTF-32 do; (BOM or first bytes, codec, name)
_ENCODINGS = ((codecs.BOM_UTF32_LE, "utf-32", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
              (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"), (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
              (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"))
_UNMARKED = ((re.compile(rb"\x00\x00\x00[^\x00]", re.S), "utf-32-be", "UTF-32 (big-endian, no BOM)"),
             (re.compile(rb"[^\x00]\x00\x00\x00", re.S), "utf-32-le", "UTF-32 (little-endian, no BOM)"),
             (re.compile(rb"\x00[^\x00]", re.S), "utf-16-be", "UTF-16 (big-endian, no BOM)"),
             (re.compile(rb"[^\x00]\x00", re.S), "utf-16-le", "UTF-16 (little-endian, no BOM)"))


def _decode(raw: bytes, origin: str) -> str:
    """A recipe file's bytes as text, in the encoding YAML tells from its first bytes (UTF-8, or UTF-16 / UTF-32
    as Windows editors and PowerShell save text); bytes that are not text of that encoding (a file saved as
    Latin-1) are refused naming the line and column, not with the codec's words."""
    codec, name = next(((c, n) for bom, c, n in _ENCODINGS if raw.startswith(bom)), ("utf-8", "UTF-8"))
    marked = codec != "utf-8"
    if not marked:
        codec, name = next(((c, n) for rx, c, n in _UNMARKED if rx.match(raw)), (codec, name))
    try:  # line ends as text mode reads them (\r\n and \r are \n): the recipe is recorded with \n line ends; a
        # BOM starting a later line is dropped, as YAML lets each document of a stream start with one (files saved
        # with a BOM, joined into one recipe) and PyYAML reads it as part of a key
        return raw.decode(codec).replace("\r\n", "\n").replace("\r", "\n").replace("\n\ufeff", "\n")
    except UnicodeDecodeError as e:
        if not marked and b"\0" in raw[:4096]:  # a .safetensors, .gguf or .bin file given as the recipe
            raise RecipeFileError(f"{origin}: a binary file (it holds NUL bytes and is no UTF-8, UTF-16 or UTF-32 "
                                  "text), not a recipe (a YAML text file: merge_method, models, ...)") from None
        before = raw[:e.start].decode(codec, "replace")
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        bad = raw[e.start:e.end][:4]
        guess = ": saved as Latin-1 or Windows-1252?" if name == "UTF-8" else ""
        raise RecipeFileError(f"{origin} line {line}, column {column}: not {name} text (byte{'s' * (len(bad) > 1)} "
                              f"{bad.hex(' ')} {'are' if len(bad) > 1 else 'is'} no {name} character{guess}); a "
                              "recipe is UTF-8 text (or UTF-16 / UTF-32 with a byte order mark): save it as UTF-8"
                              ) from None


def read(path: str | Path) -> RecipeText:
    p = Path(path)
    try:  # not blocking: a FIFO is refused below instead of waited on for a writer
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise RecipeFileError(f"{p}: no such recipe file") from None
    except IsADirectoryError:
        raise RecipeFileError(f"{p}: is a folder, not a recipe file (a .yml file)") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise RecipeFileError(f"{p}: cannot read the recipe: {getattr(e, 'strerror', None) or e}") from None
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # (os.fdopen refuses a folder with "Is a directory")
            os.close(fd)
            raise RecipeFileError(f"{p}: is a folder, not a recipe file (a .yml file)")
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise RecipeFileError(f"{p}: is a folder, not a recipe file (a .yml file)")
            if not stat.S_ISREG(mode):
                from lorafuse.io.safetensors import file_kind

                raise RecipeFileError(f"{p}: is {file_kind(mode)}, not a recipe file (a .yml file)")
            raw = f.read(_MAX_RECIPE_BYTES + 1)  # bounded: a huge file given by mistake
    except OSError as e:
        raise RecipeFileError(f"{p}: cannot read the recipe: {e.strerror or e}") from None
    if len(raw) > _MAX_RECIPE_BYTES:  # more characters than MAX_RECIPE_CHARS in any encoding
        raise RecipeFileError(f"{p}: larger than {MAX_RECIPE_CHARS >> 20} Mi characters: not a recipe")
    text = _decode(raw, str(p))
    if len(text) > MAX_RECIPE_CHARS:
        raise RecipeFileError(f"{p}: larger than {MAX_RECIPE_CHARS >> 20} Mi characters: not a recipe")
    # relative model paths: from the folder of the path as given (a link's folder, not its target's), as
    # combine --from-list reads its list (read_list)
    return parse(text, str(p), Path(os.path.abspath(p)).parent)


# Other tools' names of a recipe's fields (as the CLI's _FOREIGN_OPTIONS names their options): kohya sd-scripts',
# PEFT's, transformers' and mergekit's word -> (the tool, the field here).
_FOREIGN_FIELDS = {
    **dict.fromkeys(("new_rank", "network_dim", "dim"), ("kohya's", "rank")), "r": ("PEFT's", "rank"),
    **dict.fromkeys(("new_conv_rank", "conv_dim"), ("kohya's", "conv_rank")),
    "save_precision": ("kohya's", "dtype"), "torch_dtype": ("transformers'", "dtype"),
    "out_dtype": ("mergekit's", "dtype"), "combination_type": ("PEFT's", "merge_method"),
    **dict.fromkeys(("ratio", "ratios"), ("kohya's", "weight")),
    "majority_sign_method": ("PEFT's", "majority_sign"),
}


def suggest(word: str, choices: Sequence[str]) -> str:
    """' (did you mean 'weight'?)' for a near miss, else ''; for another tool's name of one of `choices`
    (_FOREIGN_FIELDS) that name: " (kohya's new_rank is 'rank' here)"."""
    tool, field = _FOREIGN_FIELDS.get(word.lower().replace("-", "_"), ("", ""))
    if field in choices:
        return f" ({tool} {word} is {field!r} here)"
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


__all__ = ["Document", "RecipeError", "RecipeText", "dotted", "dumper", "parse", "read", "suggest"]
