"""PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module>.lora_A.weight` (r x in) and `.lora_B.weight`
(out x r); embeddings use `lora_embedding_A` (r x num_embeddings) and
`lora_embedding_B` (dim x r); DoRA adds `lora_magnitude_vector`; `lora_bias` adds
`lora_B.bias`; `<module>.base_layer.weight` (saved with embedding layers) and any
other tensor is a full copy of a base weight (`modules_to_save`) that replaces it.
Scale per module is alpha / r (alpha / sqrt(r) with rslora), with `rank_pattern`
and `alpha_pattern` overriding r and alpha for the modules they match.
"""

from __future__ import annotations

import copy
import enum
import functools
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from lorafuse._terminal import plural, short
from lorafuse.errors import FormatError, InputChangedError, LorafuseValueError, ShapeMismatchError, UnsupportedError
from lorafuse.formats.kohya import PREFIXES as KOHYA_PREFIXES
from lorafuse.formats.streaming import WritePlan, specs_of, stream_with, write_adapter
from lorafuse.io.checkpoint import read_json, refuse_pickle
from lorafuse.io.hub import PEFT_WEIGHTS
from lorafuse.io.provenance import CARD_NAME, Provenance, model_card, stamp
from lorafuse.io.safetensors import FileIdentity, SafetensorsFile, identity_of
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter, FormatSpec, Kind, LoraUpdate, Update, register
from lorafuse.model.arithmetic import NARROWING_FIELDS, rank_fields
from lorafuse.model.experts import expert_modules
from lorafuse.model.names import check_module_name, exact_pattern, full_tensors_text
from lorafuse.model.param_lora import ParamLoraUpdate
from lorafuse.model.patterns import analyse

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = PEFT_WEIGHTS  # (io.hub: what a Hub fetch of an adapter downloads)
PREFIX = "base_model.model."

# Suffix of a saved key -> the role of the tensor in its module.
_ROLES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}


def _folder(path: Path) -> Path:
    return path.parent if path.is_file() else path


def is_peft(path: str | os.PathLike[str]) -> bool:
    return (_folder(Path(path)) / CONFIG_NAME).is_file()


# ---- PEFT's regular expressions, matched within a bounded amount of work ---------------------------
#
# A config can hold many patterns (rank_pattern / alpha_pattern keys, target_modules and
# exclude_modules as strings, layers_pattern, modules_to_save) that are matched against every
# module. The work is bounded by counts, never by a clock (a clock makes loading depend on how busy
# the machine is): at most MAX_PATTERNS entries in one field and MAX_REGEX_PATTERNS regular
# expressions in one config (each compiled once), at most MAX_MATCH_TESTS regular-expression tests
# per adapter, and at most MAX_MATCH_STEPS backtracking steps by an upper estimate of each test's
# cost. Patterns that are plain (escaped) names, and '^' + such a name (what lorafuse writes as
# rank_pattern / alpha_pattern keys), are looked up in a dict and cost nothing. Real adapters stay
# orders of magnitude below every limit.

MAX_PATTERNS = 200_000  # entries in one pattern field (a LoRA of a 1T-parameter MoE has ~70k modules)
MAX_REGEX_PATTERNS = 10_000  # patterns in one config that are regular expressions, not plain names
MAX_MATCH_TESTS = 10_000_000  # regular-expression tests of one adapter's modules (a few seconds at most)
MAX_MATCH_STEPS = 5_000_000_000  # upper estimate of their backtracking steps (a few seconds, for hostile names)

# A pattern that means exactly one string: no metacharacter, or one escaped by a backslash.
_PLAIN = re.compile(r"(?:[^\\.^$*+?{}\[\]|()]|\\[^0-9A-Za-z])*")
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)

# How PEFT wraps each kind of pattern (peft.utils.other.get_pattern_key, tuners_utils.check_target_module_exists).
SUFFIX = "(.*\\.)?({})$"  # rank_pattern / alpha_pattern keys, with re.match
FULL = "{}"  # target_modules / exclude_modules as a string, with re.fullmatch
LAYERS = "(?:^|.*?\\.){}\\.(?P<idx>\\d+)\\."  # layers_pattern entries, with re.match
SAVED = "(^|.*\\.){}($|\\..*)"  # modules_to_save entries (never LoRA targets), with re.match


def is_plain(pattern: str) -> bool:
    """Whether `pattern` matches exactly one string (its backslash-unescaped self)."""
    return _PLAIN.fullmatch(pattern) is not None


def plain_text(pattern: str) -> str:
    return _UNESCAPE.sub(r"\1", pattern)


def is_exact(pattern: str) -> bool:
    """Whether a rank_pattern / alpha_pattern key is '^' + a plain name (exact_pattern): under PEFT's
    `(.*\\.)?(KEY)$` it matches that one module name in full, and no module it is the dotted tail of."""
    return pattern.startswith("^") and is_plain(pattern[1:])


@dataclass(frozen=True)
class Regex:
    """A user pattern compiled once inside PEFT's wrapper, with what its matching may cost."""

    pattern: str
    compiled: re.Pattern[str]
    repeats: int  # quantifiers that can repeat: the estimated cost grows with the name's length to this power
    width: int | None  # the fixed number of characters the pattern matches (None: it varies or it asserts)
    paths: int = 1  # ways one attempt may go (alternations, optional parts): the estimated cost is multiplied by it


_COMPILED: dict[tuple[str, str], Regex] = {}


def compile_pattern(pattern: str, wrapper: str, field: str, label: str) -> Regex:
    """`pattern` checked for catastrophic backtracking and compiled inside `wrapper`, once per process
    (FormatError naming `field` otherwise)."""
    key = (wrapper, pattern)
    rx = _COMPILED.get(key)
    if rx is not None:
        return rx
    try:
        problem, repeats, width, paths = analyse(pattern)
        compiled = re.compile(wrapper.format(pattern))
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        raise FormatError(f"{label}: {field} pattern {_short(pattern)} is not a regular expression ({e})") from None
    if problem:
        raise FormatError(f"{label}: {field} pattern {_short(pattern)} {problem}: it could take very long "
                          "to match; write it more simply")
    if len(_COMPILED) >= 4 * MAX_REGEX_PATTERNS:
        _COMPILED.clear()
    rx = _COMPILED[key] = Regex(pattern, compiled, repeats, width, paths)
    return rx


class MatchBudget:
    """Counts the regular-expression tests of one adapter and their estimated backtracking steps."""

    def __init__(self, label: str, regexes: int, modules: int | None) -> None:
        self.label, self.regexes, self.modules = label, regexes, modules
        self.tests = 0
        self.steps = 0

    def spend(self, rx: Regex, name: str, start: int = 0) -> None:
        """Account for one test of `rx` on `name` (from index `start`): a fixed-width pattern tests one
        place; otherwise each '.' is a place where the wrapper may start the pattern, and each
        repeating quantifier may try every length."""
        n = len(name) - start + 1
        self.tests += 1
        self.steps += rx.paths * (n if rx.width is not None else (name.count(".", start) + 1) * n ** rx.repeats)
        if self.tests > MAX_MATCH_TESTS or self.steps > MAX_MATCH_STEPS:
            what = (f"{self.tests} tests (at most {MAX_MATCH_TESTS})" if self.tests > MAX_MATCH_TESTS
                    else f"about {self.steps:.3g} backtracking steps (at most {MAX_MATCH_STEPS:.3g})")
            raise FormatError(
                f"{self.label}: matching the {plural(self.regexes, 'regular expression')} of adapter_config.json "
                f"(rank_pattern, alpha_pattern, target_modules, ...) against "
                f"{'its' if self.modules is None else self.modules} modules needs more "
                f"than {what}, stopped at module {_short(name)} and pattern {_short(rx.pattern)}; use fewer "
                "patterns, or plain module names (escaped names are looked up, not matched)"
            )


