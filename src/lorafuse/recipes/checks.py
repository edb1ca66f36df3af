"""A recipe's documents as checked Stages: pydantic validates each document's fields and types; the rules
that need more than one field (what a merge_method takes, stage names, references to earlier stages, the
inputs apply / resize / extract need) are checked here. Every error names the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from lorafuse._terminal import printable
from lorafuse.errors import LorafuseError
from lorafuse.ops.combine.many import STREAMABLE
from lorafuse.ops.combine.registry import OPTION_FLAGS, REGISTRY
from lorafuse.recipes.paths import is_hub_id
from lorafuse.recipes.schema import MERGE_METHODS, TAKES, VERBS, Parameters, Stage
from lorafuse.recipes.source import RecipeError, RecipeText, dotted, suggest


@dataclasses.dataclass(frozen=True)
class Input:
    """One model of a stage as the recipe names it: the text, and the earlier stage it names (or None)."""

    text: str
    stage: str | None
    weight: float | None
    density: float | None


@dataclasses.dataclass(frozen=True)
class CheckedStage:
    """A stage ready to run: its number (0-based), name, verb ('combine', 'apply', 'resize', 'extract'), the
    validated Stage, its inputs (apply: the adapters; extract: the fine-tuned model), its base (apply,
    extract) and the stages it reads."""

    index: int
    name: str
    verb: str
    stage: Stage
    inputs: list[Input]
    base: Input | None
    needs: list[str]

    @property
    def models(self) -> list[Input]:
        """Every model the stage reads: its inputs, then its base."""
        return [*self.inputs, *([self.base] if self.base is not None else [])]


def _pydantic_message(err: dict[str, Any]) -> tuple[tuple[str | int, ...], str]:
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        parent = loc[:-1]
        field = str(loc[-1])
        known = _fields_at(parent)
        why = _MERGEKIT_FIELDS.get((len(parent) > 0 and parent[-1] == "parameters", field))
        if why is not None:
            return loc, f"mergekit's field {field} is not supported: {why}"
        return loc, f"unknown field{suggest(field, known)}; expected one of {', '.join(known)}"
    if kind == "missing":
        return loc, "missing (required)"
    if loc and loc[-1] in ("weight", "density") and isinstance(err.get("input"), list | dict):
        return loc, ("a list or mapping (mergekit's per-layer gradient or filtered values) is not supported: give "
                     "one number, the same for every layer")
    if kind == "model_type":  # pydantic names its class (ModelEntry): say what the recipe writes there
        value = err.get("input")
        got = ("null" if value is None else "a list" if isinstance(value, list) else
               f"the text {_short(value)}" if isinstance(value, str) else f"the value {_short(value)}")
        model = len(loc) == 2 and loc[0] == "models" and isinstance(value, str)
        hint = f" (a model is written `{{model: {value}}}`)" if model else ""
        return loc, f"expected a mapping of the fields {', '.join(_fields_at(loc))}, got {got}{hint}"
    if kind == "string_pattern_mismatch" and "\\x00" in str((err.get("ctx") or {}).get("pattern", "")):
        return loc, "a path cannot hold a NUL character"
    value = err.get("input")
    if kind == "string_type" and (value is None or isinstance(value, bool | int | float)):
        read = "null" if value is None else "a boolean" if isinstance(value, bool) else "a number"
        shown = " (empty, ~ or null)" if value is None else f" ({str(value).lower() if read == 'a boolean' else value})"
        return loc, f"{err.get('msg', 'invalid')}: YAML reads this value as {read}{shown}, not as text: quote it"
    if kind == "list_type" and loc == ("models",):  # `models:` left empty, or one model not written as a list
        got = "null (empty)" if value is None else "a mapping" if isinstance(value, dict) else f"{_short(value)}"
        return loc, f"expected a list of models (`- model: PATH`, or `[{{model: PATH}}]`), got {got}"
    if kind == "int_type" and isinstance(value, float) and not isinstance(value, bool):
        return loc, (f"{err.get('msg', 'invalid')}: YAML reads this value as the number {value!r}, not an integer "
                     f"(an integer is written without a point or exponent: {int(value)})"
                     if value.is_integer() and abs(value) < 2**63 else
                     f"{err.get('msg', 'invalid')}: got the number {value!r}")
    if kind in _WRITTEN and isinstance(value, str):
        return loc, f"{err.get('msg', 'invalid')}: YAML reads {value!r} as text ({_WRITTEN[kind]})"
    return loc, str(err.get("msg", "invalid"))


# mergekit's fields that lorafuse does not take, keyed by (inside a `parameters` mapping, name), and why: a
# mergekit user is told what lorafuse does instead of only "unknown field"
_MERGEKIT_FIELDS = {
    (False, "slices"): "a stage merges every layer of its models (no layer_range)",
    (False, "layer_range"): "a stage merges every layer of its models (no slices or layer ranges)",
    (False, "tokenizer_source"): "lorafuse merges adapters and writes no tokenizer (apply copies the base's own "
                                 "tokenizer files)",
    (False, "tokenizer"): "lorafuse merges adapters and writes no tokenizer (apply copies the base's own "
                          "tokenizer files)",
    (False, "chat_template"): "lorafuse writes no tokenizer or chat template (apply copies the base's own files)",
    (False, "out_dtype"): "the output dtype is the stage's dtype",
    (True, "normalize"): "weights are used as given (PEFT's rule): write weights that sum to 1 to normalize them "
                         "(mergekit's normalized linear is cat, or svd cut to a rank, here)",
    (True, "int8_mask"): "it only saves mergekit's memory; lorafuse has nothing to set",
    (True, "rescale"): "dare_linear and dare_ties always rescale the kept entries by 1/density, as PEFT's",
    (True, "filter_wise"): "a stage merges whole modules",
    (True, "t"): "slerp is not a lorafuse method (it takes a weight per model)",
    (True, "lambda"): "it scales the merged delta: multiply every model's weight by it instead",
    (True, "epsilon"): "it is della's, which is not a lorafuse method (dare_ties or dare_linear prune with one "
                       "density)",
    (True, "gamma"): "it is breadcrumbs', which is not a lorafuse method (magnitude_prune or ties prune by "
                     "magnitude)",
    (True, "select_topk"): "it is sce's, which is not a lorafuse method (ties or magnitude_prune keep the largest "
                           "entries, with density)",
    (False, "modules"): "a stage merges every module of its models (no per-module definitions)",
}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:30] + "..." + text[-6:]


# how a recipe writes the values whose type errors say how (YAML 1.2's core schema, source.py)
_WRITTEN = {"float_type": "a number is written 10, -0.5, 1e-3 or 2.5E+2; `1_5`, `1:30` and quoted numbers are text",
            "int_type": "an integer is written 10, 0x1F or 0o17; `1_000` and quoted numbers are text",
            "bool_type": "a boolean is written true or false; yes, no, on and off are text"}


def _fields_at(parent: tuple[str | int, ...]) -> list[str]:
    from lorafuse.recipes.schema import ModelEntry, ModelParameters

    if parent == ():
        return list(Stage.model_fields)
    if parent == ("parameters",):
        return list(Parameters.model_fields)
    if len(parent) == 2 and parent[0] == "models":
        return list(ModelEntry.model_fields)
    if len(parent) == 3 and parent[0] == "models" and parent[2] == "parameters":
        return list(ModelParameters.model_fields)
    return []


_SHOWN_ERRORS = 10  # a stage's errors listed at most (the rest counted)


def _validate(recipe: RecipeText, i: int) -> Stage:
    doc = recipe.documents[i]
    if not isinstance(doc.data, dict):
        raise RecipeError(f"{recipe.origin} line {doc.line}: a stage is a mapping (merge_method: ..., models: ...), "
                          f"not {type(doc.data).__name__}")
    if "merge_method" not in doc.data and "models" not in doc.data:  # config.json, say: nothing of a recipe
        shown = ", ".join(str(k) for k in list(doc.data)[:5]) + (", ..." if len(doc.data) > 5 else "")
        raise RecipeError(f"{recipe.origin} line {doc.line}: not a recipe: a stage has merge_method and models "
                          "(see `lorafuse run --print-schema`); this mapping "
                          + (f"has {shown}" if shown else "is empty"))
    try:
        return Stage.model_validate(doc.data)
    except ValidationError as e:
        count = e.error_count()
        lines = []
        for err in e.errors(include_url=False)[:_SHOWN_ERRORS]:  # only those shown are formatted (each finds its line)
            loc, msg = _pydantic_message(dict(err))
            lines.append(f"{recipe.where(i, loc)}: {msg}")
        if count > _SHOWN_ERRORS:
            lines.append(f"... and {count - _SHOWN_ERRORS} more errors in this stage")
        raise RecipeError("\n".join(printable(line, keep_newlines=False) for line in lines)) from None


def _verb(method: str) -> str:
    return method if method in VERBS else "combine"


def _taken(stage: Stage) -> set[str]:
    """The parameters stage's merge_method takes (a combine method: its registry flags, as combine's
    check_options reads them)."""
    verb = _verb(stage.merge_method)
    taken = set(TAKES[verb])
    if verb == "combine":
        m = REGISTRY[stage.merge_method]
        taken -= {option for option, flag, _ in OPTION_FLAGS if not getattr(m, flag)}
        if stage.merge_method not in STREAMABLE:
            taken -= {"passes", "engine", "ray_address"}
        if stage.merge_method != "svd":
            taken -= {"oversample"}  # the streamed svd's sketch
    return taken


_COMBINE_FIELDS = ("passes", "oversample", "engine", "ray_address", "exact", "split", "seed", "majority_sign", "rank",
                   "conv_rank", "density")  # where an error of combine's check_options is reported (the first it names)


def _check_combine(recipe: RecipeText, i: int, stage: Stage, device: str | None) -> None:
    """combine's own check of the stage's options (check_options: the rules between options, such as passes with
    engine 'memory' or ray_address without engine 'ray'), before any stage runs, at the line of the parameter
    its message names."""
    from lorafuse.ops.combine import CombineOptions, check_options
    from lorafuse.recipes.schema import DTYPES

    p = stage.parameters
    density = next((m.parameters.density for m in stage.models if m.parameters.density is not None), p.density)
    given = {k: v for k, v in {"rank": p.rank, "conv_rank": p.conv_rank, "majority_sign": p.majority_sign,
                               "seed": p.seed, "split": p.split, "exact": p.exact, "engine": p.engine,
                               "passes": p.passes, "ray_address": p.ray_address,
                               "oversample": p.oversample}.items() if v is not None}
    options = CombineOptions(method=stage.merge_method, density=density, device=device or "cpu",
                             dtype=None if stage.dtype is None else DTYPES[stage.dtype], **given)  # type: ignore[arg-type]
    try:
        check_options(options)
    except LorafuseError as e:
        text = str(e)
        field = next((f for f in _COMBINE_FIELDS if f in p.model_fields_set and f in text), None)
        raise RecipeError(f"{recipe.where(i, ('parameters', field) if field else ('merge_method',))}: {e}") from None


def _check_values(recipe: RecipeText, i: int, stage: Stage, device: str | None = None) -> None:
    """The values a verb checks only when it runs, checked here: a recipe is refused before its first stage
    (`device`: the run's, which some combine options depend on)."""
    from lorafuse.model.patterns import NameFilter
    from lorafuse.ops.apply_plan import check_requantize, shard_limit

    p = stage.parameters
    if p.max_shard_size is not None:
        try:
            shard_limit(p.max_shard_size)
        except LorafuseError as e:
            raise RecipeError(f"{recipe.where(i, ('parameters', 'max_shard_size'))}: {e}") from None
    try:  # what apply refuses, told before any stage runs
        check_requantize(p.requantize, stage.dtype)
    except LorafuseError as e:
        raise RecipeError(f"{recipe.where(i, ('parameters', 'requantize'))}: {e}") from None
    for key in ("include", "exclude"):
        pattern = getattr(p, key)
        if pattern is not None:
            try:
                NameFilter(pattern, "pattern")
            except LorafuseError as e:
                raise RecipeError(f"{recipe.where(i, ('parameters', key))}: {e}") from None
    if _verb(stage.merge_method) == "combine":
        _check_combine(recipe, i, stage, device)


def _check_parameters(recipe: RecipeText, i: int, stage: Stage, device: str | None = None) -> None:
    if stage.parameters.ray_address is not None:
        raise RecipeError(f"{recipe.where(i, ('parameters', 'ray_address'))}: a recipe cannot name a Ray cluster (a "
                          "recipe from elsewhere would send your adapters' paths to it and take back what it "
                          "returns); engine: ray joins the cluster the environment names (RAY_ADDRESS=ADDR "
                          "lorafuse run ...), else starts a local one")
    taken = _taken(stage)
    given = stage.parameters.model_fields_set
    for name in sorted(given - taken, key=lambda n: recipe.documents[i].line_of(("parameters", n))):
        if getattr(stage.parameters, name) is None:
            continue
        ok = ", ".join(sorted(taken - {"ray_address"})) or "none"  # refused above: no recipe takes it
        raise RecipeError(f"{recipe.where(i, ('parameters', name))}: merge_method {stage.merge_method!r} takes no "
                          f"{name} (it takes: {ok})")
    verb = _verb(stage.merge_method)
    for j, m in enumerate(stage.models):
        p = m.parameters
        if p.density is not None and "density" not in taken:
            raise RecipeError(f"{recipe.where(i, ('models', j, 'parameters', 'density'))}: merge_method "
                              f"{stage.merge_method!r} takes no density")
        if p.weight is not None and verb not in ("combine", "apply"):
            raise RecipeError(f"{recipe.where(i, ('models', j, 'parameters', 'weight'))}: merge_method "
                              f"{stage.merge_method!r} takes no weight (it reads one model)")
    if verb in ("resize", "extract"):
        rules = [n for n in ("rank", "sv_ratio", "sv_fro", "sv_cumulative") if getattr(stage.parameters, n) is not None]
        if len(rules) != 1:
            raise RecipeError(f"{recipe.where(i, ('parameters',))}: merge_method {stage.merge_method!r} needs exactly "
                              "one of rank, sv_ratio, sv_fro, sv_cumulative"
                              + (f" (got {', '.join(rules)})" if rules else ""))
    if verb == "combine" and "density" in taken:
        densities = {m.parameters.density if m.parameters.density is not None else stage.parameters.density
                     for m in stage.models}
        if None in densities:
            j = next(j for j, m in enumerate(stage.models) if m.parameters.density is None)
            raise RecipeError(f"{recipe.where(i, ('models', j))}: merge_method {stage.merge_method!r} needs a density "
                              "(parameters.density for every model, or models[].parameters.density)")
        if len(densities) > 1:
            j = next(j for j, m in enumerate(stage.models) if m.parameters.density is not None)
            listed = ", ".join(str(d) for d in sorted(d for d in densities if d is not None))
            raise RecipeError(f"{recipe.where(i, ('models', j, 'parameters', 'density'))}: the models' densities "
                              f"differ ({listed}); lorafuse prunes "
                              "every model of a combination with one density, as PEFT does: give one (parameters."
                              "density)")
    if stage.format is not None and verb != "combine":
        raise RecipeError(f"{recipe.where(i, ('format',))}: format applies to combine stages (merge_method "
                          f"{stage.merge_method!r} writes the input's own format)")
    _check_values(recipe, i, stage, device)


def _same(recipe: RecipeText, a: str, b: str) -> bool:
    """Whether two models of a recipe are one: the same text, or two spellings of one existing path (`base`,
    `./base`)."""
    import os

    from lorafuse.recipes.paths import locate

    if a == b:
        return True
    try:
        return os.path.samefile(locate(recipe.folder, a), locate(recipe.folder, b))
    except (OSError, ValueError):
        return False


def _check_base_listed(recipe: RecipeText, i: int, stage: Stage) -> None:
    """Refuse base_model listed again among the models (mergekit's way: its base is one of `models`, often with no
    parameters): apply would merge the base into itself as an adapter, and combine reads adapters only and not
    base_model, so the stage would fail late, or for ties on a density the base was never meant to have."""
    verb = _verb(stage.merge_method)
    if stage.base_model is None or verb not in ("combine", "apply"):
        return
    j = next((j for j, m in enumerate(stage.models) if _same(recipe, m.model, stage.base_model)), None)
    if j is None:
        return
    what = ("apply merges the models into base_model, so list only the adapters under models" if verb == "apply"
            else "combine reads only the adapters under models, and not base_model: remove the base from models")
    given = stage.models[j].model
    named = "" if given == stage.base_model else f" ({stage.base_model!r})"
    raise RecipeError(f"{recipe.where(i, ('models', j, 'model'))}: {given!r} is the base_model{named}, also listed "
                      f"among the models (mergekit lists its base there); {what}")


def _split_plus(recipe: RecipeText, i: int, path: tuple[str | int, ...], text: str,
                fits: Callable[[str], bool]) -> tuple[str, str] | None:
    """'BASE+ADAPTER' (apply's form, as mergekit's) unless the whole text names something (`fits`: an earlier
    stage, an existing path): split at the `+` where both sides name something (a path, an earlier stage, a Hub
    id), so that names holding `+` split right (`base+lora+v2` is `base` and `lora+v2` when those exist);
    refused when several `+` would do; at the last `+` when none does (the verb then says which is missing)."""
    if "+" not in text or fits(text):
        return None
    splits = [(text[:k], text[k + 1:]) for k, c in enumerate(text) if c == "+" and text[:k] and text[k + 1:]]
    if not splits:
        return None
    found = [(b, a) for b, a in splits if (fits(b) or is_hub_id(b)) and (fits(a) or is_hub_id(a))]
    if len(found) > 1:
        shown = " and ".join(f"{b!r} + {a!r}" for b, a in found[:2]) + (" (and more)" if len(found) > 2 else "")
        raise RecipeError(f"{recipe.where(i, path)}: {text!r} reads as BASE+ADAPTER in {len(found)} ways, {shown}, "
                          "each naming existing models: give the base as base_model and the adapter alone "
                          "(models: [{model: ADAPTER}])")
    return found[0] if found else splits[-1]


def _check_base_plus(recipe: RecipeText, i: int, text: str, verb: str, fits: Callable[[str], bool]) -> None:
    """Refuse base_model written as mergekit's BASE+LORA (the base with a LoRA merged in), where both sides name
    something: lorafuse's base_model is one checkpoint, and the verb would look for a folder named `base+lora`."""
    plus = _split_plus(recipe, i, ("base_model",), text, fits)
    if plus is None or not all(fits(x) or is_hub_id(x) for x in plus):
        return
    b, a = plus
    how = (f"give base_model: {b} and list {a!r} among the models (apply merges them all)" if verb == "apply" else
           f"merge {a!r} into {b!r} in an earlier apply stage and give that stage's name as base_model")
    raise RecipeError(f"{recipe.where(i, ('base_model',))}: {text!r} is mergekit's BASE+LORA form ({b!r} with the "
                      f"LoRA {a!r} merged in); lorafuse's base_model is one checkpoint: {how}")


def _check_path(recipe: RecipeText, i: int, path: tuple[str | int, ...], text: str) -> None:
    """Refuse, naming the line and field, a model that cannot name a path (paths.path_problem): `~user/...` of no
    such user, a file name longer than the file system takes."""
    from lorafuse.recipes.paths import path_problem

    problem = path_problem(recipe.folder, text)
    if problem is not None:
        raise RecipeError(f"{recipe.where(i, path)}: {problem}")


# lorafuse's commands that are no stage of a recipe, and what a recipe does instead
_COMMANDS = {
    "convert": "convert is not a recipe stage: run `lorafuse convert` on the recipe's output; a combine stage's "
               "format: (peft, kohya, diffusers) writes its output in that format",
    "combine": "a combine stage is named by its method: svd, cat, linear, ties, ...",
    "similarity": "similarity writes no model, so it is not a recipe stage: run `lorafuse similarity`",
    "info": "info writes no model, so it is not a recipe stage: run `lorafuse info`",
}


def check(recipe: RecipeText, device: str | None = None) -> list[CheckedStage]:
    """Every stage validated and checked, in order; later stages may name earlier ones' outputs. `device`: the
    run's (None: the CPU), which combine's options are checked with."""
    from lorafuse.recipes.paths import exists

    n = len(recipe.documents)
    stages: list[CheckedStage] = []
    names: dict[str, int] = {}
    folded: dict[str, str] = {}  # the names in lower case (a file system that ignores case sees one file)
    declared: dict[str, list[int]] = {}  # every document's name -> the documents that declare it, in order
    for j, doc in enumerate(recipe.documents):
        if isinstance(doc.data, dict) and isinstance(doc.data.get("name"), str):
            declared.setdefault(doc.data["name"], []).append(j)
    for i in range(n):
        stage = _validate(recipe, i)
        if stage.merge_method not in MERGE_METHODS:
            from lorafuse.ops.combine.registry import foreign_method

            other = _COMMANDS.get(stage.merge_method) or foreign_method(stage.merge_method)
            hint = f" ({other})" if other else suggest(stage.merge_method, MERGE_METHODS)
            given = recipe.documents[i].data.get("merge_method", stage.merge_method)  # as written (any case)
            raise RecipeError(f"{recipe.where(i, ('merge_method',))}: unknown merge_method "
                              f"{given!r}{hint}; choose one of {', '.join(MERGE_METHODS)}")
        if stage.name is None and n > 1:
            raise RecipeError(f"{recipe.origin} line {recipe.documents[i].line}: a recipe of {n} stages names each "
                              "one (name: ...), so that later stages can read its output")
        name = stage.name or "stage"
        if name in names:
            raise RecipeError(f"{recipe.where(i, ('name',))}: stage name {name!r} is used twice (also by the stage "
                              f"on line {recipe.documents[names[name]].line})")
        if name.lower().endswith(".safetensors"):
            raise RecipeError(f"{recipe.where(i, ('name',))}: stage name {name!r} ends in .safetensors; a stage's "
                              "output is NAME or NAME.safetensors as its format decides: give the name without it")
        if name.lower() in folded:
            raise RecipeError(f"{recipe.where(i, ('name',))}: stage names {folded[name.lower()]!r} and {name!r} "
                              "differ only in case, which some file systems do not tell apart")
        folded[name.lower()] = name
        _check_base_listed(recipe, i, stage)
        _check_parameters(recipe, i, stage, device)
        verb = _verb(stage.merge_method)

        def ref(text: str, path: tuple[str | int, ...], *, j: int = i, stage: Stage = stage) -> str | None:
            if text in names:
                if exists(recipe.folder, text):
                    raise RecipeError(f"{recipe.where(j, path)}: {text!r} names the earlier stage {text!r} and also "
                                      f"a path beside the recipe ({recipe.folder / text}), and which one is meant "
                                      f"cannot be told: rename the stage, or write ./{text} to read the path")
                return text
            if stage.name is not None and text == stage.name:
                raise RecipeError(f"{recipe.where(j, path)}: stage {text!r} cannot read its own output")
            later = [k for k in declared.get(text, ()) if k > j]
            if later:
                raise RecipeError(f"{recipe.where(j, path)}: {text!r} is a later stage (line "
                                  f"{recipe.documents[later[0]].line}); a stage reads only earlier stages' outputs")
            return None

        def fits(text: str) -> bool:  # an earlier stage's name, or an existing path
            return text in names or exists(recipe.folder, text)

        def model(text: str, path: tuple[str | int, ...], w: float | None, d: float | None, *, k: int = i) -> Input:
            x = Input(text, ref(text, path), w, d)
            if x.stage is None:
                _check_path(recipe, k, path, text)
            return x

        inputs: list[Input] = []
        base: Input | None = None
        for j, m in enumerate(stage.models):
            where = ("models", j, "model")
            named = ref(m.model, where)
            w = m.parameters.weight if m.parameters.weight is not None else stage.parameters.weight
            d = m.parameters.density if m.parameters.density is not None else stage.parameters.density
            plus = None if named is not None else _split_plus(recipe, i, where, m.model, fits)
            if plus is not None:
                if verb != "apply":
                    raise RecipeError(f"{recipe.where(i, where)}: {m.model!r} is BASE+ADAPTER, which only "
                                      "merge_method apply takes (or a path that does not exist)")
                b_text, a_text = plus
                if base is not None and base.text != b_text:
                    raise RecipeError(f"{recipe.where(i, where)}: base {b_text!r} differs from {base.text!r}: one "
                                      "apply stage merges into one base")
                base = model(b_text, where, None, None)
                inputs.append(model(a_text, where, w, d))
            else:
                inputs.append(model(m.model, where, w, d))
        if stage.base_model is not None and verb in ("apply", "extract"):
            _check_base_plus(recipe, i, stage.base_model, verb, fits)
        if stage.base_model is not None:
            b = model(stage.base_model, ("base_model",), None, None)
            if base is not None and base.text != b.text:
                raise RecipeError(f"{recipe.where(i, ('base_model',))}: base_model {b.text!r} differs from the base "
                                  f"{base.text!r} of the models' BASE+ADAPTER form")
            if verb in ("apply", "extract"):
                base = b
        if verb in ("apply", "extract") and base is None:
            what = ("the checkpoint to merge into" if verb == "apply"
                    else "the base the fine-tuned model is compared with")
            raise RecipeError(f"{recipe.where(i)}: merge_method {verb} needs base_model ({what})"
                              + (", or models given as BASE+ADAPTER" if verb == "apply" else ""))
        if verb in ("resize", "extract") and len(inputs) != 1:
            what = "the adapter to resize" if verb == "resize" else "the fine-tuned model"
            raise RecipeError(f"{recipe.where(i, ('models',))}: merge_method {verb} reads one model ({what}), got "
                              f"{len(inputs)}")
        needs = list(dict.fromkeys(x.stage for x in [*inputs, *([base] if base else [])] if x.stage is not None))
        stages.append(CheckedStage(i, name, verb, stage, inputs, base, needs))
        names[name] = i
    return stages


__all__ = ["CheckedStage", "Input", "check", "dotted"]
