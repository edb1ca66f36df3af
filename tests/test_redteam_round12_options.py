"""Round 12 red team, options: every option of every verb honoured with its documented effect, or refused in one
line; none silently ignored in some combination (an empty value, a dry run, another option beside it)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import kohya_file, llm_base, peft_folder, run_cli
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.errors import LorafuseValueError

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.self_attn.v_proj": (16, 12)}


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """base/ and ft/ (a fine-tune of it: every weight changed), adapters a/ and b/ of rank 2, c4/ of rank 4; the
    current folder is tmp_path."""
    llm_base(tmp_path / "base", SHAPES)
    weights = load_file(str(tmp_path / "base" / "model.safetensors"))
    rng = np.random.default_rng(5)
    (tmp_path / "ft").mkdir()
    save_file({k: v + np.float32(0.1) * rng.standard_normal(v.shape).astype(np.float32) for k, v in weights.items()},
              str(tmp_path / "ft" / "model.safetensors"))
    (tmp_path / "ft" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    peft_folder(tmp_path / "a", SHAPES, 1)
    peft_folder(tmp_path / "b", SHAPES, 2)
    peft_folder(tmp_path / "c4", SHAPES, 3, rank=4)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("argv", [["similarity", "a", "b", "--plot", ""], ["info", "a", "--spectrum", ""],
                                  ["info", "a", "--spectrum", "", "--overwrite"]])
def test_an_empty_plot_path_is_refused_not_ignored(tree: Path, argv: list[str]) -> None:
    """`--plot ''` and `--spectrum ''` were read as no option at all: the matrix or description printed, no plot
    drawn, exit 0 (with --overwrite: "no --spectrum was given")."""
    before = _listing(tree)
    code, out, err = run_cli(argv)
    assert code == 2, (code, out, err)
    assert "an empty path" in err and out == ""
    assert _listing(tree) == before


@pytest.mark.parametrize("argv", [["combine", "a", "b", "-o", ""], ["combine", "a", "b", "-o", "", "--dry-run"],
                                  ["convert", "a", "--to", "gguf", "--arch", "qwen2", "-o", ""]])
def test_an_empty_output_is_an_empty_path_not_the_current_folder(tree: Path, argv: list[str]) -> None:
    """`combine -o ''` and `convert -o ''` said "output . is the current folder" (exit 1): the user named no
    folder; apply, resize and extract say the path is empty (exit 2)."""
    code, _, err = run_cli(argv)
    assert code == 2, err
    assert "empty" in err and "current folder" not in err


@pytest.mark.parametrize("option", ["--include", "--exclude"])
@pytest.mark.parametrize("dry", [False, True])
def test_an_empty_include_or_exclude_is_refused(tree: Path, option: str, dry: bool) -> None:
    """An empty regular expression matches every name, so `--exclude ''` must leave no module; it was taken as no
    --exclude at all and extracted every module (and `--include ''` was dropped the same way)."""
    code, _, err = run_cli(["extract", "base", "ft", "--rank", "2", "-o", "out", option, "",
                            *(["--dry-run"] if dry else [])])
    assert code == 2, err
    assert f"{option} (Python: {option[2:]}=) regular expression is empty" in err
    assert not (tree / "out").exists()


def test_an_empty_include_or_exclude_is_refused_in_python(tree: Path) -> None:
    for kw in ({"include": ""}, {"exclude": ""}):
        with pytest.raises(LorafuseValueError, match="regular expression is empty"):
            lorafuse.extract("base", "ft", rank=2, out="out", **kw)  # type: ignore[arg-type]
    assert not (tree / "out").exists()


@pytest.mark.parametrize("argv", [["resize", "c4", "--rank", "1_0"], ["resize", "c4", "--rank", "\u0663"],
                                  ["resize", "c4", "--rank", "2", "--max-rank", "0_3"],
                                  ["combine", "a", "b", "--method", "dare_linear", "--density", "0.5", "--seed",
                                   "1_000"],
                                  ["combine", "a", "b", "--threads", "1_0"],
                                  ["extract", "base", "ft", "--rank", "2", "--power-iters", "\u0661"]])
def test_integer_options_are_plain_decimal_digits(tree: Path, argv: list[str]) -> None:
    """int() reads `1_0` as 10 and Arabic-Indic digits as digits: `--rank 1_0` resized to rank 10, where the
    command line's numbers (--weights, --sv-ratio, the list's weights) and a recipe's (`seed: 1_000` is text) are
    plain decimals."""
    code, _, err = run_cli([*argv, "-o", "out", "--dry-run"])
    assert code == 2, err
    assert "must be an integer from" in err
    code, out, err = run_cli(["resize", "c4", "--rank", "03", "-o", "out", "--dry-run", "--json"])  # 010 is 10
    assert code == 0, err
    assert {m["rank"] for m in json.loads(out)["modules"]} == {3}


def test_a_gguf_dry_run_refuses_family_as_the_run_does(tree: Path) -> None:
    """convert --to gguf --family X: the run refuses --family (it names diffusion modules), but the dry run did not
    pass it on and printed a plan, exit 0."""
    argv = ["convert", "a", "--to", "gguf", "--arch", "qwen2", "--family", "sdxl", "-o", "a.gguf"]
    dry = run_cli([*argv, "--dry-run"])
    real = run_cli(argv)
    assert real[0] == 2 and "family applies to diffusion LoRAs" in real[2]
    assert dry[0] == real[0] and dry[2] == real[2], (dry, real)
    assert not (tree / "a.gguf").exists()


def test_verbose_dry_run_lists_every_module(tree: Path) -> None:
    """--verbose ("one line per module") with --dry-run listed 20 modules and "... and 5 more"."""
    shapes = {f"model.layers.{i}.self_attn.q_proj": (8, 8) for i in range(25)}
    peft_folder(tree / "many", shapes, 1, rank=4)
    code, out, err = run_cli(["resize", "many", "--rank", "2", "-o", "out", "--dry-run", "--verbose"])
    assert code == 0, err
    assert all(re.search(rf"^    {re.escape(m)} +rank 4 -> 2 ", out, re.M) for m in shapes), out
    assert "more" not in out
    code, out, err = run_cli(["resize", "many", "--rank", "2", "-o", "out", "--dry-run"])  # without: 20 shown
    assert code == 0 and "... and 5 more" in out
    assert not (tree / "out").exists()


def test_extract_embeddings_with_no_embedding_is_noted(tree: Path) -> None:
    """--embeddings lora / full decides on embeddings and output heads; with none among the weights extracted it
    did nothing, silently (--conv-rank with no convolution says so)."""
    for dry in ([], ["--dry-run"]):
        code, out, err = run_cli(["extract", "base", "ft", "--rank", "2", "-o", "out", "--embeddings", "lora",
                                  "--json", *dry])
        assert code == 0, err
        assert any("--embeddings) changed nothing" in n for n in json.loads(out)["notes"]), out
    # where there is an embedding, no such note (and it is extracted)
    rng = np.random.default_rng(0)
    for name, noise in (("eb", 0.0), ("ef", 0.1)):
        (tree / name).mkdir()
        t = {"model.embed_tokens.weight": rng.standard_normal((32, 16)).astype(np.float32),
             "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((16, 16)).astype(np.float32)}
        if noise:
            base = load_file(str(tree / "eb" / "model.safetensors"))
            t = {k: base[k] + np.float32(noise) * t[k] for k in base}
        save_file(t, str(tree / name / "model.safetensors"))
        (tree / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, out, err = run_cli(["extract", "eb", "ef", "--rank", "2", "-o", "out2", "--embeddings", "lora", "--json"])
    assert code == 0, err
    report = json.loads(out)
    assert not any("--embeddings) changed nothing" in n for n in report["notes"])
    assert "model.embed_tokens" in {m["name"] for m in report["modules"]}


def test_combine_seed_with_exact_is_refused(tree: Path) -> None:
    """--seed seeds the randomized SVD's sketches; --exact takes the exact SVD for every module, so a seed beside
    it changed nothing, silently (an option the method does not use is refused, by the same rule)."""
    code, _, err = run_cli(["combine", "a", "b", "-o", "out", "--exact", "--seed", "3"])
    assert code == 2 and "seed=3 (--seed)" in err and "--exact" in err, err
    assert not (tree / "out").exists()
    with pytest.raises(LorafuseValueError, match="exact"):
        lorafuse.combine(["a", "b"], exact=True, seed=3)
    recipe = tree / "r.yml"
    recipe.write_text("merge_method: svd\nmodels: [{model: a}, {model: b}]\nparameters: {exact: true, seed: 4}\n")
    code, _, err = run_cli(["run", str(recipe), "-o", "out"])
    assert code == 2 and "r.yml line 3" in err and "seed=4" in err, err
    assert not (tree / "out").exists()
    code, _, err = run_cli(["combine", "a", "b", "-o", "out", "--exact", "--seed", "0"])  # the default: taken
    assert code == 0, err
    assert os.path.isfile(tree / "out" / "adapter_model.safetensors")


@pytest.mark.parametrize(("argv", "said"), [
    (["combine", "a", "b", "--method", "ties", "--density", "-1e-3"], "argument --density: must be a number > 0"),
    (["resize", "a", "--sv-ratio", "-inf"], "argument --sv-ratio: must be a number >= 1, got -inf"),
    (["extract", "base", "ft", "--rank", "2", "--min-diff", "-1e-9"], "argument --min-diff: must be a number >= 0"),
    (["combine", "a", "b", "--seed", "-1e3"], "argument --seed: must be an integer from 0"),
    (["apply", "base", "a", "--max-shard-size", "-5GB"], "'-5GB' is not a size")])
def test_a_negative_looking_value_is_the_options_value(tree: Path, argv: list[str], said: str) -> None:
    """argparse takes `-1e-3` or `-5GB` for an option (only -1 and -0.5 look like numbers to it), so
    `--density -1e-3` said "argument --density: expected one argument": the value was given, and is out of range."""
    code, _, err = run_cli([*argv, "-o", "out", "--dry-run"])
    assert code == 2, err
    assert said in err and "expected one argument" not in err
    assert not (tree / "out").exists()


def test_no_requantize_on_a_plain_base_is_noted_as_requantize_is(tree: Path) -> None:
    """--requantize on a base that is not quantized says it has no effect; --no-requantize said nothing."""
    for flag, said in (("--requantize", "requantize has no effect"),
                       ("--no-requantize", "requantize=False (--no-requantize) has no effect")):
        code, out, err = run_cli(["apply", "base", "a", "-o", "out", flag, "--dry-run", "--json"])
        assert code == 0, err
        assert any(said in n for n in json.loads(out)["notes"]), out
    code, out, err = run_cli(["apply", "base", "a", "-o", "out", "--dry-run", "--json"])  # neither: no note
    assert code == 0 and not any("requantize" in n for n in json.loads(out)["notes"])


def test_json_reports_name_the_file_written(tree: Path) -> None:
    """`-o DIR/` writes a one-file adapter inside DIR under a name lorafuse chooses; combine's and convert --to
    gguf's --json give that path as "out", but resize, extract and convert --to peft / kohya gave it only inside
    the summary's text."""
    kohya_file(tree / "k.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", 1)
    (tree / "od").mkdir()
    for argv, written in ((["resize", "k.safetensors", "--rank", "1", "-o", "od/"], "od/k.safetensors"),
                          (["convert", "k.safetensors", "--to", "peft", "-o", "od/"],
                           "od/pytorch_lora_weights.safetensors"),
                          (["extract", "base", "ft", "--rank", "1", "-o", "oe"], "oe")):
        code, out, err = run_cli([*argv, "--json"])
        assert code == 0, err
        assert Path(json.loads(out)["out"]) == Path(written), out
        assert (tree / written).exists()


