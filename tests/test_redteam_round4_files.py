"""Fourth red-team round, inputs and outputs of every command: each test is a finding that was wrong before,
checked against an independent reference (numpy float64, the real diffusers / peft / safetensors packages, the
file system)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from redteam_fixtures import kohya_file
from redteam_fixtures import llm_base as _base
from redteam_fixtures import peft_folder as _peft
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import FormatError, LorafuseValueError, OutputError, OverwriteWarning, UnsupportedError
from lorafuse.io import hub

PREFIX = "base_model.model."
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
SHAPES = {Q: (8, 6), V: (4, 6)}
NEVER = "AWS_SECRET=hunter2\n"  # what a link out of a base folder must never put into an output


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _merged(base: Path, adapter: Path, module: str) -> np.ndarray:
    """W + (alpha / r) B @ A in float64, from the files (PEFT's merge, r = alpha here)."""
    w = load_file(str(base))[f"{module}.weight"].astype(np.float64)
    t = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    a = t[f"{PREFIX}{module}.lora_A.weight"].astype(np.float64)
    b = t[f"{PREFIX}{module}.lora_B.weight"].astype(np.float64)
    return w + cfg["lora_alpha"] / cfg["r"] * b @ a


def _kohya(path: Path) -> Path:
    """A kohya LoRA file of one module (a one-file adapter)."""
    return kohya_file(path, "lora_unet_down_blocks_0_attentions_0_proj_in", seed=7)


@pytest.fixture
def fx(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A Llama-named float32 base folder and two PEFT adapters on its q_proj and v_proj."""
    return _base(tmp_path / "base", SHAPES), _peft(tmp_path / "ad", SHAPES, 1), _peft(tmp_path / "ad2", SHAPES, 2)


# ----------------------------------------------------------------------------- 1: outputs of another kind

KIND_REFUSED = ("lorafuse replaces its earlier output without --overwrite only with one of the same kind (a re-run); "
                "nothing was written. Give another path, or pass --overwrite (Python: overwrite=True) to replace it")


def test_a_merged_model_folder_is_not_replaced_by_an_adapter_without_overwrite(fx, tmp_path, capsys):
    """`resize ... -o merged` (a mistyped -o) silently turned a merged checkpoint into an adapter: refused now,
    the model left byte for byte; with --overwrite replaced, saying so on stderr."""
    base, ad, _ = fx
    out = tmp_path / "merged"
    assert _run(capsys, "apply", base, ad, "-o", out, "-q")[0] == 0
    before = _tree(out)
    np.testing.assert_allclose(load_file(str(out / "model.safetensors"))[f"{Q}.weight"],
                               _merged(base / "model.safetensors", ad, Q), rtol=1e-6, atol=1e-6)
    code, _, err = _run(capsys, "resize", ad, "--rank", "1", "-o", out)
    assert code == 1
    assert (f"output {out} is an earlier lorafuse output holding a merged model (its lorafuse_manifest.json says kind "
            f"'checkpoint'), and this writes an adapter: {KIND_REFUSED}") in err, err
    assert _tree(out) == before
    code, _, err = _run(capsys, "resize", ad, "--rank", "1", "-o", out, "--overwrite", "-q")
    assert code == 0, err
    assert (f"note: --overwrite replaced {out}, an earlier lorafuse output holding a merged model (its "
            "lorafuse_manifest.json says kind 'checkpoint'), with an adapter") in err, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "lorafuse_manifest.json"]
    # and the other way round: a merged model over that adapter folder
    code, _, err = _run(capsys, "apply", base, ad, "-o", out)
    assert code == 1
    assert (f"output {out} is an earlier lorafuse output holding an adapter (its lorafuse_manifest.json says kind "
            f"'peft-adapter'), and this writes a merged model: {KIND_REFUSED}") in err, err


def test_a_merged_model_file_is_not_replaced_by_an_adapter_file(fx, tmp_path, capsys):
    """A merged single-file model (lorafuse.operation 'apply') silently became an 812-byte LoRA on convert."""
    base, ad, _ = fx
    out = tmp_path / "merged.safetensors"
    assert _run(capsys, "apply", base / "model.safetensors", ad, "-o", out, "-q")[0] == 0
    before = out.read_bytes()
    lora, kohya = _kohya(tmp_path / "in.safetensors"), tmp_path / "k.safetensors"
    assert _run(capsys, "resize", lora, "--rank", "1", "-o", kohya, "-q")[0] == 0  # a one-file adapter
    assert _run(capsys, "resize", lora, "--rank", "1", "-o", kohya, "-q")[0] == 0  # again: a re-run
    code, _, err = _run(capsys, "resize", lora, "--rank", "1", "-o", out)
    assert code == 1
    assert f"output {out} is an earlier lorafuse output, a merged model, and this writes an adapter: {KIND_REFUSED}" \
        in err, err
    assert out.read_bytes() == before
    code, _, err = _run(capsys, "apply", base / "model.safetensors", ad, "-o", kohya)
    assert code == 1
    assert f"output {kohya} is an earlier lorafuse output, an adapter, and this writes a merged model" in err, err


def test_a_shard_of_a_merged_folder_is_not_replaced_by_an_adapter_file(fx, tmp_path, capsys):
    base, ad, _ = fx
    out = tmp_path / "merged"
    assert _run(capsys, "apply", base, ad, "-o", out, "-q")[0] == 0
    shard = out / "model.safetensors"
    before = shard.read_bytes()
    code, _, err = _run(capsys, "resize", _kohya(tmp_path / "in.safetensors"), "--rank", "1", "-o", shard)
    assert code == 1
    assert (f"output {shard} is a file of the earlier lorafuse output {out}, a merged model, and this writes an "
            "adapter") in err, err
    assert shard.read_bytes() == before


def test_a_rerun_of_the_same_kind_needs_no_flag(fx, tmp_path, capsys):
    """What the rule is for: the same command again, or another command writing the same kind of output."""
    base, ad, ad2 = fx
    merged, adapter, one = tmp_path / "m", tmp_path / "a", tmp_path / "one.safetensors"
    for argv in (["apply", base, ad, "-o", merged], ["apply", base, ad2, "-o", merged],
                 ["resize", ad, "--rank", "1", "-o", adapter], ["combine", ad, ad2, "--rank", "2", "-o", adapter],
                 ["resize", _kohya(tmp_path / "in.safetensors"), "--rank", "1", "-o", one],
                 ["combine", tmp_path / "in.safetensors", tmp_path / "in.safetensors", "--rank", "2", "-o", one],
                 ["apply", base / "model.safetensors", ad, "-o", tmp_path / "m.safetensors"],
                 ["apply", base / "model.safetensors", ad2, "-o", tmp_path / "m.safetensors"]):
        code, _, err = _run(capsys, *argv, "-q")
        assert code == 0, (argv, err)
        assert "replaced" not in err
    np.testing.assert_allclose(load_file(str(merged / "model.safetensors"))[f"{V}.weight"],
                               _merged(base / "model.safetensors", ad2, V), rtol=1e-6, atol=1e-6)


def test_the_python_api_refuses_another_kind_and_warns_with_overwrite(fx, tmp_path):
    base, ad, _ = fx
    out = tmp_path / "merged"
    lorafuse.apply(base, [ad], out=out)
    before = _tree(out)
    with pytest.raises(OutputError, match="holding a merged model .* and this writes an adapter"):
        lorafuse.resize(ad, 1, out=out)
    with pytest.raises(OutputError, match="holding a merged model .* and this writes an adapter"):
        lorafuse.combine([ad, ad], rank=2).save(out)
    assert _tree(out) == before
    with pytest.warns(OverwriteWarning, match=f"overwrite=True replaced {out}, an earlier lorafuse output holding a "
                                              "merged model"):
        lorafuse.resize(ad, 1, out=out, overwrite=True)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()


def test_a_dry_run_says_what_overwrite_would_replace(fx, tmp_path, capsys):
    base, ad, _ = fx
    out = tmp_path / "merged"
    assert _run(capsys, "apply", base, ad, "-o", out, "-q")[0] == 0
    code, outp, err = _run(capsys, "resize", ad, "--rank", "1", "-o", out, "--dry-run", "--overwrite")
    assert code == 0, err
    assert (f"would replace: {out}, an earlier lorafuse output holding a merged model (its lorafuse_manifest.json "
            "says kind 'checkpoint'), with an adapter") in outp, outp
    assert (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- 2: side-file links out of the base


def _leaky(base: Path, outside: Path) -> None:
    """Links in the base folder: two out of it (absolute, relative), one inside it."""
    outside.mkdir()
    (outside / "credentials").write_text(NEVER)
    os.symlink(outside / "credentials", base / "generation_config.json")
    os.symlink(os.path.relpath(outside / "credentials", base), base / "special_tokens_map.json")
    (base / "real_tokenizer.json").write_text('{"vocab": {}}')
    os.symlink("real_tokenizer.json", base / "tokenizer.json")


def test_a_side_file_linking_out_of_the_base_folder_is_not_copied(fx, tmp_path, capsys):
    """apply copied ~/.aws/credentials into an output through `generation_config.json -> ...` (security)."""
    base, ad, _ = fx
    _leaky(base, tmp_path / "secret")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "apply", base, ad, "-o", out)
    assert code == 0, err
    secret = (tmp_path / "secret" / "credentials").resolve()
    for name in ("generation_config.json", "special_tokens_map.json"):
        assert not (out / name).exists()
        assert (f"note: {name} is a symbolic link to {secret}, outside {base}: not copied (lorafuse copies nothing "
                "from outside the base folder into an output; copy the file in if it belongs there)") in err, err
    assert (out / "tokenizer.json").read_text() == '{"vocab": {}}'  # a link inside the folder: copied as a file
    assert not (out / "tokenizer.json").is_symlink()
    assert all(NEVER.encode() not in data for data in _tree(out).values())
    np.testing.assert_allclose(load_file(str(out / "model.safetensors"))[f"{Q}.weight"],
                               _merged(base / "model.safetensors", ad, Q), rtol=1e-6, atol=1e-6)


def test_a_config_json_linking_out_is_not_written_even_when_updated(fx, tmp_path, capsys):
    """config.json rewritten for --dtype was read through the link and written out with the outside file's keys."""
    base, ad, _ = fx
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text(json.dumps({"model_type": "llama", "token": "hunter2"}))
    (base / "config.json").unlink()
    os.symlink(tmp_path / "elsewhere" / "config.json", base / "config.json")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "apply", base, ad, "-o", out, "--dtype", "bf16")
    assert code == 0, err
    assert not (out / "config.json").exists()
    assert "note: config.json is a symbolic link to" in err and "not copied" in err
    assert all(b"hunter2" not in data for data in _tree(out).values())


def test_a_hugging_face_snapshot_still_copies_its_blobs(fx, tmp_path, capsys):
    """The documented reason links are followed: a cache snapshot's files are links to ../../blobs/<sha>. Those
    stay copied; a snapshot link into another repository's blobs is not."""
    base, ad, _ = fx
    repo = tmp_path / "hub" / "models--org--base"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    other = tmp_path / "hub" / "models--evil--x" / "blobs"
    other.mkdir(parents=True)
    (other / "s").write_text(NEVER)
    files = {"model.safetensors": (base / "model.safetensors").read_bytes(), "config.json": b'{"model_type": "llama"}',
             "tokenizer.json": b'{"vocab": {"a": 0}}'}
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    os.symlink(os.path.relpath(other / "s", snap), snap / "generation_config.json")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "apply", snap, ad, "-o", out)
    assert code == 0, err
    assert (out / "tokenizer.json").read_bytes() == files["tokenizer.json"]
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama"}
    assert not (out / "generation_config.json").exists()
    assert f"generation_config.json is a symbolic link to {(other / 's').resolve()}, outside {snap}" in err, err


