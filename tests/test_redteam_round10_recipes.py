"""Red team, round 10: recipes (lorafuse run, lorafuse.run).

Checked: a stage's weight of -0.0 reaches its verb as -0.0, so the recipe writes the bytes the command typed by
hand writes (and the deltas numpy float64 gives); mergekit's methods lorafuse does not
have are each refused as mergekit's (not suggested as a near name of another method: della_linear is not
dare_linear), and so are their own parameters (della's epsilon, breadcrumbs' gamma, sce's select_topk);
lorafuse's commands that are no stage (convert, similarity, info, and combine, whose stages name their method)
are refused saying what a recipe does instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import peft_deltas, recipe_tree, run_cli, write_recipe
from safetensors.numpy import load_file


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return recipe_tree(tmp_path)


def test_a_negative_zero_weight_gives_the_commands_bytes_and_numpys_signs(tree: Path):
    recipe = write_recipe(tree, "merge_method: cat\nmodels:\n  - model: a\n    parameters: {weight: -0.0}\n"
                                "  - model: b\n")
    code, out, err = run_cli(["run", str(recipe), "-o", str(tree / "r")])
    assert code == 0, err
    assert "--weights=-0.0,1" in out  # the stage's command line, as typed by hand
    code, _, err = run_cli(["combine", "--method", "cat", "--weights=-0.0,1", "-o", str(tree / "c"), "-q", "--",
                            str(tree / "a"), str(tree / "b")])
    assert code == 0, err
    got, typed = load_file(str(tree / "r" / "adapter_model.safetensors")), load_file(
        str(tree / "c" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(typed)
    for k in got:
        assert got[k].tobytes() == typed[k].tobytes(), k
    want = peft_deltas(tree / "b")  # numpy float64: 0 * a's delta + b's
    for m, d in peft_deltas(tree / "r").items():
        np.testing.assert_allclose(d, want[m], rtol=1e-5, atol=1e-6)
    assert any(np.signbit(v[v == 0]).any() for v in got.values())  # the -0.0 entries the weight gives


@pytest.mark.parametrize("method", ["breadcrumbs_ties", "della_linear", "sce", "passthrough", "nuslerp",
                                    "multislerp", "karcher", "arcee_fusion", "nearswap"])
def test_mergekits_other_methods_are_refused_as_mergekits(tree: Path, method: str):
    recipe = write_recipe(tree, f"merge_method: {method}\nmodels:\n  - model: a\n  - model: b\n")
    code, _, err = run_cli(["run", str(recipe), "-o", str(tree / "out"), "--dry-run"])
    assert code == 2
    assert f"mergekit's {method} is not a lorafuse method" in err and "did you mean" not in err, err
    assert "line 1, merge_method" in err
    assert not (tree / "out").exists()
    code, _, err = run_cli(["combine", str(tree / "a"), str(tree / "b"), "--method", method, "-o", str(tree / "o")])
    assert code == 2 and f"mergekit's {method} is not a lorafuse method" in err, err


@pytest.mark.parametrize(("field", "method"), [("epsilon", "della"), ("gamma", "breadcrumbs"),
                                               ("select_topk", "sce")])
def test_mergekits_method_parameters_say_whose_they_are(tree: Path, field: str, method: str):
    recipe = write_recipe(tree, "merge_method: dare_ties\nmodels:\n  - model: a\n  - model: b\n"
                                f"parameters: {{density: 0.5, {field}: 0.1}}\n")
    code, _, err = run_cli(["run", str(recipe), "-o", str(tree / "out"), "--dry-run"])
    assert code == 2
    assert f"line 5, parameters.{field}: mergekit's field {field} is not supported" in err, err
    assert method in err


@pytest.mark.parametrize(("method", "said"), [("convert", "lorafuse convert"), ("Convert", "lorafuse convert"),
                                              ("combine", "named by its method"),
                                              ("similarity", "lorafuse similarity"), ("info", "lorafuse info")])
def test_a_command_that_is_no_stage_says_what_a_recipe_does_instead(tree: Path, method: str, said: str):
    recipe = write_recipe(tree, f"merge_method: {method}\nmodels:\n  - model: a\n")
    code, _, err = run_cli(["run", str(recipe), "-o", str(tree / "out"), "--dry-run"])
    assert code == 2 and "Traceback" not in err
    assert "line 1, merge_method" in err and said in err, err
    assert "did you mean" not in err


def test_a_float_subclass_in_a_recipe_given_as_data_is_the_float_it_is(tree: Path):
    # np.float64 is a float, which the refusal of other values asks for: taken as the float it is, as the verbs take
    # it (and the recipe recorded is the plain text the same recipe written by hand is)
    import enum

    import lorafuse

    class Rank(enum.IntEnum):
        SMALL = 1

    report = lorafuse.run({"merge_method": "svd", "models": [
        {"model": str(tree / "a"), "parameters": {"weight": np.float64(0.25)}}, {"model": np.str_(str(tree / "b"))}],
        "parameters": {"rank": Rank.SMALL}}, tree / "out")
    assert report.stages[0].argv[:5] == ["combine", f"--out={tree / 'out'}", "--method=svd", "--weights=0.25,1",
                                         "--rank=1"]
    from safetensors import safe_open

    with safe_open(str(tree / "out" / "adapter_model.safetensors"), "np") as f:
        recorded = f.metadata()["lorafuse.recipe"]
    assert "weight: 0.25\n" in recorded and "rank: 1\n" in recorded and "!!" not in recorded and "np." not in recorded


def test_the_card_names_the_input_whose_stage_inputs_it_numbers(tree: Path):
    # a resize stage reading an earlier stage: that stage is input 1, its inputs 1.1 and 1.2 (not "2.1, 2.2")
    recipe = write_recipe(tree, "name: p\nmerge_method: cat\nmodels:\n  - model: a\n  - model: b\n---\nname: q\n"
                                "merge_method: resize\nmodels: [{model: p}]\nparameters: {rank: 1}\n")
    code, _, err = run_cli(["run", str(recipe), "-o", str(tree / "out"), "-q"])
    assert code == 0, err
    card = (tree / "out" / "README.md").read_text()
    assert "| 1.1 | `a` |" in card and "| 1.2 | `b` |" in card
    assert "Inputs numbered 1.1, 1.2, ... are those input 1 was made from" in card
    assert "2.1" not in card


@pytest.mark.parametrize(("text", "line"), [("merge_method: cat\nmodels:\n\t- model: a\n", 3),
                                            ("merge_method:\tcat\nmodels:\n  - model: a\n", 1)])
def test_a_tab_where_yaml_takes_none_says_to_replace_it(tree: Path, text: str, line: int):
    recipe = write_recipe(tree, text)
    code, _, err = run_cli(["run", str(recipe), "-o", str(tree / "out"), "--dry-run"])
    assert code == 2
    assert f"line {line}, column" in err and "replace the tab" in err, err


_TWO_STAGES = "name: p\nmerge_method: cat\nmodels: [{model: a}, {model: b}]\n---\nname: q\nmerge_method: resize\n" \
              "models: [{model: p}]\nparameters: {rank: 1}\n"


def test_stages_write_beside_an_output_whose_folder_is_new_as_the_dry_run_plans(tree: Path,
                                                                               monkeypatch: pytest.MonkeyPatch):
    # not in the system's temporary folder (a tmpfs on many systems: an apply stage's model in memory)
    import tempfile

    system = tree / "system-tmp"
    system.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system))
    recipe = write_recipe(tree, _TWO_STAGES)
    out = tree / "new" / "sub" / "out"
    code, planned, err = run_cli(["run", str(recipe), "-o", str(out), "--dry-run"])
    assert code == 0, err
    assert f"--out={out.parent}/.lorafuse-run-dry-" in planned
    assert not (tree / "new").exists()
    code, ran, err = run_cli(["run", str(recipe), "-o", str(out)])
    assert code == 0, err
    assert f"--out={out.parent}/.lorafuse-run-" in ran, ran
    assert list(system.iterdir()) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # the temporary folder is gone
    assert (out / "adapter_model.safetensors").is_file()


def test_a_failing_run_leaves_no_folder_it_made_for_the_output(tree: Path):
    # the last stage fails (an adapter given as its base) after the others wrote beside the output
    recipe = write_recipe(tree, _TWO_STAGES + "---\nname: r\nmerge_method: apply\nbase_model: p\n"
                                              "models: [{model: q}]\n")
    code, _, err = run_cli(["run", str(recipe), "-o", str(tree / "new" / "sub" / "out")])
    assert code == 1 and "stage 'r' (apply)" in err, err
    assert not (tree / "new").exists()
