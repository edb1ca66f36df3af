"""diffusers LoRA files in the layouts its training scripts and older versions write (issue #18):
`convert_state_dict_to_diffusers(get_peft_model_state_dict(model))` + `save_lora_weights`
(`unet.<module>.lora.down.weight` / `.lora.up.weight`, text encoders' `.lora_linear_layer.down.weight`,
untouched `.lora_A.weight` for other modules) and the attention-processor layout
(`unet.<attention>.processor.to_q_lora.down.weight`, `text_encoder.<attention>.to_q_lora.down.weight`).

References: diffusers itself. Each file is loaded by diffusers (`lora_state_dict`, then
`load_lora_into_unet` / `load_lora_into_text_encoder`, what `load_lora_weights` calls) into tiny models
built here; the delta of every LoRA layer it injects (its factors and its scaling, float64) is what
lorafuse must read, and diffusers' fuse (`fuse_lora` / `fuse_text_encoder_lora`) gives the weights that
`lorafuse apply` must write.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import sd_fixtures as sdk
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.lora_base import fuse_text_encoder_lora
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import FormatError, ShapeMismatchError
from lorafuse.formats import detect_format

WEIGHTS = "pytorch_lora_weights.safetensors"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # what diffusers' SD LoRA training scripts target
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]  # fc1 keeps PEFT's lora_A / lora_B names


@pytest.fixture(scope="module")
def base() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny SD 1.x UNet and CLIP text encoder, every weight random."""
    return sdk._randomized(sdk._unet("sd1"), 0).eval(), sdk._randomized(CLIPTextModel(sdk._clip_config()), 1).eval()


def _trained(base, alpha: float, metadata: bool):  # type: ignore[no-untyped-def]
    """PEFT LoRAs on copies of the models (random factors, ranks and alphas differing per module)."""
    unet, te = (copy.deepcopy(m) for m in base)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS,
                                rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn1.to_v": 3.0}))
    # what transformers' add_adapter does (which wants a newer peft than the one installed)
    te_config = LoraConfig(r=2, lora_alpha=alpha / 2, init_lora_weights=False, target_modules=CLIP_TARGETS,
                           rank_pattern={"layers.1.self_attn.q_proj": 3})
    inject_adapter_in_model(te_config, te)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # lora_B nonzero everywhere (also what PEFT's init leaves at zero)
        for name, p in [*unet.named_parameters(), *te.named_parameters()]:
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    meta = {}
    if metadata:  # what the newer training scripts pass (training_utils._collate_lora_metadata)
        meta = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
                "text_encoder_lora_adapter_metadata": te_config.to_dict()}
    return unet, te, meta


def _save_training_layout(folder: Path, unet, te, meta) -> Path:  # type: ignore[no-untyped-def]
    """As diffusers' train_*_lora.py scripts save: PEFT state dicts converted to diffusers' names."""
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te)), **meta)
    return folder / WEIGHTS


def _processor_layout(peft_state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """The attention-processor layout of older diffusers files: `<attention>.processor.to_q_lora.down.weight`
    in the UNet, `<attention>.to_q_lora.down.weight` in CLIP (q_proj / k_proj / v_proj / out_proj)."""
    unet_names = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
    clip_names = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
    out = {}
    for key, value in peft_state.items():
        module, half = key.rsplit(".lora_", 1)
        half = {"A.weight": "down.weight", "B.weight": "up.weight"}[half]
        for path, old in (unet_names if component == "unet" else clip_names).items():
            if module.endswith("." + path):
                attention = module[: -len(path) - 1]
                proc = ".processor" if component == "unet" else ""
                out[f"{component}.{sdk._hf_clip(attention) if component != 'unet' else attention}{proc}."
                    f"{old}_lora.{half}"] = value
    return out


def _diffusers_load(path: Path, base):  # type: ignore[no-untyped-def]
    """diffusers' load_lora_weights, step by step, into copies of the base models."""
    unet, te = (copy.deepcopy(m) for m in base)
    state, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, metadata=meta)
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=te, metadata=meta)
    return unet, te