class PatternTable:
    """PEFT's rank_pattern / alpha_pattern rule: the first key (in dict order) such that
    re.match(rf"(.*\\.)?({key})$", module) succeeds. Plain names are looked up by the module's dotted
    suffixes; only regular expressions are tested, each compiled once."""

    def __init__(self, patterns: dict[str, object], field: str, label: str) -> None:
        check_pattern_count(len(patterns), field, label)
        self.values = list(patterns.values())
        self.plain: dict[str, int] = {}
        self.exact: dict[str, int] = {}
        self.regex: list[tuple[int, Regex]] = []
        for i, key in enumerate(patterns):
            if is_plain(key):
                self.plain.setdefault(plain_text(key), i)
            elif is_exact(key):
                self.exact.setdefault(plain_text(key[1:]), i)
            else:
                self.regex.append((i, compile_pattern(key, SUFFIX, field, label)))

    def first(self, module: str, budget: MatchBudget) -> int | None:
        """The index of the first pattern that matches `module`, or None."""
        best = self.exact.get(module)
        if self.plain:
            hits = [self.plain.get(s) for s in dotted_suffixes(module)] + [best]
            best = min((h for h in hits if h is not None), default=None)
        for i, rx in self.regex:
            if best is not None and i > best:
                break
            start = len(module) - rx.width if rx.width is not None else 0
            if start < 0:
                continue
            if rx.width is not None and start > 0 and module[start - 1] != ".":
                continue  # the wrapper's '(.*\.)?' must end just before the pattern
            budget.spend(rx, module, start)
            if rx.compiled.match(module, start):
                return i
        return best

    def value(self, module: str, default: object, budget: MatchBudget) -> object:
        i = self.first(module, budget)
        return default if i is None else self.values[i]


def dotted_suffixes(name: str) -> list[str]:
    """`a.b.c` -> ['a.b.c', 'b.c', 'c']: what a plain pattern P matches as `(.*\\.)?P$` (or list entries
    of target_modules as `name == P or name.endswith('.' + P)`)."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def target_name(module: str) -> str:
    """A target_modules entry for `module` when the model's other module names are unknown: its last name, or the
    shortest dotted tail that starts with a word where the last name is a number (diffusers' `to_out.0`: PEFT
    matches an entry as a name's dotted tail, so '0' would also select containers such as down_blocks.0, which it
    cannot wrap)."""
    return next((t for t in reversed(dotted_suffixes(module)) if not t.split(".", 1)[0].isdigit()), module)


def check_pattern_count(count: int, field: str, label: str) -> None:
    if count > MAX_PATTERNS:
        raise FormatError(f"{label}: {field} has {count} entries (at most {MAX_PATTERNS}: a real adapter has one "
                          "per module at most); the config is not one lorafuse can match in bounded time")


_TABLES: dict[int, tuple[dict[str, object], int, PatternTable, MatchBudget]] = {}


def pattern_value(patterns: dict[str, object], module: str, default: object) -> object:
    """PEFT's rule: the first pattern (dict order) matching `(.*\\.)?(PATTERN)$` wins. The table of
    a dict is built once (the dict must not change in between)."""
    if not patterns:
        return default
    cached = _TABLES.get(id(patterns))
    if cached is None or cached[0] is not patterns or cached[1] != len(patterns):
        if len(_TABLES) > 16:
            _TABLES.clear()
        table = PatternTable(patterns, "pattern", "adapter config")
        budget = MatchBudget("adapter config", len(table.regex), None)
        cached = _TABLES[id(patterns)] = (patterns, len(patterns), table, budget)
    return cached[2].value(module, default, cached[3])


# ---- which modules PEFT targets ---------------------------------------------------------------------
#
# PEFT builds LoRA layers from the config (tuners_utils.check_target_module_exists), then loads the
# file into them and ignores every tensor that has no layer (set_peft_model_state_dict). Tensors of
# modules the config does not target are therefore never merged by PEFT, and lorafuse drops them too.

ALL_LINEAR = "all-linear"
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")  # PEFT's 'all-linear' leaves out the model's output layer
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft.utils.constants: the layers weight tying concerns
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")  # PEFT: the first numbered component, no layers_pattern


class Targeting:
    """PEFT's target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save
    rules of one config, applied to the module names of its file (the model's module names)."""

    def __init__(self, cfg: dict[str, object], label: str) -> None:
        self.label = label
        self.parameters: list[str] = list(cast("list[str]", cfg.get("target_parameters") or []))
        target = cfg.get("target_modules")
        exclude = cfg.get("exclude_modules")
        layers = cfg.get("layers_to_transform")
        pattern = cfg.get("layers_pattern")
        saved = cast("list[str]", cfg.get("modules_to_save") or [])
        for field, value in (("target_modules", target), ("exclude_modules", exclude), ("modules_to_save", saved),
                             ("layers_pattern", pattern)):
            if isinstance(value, list):
                check_pattern_count(len(value), field, label)
        self.all_linear = isinstance(target, str) and target.lower() == ALL_LINEAR
        self.active = target is not None  # without target_modules every module of the file is taken
        self.target_rx = compile_pattern(target, FULL, "target_modules", label) if (
            isinstance(target, str) and not self.all_linear) else None
        self.target_names = set(target) if isinstance(target, list) else set()
        self.exclude_rx = compile_pattern(exclude, FULL, "exclude_modules", label) if isinstance(exclude, str) else None
        self.exclude_names = set(exclude) if isinstance(exclude, list) else set()
        self.layers: set[int] | None = None
        if isinstance(layers, int) or (isinstance(layers, list) and layers):
            self.layers = {layers} if isinstance(layers, int) else set(layers)
        # PEFT: an empty layers_pattern (None, '' or []) means the first numbered component is the layer
        patterns = ([pattern] if pattern else []) if isinstance(pattern, str) else list(pattern or [])  # type: ignore[call-overload]
        self.layer_rx = [compile_pattern(p, LAYERS, "layers_pattern", label) for p in patterns]
        # plain modules_to_save entries, by their number of dotted components
        self.saved_plain: dict[int, set[str]] = {}
        for m in saved:
            if is_plain(m):
                text = plain_text(m)
                self.saved_plain.setdefault(text.count(".") + 1, set()).add(text)
        self.saved_rx = [compile_pattern(m, SAVED, "modules_to_save", label)
                         for m in saved if not is_plain(m)]
        self.regexes = sum(rx is not None for rx in (self.target_rx, self.exclude_rx)) + len(self.layer_rx) + len(
            self.saved_rx)
        # ensure_weight_tying with a tied embedding targeted: PEFT also puts LoRA (tied to the embedding's) on
        # the layers tied to it, the output embedding, whatever else the config says (target_modules_to_tie).
        embedding_saved = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in saved)
        if isinstance(target, str):
            embedding_targeted = self.target_rx is not None and any(
                self.target_rx.compiled.fullmatch(n) for n in EMBEDDING_LAYER_NAMES)
        else:
            embedding_targeted = any(t.split(".")[-1] in EMBEDDING_LAYER_NAMES for t in self.target_names)
        self.tied = bool(cfg.get("ensure_weight_tying")) and embedding_targeted and not embedding_saved

    def _test(self, rx: Regex, name: str, budget: MatchBudget, full: bool = False) -> re.Match[str] | None:
        budget.spend(rx, name)
        return rx.compiled.fullmatch(name) if full else rx.compiled.match(name)

    def why_not(self, name: str, kind: str, budget: MatchBudget) -> str | None:
        """None when PEFT targets module `name` (a LoRA module of `kind`), else the reason it does not."""
        if param_module(name, self.parameters) is not None:
            return None  # a LoRA on a parameter of the module (target_parameters: PEFT's ParamWrapper)
        suffixes = dotted_suffixes(name)
        if self.tied and kind == "linear" and name.rsplit(".", 1)[-1] in OUTPUT_EMBEDDINGS:
            return None  # tied to the input embedding's LoRA (ensure_weight_tying)
        if self.exclude_rx is not None and self._test(self.exclude_rx, name, budget, full=True):
            return "excluded by exclude_modules"
        if self.exclude_names.intersection(suffixes):
            return "excluded by exclude_modules"
        if self._saved(name) or any(self._test(rx, name, budget) for rx in self.saved_rx):
            return "listed in modules_to_save (PEFT never puts LoRA on those)"
        if not self.active:
            return None
        if self.all_linear:
            if kind != "linear" or name in OUTPUT_EMBEDDINGS:
                return "not a linear layer below the output layer ('all-linear')"
            return None
        if self.target_rx is not None:
            return None if self._test(self.target_rx, name, budget, full=True) else "not matched by target_modules"
        if name in self.target_names:
            return None  # named in full: PEFT does not apply layers_to_transform then
        if not self.target_names.intersection(suffixes[1:]):
            return "not in target_modules"
        if self.layers is None:
            return None
        index = self._layer_index(name, budget)
        if index is None:
            return "has no layer index for layers_to_transform"
        return None if index in self.layers else f"layer {index} is not in layers_to_transform"

    def _saved(self, name: str) -> bool:
        """A plain modules_to_save entry M names this module or one that contains it: PEFT's
        `(^|.*\\.)M($|\\..*)` is M as a run of whole dotted components of the name."""
        parts = name.split(".")
        return any(".".join(parts[i:i + n]) in names for n, names in self.saved_plain.items()
                   for i in range(len(parts) - n + 1))

    def _layer_index(self, name: str, budget: MatchBudget) -> int | None:
        if not self.layer_rx:
            m = _LAYER_INDEX.match(name)
            return int(m.group("idx")) if m else None
        for rx in self.layer_rx:
            m = self._test(rx, name, budget)
            if m is not None:
                return int(m.group("idx"))
        return None


