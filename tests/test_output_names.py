"""What an output's name means (issue #18, "The output's name is ignored"), for every verb that writes.

* Adapter outputs (combine, resize, convert, extract): a name ending in .safetensors is one file. PEFT
  inputs (a folder format) given such a name are written as a one-file format that can name their
  modules (a diffusers LoRA file for `unet.` names), or refused before any work naming the path and
  what to give instead; `--format peft` with such a name is refused. A one-file format given a name
  ending in / (or an existing folder) writes a file inside it, never a file named like the folder.
* apply: a .safetensors name with a checkpoint folder base is one file holding every tensor (a note lists
  the folder's files it cannot hold; refused when config.json must change with the weights, with
  --max-shard-size, and for a diffusers pipeline base); a file base with `-o dir/` writes dir/<base name>.
* --plot / --spectrum: the suffix chooses the image format (.png, .svg, .pdf, .jpg, .jpeg), checked by the
  file's magic bytes; another suffix, or none, is refused before any work. A plot lorafuse wrote is
  recognised and replaced by the next run; an altered one is not.
* An output inside an input folder is refused for every verb, however the path is spelled (a link to the
  folder, `..`, the input named through a link), and so is an output that holds what the links in an
  input folder lead to (a Hugging Face snapshot's blobs), even with --overwrite.

Independent references: outputs are read with the `safetensors` package, merged and combined deltas are
compared with numpy float64 arithmetic on the inputs' factors, image files by their magic bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from lorafuse.cli import main
from lorafuse.plot import plot_similarity

MARK = "lorafuse_version"
PEFT_PREFIX = "base_model.model."
LLM = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.mlp.up_proj": (16, 10)}
UNET = {"unet.down_blocks.0.attentions.0.proj_in": (8, 8), "unet.mid_block.attentions.0.proj_out": (8, 6)}
FLUX_MODULE = "lora_unet_double_blocks_0_img_attn_proj"  # -> transformer_blocks.0.attn.to_out.0 (H x H)
H = 16
MAGIC = {".png": (b"\x89PNG",), ".svg": (b"<svg", b"<?xml"), ".pdf": (b"%PDF",), ".jpg": (b"\xff\xd8",),
         ".jpeg": (b"\xff\xd8",)}


# ----------------------------------------------------------------------------- inputs


def peft(path: Path, modules: dict[str, tuple[int, int]], seed: int, r: int = 4,
         alpha: float = 8.0) -> dict[str, np.ndarray]:
    """A PEFT LoRA folder; returns each module's delta, (alpha / r) B @ A in float64."""
    g = np.random.default_rng(seed)
    path.mkdir(parents=True)
    tensors, deltas = {}, {}
    for name, (o, i) in modules.items():
        a = (g.standard_normal((r, i)) * 0.1).astype(np.float32)
        b = (g.standard_normal((o, r)) * 0.1).astype(np.float32)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        deltas[name] = alpha / r * (b.astype(np.float64) @ a.astype(np.float64))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha,
         "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules})}))
    return deltas


def flux_lora(path: Path, seed: int, rank: int = 2, alpha: float = 1.0) -> np.ndarray:
    """A kohya Flux LoRA file of one module; returns its delta (alpha / rank) up @ down in float64."""
    g = np.random.default_rng(seed)
    down = g.standard_normal((rank, H)).astype(np.float32)
    up = g.standard_normal((H, rank)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{FLUX_MODULE}.lora_down.weight": down, f"{FLUX_MODULE}.lora_up.weight": up,
               f"{FLUX_MODULE}.alpha": np.array(alpha, np.float32)}, str(path))
    return alpha / rank * (up.astype(np.float64) @ down.astype(np.float64))


def llm_weights(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    w = {f"{n}.weight": g.standard_normal(s).astype(np.float32) for n, s in LLM.items()}
    w["model.embed_tokens.weight"] = g.standard_normal((32, 10)).astype(np.float32)
    w["model.norm.weight"] = np.ones(10, np.float32)
    return w


def sharded_checkpoint(path: Path, weights: dict[str, np.ndarray], config: dict[str, object]) -> Path:
    """A transformers checkpoint folder in two shards with their index, config.json and a tokenizer file."""
    path.mkdir(parents=True)
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(path / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())},
             "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text("{}")
    return path


