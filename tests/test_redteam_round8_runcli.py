"""Red team, round 8: `lorafuse run` as a pipeline command and the command line as a whole (the advice an
existing output gets, where a one-file last stage writes, --device, `lorafuse help COMMAND`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import kohya_file, peft_deltas, recipe_tree, run_cli, write_recipe
from safetensors.numpy import load_file, save_file

MODULE = "lora_unet_down_blocks_0_attentions_0_proj_in"

SVD_OF_A_AND_B = "merge_method: svd\nparameters: {rank: 4}\nmodels:\n  - model: a\n  - model: b\n"
POOL_THEN_RESIZE = ("name: pooled\nmerge_method: svd\nmodels:\n  - model: a\n  - model: b\n---\n"
                    "name: small\nmerge_method: resize\nparameters: {rank: 1}\nmodels:\n  - model: pooled\n")
KOHYA_SVD = "merge_method: svd\nparameters: {rank: 4}\nmodels:\n  - model: k1.safetensors\n  - model: k2.safetensors\n"


@pytest.fixture()
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    recipe_tree(tmp_path)
    kohya_file(tmp_path / "k1.safetensors", MODULE, 1)
    kohya_file(tmp_path / "k2.safetensors", MODULE, 2)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _foreign_file(path: Path) -> bytes:
    """A .safetensors file lorafuse did not write (no lorafuse_version mark), returned as its bytes."""
    save_file({"x": np.arange(4, dtype=np.float32)}, str(path))
    return path.read_bytes()


def _kohya_delta(path: Path) -> np.ndarray:
    t = load_file(str(path))
    up, down = (t[f"{MODULE}.lora_{w}.weight"].astype(np.float64) for w in ("up", "down"))
    return float(t[f"{MODULE}.alpha"]) / down.shape[0] * (up @ down)


# ----------------------------------------------------------------------------- the advice an existing -o gets


def test_existing_output_the_last_stage_cannot_be_named_is_not_told_to_pass_overwrite(tree: Path):
    # a PEFT combination of LLM modules cannot be one .safetensors file: --overwrite would not help, so the run says
    # what the verb says (give a folder name), with the verb's exit status, not "pass --overwrite"
    recipe = write_recipe(tree, SVD_OF_A_AND_B)
    held = _foreign_file(tree / "x.safetensors")
    code, _, err = run_cli(["run", str(recipe), "-o", "x.safetensors"])
    assert code == 2, err
    assert "give a folder name" in err and "pass --overwrite" not in err, err
    assert "stage 'stage' (combine)" in err
    code2, _, err2 = run_cli(["run", str(recipe), "-o", "x.safetensors", "--overwrite"])
    assert code2 == 2 and "give a folder name" in err2  # what --overwrite gets: the same refusal
    assert (tree / "x.safetensors").read_bytes() == held


def test_existing_output_advice_names_a_later_check_when_the_last_stage_reads_a_stage(tree: Path):
    # the last stage reads an earlier stage's output: whether it can write one file of that name is known only when
    # it starts; the advice says so (and that a folder name is always taken) instead of a bare "pass --overwrite"
    recipe = write_recipe(tree, POOL_THEN_RESIZE)
    held = _foreign_file(tree / "x.safetensors")
    code, _, err = run_cli(["run", str(recipe), "-o", "x.safetensors"])
    assert code == 1, err
    assert "checked when it starts" in err and "a folder name is always taken" in err, err
    assert (tree / "x.safetensors").read_bytes() == held
    assert sorted(p.name for p in tree.iterdir() if p.name.startswith(".lorafuse-run")) == []


def test_existing_output_advice_to_pass_overwrite_still_holds_where_it_works(tree: Path):
    recipe = write_recipe(tree, KOHYA_SVD)
    _foreign_file(tree / "x.safetensors")
    code, _, err = run_cli(["run", str(recipe), "-o", "x.safetensors"])
    assert code == 1 and "pass --overwrite" in err, err
    code2, _, err2 = run_cli(["run", str(recipe), "-o", "x.safetensors", "--overwrite", "-q"])
    assert code2 == 0, err2
    want = _kohya_delta(tree / "k1.safetensors") + _kohya_delta(tree / "k2.safetensors")
    np.testing.assert_allclose(_kohya_delta(tree / "x.safetensors"), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- -o naming a folder for a one-file stage


def test_output_ending_in_a_slash_puts_the_one_file_inside_it_as_the_verb_does(tree: Path):
    # `combine k1 k2 -o out/` writes out/k1.safetensors; the recipe's stage got --out=out (the slash dropped) and wrote
    # a FILE named out
    recipe = write_recipe(tree, KOHYA_SVD)
    code, _, err = run_cli(["run", str(recipe), "-o", "out/", "-q"])
    assert code == 0, err
    assert (tree / "out").is_dir(), "the output was written as a file named 'out', not into the folder out/"
    want = _kohya_delta(tree / "k1.safetensors") + _kohya_delta(tree / "k2.safetensors")
    np.testing.assert_allclose(_kohya_delta(tree / "out" / "k1.safetensors"), want, rtol=1e-5, atol=1e-5)


def test_an_existing_folder_of_the_users_takes_the_one_file_as_the_verb_does(tree: Path):
    # the verb writes the file into the folder, keeping what else is there; the run refused, saying that it would
    # delete the folder's files and that --overwrite would replace the folder "with everything in it"
    recipe = write_recipe(tree, KOHYA_SVD)
    (tree / "mine").mkdir()
    (tree / "mine" / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["run", str(recipe), "-o", "mine", "-q"])
    assert code == 0, err
    assert (tree / "mine" / "notes.txt").read_text() == "keep me"
    assert (tree / "mine" / "k1.safetensors").is_file()
    # a file of the user's at that name inside is still refused before any work, as by the verb, and kept
    (tree / "mine" / "k1.safetensors").write_bytes(b"mine")
    code2, _, err2 = run_cli(["run", str(recipe), "-o", "mine"])
    assert code2 == 1 and "mine/k1.safetensors" in err2 and "pass --overwrite" in err2, err2
    assert (tree / "mine" / "k1.safetensors").read_bytes() == b"mine"


# ----------------------------------------------------------------------------- run --device


def test_run_takes_device_as_the_other_compute_commands_do(tree: Path):
    recipe = write_recipe(tree, SVD_OF_A_AND_B)
    code, out, err = run_cli(["run", str(recipe), "-o", "o", "--device", "cpu"])
    assert code == 0, err
    assert "--device cpu" in out  # passed on to the stage's verb
    ref = peft_deltas(tree / "a")
    other = peft_deltas(tree / "b")
    got = peft_deltas(tree / "o")
    for m, d in got.items():
        np.testing.assert_allclose(d, ref[m] + other[m], rtol=1e-4, atol=1e-4)
    code2, _, err2 = run_cli(["run", str(recipe), "-o", "o2", "--device", "tpu"])
    assert code2 == 2 and "--device" in err2


def test_run_device_cuda_without_a_gpu_says_so_and_writes_nothing(tree: Path):
    from lorafuse.backends import backend_for_device
    from lorafuse.errors import DeviceError

    try:
        backend_for_device("cuda")
    except DeviceError:
        usable = False
    else:
        usable = True
    recipe = write_recipe(tree, POOL_THEN_RESIZE)
    code, _, err = run_cli(["run", str(recipe), "-o", "o", "--device", "gpu", "-q"])
    if usable:
        assert code == 0, err
        return
    assert code == 1 and "DeviceError" in err and "stage 'pooled'" in err, err
    assert not (tree / "o").exists()
    assert [p for p in tree.iterdir() if p.name.startswith(".lorafuse-run")] == []


# ----------------------------------------------------------------------------- lorafuse help COMMAND


@pytest.mark.parametrize("verb", ["apply", "combine", "run", "info"])
def test_help_command_prints_the_commands_help(verb: str):
    code, out, err = run_cli(["help", verb])
    code2, out2, _ = run_cli([verb, "--help"])
    assert (code, code2) == (0, 0), err
    assert out == out2 and out.startswith(f"usage: lorafuse {verb}")


def test_help_alone_lists_the_commands_and_a_wrong_one_is_a_usage_error():
    code, out, _ = run_cli(["help"])
    assert code == 0 and "COMMAND" in out and "apply" in out and "combine" in out
    code2, _, err2 = run_cli(["help", "combin"])
    assert code2 == 2 and "did you mean 'combine'?" in err2


# ----------------------------------------------------------------------------- options that would do nothing


@pytest.mark.parametrize("extra", [["--dry-run"], ["-q"], ["--overwrite"], ["--intermediate-dir", "kept"],
                                   ["--device", "cpu"], ["--threads", "2"]])
def test_print_schema_with_an_option_of_a_run_is_refused_not_ignored(tree: Path, extra: list[str]):
    code, out, err = run_cli(["run", "--print-schema", *extra])
    assert code == 2 and out == "" and extra[0] in err and "--print-schema" in err, err
    assert not (tree / "kept").exists()
    code2, out2, _ = run_cli(["run", "--print-schema", "--json"])  # the schema is JSON: --json is no contradiction
    assert code2 == 0 and out2.lstrip().startswith("{")


@pytest.mark.parametrize("argv", [["info", "a", "--overwrite"], ["similarity", "a", "b", "--overwrite"]])
def test_overwrite_without_the_plot_it_replaces_is_refused_not_ignored(tree: Path, argv: list[str]):
    code, out, err = run_cli(argv)
    assert code == 2 and out == "" and "--overwrite" in err and ("--spectrum" in err or "--plot" in err), err


def test_help_help_is_the_list_of_commands():
    code, out, _ = run_cli(["help", "--help"])
    code2, out2, _ = run_cli(["--help"])
    assert (code, code2) == (0, 0) and out == out2


# ----------------------------------------------------------------------------- a command's option before the command


@pytest.mark.parametrize("argv, says", [
    (["--threads", "2", "info", "a"], "--threads is an option of info: give it after the command"),
    (["--json", "info", "a"], "--json is an option of info: give it after the command"),
    (["-q", "resize", "a", "--rank", "1", "-o", "r"], "-q is an option of resize: give it after the command"),
    (["--rank", "2", "info", "a"], "not of info"),
])
def test_an_option_before_its_command_is_said_so(tree: Path, argv: list[str], says: str):
    # argparse took `2` for the command ("invalid choice: '2'") or suggested the option itself ("did you mean '-q'?")
    code, out, err = run_cli(argv)
    assert code == 2 and out == "" and says in err, err
    assert "did you mean" not in err and "invalid choice" not in err
    assert not (tree / "r").exists()


# ----------------------------------------------------------------------------- the recipe argument


def test_an_empty_recipe_path_is_not_the_current_folder(tree: Path):
    code, _, err = run_cli(["run", "", "-o", "o"])
    assert code == 2 and "empty" in err and "Is a directory" not in err, err


def test_a_folder_given_as_the_recipe_is_said_to_be_a_folder(tree: Path):
    code, _, err = run_cli(["run", "a", "-o", "o"])
    assert code == 1 and "a: is a folder, not a recipe file" in err, err


# ----------------------------------------------------------------------------- refused before the first stage runs


@pytest.mark.parametrize("out", ["merged.bin", "merged.gguf", "merged.pt"])
def test_another_formats_suffix_on_o_is_refused_before_the_first_stage_runs(tree: Path, out: str):
    # every verb of a recipe refuses it (exit status 2); the run ran the stages before the last first
    recipe = write_recipe(tree, "name: pooled\nmerge_method: svd\nmodels:\n  - model: a\n  - model: b\n---\n"
                                "name: merged\nmerge_method: apply\nbase_model: base\nmodels:\n  - model: pooled\n")
    code, stdout, err = run_cli(["run", str(recipe), "-o", out])
    assert code == 2 and f"output {out} ends in" in err and "stage 'merged' (apply)" in err, err
    assert "stage 'pooled':" not in stdout  # no stage ran
    assert not (tree / out).exists()


def test_the_report_names_the_file_written_into_the_folder_o_names(tree: Path):
    import lorafuse

    recipe = write_recipe(tree, KOHYA_SVD)
    report = lorafuse.run(recipe, "into/")
    assert report.out is not None and report.out.resolve() == (tree / "into" / "k1.safetensors").resolve()
    assert report.out.is_file()


def test_run_json_reports_the_stage_run_not_the_check_before_it(tree: Path):
    import json

    recipe = write_recipe(tree, KOHYA_SVD)
    (tree / "mine").mkdir()
    code, out, err = run_cli(["run", str(recipe), "-o", "mine", "--json"])
    assert code == 0, err
    d = json.loads(out)
    stage = d["stages"][0]["report"]
    assert "dry_run" not in stage and stage["method"] == "svd", stage  # the combine's report, not a dry run's plan
    assert Path(d["out"]).resolve() == (tree / "mine" / "k1.safetensors").resolve()


def test_existing_one_file_name_an_apply_stage_cannot_take_is_not_told_to_pass_overwrite(tree: Path):
    # apply with max_shard_size writes a sharded folder: a .safetensors name is refused whatever --overwrite says
    recipe = write_recipe(tree, "merge_method: apply\nbase_model: base\nparameters: {max_shard_size: 1MB}\n"
                                "models:\n  - model: a\n")
    held = _foreign_file(tree / "u.safetensors")
    code, _, err = run_cli(["run", str(recipe), "-o", "u.safetensors"])
    assert code == 2 and "max-shard-size" in err and "pass --overwrite" not in err, err
    assert (tree / "u.safetensors").read_bytes() == held