BASE_LAYER = ".base_layer"


def param_module(name: str, parameters: Sequence[str]) -> tuple[str, int] | None:
    """(the module, the number of wrappers outside this one) when `name` names a PEFT ParamWrapper of the
    config's target_parameters, else None. PEFT wraps a module once per targeted parameter, nesting the
    wrappers (`experts`, `experts.base_layer`, ...), and targets parameter P of module M when
    `M.P == T` or `M.P` ends with `.T` for an entry T (tuners_utils.BaseTuner._inject_parameters)."""
    if not parameters:
        return None
    module, depth = name, 0
    while module.endswith(BASE_LAYER):
        module, depth = module[: -len(BASE_LAYER)], depth + 1
    if BASE_LAYER + "." in module:
        return None
    for t in parameters:
        owner = t.rpartition(".")[0]
        if not owner or module == owner or module.endswith("." + owner):
            return module, depth
    return None


def _kind_of(parts: dict[str, Tensor]) -> str:
    if "emb_A" in parts or "emb_B" in parts:
        return "embedding"
    a = parts.get("A")
    return "conv" if a is not None and len(a.shape) > 2 else "linear"


def _listed(names: Sequence[str], limit: int = 5, quote: bool = True) -> str:
    shown = ", ".join(repr(n) if quote else n for n in list(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read_config(folder: Path) -> dict[str, object]:
    path = folder / CONFIG_NAME
    cfg = read_json(path, "the adapter config")
    if isinstance(cfg, dict):
        check_peft_type(cfg, str(path))  # before anything else: an IA3 config has no 'r' to miss
        # PEFT itself always writes both; without them the scale alpha / r would be a guess.
        for key in ("r", "lora_alpha"):
            if key not in cfg:
                raise FormatError(f"{path}: '{key}' is missing (PEFT writes it; the scale {key} needs it)")
    return check_config(cfg, str(path))


def _is_number(x: object) -> bool:
    """A finite int or float (not a bool): ints too large for a float are not."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _is_positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(value: object, limit: int = 80) -> str:
    return short(value, limit)


# PEFT methods that are not LoRA, and what their adapters are (peft.utils.PeftType).
_PROMPT_LEARNING = {"PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT",
                    "CARTRIDGE"}
_NOT_LORA_WHY = {
    "ADALORA": "AdaLoRA stores an SVD-form update (lora_A, lora_E, lora_B with a rank budget) that lorafuse does "
               "not read",
    "LOHA": "PEFT's LoHa stores Hadamard-product factors (hada_w1_a ...) under PEFT names, not LoRA factors",
    "LOKR": "PEFT's LoKr stores Kronecker factors (lokr_w1 ...) under PEFT names, not LoRA factors",
}


def check_peft_type(cfg: dict[str, object], path: str) -> None:
    """Refuse a PEFT config of another method (IA3, LoHa, prompt tuning, ...) by name, before any
    LoRA field is looked at. A config without peft_type is taken as LoRA."""
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type == "LORA":
        return
    name = peft_type if isinstance(peft_type, str) and peft_type.isprintable() and len(peft_type) <= 40 else None
    if name is not None and name != name.upper():  # PEFT's types are upper case; its config lookup is exact
        spelt = name.upper()
        wrong = (f"{path}: peft_type {_short(peft_type)} is not PEFT's spelling {spelt!r}, so PEFT cannot load this "
                 f"config (PeftConfig.from_pretrained raises KeyError: {peft_type!r})")
        if spelt == "LORA":
            raise FormatError(f"{wrong}: write \"peft_type\": \"LORA\" in it")
        raise UnsupportedError(f"{wrong}; and spelt {spelt!r} it would not be a LoRA adapter: lorafuse reads LoRA "
                               "adapters (peft_type LORA)")
    what = f"this is {'an' if name and name[0] in 'AEIOU' else 'a'} {name} adapter" if name else \
        "this is not a LoRA adapter"
    if name in _PROMPT_LEARNING:
        why = "; prompt learning adds virtual tokens to the input and has no weights to merge into a model"
    elif name in _NOT_LORA_WHY:
        why = f"; {_NOT_LORA_WHY[name]} (PEFT's merge_and_unload() merges it, where that method supports merging)"
    else:
        why = " (PEFT's merge_and_unload() merges it, where that method supports merging)"
    raise UnsupportedError(f"{path}: {what} (peft_type {_short(peft_type)} is not a LoRA adapter); lorafuse reads "
                           f"LoRA adapters (peft_type LORA){why}")


# init_lora_weights values that leave the base model as it is (only initial LoRA values differ).
_KEEPS_BASE = ("gaussian", "eva", "orthogonal", "mica")
_CHANGES_BASE = {
    "pissa": "PiSSA subtracts the adapter's initial product from the base weights (an SVD of each weight)",
    "olora": "OLoRA subtracts the adapter's initial product from the base weights (a QR of each weight)",
    "corda": "CorDA subtracts the adapter's initial product from the base weights (a data-driven SVD)",
    "loftq": "LoftQ replaces the base weights with quantized ones",
    "lora_ga": "LoRA-GA subtracts the adapter's initial product from the base weights (from data gradients)",
}
_CONVERTIBLE = ("pissa", "olora", "corda")
# Config fields with which the merged weights are not W + scale * B @ A over the checkpoint's own layers.
_CANNOT_MERGE = {
    "layer_replication": "PEFT stacks repeated copies of base layers, so the adapted model has more layers than the "
                         "checkpoint (mergekit's passthrough can build that model first)",
    "use_qalora": "QALoRA's lora_A acts on the input averaged in groups of qalora_group_size (GPTQ models), so its "
                  "update is not B @ A on the weight",
    "alora_invocation_tokens": "Activated LoRA acts only on tokens after its invocation sequence, so it cannot be "
                               "merged into weights (PEFT cannot merge it either)",
    "kasa_config": "KaSA truncates the base weights' smallest singular values and adds lora_diag between A and B",
    "arrow_config": "Arrow routes every token between several LoRA experts: there is no single update to merge",
    "use_bdlora": "BD-LoRA stores block-diagonal factors",
    "megatron_config": "LoRA on Megatron's parallel layers (sharded weights) is not read",
}
# Config fields of LoRA variants that PEFT merges as plain LoRAs (merge_and_unload: W + s B A), whose files also hold
# training-time tensors under these name parts: read as plain LoRAs, those tensors left out (Adapter.notes).
_PLAIN_MERGE = {"velora_config": (".lora_velora_embed", "VeLoRA's compressed-activation state"),
                "monteclora_config": (".lora_monteclora_sampler.", "MonteCLoRA's Monte Carlo sampler")}


def _refuse_unmergeable(cfg: dict[str, object], path: str) -> None:
    """Refuse, naming the field, a config whose merge lorafuse cannot reproduce."""
    init = cfg.get("init_lora_weights", True)
    if not isinstance(init, bool):
        key = init.lower() if isinstance(init, str) else None
        method = next((m for m in _CHANGES_BASE if key is not None and key.startswith(m)), None)
        if method is not None:
            how = (" Convert it to a plain LoRA with PEFT first (save_pretrained(..., "
                   "path_initial_model_for_weight_conversion=...), which writes init_lora_weights=true)."
                   if method in _CONVERTIBLE else "")
            raise UnsupportedError(
                f"{path}: init_lora_weights={_short(init)}: {_CHANGES_BASE[method]} when PEFT loads the adapter, so "
                f"merging it into the original weights would not give PEFT's model.{how}")
        if key not in _KEEPS_BASE:
            raise UnsupportedError(f"{path}: init_lora_weights={_short(init)} is not a LoRA initialization lorafuse "
                                   "knows (true, false, " + ", ".join(repr(k) for k in _KEEPS_BASE) + "): it may "
                                   "change the base weights when PEFT loads the adapter")
    for key, why in _CANNOT_MERGE.items():
        value = cfg.get(key)
        if value is not None and value is not False and value != [] and value != {}:
            raise UnsupportedError(f"{path}: {key}={_short(value)}: {why}; lorafuse cannot merge this adapter")


def check_config(cfg: object, path: str) -> dict[str, object]:
    """Validate a PEFT LoRA config (the JSON object of adapter_config.json)."""
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: adapter config is not a JSON object (it is {type(cfg).__name__})")
    check_peft_type(cfg, path)

    def check(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise FormatError(f"{path}: '{key}' must be {what}, got {_short(cfg.get(key))}")

    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    check("r", _is_positive_int(r), "a positive integer")
    check("lora_alpha", _is_number(alpha), "a number")
    for key in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(key) or {}
        check(key, isinstance(value, dict), "an object")
        check_pattern_count(len(value), key, path)
        for pat, v in value.items():
            if key == "rank_pattern" and not (_is_positive_int(v) or (_is_number(v) and v > 0 and v == int(v))):
                raise FormatError(f"{path}: {key}[{short(pat)}] must be a positive integer, got {_short(v)}")
            if not _is_number(v):
                raise FormatError(f"{path}: {key}[{short(pat)}] must be a finite number, got {_short(v)}")
    for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias", "use_qalora"):
        check(key, isinstance(cfg.get(key, False), bool), "true or false")
    # PEFT loads 'none', 'all' and 'lora_only' alone (any other value: NotImplementedError, null: AttributeError)
    check("bias", isinstance(bias := cfg.get("bias", "none"), str) and bias in ("none", "all", "lora_only"),
          "'none', 'all' or 'lora_only' (PEFT cannot load an adapter with another: NotImplementedError)")
    drop = cfg.get("lora_dropout", 0.0)  # PEFT: nn.Dropout(p) where p > 0 (TypeError: a non-number, ValueError: past 1)
    check("lora_dropout", isinstance(drop, (int, float)) and not drop > 1,
          "a number up to 1 (PEFT cannot load an adapter with another: nn.Dropout raises)")
    for key in ("target_modules", "exclude_modules"):  # PEFT: a regex string, a list of names, or null
        value = cfg.get(key)
        check(key, value is None or isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)), "a string, a list of strings or null")
    value = cfg.get("modules_to_save")
    check("modules_to_save", value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
          "a list of strings or null")
    value = cfg.get("layers_to_transform")
    check("layers_to_transform", value is None or _is_int(value) or (
        isinstance(value, list) and all(_is_int(v) for v in value)), "an integer, a list of integers or null")
    value = cfg.get("layers_pattern")
    check("layers_pattern", value is None or isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)), "a string, a list of strings or null")
    value = cfg.get("trainable_token_indices")  # PEFT: a list of token ids (the input embedding's), or per module
    check("trainable_token_indices", value is None or _token_ids(value) or (isinstance(value, dict) and all(
        isinstance(k, str) and _token_ids(v) for k, v in value.items())),
          "a list of distinct token ids (integers from 0), an object mapping module names to such lists, or null")
    value = cfg.get("target_parameters")
    check("target_parameters", value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
          "a list of strings or null")
    if value:  # PEFT's lora.ParamWrapper refuses these (tuners/lora/layer.py, ParamWrapper.__init__)
        for key in ("use_dora", "lora_bias", "fan_in_fan_out"):
            if cfg.get(key):
                raise UnsupportedError(f"{path}: target_parameters with {key}=true: PEFT's ParamWrapper does not "
                                       "work with it (PEFT cannot load this adapter either)")
    _refuse_unmergeable(cfg, path)
    _compile_all(cfg, path)
    return cfg


def _token_ids(value: object) -> bool:
    """A trainable_token_indices list: distinct integers from 0 (a repeated id makes PEFT's row copy ambiguous)."""
    return isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value) and len(set(value)) == len(value)


def _compile_all(cfg: dict[str, object], path: str) -> None:
    """Check and compile every regular expression of the config (once), within MAX_REGEX_PATTERNS."""
    patterns: list[str] = []
    for key in ("rank_pattern", "alpha_pattern"):
        patterns += [p for p in cast("dict[str, object]", cfg.get(key) or {}) if not (is_plain(p) or is_exact(p))]
    if len(patterns) > MAX_REGEX_PATTERNS:
        raise FormatError(f"{path}: rank_pattern and alpha_pattern hold {len(patterns)} regular expressions (at most "
                          f"{MAX_REGEX_PATTERNS}; plain or escaped module names, '^' + one, do not count)")
    for key in ("rank_pattern", "alpha_pattern"):
        for p in cast("dict[str, object]", cfg.get(key) or {}):
            if not (is_plain(p) or is_exact(p)):
                compile_pattern(p, SUFFIX, key, path)
    Targeting(cfg, path)


def _version(path: Path) -> FileIdentity | None:
    """Which version of a file is at `path` (io.safetensors.identity_of), or None."""
    try:
        return identity_of(os.stat(path))
    except OSError:
        return None


def _check_same_config(folder: Path, before: FileIdentity | None) -> None:
    """InputChangedError when adapter_config.json is another file (or another version of it) than the one read: the
    folder was replaced (another run writing it, a re-download) between reading the config and the weights, whose
    scale (lora_alpha / r) would then come from another adapter's config."""
    if _version(folder / CONFIG_NAME) != before:
        raise InputChangedError(f"{folder}: {CONFIG_NAME} was replaced while the adapter was read (another version of "
                                "the adapter is there now: another run writing it, or a download?): its config and "
                                f"{WEIGHTS_NAME} would come from two versions; nothing was written. Read it again once "
                                "it is written")


def load_peft(path: str | os.PathLike[str]) -> Adapter:
    folder = _folder(Path(path))
    before = _version(folder / CONFIG_NAME)
    cfg = _read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file() and not weights.exists():  # anything else there (a FIFO, a folder) is refused below
        if (folder / "adapter_model.bin").is_file():
            raise refuse_pickle(folder / "adapter_model.bin")
        raise FormatError(f"{folder}: {WEIGHTS_NAME} not found")
    with SafetensorsFile(weights) as f:  # views handed out keep the mapping alive
        _check_same_config(folder, before)  # the weights opened are those of the folder whose config was read
        tensors = {key: Tensor(f.raw(key), f.info(key).dtype) for key in f.keys()}
        made_by = Provenance.from_metadata(f.metadata)
    adapter = build_adapter(tensors, cfg, str(weights))
    adapter.path = folder
    adapter.provenance = made_by
    return adapter


def from_tensors(tensors: dict[str, Tensor], config: Any = None) -> Adapter:
    """`Adapter.from_state_dict`: an adapter from PEFT-named tensors and a LoRA config (a dict like
    adapter_config.json, or a peft LoraConfig). Without a config every module's scale is 1."""
    if config is None:
        ranks = {k.removeprefix(PREFIX).rsplit(".lora_", 1)[0]: t.shape[0] if t.shape else 0
                 for k, t in tensors.items() if k.endswith((".lora_A.weight", ".lora_embedding_A"))}
        first = next(iter(ranks.values()), 8)
        cfg: dict[str, object] = {
            "peft_type": "LORA", "r": first, "lora_alpha": first,
            "rank_pattern": {exact_pattern(n): r for n, r in ranks.items()},
            "alpha_pattern": {exact_pattern(n): r for n, r in ranks.items()},
        }
    else:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        # a copy as adapter_config.json holds it: the caller's lists (target_modules) stay theirs, a later edit of
        # them changes no adapter, and `save` can write every field
        cfg = {_config_key(k): _copied(k, v) for k, v in cfg.items()}
    return build_adapter(tensors, check_config(cfg, "<state dict config>"), "<state dict>")


def _config_key(key: object) -> str:
    if not isinstance(key, str):  # adapter_config.json's field names are text
        raise LorafuseValueError(f"<state dict config>: field names must be strings, got a {type(key).__name__}")
    return key


def _json_form(value: object) -> object:
    """What adapter_config.json holds for a config value JSON has no form of: a set sorted (a LoraConfig's
    target_modules), a numpy scalar its Python number, a path its text, an enum (PeftType, TaskType) its value."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fsdecode(os.fspath(value))
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"a {type(value).__name__} is not a JSON value")


def _copied(key: str, value: object) -> object:
    """A config value as adapter_config.json holds it (a deep copy: tuples become lists, numpy scalars numbers,
    _json_form); LorafuseValueError naming the field for one JSON cannot hold (bytes, an object, a cycle), which
    `save` could not write."""
    try:
        text = json.dumps(value, default=_json_form)
    except (TypeError, ValueError, RecursionError) as e:
        raise LorafuseValueError(f"<state dict config>: {key!r} holds a {type(value).__name__} that "
                                 f"adapter_config.json cannot hold ({str(e)[:120]})") from None
    odd = _non_text_keys(value)
    if odd:  # json.dumps would write 1 as "1": rank_pattern {1: 4} is no pattern PEFT reads
        raise LorafuseValueError(f"<state dict config>: {key!r} holds a mapping with the key {odd[0]!r}, a "
                                 f"{type(odd[0]).__name__}; adapter_config.json's keys are strings (module names or "
                                 "patterns)")
    return json.loads(text)


def _non_text_keys(value: object) -> list[object]:
    """The mapping keys in `value` (nested in mappings and sequences; json.dumps has ruled out cycles) that are not
    strings, the first of each mapping."""
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)][:1]
        children: Iterable[object] = value.values()
    elif isinstance(value, (list, tuple)):
        bad, children = [], value
    else:
        return []
    return bad + [k for c in children for k in _non_text_keys(c)]


def build_adapter(tensors: dict[str, Tensor], cfg: dict[str, object], label: str) -> Adapter:
    """An Adapter from PEFT-named tensors (with or without the `base_model.model.` prefix), read as
    PEFT reads them: tensors PEFT would ignore (modules the config does not target, a DoRA magnitude
    without use_dora, a lora_B bias without lora_bias, replacements of weights that are not in the
    model) are dropped and listed in `Adapter.notes`."""
    notes: list[str] = []
    tensors = _without_training_state(tensors, cfg, notes)
    parts, full, origin = _group(tensors, label)
    _refuse_multihead_attention(parts, label)
    parts = _targeted(parts, cfg, label, notes)
    _check_extras(parts, cfg, label, notes)
    full, origin = _wrapper_copies(full, origin, cfg, notes)
    full, origin = _loadable_full(full, origin, set(parts), notes)
    scales = _pattern_values(cfg, list(parts), label)
    _note_order_dependence(cfg, list(parts), notes)
    parameters = cast("list[str]", cfg.get("target_parameters") or [])
    updates: dict[str, Update] = {m: _update(label, m, p, cfg, *scales[m], param_module(m, parameters))
                                  for m, p in parts.items()}
    for m, t in full.items():
        if not t.is_float:
            raise FormatError(f"{label}: {full_tensors_text(cfg, [origin.get(m, m)])}: non-float dtype {t.dtype}")
    return Adapter(updates=updates, full=full, config=cfg, format="peft", full_origin=origin, notes=notes)


def _without_training_state(tensors: dict[str, Tensor], cfg: dict[str, object],
                             notes: list[str]) -> dict[str, Tensor]:
    """The tensors without those of _PLAIN_MERGE's variants that the config enables (their sampler or activation
    state, which PEFT's merge does not use), said in `notes`."""
    for key, (part, what) in _PLAIN_MERGE.items():
        value = cfg.get(key)
        if value is None or value is False or value == {}:
            continue
        dropped = [k for k in tensors if part in k]
        tensors = {k: t for k, t in tensors.items() if part not in k}
        notes.append(f"{key}: merged as a plain LoRA (W + scale * B @ A), as PEFT's merge_and_unload merges it; "
                     f"{plural(len(dropped), 'tensor')} of {what} left out (training-time state the merge does not "
                     f"use){': ' + _listed(dropped, 3) if dropped else ''}")
    return tensors


def _group(tensors: dict[str, Tensor], label: str) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor],
                                                             dict[str, str]]:
    """LoRA tensors by module and role; every other tensor as a full replacement of a base tensor."""
    parts: dict[str, dict[str, Tensor]] = {}
    full: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    seen: dict[tuple[str, str], str] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        for suffix, role in _ROLES.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                check_module_name(module, f"{label}: tensor {short(key)}")
                if (module, role) in seen:
                    raise FormatError(f"{label}: module {module!r} has two {role} tensors: "
                                      f"{seen[module, role]!r} and {key!r}")
                seen[module, role] = key
                parts.setdefault(module, {})[role] = tensor
                break
        else:
            if ".lora_" in name:
                named = re.search(r"\.lora_(?:A|B|embedding_[AB]|magnitude_vector)\.([^.]+)(?:\.weight)?$", name)
                hint = (f": it holds the adapter's name ({named.group(1)!r}), as a PeftModel's own state_dict() names "
                        "its tensors; peft.get_peft_model_state_dict(model) gives them as PEFT saves them, without it"
                        if named else "")
                raise FormatError(f"{label}: tensor {short(key)} is not a LoRA tensor lorafuse knows{hint}")
            check_module_name(name, label, "tensor")
            canonical = name.replace(".base_layer.", ".")
            if canonical in full:
                raise FormatError(f"{label}: tensors {origin[canonical]!r} and {name!r} both replace the base "
                                  f"weight {canonical!r}")
            full[canonical] = tensor
            origin[canonical] = name
    return parts, full, origin