def _lora_layers(unet, te) -> dict[str, BaseTunerLayer]:  # type: ignore[no-untyped-def]
    """The LoRA layers diffusers injected, under lorafuse's canonical module names."""
    out = {f"unet.{n}": m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}
    out.update({f"text_encoder.{sdk._hf_clip(n)}": m for n, m in te.named_modules() if isinstance(m, BaseTunerLayer)})
    return out


def _delta(layer: BaseTunerLayer) -> np.ndarray:
    """The delta PEFT merges for the layer's one adapter: its scaling times B @ A, in float64."""
    (name,) = layer.active_adapters
    a = layer.lora_A[name].weight.detach().double().flatten(1)
    b = layer.lora_B[name].weight.detach().double().flatten(1)
    return ((b @ a) * layer.scaling[name]).numpy()


def _check_read(path: Path, base, n_modules: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """lorafuse reads every module diffusers loads, with diffusers' delta (float64)."""
    layers = _lora_layers(*_diffusers_load(path, base))
    assert len(layers) == n_modules  # diffusers loaded every module of the file
    theirs = {name: _delta(layer) for name, layer in layers.items()}
    adapter = lorafuse.load(path)
    assert adapter.format == "diffusers" and detect_format(path) == "diffusers"
    assert sorted(adapter.updates) == sorted(theirs)
    for name, d in theirs.items():
        np.testing.assert_allclose(adapter[name].delta().reshape(d.shape), d, rtol=1e-12,
                                   atol=1e-13 * np.abs(d).max(), err_msg=name)
    return theirs


@pytest.mark.parametrize("metadata", [False, True], ids=["no-metadata", "lora_adapter_metadata"])
def test_training_script_layout_reads_as_diffusers_loads_it(tmp_path: Path, base, metadata: bool) -> None:
    unet, te, meta = _trained(base, alpha=8.0, metadata=metadata)
    path = _save_training_layout(tmp_path / "trained", unet, te, meta)
    keys = list(load_file(str(path)))
    # the layouts under test are really there: diffusers' names for the attention projections, PEFT's for fc1
    assert any(k.startswith("unet.") and k.endswith(".to_out.0.lora.up.weight") for k in keys)
    assert any(k.endswith(".self_attn.q_proj.lora_linear_layer.down.weight") for k in keys)
    assert any(k.endswith(".mlp.fc1.lora_A.weight") for k in keys)
    assert not any(k.startswith("unet.") and ".lora_A." in k for k in keys)
    n = len(keys) // 2
    theirs = _check_read(path, base, n)
    adapter = lorafuse.load(path)
    # the scales diffusers used: alpha / r with the file's LoraConfig, 1 without one (whatever alpha trained)
    for name, layer in _lora_layers(*_diffusers_load(path, base)).items():
        (a,) = layer.active_adapters
        assert adapter[name].scale == pytest.approx(layer.scaling[a], rel=1e-15), name
        assert adapter[name].rank == layer.r[a], name
    scales = {adapter[n].scale for n in theirs}
    assert (scales == {1.0}) if not metadata else (len(scales) > 2)

    # The same weights in the layout lorafuse's reader had: same module names, scales and factors.
    peft_layout = tmp_path / "peft_layout"
    StableDiffusionPipeline.save_lora_weights(peft_layout, unet_lora_layers=get_peft_model_state_dict(unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(te), **meta)
    same = lorafuse.load(peft_layout / WEIGHTS)
    assert sorted(same.updates) == sorted(adapter.updates)
    for name, u in same.updates.items():
        v = adapter[name]
        assert (u.scale, u.rank, u.kind) == (v.scale, v.rank, v.kind), name
        np.testing.assert_array_equal(u.delta(), v.delta(), err_msg=name)


def test_attention_processor_layout_reads_as_diffusers_loads_it(tmp_path: Path, base) -> None:
    unet, te, _ = _trained(base, alpha=4.0, metadata=False)
    state = {**_processor_layout(get_peft_model_state_dict(unet), "unet"),
             **_processor_layout(get_peft_model_state_dict(te), "text_encoder")}
    assert any(".attn1.processor.to_out_lora.up.weight" in k for k in state)
    assert any(k.endswith(".self_attn.to_out_lora.down.weight") for k in state)
    path = tmp_path / "old.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    theirs = _check_read(path, base, len(state) // 2)
    assert {n.rsplit(".", 1)[-1] for n in theirs} == {"to_q", "to_k", "to_v", "0", "q_proj", "k_proj", "v_proj",
                                                       "out_proj"}
    assert {lorafuse.load(path)[n].scale for n in theirs} == {1.0}


def _pipeline(path: Path, unet, te) -> None:  # type: ignore[no-untyped-def]
    """A diffusers pipeline folder holding the base UNet and text encoder (float32)."""
    for name, model, weights in (("unet", unet, "diffusion_pytorch_model.safetensors"),
                                 ("text_encoder", te, "model.safetensors")):
        (path / name).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / name / weights))
        (path / name / "config.json").write_text("{}")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "text_encoder": ["transformers", "CLIPTextModel"]}))


