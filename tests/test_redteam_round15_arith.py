"""Red team, round 15, area arith: exact adapter arithmetic (a + b, a - b, c * a, -a, to_rank) and the files it
writes, against numpy float64 and diffusers' own loaders (Flux, Wan)."""

from __future__ import annotations

import signal
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redteam_fixtures as rf
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save_file as save_torch

import lorafuse

FLUX = "lora_unet_double_blocks_0_img_attn_proj"
SDXL = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _kohya_lora(path: Path, modules: dict[str, tuple[int, int, int, float | None]], seed: int,
                dtype: torch.dtype = torch.float32) -> Path:
    """A kohya LoRA file: module -> (out, in, rank, alpha or None), factors from torch.randn, stored as `dtype`."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    for m, (o, i, r, alpha) in modules.items():
        t[f"{m}.lora_down.weight"] = torch.randn(r, i, generator=g).to(dtype)
        t[f"{m}.lora_up.weight"] = torch.randn(o, r, generator=g).to(dtype)
        if alpha is not None:
            t[f"{m}.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_torch(t, str(path))
    return path


def _kohya_deltas(path: Path) -> dict[str, np.ndarray]:
    """alpha / r * up @ down per module of a kohya LoRA / LoHa / LoKr file, float64, as kohya's loaders read it
    (no `.alpha` or alpha 0: alpha = r)."""
    t = {k: v.double().numpy() for k, v in load_file(str(path)).items()}
    out: dict[str, np.ndarray] = {}
    for key in t:
        m, _, part = key.partition(".")
        alpha = t.get(f"{m}.alpha")
        if part == "lora_down.weight":
            down, up = t[key], t[f"{m}.lora_up.weight"]
            r = down.shape[0]
            a = float(alpha) if alpha is not None and float(alpha) != 0 else r
            out[m] = a / r * up.reshape(up.shape[0], r) @ down.reshape(r, -1)
        elif part == "hada_w1_a":
            r = t[key].shape[1]
            a = float(alpha) if alpha is not None and float(alpha) != 0 else r
            out[m] = a / r * (t[key] @ t[f"{m}.hada_w1_b"]) * (t[f"{m}.hada_w2_a"] @ t[f"{m}.hada_w2_b"])
    return out


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in this (main) thread after `seconds`: a loader looping forever fails the test."""
    def stop(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- negative scales in kohya files


def test_a_negated_flux_kohya_lora_loads_in_diffusers(tmp_path: Path) -> None:
    """-a of a kohya Flux LoRA was written with `.alpha` = -1: diffusers' kohya Flux converter splits alpha / r
    between the factors by doubling one half until it passes the other, which never ends for a negative alpha, so
    FluxPipeline.lora_state_dict (load_lora_weights) hung forever on lorafuse's file. The sign now goes into
    lora_up (exactly) and alpha stays positive: diffusers loads it, with the negated delta."""
    from diffusers import FluxPipeline

    src = _kohya_lora(tmp_path / "flux.safetensors", {FLUX: (16, 16, 2, 1.0)}, 1)
    out = (-lorafuse.load(src)).save(tmp_path / "neg.safetensors")
    with warnings.catch_warnings(), _deadline(20):
        warnings.simplefilter("ignore")
        state = FluxPipeline.lora_state_dict(str(out))
    state = state[0] if isinstance(state, tuple) else state
    a = state["transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight"].double().numpy()
    b = state["transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight"].double().numpy()
    want = -_kohya_deltas(src)[FLUX]
    assert np.abs(b @ a - want).max() <= 1e-6 * np.abs(want).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_negative_scales_are_written_with_positive_kohya_alphas(tmp_path: Path, dtype: torch.dtype) -> None:
    """Every negative result (-a, a * -0.5, a - 3 a, 0.5 * b - a) of kohya LoRAs of several dtypes is written with
    `.alpha` >= 0 (and ss_network_alpha >= 0), the sign in lora_up, in the factors' own dtype, and reads back to
    the float64 deltas."""
    mods = {SDXL: (8, 8, 4, 2.0), FLUX: (16, 16, 2, None)}
    src = _kohya_lora(tmp_path / "a.safetensors", mods, 1, dtype)
    a = lorafuse.load(src)
    ref = _kohya_deltas(src)
    for name, value, c in (("neg", -a, -1.0), ("half", a * -0.5, -0.5), ("sub", a - 3 * a, -2.0)):
        out = value.save(tmp_path / f"{name}.safetensors")
        got = _kohya_deltas(out)
        with safe_open(str(out), "pt") as f:
            alphas = [float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")]
            meta = f.metadata() or {}
        assert alphas and min(alphas) > 0, (name, alphas)
        assert float(meta.get("ss_network_alpha", "1")) > 0, meta
        for m, d in ref.items():
            assert np.abs(got[m] - c * d).max() <= 1e-6 * np.abs(d).max(), (name, m)
        if name == "neg":  # a sign flip is exact: the same bits but the sign, in the same dtype
            t_in, t_out = load_file(str(src)), load_file(str(out))
            for m in mods:
                assert t_out[f"{m}.lora_up.weight"].dtype == dtype
                assert torch.equal(t_out[f"{m}.lora_up.weight"], -t_in[f"{m}.lora_up.weight"])


def test_a_negated_loha_keeps_a_positive_alpha_and_reads_back_negated(tmp_path: Path) -> None:
    """The same for a LoHa: the sign goes into hada_w1_a, alpha stays positive, the delta negated."""
    g = torch.Generator().manual_seed(3)
    t = {f"{SDXL}.hada_w1_a": torch.randn(8, 2, generator=g), f"{SDXL}.hada_w1_b": torch.randn(2, 8, generator=g),
         f"{SDXL}.hada_w2_a": torch.randn(8, 2, generator=g), f"{SDXL}.hada_w2_b": torch.randn(2, 8, generator=g),
         f"{SDXL}.alpha": torch.tensor(1.0)}
    save_torch(t, str(tmp_path / "loha.safetensors"))
    ref = _kohya_deltas(tmp_path / "loha.safetensors")[SDXL]
    out = (lorafuse.load(tmp_path / "loha.safetensors") * -1.5).save(tmp_path / "neg.safetensors")
    back = load_file(str(out))
    assert float(back[f"{SDXL}.alpha"]) == 1.5  # |scale| * alpha
    assert np.abs(_kohya_deltas(out)[SDXL] + 1.5 * ref).max() <= 1e-6 * np.abs(ref).max()


# ----------------------------------------------------------------------------- kohya metadata of a sum


def test_a_sum_states_its_convolutions_new_rank_in_ss_network_args(tmp_path: Path) -> None:
    """a + b where only the 3x3 convolution's rank changes (4 + 4; the linear module is a's alone, rank 4, alpha 4)
    kept ss_network_args' conv_dim "4" from the inputs while the file's conv module has rank 8 (conv_alpha was
    kept too): conv_dim / conv_alpha now state the result's convolutions, as they do for combine and resize."""
    import json

    lin, conv = SDXL, "lora_unet_down_blocks_0_resnets_0_conv1"
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
            "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "4.0"})}

    def write(path: Path, with_linear: bool, seed: int) -> Path:
        g = torch.Generator().manual_seed(seed)
        t = {f"{conv}.lora_down.weight": torch.randn(4, 6, 3, 3, generator=g),
             f"{conv}.lora_up.weight": torch.randn(8, 4, 1, 1, generator=g), f"{conv}.alpha": torch.tensor(4.0)}
        if with_linear:
            t |= {f"{lin}.lora_down.weight": torch.randn(4, 8, generator=g),
                  f"{lin}.lora_up.weight": torch.randn(8, 4, generator=g), f"{lin}.alpha": torch.tensor(4.0)}
        save_torch(t, str(path), metadata=meta)
        return path

    a, b = write(tmp_path / "a.safetensors", True, 1), write(tmp_path / "b.safetensors", False, 2)
    out = (lorafuse.load(a) + lorafuse.load(b)).save(tmp_path / "sum.safetensors")
    with safe_open(str(out), "pt") as f:
        written = f.metadata()
        assert f.get_slice(f"{conv}.lora_down.weight").get_shape()[0] == 8
        assert float(f.get_tensor(f"{conv}.alpha")) == 8.0
    assert json.loads(written["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "8.0"}
    assert (written["ss_network_dim"], written["ss_network_alpha"]) == ("4", "4.0")
    ref = {m: _kohya_deltas(a)[m] + _kohya_deltas(b).get(m, 0) for m in (lin, conv)}
    got = _kohya_deltas(out)
    assert all(np.abs(got[m] - ref[m]).max() <= 1e-6 * np.abs(ref[m]).max() for m in ref)


# ----------------------------------------------------------------------------- one key layout per file


def _comfy_lora(path: Path, modules: list[str], seed: int, alpha: float = 1.0) -> Path:
    """A ComfyUI-layout (musubi-tuner / ai-toolkit) Wan LoRA: `diffusion_model.blocks.0.<module>.lora_A / lora_B /
    alpha`, 8 x 8, rank 2."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    for m in modules:
        stem = f"diffusion_model.blocks.0.{m}"
        t |= {f"{stem}.lora_A.weight": torch.randn(2, 8, generator=g),
              f"{stem}.lora_B.weight": torch.randn(8, 2, generator=g), f"{stem}.alpha": torch.tensor(alpha)}
    save_torch(t, str(path))
    return path


def _comfy_deltas(path: Path) -> dict[str, np.ndarray]:
    """alpha / r * B @ A per module path of a ComfyUI-layout file (lora_A / lora_down spellings), float64."""
    t = {k: v.double().numpy() for k, v in load_file(str(path)).items()}
    out: dict[str, np.ndarray] = {}
    for key, down in t.items():
        for a_name, b_name in (("lora_A.weight", "lora_B.weight"), ("lora_down.weight", "lora_up.weight")):
            if key.endswith("." + a_name):
                stem = key[: -len(a_name) - 1]
                r = down.shape[0]
                out[stem] = float(t.get(f"{stem}.alpha", r)) / r * t[f"{stem}.{b_name}"] @ down
    return out


def test_sums_of_comfyui_layout_loras_with_different_modules_keep_one_layout(tmp_path: Path) -> None:
    """a + b of two ComfyUI-layout Wan LoRAs (the layout musubi-tuner and ai-toolkit save) whose module sets differ
    wrote b's own modules under kohya names (`lora_unet_blocks_0_self_attn_k`) beside a's `diffusion_model.` keys:
    diffusers' Wan loader refuses such a file (ValueError: the state dict is not empty after conversion), and
    combine (cat in memory, svd streamed) wrote the same mixture. Every module now keeps its own input's layout: the
    file is all `diffusion_model.` keys, diffusers loads every module, with the float64 deltas."""
    from diffusers import WanPipeline

    a = _comfy_lora(tmp_path / "a.safetensors", ["self_attn.q"], 1)
    b = _comfy_lora(tmp_path / "b.safetensors", ["self_attn.k", "cross_attn.v"], 2, alpha=4.0)
    ra, rb = _comfy_deltas(a), _comfy_deltas(b)
    outs = [(lorafuse.load(a) - 2 * lorafuse.load(b)).save(tmp_path / "sum.safetensors")]
    for method, engine in (("cat", "memory"), ("svd", "stream")):
        out = tmp_path / f"{method}.safetensors"
        code, _, err = rf.run_cli(["combine", str(a), str(b), "--method", method, "--engine", engine, "--rank", "2",
                             "--weights", "1,-2", "-o", str(out)] if method == "svd" else
                            ["combine", str(a), str(b), "--method", method, "--weights", "1,-2", "-o", str(out)])
        assert code == 0, err
        outs.append(out)
    for out in outs:
        keys = list(load_file(str(out)))
        assert all(k.startswith("diffusion_model.blocks.0.") for k in keys), (out.name, keys)
        got = _comfy_deltas(out)
        for stem in {*ra, *rb}:
            want = ra.get(stem, 0) - 2 * rb.get(stem, 0)
            assert np.abs(got[stem] - want).max() <= 1e-5 * np.abs(want).max(), (out.name, stem)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = WanPipeline.lora_state_dict(str(out))
        state = state[0] if isinstance(state, tuple) else state
        assert len([k for k in state if k.endswith("lora_A.weight")]) == 3, (out.name, sorted(state))


def test_a_comfyui_layout_lora_plus_a_kohya_named_one_is_written_in_kohya_names(tmp_path: Path) -> None:
    """A ComfyUI-layout LoRA plus a kohya-named LoRA of the same model (lorafuse reads both under kohya names): the
    result's file was half `diffusion_model.` keys, half `lora_unet_` keys. A kohya name cannot be spelled back as
    a module path (its '_' may be a '.'), so the file is now all kohya names, each delta as numpy's."""
    a = _comfy_lora(tmp_path / "a.safetensors", ["self_attn.q"], 1)
    b = _kohya_lora(tmp_path / "b.safetensors", {"lora_unet_blocks_0_self_attn_k": (8, 8, 2, 1.0),
                                                  "lora_unet_blocks_0_self_attn_q": (8, 8, 2, None)}, 2)
    out = (lorafuse.load(a) + lorafuse.load(b)).save(tmp_path / "sum.safetensors")
    keys = list(load_file(str(out)))
    assert all(k.startswith("lora_unet_blocks_0_self_attn_") for k in keys), keys
    got, ra, rb = _kohya_deltas(out), _comfy_deltas(a), _kohya_deltas(b)
    q, k = "lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_self_attn_k"
    want_q = ra["diffusion_model.blocks.0.self_attn.q"] + rb[q]
    assert np.abs(got[q] - want_q).max() <= 1e-6 * np.abs(want_q).max()
    assert np.abs(got[k] - rb[k]).max() <= 1e-6 * np.abs(rb[k]).max()