_ROLE_NAMES = {"A": "lora_A", "B": "lora_B", "emb_A": "lora_embedding_A", "emb_B": "lora_embedding_B"}


def _refuse_multihead_attention(parts: dict[str, dict[str, Tensor]], label: str) -> None:
    """PEFT's LoRA on a torch.nn.MultiheadAttention (lora.MultiheadAttention) saves the factors of its
    in_proj_weight under the layer's name and those of its out_proj under `<layer>.base_layer.out_proj` (no
    other PEFT layer wraps a child LoRA under `.base_layer.`). Refused by name, with the out_proj part alone too
    (else it would read as a module the config does not target, which PEFT does not ignore): PEFT's merge (and
    its forward, which merges and unmerges) adds the out_proj delta twice up to peft 0.21 (W + 2 dW, fixed in
    huggingface/peft#3774 as W + dW), so the model such a file stands for depends on the PEFT version."""
    suffix = BASE_LAYER + ".out_proj"

    def shapes(module: str) -> str:
        return ", ".join(f"{_ROLE_NAMES.get(role, role)} {tuple(t.shape)}" for role, t in parts[module].items())

    for module in parts:
        if not module.endswith(suffix):
            continue
        layer = module[: -len(suffix)]
        what = (f"module {layer!r} ({shapes(layer)}) with {module!r} is" if layer in parts else
                f"module {module!r} ({shapes(module)}) is the out_proj part (its in_proj_weight part {layer!r} is "
                "not in the file) of")
        raise UnsupportedError(
            f"{label}: {what} PEFT's LoRA on a torch.nn.MultiheadAttention (its in_proj_weight and its out_proj), "
            "which lorafuse does not merge: PEFT up to 0.21 adds the out_proj delta twice (W + 2*scale*B@A, in its "
            "merge and in the forward it trained with; huggingface/peft#3774 makes it W + scale*B@A), so the model "
            "the file stands for depends on the PEFT version; merge it with the merge_and_unload() of the PEFT "
            "that trained it")


