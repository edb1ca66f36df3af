"""Round 7, a new user: the docs and --help taken literally, and the typical mistakes of PEFT / kohya / diffusers
users (a `~` the shell did not expand, an option --help lists that docs/cli.md does not)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import RECIPE_SHAPES, llm_base, peft_deltas, peft_folder, run_cli
from safetensors.numpy import load_file

import lorafuse
from lorafuse.errors import LorafuseError

DOCS = Path(__file__).resolve().parents[1] / "docs"
VERBS = ("apply", "combine", "resize", "extract", "convert", "similarity", "info", "run")


@pytest.mark.parametrize("verb", VERBS)
def test_every_option_of_help_is_in_the_cli_page(verb: str) -> None:
    code, out, _ = run_cli([verb, "--help"])
    assert code == 0
    page = (DOCS / "cli.md").read_text()
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", out)) - {"--help", "--out", "--quiet"}
    assert sorted(o for o in options if o not in page) == []


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME = tmp_path/home holding base/ and adapter/ (RECIPE_SHAPES); the current folder is tmp_path/work."""
    home = tmp_path / "home"
    llm_base(home / "base", RECIPE_SHAPES)
    peft_folder(home / "adapter", RECIPE_SHAPES, 1)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home


def _merged(home: Path, out: Path) -> None:
    """out holds base + the adapter's delta (float64 reference, rounded to float32)."""
    base = load_file(str(home / "base" / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    for module, delta in peft_deltas(home / "adapter").items():
        want = (base[f"{module}.weight"].astype(np.float64) + delta).astype(np.float32)
        np.testing.assert_allclose(got[f"{module}.weight"], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out", ["--out=~/merged", "-o~/merged"])
def test_a_tilde_the_shell_left_is_the_home_folder_not_a_folder_named_tilde(home: Path, out: str) -> None:
    # bash leaves `--out=~/x` and a quoted '~/x' as typed; lists and recipes expand ~, so the command line does too
    code, _, err = run_cli(["apply", "~/base", "~/adapter", out, "-q"])
    assert code == 0, err
    assert not Path("~").exists()
    _merged(home, home / "merged")


def test_every_path_option_expands_a_tilde(home: Path) -> None:
    (home / "list.txt").write_text("adapter 1\n")
    code, _, err = run_cli(["combine", "--from-list=~/list.txt", "--method", "cat", "--out=~/pooled", "-q"])
    assert code == 0, err
    code, _, err = run_cli(["resize", "~/pooled", "--rank", "1", "--out=~/r1", "-q"])
    assert code == 0, err
    code, out, err = run_cli(["info", "~/r1", "--json"])
    assert code == 0, err
    code, _, err = run_cli(["similarity", "~/adapter", "~/pooled", "--json"])
    assert code == 0, err
    assert not Path("~").exists()
    a, b = peft_deltas(home / "adapter"), peft_deltas(home / "pooled")
    for module in a:
        np.testing.assert_allclose(b[module], a[module], rtol=1e-5, atol=1e-6)


def test_a_python_output_under_a_tilde_is_refused_not_written_into_a_folder_named_tilde(home: Path) -> None:
    with pytest.raises(LorafuseError, match="~"):
        lorafuse.apply("../home/base", ["../home/adapter"], out="~/merged")
    with pytest.raises(LorafuseError, match="home folder"):
        lorafuse.load("../home/adapter").save("~/copy")
    assert not Path("~").exists() and not (home / "merged").exists()


def test_a_python_input_under_a_tilde_says_the_path_meant(home: Path) -> None:
    with pytest.raises(LorafuseError) as e:
        lorafuse.load("~/adapter")
    assert str(home / "adapter") in str(e.value)


def test_info_of_a_peft_folder_without_its_config_says_what_is_missing(tmp_path: Path) -> None:
    # PEFT users copy adapter_model.safetensors alone; info described it as a model checkpoint and said nothing
    folder = peft_folder(tmp_path / "lora", RECIPE_SHAPES, 1)
    (folder / "adapter_config.json").unlink()
    for given in (folder, folder / "adapter_model.safetensors"):
        code, out, err = run_cli(["info", str(given)])
        assert code == 0, err
        assert "adapter_config.json" in out + err
        described = lorafuse.describe(given)
        assert any("adapter_config.json" in n for n in described["notes"])


def test_every_parameter_of_the_public_api_is_documented() -> None:
    import inspect

    missing = []
    for name in lorafuse.__all__:
        obj = getattr(lorafuse, name)
        members = [(name, obj)] if inspect.isfunction(obj) else \
            [(f"{name}.{m}", f) for m, f in vars(obj).items() if not m.startswith("_") and inspect.isfunction(f)] \
            if inspect.isclass(obj) else []
        for where, f in members:
            doc = inspect.getdoc(f) or ""
            missing += [f"{where}({p})" for p in inspect.signature(f).parameters
                        if p not in ("self", "cls") and p not in doc]
    assert missing == []


def _plan(argv: list[str]) -> dict:
    import json

    code, out, err = run_cli([*argv, "--dry-run", "--json"])
    assert code == 0, err
    plan = json.loads(out)
    plan.pop("out", None)
    return plan


@pytest.mark.parametrize("verb, given, meant", [
    (["combine", "A", "B", "--method", "ties", "--density", "0.5"], ["--majority-sign", "Frequency"],
     ["--majority-sign", "frequency"]),
    (["combine", "A", "B"], ["--engine", "Stream"], ["--engine", "stream"]),
    (["extract", "BASE", "BASE"], ["--embeddings", "LoRA"], ["--embeddings", "lora"]),
    (["convert", "A", "--to", "gguf", "--arch", "qwen2"], ["--gguf-type", "Q8_0"], ["--gguf-type", "q8_0"]),
    (["convert", "A", "--to", "gguf", "--gguf-type", "f16"], ["--arch", "Qwen2"], ["--arch", "qwen2"]),
])
def test_choice_options_take_any_case_as_method_and_format_do(tmp_path: Path, verb: list[str], given: list[str],
                                                              meant: list[str]) -> None:
    # `--family SDXL`, `--gguf-type Q8_0`: the spellings of the community were usage errors, unlike --method TIES
    names = {"A": str(peft_folder(tmp_path / "a", RECIPE_SHAPES, 1)),
             "B": str(peft_folder(tmp_path / "b", RECIPE_SHAPES, 2)), "BASE": str(llm_base(tmp_path / "base",
                                                                                           RECIPE_SHAPES))}
    argv = [names.get(w, w) for w in verb]
    if verb[0] == "extract":
        argv += ["--rank", "1"]
    out = ["-o", str(tmp_path / ("o.gguf" if "gguf" in verb else "o"))]
    assert _plan(argv + given + out) == _plan(argv + meant + out)


def test_convert_family_takes_any_case(tmp_path: Path) -> None:
    from redteam_fixtures import kohya_file

    lora = kohya_file(tmp_path / "k.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", 1)
    outs = []
    for family in ("SD1", "sd1"):
        out = tmp_path / f"{family}.safetensors"
        code, _, err = run_cli(["convert", str(lora), "--to", "peft", "--family", family, "-o", str(out), "-q"])
        assert code == 0, err
        outs.append(load_file(str(out)))
    assert sorted(outs[0]) == sorted(outs[1]) == ["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",
                                                   "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight"]
    for key in outs[0]:
        np.testing.assert_array_equal(outs[0][key], outs[1][key])


@pytest.mark.parametrize("verb", ["apply", "combine"])
def test_an_adapter_given_with_its_weight_after_a_colon_is_named_with_the_weights_option(tmp_path: Path,
                                                                                          verb: str) -> None:
    # A1111's <lora:name:0.8> habit: `style.safetensors:0.8` was a bare "no such file or directory"
    a = peft_folder(tmp_path / "a", RECIPE_SHAPES, 1)
    b = peft_folder(tmp_path / "b", RECIPE_SHAPES, 2)
    argv = [verb, *([str(llm_base(tmp_path / "base", RECIPE_SHAPES))] if verb == "apply" else [str(b)]),
            f"{a}:0.8", "-o", str(tmp_path / "out")]
    code, _, err = run_cli(argv)
    assert code == 1 and "--weights 0.8" in err and "Traceback" not in err
    with pytest.raises(LorafuseError, match=r"weights=\[0\.8\]"):
        lorafuse.load(f"{a}:0.8")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, meant", [
    (["apply", "--sd_model", "B", "--models", "A", "-o", "O"], "--sd_model is the first argument"),
    (["apply", "B", "--models", "A", "-o", "O"], "--models are the arguments"),
    (["resize", "--model", "A", "--rank", "2", "-o", "O"], "--model is an argument"),
    (["combine", "A", "A", "--precision", "float", "-o", "O"], "--dtype"),
    (["apply", "B", "A", "--torch_dtype", "bf16", "-o", "O"], "--dtype"),
    (["apply", "B", "A", "--torch-dtype", "bf16", "-o", "O"], "--dtype"),
])
def test_kohya_merge_and_transformers_options_are_named_with_ours(argv: list[str], meant: str) -> None:
    # sd-scripts' merge_lora.py / svd_merge_lora.py / resize_lora.py take --sd_model, --models, --model, --precision
    code, _, err = run_cli(argv)
    last = err.strip().splitlines()[-1]
    assert code == 2 and meant in last and last.startswith(f"lorafuse {argv[0]}: error: unrecognized argument")


def _sharded(folder: Path) -> Path:
    """A Llama-named float32 checkpoint of two modules in two shards with their index."""
    import json

    from safetensors.numpy import save_file

    folder.mkdir()
    rng = np.random.default_rng(5)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    weight_map = {}
    for i, name in enumerate(names, 1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({f"{name}.weight": rng.standard_normal((48, 32)).astype(np.float32)}, str(folder / shard))
        weight_map[f"{name}.weight"] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def test_one_shard_given_as_the_base_is_refused_naming_the_folder(tmp_path: Path) -> None:
    # with --skip-missing, one shard became a "merged model" holding half the weights
    base = _sharded(tmp_path / "base")
    adapter = peft_folder(tmp_path / "a", {"model.layers.0.self_attn.q_proj": (48, 32),
                                           "model.layers.1.self_attn.q_proj": (48, 32)}, 1)
    shard = base / "model-00001-of-00002.safetensors"
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli(["apply", str(shard), str(adapter), "-o", str(out), "--skip-missing"])
    assert code == 1 and "one shard of 2" in err and f"give {base}" in err
    assert not out.exists()
    code, _, err = run_cli(["apply", str(base), str(adapter), "-o", str(tmp_path / "whole"), "-q"])
    assert code == 0, err


@pytest.mark.parametrize("verb", ["apply", "extract", "info"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_json_file_of_a_model_folder_given_as_the_model_names_the_folder(tmp_path: Path, verb: str,
                                                                           name: str) -> None:
    base = _sharded(tmp_path / "base")
    given = str(base / name)
    argv = {"apply": ["apply", given, str(peft_folder(tmp_path / "a", RECIPE_SHAPES, 1)), "-o", str(tmp_path / "o")],
            "extract": ["extract", given, str(base), "--rank", "1", "-o", str(tmp_path / "o")],
            "info": ["info", given]}[verb]
    code, _, err = run_cli(argv)
    assert code == 1 and f"give the model's folder ({base})" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out", ["~", "HOME", "HOME/"])
def test_the_home_folder_is_never_replaced_even_with_overwrite(home: Path, out: str) -> None:
    # `-o ~ --overwrite` (meant: -o ~/merged) deleted everything in the home folder, working outside it
    (home / "notes.txt").write_text("mine")
    target = out.replace("HOME", str(home))
    code, _, err = run_cli(["resize", str(home / "adapter"), "--rank", "1", "-o", target, "--overwrite"])
    assert code == 1 and "home folder" in err
    assert (home / "notes.txt").read_text() == "mine" and (home / "base" / "model.safetensors").is_file()
    with pytest.raises(LorafuseError, match="home folder"):
        lorafuse.resize(str(home / "adapter"), 1, out=os.path.expanduser(target), overwrite=True)
    assert (home / "notes.txt").read_text() == "mine"
    code, _, err = run_cli(["resize", str(home / "adapter"), "--rank", "1", "-o", "~/small", "-q"])
    assert code == 0 and (home / "small" / "adapter_config.json").is_file(), err


@pytest.mark.parametrize("verb, out", [
    ("apply", "merged.gguf"), ("apply", "merged.bin"), ("apply-file", "merged.ckpt"), ("combine", "lora.bin"),
    ("resize", "lora.pt"), ("extract", "lora.pth"), ("save", "lora.bin"),
])
def test_an_output_named_as_another_format_is_refused_not_written_as_safetensors(tmp_path: Path, verb: str,
                                                                                 out: str) -> None:
    # `-o merged.gguf` wrote a safetensors folder named merged.gguf; a single-file base `-o merged.ckpt` wrote a
    # safetensors file that A1111 / torch.load would try to unpickle
    base = llm_base(tmp_path / "base", RECIPE_SHAPES)
    a = peft_folder(tmp_path / "a", RECIPE_SHAPES, 1)
    target = tmp_path / out
    argv = {"apply": ["apply", str(base), str(a)], "apply-file": ["apply", str(base / "model.safetensors"), str(a)],
            "combine": ["combine", str(a), str(a)], "resize": ["resize", str(a), "--rank", "1"],
            "extract": ["extract", str(base), str(base), "--rank", "1"]}.get(verb)
    if argv is None:
        with pytest.raises(LorafuseError, match=r"\.bin, a pickle file's name"):
            lorafuse.load(a).save(target)
    else:
        code, _, err = run_cli([*argv, "-o", str(target)])
        assert code == 2 and f"ends in {target.suffix}" in err and f"{target.with_suffix('')}.safetensors" in err
    assert not target.exists()
    code, _, err = run_cli(["apply", str(base), str(a), "-o", f"{target}/", "-q"])  # a folder by that name: asked
    assert code == 0 and (target / "model.safetensors").is_file(), err
