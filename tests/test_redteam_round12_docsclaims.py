"""Red-team round 12, the documentation's claims checked as a new user reads them: docs/api.md's "describe: what
`lorafuse info --json` prints", docs/cli.md's "the plan functions take the arguments of lorafuse.apply / resize /
extract" and "a dry run checks what a real run checks, with the same errors", and the --help texts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import llm_base, peft_folder, run_cli
from safetensors.numpy import save_file

import lorafuse
from lorafuse.ops import plan

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.mlp.up_proj": (20, 12)}


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return peft_folder(tmp_path / "a", SHAPES, 1)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return llm_base(tmp_path / "base", SHAPES)


def _finetuned(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    w = {f"{m}.weight": rng.standard_normal(s).astype(np.float32) for m, s in SHAPES.items()}
    ft = {k: v + np.outer(rng.standard_normal(v.shape[0]), rng.standard_normal(v.shape[1])).astype(np.float32)
          for k, v in w.items()}
    for name, tensors in (("b", w), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp_path / "b", tmp_path / "ft"


# ----------------------------------------------------------------------------- describe == info --json


def test_describe_of_an_adapter_has_every_key_info_json_prints(adapter: Path) -> None:
    """docs/api.md: `lorafuse.describe(path)` is what `lorafuse info --json` prints; docs/cli.md lists `notes`
    among an adapter's keys. describe() of an adapter had no `notes`."""
    code, out, _ = run_cli(["info", str(adapter), "--json"])
    assert code == 0
    shown = json.loads(out)
    described = lorafuse.describe(adapter)
    assert set(described) == set(shown)
    assert described["notes"] == shown["notes"] == []


def test_describe_lists_what_loading_the_adapter_left_out(tmp_path: Path) -> None:
    """A module adapter_config.json does not target is left out with a note: `info --json` lists it under
    `notes` (once), and so does describe(), whose notes are the same texts."""
    folder = peft_folder(tmp_path / "a", SHAPES, 1, extra={"target_modules": ["q_proj"]})
    code, out, err = run_cli(["info", str(folder), "--json"])
    assert code == 0
    notes = json.loads(out)["notes"]
    assert len(notes) == 1 and "up_proj" in notes[0] and "not in target_modules" in notes[0]
    assert err.count("not in target_modules") == 1  # said once on stderr too
    with pytest.warns(lorafuse.errors.AdapterNote):
        described = lorafuse.describe(folder)
    assert described["notes"] == notes