def _targeted(parts: dict[str, dict[str, Tensor]], cfg: dict[str, object], label: str,
              notes: list[str]) -> dict[str, dict[str, Tensor]]:
    """The modules PEFT builds LoRA layers for; the others are dropped (PEFT ignores their tensors)."""
    targeting = Targeting(cfg, label)
    budget = MatchBudget(label, targeting.regexes, len(parts))
    kept: dict[str, dict[str, Tensor]] = {}
    dropped: list[str] = []
    for module, p in parts.items():
        why = targeting.why_not(module, _kind_of(p), budget)
        if why is None:
            kept[module] = p
        else:
            dropped.append(f"{module!r} ({why})")
    if dropped and not kept:
        raise FormatError(f"{label}: none of the {plural(len(parts), 'LoRA module')} in the file is targeted by "
                          f"adapter_config.json (target_modules={_short(cfg.get('target_modules'))}): "
                          f"{_listed(dropped, quote=False)}; PEFT would merge nothing from it")
    if dropped:
        notes.append(f"ignored {plural(len(dropped), 'module')} that adapter_config.json does not target, as "
                     f"PEFT ignores them: {_listed(dropped, quote=False)}")
    return kept


def _check_extras(parts: dict[str, dict[str, Tensor]], cfg: dict[str, object], label: str, notes: list[str]) -> None:
    """DoRA magnitudes and lora_B biases as PEFT loads them: ignored without use_dora / lora_bias;
    with them, every module must have its own (PEFT would otherwise keep values from its
    initialization, not from training)."""
    for role, flag, tensor in (("magnitude", "use_dora", "lora_magnitude_vector"),
                               ("bias", "lora_bias", "lora_B.bias")):
        having = [m for m, p in parts.items() if role in p]
        if not cfg.get(flag):
            for m in having:
                del parts[m][role]
            if having:
                notes.append(f"ignored the {tensor} tensors of {plural(len(having), 'module')} because {flag} "
                             f"is false in adapter_config.json, as PEFT ignores them: {_listed(having)}")
            continue
        lacking = [m for m in parts if role not in parts[m]]
        if lacking:
            init = ("the row norms of the base weight" if role == "magnitude" else "zeros") + \
                " with init_lora_weights=true, random values with false"
            raise FormatError(
                f"{label}: {flag} is true but {len(lacking)} of {plural(len(parts), 'module')} "
                f"{'has' if len(lacking) == 1 else 'have'} no {tensor}: "
                f"{_listed(lacking)}. PEFT would use the value it creates when it builds the layer ({init}), "
                "not a trained one: the file is incomplete; save the adapter again with PEFT")