def test_a_pipeline_file_linking_out_is_not_copied(tmp_path, capsys):
    """A diffusers pipeline's other files go through copy_entry, its components' side files through the component:
    both followed any link. Links inside the pipeline folder stay copied."""
    h = 16
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "tokenizer").mkdir()
    (pipe / "scheduler").mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                       "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    w = np.random.default_rng(4).standard_normal((h, h)).astype(np.float32)
    save_file({"transformer_blocks.0.attn.to_out.0.weight": w},
              str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    (pipe / "scheduler" / "scheduler_config.json").write_text('{"shift": 3.0}')
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "credentials").write_text(NEVER)
    (tmp_path / "secret" / "auth.json").write_text('{"token": "hunter2"}')  # read as the component's config
    os.symlink(tmp_path / "secret" / "credentials", pipe / "tokenizer" / "vocab.json")
    os.symlink(tmp_path / "secret" / "auth.json", pipe / "transformer" / "config.json")
    os.symlink("../scheduler/scheduler_config.json", pipe / "tokenizer" / "merges.txt")  # inside the pipeline
    os.symlink("../scheduler/scheduler_config.json", pipe / "transformer" / "extra.json")
    rng = np.random.default_rng(5)
    down, up = rng.standard_normal((2, h)).astype(np.float32), rng.standard_normal((h, 2)).astype(np.float32)
    lora = tmp_path / "flux.safetensors"
    module = "lora_unet_double_blocks_0_img_attn_proj"
    save_file({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
               f"{module}.alpha": np.array(2.0, np.float32)}, str(lora))
    out = tmp_path / "out"
    code, _, err = _run(capsys, "apply", pipe, lora, "-o", out)
    assert code == 0, err
    secret = (tmp_path / "secret" / "credentials").resolve()
    assert not (out / "tokenizer" / "vocab.json").exists() and not (out / "transformer" / "config.json").exists()
    assert f"tokenizer/vocab.json is a symbolic link to {secret}, outside {pipe}: not copied" in err, err
    assert f"config.json is a symbolic link to {secret.parent / 'auth.json'}, outside {pipe}: not copied" in err, err
    assert (out / "tokenizer" / "merges.txt").read_text() == '{"shift": 3.0}'
    assert (out / "transformer" / "extra.json").read_text() == '{"shift": 3.0}'
    assert all(NEVER.encode() not in data and b"hunter2" not in data for data in _tree(out).values())
    got = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = w.astype(np.float64) + up.astype(np.float64) @ down.astype(np.float64)  # alpha / r = 1
    np.testing.assert_allclose(got["transformer_blocks.0.attn.to_out.0.weight"], want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 3: diffusers shard names


def test_resharding_a_diffusers_model_keeps_diffusers_names_and_diffusers_loads_it(tmp_path, capsys):
    """--max-shard-size on a diffusers model folder wrote model-0000N-of-... and model.safetensors.index.json,
    which diffusers' from_pretrained cannot find."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    unet.save_pretrained(tmp_path / "unet")
    state = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
    module = next(k for k in state if k.endswith("to_q.weight"))[: -len(".weight")]
    o, i = state[module + ".weight"].shape
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, i)).astype(np.float32), rng.standard_normal((o, 2)).astype(np.float32)
    ad = tmp_path / "ad"
    ad.mkdir()
    save_file({f"{PREFIX}{module}.lora_A.weight": a, f"{PREFIX}{module}.lora_B.weight": b},
              str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                        "target_modules": ["to_q"]}))
    out = tmp_path / "out"
    code, _, err = _run(capsys, "apply", tmp_path / "unet", ad, "-o", out, "--max-shard-size", "100KB", "-q")
    assert code == 0, err
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 1
    assert shards == [f"diffusion_pytorch_model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors.index.json").exists()
    loaded = diffusers.UNet2DModel.from_pretrained(out)
    got = {k: v.detach().numpy() for k, v in loaded.state_dict().items()}
    assert got.keys() == state.keys()
    for k, v in state.items():
        if k == module + ".weight":
            want = v.astype(np.float64) + 2.0 * b.astype(np.float64) @ a.astype(np.float64)
            np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-6)
        else:
            assert np.array_equal(got[k], v), k


def test_resharding_a_transformers_model_keeps_transformers_names(fx, tmp_path, capsys):
    base, ad, _ = fx
    out = tmp_path / "out"
    code, _, err = _run(capsys, "apply", base, ad, "-o", out, "--max-shard-size", "64KiB", "-q")
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and not list(out.glob("diffusion_pytorch_model*"))


# ----------------------------------------------------------------------------- 5: shard names in an index


def _sharded(folder: Path, name: str) -> Path:
    """A base of two shards whose index names the first `name` (the file is there under that name)."""
    rng = np.random.default_rng(99)
    q, v = rng.standard_normal(SHAPES[Q]).astype(np.float32), rng.standard_normal(SHAPES[V]).astype(np.float32)
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{Q}.weight": q}, str(folder / name))
    save_file({f"{V}.weight": v}, str(folder / "model-2.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {f"{Q}.weight": name, f"{V}.weight": "model-2.safetensors"}}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


@pytest.mark.parametrize("name, why", [
    ("README.md", "is not a .safetensors file name (shards are FILE.safetensors)"),
    ("lorafuse_manifest.json", "is not a .safetensors file name (shards are FILE.safetensors)"),
    ("*", "is not a .safetensors file name (shards are FILE.safetensors)"),
    ("sub/x.safetensors", "is not a file name in the index's folder (a path, '.' or '..')"),
])
def test_a_shard_named_other_than_file_safetensors_is_refused(fx, tmp_path, capsys, name, why):
    """A shard called README.md was merged, then replaced in the output by the model card (and
    lorafuse_manifest.json by the manifest): the output's index named a file that was not the shard."""
    _, ad, _ = fx
    base = _sharded(tmp_path / "sh", name)
    out = tmp_path / "o"
    code, _, err = _run(capsys, "apply", base, ad, "-o", out)
    assert code == 1
    assert f"FormatError: {base / 'model.safetensors.index.json'}: shard {name!r} {why}" in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------- 7: gguf head counts


@pytest.mark.parametrize("config, missing", [
    ({"model_type": "llama"}, "num_attention_heads and no num_key_value_heads"),
    ({"model_type": "llama", "num_key_value_heads": 2}, "num_attention_heads"),
])
def test_gguf_names_the_base_config_that_lacks_the_head_counts(fx, tmp_path, capsys, config, missing):
    """`pass --base-config BASE/config.json` was said to a user who had passed it."""
    pytest.importorskip("gguf")
    _, ad, _ = fx
    cfg = tmp_path / "cfg" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(config))
    out = tmp_path / "j.gguf"
    code, _, err = _run(capsys, "convert", ad, "--to", "gguf", "--base-config", cfg, "-o", out)
    assert code == 1
    assert (f"FormatError: {ad}: {Q!r}: llama.cpp's converter permutes the rows of q_proj / k_proj for llama models, "
            f"which needs the head counts, and the base config {cfg} has no {missing} (nor in a text_config): give "
            "the base model's own config.json, which states them") in err, err
    assert "pass --base-config" not in err
    assert not out.exists()