def flux_pipeline(path: Path) -> Path:
    """A diffusers pipeline folder (model_index.json + transformer/)."""
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                       "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    (path / "transformer").mkdir()
    save_file({"transformer_blocks.0.attn.to_out.0.weight": np.random.default_rng(4).standard_normal((H, H))
               .astype(np.float32)}, str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
    return path


# ----------------------------------------------------------------------------- reading outputs


def tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def diffusers_deltas(path: Path) -> dict[str, np.ndarray]:
    """The deltas of a diffusers LoRA file, as diffusers reads it: B @ A times lora_alpha / r of the
    component's LoraConfig in the lora_adapter_metadata entry (no per-module patterns here)."""
    ts, meta = tensors(path)
    cfg = json.loads(meta["lora_adapter_metadata"])
    out = {}
    for key in ts:
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            comp = module.split(".", 1)[0]
            assert not cfg.get(f"{comp}.rank_pattern") and not cfg.get(f"{comp}.alpha_pattern")
            scale = float(cfg[f"{comp}.lora_alpha"]) / float(cfg[f"{comp}.r"])
            out[module] = scale * (ts[f"{module}.lora_B.weight"].astype(np.float64)
                                   @ ts[key].astype(np.float64))
    return out


def kohya_deltas(path: Path) -> dict[str, np.ndarray]:
    ts, _ = tensors(path)
    out = {}
    for key in ts:
        if key.endswith(".lora_down.weight"):
            module = key.removesuffix(".lora_down.weight")
            down, up = ts[key].astype(np.float64), ts[f"{module}.lora_up.weight"].astype(np.float64)
            alpha = float(ts[f"{module}.alpha"]) if f"{module}.alpha" in ts else down.shape[0]
            out[module] = alpha / down.shape[0] * (up @ down)
    return out


def is_safetensors_file(path: Path) -> bool:
    """A regular file that starts with safetensors' 8-byte header length and a JSON object."""
    if not path.is_file():
        return False
    head = path.read_bytes()[:9]
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, 'dir' for folders, the target of links."""
    out: dict[str, str] = {}
    for p in sorted([root, *root.rglob("*")]):
        rel = str(p.relative_to(root))
        out[rel] = ("link:" + os.readlink(p) if p.is_symlink() else "dir" if p.is_dir()
                    else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def no_work(monkeypatch: pytest.MonkeyPatch, module: str, name: str) -> None:
    """Make the verb's work raise: a refusal must come before it."""
    import importlib

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the work started")

    monkeypatch.setattr(importlib.import_module(module), name, boom)


# ----------------------------------------------------------------------------- adapter outputs


def test_combine_peft_inputs_into_a_safetensors_name_write_one_diffusers_file(tmp_path, capsys):
    da = peft(tmp_path / "a", UNET, 1)
    db = peft(tmp_path / "b", UNET, 2, r=2, alpha=3.0)
    out = tmp_path / "comb.safetensors"
    code, stdout, err = run(capsys, "combine", tmp_path / "a", tmp_path / "b", "--weights", "1,-0.5",
                            "--method", "cat", "-o", out)
    assert code == 0, err
    assert is_safetensors_file(out)  # one file, not a PEFT folder named comb.safetensors
    assert f"note: {out} ends in .safetensors: written as one diffusers LoRA file" in err
    assert f"wrote {out} " in stdout
    got = diffusers_deltas(out)
    assert set(got) == set(UNET)
    for name in UNET:
        np.testing.assert_allclose(got[name], da[name] - 0.5 * db[name], rtol=1e-5, atol=1e-7)
    assert tensors(out)[1][MARK]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "comb.safetensors"]