_WRAPPER_PARTS = (".modules_to_save.", ".original_module.")  # PEFT's ModulesToSaveWrapper's submodules


def _wrapper_copies(full: dict[str, Tensor], origin: dict[str, str], cfg: dict[str, object],
                    notes: list[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop `X.modules_to_save.<p>` / `X.original_module.<p>` of a module X that modules_to_save names (PEFT's rule:
    X ends with an entry): bias='all' / 'lora_only' saves the wrapper's biases under these names too, beside the
    module's own `X.bias`. PEFT loads the copy it uses from `X.<p>` and ignores the first (the second goes to the
    original module, which merge_and_unload drops), so neither replaces a base tensor."""
    listed = cfg.get("modules_to_save")
    saved = [m for m in listed if isinstance(m, str)] if isinstance(listed, list) else []
    dropped: list[str] = []
    for canonical, name in list(origin.items()):
        part = next((w for w in _WRAPPER_PARTS if w in name), None)
        if part is not None and any(name.partition(part)[0].endswith(m) for m in saved):
            del full[canonical], origin[canonical]
            dropped.append(name)
    if dropped:
        notes.append(f"ignored {plural(len(dropped), 'tensor')} of modules_to_save wrappers' own submodules "
                     "('.modules_to_save.', '.original_module.', saved for adapter_config "
                     f"bias={cfg.get('bias')!r}), as PEFT does: the module's own tensors replace it: "
                     f"{_listed(dropped)}")
    return full, origin


def _loadable_full(full: dict[str, Tensor], origin: dict[str, str], lora: set[str],
                   notes: list[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Full tensors PEFT loads into the model: `X.base_layer.<p>` only when X has a LoRA layer, `X.<p>`
    only when it has none (a LoRA layer moves X's own tensors under base_layer)."""
    kept: dict[str, Tensor] = {}
    kept_origin: dict[str, str] = {}
    dropped: list[str] = []
    for canonical, tensor in full.items():
        name = origin.get(canonical, canonical)
        owner, sep, _ = name.partition(".base_layer.")
        loads = owner in lora if sep else name.rsplit(".", 1)[0] not in lora
        if loads:
            kept[canonical] = tensor
            kept_origin[canonical] = name
        else:
            dropped.append(name)
    if dropped:
        notes.append(f"ignored {plural(len(dropped), 'tensor')} that PEFT does not load into the model (a "
                     "'.base_layer.' "
                     f"tensor of a module without LoRA, or a module's own tensor where it has LoRA): "
                     f"{_listed(dropped)}")
    return kept, kept_origin


def _pattern_values(cfg: dict[str, object], modules: list[str], label: str) -> dict[str, tuple[object, object]]:
    """(r, lora_alpha) of every module after rank_pattern / alpha_pattern (PEFT's first-match rule), in
    a bounded number of regular-expression tests."""
    rank_pattern: dict[str, object] = cfg.get("rank_pattern") or {}  # type: ignore[assignment]
    alpha_pattern: dict[str, object] = cfg.get("alpha_pattern") or {}  # type: ignore[assignment]
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    if not rank_pattern and not alpha_pattern:
        return {m: (r, alpha) for m in modules}
    ranks = PatternTable(rank_pattern, "rank_pattern", label)
    alphas = PatternTable(alpha_pattern, "alpha_pattern", label)
    budget = MatchBudget(label, len(ranks.regex) + len(alphas.regex), len(modules))
    return {m: (ranks.value(m, r, budget), alphas.value(m, alpha, budget)) for m in modules}


def _note_order_dependence(cfg: dict[str, object], modules: list[str], notes: list[str]) -> None:
    """A note where two plain (or '^'-anchored) alpha_pattern / rank_pattern keys with different values match one
    module: PEFT takes the first in dict order, the file's (as lorafuse does), but its save_pretrained writes the
    keys sorted, so the model was trained with the first key in the user's order, which may be the other one."""
    for field in ("alpha_pattern", "rank_pattern"):
        patterns = cast("dict[str, object]", cfg.get(field) or {})
        # a key whose only pattern characters are '.' matches its literal text (and maybe more: not looked for)
        literal = {k: re.sub(r"(?<!\\)\.", r"\\.", k) for k in patterns}
        keys = {plain_text(t): k for k, t in literal.items() if is_plain(t)}
        exact = {plain_text(t[1:]): k for k, t in literal.items() if is_exact(t)}
        if len(keys) + len(exact) < 2:
            continue
        order = {k: i for i, k in enumerate(patterns)}
        clashes: list[tuple[str, list[str]]] = []
        for m in modules:
            hits = [keys[t] for t in dotted_suffixes(m) if t in keys] + ([exact[m]] if m in exact else [])
            if len({json.dumps(patterns[k]) for k in hits}) > 1:
                clashes.append((m, sorted(set(hits), key=order.__getitem__)))
        if clashes:
            m, hits = clashes[0]
            said = ", ".join(f"{short(k)} ({_short(patterns[k])})" for k in hits)
            more = f", and {plural(len(clashes) - 1, 'more module')}" if len(clashes) > 1 else ""
            notes.append(f"{field}: {plural(len(clashes), 'module')} matched by keys of different values ({short(m)} "
                         f"by {said}{more}): PEFT takes the first key in adapter_config.json, as lorafuse does, but "
                         "PEFT's save_pretrained writes the keys sorted, so if the training code listed them in "
                         f"another order the adapter was trained with another {field.split('_')[0]} there")


def config_says(label: str, cfg: dict[str, object], r: object) -> str:
    """Who states a module's r, for a message: adapter_config.json for a file, the config given for a state dict
    (a label '<...>'), saying so where the r is PEFT's default (the config gives no r nor rank_pattern)."""
    source = "the config given (<state dict config>)" if label.startswith("<") else "adapter_config.json"
    if "r" in cfg or cfg.get("rank_pattern"):
        return f"{source} says r={r}"
    return f"{source} gives no r (PEFT's default: r={r})"


def _update(weights: str, module: str, p: dict[str, Tensor], cfg: dict[str, object], r_cfg: object,
            alpha_cfg: object, param: tuple[str, int] | None = None) -> LoraUpdate:
    where = f"{weights}: module {module!r}"
    kind: Kind
    if ("emb_A" in p or "emb_B" in p) and ("A" in p or "B" in p):
        raise FormatError(f"{where} has both lora_embedding_A/B and lora_A/B tensors")
    if "emb_A" in p or "emb_B" in p:
        a, b, kind, transposed = p.get("emb_A"), p.get("emb_B"), "embedding", True
        names = ("lora_embedding_A", "lora_embedding_B")
    else:
        a, b = p.get("A"), p.get("B")
        names = ("lora_A.weight", "lora_B.weight")
        kind = "conv" if a is not None and len(a.shape) > 2 else "linear"
        transposed = bool(cfg.get("fan_in_fan_out", False)) and kind == "linear"
    if a is None or b is None:
        missing = names[0] if a is None else names[1]
        raise FormatError(f"{where} has no {missing}")
    for t, n in ((a, names[0]), (b, names[1])):
        if not t.is_float:
            raise FormatError(f"{where}: {n} has non-float dtype {t.dtype}")
    rank = a.shape[0] if a.shape else 0
    if len(a.shape) < 2 or len(b.shape) != len(a.shape):
        raise ShapeMismatchError(f"{where}: {names[0]} {a.shape} and {names[1]} {b.shape} are not LoRA factors "
                                 "(two matrices, or conv kernels of the same number of dimensions)")
    if rank == 0:
        raise ShapeMismatchError(f"{where}: {names[0]} {a.shape} has rank 0 (a zero-rank adapter)")
    if b.shape[1] != rank or any(d != 1 for d in b.shape[2:]):
        _refuse_grouped_conv(where, kind, a, b)
        raise ShapeMismatchError(f"{where}: {names[0]} {a.shape} and {names[1]} {b.shape} are not LoRA factors of "
                                 "one rank")
    for role, n in (("magnitude", "lora_magnitude_vector"), ("bias", "lora_B.bias")):
        extra = p.get(role)
        if extra is not None and not extra.is_float:
            raise FormatError(f"{where}: {n} has non-float dtype {extra.dtype}")
    if r_cfg != rank and param is None:  # a ParamWrapper's lora_A has r rows per expert (checked in ops.fused)
        raise ShapeMismatchError(f"{where}: {config_says(weights, cfg, r_cfg)} but the tensors have rank {rank}")
    alpha = float(alpha_cfg)  # type: ignore[arg-type]
    if not math.isfinite(alpha):  # a config that was not checked by check_config
        raise FormatError(f"{where}: lora_alpha {alpha} is not finite")
    r_scale = rank if param is None else cast(int, r_cfg)
    scale = alpha / math.sqrt(r_scale) if cfg.get("use_rslora") else alpha / r_scale
    update = LoraUpdate(module, a, b, scale, kind, transposed, p.get("magnitude"), p.get("bias"))
    if param is not None:
        if kind != "linear" or update.magnitude is not None or update.bias is not None:
            raise FormatError(f"{where}: a LoRA on a parameter (target_parameters) has two matrices lora_A / "
                              "lora_B and no magnitude or bias")
        update = ParamLoraUpdate(module, a, b, scale, kind, module=param[0], depth=param[1], r=r_cfg,
                                 alpha=alpha_cfg)
    if update.magnitude is not None:
        # One magnitude per output feature of the PEFT layer: B's rows. Conv stores it as (1, out, 1, 1).
        m = update.magnitude
        features = b.shape[0]
        if int(np.prod(m.shape)) != features or sorted(m.shape, reverse=True)[1:] != [1] * (len(m.shape) - 1):
            raise ShapeMismatchError(f"{where}: lora_magnitude_vector {m.shape} does not match {features} output "
                                     "features")
        update.magnitude = Tensor(m.raw.reshape(features), m.dtype)
    if update.bias is not None and update.bias.shape != (b.shape[0],):
        raise ShapeMismatchError(f"{where}: lora_B.bias {update.bias.shape} does not match {b.shape[0]} outputs")
    return update


def _refuse_grouped_conv(where: str, kind: str, a: Tensor, b: Tensor) -> None:
    """PEFT's LoRA on a convolution with groups > 1 makes lora_B a grouped 1x1 convolution (r / groups input
    channels): B(A(x)) is then no kernel of the base's grouped layout, and PEFT refuses to merge it."""
    rank, inner = a.shape[0], b.shape[1]
    if kind == "conv" and 0 < inner < rank and rank % inner == 0 and all(d == 1 for d in b.shape[2:]):
        raise UnsupportedError(
            f"{where}: lora_A.weight {a.shape} and lora_B.weight {b.shape} are PEFT's LoRA on a convolution with "
            f"groups={rank // inner} (its lora_B is grouped too), whose update is no kernel of the base's grouped "
            "layout, so it cannot be merged into the weights (PEFT's merge_and_unload refuses it too: 'Merging is "
            "not supported for _ConvNd layers with groups > 1')")


def _check_peft_storable(adapter: Adapter, u: object) -> LoraUpdate:
    """PEFT stores LoRA factors; a LoHa / LoKr, or a DoRA normalized over columns of an untransposed
    weight (LyCORIS wd_on_out=False), has no PEFT form."""
    if not isinstance(u, LoraUpdate):
        raise UnsupportedError(f"{adapter.label}: module {u.name!r} is a LoHa / LoKr update; PEFT stores LoRA "  # type: ignore[attr-defined]
                               "factors only (convert it first: `lorafuse convert IN -o OUT --to kohya --rank K`)")
    if u.magnitude_on_columns and not u.transposed:
        raise UnsupportedError(f"{adapter.label}: module {u.name!r} is DoRA normalized per input column "
                               "(LyCORIS wd_on_out=False), which PEFT cannot express")
    return u


def peft_config_for(adapter: Adapter) -> dict[str, object]:
    """adapter_config.json for `adapter`: r and lora_alpha (plus exact-name patterns where modules
    differ) are derived from the updates themselves, so each module's scale is kept exactly."""
    cfg: dict[str, object] = {k: v for k, v in adapter.config.items()
                              if k not in ("rank_pattern", "alpha_pattern", "use_rslora")}
    updates = list(adapter.updates.values())
    for u in updates:
        _check_peft_storable(adapter, u)
    fan_in_fan_out = _fan_in_fan_out(adapter, updates)
    if not updates:
        r = int(cfg.get("r", 8))  # type: ignore[call-overload]
        cfg.update({"r": r, "lora_alpha": cfg.get("lora_alpha", r), "rank_pattern": {}, "alpha_pattern": {},
                    "use_rslora": False, "use_dora": False})
    experts = set(expert_modules(adapter.updates))  # PEFT reads them at r and lora_alpha: those are theirs
    cfg.update({"peft_type": "LORA", **_rank_fields(adapter, updates, experts),
                "lora_bias": any(u.bias is not None for u in updates),
                "fan_in_fan_out": fan_in_fan_out})
    for attr, flag in (("magnitude", "use_dora"), ("bias", "lora_bias")):
        having = [u.name for u in updates if getattr(u, attr) is not None]
        if having and len(having) != len(updates):
            lacking = [u.name for u in updates if getattr(u, attr) is None]
            raise UnsupportedError(f"{adapter.label}: {plural(len(having), 'module', verb=('has', 'have'))} a {attr} "
                                   f"and {len(lacking)} do "
                                   f"not ({_listed(lacking)}); PEFT's {flag} applies to every module, so it cannot "
                                   "store that")
    cfg.setdefault("target_modules", sorted({target_name(u.name) for u in updates}))
    cfg.setdefault("bias", "none")
    cfg.setdefault("lora_dropout", 0.0)
    cfg.setdefault("base_model_name_or_path", None)
    if cfg.get("init_lora_weights") is False:
        # What PEFT does with a layer its config targets and the file lacks: with false it merges random
        # factors, with true it leaves the layer unchanged (what lorafuse's own merge does).
        cfg["init_lora_weights"] = True
    _target_every_module(adapter, cfg)
    return cfg


def _rank_fields(adapter: Adapter, updates: Sequence[Update], experts: set[str]) -> dict[str, object]:
    """r, lora_alpha, rank_pattern, alpha_pattern and use_rslora that state `updates` as PEFT reads them. A LoRA
    on a parameter (target_parameters) has its r per expert and its patterns matched against the parameter's
    name, which only the base tells: no operation makes one (they refuse it), so an adapter holding one is
    as it was read, and its own config's fields state every module of it."""
    if any(isinstance(u, ParamLoraUpdate) for u in updates):
        return {k: copy.deepcopy(adapter.config[k]) for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern",
                                                                 "use_rslora") if k in adapter.config}
    return rank_fields(updates, [u for u in updates if u.name in experts])


