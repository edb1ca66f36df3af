"""Red-team round 5, recipes and provenance (REPORT of helper "recipes"), each test failing before its fix:

1. merge keys (`<<`): a document whose merges would copy more than MAX_MERGED_FIELDS fields is refused at the line
   of the merge that passes the limit, before PyYAML builds it (`{<<: [*a, *a]}` doubles the fields per level);
2. a stage's pydantic errors: only the 10 shown are formatted (each found its line by a scan of every path);
3. values PyYAML cannot construct (bad dates, >4300-digit integers, `!!int x`) are RecipeErrors naming the line;
   plain values are read by YAML 1.2's core schema, as the command line reads numbers (finding 6);
4. `~nosuchuser/x` and over-long names are RecipeErrors naming the line and field (every path field);
5. a model named by a PEFT weights file (or a folder holding a kohya file) is recorded by its name in the recipe;
7. apply's record lists (and hashes) the side files copied into the output;
8. `--dry-run --intermediate-dir DIR` plans the stages in DIR;
9. the printed stage commands are shell-quoted;
10. BASE+ADAPTER with several `+` splits where both sides exist, and is refused when several splits do.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from redteam_fixtures import RECIPE_SHAPES, kohya_file, llm_base, recipe_tree
from redteam_fixtures import run_cli as _cli
from redteam_fixtures import write_recipe as _write
from safetensors import safe_open
from safetensors.numpy import save_file

import lorafuse
from lorafuse.errors import RecipeError
from lorafuse.recipes import source
from lorafuse.recipes.checks import check
from lorafuse.recipes.runner import load_recipe

SHAPES = RECIPE_SHAPES


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return recipe_tree(tmp_path)


def _inputs(path: Path) -> list[dict[str, object]]:
    with safe_open(str(path), "np") as f:
        return json.loads(f.metadata()["lorafuse.inputs"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- 1. merge keys


def _bomb(levels: int) -> str:
    lines = ["x0: &a0 {weight: 1}"] + [f"x{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}]}}" for i in range(1, levels + 1)]
    return ("defs:\n" + "\n".join("  " + x for x in lines) +
            f"\nmerge_method: svd\nmodels:\n  - model: a\n    parameters:\n      <<: *a{levels}\n")


def _copied(levels: int) -> int:
    """The fields PyYAML's flatten_mapping copies for _bomb(levels) (it keeps duplicates): 2 + 4 + ... + 2^levels
    in the definitions, and 2^levels more into the model's parameters."""
    return sum(2 ** k for k in range(1, levels + 1)) + 2 ** levels


def test_merge_key_bomb_is_refused_at_the_line_of_the_merge_that_passes_the_limit(tree):
    """n = 20 levels took 7.8 s and 83 MB, n = 26 was killed after 90 s at 1.6 GB (2^n fields): now refused before
    PyYAML builds anything, at the line of x18 (the first level whose running total passes 2^18)."""
    assert _copied(16) <= source.MAX_MERGED_FIELDS < _copied(17)
    level = next(k for k in range(1, 21) if sum(2 ** j for j in range(1, k + 1)) > source.MAX_MERGED_FIELDS)
    assert level == 18
    recipe = _write(tree, _bomb(20))
    with pytest.raises(RecipeError, match=rf"r\.yml line {level + 2}: not a recipe: its merge keys \(`<<`\) would copy "
                                          f"more than {source.MAX_MERGED_FIELDS:,} fields"):
        lorafuse.run(recipe, tree / "out", dry_run=True)
    code, _, err = _cli(["run", str(_write(tree, _bomb(40), "big.yml")), "-o", str(tree / "out"), "--dry-run"])
    assert code == 2 and "big.yml line 20: not a recipe: its merge keys" in err