def test_combine_peft_inputs_no_file_format_can_name_are_refused_before_the_work(tmp_path, capsys, monkeypatch):
    peft(tmp_path / "a", LLM, 1)
    peft(tmp_path / "b", LLM, 2)
    no_work(monkeypatch, "lorafuse.ops.combine", "combine_to")
    out = tmp_path / "comb.safetensors"
    code, _, err = run(capsys, "combine", tmp_path / "a", tmp_path / "b", "-o", out)
    assert code == 2, err
    assert err.startswith(f"lorafuse combine: error: output {out} ends in .safetensors, which names one file, "
                          "but a peft adapter is a folder")
    assert "diffusers: " in err and "kohya: " in err and "model.layers.0" in err
    assert err.rstrip().endswith(f"give a folder name, e.g. {tmp_path / 'comb'}")
    assert not out.exists()
    monkeypatch.undo()
    code, _, err = run(capsys, "combine", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "comb", "-q")
    assert code == 0 and (tmp_path / "comb" / "adapter_config.json").is_file(), err  # what the error said to do


def test_an_explicit_folder_format_with_a_safetensors_name_is_refused(tmp_path, capsys, monkeypatch):
    peft(tmp_path / "a", UNET, 1)  # a diffusers file could name these: the refusal is --format's
    no_work(monkeypatch, "lorafuse.ops.combine", "combine_to")
    out = tmp_path / "x.SafeTensors"
    code, _, err = run(capsys, "combine", tmp_path / "a", "--format", "peft", "-o", out)
    assert code == 2
    assert (f"output {out} ends in .safetensors, which names one file, but --format peft writes a folder holding "
            "adapter_config.json and adapter_model.safetensors: give a folder name") in err
    assert not out.exists()


@pytest.mark.parametrize("trailing", ["/", ""], ids=["slash", "existing-folder"])
def test_a_one_file_format_given_a_folder_writes_a_file_inside_it(tmp_path, capsys, trailing):
    d1 = flux_lora(tmp_path / "in" / "style.safetensors", 1)
    d2 = flux_lora(tmp_path / "in" / "detail.safetensors", 2, rank=3, alpha=2.0)
    outdir = tmp_path / "outdir"
    if not trailing:
        outdir.mkdir()
    code, stdout, err = run(capsys, "combine", tmp_path / "in" / "style.safetensors",
                            tmp_path / "in" / "detail.safetensors", "--method", "cat", "-o", f"{outdir}{trailing}")
    assert code == 0, err
    written = outdir / "style.safetensors"  # the first input's name (kohya)
    assert outdir.is_dir() and sorted(p.name for p in outdir.iterdir()) == ["style.safetensors"]
    assert f"wrote {written} " in stdout
    np.testing.assert_allclose(kohya_deltas(written)[FLUX_MODULE], d1 + d2, rtol=1e-5, atol=1e-6)

    # resize (kohya): the input's name; convert --to peft: the name diffusers looks for in a folder
    code, _, err = run(capsys, "resize", tmp_path / "in" / "detail.safetensors", "--rank", "3", "-q",
                       "-o", f"{tmp_path / 'small'}{trailing}" if trailing else outdir)
    assert code == 0, err
    resized = (tmp_path / "small" if trailing else outdir) / "detail.safetensors"
    np.testing.assert_allclose(kohya_deltas(resized)[FLUX_MODULE], d2, rtol=1e-5, atol=1e-6)
    conv = tmp_path / "conv"
    if not trailing:
        conv.mkdir()
    code, stdout, err = run(capsys, "convert", tmp_path / "in" / "style.safetensors", "--to", "peft",
                            "--family", "flux", "-o", f"{conv}{trailing}")
    assert code == 0, err
    assert sorted(p.name for p in conv.iterdir()) == ["pytorch_lora_weights.safetensors"]
    (module, delta), = diffusers_deltas(conv / "pytorch_lora_weights.safetensors").items()
    assert module == "transformer.transformer_blocks.0.attn.to_out.0"
    np.testing.assert_allclose(delta, d1, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "outdir").is_file() and not conv.is_file()