def _fan_in_fan_out(adapter: Adapter, updates: Sequence[Update]) -> bool:
    """adapter_config.json's fan_in_fan_out: true when a linear module is transposed (a GPT-2 style Conv1D, stored
    in x out). PEFT decides the layout per layer type, whatever the flag says (tuners/lora/layer.py: it sets it
    false for a torch Linear, bnb / hqq / Megatron layers too, and true for a Conv1D; an embedding is always
    transposed, a convolution never), so modules of both layouts (a Conv1D c_attn LoRA and a Linear lm_head LoRA
    of one GPT-2) are stored with it true, as their factors are. A LoRA on a parameter (target_parameters) is
    the one layer PEFT refuses it for: that and a Conv1D module in one adapter are refused, naming both."""
    params = [u.name for u in updates if isinstance(u, ParamLoraUpdate)]
    transposed = [u.name for u in updates if u.kind == "linear" and u.transposed and not isinstance(u, ParamLoraUpdate)]
    if transposed and params:
        raise UnsupportedError(
            f"{adapter.label}: fan_in_fan_out (GPT-2 style Conv1D) modules ({_listed(transposed)}) and LoRAs on "
            f"parameters (target_parameters: {_listed(params)}) in one adapter: PEFT refuses fan_in_fan_out=true for "
            "the second and needs it for the first, so it cannot store them together; save them as two adapters")
    return bool(transposed)