def test_merges_up_to_the_limit_are_built_as_pyyaml_builds_them(tree):
    """16 levels copy 196,606 fields (as PyYAML counts them, duplicates kept): under the limit, so the recipe is
    read, and refused for what it says (`defs` is no field), as before; 17 levels pass it at their last merge."""
    with pytest.raises(RecipeError, match=r"r\.yml line 1, defs: unknown field"):
        lorafuse.run(_write(tree, _bomb(16)), tree / "out", dry_run=True)
    with pytest.raises(RecipeError, match=r"r\.yml line 24: not a recipe: its merge keys"):
        lorafuse.run(_write(tree, _bomb(17)), tree / "out", dry_run=True)
    # the merge itself, as the YAML merge-key spec says (and PyYAML 6.0.3 builds it; 6.0.4 lets a later mapping
    # win): the first mapping merged wins over later ones, the mapping's own keys over both
    text = ("merge_method: cat\nx: &w {weight: 0.25, density: 0.5}\ny: &v {weight: 4.0, seed: 3}\n")
    doc = source.parse(text + "models: [{model: a, parameters: {<<: [*w, *v]}}, "
                       "{model: b, parameters: {<<: *w, weight: 2}}, {model: c, parameters: {<<: [*v, *w]}}]\n",
                       "<t>", tree).documents[0].data
    assert [m["parameters"] for m in doc["models"]] == [{"weight": 0.25, "density": 0.5, "seed": 3},
                                                       {"weight": 2, "density": 0.5},
                                                       {"weight": 4.0, "density": 0.5, "seed": 3}]


def test_a_recipe_of_many_models_merging_defaults_is_not_refused(tree):
    """5,000 models each merging 2 defaults copy 10,000 fields: a real recipe's use of merge keys stays allowed."""
    n = 5000
    text = ("merge_method: linear\ndefaults: &d {weight: 0.5, density: 0.5}\nmodels:\n"
            + "".join("  - {model: a, parameters: {<<: *d}}\n" for _ in range(n)))
    docs = source.parse(text, "<t>", tree).documents
    assert len(docs[0].data["models"]) == n
    assert all(m["parameters"] == {"weight": 0.5, "density": 0.5} for m in docs[0].data["models"])


# ----------------------------------------------------------------------------- 2. error listing


def test_only_the_shown_errors_are_formatted(tree, monkeypatch):
    """4,000 aliased bad entries took 16 s: every error was given its line (a scan of every path each) before the
    list was cut to 10."""
    n = 4000
    recipe = _write(tree, "merge_method: svd\nx: &e {model: a, wieght: 1}\nmodels: [" + ", ".join(["*e"] * n) + "]\n")
    calls = []
    where = source.RecipeText.where
    monkeypatch.setattr(source.RecipeText, "where", lambda self, *a: calls.append(a) or where(self, *a))
    with pytest.raises(RecipeError) as e:
        lorafuse.run(recipe, tree / "out", dry_run=True)
    lines = str(e.value).splitlines()
    assert lines[:10] == [f"{recipe} line 2, models[{i}].wieght: unknown field; expected one of model, "
                          "parameters" for i in range(10)]
    assert lines[10:] == [f"... and {n + 1 - 10} more errors in this stage"]  # (`x` is one too)
    assert len(calls) == 10


def test_a_line_lookup_does_not_rebuild_the_table_of_lines(monkeypatch):
    """Document.line_of rebuilt its text-keyed table of every path at each call: O(paths) per error."""
    text = "merge_method: svd\nmodels:\n" + "".join(f"  - model: m{i}\n" for i in range(2000))
    doc = source.parse(text, "<t>", Path.cwd()).documents[0]
    calls = [0]
    original = source._text
    monkeypatch.setattr(source, "_text", lambda x: calls.__setitem__(0, calls[0] + 1) or original(x))
    for i in range(500):
        assert doc.line_of(("models", i, "model")) == i + 3
        assert doc.line_of(("models", i, "nope")) == i + 3  # the nearest enclosing field that has a line
    assert calls[0] < 3 * len(doc.lines) + 10 * 500  # the table once, then each path's own elements


# ----------------------------------------------------------------------------- 3 and 6. values