def test_resize_peft_into_a_safetensors_name(tmp_path, capsys, monkeypatch):
    deltas = peft(tmp_path / "a", UNET, 3)
    out = tmp_path / "r.safetensors"
    code, _, err = run(capsys, "resize", tmp_path / "a", "--rank", "4", "-o", out)  # rank 4 of rank 4: exact
    assert code == 0, err
    assert "written as one diffusers LoRA file" in err and is_safetensors_file(out)
    got = diffusers_deltas(out)
    for name, ref in deltas.items():
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-7)
    # module names no one-file format can name: refused before the work
    peft(tmp_path / "llm", LLM, 4)
    no_work(monkeypatch, "lorafuse.ops.resize", "resize")
    out = tmp_path / "llm-r2.safetensors"
    code, _, err = run(capsys, "resize", tmp_path / "llm", "--rank", "2", "-o", out)
    assert code == 2 and f"output {out} ends in .safetensors" in err and f"e.g. {tmp_path / 'llm-r2'}" in err
    assert not out.exists()


def test_extract_into_a_safetensors_name_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    sharded_checkpoint(tmp_path / "base", llm_weights(1), {"model_type": "llama"})
    sharded_checkpoint(tmp_path / "ft", llm_weights(2), {"model_type": "llama"})
    no_work(monkeypatch, "lorafuse.ops.extract", "extract")
    out = tmp_path / "lora.safetensors"
    code, _, err = run(capsys, "extract", tmp_path / "base", tmp_path / "ft", "--rank", "2", "-o", out)
    assert code == 2, err
    assert f"output {out} ends in .safetensors, which names one file" in err
    assert "not a diffusers module name" in err and "not a kohya module name" in err
    assert f"give a folder name, e.g. {tmp_path / 'lora'}" in err
    assert not out.exists()


def test_extract_into_a_safetensors_name_writes_a_file_format_that_names_the_modules(tmp_path, capsys):
    g = np.random.default_rng(11)
    base = {f"{n}.weight": g.standard_normal(s).astype(np.float32) for n, s in UNET.items()}
    ft = {k: w + (g.standard_normal((w.shape[0], 2)) @ g.standard_normal((2, w.shape[1]))).astype(np.float32)
          for k, w in base.items()}
    for name, weights in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file(weights, str(tmp_path / name / "model.safetensors"))
    out = tmp_path / "unet_lora.safetensors"
    code, stdout, err = run(capsys, "extract", tmp_path / "base", tmp_path / "ft", "--rank", "2", "--no-progress",
                            "-o", out)
    assert code == 0, err
    assert "written as one diffusers LoRA file" in err and f"wrote {out} " in stdout and is_safetensors_file(out)
    got = diffusers_deltas(out)
    assert set(got) == set(UNET)
    for key, w in base.items():
        want = ft[key].astype(np.float64) - w
        np.testing.assert_allclose(got[key.removesuffix(".weight")], want, atol=1e-4 * np.abs(want).max())


# ----------------------------------------------------------------------------- apply


def test_apply_a_checkpoint_folder_into_one_file(tmp_path, capsys):
    weights = llm_weights(5)
    base = sharded_checkpoint(tmp_path / "base", weights, {"model_type": "llama", "torch_dtype": "float32"})
    deltas = peft(tmp_path / "ad", LLM, 6)
    out = tmp_path / "merged.safetensors"
    code, stdout, err = run(capsys, "apply", base, tmp_path / "ad", "--weights", "0.5", "-o", out, "--no-progress")
    assert code == 0, err
    assert is_safetensors_file(out) and f"to {out} in" in stdout
    got, meta = tensors(out)
    assert set(got) == set(weights) and meta[MARK] and meta["format"] == "pt"
    for key, w in weights.items():
        module = key.removesuffix(".weight")
        if module in deltas:
            np.testing.assert_allclose(got[key], w.astype(np.float64) + 0.5 * deltas[module], rtol=1e-6, atol=1e-6)
        else:
            assert got[key].dtype == w.dtype and np.array_equal(got[key], w)
    assert f"note: {out} is one .safetensors file, which holds tensors only: config.json, tokenizer.json of {base}" \
        in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base", "merged.safetensors"]

    # --dtype: the note says that config.json still names the base's dtype
    out16 = tmp_path / "merged16.safetensors"
    code, _, err = run(capsys, "apply", base, tmp_path / "ad", "--dtype", "fp16", "-o", out16, "--no-progress")
    assert code == 0, err
    got16 = tensors(out16)[0]
    assert all(t.dtype == np.float16 for t in got16.values())
    assert f"and {base}/config.json says torch_dtype=float32" in err


