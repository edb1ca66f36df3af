"""Red-team round 6, recipes and provenance (REPORT of helper "recipes"), each test failing before its fix:

1. a recipe whose last stage is apply, given an -o that is an earlier lorafuse adapter (a mistyped -o), ran every
   stage before it and was refused only when the apply stage started; an apply stage's intermediate output that
   exists as lorafuse's adapter was likewise taken for replaceable until its stage ran. What an apply stage writes
   (a merged model, or a merged pipeline) is told from its base before the first stage runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import RECIPE_SHAPES, recipe_tree
from redteam_fixtures import run_cli as _cli
from redteam_fixtures import write_recipe as _write
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import OutputError
from lorafuse.io.provenance import Provenance, flat_inputs, recorded_in

SHAPES = RECIPE_SHAPES


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return recipe_tree(tmp_path)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. what an apply stage writes


_RESIZE_THEN_APPLY = ("name: small\nmerge_method: resize\nmodels: [{model: a}]\nparameters: {rank: 1}\n---\n"
                      "name: merged\nmerge_method: apply\nbase_model: base\nmodels: [{model: small}]\n")


def test_an_adapter_at_the_output_of_a_last_apply_stage_is_refused_before_any_stage(tree: Path) -> None:
    assert main(["resize", str(tree / "a"), "--rank", "1", "-o", str(tree / "mine"), "-q"]) == 0
    before = _snapshot(tree / "mine")
    recipe = _write(tree, _RESIZE_THEN_APPLY)
    with pytest.raises(OutputError, match="holding an adapter.*writes a merged model") as e:
        lorafuse.run(recipe, tree / "mine", intermediate_dir=tree / "work")
    assert "stage 'merged'" not in str(e.value)  # told before the stages, not by the apply stage
    assert not (tree / "work").exists()  # no stage ran: the resize stage wrote nothing
    assert _snapshot(tree / "mine") == before
    code, out, err = _cli(["run", str(recipe), "-o", str(tree / "mine")])
    assert code != 0 and "stage 'small'" not in out and "holding an adapter" in err
    # a merged model there is lorafuse's own output of the same kind: replaced (a re-run), and right
    assert main(["run", str(recipe), "-o", str(tree / "m1"), "-q"]) == 0
    assert main(["run", str(recipe), "-o", str(tree / "m1"), "-q"]) == 0
    assert (tree / "m1" / "model.safetensors").is_file()


def test_an_apply_chain_writes_what_its_first_base_is(tree: Path) -> None:
    """m2 = apply(m1, b), m1 = apply(base, a): m2 is a merged model (its base m1 is); an adapter at -o is refused
    before m1 runs."""
    assert main(["resize", str(tree / "a"), "--rank", "1", "-o", str(tree / "mine"), "-q"]) == 0
    recipe = _write(tree, "name: m1\nmerge_method: apply\nbase_model: base\nmodels: [{model: a}]\n---\n"
                          "name: m2\nmerge_method: apply\nbase_model: m1\nmodels: [{model: b}]\n")
    with pytest.raises(OutputError, match="holding an adapter"):
        lorafuse.run(recipe, tree / "mine", intermediate_dir=tree / "work")
    assert not (tree / "work").exists()
    assert main(["run", str(recipe), "-o", str(tree / "ch"), "-q"]) == 0
    # the result is base + a + b (scale alpha / r = 1), numpy float64
    w = load_file(str(tree / "base" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    want = w.astype(np.float64)
    for name in ("a", "b"):
        t = load_file(str(tree / name / "adapter_model.safetensors"))
        pre = "base_model.model.model.layers.0.self_attn.q_proj"
        want = want + t[f"{pre}.lora_B.weight"].astype(np.float64) @ t[f"{pre}.lora_A.weight"]
    got = load_file(str(tree / "ch" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_an_adapter_where_an_apply_stage_writes_in_the_intermediate_dir_is_refused_before_any_stage(
        tree: Path) -> None:
    work = tree / "work"
    work.mkdir()
    assert main(["resize", str(tree / "a"), "--rank", "1", "-o", str(work / "merged"), "-q"]) == 0
    before = _snapshot(work)
    recipe = _write(tree, _RESIZE_THEN_APPLY + "---\nname: ex\nmerge_method: extract\nbase_model: base\n"
                          "models: [{model: merged}]\nparameters: {rank: 2}\n")
    with pytest.raises(OutputError, match="stage 'merged' writes its output to") as e:
        lorafuse.run(recipe, tree / "x", intermediate_dir=work)
    assert "not lorafuse's own earlier output of that kind" in str(e.value)
    assert _snapshot(work) == before  # the resize stage did not run: work/small was not written
    assert not (tree / "x").exists()


_KOHYA = "lora_unet_down_blocks_0_attentions_0_proj_in"
_UNET = "down_blocks.0.attentions.0.proj_in.weight"


def _pipeline(tree: Path) -> None:
    """pipe/ (a diffusers pipeline of one UNet weight, and a text encoder whose file claims to be lorafuse's
    combination of an adapter 'EVIL') and k.safetensors, k2.safetensors (kohya LoRAs on the UNet)."""
    pipe = tree / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "text_encoder").mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "text_encoder": ["transformers", "CLIPTextModel"],
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    (pipe / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (pipe / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"]}))
    fake = {"lorafuse.operation": "combine", "lorafuse.version": "0.1.0", "lorafuse_version": "0.1.0",
            "lorafuse.inputs": json.dumps([{"name": "EVIL", "role": "adapter", "sha256": "1" * 64}]),
            "lorafuse.command": "lorafuse combine EVIL -o OUT"}
    save_file({"text_model.embeddings.token_embedding.weight": np.ones((4, 4), np.float32)},
              str(pipe / "text_encoder" / "model.safetensors"), metadata=fake)
    rng = np.random.default_rng(0)
    save_file({_UNET: rng.standard_normal((8, 8)).astype(np.float32)},
              str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    for name in ("k", "k2"):
        save_file({f"{_KOHYA}.lora_down.weight": rng.standard_normal((2, 8)).astype(np.float32),
                   f"{_KOHYA}.lora_up.weight": rng.standard_normal((8, 2)).astype(np.float32)},
                  str(tree / f"{name}.safetensors"))


def test_an_apply_stage_on_a_pipeline_writes_a_pipeline(tree: Path) -> None:
    """A pipeline base: the last stage writes a merged pipeline, so a merged checkpoint of lorafuse's at -o is
    refused before any stage runs (apply's own check refuses it as such)."""
    _pipeline(tree)
    assert main(["apply", str(tree / "base"), str(tree / "a"), "-o", str(tree / "ckpt"), "-q"]) == 0
    recipe = _write(tree, "name: small\nmerge_method: resize\nmodels: [{model: k.safetensors}]\n"
                          "parameters: {rank: 1}\n---\n"
                          "name: merged\nmerge_method: apply\nbase_model: pipe\nmodels: [{model: small}]\n")
    with pytest.raises(OutputError, match="merged diffusers pipeline"):
        lorafuse.run(recipe, tree / "ckpt", intermediate_dir=tree / "work")
    assert not (tree / "work").exists()
    shutil.rmtree(tree / "ckpt")


def test_a_chain_of_apply_stages_on_a_pipeline_records_every_input(tree: Path) -> None:
    """m2 = apply(m1, k2), m1 = apply(pipe, k): the record of a stage that wrote a pipeline was not found (its
    files are in the components' folders), so the output named 'm1', a temporary folder gone, as its base and
    left pipe and k out of its inputs. The record is the one this run wrote, not the one an untouched
    component (copied as it is) carries."""
    _pipeline(tree)
    recipe = _write(tree, "name: m1\nmerge_method: apply\nbase_model: pipe\nmodels: [{model: k.safetensors}]\n---\n"
                          "name: m2\nmerge_method: apply\nbase_model: m1\nmodels: [{model: k2.safetensors}]\n")
    assert main(["run", str(recipe), "-o", str(tree / "out"), "-q"]) == 0
    made = tree / "out" / "unet" / "diffusion_pytorch_model.safetensors"
    meta, _ = _header(made)
    assert meta["lorafuse.base_model"] == "pipe"
    assert (tree / "out" / "README.md").read_text().startswith('---\nbase_model: "pipe"\n')
    record = Provenance.from_metadata(meta)  # of the component this run merged
    assert record is not None and recorded_in(tree / "out", record.invocation) == record
    rows = [(n, i.name) for n, i in flat_inputs(record.inputs, stages=record.stages)]
    assert rows == [("1", "m1"), ("1.1", "pipe"), ("1.2", "k.safetensors"), ("2", "k2.safetensors")]
    assert "EVIL" not in json.dumps(record.as_dict())
    # and the weight is W + up @ down of each (no alpha: scale 1), numpy float64
    want = load_file(str(tree / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))[_UNET].astype(np.float64)
    for name in ("k", "k2"):
        t = load_file(str(tree / f"{name}.safetensors"))
        want = want + t[f"{_KOHYA}.lora_up.weight"].astype(np.float64) @ t[f"{_KOHYA}.lora_down.weight"]
    assert np.abs(load_file(str(made))[_UNET] - want).max() <= 1e-5 * np.abs(want).max()


# ----------------------------------------------------------------------------- 2. JSON recipes


def test_a_recipe_written_by_json_dumps_is_read_as_json_reads_it(tree: Path) -> None:
    """JSON is YAML, but PyYAML read json.dumps's `\\ud83d\\ude00` (a character beyond U+FFFF) as two lone
    surrogates (refused as 'unable to parse raw data as a unicode string') and refused indent='\\t'."""
    shutil.copytree(tree / "a", tree / "lora-😀")
    stage = {"merge_method": "resize", "models": [{"model": "lora-😀"}], "parameters": {"rank": 1}}
    for n, text in enumerate([json.dumps(stage), json.dumps(stage, indent="\t"), json.dumps([stage], indent="\t")]):
        recipe = _write(tree, text, f"r{n}.json")
        assert main(["run", str(recipe), "-o", str(tree / f"o{n}"), "-q"]) == 0
        got = load_file(str(tree / f"o{n}" / "adapter_model.safetensors"))
        assert main(["resize", str(tree / "lora-😀"), "--rank", "1", "-o", str(tree / f"c{n}"), "-q"]) == 0
        want = load_file(str(tree / f"c{n}" / "adapter_model.safetensors"))
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
        meta = lorafuse.load(tree / f"o{n}").provenance
        assert meta is not None and meta.inputs[0].name == "lora-😀" and meta.invocation.text == text  # verbatim
    # with a byte order mark (as Windows' editors save UTF-8)
    (tree / "bom.json").write_text(json.dumps(stage, indent="\t"), encoding="utf-8-sig")
    assert main(["run", str(tree / "bom.json"), "-o", str(tree / "bom"), "-q"]) == 0
    # the same escapes in YAML's double quotes
    recipe = _write(tree, 'merge_method: resize\nmodels: [{model: "lora-\\ud83d\\ude00"}]\nparameters: {rank: 1}\n')
    assert main(["run", str(recipe), "-o", str(tree / "y"), "-q"]) == 0


@pytest.mark.parametrize("escape", ["\\ud83d", "\\ude00", "\\ude00\\ud83d"])
def test_a_lone_surrogate_is_refused_at_its_line(tree: Path, escape: str) -> None:
    recipe = _write(tree, f'merge_method: resize\nparameters: {{rank: 1}}\nmodels:\n  - model: "a{escape}"\n')
    code, _, err = _cli(["run", str(recipe), "-o", str(tree / "o"), "-q"])
    assert code == 2 and "r.yml line 4, column 12" in err and "lone surrogate" in err and "unicode" not in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_json_list_of_stages_runs_as_the_yaml_documents_do(tree: Path) -> None:
    """JSON has one document: a list of stages is how it writes several (as lorafuse.run takes a list)."""
    stages = [{"name": "ab", "merge_method": "cat", "models": [{"model": "a"}, {"model": "b"}]},
              {"name": "small", "merge_method": "resize", "models": [{"model": "ab"}], "parameters": {"rank": 2}}]
    recipe = _write(tree, json.dumps(stages, indent="\t"), "r.json")
    assert main(["run", str(recipe), "-o", str(tree / "j"), "-q"]) == 0
    yml = _write(tree, "name: ab\nmerge_method: cat\nmodels: [{model: a}, {model: b}]\n---\n"
                       "name: small\nmerge_method: resize\nmodels: [{model: ab}]\nparameters: {rank: 2}\n")
    assert main(["run", str(yml), "-o", str(tree / "y"), "-q"]) == 0
    got = load_file(str(tree / "j" / "adapter_model.safetensors"))
    want = load_file(str(tree / "y" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    # errors name the line of the stage in the list
    stages[1]["parameters"] = {"rank": 2, "wieght": 1}
    recipe = _write(tree, json.dumps(stages, indent=1), "bad.json")
    code, _, err = _cli(["run", str(recipe), "-o", str(tree / "z"), "-q"])
    line = next(n for n, t in enumerate(recipe.read_text().splitlines(), 1) if "wieght" in t)
    assert code == 2 and f"bad.json line {line}, parameters.wieght: unknown field (did you mean 'weight'?)" in err


# ----------------------------------------------------------------------------- 3. messages


@pytest.mark.parametrize("text, said", [
    ("models: [a]\nparameters: {rank: 1}\n",
     "line 2, models[0]: expected a mapping of the fields model, parameters, got the text 'a' (a model is written "
     "`{model: a}`)"),
    # `parameters: null` is no parameters, as mergekit reads it (round 8): another value that is no mapping instead
    ("models: [{model: a, parameters: 3}]\nparameters: {rank: 1}\n",
     "line 2, models[0].parameters: expected a mapping of the fields weight, density, got the value 3"),
    ("models: [{model: a}]\nparameters: [1]\n", "line 3, parameters: expected a mapping of the fields weight, "),
])
def test_a_field_that_is_not_a_mapping_says_what_the_recipe_writes(tree: Path, text: str, said: str) -> None:
    """pydantic's 'Input should be a valid dictionary or instance of ModelEntry' named a Python class."""
    recipe = _write(tree, "merge_method: resize\n" + text)
    code, _, err = _cli(["run", str(recipe), "-o", str(tree / "o")])
    assert code == 2 and said in err and "instance of" not in err and not (tree / "o").exists()


# ----------------------------------------------------------------------------- 4. hashes that describe another file


def _kohya_with_claims(path: Path) -> dict[str, str]:
    """A kohya file whose metadata claims hashes (sd-scripts' sshs_*, ModelSpec's modelspec.hash_sha256) of
    other weights."""
    rng = np.random.default_rng(3)
    m = "lora_unet_down_blocks_0_attentions_0_proj_in"
    claims = {"ss_network_module": "networks.lora", "sshs_model_hash": "f" * 64, "sshs_legacy_hash": "deadbeef",
              "modelspec.hash_sha256": "0x" + "1" * 64, "modelspec.title": "t"}
    save_file({f"{m}.lora_down.weight": rng.standard_normal((2, 8)).astype(np.float32),
               f"{m}.lora_up.weight": rng.standard_normal((8, 2)).astype(np.float32),
               f"{m}.alpha": np.array(2.0, np.float32)}, str(path), metadata=claims)
    return claims


def _header(path: Path) -> tuple[dict[str, str], bytes]:
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n])["__metadata__"], raw[8 + n:]


@pytest.mark.parametrize("argv", [["convert", "--to", "peft"], ["convert", "--to", "kohya"], ["resize", "--rank", "1"],
                                  ["combine", "--method", "cat"]])
def test_no_output_carries_a_hash_of_its_inputs_weights(tmp_path: Path, argv: list[str]) -> None:
    """convert --to peft kept the kohya input's sshs_model_hash / sshs_legacy_hash, and every output kept its
    modelspec.hash_sha256: claims of the input's weights, which tools read as the output's identity."""
    import hashlib

    src = tmp_path / "in.safetensors"
    _kohya_with_claims(src)
    out = tmp_path / "out.safetensors"
    assert main([argv[0], str(src), *argv[1:], "-o", str(out), "-q"]) == 0
    meta, data = _header(out)
    assert "modelspec.hash_sha256" not in meta and meta["modelspec.title"] == "t"
    assert meta["sshs_model_hash"] == hashlib.sha256(data).hexdigest()  # sd-scripts' definition: the data's sha256
    assert meta["sshs_legacy_hash"] == hashlib.sha256(out.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