@pytest.mark.parametrize("text, said", [
    ("parameters: {seed: " + "1" * 4301 + "}", r"line 3, column 20: '1{20}\.\.\.1{10}': an integer of 4301 digits"),
    ("parameters: {seed: !!int x}", r"line 3, column 20: 'x' is not an integer"),
    ("parameters: {weight: !!float abc}", r"line 3, column 22: 'abc' is not a number"),
    ("parameters: {exact: !!bool yes}", r"line 3, column 21: 'yes' is not a boolean"),
    ("parameters: {seed: !!timestamp 2024-13-45}", r"line 3, column 20: '2024-13-45' cannot be read as timestamp "
                                                   r"\(month must be in 1\.\.12\)"),
    ("parameters: {weight: 1.0e-400}", r"line 3, column 22: 1\.0e-400 is too small for a float64: it would be 0"),
])
def test_a_value_that_cannot_be_read_is_refused_at_its_line(tree, text, said):
    """These were a Python traceback (ValueError), not a RecipeError: `lorafuse run` crashed."""
    recipe = _write(tree, f"merge_method: svd\nmodels: [{{model: a}}]\n{text}\n")
    with pytest.raises(RecipeError, match=r"r\.yml " + said):
        lorafuse.run(recipe, tree / "out", dry_run=True)
    code, _, err = _cli(["run", str(recipe), "-o", str(tree / "out"), "--dry-run"])
    assert code == 2 and err.startswith("lorafuse run: error: ")


def test_a_date_is_text_so_a_folder_named_like_one_is_read(tree):
    """`model: 2024-02-30` was a traceback (day is out of range for month); `2024-01-01` a datetime.date that
    pydantic refused; a name `2024-01-01t25:00:00` a traceback. Dates are text to YAML 1.2's core schema."""
    for name in ("2024-02-30", "2024-01-01"):
        shutil.copytree(tree / "a", tree / name)
    recipe = _write(tree, "merge_method: cat\nmodels: [{model: 2024-02-30}, {model: 2024-01-01}]\n")
    report = lorafuse.run(recipe, tree / "out", dry_run=True)
    assert report.stages[0].argv[-2:] == [str(tree / "2024-02-30"), str(tree / "2024-01-01")]
    with pytest.raises(RecipeError, match=r"r\.yml line 1, name: String should match pattern"):
        lorafuse.run(_write(tree, "name: 2024-01-01t25:00:00\nmerge_method: cat\nmodels: [{model: a}]\n"),
                     tree / "out", dry_run=True)


@pytest.mark.parametrize("written, value", [
    ("1e-3", 1e-3), ("1.0e5", 1.0e5), ("2.5E+2", 250.0), ("010", 10.0), ("-010", -10.0), ("0x10", 16.0),
    ("0o17", 15.0), (".5", 0.5), ("+3", 3.0), ("-.inf", None),
])
def test_numbers_are_read_by_yaml_1_2s_core_schema(tree, written, value):
    """YAML 1.1 (PyYAML's SafeLoader) refused `1e-3` and `1.0e5` ("Input should be a valid number") and read `010`
    as 8: the command line's `--weights 1e-3` and `010` are 0.001 and 10. The reference: Python's float() of the
    decimal text, int(text, 16 / 8) of the others."""
    recipe = _write(tree, f"merge_method: cat\nmodels:\n  - model: a\n    parameters: {{weight: {written}}}\n"
                          "  - model: b\n")
    if value is None:  # read as -inf, then refused as every non-finite weight is
        with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.weight: Input should be a finite number"):
            lorafuse.run(recipe, tree / "out", dry_run=True)
        return
    stage = check(load_recipe(recipe))[0]
    assert stage.inputs[0].weight == value and type(stage.inputs[0].weight) is float
    argv = lorafuse.run(recipe, tree / "out", dry_run=True).stages[0].argv
    code, _, err = _cli(["combine", str(tree / "a"), str(tree / "b"), "--method", "cat", "-o", str(tree / "cli"),
                         "--dry-run", "-q", "--weights", f"{value!r},1"])
    assert code == 0, err
    assert next(w for w in argv if w.startswith("--weights=")) == f"--weights={float(value)!r},1".replace(".0,", ",")