# ----------------------------------------------------------------------------- 8: peft_type spelling


def test_a_lower_case_peft_type_is_said_to_be_one_peft_cannot_load(fx, capsys):
    _, ad, _ = fx
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "lora"}))
    from peft import PeftConfig

    with pytest.raises(KeyError, match="lora"):  # the reference: PEFT cannot load it at all
        PeftConfig.from_pretrained(str(ad))
    with pytest.raises(FormatError) as e:
        lorafuse.load(ad)
    assert str(e.value) == (f"{ad / 'adapter_config.json'}: peft_type 'lora' is not PEFT's spelling 'LORA', so PEFT "
                            "cannot load this config (PeftConfig.from_pretrained raises KeyError: 'lora'): write "
                            '"peft_type": "LORA" in it')
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "ia3"}))
    with pytest.raises(UnsupportedError, match=r"peft_type 'ia3' is not PEFT's spelling 'IA3', so PEFT cannot load "
                                               r"this config .*; and spelt 'IA3' it would not be a LoRA adapter"):
        lorafuse.load(ad)
    code, _, err = _run(capsys, "info", ad)
    assert code == 1 and "this is a ia3 adapter" not in err and "is not PEFT's spelling 'IA3'" in err


# ----------------------------------------------------------------------------- 9: plots inside an input folder