@pytest.mark.parametrize("layout", ["training", "processor"])
def test_apply_gives_the_weights_diffusers_fuses(tmp_path: Path, base, layout: str) -> None:
    unet, te, meta = _trained(base, alpha=6.0, metadata=layout == "training")
    if layout == "training":
        path = _save_training_layout(tmp_path / "lora", unet, te, meta)
    else:
        path = tmp_path / "old.safetensors"
        save_file({**_processor_layout(get_peft_model_state_dict(unet), "unet"),
                   **_processor_layout(get_peft_model_state_dict(te), "text_encoder")}, str(path))
    _pipeline(tmp_path / "pipe", *base)
    assert main(["apply", str(tmp_path / "pipe"), str(path), "-o", str(tmp_path / "out"), "-q"]) == 0
    got = {"unet": load_np(str(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")),
           "text_encoder": load_np(str(tmp_path / "out" / "text_encoder" / "model.safetensors"))}

    loaded_unet, loaded_te = _diffusers_load(path, base)
    layers = _lora_layers(loaded_unet, loaded_te)
    assert len(layers) == len(lorafuse.load(path).updates)
    deltas = {name: _delta(layer) for name, layer in layers.items()}
    loaded_unet.fuse_lora()
    fuse_text_encoder_lora(loaded_te)
    before = {"unet": base[0].state_dict(), "text_encoder": base[1].state_dict()}
    eps = float(np.finfo(np.float32).eps)
    touched: dict[str, set[str]] = {"unet": set(), "text_encoder": set()}
    for name, layer in layers.items():
        component, module = name.split(".", 1)
        key = _weight_key(module, got[component])
        touched[component].add(key)
        assert layer.merged, name
        (a,) = layer.active_adapters
        w0 = before[component][key].double().numpy()
        theirs = layer.get_base_layer().weight.detach().double().numpy()
        mine = got[component][key]
        assert mine.dtype == np.float32 and mine.shape == w0.shape, name
        exact = w0 + deltas[name].reshape(w0.shape)
        # W + s * (B @ A) in float32 arithmetic: (r + 2) roundings (r products summed, the scale, the sum),
        # each within u = eps / 2 of |W| + s * |B| @ |A|
        size = (np.abs(layer.lora_B[a].weight.detach().double().flatten(1).numpy())
                @ np.abs(layer.lora_A[a].weight.detach().double().flatten(1).numpy())) * abs(layer.scaling[a])
        bound = (layer.r[a] + 2) * eps / 2 * (np.abs(w0) + size.reshape(w0.shape))
        assert np.all(np.abs(mine - exact) <= bound), name  # lorafuse
        assert np.all(np.abs(theirs - exact) <= bound), name  # diffusers' fuse
        assert np.all(np.abs(mine - theirs) <= 2 * bound), name
    for component, tensors in got.items():  # every other tensor is the base's
        assert set(tensors) == set(before[component])
        for key in set(tensors) - touched[component]:
            np.testing.assert_array_equal(tensors[key], before[component][key].numpy(), err_msg=key)


def _weight_key(module: str, keys) -> str:  # type: ignore[no-untyped-def]
    """The checkpoint key of a module's weight (CLIP's may lack the `text_model.` level)."""
    key = module + ".weight"
    return key if key in keys else key.removeprefix("text_model.")


@pytest.mark.parametrize("layout", ["training", "processor"])
def test_a_missing_up_half_is_refused_naming_the_key(tmp_path: Path, base, layout: str) -> None:
    unet, te, _ = _trained(base, alpha=4.0, metadata=False)
    if layout == "training":
        state = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)).items()}
    else:
        state = _processor_layout(get_peft_model_state_dict(unet), "unet")
    up = sorted(k for k in state if k.endswith("up.weight"))[3]
    down = up[: -len("up.weight")] + "down.weight"
    assert down in state
    del state[up]
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    assert detect_format(path) == "diffusers"
    with pytest.raises(FormatError) as e:
        lorafuse.load(path)
    assert str(path) in str(e.value) and repr(up) in str(e.value) and repr(down) in str(e.value)
    # and through the CLI: refused, nothing written
    assert main(["info", str(path)]) != 0
    _pipeline(tmp_path / "pipe", *base)
    assert main(["apply", str(tmp_path / "pipe"), str(path), "-o", str(tmp_path / "out"), "-q"]) != 0
    assert not (tmp_path / "out").exists()