def test_an_integer_is_decimal_and_underscores_and_base_60_are_text(tree):
    """`seed: 010` was 8 (octal), `seed: 1_000` 1000 and `weight: 1:30` 90 (base 60): the command line reads 10 and
    refuses the others."""
    recipe = _write(tree, "merge_method: dare_linear\nmodels: [{model: a}, {model: b}]\n"
                          "parameters: {seed: 010, density: 0.5}\n")
    assert check(load_recipe(recipe))[0].stage.parameters.seed == 10
    for field, text, kind in (("seed", "1_000", "integer"), ("density", "5_0e-2", "number"),
                              ("density", "1:30", "number")):
        recipe = _write(tree, "merge_method: dare_linear\nmodels: [{model: a}, {model: b}]\n"
                              f"parameters: {{seed: 1, density: 0.5, {field}: {text}}}\n".replace(
                                  f"{field}: {'1' if field == 'seed' else '0.5'}, ", ""))
        with pytest.raises(RecipeError, match=rf"r\.yml line 3, parameters\.{field}: Input should be a valid {kind}: "
                                              rf"YAML reads '{text}' as text"):
            lorafuse.run(recipe, tree / "out", dry_run=True)


def test_only_true_and_false_are_booleans(tree):
    """`model: no` and `model: on` were booleans ("Input should be a valid string", no hint): to YAML 1.2's core
    schema they are text, so folders of those names are read; `model: true` is refused saying to quote it."""
    for name in ("no", "on"):
        shutil.copytree(tree / "a", tree / name)
    recipe = _write(tree, "merge_method: cat\nmodels: [{model: no}, {model: on}]\n")
    assert lorafuse.run(recipe, tree / "out", dry_run=True).stages[0].argv[-2:] == [str(tree / "no"), str(tree / "on")]
    with pytest.raises(RecipeError, match=r"r\.yml line 3, models\[0\]\.model: Input should be a valid string: YAML "
                                          r"reads this value as a boolean \(true\), not as text: quote it"):
        lorafuse.run(_write(tree, "merge_method: cat\nmodels:\n  - model: true\n"), tree / "out", dry_run=True)
    with pytest.raises(RecipeError, match=r"parameters\.exact: Input should be a valid boolean: YAML reads 'yes' as "
                                          r"text \(a boolean is written true or false"):
        lorafuse.run(_write(tree, "merge_method: svd\nmodels: [{model: a}]\nparameters: {exact: yes, rank: 2}\n"),
                     tree / "out", dry_run=True)


def test_a_recipe_given_as_data_reads_back_as_given(tree):
    """A recipe given as a mapping is written as YAML and read back: a str that YAML 1.2 or 1.1 reads as something
    else (`1e3`, `0x10`, `yes`, a date) is quoted, a float written so that it reads back the same."""
    given = {"merge_method": "cat", "models": [
        {"model": "1e3"}, {"model": "0x10"}, {"model": "yes"}, {"model": "2024-01-01"}, {"model": "010"},
        {"model": "b", "parameters": {"weight": 1e-5}}, {"model": "a", "parameters": {"weight": 1e300}}]}
    recipe = load_recipe(given)
    assert recipe.documents[0].data == given
    assert yaml.safe_load(recipe.text) == given  # YAML 1.1 reads the recorded recipe the same


# ----------------------------------------------------------------------------- 4. names that cannot be paths

NO_USER = "~lorafuse_no_such_user_q7z"


