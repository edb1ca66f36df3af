"""Red-team round 7, recipes as a mergekit user writes them (REPORT of helper "recipes"), each test failing before
its fix:

1. mergekit lists its base among `models` (often with no parameters) as well as in `base_model`; lorafuse took it
   for an adapter: ties refused it for a missing density (misleading), linear / apply ran and failed reading the
   checkpoint as an adapter. Refused before any work, naming the field and saying why.
2. mergekit's own fields lorafuse does not take (`slices`, `tokenizer_source`, `parameters.normalize`,
   `int8_mask`, ...) were refused as a bare "unknown field": now the message says what lorafuse does instead.
3. `merge_method: ties` (and dare_ties, dare_linear) is PEFT's, on the factors, where mergekit's works on the dense
   deltas (ties_svd here): a recipe said nothing, as it does for linear.
4. `--intermediate-dir` with a one-stage recipe was silently ignored: a note says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import peft_deltas, recipe_tree
from redteam_fixtures import run_cli as _cli
from redteam_fixtures import write_recipe as _write

import lorafuse
from lorafuse.errors import RecipeError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return recipe_tree(tmp_path)


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ----------------------------------------------------------------------------- 1. the base among the models


@pytest.mark.parametrize("text", [
    "merge_method: ties\nbase_model: base\nmodels:\n  - model: base\n  - model: a\n    parameters: {weight: 0.5, "
    "density: 0.5}\n  - model: b\n    parameters: {weight: 0.5, density: 0.5}\n",
    "merge_method: linear\nbase_model: base\nmodels:\n  - model: base\n  - model: a\n    parameters: {weight: 0.5}\n"
    "  - model: b\n    parameters: {weight: 0.5}\n",
    "merge_method: apply\nbase_model: base\nmodels:\n  - model: base\n  - model: a\n    parameters: {weight: 0.5}\n",
], ids=["ties", "linear", "apply"])
def test_the_base_listed_among_the_models_is_refused_before_any_work(tree: Path, text: str) -> None:
    recipe = _write(tree, text)
    before = _listing(tree)
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out")])
    assert code == 2, (code, out, err)
    assert "r.yml line 4, models[0].model" in err and "'base' is the base_model" in err and "mergekit" in err, err
    assert "density" not in err and "not a recognised adapter" not in err and "stage 'stage'" not in out
    assert _listing(tree) == before
    with pytest.raises(RecipeError, match="is the base_model, also listed among the models"):
        lorafuse.run(recipe, tree / "out")


def test_an_apply_without_the_base_among_its_models_still_runs(tree: Path) -> None:
    recipe = _write(tree, "merge_method: apply\nbase_model: base\nmodels:\n  - model: a\n    parameters: "
                          "{weight: 0.5}\n")
    assert lorafuse.run(recipe, tree / "out").out == tree / "out"
    assert (tree / "out" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- 2. mergekit's own fields


@pytest.mark.parametrize(("extra", "line", "field", "said"), [
    ("slices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n", 3, "slices", "every layer"),
    ("tokenizer_source: union\n", 3, "tokenizer_source", "writes no tokenizer"),
    ("parameters: {normalize: true}\n", 3, "parameters.normalize", "sum to 1"),
    ("parameters:\n  int8_mask: true\n", 4, "parameters.int8_mask", "nothing to set"),
], ids=["slices", "tokenizer_source", "normalize", "int8_mask"])
def test_mergekits_own_fields_are_refused_saying_why(tree: Path, extra: str, line: int, field: str,
                                                       said: str) -> None:
    recipe = _write(tree, "merge_method: linear\nmodels: [{model: a}, {model: b}]\n" + extra)
    code, _, err = _cli(["run", str(recipe), "-o", str(tree / "out")])
    assert code == 2 and not (tree / "out").exists()
    name = field.rsplit(".", 1)[-1]
    assert f"r.yml line {line}, {field}: mergekit's field {name} is not supported" in err and said in err, err


def test_an_unknown_field_that_is_not_mergekits_is_still_suggested(tree: Path) -> None:
    recipe = _write(tree, "merge_method: linear\nmodels: [{model: a}]\nparameters: {wieght: 1}\n")
    with pytest.raises(RecipeError, match=r"parameters.wieght: unknown field \(did you mean 'weight'\?\)"):
        lorafuse.run(recipe, tree / "out")


# ----------------------------------------------------------------------------- 3. PEFT's ties under mergekit's name


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_peft_named_methods_say_how_mergekits_differ(tree: Path, method: str) -> None:
    recipe = _write(tree, f"merge_method: {method}\nmodels: [{{model: a}}, {{model: b}}]\n"
                          "parameters: {density: 0.5, weight: 0.5}\n")
    report = lorafuse.run(recipe, tree / "out", dry_run=True)
    assert any(f"mergekit's {method} works on the full deltas" in n and f"{method}_svd" in n for n in report.notes)
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out"), "--dry-run"])  # notes: on stderr (round 9)
    assert code == 0 and f"note: stage 'stage': merge_method {method} is PEFT's" in err and "note:" not in out
    svd = _write(tree, "merge_method: svd\nmodels: [{model: a}, {model: b}]\n", "s.yml")
    assert not any("mergekit's" in n for n in lorafuse.run(svd, tree / "o2", dry_run=True).notes)


# ----------------------------------------------------------------------------- 4. --intermediate-dir of one stage


def test_intermediate_dir_of_a_one_stage_recipe_is_noted_not_ignored(tree: Path) -> None:
    recipe = _write(tree, "merge_method: cat\nmodels: [{model: a}, {model: b}]\n")
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "out"), "--intermediate-dir", str(tree / "work")])
    assert code == 0 and "note: --intermediate-dir" in err and "one stage" in err, err  # on stderr (round 9)
    assert not (tree / "work").exists()
    # the output is the exact sum of the two deltas (cat)
    got, a, b = peft_deltas(tree / "out"), peft_deltas(tree / "a"), peft_deltas(tree / "b")
    for k in got:
        np.testing.assert_allclose(got[k], a[k] + b[k], rtol=1e-5, atol=1e-5)
    report = lorafuse.run(recipe, tree / "o2", intermediate_dir=tree / "work")
    assert any("is not used" in n for n in report.notes) and not (tree / "work").exists()
    two = _write(tree, "name: x\nmerge_method: cat\nmodels: [{model: a}]\n---\nname: y\nmerge_method: cat\n"
                       "models: [{model: x}]\n", "two.yml")
    assert not any("is not used" in n for n in lorafuse.run(two, tree / "o3", intermediate_dir=tree / "w").notes)



def test_the_base_listed_among_the_models_in_another_spelling_is_refused(tree: Path) -> None:
    recipe = _write(tree, f"merge_method: linear\nbase_model: {tree / 'base'}\nmodels:\n  - model: a\n"
                          "  - model: ./base/\n")
    with pytest.raises(RecipeError, match=r"line 5, models\[1\]\.model: .* is the base_model"):
        lorafuse.run(recipe, tree / "out")
    assert not (tree / "out").exists()