def test_halves_of_other_ranks_or_spelled_twice_are_refused(tmp_path: Path, base) -> None:
    unet, _, _ = _trained(base, alpha=4.0, metadata=False)
    state = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)).items()}
    down = sorted(k for k in state if k.endswith(".to_q.lora.down.weight"))[0]
    bad = dict(state)
    bad[down] = torch.zeros(bad[down].shape[0] + 1, bad[down].shape[1])
    path = tmp_path / "rank.safetensors"
    save_file(bad, str(path))
    with pytest.raises(ShapeMismatchError) as e:
        lorafuse.load(path)
    assert str(path) in str(e.value) and repr(down) in str(e.value)
    twice = dict(state)
    twice[down.replace(".lora.down.weight", ".lora_A.weight")] = state[down].clone()
    path = tmp_path / "twice.safetensors"
    save_file(twice, str(path))
    with pytest.raises(FormatError, match="two lora_A tensors") as e2:
        lorafuse.load(path)
    assert repr(down) in str(e2.value)


def test_detection_of_the_other_formats_is_unchanged(tmp_path: Path, base) -> None:
    unet, _, _ = _trained(base, alpha=4.0, metadata=False)
    peft_state = get_peft_model_state_dict(unet)
    # kohya: lora_unet_* with lora_down / lora_up
    kohya = {}
    for key, value in peft_state.items():
        module, half = key.rsplit(".lora_", 1)
        kohya[f"lora_unet_{module.replace('.', '_')}.lora_{'down' if half == 'A.weight' else 'up'}.weight"] = value
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    assert detect_format(tmp_path / "kohya.safetensors") == "kohya"
    # the PEFT-named diffusers layout
    save_file({f"unet.{k}": v for k, v in peft_state.items()}, str(tmp_path / "d.safetensors"))
    assert detect_format(tmp_path / "d.safetensors") == "diffusers"
    # a PEFT folder
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    model.save_pretrained(tmp_path / "peft_folder")
    assert detect_format(tmp_path / "peft_folder") == "peft"
    # diffusers' names without a component prefix are not an adapter lorafuse (or diffusers 0.42) reads
    bare = convert_state_dict_to_diffusers(peft_state)
    save_file(bare, str(tmp_path / "bare.safetensors"))
    with pytest.raises(FormatError, match="not a recognised adapter"):
        detect_format(tmp_path / "bare.safetensors")


def test_convert_and_info_read_the_training_layout(tmp_path: Path, base) -> None:
    unet, te, meta = _trained(base, alpha=8.0, metadata=True)
    path = _save_training_layout(tmp_path / "trained", unet, te, meta)
    adapter = lorafuse.load(path)
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(path), "--to", "peft", "-o", str(out), "-q"]) == 0
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in load_file(str(out)))
    again = lorafuse.load(out)
    assert sorted(again.updates) == sorted(adapter.updates)
    for name, u in adapter.updates.items():
        np.testing.assert_allclose(again[name].delta(), u.delta(), rtol=1e-12, atol=0, err_msg=name)
    assert main(["info", str(path)]) == 0