@pytest.mark.parametrize("stage, field", [
    ("merge_method: cat\nmodels: [{model: a}, {model: NAME}]\n", r"line 2, models\[1\]\.model"),
    ("merge_method: apply\nbase_model: NAME\nmodels: [{model: a}]\n", r"line 2, base_model"),
    ("merge_method: apply\nmodels: [{model: base+NAME}]\n", r"line 2, models\[0\]\.model"),
    ("merge_method: apply\nmodels: [{model: NAME+a}]\n", r"line 2, models\[0\]\.model"),
    ("merge_method: extract\nbase_model: base\nmodels: [{model: NAME}]\nparameters: {rank: 2}\n",
     r"line 3, models\[0\]\.model"),
])
@pytest.mark.parametrize("name, said", [
    (f"{NO_USER}/lora", rf"'{NO_USER}/lora': the home folder of user '{NO_USER[1:]}' cannot be told"),
    ("y" * 300, r"'y{300}': a name in it is longer than the file system takes \(300 bytes"),
])
def test_a_model_that_cannot_name_a_path_is_refused_at_its_line_and_field(tree, stage, field, name, said):
    """`~nosuchuser/lora` was a traceback (RuntimeError from pathlib's expanduser), a 300-character name a raw
    OSError (File name too long) naming no line: `lorafuse.run` raised no LorafuseError."""
    recipe = _write(tree, stage.replace("NAME", name))
    with pytest.raises(RecipeError, match=rf"r\.yml {field}: {said}"):
        lorafuse.run(recipe, tree / "out", dry_run=True)
    code, _, err = _cli(["run", str(recipe), "-o", str(tree / "out"), "--dry-run"])
    assert code == 2 and "Traceback" not in err


def test_a_stage_name_longer_than_a_file_name_can_be_is_refused_at_its_line(tree):
    """A 250-character stage name that a later stage reads failed with File name too long when the stage wrote."""
    name = "z" * 250
    recipe = _write(tree, f"name: {name}\nmerge_method: cat\nmodels: [{{model: a}}, {{model: b}}]\n---\n"
                          f"name: fin\nmerge_method: resize\nmodels: [{{model: {name}}}]\nparameters: {{rank: 2}}\n")
    with pytest.raises(RecipeError, match=r"r\.yml line 1, name: String should have at most 243 characters"):
        lorafuse.run(recipe, tree / "out", dry_run=True)
    ok = _write(tree, f"name: {'z' * 243}\nmerge_method: cat\nmodels: [{{model: a}}, {{model: b}}]\n---\n"
                      f"name: fin\nmerge_method: resize\nmodels: [{{model: {'z' * 243}}}]\nparameters: {{rank: 2}}\n",
                "ok.yml")
    lorafuse.run(ok, tree / "out", intermediate_dir=tree / "keep")
    assert (tree / "keep" / ("z" * 243)).is_dir()


# ----------------------------------------------------------------------------- 5. recorded names


@pytest.mark.parametrize("stage, out, names", [
    ("merge_method: cat\nmodels: [{model: a/adapter_model.safetensors}, {model: b/adapter_config.json}]\n",
     "o/adapter_model.safetensors", ["a/adapter_model.safetensors", "b/adapter_config.json"]),
    ("merge_method: resize\nmodels: [{model: a/adapter_model.safetensors}]\nparameters: {rank: 1}\n",
     "o/adapter_model.safetensors", ["a/adapter_model.safetensors"]),
    ("merge_method: apply\nbase_model: base\nmodels: [{model: a/adapter_model.safetensors}]\n",
     "o/model.safetensors", ["base", "a/adapter_model.safetensors"]),
    ("merge_method: apply\nmodels: [{model: base+a/adapter_config.json}]\n",
     "o/model.safetensors", ["base", "a/adapter_config.json"]),
    ("merge_method: cat\nmodels: [{model: k1}, {model: k2/lora.safetensors}]\n", "o.safetensors",
     ["k1", "k2/lora.safetensors"]),
])
def test_a_model_named_by_its_file_is_recorded_by_its_name_in_the_recipe(tree, stage, out, names):
    """A PEFT weights (or config) file was recorded by the absolute path of its folder, and a folder holding one
    kohya file by that file's absolute path: the output's bytes depended on where the recipe's folder was."""
    for k in ("k1", "k2"):
        (tree / k).mkdir()
        kohya_file(tree / k / "lora.safetensors", "lora_unet_x", int(k[1]))
    recipe = _write(tree, stage)
    copy = tree.parent / (tree.name + "-copy")
    shutil.copytree(tree, copy)
    lorafuse.run(recipe, tree / out.split("/")[0])
    lorafuse.run(copy / "r.yml", copy / out.split("/")[0])
    assert [i["name"] for i in _inputs(tree / out)] == names
    assert (tree / out).read_bytes() == (copy / out).read_bytes()  # wherever the recipe's folder is


