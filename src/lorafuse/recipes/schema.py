"""The recipe schema: one YAML document per stage, its fields named as mergekit names them where they mean the
same thing (merge_method, base_model, models[].model, models[].parameters.weight / density, parameters, dtype).

Validated by pydantic (strict types: a quoted number is a string, `true` is not a rank); unknown fields are
refused, so a misspelled field fails instead of being ignored. `schema_json()` is what `lorafuse run
--print-schema` prints.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from lorafuse._validate import MAX_OVERSAMPLE, MAX_PASSES, MAX_POWER_ITERS, MAX_RANK, MAX_SEED, split_name
from lorafuse.ops.combine.registry import METHODS

VERBS = ("apply", "resize", "extract")  # merge_method values that are not combine methods
MERGE_METHODS = (*METHODS, *VERBS)
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_STRICT = ConfigDict(extra="forbid", strict=True)

MAX_STAGE_NAME = 255 - len(".safetensors")  # a stage writes NAME or NAME.safetensors: a file name (255 bytes)
_NO_NUL = r"^[^\x00]*$"  # a path: no NUL character (no file system takes one)
Weight = Annotated[float, Field(allow_inf_nan=False, description="the model's weight (negative subtracts)")]
Density = Annotated[float, Field(gt=0.0, le=1.0,
                                 description="fraction of entries kept (ties / dare / magnitude_prune)")]
Rank = Annotated[int, Field(ge=1, le=MAX_RANK)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]


def _lower(value: object) -> object:
    """A name the CLI takes in any case (--method, --format, --dtype, --engine, ...), lower-cased; anything else as
    given. ASCII only, as the CLI's --method: str.lower would read the Kelvin sign of '\u212ainear' as 'linear'."""
    return value.lower() if isinstance(value, str) and value.isascii() else value


def _no_parameters(value: object) -> object:
    """`parameters:` left empty (YAML null) as no parameters, as mergekit reads it (its fields are Optional)."""
    return {} if value is None else value


def _nullable(schema: dict[str, Any]) -> None:
    """The JSON schema of a `parameters` field: its mapping, or null (_no_parameters)."""
    schema["anyOf"] = [{"$ref": schema.pop("$ref")}, {"type": "null"}]


def _split_case(value: object) -> object:
    """split, in any case as the CLI's --split: 'B' or 'sqrt'."""
    return split_name(value) if isinstance(value, str) and value.isascii() else value


class ModelParameters(BaseModel):
    """Per-model parameters; they override the stage's `parameters` of the same name."""

    model_config = _STRICT
    weight: Weight | None = None
    density: Density | None = None


class ModelEntry(BaseModel):
    """One input: a path (relative paths are taken from the recipe's folder), a Hub id (`org/name`,
    `org/name@revision`), the name of an earlier stage, or, for apply, `BASE+ADAPTER`."""

    model_config = _STRICT
    model: Annotated[str, Field(min_length=1, pattern=_NO_NUL)]
    parameters: Annotated[ModelParameters, BeforeValidator(_no_parameters),
                          Field(json_schema_extra=_nullable)] = ModelParameters()


