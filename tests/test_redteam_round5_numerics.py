"""Round 5 red-team fixes, numerics (/tmp/rt7/numerics/REPORT.md):

1. a merge that gives NaN / Inf from finite inputs says what happened: a DoRA row (or column) of W + its
   delta with norm 0 is named with its module and rows (PEFT's merge_and_unload gives NaN there), and a
   float32 overflow says NaN or Inf as the result holds it (not "finite in float32" when it was not);
2. combine of one adapter runs the method asked, with an AdapterNote that PEFT's add_weighted_adapter would
   take 'linear' and return the adapter unchanged (as --method cat does);
3. apply with weight x scale beyond float32 is refused before any work, as combine refuses it (no numpy
   RuntimeWarning), through a checkpoint, a diffusers pipeline and --dry-run; a product of finite factors
   that overflows is a NonFiniteError without a warning;
4. a NaN rounded to F16 is the quiet NaN of its sign (0x7E00) in every path (tests/test_isa.py runs the
   vector paths of every core), and F16 decoding keeps a NaN's bits as numpy does;
5. similarity --help no longer says it reads DoRA (it refuses DoRA modules);
6. Adapter.norms() / info with factors holding Inf or NaN: what numpy float64 gives for the dense delta, and
   info says which the factors hold, per module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from redteam_fixtures import PREFIX, peft_folder
from safetensors.numpy import load_file, save_file
from torch import nn

import lorafuse
from lorafuse import _core
from lorafuse.backends import get_backend
from lorafuse.cli import main
from lorafuse.errors import AdapterNote, LorafuseValueError, NonFiniteError, UnsupportedError

FLOAT32_MAX = float(np.finfo(np.float32).max)


def _peft_dora(folder: Path, a: np.ndarray, b: np.ndarray, m: np.ndarray, module: str = "lin") -> Path:
    folder.mkdir(parents=True)
    save_file({f"{PREFIX}{module}.lora_A.weight": a, f"{PREFIX}{module}.lora_B.weight": b,
               f"{PREFIX}{module}.lora_magnitude_vector": m}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": a.shape[0], "lora_alpha": 2 * a.shape[0], "use_dora": True,
         "target_modules": [module]}))
    return folder


def _base(folder: Path, tensors: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _peft_merged(w: np.ndarray, adapter: Path) -> np.ndarray:
    """PEFT's merge_and_unload of the DoRA adapter into nn.Linear(w): the reference."""
    from peft import PeftModel

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False)

    net = Net()
    net.load_state_dict({"lin.weight": torch.from_numpy(w)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(net, str(adapter)).merge_and_unload(safe_merge=False)
    return merged.lin.weight.detach().numpy()


# ---------------------------------------------------------------------------------------------- 1. NaN, not overflow


@pytest.fixture
def dora_zero_row(tmp_path: Path) -> tuple[np.ndarray, Path]:
    """A DoRA adapter whose row 0 of W + s B A is zero (W's and B's row 0 are)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    w[0] = 0
    a = rng.standard_normal((2, 5)).astype(np.float32)
    b = rng.standard_normal((4, 2)).astype(np.float32)
    b[0] = 0
    m = np.array([1.0, 1.2, 0.8, 1.1], np.float32)
    return w, _peft_dora(tmp_path / "dora", a, b, m)


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_a_dora_row_of_norm_zero_is_named_not_called_an_overflow(tmp_path, dora_zero_row, dtype):
    w, adapter = dora_zero_row
    peft = _peft_merged(w, adapter)
    assert np.isnan(peft[0]).all() and np.isfinite(peft[1:]).all()  # PEFT: magnitude / 0 * 0
    base = _base(tmp_path / "base", {"lin.weight": w.astype(np.float16 if dtype == "F16" else np.float32)})
    with pytest.raises(NonFiniteError) as e:
        lorafuse.apply(base, [adapter], out=tmp_path / "out", progress=False)
    msg = str(e.value)
    assert msg.startswith("NaN in the output lin.weight: "), msg
    assert f"{adapter}: module 'lin' is DoRA, and W + its delta has norm 0 in row 0 of lin.weight" in msg
    assert "overflow" not in msg and "wider --dtype" not in msg and "Inf in" not in msg
    assert not (tmp_path / "out").exists()
    # written anyway: row 0 NaN as PEFT's, the others PEFT's values (one rounding to the base's dtype)
    lorafuse.apply(base, [adapter], out=tmp_path / "allowed", progress=False, allow_nonfinite=True)
    got = load_file(str(tmp_path / "allowed" / "model.safetensors"))["lin.weight"].astype(np.float64)
    assert np.isnan(got[0]).all()
    if dtype == "F32":
        np.testing.assert_allclose(got[1:], peft[1:], rtol=1e-5, atol=1e-6)


def test_a_dora_column_of_norm_zero_is_named(tmp_path):
    """An Embedding's DoRA normalizes columns: a zero column is named as a column (PEFT: a NaN column)."""
    from peft import LoraConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 5)

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.emb.weight[:, 2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(net, LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["emb"],
                                            init_lora_weights=False))
        layer = pm.base_model.model.emb
        with torch.no_grad():
            layer.lora_embedding_B["default"][2, :] = 0  # column 2 of the delta
        pm.save_pretrained(str(tmp_path / "ad"))
        base = _base(tmp_path / "base", {"emb.weight": layer.base_layer.weight.detach().numpy().copy()})
        merged = pm.merge_and_unload(safe_merge=False).emb.weight.detach().numpy()
    assert np.flatnonzero(np.isnan(merged).all(axis=0)).tolist() == [2]
    with pytest.raises(NonFiniteError) as e:
        lorafuse.apply(base, [tmp_path / "ad"], out=tmp_path / "out", progress=False)
    assert "module 'emb' is DoRA, and W + its delta has norm 0 in column 2 of emb.weight" in str(e.value)
    assert "overflow" not in str(e.value)


def _overflowing(tmp_path: Path, nan: bool) -> tuple[Path, Path, list[float], np.ndarray]:
    """A finite base and finite factors (weights) whose merge overflows float32 at [0, 0]: B's row 0 of 1e20 times
    A's column 0 of 1e20 (Inf), or (`nan`) B's row 0 of 10 and -10 times the weight 1e38 (B w: Inf and -Inf) times
    A's column 0 of ones (Inf - Inf: NaN)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    a = rng.standard_normal((2, 6)).astype(np.float32)
    b = rng.standard_normal((4, 2)).astype(np.float32)
    weight = 1e38 if nan else 1.0
    if nan:
        b *= np.float32(1e-3)
        a[:, 0], b[0] = [1.0, 1.0], [10.0, -10.0]
    else:
        a[:, 0], b[0] = [1e20, 1e20], [1e20, 1e20]
    ad = tmp_path / "ad"
    ad.mkdir()
    save_file({f"{PREFIX}lin.lora_A.weight": a, f"{PREFIX}lin.lora_B.weight": b}, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                        "target_modules": ["lin"]}))
    with np.errstate(over="ignore", invalid="ignore"):
        ref = w + (b * np.float32(weight)) @ a  # numpy float32: what float32 gives
    return _base(tmp_path / "base", {"lin.weight": w}), ad, [weight], ref


@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_an_overflow_says_nan_or_inf_as_the_float32_result_holds_it(tmp_path, dtype):
    base, ad, weights, ref = _overflowing(tmp_path, nan=True)
    assert np.isnan(ref[0, 0]) and np.isfinite(ref[1:]).all()
    with pytest.raises(NonFiniteError) as e:
        lorafuse.apply(base, [ad], weights, out=tmp_path / "out", dtype=dtype, progress=False)
    msg = str(e.value)
    assert msg.startswith("NaN"), msg
    assert "in the output lin.weight: the inputs are finite but W + scale * B A overflows float32" in msg
    assert "an Inf minus an Inf" in msg and "finite in float32" not in msg


@pytest.mark.parametrize("dtype", [None, "fp16", "bf16"])
def test_a_float32_overflow_into_a_narrow_dtype_is_not_called_finite_in_float32(tmp_path, dtype):
    base, ad, weights, ref = _overflowing(tmp_path, nan=False)
    assert np.isposinf(ref[0, 0]) and not np.isnan(ref).any()
    with pytest.raises(NonFiniteError) as e:
        lorafuse.apply(base, [ad], weights, out=tmp_path / "out", dtype=dtype, progress=False)
    msg = str(e.value)
    assert msg.startswith("Inf in the output lin.weight: the inputs are finite but W + scale * B A overflows "
                          "float32 (largest finite 3.40e38)"), msg
    assert "finite in float32" not in msg and "NaN" not in msg.split(";")[0]


def test_a_nan_input_is_named_with_its_module(tmp_path):
    shapes = {"model.layers.0.q_proj": (6, 6), "model.layers.0.v_proj": (6, 6)}
    ad = peft_folder(tmp_path / "ad", shapes, seed=3)
    t = load_file(str(ad / "adapter_model.safetensors"))
    t[f"{PREFIX}model.layers.0.v_proj.lora_A.weight"][1, 2] = np.inf
    save_file(t, str(ad / "adapter_model.safetensors"))
    rng = np.random.default_rng(2)
    base = _base(tmp_path / "base", {f"{m}.weight": rng.standard_normal(s).astype(np.float32)
                                     for m, s in shapes.items()})
    with pytest.raises(NonFiniteError) as e:
        lorafuse.apply(base, [ad], out=tmp_path / "out", progress=False)
    assert str(e.value) == (f"NaN or Inf in the merged weights of model.layers.0.v_proj.weight: {ad}: module "
                            "'model.layers.0.v_proj' holds Inf in its factors; pass --allow-nonfinite (Python: "
                            "allow_nonfinite=True) to write them anyway")


# ------------------------------------------------------------------------------------------ 2. one adapter, combined


def test_one_adapter_combined_says_what_peft_would_do(tmp_path):
    from peft import PeftModel

    ad = peft_folder(tmp_path / "ad", {"layer": (6, 5)}, seed=0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(5, 6, bias=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(Net(), str(ad), adapter_name="a")
        pm.add_weighted_adapter(["a"], [0.7], "m", combination_type="ties", density=0.5)
        peft = pm.base_model.model.layer.get_delta_weight("m").detach().double().numpy()
    exact = 0.7 * lorafuse.load(ad).updates["layer"].delta()
    np.testing.assert_allclose(peft, exact, rtol=1e-5, atol=1e-6)  # PEFT: the adapter unchanged, times 0.7

    for method, kw, done in (("ties", {"density": 0.5}, "its factors pruned to --density"),
                             ("dare_linear", {"density": 0.5}, "its factors pruned to --density"),
                             ("ties_svd", {"density": 0.5}, "its delta pruned to --density, then cut to rank k"),
                             ("svd", {"rank": 1}, "its delta as the best rank-k approximation"),
                             ("svd", {"rank": 1, "engine": "stream"}, "its delta as the best rank-k approximation")):
        with pytest.warns(AdapterNote) as notes:
            out = lorafuse.combine([ad], [0.7], method=method, **kw)
        said = [str(n.message) for n in notes if "one adapter" in str(n.message)]
        assert len(said) == 1, said
        assert f"one adapter, combined by method {method!r} as asked: {done}" in said[0]
        assert "PEFT's add_weighted_adapter would take method 'linear' for one adapter" in said[0]
        assert np.linalg.norm(out.updates["layer"].delta() - peft) > 0.1 * np.linalg.norm(peft)  # it did change
    # what the note offers: cat gives PEFT's result, and neither it nor linear (PEFT's own) has the note
    for method in ("cat", "linear"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = lorafuse.combine([ad], [0.7], method=method).updates["layer"].delta()
        np.testing.assert_allclose(got, peft, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():  # two adapters: no such note
        warnings.simplefilter("error")
        lorafuse.combine([ad, ad], [0.7, 0.3], method="ties", density=0.5)


def test_one_adapter_note_through_the_cli(tmp_path, capsys):
    ad = peft_folder(tmp_path / "ad", {"layer": (6, 5)}, seed=0)
    assert main(["combine", str(ad), "--method", "magnitude_prune", "--density", "0.5", "-o",
                 str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "note: " in err and "one adapter, combined by method 'magnitude_prune' as asked" in err


# ------------------------------------------------------------------------------------ 3. coefficients beyond float32


def _llm(tmp_path: Path, alpha: float = 2) -> tuple[Path, Path]:
    ad = peft_folder(tmp_path / "ad", {"layer": (6, 5)}, seed=0, alpha=alpha)
    rng = np.random.default_rng(5)
    return _base(tmp_path / "base", {"layer.weight": rng.standard_normal((6, 5)).astype(np.float32)}), ad


@pytest.mark.parametrize("weight, alpha, shown", [(1e39, 2, "weight 1e+39 times its scale 1"),
                                                   (1.0, 1e39, "weight 1 times its scale 5e+38"),
                                                   (-3e38, 4, "weight -3e+38 times its scale 2")])
def test_apply_refuses_a_coefficient_beyond_float32_before_any_work(tmp_path, weight, alpha, shown):
    base, ad = _llm(tmp_path, alpha)
    assert not abs(weight * lorafuse.load(ad).updates["layer"].scale) <= FLOAT32_MAX
    want = f"{ad}: module 'layer': {shown} is beyond float32's range: use smaller weights"
    with pytest.raises(LorafuseValueError) as e:  # a numpy RuntimeWarning would be an error here
        lorafuse.apply(base, [ad], [weight], out=tmp_path / "out", progress=False)
    assert str(e.value) == want
    assert not (tmp_path / "out").exists()
    # combine says the same of the same weight
    with pytest.raises(LorafuseValueError, match="is beyond float32's range: use smaller weights"):
        lorafuse.combine([ad, ad], [weight, 1.0], method="svd")


def test_apply_cli_refuses_a_coefficient_in_one_line_without_a_python_warning(tmp_path):
    base, ad = _llm(tmp_path)
    for extra in ([], ["--dry-run"]):
        res = subprocess.run([sys.executable, "-m", "lorafuse.cli", "apply", str(base), str(ad), "--weights", "1e39",
                              "-o", str(tmp_path / "out"), *extra], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        assert res.stderr == (f"lorafuse apply: error: {ad}: module 'layer': weight 1e+39 times its scale 1 is beyond "
                              "float32's range: use smaller weights\n")
        assert not (tmp_path / "out").exists()


def test_apply_on_a_pipeline_refuses_a_coefficient_beyond_float32(tmp_path):
    """A diffusers pipeline's UNet and a kohya file whose alpha (F64) makes the scale 5e38."""
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    rng = np.random.default_rng(0)
    key = "down_blocks.0.attentions.0.proj_in.weight"
    save_file({key: rng.standard_normal((320, 320)).astype(np.float32)},
              str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    (pipe / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    kohya = tmp_path / "k.safetensors"
    save_file({f"{name}.lora_down.weight": rng.standard_normal((2, 320)).astype(np.float32),
               f"{name}.lora_up.weight": rng.standard_normal((320, 2)).astype(np.float32),
               f"{name}.alpha": np.array(1e39)}, str(kohya))
    with pytest.raises(LorafuseValueError) as e:
        lorafuse.apply(pipe, [kohya], out=tmp_path / "out", progress=False)
    assert str(e.value).endswith("weight 1 times its scale 5e+38 is beyond float32's range: use smaller weights")
    assert not (tmp_path / "out").exists()
    # at weight 1e-10 the coefficient is a float32: merged, and equal to numpy float64 rounded once
    lorafuse.apply(pipe, [kohya], [1e-10], out=tmp_path / "out", progress=False)
    k = load_file(str(kohya))
    ref = (load_file(str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))[key].astype(np.float64)
           + 1e-10 * 5e38 * (k[f"{name}.lora_up.weight"].astype(np.float64) @ k[f"{name}.lora_down.weight"]))
    got = load_file(str(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors"))[key]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))  # float32 sums


def test_finite_factors_whose_scaled_product_overflows_raise_without_a_numpy_warning(tmp_path):
    """weight 1e38 x scale 2 is a float32, but B x 2e38 is not: the merge's NonFiniteError, no RuntimeWarning."""
    base, ad = _llm(tmp_path, alpha=4)
    with pytest.raises(NonFiniteError) as e:  # filterwarnings = error: a numpy warning would raise first
        lorafuse.apply(base, [ad], [1e38], out=tmp_path / "out", progress=False)
    assert "overflows float32" in str(e.value) and "layer.weight" in str(e.value)


def test_convert_refuses_fused_parts_whose_scales_float32_cannot_share(tmp_path):
    """A diffusers Flux LoRA whose to_k has scale 1e35 (lora_B ~1e4), to_q / to_v 1: fused into kohya's qkv at one
    scale, to_k's lora_B times 1e35 is beyond float32 (the delta itself is ~1e39): refused, no numpy warning."""
    rng = np.random.default_rng(0)
    state = {}
    for x in "qkv":
        m = f"transformer.transformer_blocks.0.attn.to_{x}"
        state[f"{m}.lora_A.weight"] = rng.standard_normal((2, 8)).astype(np.float32)
        state[f"{m}.lora_B.weight"] = (rng.standard_normal((8, 2)) * (1e4 if x == "k" else 1)).astype(np.float32)
    meta = {"transformer.r": 2, "transformer.lora_alpha": 2, "transformer.rank_pattern": {},
            "transformer.alpha_pattern": {"transformer_blocks.0.attn.to_k": 2e35},
            "transformer.target_modules": ["to_q", "to_k", "to_v"]}
    src = tmp_path / "flux.safetensors"
    save_file(state, str(src), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    k = "transformer.transformer_blocks.0.attn.to_k"
    assert lorafuse.load(src).updates[k].scale == 1e35
    assert 1e35 * np.abs(state[f"{k}.lora_B.weight"].astype(np.float64)).max() > FLOAT32_MAX
    with pytest.raises(LorafuseValueError) as e:
        lorafuse.convert(src, tmp_path / "k.safetensors", to="kohya", family="flux")
    assert str(e.value).startswith(f"module 'lora_unet_double_blocks_0_img_attn_qkv': its part '{k}' has scale 1e+35")
    assert str(e.value).endswith("is beyond float32's range, so the parts cannot share one scale")
    assert not (tmp_path / "k.safetensors").exists()


@pytest.mark.filterwarnings("ignore:.*written as 2-D LoRA factors:lorafuse.errors.AdapterNote")  # Tiny's generic names
@pytest.mark.parametrize("config, first", [("loha", "hada_w1_a"), ("lokr", "lokr_w1")])
def test_a_lycoris_stage_whose_coefficient_product_overflows_raises_without_a_numpy_warning(tmp_path, config, first):
    """A LoHa / LoKr whose first factor (where apply folds weight x scale) times a weight x scale just below float32's
    largest overflows: the merge's NonFiniteError for an overflow of finite inputs, no RuntimeWarning."""
    from lycoris_fixtures import CONFIGS, network, save
    from safetensors.torch import save_file as save_torch

    model, net = network(seed=3, **CONFIGS[config])  # type: ignore[arg-type]
    path = save(net, tmp_path / "lycoris.safetensors")
    t = load_file(str(path))
    save_file({k: v * np.float32(100) if k.endswith(first) else v for k, v in t.items()}, str(path))
    base = tmp_path / "base.safetensors"
    save_torch({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(base))
    weight = 0.99 * FLOAT32_MAX / max(abs(u.scale) for u in lorafuse.load(path).updates.values())
    with pytest.raises(NonFiniteError) as e:
        lorafuse.apply(base, [path], [weight], out=tmp_path / "out.safetensors", progress=False)
    assert "in the output" in str(e.value) and "the inputs are finite but W + scale * B A overflows float32" in str(
        e.value)


# ------------------------------------------------------------------------------------------------- 4. NaN rounding


def test_f16_nan_rounding_and_decoding_are_the_references_in_vector_and_tail_positions():
    x = np.full(43, 1.5, np.float32)  # 43 = 32 + 8 + 3: the cores' blocks of 32 and of 8, and a tail
    bits = x.view(np.uint32)
    bits[[0, 1, 9, 17, 33, 42]] = [0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFFBFFFFF, 0x7FC00001, 0xFFFFFFFF]
    ref = get_backend("reference")
    for dtype in ("F16", "BF16"):
        got = np.asarray(_core.from_float32(x, dtype)).view(np.uint16)
        want = np.asarray(ref.from_float32(x, dtype)).view(np.uint16)
        np.testing.assert_array_equal(got, want, err_msg=f"{dtype} on {_core.isa}")
    got16 = np.asarray(_core.from_float32(x, "F16")).view(np.uint16)
    assert got16[[0, 1, 9, 17, 33, 42]].tolist() == [0x7E00, 0xFE00, 0x7E00, 0xFE00, 0x7E00, 0xFE00]
    h = np.full(43, 0x3C00, np.uint16)
    h[[0, 3, 16, 35, 41]] = [0x7C01, 0xFD55, 0x7E01, 0xFFFF, 0x7C01]
    np.testing.assert_array_equal(np.asarray(_core.to_float32(h, "F16")).view(np.uint32),
                                  h.view(np.float16).astype(np.float32).view(np.uint32))


# ---------------------------------------------------------------------------------------------- 5. similarity help


def test_similarity_help_says_dora_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["similarity", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(LoRA, LoCon, LoHa, LoKr) and diffusers LoRA .safetensors files" in text
    assert "A DoRA module is refused: its delta depends on the base weight" in text
    # which it is: a kohya file with dora_scale
    rng = np.random.default_rng(0)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{name}.lora_down.weight": rng.standard_normal((2, 5)).astype(np.float32),
               f"{name}.lora_up.weight": rng.standard_normal((6, 2)).astype(np.float32),
               f"{name}.alpha": np.array(2.0, np.float32),
               f"{name}.dora_scale": rng.uniform(0.5, 2, (6, 1)).astype(np.float32)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(UnsupportedError, match="is DoRA: its delta depends on the base weight"):
        lorafuse.similarity([tmp_path / "d.safetensors", tmp_path / "d.safetensors"])


# ---------------------------------------------------------------------------------------- 6. norms that are not finite


def _poisoned(tmp_path: Path, name: str, edit) -> Path:  # type: ignore[no-untyped-def]
    shapes = {f"m{i:02d}": (6, 5) for i in range(12)}
    ad = peft_folder(tmp_path / name, shapes, seed=4, alpha=4)
    t = load_file(str(ad / "adapter_model.safetensors"))
    edit(t)
    save_file(t, str(ad / "adapter_model.safetensors"))
    return ad


def _numpy_norm(ad: Path, module: str) -> float:
    t = load_file(str(ad / "adapter_model.safetensors"))
    b, a = (t[f"{PREFIX}{module}.lora_{x}.weight"].astype(np.float64) for x in "BA")
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.linalg.norm(2.0 * (b @ a)))  # scale 4 / 2


def test_norms_of_factors_holding_inf_or_nan_are_numpys(tmp_path):
    def inf_a(t):  # Inf in A, B without zeros: the column is +-Inf, no NaN
        t[f"{PREFIX}m03.lora_A.weight"][0, 0] = np.inf

    def inf_meets_zero(t):  # an Inf times a 0 of B: NaN in the dense delta
        t[f"{PREFIX}m03.lora_A.weight"][0, 0] = np.inf
        t[f"{PREFIX}m03.lora_B.weight"][2, 0] = 0.0

    def nan_b(t):
        t[f"{PREFIX}m03.lora_B.weight"][1, 1] = np.nan

    for edit, want in ((inf_a, "inf"), (inf_meets_zero, "nan"), (nan_b, "nan")):
        ad = _poisoned(tmp_path, edit.__name__, edit)
        ref = _numpy_norm(ad, "m03")
        assert str(ref) == want, (edit.__name__, ref)  # numpy float64 on the dense delta
        norms = lorafuse.load(ad).norms()
        assert str(norms["m03"]) == want, (edit.__name__, norms["m03"])
        for m in norms:  # the others as before
            if m != "m03":
                assert norms[m] == pytest.approx(_numpy_norm(ad, m), rel=1e-9)


def test_a_huge_scale_does_not_make_a_zero_delta_nan(tmp_path):
    """|scale| * ||B A|| rather than sqrt(scale^2 * ||B A||^2): scale^2 beyond float64 times 0 was NaN."""
    ad = peft_folder(tmp_path / "ad", {"layer": (6, 5), "other": (4, 5)}, seed=0, alpha=2e200)
    t = load_file(str(ad / "adapter_model.safetensors"))
    t[f"{PREFIX}layer.lora_B.weight"][:] = 0
    save_file(t, str(ad / "adapter_model.safetensors"))
    norms = lorafuse.load(ad).norms()
    assert norms["layer"] == np.linalg.norm(1e200 * np.zeros((6, 5))) == 0.0
    b, a = (t[f"{PREFIX}other.lora_{x}.weight"].astype(np.float64) for x in "BA")
    assert norms["other"] == pytest.approx(1e200 * np.linalg.norm(b @ a), rel=1e-9)


def test_info_says_which_factors_hold_inf_or_nan(tmp_path, capsys):
    def edit(t):
        t[f"{PREFIX}m03.lora_A.weight"][0, 0] = np.inf
        t[f"{PREFIX}m07.lora_B.weight"][1, 1] = np.nan

    ad = _poisoned(tmp_path, "ad", edit)
    assert main(["info", str(ad)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if "modules with the largest" in line)
    shown = lines[start + 1 : start + 11]
    # the two that are not finite come first (NaN does not sort), saying what their factors hold
    assert shown[0].split()[0] == "m03" and shown[0].endswith("||delta||_F=inf (its factors hold Inf)")
    assert shown[1].split()[0] == "m07" and shown[1].endswith("||delta||_F=nan (its factors hold NaN)")
    assert all("its factors hold" not in line for line in shown[2:])
    assert main(["info", str(ad), "--json"]) == 0
    mods = {m["name"]: m for m in json.loads(capsys.readouterr().out)["module_details"]}
    assert (mods["m03"]["delta_norm"], mods["m03"]["nonfinite"]) == (None, "Inf")
    assert (mods["m07"]["delta_norm"], mods["m07"]["nonfinite"]) == (None, "NaN")
    assert mods["m00"]["nonfinite"] is None and mods["m00"]["delta_norm"] == pytest.approx(_numpy_norm(ad, "m00"))