# ----------------------------------------------------------------------------- 7. side files of apply


def test_apply_records_the_side_files_it_copies(tree):
    """The output held tokenizer.json and generation_config.json copied from the base, and the record listed only
    config.json and model.safetensors. Every file of the output but lorafuse's own (card, manifest) and the merged
    weights is a copy of a base file listed with its sha256; what is not copied (a sub-folder, a link out of the
    base folder) is not listed."""
    base = tree / "base"
    (base / "tokenizer.json").write_text('{"tok": 1}')
    (base / "generation_config.json").write_text('{"g": 1}')
    (base / "extra").mkdir()
    (base / "extra" / "x.txt").write_text("x")
    (tree / "secret.txt").write_text("s")
    os.symlink(tree / "secret.txt", base / "link.txt")
    lorafuse.apply(base, [tree / "a"], out=tree / "m")
    record = _inputs(tree / "m" / "model.safetensors")[0]
    assert record["name"] == str(base)
    files = record["files"]
    assert isinstance(files, dict)
    assert files == {n: _sha(base / n) for n in ("config.json", "generation_config.json", "model.safetensors",
                                                 "tokenizer.json")}
    copied = {p.name for p in (tree / "m").iterdir()} - {"README.md", "lorafuse_manifest.json", "model.safetensors"}
    assert copied == {"config.json", "generation_config.json", "tokenizer.json"}
    assert all(_sha(tree / "m" / n) == files[n] for n in copied)


