"""Red-team round 7, leftovers of round 6.

- fan_in_fan_out=true: refused in a diffusers file's metadata, and a PEFT adapter carrying it on torch Linear
  layers (which PEFT ignores there) could not be combined or compared with one without it, nor written as a
  kohya / diffusers file;
- a kohya `.alpha` stored as 0 (alpha = rank) or with shape [1] came back as a scalar of the rank;
- `lorafuse -- info x`: the leading `--` was taken for the COMMAND;
- the Python API's OverwriteWarning and errors named the CLI's --overwrite, not overwrite=True;
- an OSError raised by a user's progress callback was reported as a write error of the output;
- `info` of a merged pipeline showed the record of the first component holding one: an untouched, copied
  component's older record;
- similarity refused adapters whose squared norm overflows float64 (computed scaled now);
- `info` showed a LoHa's / LoKr's rank as its exact factorization's, not LyCORIS's dim;
- before Python 3.13 every loaded adapter held a file descriptor: thousands of small adapters hit EMFILE.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from lycoris_fixtures import modules, network, save
from redteam_fixtures import PREFIX, peft_folder, run_cli
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import OutputError, OverwriteWarning

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

UNET = "unet.down_blocks.0.attentions.0.proj_in"
KOHYA = "lora_unet_down_blocks_0_attentions_0_proj_in"
Q = "model.layers.0.self_attn.q_proj"


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


# ----------------------------------------------------------------------------- 1. fan_in_fan_out
def _diffusers_fan_in_fan_out(path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((6, 2)).astype(np.float32)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 4, "unet.fan_in_fan_out": True})}
    save_file({f"{UNET}.lora_A.weight": a, f"{UNET}.lora_B.weight": b}, str(path), metadata=meta)
    return path, 2.0 * (b.astype(np.float64) @ a.astype(np.float64))  # alpha / r = 2, (out x in) as nn.Linear


def test_peft_resets_fan_in_fan_out_on_a_torch_linear() -> None:
    """The reference: PEFT warns and ignores fan_in_fan_out=true on nn.Linear (its delta is out x in)."""
    import torch
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 6, bias=False)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, fan_in_fan_out=True, target_modules=["proj"]))
    assert any("Setting fan_in_fan_out to False" in str(w.message) for w in seen)
    layer = model.base_model.model.proj
    assert layer.fan_in_fan_out is False
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    assert tuple(layer.get_delta_weight("default").shape) == (6, 8)


def test_diffusers_file_with_fan_in_fan_out_reads_as_peft_does(tmp_path: Path) -> None:
    path, delta = _diffusers_fan_in_fan_out(tmp_path / "d.safetensors")
    u = lorafuse.load(path).updates[UNET]
    np.testing.assert_allclose(u.delta(), delta, rtol=1e-6)
    out = tmp_path / "k.safetensors"
    assert main(["convert", str(path), "--to", "kohya", "-o", str(out), "-q"]) == 0
    t = _tensors(out)
    alpha = float(t[f"{KOHYA}.alpha"])
    got = alpha / 2 * (t[f"{KOHYA}.lora_up.weight"].astype(np.float64) @ t[f"{KOHYA}.lora_down.weight"])
    np.testing.assert_allclose(got, delta, rtol=1e-6)


def _llama_pair(tmp: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    shapes = {Q: (8, 6)}
    a = peft_folder(tmp / "a", shapes, 1, extra={"fan_in_fan_out": True})  # a Linear: PEFT ignores the flag
    b = peft_folder(tmp / "b", shapes, 2)
    deltas = {}
    for name, p in (("a", a), ("b", b)):
        t = _tensors(p / "adapter_model.safetensors")
        deltas[name] = t[f"{PREFIX}{Q}.lora_B.weight"].astype(np.float64) @ t[f"{PREFIX}{Q}.lora_A.weight"]
    return a, b, deltas


def test_similarity_of_fan_in_fan_out_adapter_on_a_linear(tmp_path: Path) -> None:
    a, b, d = _llama_pair(tmp_path)
    cos = float(np.sum(d["a"] * d["b"]) / np.linalg.norm(d["a"]) / np.linalg.norm(d["b"]))
    got = lorafuse.similarity([a, b])
    assert got[0, 1] == pytest.approx(cos, abs=1e-6), (got, cos)


@pytest.mark.parametrize("engine", ["memory", "stream"])
def test_combine_fan_in_fan_out_adapter_with_a_plain_one(tmp_path: Path, engine: str) -> None:
    a, b, d = _llama_pair(tmp_path)
    out = tmp_path / "out"
    assert main(["combine", str(a), str(b), "--rank", "4", "--engine", engine, "-o", str(out), "-q"]) == 0
    t = _tensors(out / "adapter_model.safetensors")
    cfg = json.loads((out / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    got = scale * (t[f"{PREFIX}{Q}.lora_B.weight"].astype(np.float64) @ t[f"{PREFIX}{Q}.lora_A.weight"])
    np.testing.assert_allclose(got, d["a"] + d["b"], rtol=1e-5, atol=1e-5)


def test_apply_fan_in_fan_out_peft_adapter_to_a_diffusers_model(tmp_path: Path) -> None:
    """A diffusers model's config.json names no model_type, but its layers are torch Linear (never a Conv1D): a
    square layer is not refused as 'Linear or Conv1D?'."""
    module = "down_blocks.0.attentions.0.proj_in"
    unet = tmp_path / "unet"
    unet.mkdir()
    w = np.random.default_rng(5).standard_normal((8, 8)).astype(np.float32)
    save_file({f"{module}.weight": w}, str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                  "_diffusers_version": "0.30.0"}))
    a = peft_folder(tmp_path / "a", {module: (8, 8)}, 1, extra={"fan_in_fan_out": True})
    t = _tensors(a / "adapter_model.safetensors")
    delta = t[f"{PREFIX}{module}.lora_B.weight"].astype(np.float64) @ t[f"{PREFIX}{module}.lora_A.weight"]
    code, _, err = run_cli(["apply", str(unet), str(a), "-o", str(tmp_path / "m"), "-q"])
    assert code == 0, err
    got = _tensors(tmp_path / "m" / "diffusion_pytorch_model.safetensors")[f"{module}.weight"]
    np.testing.assert_allclose(got, w + delta, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 2. kohya .alpha as stored
@pytest.mark.parametrize("alpha", [np.array(0.0, np.float32), np.array([2.0], np.float32),
                                   np.array([0.0], np.float16), np.array([[3.0]], np.float32)])
def test_kohya_alpha_comes_back_as_stored(tmp_path: Path, alpha: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    src = {f"{KOHYA}.lora_down.weight": rng.standard_normal((2, 8)).astype(np.float32),
           f"{KOHYA}.lora_up.weight": rng.standard_normal((8, 2)).astype(np.float32), f"{KOHYA}.alpha": alpha}
    path = tmp_path / "in.safetensors"
    save_file(src, str(path))
    before = lorafuse.load(path).updates[KOHYA].delta()
    outs = [tmp_path / "c.safetensors", tmp_path / "r.safetensors", tmp_path / "p.safetensors",
            tmp_path / "pk.safetensors"]
    assert main(["convert", str(path), "--to", "kohya", "-o", str(outs[0]), "-q"]) == 0
    assert main(["resize", str(path), "--rank", "2", "-o", str(outs[1]), "-q"]) == 0
    assert main(["convert", str(path), "--to", "peft", "-o", str(outs[2]), "-q"]) == 0
    assert main(["convert", str(outs[2]), "--to", "kohya", "-o", str(outs[3]), "-q"]) == 0
    for out in (outs[0], outs[1], outs[3]):
        t = _tensors(out)
        got = t[f"{KOHYA}.alpha"]
        assert (got.shape, got.dtype, got.tobytes()) == (alpha.shape, alpha.dtype, alpha.tobytes()), (out, got)
        np.testing.assert_allclose(lorafuse.load(out).updates[KOHYA].delta(), before, rtol=1e-5, atol=1e-6)
    for out in (outs[0], outs[3]):  # convert: every tensor as it was
        t = _tensors(out)
        assert all(np.array_equal(t[k], v) and t[k].dtype == v.dtype for k, v in src.items()), out


def test_kohya_zero_alpha_after_a_rank_change_still_means_the_rank(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    src = {f"{KOHYA}.lora_down.weight": rng.standard_normal((4, 8)).astype(np.float32),
           f"{KOHYA}.lora_up.weight": rng.standard_normal((8, 4)).astype(np.float32),
           f"{KOHYA}.alpha": np.array(0.0, np.float32)}
    path = tmp_path / "in.safetensors"
    save_file(src, str(path))
    out = tmp_path / "r.safetensors"
    assert main(["resize", str(path), "--rank", "2", "-o", str(out), "-q"]) == 0
    t = _tensors(out)
    alpha = float(t[f"{KOHYA}.alpha"])
    scale = 1.0 if alpha == 0 else alpha / 2  # kohya's sd-scripts: alpha 0 (or none) means alpha = rank
    got = scale * (t[f"{KOHYA}.lora_up.weight"].astype(np.float64) @ t[f"{KOHYA}.lora_down.weight"])
    d = src[f"{KOHYA}.lora_up.weight"].astype(np.float64) @ src[f"{KOHYA}.lora_down.weight"]
    u, s, vt = np.linalg.svd(d)
    np.testing.assert_allclose(got, (u[:, :2] * s[:2]) @ vt[:2], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- 3. lorafuse -- COMMAND
def test_double_dash_before_the_command(tmp_path: Path) -> None:
    path = peft_folder(tmp_path / "a", {Q: (8, 6)}, 1)
    plain = run_cli(["info", str(path)])
    dashed = run_cli(["--", "info", str(path)])
    assert plain[0] == 0 and dashed == plain, dashed
    code, _, err = run_cli(["--", "--version"])
    assert code == 2 and "'--version'" in err and "invalid choice: '--'" not in err, err
    out = tmp_path / "c"
    code, _, err = run_cli(["--", "combine", str(path), str(path), "--weights", "-0.5,1", "--dry-run", "-o", str(out)])
    assert code == 0, err


# ----------------------------------------------------------------------------- 4. overwrite=True in the API
def test_python_api_names_its_keyword_not_the_cli_flag(tmp_path: Path) -> None:
    a = peft_folder(tmp_path / "a", {Q: (8, 6)}, 1)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "x.txt").write_text("x")
    with pytest.raises(OutputError) as e:
        lorafuse.resize(a, 1, out=mine)
    assert "--overwrite" not in str(e.value) and "overwrite=True" in str(e.value), str(e.value)
    with pytest.warns(OverwriteWarning) as seen:
        lorafuse.resize(a, 1, out=mine, overwrite=True)
    texts = [str(w.message) for w in seen if issubclass(w.category, OverwriteWarning)]
    assert texts and all("--overwrite" not in t and t.startswith(f"overwrite=True replaced {mine}") for t in texts)
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(OutputError) as e:
        lorafuse.resize(a, 1, out=f, overwrite=True)
    assert "--overwrite" not in str(e.value) and "even with overwrite=True" in str(e.value), str(e.value)
    mine2 = tmp_path / "mine2"
    mine2.mkdir()
    (mine2 / "x.txt").write_text("x")
    code, _, err = run_cli(["resize", str(a), "--rank", "1", "-o", str(mine2), "--overwrite"])
    assert code == 0 and f"note: --overwrite replaced {mine2}" in err, err


# ----------------------------------------------------------------------------- 5. a progress callback's OSError
def test_progress_callback_oserror_is_passed_on_as_it_is(tmp_path: Path) -> None:
    shapes = {"model.layers.0.self_attn.o_proj": (8, 6)}
    a = peft_folder(tmp_path / "a", shapes, 1)
    base = tmp_path / "base"
    base.mkdir()
    save_file({f"{m}.weight": np.ones(s, np.float32) for m, s in shapes.items()}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    raised = OSError(28, "No space left on device", "/var/log/my-progress.log")

    def callback(event: object) -> None:
        raise raised

    with pytest.raises(OSError) as e:
        lorafuse.apply(base, [a], out=tmp_path / "m", progress=callback)
    assert e.value is raised and not isinstance(e.value, OutputError)
    assert not (tmp_path / "m").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]  # no temporary output left


# ----------------------------------------------------------------------------- 6. info of a merged pipeline
def _pipeline(folder: Path) -> Path:
    folder.mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    rng = np.random.default_rng(0)
    for comp, key, file in (("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", "model.safetensors"),
                            ("unet", "down_blocks.0.attentions.0.proj_in", "diffusion_pytorch_model.safetensors"),
                            ("vae", "encoder.conv_in", "diffusion_pytorch_model.safetensors")):
        (folder / comp).mkdir()
        save_file({f"{key}.weight": rng.standard_normal((8, 8)).astype(np.float32)}, str(folder / comp / file))
        (folder / comp / "config.json").write_text("{}")
    return folder


def _diffusers_lora(path: Path, module: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    save_file({f"{module}.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
               f"{module}.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32)}, str(path))
    return path


def test_info_of_a_merged_pipeline_shows_the_last_runs_record(tmp_path: Path) -> None:
    pipe = _pipeline(tmp_path / "pipe")
    te = _diffusers_lora(tmp_path / "te.safetensors", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 1)
    un = _diffusers_lora(tmp_path / "un.safetensors", UNET, 2)
    assert main(["apply", str(pipe), str(te), "-o", str(tmp_path / "p1"), "-q"]) == 0
    assert main(["apply", str(tmp_path / "p1"), str(un), "-o", str(tmp_path / "p2"), "-q"]) == 0
    with safe_open(str(tmp_path / "p2" / "text_encoder" / "model.safetensors"), "np") as f:
        assert str(te) in f.metadata()["lorafuse.command"]  # the untouched component: copied, its old record
    d = lorafuse.describe(tmp_path / "p2")
    made = d["provenance"]
    assert made is not None and str(un) in made["command"] and str(te) not in made["command"], made
    code, out, _ = run_cli(["info", str(tmp_path / "p2")])
    assert code == 0 and str(un) in out, out


# ----------------------------------------------------------------------------- 7. similarity, scaled
def test_similarity_of_adapters_whose_squared_norm_overflows(tmp_path: Path) -> None:
    shapes = {Q: (8, 6), "model.layers.0.self_attn.v_proj": (8, 6)}
    paths = [peft_folder(tmp_path / "a", shapes, 1, alpha=1e299), peft_folder(tmp_path / "b", shapes, 2, alpha=1e-300),
             peft_folder(tmp_path / "c", shapes, 3)]
    flat = []
    for p in paths:
        t = _tensors(p / "adapter_model.safetensors")
        flat.append(np.concatenate([(t[f"{PREFIX}{m}.lora_B.weight"].astype(np.float64) @
                                     t[f"{PREFIX}{m}.lora_A.weight"]).ravel() for m in shapes]))
    ref = np.array([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in flat] for x in flat])
    np.testing.assert_allclose(lorafuse.similarity(paths), ref, rtol=1e-9, atol=1e-12)
    code, out, err = run_cli(["similarity", *map(str, paths)])
    assert code == 0, err


# ----------------------------------------------------------------------------- 8. info: LyCORIS's dim
@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_info_shows_lycoris_dim_as_the_rank(tmp_path: Path, algo: str) -> None:
    kwargs = {"factor": 4} if algo == "lokr" else {}
    _, net = network(algo, linear_dim=4, linear_alpha=2, **kwargs)
    path = save(net, tmp_path / f"{algo}.safetensors")
    d = lorafuse.describe(path)
    by_name = {m["name"]: m for m in d["module_details"]}
    for name, lora in modules(net).items():
        full = algo == "lokr" and lora.use_w1 and lora.use_w2  # LyCORIS's full matrix mode: scale 1, no dim
        assert by_name[name]["rank"] == (None if full else lora.lora_dim), (name, by_name[name])
        assert by_name[name]["scale"] == pytest.approx(float(lora.scale)), name


# ----------------------------------------------------------------------------- 9. file descriptors
_LOAD_MANY = """
import os, resource, sys
from pathlib import Path
import lorafuse
paths = sorted(Path(sys.argv[1]).glob("*.safetensors"))
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
held = [lorafuse.load(p) for p in paths]
print(len(held), len(os.listdir("/proc/self/fd")))
print(sum(float(a.updates["lora_unet_down_blocks_0_attentions_0_proj_in"].A.f32()[0, 0]) for a in held))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_NOFILE and /proc/self/fd")
def test_many_small_loaded_adapters_hold_no_descriptor(tmp_path: Path) -> None:
    n = 400
    for i in range(n):
        save_file({f"{KOHYA}.lora_down.weight": np.full((1, 4), i, np.float32),
                   f"{KOHYA}.lora_up.weight": np.ones((4, 1), np.float32)}, str(tmp_path / f"a{i:04d}.safetensors"))
    proc = subprocess.run([sys.executable, "-c", _LOAD_MANY, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, fds = proc.stdout.split()[:2]
    assert int(count) == n and int(fds) <= 128
    assert float(proc.stdout.split()[2]) == sum(range(n))  # every adapter's own tensors
