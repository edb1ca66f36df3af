"""`apply` with diffusion adapters: kohya LoRA / LoCon files merged into single-file SD 1.5 / SDXL
checkpoints and into diffusers pipeline folders, Flux LoRAs into BFL files and diffusers transformers.

References: which weight each kohya module changes, and by how much, comes from diffusers' own
kohya loader (`lora_state_dict`: its module names and network alphas), and single-file outputs are
read back through diffusers' own LDM converters; the arithmetic is numpy float64.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sd_fixtures as sdk
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from fault_tools import tree_hashes
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import lorafuse
from lorafuse.errors import MissingModuleError, ShapeMismatchError

# family -> (pipeline class, UNet naming in kohya files, text-encoder prefixes)
FAMILIES = {
    "sd1": (StableDiffusionPipeline, "diffusers", ("lora_te_",)),
    "sdxl": (StableDiffusionXLPipeline, "ldm", ("lora_te1_", "lora_te2_")),
}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"sd1": sdk._randomized(sdk._unet("sd1"), 0), "sdxl": sdk._randomized(sdk._unet("sdxl"), 1),
            "clip_l": sdk._randomized(CLIPTextModel(sdk._clip_config()), 11),
            "clip_g": sdk._randomized(CLIPTextModelWithProjection(sdk._clip_config()), 12)}


def _kohya_lora(family: str, models, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A kohya LoRA / LoCon on every Linear and Conv2d of the UNet and the text encoders (rank 2, random alphas)."""
    _, naming, te_prefixes = FAMILIES[family]
    layers = {sdk._kohya_unet_name(p, family, naming): s for p, s in sdk._layers(models[family]).items()}
    tes = [models["clip_l"]] if family == "sd1" else [models["clip_l"], models["clip_g"]]
    for prefix, te in zip(te_prefixes, tes):
        layers.update({prefix + sdk._hf_clip(p).replace(".", "_"): s for p, s in sdk._layers(te).items()
                       if not p.endswith("text_projection")})  # open_clip stores it transposed: never a target
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, shape in layers.items():
        r = 2
        tail = (1,) * (len(shape) - 2)
        sd[name + ".lora_down.weight"] = (torch.randn((r, *shape[1:]), generator=g) * 0.3).to(dtype)
        sd[name + ".lora_up.weight"] = (torch.randn((shape[0], r, *tail), generator=g) * 0.3).to(dtype)
        sd[name + ".alpha"] = torch.tensor(float(torch.randint(1, 5, (1,), generator=g)), dtype=dtype)
    return sd


def _diffusers_deltas(family: str, sd: dict[str, torch.Tensor], unet) -> dict[str, np.ndarray]:
    """diffusers-named module -> float64 delta, by diffusers' kohya loader (its names and network alphas)."""
    cls = FAMILIES[family][0]
    kwargs = {"unet_config": unet.config} if family == "sdxl" else {}
    state, alphas = cls.lora_state_dict({k: v.clone() for k, v in sd.items()}, **kwargs)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        prefix, role, _ = key.rsplit(".", 2)  # '<prefix>.down.weight' / '<prefix>.up.weight'
        parts.setdefault(prefix, {})[role] = value
    out = {}
    for prefix, p in parts.items():
        alpha = next(alphas[k] for k in (prefix + ".down.weight.alpha", prefix + ".alpha",
                                         _module_of(prefix) + ".alpha") if k in alphas)
        down = p["down"].double().reshape(p["down"].shape[0], -1)
        up = p["up"].double().reshape(p["up"].shape[0], -1)
        out[_module_of(prefix)] = ((up @ down) * (alpha / down.shape[0])).numpy()
    return out


def _module_of(prefix: str) -> str:
    """diffusers' LoRA key prefixes (old attention-processor and lora-layer spellings) -> the module path."""
    for marker in (".lora_linear_layer", ".lora"):
        if prefix.endswith(marker):
            return prefix[: -len(marker)]
    if ".processor." in prefix:  # UNet attention: attn1.processor.to_q_lora -> attn1.to_q
        attn, proc = prefix.split(".processor.")
        return f"{attn}.{proc.removesuffix('_lora')}" + (".0" if proc == "to_out_lora" else "")
    attn, proc = prefix.rsplit(".", 1)  # CLIP attention: self_attn.to_q_lora -> self_attn.q_proj
    clip = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
    if attn.endswith(".self_attn") and proc in clip:
        return f"{attn}.{clip[proc]}"
    raise AssertionError(f"unexpected LoRA key prefix from diffusers: {prefix}")