def test_describe_of_a_pipeline_has_every_key_info_json_prints(tmp_path: Path) -> None:
    pipe = tmp_path / "p"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                      "unet": ["diffusers", "UNet2DConditionModel"]}))
    save_file({"conv_in.weight": np.ones((4, 4), np.float16)},
              str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    (pipe / "unet" / "config.json").write_text("{}")
    code, out, _ = run_cli(["info", str(pipe), "--json"])
    assert code == 0
    assert set(lorafuse.describe(pipe)) == set(json.loads(out))


# ----------------------------------------------------------------------------- the plan functions' checks


@pytest.mark.parametrize("value", ["no", 1, "yes"])
def test_plan_apply_refuses_a_progress_that_apply_refuses(base: Path, adapter: Path, tmp_path: Path,
                                                          value: object) -> None:
    """docs/cli.md, dry runs: the plan functions take apply's arguments and check what a run checks, with the same
    errors; docs/api.md: `progress="no"` is refused, not taken as true. plan_apply took it."""
    with pytest.raises(lorafuse.LorafuseValueError) as real:
        lorafuse.apply(base, [adapter], out=tmp_path / "m", progress=value)  # type: ignore[arg-type]
    with pytest.raises(lorafuse.LorafuseValueError) as planned:
        plan.plan_apply(base, [adapter], out=tmp_path / "m", progress=value)  # type: ignore[arg-type]
    assert str(planned.value) == str(real.value)
    assert "progress must be" in str(real.value)
    assert not (tmp_path / "m").exists()


def test_plan_apply_refuses_an_allow_nonfinite_that_apply_refuses(base: Path, adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(lorafuse.LorafuseValueError) as real:
        lorafuse.apply(base, [adapter], out=tmp_path / "m", allow_nonfinite="no")  # type: ignore[arg-type]
    with pytest.raises(lorafuse.LorafuseValueError) as planned:
        plan.plan_apply(base, [adapter], out=tmp_path / "m", allow_nonfinite="no")  # type: ignore[arg-type]
    assert str(planned.value) == str(real.value)
    assert "allow_nonfinite must be True or False" in str(real.value)


def test_plan_apply_still_takes_a_progress_callable_and_the_switches(base: Path, adapter: Path,
                                                                    tmp_path: Path) -> None:
    for progress in (print, True, False, None, np.bool_(True)):
        p = plan.plan_apply(base, [adapter], out=tmp_path / "m", progress=progress,  # type: ignore[arg-type]
                            allow_nonfinite=np.bool_(False))  # type: ignore[arg-type]
        assert p.as_json()["merged"] == [f"{m}.weight" for m in sorted(SHAPES)]
    assert not (tmp_path / "m").exists()


def test_plan_resize_refuses_a_progress_that_resize_refuses(adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(lorafuse.LorafuseValueError) as real:
        lorafuse.resize(adapter, 1, out=tmp_path / "r", progress="no")  # type: ignore[arg-type]
    with pytest.raises(lorafuse.LorafuseValueError) as planned:
        plan.plan_resize(adapter, 1, out=tmp_path / "r", progress="no")  # type: ignore[arg-type]
    assert str(planned.value) == str(real.value)
    assert plan.plan_resize(adapter, 1, out=tmp_path / "r", progress=np.bool_(False)).tensors == 4
    assert not (tmp_path / "r").exists()


def test_plan_extract_refuses_a_progress_that_extract_refuses(tmp_path: Path) -> None:
    b, ft = _finetuned(tmp_path)
    with pytest.raises(lorafuse.LorafuseValueError) as real:
        lorafuse.extract(b, ft, tmp_path / "e", rank=1, progress="no")  # type: ignore[arg-type]
    with pytest.raises(lorafuse.LorafuseValueError) as planned:
        plan.plan_extract(b, ft, tmp_path / "e", rank=1, progress="no")  # type: ignore[arg-type]
    assert str(planned.value) == str(real.value)
    assert plan.plan_extract(b, ft, tmp_path / "e", rank=1, progress=None).tensors == 4
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------- --help texts


def test_overwrite_help_says_an_earlier_output_holds_the_files_its_manifest_lists(adapter: Path,
                                                                                 tmp_path: Path) -> None:
    """--overwrite's help said a re-run needs no flag for "a folder holding lorafuse_manifest.json and nothing
    else": an earlier output holds its weights and config beside the manifest, and is replaced without the flag;
    a file added to it makes it the user's again."""
    out = tmp_path / "r"
    assert run_cli(["resize", str(adapter), "--rank", "1", "-o", str(out), "-q"])[0] == 0
    assert len(list(out.iterdir())) > 1
    assert run_cli(["resize", str(adapter), "--rank", "1", "-o", str(out), "-q"])[0] == 0  # a re-run: no flag
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(["resize", str(adapter), "--rank", "1", "-o", str(out), "-q"])
    assert code == 1 and "notes.txt" in err
    for command in ("apply", "combine", "resize", "extract", "convert", "run"):
        code, text, _ = run_cli([command, "--help"])
        assert code == 0
        flat = " ".join(text.split())
        assert "holding lorafuse_manifest.json and nothing else" not in flat
        assert "holding lorafuse_manifest.json and only the files it lists" in flat


# ----------------------------------------------------------------------------- dry runs


def test_dry_run_json_says_what_overwrite_would_replace_not_that_it_was_replaced(adapter: Path,
                                                                                 tmp_path: Path) -> None:
    """docs/cli.md: `--dry-run --json` prints `replaces`, what `--overwrite` would replace ("nothing is written,
    created or replaced"). Its JSON said "--overwrite replaced OUT ...; everything that was in it is gone" of a
    folder the dry run left as it was; the text plan said "would replace"."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, text, _ = run_cli(["resize", str(adapter), "--rank", "1", "-o", str(out), "--overwrite", "--dry-run",
                             "--json"])
    assert code == 0
    replaces = json.loads(text)["replaces"]
    assert "notes.txt" in replaces and str(out) in replaces
    assert "replaced" not in replaces and "is gone" not in replaces
    assert (out / "notes.txt").read_text() == "mine" and [p.name for p in out.iterdir()] == ["notes.txt"]
    code, text, _ = run_cli(["resize", str(adapter), "--rank", "1", "-o", str(out), "--overwrite", "--dry-run"])
    assert f"would replace: {replaces} (with --overwrite" in text
    python = plan.plan_resize(adapter, 1, out=out, overwrite=True).as_json()["replaces"]
    assert isinstance(python, str) and "notes.txt" in python and "replaced" not in python


# ----------------------------------------------------------------------------- Python errors name Python's words


TWO_STAGES = "name: pooled\nmerge_method: cat\nmodels: [{model: ./a}, {model: ./b}]\n---\nname: last\n" \
             "merge_method: resize\nmodels: [{model: pooled}]\nparameters: {rank: 1}\n"


def _recipe_tree(tmp_path: Path) -> Path:
    peft_folder(tmp_path / "a", SHAPES, 1)
    peft_folder(tmp_path / "b", SHAPES, 2)
    (tmp_path / "r.yml").write_text(TWO_STAGES)
    return tmp_path / "r.yml"


def test_run_in_python_names_intermediate_dir_as_python_does(tmp_path: Path) -> None:
    """docs/api.md: errors raised through the Python API that name a CLI flag name the Python parameter too.
    lorafuse.run's refusals of an intermediate folder said `--intermediate-dir` and `-o` only."""
    recipe = _recipe_tree(tmp_path)
    with pytest.raises(lorafuse.OutputError) as inside:
        lorafuse.run(recipe, tmp_path / "out", intermediate_dir=tmp_path / "a")
    mine = tmp_path / "work" / "pooled"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(lorafuse.OutputError) as taken:
        lorafuse.run(recipe, tmp_path / "out", intermediate_dir=tmp_path / "work")
    for e in (inside, taken):
        text = str(e.value)
        assert "intermediate_dir" in text and "--intermediate-dir" not in text and "(-o)" not in text, text
    assert "overwrite=True replaces only the output (out)" in str(taken.value)
    assert (mine / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()
    one = tmp_path / "one.yml"
    one.write_text("merge_method: cat\nmodels: [{model: ./a}]\n")
    notes = lorafuse.run(one, tmp_path / "o1", intermediate_dir=tmp_path / "w").notes
    assert any(n.startswith(f"intermediate_dir {tmp_path / 'w'} is not used") for n in notes), notes


def test_run_on_the_command_line_still_names_its_options(tmp_path: Path) -> None:
    recipe = _recipe_tree(tmp_path)
    code, _, err = run_cli(["run", str(recipe), "-o", str(tmp_path / "out"), "--intermediate-dir", str(tmp_path / "a")])
    assert code == 1 and "choose another --intermediate-dir" in err and "intermediate_dir" not in err, err


def test_a_recipe_parameter_refusal_lists_only_parameters_a_recipe_takes(tmp_path: Path) -> None:
    """docs/cli.md: a recipe cannot name a Ray cluster (`ray_address` is refused at its line). Yet the refusal of a
    parameter the method does not take listed `ray_address` among those svd "takes"."""
    _recipe_tree(tmp_path)
    recipe = tmp_path / "s.yml"
    recipe.write_text("merge_method: svd\nmodels: [{model: ./a}, {model: ./b}]\nparameters: {density: 0.5}\n")
    code, _, err = run_cli(["run", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"])
    assert code == 2 and "s.yml line 3, parameters.density: merge_method 'svd' takes no density" in err, err
    assert "(it takes: conv_rank, engine, exact, oversample, passes, rank, seed, split, weight)" in err, err
    recipe.write_text("merge_method: svd\nmodels: [{model: ./a}, {model: ./b}]\nparameters: {ray_address: auto}\n")
    code, _, err = run_cli(["run", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"])
    assert code == 2 and "a recipe cannot name a Ray cluster" in err, err


# ----------------------------------------------------------------------------- a folder of several adapter files


def _kohya(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    m = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{m}.lora_down.weight": rng.standard_normal((2, 8)).astype(np.float32),
               f"{m}.lora_up.weight": rng.standard_normal((8, 2)).astype(np.float32),
               f"{m}.alpha": np.array(2.0, np.float32)}, str(path))
    return path


def test_a_folder_of_several_adapter_files_says_to_give_the_files_path(tmp_path: Path) -> None:
    """README (Hub ids): a folder without adapter_config.json is read as its one .safetensors file; "with several
    such files, give the file's path", as a Hub repository of several is refused. A local folder of two kohya
    files was refused as "not a recognised adapter: expected a kohya LoRA .safetensors file", which it holds."""
    folder = tmp_path / "loras"
    folder.mkdir()
    _kohya(folder / "style.safetensors", 1)
    _kohya(folder / "detail.safetensors", 2)
    for argv in (["resize", str(folder), "--rank", "1", "-o", str(tmp_path / "out")],
                 ["combine", str(folder), str(folder / "style.safetensors"), "-o", str(tmp_path / "out")],
                 ["similarity", str(folder), str(folder / "style.safetensors")]):
        code, _, err = run_cli(argv)
        assert code == 1 and "FormatError" in err, err
        assert "2 .safetensors files (detail.safetensors, style.safetensors)" in err, err
        assert f"give the file's path (e.g. {folder / 'detail.safetensors'})" in err, err
    assert not (tmp_path / "out").exists()
    # the file's path, as said, is read; one file in the folder is that file
    assert run_cli(["resize", str(folder / "detail.safetensors"), "--rank", "1", "-o", str(tmp_path / "o.safetensors"),
                    "-q"])[0] == 0
    (folder / "style.safetensors").unlink()
    assert run_cli(["resize", str(folder), "--rank", "1", "-o", str(tmp_path / "o2.safetensors"), "-q"])[0] == 0


def test_a_folder_of_several_files_none_an_adapter_is_not_said_to_hold_one(tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    for name in ("a", "b"):
        save_file({f"{name}.weight": np.ones((2, 2), np.float32)}, str(folder / f"{name}.safetensors"))
    code, _, err = run_cli(["resize", str(folder), "--rank", "1", "-o", str(tmp_path / "out")])
    assert code == 1 and "not a recognised adapter" in err and "give the file's path" not in err, err


# ----------------------------------------------------------------------------- convert's round trip


def test_an_sd1_lora_te1_file_comes_back_with_its_alphas_as_lora_te(tmp_path: Path) -> None:
    """docs/cli.md (convert): kohya -> peft -> kohya gives back the same tensors, bit for bit (alpha dtypes too), a
    `lora_te1_` prefix in an SD 1.x file coming back as `lora_te_`. The renamed text-encoder modules lost what
    lorafuse recorded of their alphas (kept under the lora_te1_ names): an F16 alpha came back F32, and an alpha
    of 0 came back as the rank, where the UNet's modules kept theirs."""
    rng = np.random.default_rng(0)
    shapes = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ((768, 768), 0.0),
              "lora_te1_text_model_encoder_layers_0_mlp_fc1": ((64, 768), 3.0),
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((320, 768), 0.0)}
    t: dict[str, np.ndarray] = {}
    for m, ((o, i), alpha) in shapes.items():
        t[f"{m}.lora_down.weight"] = rng.standard_normal((2, i)).astype(np.float16)
        t[f"{m}.lora_up.weight"] = rng.standard_normal((o, 2)).astype(np.float16)
        t[f"{m}.alpha"] = np.array(alpha, np.float16)
    src = tmp_path / "te1.safetensors"
    save_file(t, str(src))
    peft_file, back = tmp_path / "d.safetensors", tmp_path / "back.safetensors"
    assert run_cli(["convert", str(src), "--to", "peft", "-o", str(peft_file), "-q"])[0] == 0
    assert run_cli(["convert", str(peft_file), "--to", "kohya", "-o", str(back), "-q"])[0] == 0
    from safetensors.numpy import load_file

    got = load_file(str(back))
    assert set(got) == {k.replace("lora_te1_", "lora_te_") for k in t}
    for k, v in t.items():
        w = got[k.replace("lora_te1_", "lora_te_")]
        assert w.dtype == v.dtype and w.tobytes() == v.tobytes(), k


# ----------------------------------------------------------------------------- model cards


@pytest.mark.parametrize("shard", [None, "100KB"])
def test_a_merged_diffusers_model_folder_is_carded_as_diffusers(tmp_path: Path, shard: str | None) -> None:
    """README (What an output records): a folder output's model card names its library, `peft`, `transformers` or
    `diffusers`. A diffusers model folder given alone (a pipeline's unet/, diffusion_pytorch_model.safetensors
    and its config) merged into a folder that diffusers loads, carded `library_name: "transformers"`."""
    unet = tmp_path / "unet"
    unet.mkdir()
    rng = np.random.default_rng(0)
    save_file({f"down_blocks.{i}.attentions.0.proj_in.weight": rng.standard_normal((128, 128)).astype(np.float32)
               for i in range(2)}, str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    lora = peft_folder(tmp_path / "lora", {"down_blocks.0.attentions.0.proj_in": (128, 128)}, 1,
                       extra={"target_modules": ["proj_in"]})
    out = tmp_path / "out"
    argv = ["apply", str(unet), str(lora), "-o", str(out), "-q"] + (["--max-shard-size", shard] if shard else [])
    assert run_cli(argv)[0] == 0
    assert any(p.name.startswith("diffusion_pytorch_model") for p in out.iterdir())
    card = (out / "README.md").read_text()
    assert card.startswith('---\nlibrary_name: "diffusers"\n'), card[:80]
    # a transformers checkpoint folder stays transformers'
    llm = llm_base(tmp_path / "llm", SHAPES)
    assert run_cli(["apply", str(llm), str(peft_folder(tmp_path / "a", SHAPES, 1)), "-o", str(tmp_path / "m"),
                    "-q"])[0] == 0
    assert (tmp_path / "m" / "README.md").read_text().startswith('---\nlibrary_name: "transformers"\n')