def test_plots_inside_an_adapter_folder_are_refused_before_any_work(fx, capsys):
    """similarity --plot wrote into the folder of an adapter given as its file; info --spectrum refused the same
    path only after printing its table."""
    _, ad, ad2 = fx
    weights = ad / "adapter_model.safetensors"
    plot = ad / "x.png"
    why = f"output {plot} is inside the input folder {ad}; writing there would change an input"
    code, out, err = _run(capsys, "similarity", weights, ad2, "--plot", plot)
    assert code == 1 and why in err, err
    assert out == ""
    code, out, err = _run(capsys, "info", weights, "--spectrum", plot)
    assert code == 1 and why in err, err
    assert out == ""  # refused before the table
    from lorafuse.plot import plot_similarity

    with pytest.raises(OutputError, match="is inside the input folder"):
        plot_similarity(np.eye(2), ["a", "b"], plot, [weights])
    assert sorted(p.name for p in ad.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ----------------------------------------------------------------------------- 10: Hub shard names as patterns


@pytest.fixture
def remote(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A stand-in for huggingface_hub.snapshot_download over a repository of files: it copies the files the patterns
    match (fnmatch, as huggingface_hub's) into one snapshot and records each call's patterns."""
    import fnmatch

    home = tmp_path / "home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    calls: list[list[str]] = []
    files: dict[str, bytes] = {}
    snapshot = tmp_path / "models--org--repo" / "snapshots" / ("5" * 40)

    def fake(repo_id, **kw):  # type: ignore[no-untyped-def]
        calls.append(list(kw["allow_patterns"]))
        for name, data in files.items():
            if any(fnmatch.fnmatch(name, p) for p in kw["allow_patterns"]):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                (snapshot / name).write_bytes(data)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return files, calls


GLOB = "holds a pattern character (* ? [ ]), which would download other files of the repository"


@pytest.mark.parametrize("shard, why", [("*", "is not a .safetensors file name (shards are FILE.safetensors)"),
                                        ("model-?.safetensors", GLOB), ("model-[1].safetensors", GLOB)])
def test_a_hub_index_naming_a_pattern_is_refused_before_downloading_it(remote, shard, why):
    """A shard named '*' was passed on as a download pattern: the whole repository (pickles, GGUFs) came."""
    files, calls = remote
    files.update({"config.json": b"{}", "model.safetensors.index.json": json.dumps(
        {"weight_map": {"a": shard}}).encode(), "model-1.safetensors": b"1", "evil.bin": b"pickle",
        "other.gguf": b"GGUF"})
    with pytest.raises(FormatError) as e:
        hub.local_path("org/repo", what="base model")
    assert str(e.value).endswith(f"model.safetensors.index.json: shard {shard!r} {why}; nothing more was downloaded")
    assert len(calls) == 1 and shard not in calls[0]  # the small files only: no second call with the shard name
    fetched = {p.name for p in Path(".").rglob("*") if p.is_file()}
    assert fetched == {"config.json", "model.safetensors.index.json"}


def test_a_hub_index_naming_a_path_is_refused_not_dropped(remote):
    """Names with '/' or '..' were dropped silently and the rest downloaded; the checkpoint refused the index only
    afterwards. Refused first now, naming the index and the shard."""
    files, calls = remote
    files.update({"config.json": b"{}", "model.safetensors.index.json": json.dumps(
        {"weight_map": {"a": "../evil.safetensors", "c": "model-1.safetensors"}}).encode(),
        "model-1.safetensors": b"1"})
    with pytest.raises(FormatError, match=r"model.safetensors.index.json: shard '../evil.safetensors' is not a file "
                                          r"name in the index's folder"):
        hub.local_path("org/repo", what="base model")
    assert len(calls) == 1


# ----------------------------------------------------------------------------- 11: LORAFUSE_BACKEND


def test_an_unknown_lorafuse_backend_is_refused(fx, tmp_path, capsys, monkeypatch):
    """LORAFUSE_BACKEND=bogus was ignored (the CPU core ran), while LORAFUSE_ISA=bogus is an error."""
    base, ad, _ = fx
    monkeypatch.setenv("LORAFUSE_BACKEND", "bogus")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "apply", base, ad, "-o", out)
    assert code == 2
    assert err.strip() == ("lorafuse: error: LORAFUSE_BACKEND: unknown backend 'bogus': choose one of auto, cpu, "
                           "reference, cuda (or leave it unset)")
    assert not out.exists()
    with pytest.raises(LorafuseValueError, match="LORAFUSE_BACKEND: unknown backend 'bogus'"):
        lorafuse.apply(base, [ad], out=out)
    assert not out.exists()
    monkeypatch.setenv("LORAFUSE_BACKEND", " Reference ")  # the names it takes, as before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorafuse.apply(base, [ad], out=out)
    np.testing.assert_allclose(load_file(str(out / "model.safetensors"))[f"{Q}.weight"],
                               _merged(base / "model.safetensors", ad, Q), rtol=1e-6, atol=1e-6)