def test_apply_to_a_pipeline_records_the_folders_it_copies(tree):
    """A pipeline's scheduler/ and tokenizer/ were copied whole and not recorded (its VAE's weights were)."""
    h, module = 16, "lora_unet_double_blocks_0_img_attn_proj"
    pipe = tree / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                       "transformer": ["diffusers", "FluxTransformer2DModel"],
                                                       "scheduler": ["diffusers", "S"], "tokenizer": ["t", "T"]}))
    rng = np.random.default_rng(4)
    save_file({"transformer_blocks.0.attn.to_out.0.weight": rng.standard_normal((h, h)).astype(np.float32)},
              str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    (pipe / "transformer" / "config.json").write_text("{}")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text('{"s": 1}')
    (pipe / "tokenizer" / "sub").mkdir(parents=True)
    (pipe / "tokenizer" / "vocab.json").write_text('{"v": 1}')
    (pipe / "tokenizer" / "sub" / "merges.txt").write_text("m")
    save_file({f"{module}.lora_down.weight": rng.standard_normal((2, h)).astype(np.float32),
               f"{module}.lora_up.weight": rng.standard_normal((h, 2)).astype(np.float32),
               f"{module}.alpha": np.array(1.0, np.float32)}, str(tree / "flux.safetensors"))
    lorafuse.apply(pipe, [tree / "flux.safetensors"], out=tree / "po")
    files = _inputs(tree / "po" / "transformer" / "diffusion_pytorch_model.safetensors")[0]["files"]
    out_files = sorted(p.relative_to(tree / "po").as_posix() for p in (tree / "po").rglob("*") if p.is_file())
    expected = sorted(set(out_files) - {"README.md", "lorafuse_manifest.json"})
    assert isinstance(files, dict) and sorted(files) == expected
    assert all(files[n] == _sha(pipe / n) for n in expected)
    assert all(_sha(tree / "po" / n) == files[n] for n in expected if not n.endswith(".safetensors"))


# ----------------------------------------------------------------------------- 8, 9, 10


def test_a_dry_run_plans_the_stages_in_the_intermediate_folder(tree):
    """`--dry-run --intermediate-dir keep` planned `.lorafuse-run-dry-PID/mix`; the run writes keep/mix."""
    recipe = _write(tree, "name: mix\nmerge_method: cat\nmodels: [{model: a}, {model: b}]\n---\nname: fin\n"
                          "merge_method: resize\nmodels: [{model: mix}]\nparameters: {rank: 2}\n")
    report = lorafuse.run(recipe, tree / "out", dry_run=True, intermediate_dir=tree / "keep")
    assert report.stages[0].argv[:2] == ["combine", f"--out={tree / 'keep' / 'mix'}"]
    assert not (tree / "keep").exists()
    real = lorafuse.run(recipe, tree / "out", intermediate_dir=tree / "keep")
    assert real.stages[0].argv == [w for w in report.stages[0].argv if w != "--dry-run"]
    assert real.stages[0].out == tree / "keep" / "mix"


def test_the_printed_stage_command_is_quoted_for_a_shell(tree):
    """`--include=q_proj|down` and a path with a space were printed bare: pasted, the first piped into `down`."""
    llm_base(tree / "sp ace", SHAPES)
    lorafuse.apply(tree / "sp ace", [tree / "a"], out=tree / "ft")
    recipe = _write(tree, "merge_method: extract\nbase_model: sp ace\nmodels: [{model: ft}]\n"
                          "parameters: {rank: 3, include: 'q_proj|down'}\n")
    said = []
    for argv in (["run", str(recipe), "-o", str(tree / "x"), "--dry-run"], ["run", str(recipe), "-o", str(tree / "x")]):
        code, out, err = _cli(argv)
        assert code == 0, err
        line = next(x for x in out.splitlines() if x.startswith("stage 'stage': "))
        words = shlex.split(line.removeprefix("stage 'stage': "))
        assert words[:2] == ["lorafuse", "extract"] and "--include=q_proj|down" in words
        assert words[-2:] == [str(tree / "sp ace"), str(tree / "ft")]
        said.append(words)
    with contextlib.redirect_stdout(io.StringIO()):
        planned = lorafuse.run(recipe, tree / "x", dry_run=True, quiet=False, overwrite=True).stages[0].argv
    assert said[0] == ["lorafuse", *[w for w in planned if w != "--overwrite"]]
    assert said[1] == ["lorafuse", *[w for w in planned if w not in ("--overwrite", "--dry-run")]]


def test_base_plus_adapter_splits_where_both_sides_exist(tree):
    """`base+lora+v2` was split at the last `+`: base `base+lora`, adapter `v2`."""
    shutil.copytree(tree / "a", tree / "lora+v2")
    recipe = _write(tree, "merge_method: apply\nmodels: [{model: base+lora+v2}]\n")
    argv = lorafuse.run(recipe, tree / "out", dry_run=True).stages[0].argv
    assert argv[-2:] == [str(tree / "base"), str(tree / "lora+v2")]
    lorafuse.run(recipe, tree / "out")
    assert [i["name"] for i in _inputs(tree / "out" / "model.safetensors")] == ["base", "lora+v2"]


def test_base_plus_adapter_that_splits_two_ways_is_refused_naming_both(tree):
    shutil.copytree(tree / "base", tree / "base+x")
    shutil.copytree(tree / "a", tree / "x+a")
    recipe = _write(tree, "merge_method: apply\nmodels: [{model: base+x+a}]\n")
    with pytest.raises(RecipeError, match=r"r\.yml line 2, models\[0\]\.model: 'base\+x\+a' reads as BASE\+ADAPTER "
                                          r"in 2 ways, 'base' \+ 'x\+a' and 'base\+x' \+ 'a'"):
        lorafuse.run(recipe, tree / "out", dry_run=True)
    # an earlier stage's name is one side too
    recipe = _write(tree, "name: mix\nmerge_method: cat\nmodels: [{model: a}, {model: b}]\n---\nname: m\n"
                          "merge_method: apply\nmodels: [{model: base+mix}]\n")
    lorafuse.run(recipe, tree / "out2")
    assert [i["name"] for i in _inputs(tree / "out2" / "model.safetensors")][:2] == ["base", "mix"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
