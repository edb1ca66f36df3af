"""A recipe's text as YAML documents, with the line of every field, so that every error names its line.

PyYAML composes each document into nodes that carry their position; the positions are collected per path
(('models', 0, 'parameters', 'weight') -> line), then the same nodes are constructed into plain data. A key
given twice in one mapping is refused (PyYAML would silently keep the last).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorafuse.errors import RecipeError

PathKey = tuple[str | int, ...]
MAX_RECIPE_CHARS = 1 << 20  # a recipe longer than this is refused (not read whole): YAML parsing costs ~1 GB and
# ~15 s per Mi characters of hostile flow-style text; a hand-written recipe of 10,000 models is ~350 KiB


@dataclasses.dataclass(frozen=True)
class Document:
    """One YAML document: its data, where it starts, and the line of each path inside it."""

    data: Any
    line: int
    lines: Mapping[PathKey, int]

    def line_of(self, path: Sequence[str | int]) -> int:
        """The line of `path`, or of its nearest enclosing field that has one."""
        p = tuple(path)
        # a mapping key YAML reads as a number or a boolean (`7: 3`) is that value in a validator's path and
        # the key's text here: paths compare by their elements' text (a list index and a mapping key never
        # share a parent)
        texts = {tuple(_text(x) for x in k): v for k, v in self.lines.items()}
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


def parse(text: str, origin: str, folder: Path) -> RecipeText:
    """The YAML documents of `text` (empty documents, which hold nothing or only comments, are skipped). Raises
    RecipeError naming the line for text that is not YAML, or for a mapping key YAML does not read as text."""
    import yaml

    if len(text) > MAX_RECIPE_CHARS:  # YAML text given as a string: the bound a recipe file has
        raise RecipeError(f"{origin}: larger than {MAX_RECIPE_CHARS >> 20} Mi characters: not a recipe")
    docs: list[Document] = []
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # refuses a character YAML does not allow (NUL, a lone surrogate) here
        while loader.check_node():
            node = loader.get_node()
            if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG):
                continue  # an empty document: a trailing '---', or a stage commented out between two
            lines: dict[PathKey, int] = {}
            _positions(node, (), lines, origin, set())
            docs.append(Document(loader.construct_document(node), node.start_mark.line + 1, lines))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"{origin}{at}: not valid YAML: {e.problem or e.context}") from None
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


def read(path: str | Path) -> RecipeText:
    p = Path(path)
    try:  # not blocking: a FIFO is refused below instead of waited on for a writer
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise RecipeError(f"{p}: no such recipe file") from None
    except IsADirectoryError:
        raise RecipeError(f"{p}: is a folder, not a recipe file (a .yml file)") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise RecipeError(f"{p}: cannot read the recipe: {getattr(e, 'strerror', None) or e}") from None
    try:
        with os.fdopen(fd, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise RecipeError(f"{p}: is a folder, not a recipe file (a .yml file)")
            if not stat.S_ISREG(mode):
                from lorafuse.io.safetensors import file_kind

                raise RecipeError(f"{p}: is {file_kind(mode)}, not a recipe file (a .yml file)")
            text = f.read(MAX_RECIPE_CHARS + 1)  # bounded: a huge file given by mistake
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{p}: cannot read the recipe: {getattr(e, 'strerror', None) or e}") from None
    if len(text) > MAX_RECIPE_CHARS:
        raise RecipeError(f"{p}: larger than {MAX_RECIPE_CHARS >> 20} Mi characters: not a recipe")
    # relative model paths: from the folder of the path as given (a link's folder, not its target's), as
    # combine --from-list reads its list (read_list)
    return parse(text, str(p), Path(os.path.abspath(p)).parent)


def suggest(word: str, choices: Sequence[str]) -> str:
    """' (did you mean 'weight'?)' for a near miss, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


__all__ = ["Document", "RecipeError", "RecipeText", "dotted", "parse", "read", "suggest"]