def _untargeted(adapter: Adapter, cfg: dict[str, object]) -> list[str]:
    """The modules of `adapter` that PEFT, reading `cfg`, would not build LoRA layers for."""
    targeting = Targeting(cfg, adapter.label)
    budget = MatchBudget(adapter.label, targeting.regexes, len(adapter.updates))
    return [n for n, u in adapter.updates.items() if targeting.why_not(n, u.kind, budget) is not None]


def _target_every_module(adapter: Adapter, cfg: dict[str, object]) -> None:
    """Make the written config target every written module (a combined adapter starts from its first
    input's config, whose target_modules, exclude_modules or layers_to_transform may leave out the
    modules of the others): when it does not, target the modules by their full names (no other module, which
    PEFT would give zero factors and report as missing keys) and drop the narrowing fields;
    init_lora_weights=true keeps any other module those names reach unchanged when PEFT loads it."""
    if not adapter.updates or not _untargeted(adapter, cfg):
        return
    cfg["target_modules"] = sorted(adapter.updates)
    for key in NARROWING_FIELDS:
        cfg[key] = None
    cfg["init_lora_weights"] = True
    left = _untargeted(adapter, cfg)
    if left:
        raise UnsupportedError(f"{adapter.label}: module(s) {_listed(left)} are also named by modules_to_save "
                               f"({_short(cfg.get('modules_to_save'))}): PEFT would not load their LoRA tensors")


def peft_tensors(adapter: Adapter) -> dict[str, Tensor]:
    """The tensors of adapter_model.safetensors, PEFT-named: every module's, then the full tensors."""
    out: dict[str, Tensor] = {}
    for name, u in adapter.updates.items():
        out.update(peft_module_tensors(adapter, name, u))
    out.update(peft_full_tensors(adapter))
    return out


def peft_module_tensors(adapter: Adapter, name: str, update: Update) -> dict[str, Tensor]:
    """One module's tensors in adapter_model.safetensors, PEFT-named."""
    u = _check_peft_storable(adapter, update)
    out: dict[str, Tensor] = {}
    key = PREFIX + name
    if u.kind == "embedding":
        out[key + ".lora_embedding_A"] = u.A
        out[key + ".lora_embedding_B"] = u.B
    else:
        out[key + ".lora_A.weight"] = u.A
        out[key + ".lora_B.weight"] = u.B
    if u.magnitude is not None:
        m = u.magnitude
        shape = (1, m.shape[0]) + (1,) * (len(u.A.shape) - 2) if u.kind == "conv" else m.shape
        out[key + ".lora_magnitude_vector"] = Tensor(m.raw.reshape(shape), m.dtype)
    if u.bias is not None:
        out[key + ".lora_B.bias"] = u.bias
    return out


def peft_full_tensors(adapter: Adapter) -> dict[str, Tensor]:
    """The full tensors (modules_to_save, base_layer) in adapter_model.safetensors, PEFT-named."""
    return {PREFIX + _full_key(adapter, name): t for name, t in adapter.full.items()}


def _full_key(adapter: Adapter, name: str) -> str:
    """The key of a full tensor as PEFT loads it: under `X.base_layer.` when module X has a LoRA update
    in the file, under `X.` when it has none."""
    saved = adapter.full_origin.get(name, name)
    owner, sep, rest = saved.partition(".base_layer.")
    module, _, param = name.rpartition(".")
    if sep and owner not in adapter.updates:
        return f"{owner}.{rest}"
    if not sep and module in adapter.updates:
        return f"{module}.base_layer.{param}"
    return saved


# diffusers' pipeline components (formats.diffusers.COMPONENTS, which imports this module): the first word of a
# diffusers LoRA's module names (`unet.down_blocks.0...`), which no module of the component's own model has
PIPELINE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")


def refuse_pipeline_names(adapter: Adapter) -> None:
    """An adapter read from a diffusers or kohya file names its modules by the pipeline's paths (`unet.down_blocks.0
    ...attn1.to_q`, `text_encoder.text_model...`); a PEFT adapter folder targets the modules of one model, by its
    own paths (`down_blocks.0...`), and PEFT (PeftModel.from_pretrained(unet, folder): NoMatchingPeftModuleError)
    and diffusers (unet.load_lora_adapter: nothing loaded) find none of them: refused, saying what to write. A
    PEFT adapter's own names (a model whose attribute is called `unet`) are written as read."""
    if adapter.format == "peft":
        return
    named = next((n for n in adapter.updates if n.split(".", 1)[0] in PIPELINE_COMPONENTS), None)
    if named is None:
        return
    parts = sorted({n.split(".", 1)[0] for n in adapter.updates if n.split(".", 1)[0] in PIPELINE_COMPONENTS})
    raise UnsupportedError(
        f"{adapter.label}: module {named!r} is named by its diffusers pipeline path ({', '.join(parts)}), which a "
        "PEFT adapter folder cannot hold: PEFT loads a folder into one model by that model's own module paths and "
        "would find no such module (PeftModel.from_pretrained: no target module found; diffusers' "
        "load_lora_adapter loads nothing): write it as diffusers (--format diffusers, format='diffusers': the file "
        "diffusers' load_lora_weights reads) or kohya")


def peft_plan(adapter: Adapter) -> WritePlan:
    """What save_peft writes for `adapter` (its updates may be a layout's placeholders: formats.streaming):
    adapter_config.json and the header of adapter_model.safetensors, in a folder with lorafuse's manifest;
    with the adapter's provenance (io.provenance), its `lorafuse.*` metadata keys and a model card
    (README.md: base_model from the config, library_name peft)."""
    flat = next((n for n in adapter.updates if "." not in n and n.startswith(KOHYA_PREFIXES)), None)
    if flat is not None:  # PEFT finds modules by their dotted paths in the model: a flat kohya name finds none
        raise UnsupportedError(f"{adapter.label}: module {flat!r} is a kohya name (flat, as kohya and LyCORIS "
                               "files write them), which a PEFT adapter folder cannot hold (PEFT would find no "
                               "such module in the model): write it as kohya, then `lorafuse convert --to peft` "
                               "gives the diffusers / PEFT names that diffusers' load_lora_weights reads")
    refuse_pipeline_names(adapter)
    cfg = peft_config_for(adapter)
    modules = {name: peft_module_tensors(adapter, name, u) for name, u in adapter.updates.items()}
    full = peft_full_tensors(adapter)
    tensors = {k: t for ts in modules.values() for k, t in ts.items()}
    tensors.update(full)
    side = {CONFIG_NAME: json.dumps(cfg, indent=2, sort_keys=True) + "\n"}
    made_by = adapter.provenance
    if made_by is not None:
        base = cfg.get("base_model_name_or_path")
        side[CARD_NAME] = model_card(made_by, base_model=base if isinstance(base, str) and base else None,
                                     library_name="peft")
    return WritePlan(adapter.label, list(modules), specs_of(tensors), stamp({"format": "pt"}, made_by),
                     functools.partial(peft_module_tensors, adapter), fixed=full, folder_kind="peft-adapter",
                     weights_name=WEIGHTS_NAME, side_files=side)


def save_peft(adapter: Adapter, out: str | os.PathLike[str], inputs: Sequence[Path] = (),
              overwrite: bool = False) -> Path:
    """Write `adapter` as a PEFT folder (adapter_config.json + adapter_model.safetensors, and lorafuse's
    manifest), atomically. An existing folder that lorafuse did not write is refused unless `overwrite`
    (see io.atomic)."""
    return write_adapter(peft_plan(adapter), adapter.updates, out, inputs, overwrite)


def _sniff(path: Path, keys: list[str]) -> bool:
    return is_peft(path)


def _save(adapter: Adapter, out: str | os.PathLike[str], overwrite: bool) -> Path:
    return save_peft(adapter, out, adapter.sources(), overwrite=overwrite)


FORMAT = register(FormatSpec("peft", _sniff, load_peft, _save,
                             "a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)", priority=30,
                             from_tensors=from_tensors, to_tensors=peft_tensors, open_stream=stream_with(peft_plan)))