def _save_pipeline(path: Path, family: str, models) -> None:
    """A diffusers pipeline folder: model_index.json, unet/, text_encoder(s)/, and files without weights."""
    path.mkdir()
    comps = {"unet": models[family], "text_encoder": models["clip_l"]}
    if family == "sdxl":
        comps["text_encoder_2"] = models["clip_g"]
    index = {"_class_name": FAMILIES[family][0].__name__, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}
    for name, model in comps.items():
        (path / name).mkdir()
        weights = "diffusion_pytorch_model.safetensors" if name == "unet" else "model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / name / weights))
        (path / name / "config.json").write_text(json.dumps({"marker": name}))
        index[name] = ["diffusers" if name == "unet" else "transformers", type(model).__name__]
    (path / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not read: a variant")
    (path / "scheduler").mkdir()
    (path / "scheduler" / "scheduler_config.json").write_text('{"beta_start": 0.00085}')
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    (path / "model_index.json").write_text(json.dumps(index))


def _assert_merged(got: dict[str, np.ndarray], base: dict[str, np.ndarray], deltas: dict[str, np.ndarray],
                   key_of) -> None:  # type: ignore[no-untyped-def]
    """got[key] == base[key] + delta (float32 tolerance) for every delta; every other tensor unchanged."""
    touched = set()
    for module, delta in deltas.items():
        key = key_of(module)
        assert key in got, f"{module}: no {key} in the output"
        want = base[key].astype(np.float64) + delta.reshape(base[key].shape)
        np.testing.assert_allclose(got[key], want, rtol=2e-6, atol=2e-6 * np.abs(want).max(), err_msg=module)
        touched.add(key)
    for key in set(base) - touched:
        assert np.array_equal(got[key], base[key]), f"{key} changed although no module targets it"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_lora_into_a_single_file_checkpoint(family: str, models, tmp_path: Path) -> None:
    lora = _kohya_lora(family, models)
    save_file(lora, str(tmp_path / "lora.safetensors"), {"ss_network_module": "networks.lora"})
    tensors = sdk._single_file(family, models, models["clip_l"], models["clip_g"], openclip=False)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    report = lorafuse.apply(tmp_path / "model.safetensors", [tmp_path / "lora.safetensors"],
                            out=tmp_path / "merged.safetensors", progress=False)
    assert report.merged
    out = {k: torch.from_numpy(v) for k, v in load_np(str(tmp_path / "merged.safetensors")).items()}
    assert set(out) == set(tensors)
    components = {"unet": models[family], "text_encoder_2": models["clip_g"]}
    # read both checkpoints back through diffusers' own LDM converters
    got = {k: v.numpy() for k, v in sdk._reference(family, out, components, False).items()}
    base = {k: v.numpy() for k, v in sdk._reference(family, tensors, components, False).items()}
    deltas = _diffusers_deltas(family, lora, models[family])
    assert len(deltas) * 2 + len(deltas) == len(lora)
    _assert_merged(got, base, deltas, lambda m: m + ".weight")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_lora_into_a_diffusers_pipeline_folder(family: str, models, tmp_path: Path) -> None:
    lora = _kohya_lora(family, models, seed=3)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    _save_pipeline(tmp_path / "pipe", family, models)
    report = lorafuse.apply(tmp_path / "pipe", [tmp_path / "lora.safetensors"], weights=[0.75],
                            out=tmp_path / "merged", progress=False)
    deltas = {m: 0.75 * d for m, d in _diffusers_deltas(family, lora, models[family]).items()}
    comps = ["unet", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for comp in comps:
        weights = "diffusion_pytorch_model.safetensors" if comp == "unet" else "model.safetensors"
        got = load_np(str(tmp_path / "merged" / comp / weights))
        base = load_np(str(tmp_path / "pipe" / comp / weights))
        mine = {m[len(comp) + 1:]: d for m, d in deltas.items() if m.startswith(comp + ".")}
        _assert_merged(got, base, mine, lambda m, base=base: m.removeprefix("text_model.") + ".weight"
                       if m.removeprefix("text_model.") + ".weight" in base else m + ".weight")
        assert (tmp_path / "merged" / comp / "config.json").read_text() == json.dumps({"marker": comp})
    assert len(report.merged) == len(deltas)
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json"):
        assert (tmp_path / "merged" / rel).read_bytes() == (tmp_path / "pipe" / rel).read_bytes()
    # an fp16 variant of a merged component would still hold the unmerged weights: not copied, and said so
    assert not (tmp_path / "merged" / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert any("diffusion_pytorch_model.fp16.safetensors" in n and "not copied" in n for n in report.notes)


def test_every_unmatched_module_is_listed_or_skipped(models, tmp_path: Path) -> None:
    lora = _kohya_lora("sd1", models)
    lora["lora_unet_no_such_block_0_proj.lora_down.weight"] = torch.ones(2, 8, dtype=torch.float16)
    lora["lora_unet_no_such_block_0_proj.lora_up.weight"] = torch.ones(8, 2, dtype=torch.float16)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    _save_pipeline(tmp_path / "pipe", "sd1", models)
    shutil.rmtree(tmp_path / "pipe" / "text_encoder")  # the text-encoder modules now have no target either
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    del index["text_encoder"]
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    te_modules = sorted({k.split(".")[0] for k in lora if k.startswith("lora_te_")})
    with pytest.raises(MissingModuleError) as e:
        lorafuse.apply(tmp_path / "pipe", [tmp_path / "lora.safetensors"], out=tmp_path / "out", progress=False)
    message = str(e.value)
    assert f"{len(te_modules) + 1} adapter modules" in message
    for m in te_modules + ["lora_unet_no_such_block_0_proj"]:
        assert f"'{m}'" in message
    assert not (tmp_path / "out").exists()
    report = lorafuse.apply(tmp_path / "pipe", [tmp_path / "lora.safetensors"], out=tmp_path / "out",
                            skip_missing=True, progress=False)
    skipped = [n for n in report.notes if n.startswith("skipped (no target)")]
    assert len(skipped) == len(te_modules) + 1
    deltas = _diffusers_deltas("sd1", {k: v for k, v in lora.items() if "no_such" not in k}, models["sd1"])
    got = load_np(str(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_np(str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    _assert_merged(got, base, {m[5:]: d for m, d in deltas.items() if m.startswith("unet.")},
                   lambda m: m + ".weight")


def test_a_module_of_the_wrong_shape_is_refused(models, tmp_path: Path) -> None:
    lora = _kohya_lora("sd1", models)
    name = next(k for k in lora if k.endswith("attn1_to_q.lora_down.weight"))
    lora[name] = torch.ones(2, 5, dtype=torch.float16)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    _save_pipeline(tmp_path / "pipe", "sd1", models)
    with pytest.raises(ShapeMismatchError) as e:
        lorafuse.apply(tmp_path / "pipe", [tmp_path / "lora.safetensors"], out=tmp_path / "out", progress=False)
    assert name.split(".")[0] in str(e.value) and "(8, 5)" in str(e.value)


# ---------------------------------------------------------------------------------------------- Flux

FLUX_H = 16  # hidden size of the toy Flux model; MLP 4x


def _flux_bfl_shapes() -> dict[str, tuple[int, ...]]:
    h = FLUX_H
    return {"double_blocks.0.img_attn.qkv.weight": (3 * h, h), "double_blocks.0.img_attn.proj.weight": (h, h),
            "double_blocks.0.txt_attn.qkv.weight": (3 * h, h), "single_blocks.0.linear1.weight": (3 * h + 4 * h, h),
            "single_blocks.0.linear2.weight": (h, h + 4 * h), "img_in.weight": (h, 8),
            "final_layer.adaLN_modulation.1.weight": (2 * h, h)}


def _flux_diffusers_of(bfl: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same weights under diffusers' names, split by hand as diffusers' converter documents: qkv in thirds,
    linear1 = q | k | v | mlp, linear2 = proj_out, and (shift | scale) of the final modulation swapped."""
    h = FLUX_H
    q, k, v = np.split(bfl["double_blocks.0.img_attn.qkv.weight"], 3)
    aq, ak, av = np.split(bfl["double_blocks.0.txt_attn.qkv.weight"], 3)
    l1 = bfl["single_blocks.0.linear1.weight"]
    shift, scale = np.split(bfl["final_layer.adaLN_modulation.1.weight"], 2)
    t = "transformer_blocks.0.attn."
    s = "single_transformer_blocks.0."
    return {t + "to_q.weight": q, t + "to_k.weight": k, t + "to_v.weight": v, t + "to_out.0.weight":
            bfl["double_blocks.0.img_attn.proj.weight"], t + "add_q_proj.weight": aq, t + "add_k_proj.weight": ak,
            t + "add_v_proj.weight": av, s + "attn.to_q.weight": l1[:h], s + "attn.to_k.weight": l1[h:2 * h],
            s + "attn.to_v.weight": l1[2 * h:3 * h], s + "proj_mlp.weight": l1[3 * h:],
            s + "proj_out.weight": bfl["single_blocks.0.linear2.weight"], "x_embedder.weight": bfl["img_in.weight"],
            "norm_out.linear.weight": np.concatenate([scale, shift])}


def test_kohya_flux_lora_into_bfl_file_and_diffusers_transformer(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    shapes = _flux_bfl_shapes()
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    lora: dict[str, torch.Tensor] = {}
    deltas = {}
    for key, (out, inp) in shapes.items():
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        down = rng.standard_normal((3, inp)).astype(np.float32)
        up = rng.standard_normal((out, 3)).astype(np.float32)
        lora[name + ".lora_down.weight"] = torch.from_numpy(down).to(torch.bfloat16)
        lora[name + ".lora_up.weight"] = torch.from_numpy(up).to(torch.bfloat16)
        lora[name + ".alpha"] = torch.tensor(1.5)
        d = lora[name + ".lora_up.weight"].double() @ lora[name + ".lora_down.weight"].double()
        deltas[key] = d.numpy() * 0.5
    save_file(lora, str(tmp_path / "flux_lora.safetensors"))
    save_file({k: torch.from_numpy(v) for k, v in base.items()}, str(tmp_path / "flux1.safetensors"))
    lorafuse.apply(tmp_path / "flux1.safetensors", [tmp_path / "flux_lora.safetensors"],
                   out=tmp_path / "merged.safetensors", progress=False)
    got = load_np(str(tmp_path / "merged.safetensors"))
    want = {k: base[k] + deltas[k] for k in base}
    for k in base:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-5, err_msg=k)

    pipe = tmp_path / "flux_pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                       "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in _flux_diffusers_of(base).items()},
              str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    lorafuse.apply(pipe, [tmp_path / "flux_lora.safetensors"], out=tmp_path / "merged_pipe", progress=False)
    got = load_np(str(tmp_path / "merged_pipe" / "transformer" / "diffusion_pytorch_model.safetensors"))
    for k, v in _flux_diffusers_of(want).items():
        np.testing.assert_allclose(got[k], v, rtol=2e-6, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_converted_diffusers_lora_merges_exactly_like_its_kohya_file(family: str, models, tmp_path: Path) -> None:
    """`convert --to peft` keeps every factor and scale, and diffusers-named modules find the same weights:
    merging the converted file gives the same bytes as merging the kohya file."""
    lora = _kohya_lora(family, models, seed=4)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    lorafuse.convert(tmp_path / "lora.safetensors", tmp_path / "diffusers.safetensors", to="peft")
    assert lorafuse.load(tmp_path / "diffusers.safetensors").format == "diffusers"
    _save_pipeline(tmp_path / "pipe", family, models)
    for name in ("lora", "diffusers"):
        lorafuse.apply(tmp_path / "pipe", [tmp_path / f"{name}.safetensors"], out=tmp_path / f"out_{name}",
                       progress=False)
    for comp in ["unet", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else []):
        weights = "diffusion_pytorch_model.safetensors" if comp == "unet" else "model.safetensors"
        a = tree_hashes(tmp_path / "out_lora" / comp / weights)  # the same but the record (its inputs differ)
        assert a == tree_hashes(tmp_path / "out_diffusers" / comp / weights), comp
        assert a != tree_hashes(tmp_path / "pipe" / comp / weights)


def test_a_sharded_component_keeps_its_shards_and_index_name(tmp_path: Path) -> None:
    """diffusers shards big components (Flux's transformer) as diffusion_pytorch_model-0000i-of-0000n with
    diffusion_pytorch_model.safetensors.index.json: the merged component keeps those names."""
    rng = np.random.default_rng(6)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in _flux_bfl_shapes().items()}
    weights = {k: np.ascontiguousarray(v) for k, v in _flux_diffusers_of(base).items()}
    names = sorted(weights)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    comp = tmp_path / "pipe" / "transformer"
    comp.mkdir(parents=True)
    for shard, keys in shards.items():
        save_file({k: torch.from_numpy(weights[k]) for k in keys}, str(comp / shard))
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
             "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (comp / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "X"]}))
    down = rng.standard_normal((2, FLUX_H)).astype(np.float32)
    up = rng.standard_normal((3 * FLUX_H, 2)).astype(np.float32)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.from_numpy(down),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.from_numpy(up)},
              str(tmp_path / "qkv.safetensors"))
    lorafuse.apply(tmp_path / "pipe", [tmp_path / "qkv.safetensors"], out=tmp_path / "out", progress=False)
    out = tmp_path / "out" / "transformer"
    assert sorted(p.name for p in out.iterdir()) == sorted([*shards, "diffusion_pytorch_model.safetensors.index.json"])
    assert json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"] == \
        index["weight_map"]
    got = {k: v for shard in shards for k, v in load_np(str(out / shard)).items()}
    delta = up.astype(np.float64) @ down.astype(np.float64)
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        key = f"transformer_blocks.0.attn.{part}.weight"
        want = weights[key] + delta[i * FLUX_H:(i + 1) * FLUX_H]
        np.testing.assert_allclose(got[key], want, rtol=2e-6, atol=1e-5, err_msg=key)
    for key in set(weights) - {f"transformer_blocks.0.attn.{p}.weight" for p in ("to_q", "to_k", "to_v")}:
        assert np.array_equal(got[key], weights[key]), key


def test_info_describes_a_pipeline_folder(models, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorafuse.cli import main

    _save_pipeline(tmp_path / "pipe", "sdxl", models)
    d = lorafuse.describe(tmp_path / "pipe")
    assert d["type"] == "pipeline"
    comps = d["components"]
    assert set(comps) == {"unet", "text_encoder", "text_encoder_2"}  # type: ignore[arg-type]
    for name, model in (("unet", models["sdxl"]), ("text_encoder", models["clip_l"])):
        state = model.state_dict()
        assert comps[name]["tensors"] == len(state)  # type: ignore[index]
        assert comps[name]["parameters"] == sum(v.numel() for v in state.values())  # type: ignore[index]
    assert main(["info", str(tmp_path / "pipe")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pipeline") and "unet:" in out and "text_encoder_2:" in out


@pytest.mark.parametrize("index, message", [
    ("[1, 2]", "the pipeline index must be a JSON object"),
    ("{not json", "cannot read the pipeline index: not valid JSON"),
])
def test_a_bad_pipeline_index_is_refused(models, tmp_path: Path, index: str, message: str) -> None:
    _save_pipeline(tmp_path / "pipe", "sd1", models)
    save_file(_kohya_lora("sd1", models), str(tmp_path / "lora.safetensors"))
    (tmp_path / "pipe" / "model_index.json").write_text(index)
    with pytest.raises(lorafuse.FormatError) as e:
        lorafuse.apply(tmp_path / "pipe", [tmp_path / "lora.safetensors"], out=tmp_path / "out", progress=False)
    assert str(tmp_path / "pipe" / "model_index.json") in str(e.value) and message in str(e.value)
    assert not (tmp_path / "out").exists()