class Parameters(BaseModel):
    """The stage's parameters. Which ones a merge_method takes: see TAKES (others are refused, naming them)."""

    model_config = _STRICT
    weight: Weight | None = Field(default=None, description="default weight of models that give none (default 1)")
    density: Density | None = None
    rank: Rank | None = Field(default=None, description="output rank (combine svd methods, resize, extract)")
    conv_rank: Rank | None = Field(default=None, description="output rank of kxk convolutions (combine, extract)")
    majority_sign: Annotated[Literal["total", "frequency"], BeforeValidator(_lower)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    split: Annotated[Literal["B", "sqrt"], BeforeValidator(_split_case)] | None = None
    exact: bool | None = None
    passes: Annotated[int, Field(ge=1, le=MAX_PASSES)] | None = None
    engine: Annotated[Literal["auto", "memory", "stream", "ray"], BeforeValidator(_lower)] | None = None
    ray_address: str | None = Field(default=None, description="refused: a recipe cannot name a Ray cluster "
                                       "(set RAY_ADDRESS in the environment)")
    sv_ratio: Annotated[float, Field(ge=1.0, allow_inf_nan=False)] | None = None
    sv_fro: Fraction | None = None
    sv_cumulative: Fraction | None = None
    max_rank: Rank | None = None
    include: str | None = Field(default=None, description="extract: only modules matching this regular expression")
    exclude: str | None = Field(default=None, description="extract: skip modules matching this regular expression")
    embeddings: Annotated[Literal["skip", "lora", "full"], BeforeValidator(_lower)] | None = None
    power_iters: Annotated[int, Field(ge=0, le=MAX_POWER_ITERS)] | None = None
    oversample: Annotated[int, Field(ge=0, le=MAX_OVERSAMPLE)] | None = None
    clamp_quantile: Fraction | None = Field(default=None, description="extract: kohya's --clamp_quantile")
    min_diff: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = Field(
        default=None, description="extract: kohya's --min_diff, per module")
    max_shard_size: str | None = Field(default=None, description="apply: re-shard the output, e.g. 5GB")
    skip_missing: bool | None = None
    requantize: bool | None = None
    allow_nonfinite: bool | None = None


_RANK_RULES = {"rank", "sv_ratio", "sv_fro", "sv_cumulative", "max_rank"}
_COMBINE = {"weight", "rank", "conv_rank", "seed", "split", "exact", "passes", "engine", "ray_address", "majority_sign",
            "density", "oversample"}
# What each merge_method takes (beyond models' weights); combine methods are narrowed by REGISTRY in checks.py
TAKES: dict[str, set[str]] = {
    "combine": _COMBINE,
    "apply": {"weight", "max_shard_size", "skip_missing", "requantize", "allow_nonfinite"},
    "resize": _RANK_RULES | {"split"},
    "extract": _RANK_RULES | {"include", "exclude", "embeddings", "power_iters", "oversample", "seed", "conv_rank",
                              "clamp_quantile", "min_diff"},
}


class Stage(BaseModel):
    """One stage (one YAML document). `name` is required when the recipe has several stages; a later stage
    names an earlier one's output by it."""

    model_config = _STRICT
    name: Annotated[str, Field(min_length=1, max_length=MAX_STAGE_NAME,
                               pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")] | None = Field(
        default=None, description="the stage's name (a later stage reads its output by it), also the name of its "
        f"output NAME or NAME.safetensors: at most {MAX_STAGE_NAME} characters")
    merge_method: Annotated[str, BeforeValidator(_lower)] = Field(
        json_schema_extra={"enum": list(MERGE_METHODS)},
        description="a combine method, or apply (bake into base_model), resize, extract (any case)")
    base_model: Annotated[str, Field(min_length=1, pattern=_NO_NUL)] | None = Field(
        default=None, description="apply: the base checkpoint; extract: the base the fine-tuned model (models[0]) is "
        "compared with")
    models: Annotated[list[ModelEntry], Field(min_length=1)]
    parameters: Annotated[Parameters, BeforeValidator(_no_parameters), Field(json_schema_extra=_nullable)] = \
        Parameters()
    dtype: Annotated[Literal["bfloat16", "float16", "float32", "bf16", "fp16", "fp32"],
                     BeforeValidator(_lower)] | None = Field(
        default=None, description="output dtype: of every floating-point tensor of the merged model (apply, as "
        "apply --dtype) or of the adapter's factors (any case)")
    format: Annotated[Literal["peft", "kohya", "diffusers"], BeforeValidator(_lower)] | None = Field(
        default=None, description="combine: the output format (default: the first model's; any case)")


# the fields the loader takes in any (ASCII) case (_lower, _split_case): their schema says so (_any_case)
_ANY_CASE = {"Stage": ("merge_method", "dtype", "format"),
             "Parameters": ("split", "engine", "majority_sign", "embeddings")}


def _case_free(values: list[str]) -> str:
    """A JSON-schema (ECMA 262) pattern matching each of `values` in any ASCII case: `[sS][vV][dD]`."""
    def word(v: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" if c.isascii() and c.isalpha() else re.escape(c) for c in v)
    return "^(?:" + "|".join(word(v) for v in values) + ")$"


def _any_case(field: dict[str, Any]) -> None:
    """A field's string enum (itself, or one branch of its anyOf) as the loader reads it: the values as written
    (an editor offers them), or any of them in another case."""
    for node in [field, *field.get("anyOf", [])]:
        if "enum" in node:
            values = node.pop("enum")
            node["type"] = "string"
            node["anyOf"] = [{"enum": values}, {"pattern": _case_free(values)}]


def schema_json() -> dict[str, Any]:
    """The JSON schema of one stage (a recipe is one or more of them, as YAML documents)."""
    schema = Stage.model_json_schema()
    for model, names in _ANY_CASE.items():
        props = schema["properties"] if model == "Stage" else schema["$defs"][model]["properties"]
        for name in names:
            _any_case(props[name])
    schema["title"] = "lorafuse recipe stage"
    schema["description"] = ("One YAML document of a lorafuse recipe (`lorafuse run RECIPE.yml -o OUT`). A recipe "
                             "with several documents runs them in order as named stages; the last writes OUT.")
    return schema


__all__ = ["DTYPES", "MERGE_METHODS", "ModelEntry", "ModelParameters", "Parameters", "Stage", "TAKES", "VERBS",
           "schema_json"]