def test_apply_refuses_one_file_when_config_must_change(tmp_path, capsys):
    g = np.random.default_rng(7)
    base = tmp_path / "tied"
    base.mkdir()
    save_file({"model.embed_tokens.weight": g.standard_normal((32, 10)).astype(np.float32),
               "model.layers.0.self_attn.q_proj.weight": g.standard_normal((12, 10)).astype(np.float32)},
              str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    peft(tmp_path / "head", {"lm_head": (32, 10)}, 8)
    out = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "apply", base, tmp_path / "head", "-o", out, "--no-progress")
    assert code == 2, err
    assert f"output {out} names one .safetensors file, but this merge unties lm_head" in err
    assert "tie_word_embeddings=false" in err and f"give a folder name (e.g. {tmp_path / 'm'})" in err
    assert not out.exists()
    # the folder keeps the merge whole: config.json unties them
    code, _, err = run(capsys, "apply", base, tmp_path / "head", "-o", tmp_path / "m", "--no-progress", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False


def test_apply_refuses_a_pipeline_or_resharding_into_one_file(tmp_path, capsys, monkeypatch):
    pipe = flux_pipeline(tmp_path / "pipe")
    flux_lora(tmp_path / "flux.safetensors", 1)
    base = sharded_checkpoint(tmp_path / "base", llm_weights(1), {"model_type": "llama"})
    peft(tmp_path / "ad", LLM, 2)
    no_work(monkeypatch, "lorafuse.ops.apply", "plan_model")
    before = snapshot(tmp_path)
    out = tmp_path / "p.safetensors"
    code, _, err = run(capsys, "apply", pipe, tmp_path / "flux.safetensors", "-o", out)
    assert code == 2
    assert (f"output {out} ends in .safetensors, which names one file, but the base {pipe} is a diffusers pipeline "
            f"(transformer and the files around them), which is written as a folder: give a folder name, e.g. "
            f"{tmp_path / 'p'}") in err
    code, _, err = run(capsys, "apply", base, tmp_path / "ad", "--max-shard-size", "1MB", "-o", out)
    assert code == 2 and "--max-shard-size splits a checkpoint folder into shards" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("trailing", ["/", ""], ids=["slash", "existing-folder"])
def test_apply_a_file_base_into_a_folder_writes_the_base_name_inside(tmp_path, capsys, trailing):
    weights = llm_weights(9)
    (tmp_path / "models").mkdir()
    base = tmp_path / "models" / "llm.safetensors"
    save_file(weights, str(base))
    deltas = peft(tmp_path / "ad", LLM, 10)
    outdir = tmp_path / "merged"
    if not trailing:
        outdir.mkdir()
    code, stdout, err = run(capsys, "apply", base, tmp_path / "ad", "-o", f"{outdir}{trailing}", "--no-progress")
    assert code == 0, err
    written = outdir / "llm.safetensors"
    assert sorted(p.name for p in outdir.iterdir()) == ["llm.safetensors"] and f"to {written} in" in stdout
    got = tensors(written)[0]
    for name, d in deltas.items():
        np.testing.assert_allclose(got[f"{name}.weight"], weights[f"{name}.weight"] + d, rtol=1e-6, atol=1e-6)
    # the base's own folder holds an input: not a folder to write into (the file there would be the base)
    before = snapshot(tmp_path / "models")
    models = tmp_path / "models"
    code, _, err = run(capsys, "apply", base, tmp_path / "ad", "-o", f"{models}{trailing}", "--overwrite")
    assert code == 1 and f"output {models} holds the input {base}, which is inside it" in err, err
    assert err.rstrip().endswith("give the output file's full name")  # no example naming the input itself
    assert snapshot(tmp_path / "models") == before


# ----------------------------------------------------------------------------- plots


@pytest.fixture()
def kohya_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    flux_lora(tmp_path / "in" / "a.safetensors", 1)
    flux_lora(tmp_path / "in" / "b.safetensors", 2)
    monkeypatch.chdir(tmp_path)  # short labels: the heat map's axes keep their room
    return Path("in/a.safetensors"), Path("in/b.safetensors")


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf", ".jpg", ".jpeg", ".SVG"])
def test_the_plot_format_follows_the_suffix(kohya_pair, tmp_path, capsys, suffix):
    pytest.importorskip("matplotlib")
    heat, spectrum = tmp_path / f"heat{suffix}", tmp_path / f"spectrum{suffix}"
    assert run(capsys, "similarity", *kohya_pair, "--plot", heat)[0] == 0
    assert run(capsys, "info", kohya_pair[0], "--spectrum", spectrum)[0] == 0
    for path in (heat, spectrum):
        assert path.read_bytes().lstrip().startswith(MAGIC[suffix.lower()]), path.read_bytes()[:16]
    # lorafuse's own plot is recognised and replaced without --overwrite
    inode = heat.stat().st_ino
    code, _, err = run(capsys, "similarity", *kohya_pair, "--plot", heat)
    assert code == 0 and "note:" not in err and heat.stat().st_ino != inode
    # an altered plot (cut short: a PNG before its text chunk, others anywhere), or a file of the user's, is
    # not lorafuse's: refused
    heat.write_bytes(heat.read_bytes()[: 40 if suffix == ".png" else heat.stat().st_size // 2])
    for path in (heat, tmp_path / f"mine{suffix}"):
        if not path.exists():
            path.write_bytes(b"mine\n")
        before = path.read_bytes()
        code, _, err = run(capsys, "similarity", *kohya_pair, "--plot", path)
        assert code == 1 and f"output {path} is a file lorafuse did not write" in err
        assert path.read_bytes() == before


def test_the_plot_api_follows_the_suffix(tmp_path):
    pytest.importorskip("matplotlib")
    for suffix, magic in MAGIC.items():
        out = plot_similarity(np.eye(2), ["a", "b"], tmp_path / f"h{suffix}")
        assert out.read_bytes().lstrip().startswith(magic)


@pytest.mark.parametrize("name", ["heat.gif", "heat", "heat.png.bak", "heat.svg/"])
def test_an_unknown_plot_suffix_is_refused_before_the_work(kohya_pair, tmp_path, capsys, monkeypatch, name):
    no_work(monkeypatch, "lorafuse.ops.similarity", "similarity")
    no_work(monkeypatch, "lorafuse.ops.info", "describe")
    out = f"{tmp_path}/{name}"
    for argv in (["similarity", *kohya_pair, "--plot", out], ["info", kohya_pair[0], "--spectrum", out]):
        code, _, err = run(capsys, *argv)
        assert code == 2, err
        assert f"plot {out}: " in err and "the suffix chooses the image format" in err
        assert "give a name ending in .png, .svg, .pdf, .jpg, .jpeg" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# ----------------------------------------------------------------------------- outputs inside inputs


def _verbs(i: dict[str, Path]) -> list[tuple[str, list[object], str, list[str]]]:
    """(verb, argv without the output, option naming the output, suffix, input folders)."""
    return [
        ("apply", ["apply", i["base"], i["ad"], "--no-progress", "-o"], "", ["base", "ad"]),
        ("apply-file-name", ["apply", i["base"], i["ad"], "--no-progress", "-o"], ".safetensors", ["base", "ad"]),
        ("apply-pipeline", ["apply", i["pipe"], i["flux"], "--no-progress", "-o"], "", ["pipe", "comp"]),
        ("combine", ["combine", i["ad"], i["ad2"], "--method", "cat", "-o"], "", ["ad", "ad2"]),
        ("resize", ["resize", i["ad"], "--rank", "2", "-o"], "", ["ad"]),
        ("extract", ["extract", i["base"], i["ft"], "--rank", "2", "--no-progress", "-o"], "", ["base", "ft"]),
        ("similarity", ["similarity", i["ad"], i["ad2"], "--plot"], ".png", ["ad", "ad2"]),
        ("info", ["info", i["ad"], "--spectrum"], ".png", ["ad"]),
    ]


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "inputs"
    i = {"base": sharded_checkpoint(root / "base", llm_weights(1), {"model_type": "llama"}),
         "ft": sharded_checkpoint(root / "ft", llm_weights(2), {"model_type": "llama"}),
         "ad": root / "ad", "ad2": root / "ad2", "flux": root / "loras" / "flux.safetensors",
         "pipe": flux_pipeline(root / "pipe")}
    i["comp"] = i["pipe"] / "transformer"
    peft(i["ad"], LLM, 3)
    peft(i["ad2"], LLM, 4)
    flux_lora(i["flux"], 5)
    return i


VERB_NAMES = ["apply", "apply-file-name", "apply-pipeline", "combine", "resize", "extract", "similarity", "info"]


@pytest.mark.parametrize("verb", VERB_NAMES)
def test_an_output_inside_an_input_folder_is_refused_however_spelled(verb, inputs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, argv, suffix, folders = next(v for v in _verbs(inputs) if v[0] == verb)
    before = snapshot(tmp_path / "inputs")
    for key in folders:
        folder = inputs[key]
        link = tmp_path / f"link-to-{key}"
        link.symlink_to(folder, target_is_directory=True)
        for out in (folder / f"sub{suffix}", f"{folder}/missing/../sub{suffix}", link / f"sub{suffix}",
                    folder / "deeper" / f"sub{suffix}"):
            for extra in ([], ["--overwrite"]):
                code, _, err = run(capsys, *argv, out, *extra)
                assert code == 1 and "error: OutputError: " in err, (out, err)
                assert "is inside the input folder" in err, (out, err)
        link.unlink()
    # an input named through a link, the output through the real path
    link = tmp_path / "link-in"
    link.symlink_to(inputs[folders[0]], target_is_directory=True)
    linked = [link if a == inputs[folders[0]] else a for a in argv]
    code, _, err = run(capsys, *linked, inputs[folders[0]] / f"sub{suffix}")
    assert code == 1 and f"is inside the input folder {link}" in err, err
    link.unlink()
    assert snapshot(tmp_path / "inputs") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_an_output_holding_what_an_input_folder_links_to_is_refused(tmp_path, capsys):
    """A Hugging Face snapshot: the adapter's files are links into blobs/. Replacing blobs/ (or a blob) would
    destroy the input whatever --overwrite says."""
    blobs = tmp_path / "hub" / "blobs"
    snap = tmp_path / "hub" / "snapshots"
    for name, seed in (("a", 1), ("b", 2)):
        peft(tmp_path / "src" / name, LLM, seed)
        (snap / name).mkdir(parents=True)
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            blobs.mkdir(parents=True, exist_ok=True)
            blob = blobs / f"{name}-{f}"
            (tmp_path / "src" / name / f).rename(blob)
            (snap / name / f).symlink_to(blob)
    before = snapshot(tmp_path / "hub")
    for argv in (["combine", snap / "a", snap / "b", "--method", "cat", "-o", blobs, "--overwrite"],
                 ["resize", snap / "a", "--rank", "2", "-o", blobs, "--overwrite"],
                 ["similarity", snap / "a", snap / "b", "--plot", blobs / "a-adapter_config.json", "--overwrite"],
                 ["combine", snap / "a", snap / "b", "--format", "kohya", "-o", blobs / "a-adapter_model.safetensors",
                  "--overwrite"]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and "error: OutputError: " in err, (argv, err)
        assert f"{snap / 'a'}/adapter_" in err and "(a link to " in err, err
    assert snapshot(tmp_path / "hub") == before