@pytest.mark.parametrize("argv", [["resize", "c4", "--rank", "1", "-o", "out"], ["apply", "base", "a", "-o", "out"],
                                  ["combine", "a", "b", "-o", "out", "--device", "cpu"]])
def test_lorafuse_backend_cuda_is_not_ignored_by_a_verb_with_device(tree: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     argv: list[str]) -> None:
    """LORAFUSE_BACKEND=cuda names the GPU backend (a bad name is refused), but a verb with --device passes its
    --device (cpu by default) and ran on the CPU without a word."""
    monkeypatch.setenv("LORAFUSE_BACKEND", "cuda")
    code, out, err = run_cli(argv)
    assert code == 2, (out, err)
    assert "LORAFUSE_BACKEND=cuda" in err and "--device cuda" in err
    assert not (tree / "out").exists()
    monkeypatch.setenv("LORAFUSE_BACKEND", "reference")  # the host's other backend: runs
    code, _, err = run_cli([*argv, "-q"])
    assert code == 0, err


def test_combine_seed_that_seeds_nothing_is_noted(tree: Path) -> None:
    """svd's --seed seeds the randomized SVDs; where every module took the exact one (the memory engine on small
    stacks), the seed changed nothing, silently; DARE's masks always use it (no note there)."""
    code, out, err = run_cli(["combine", "a", "b", "-o", "out", "--seed", "5", "--json"])
    assert code == 0, err
    report = json.loads(out)
    assert report["engine"] == "memory" and report["randomized"] == []
    assert any("--seed 5 changed nothing" in n for n in report["notes"]), report["notes"]
    code, out, err = run_cli(["combine", "a", "b", "-o", "out2", "--method", "dare_linear", "--density", "0.5",
                              "--seed", "5", "--json"])
    assert code == 0 and not any("--seed" in n for n in json.loads(out)["notes"]), out
    code, out, err = run_cli(["combine", "a", "b", "-o", "out3", "--json"])  # the default seed: nothing said
    assert code == 0 and not any("--seed" in n for n in json.loads(out)["notes"]), out
