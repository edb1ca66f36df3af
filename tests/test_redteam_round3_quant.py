"""Red-team round 3 on `apply` onto quantized bases (findings in /tmp/rt5_quant): every fix checked against an
independent reference (transformers' own FP8 quantizer and loader, bitsandbytes' own functions, torch's
float8_e8m0fnu, numpy / torch float64), or as a refusal that names the tensor and writes nothing.

1. FP8 with `scale_fmt: ue8m0` (DeepSeek-V3.1): requantized scales are powers of two, rounded up as
   transformers' Fp8Quantize does, so transformers' loader (which stores them as float8_e8m0fnu) reads the
   merged weights unchanged; scales stored as safetensors F8_E8M0 (transformers 5) are read and written back.
2. A merged value that the requantized format cannot hold (LLM.int8 beyond float16, a 4-bit weight whose quant
   state says float16, an FP8 scale beyond F16) is refused with NonFiniteError; non-finite values are counted
   in the requantization report, never dropped silently; no numpy warning leaks.
3. A bitsandbytes weight without its companions is refused, not copied through.
4. transformers' fp8 variants: `weight_block_size: null` (per tensor) and `activation_scale` (static scheme).
5. `info` counts a 4-bit checkpoint's real parameters, without its quantization companions.
6. A bitsandbytes config without bnb_4bit_quant_type is described by what its tensors hold.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = pytest.importorskip("bitsandbytes.functional")

from redteam_fixtures import read_torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse.cli import main  # noqa: E402
from lorafuse.errors import NonFiniteError, UnsupportedError  # noqa: E402
from lorafuse.io.quant import Fp8Scaled, e8m0_from_float32, e8m0_to_float32  # noqa: E402
from lorafuse.ops.apply_quant import QuantError  # noqa: E402

F8 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu
PREFIX = "base_model.model."
UE8M0 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
         "scale_fmt": "ue8m0"}
LORA_TARGETS = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
RANK, ALPHA = 4, 8.0


@pytest.fixture(autouse=True)
def _no_torch_compile():
    """bitsandbytes wraps its reference kernels in torch.compile: run them eagerly."""
    with torch._dynamo.config.patch(disable=True):
        yield


read = read_torch


def dtypes_in_file(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def expand(scale: torch.Tensor, shape: tuple[int, int], block: int = 128) -> torch.Tensor:
    return scale.double().repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, e - 7)


def write_peft(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float) -> None:
    """A PEFT LoRA folder: module -> (A, B)."""
    folder.mkdir(parents=True)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = a, b
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
         "target_modules": sorted({n.rpartition(".")[2] for n in factors})}))


def transformers_fp8_quantize(w: torch.Tensor, scale_fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own FP8 quantizer (Fp8Quantize, what save_pretrained of an FP8 model runs) on a float32
    weight: (codes, weight_scale_inv)."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    cfg = transformers.FineGrainedFP8Config(scale_fmt=scale_fmt, weight_block_size=(128, 128))
    out = Fp8Quantize(SimpleNamespace(quantization_config=cfg))._quantize_one("m.weight", w)
    return out["m.weight"], out["m.weight_scale_inv"]


def load_fp8_with_transformers(folder: Path, monkeypatch: pytest.MonkeyPatch):
    """transformers' FP8 loader (its GPU path; the environment check bypassed so that it runs on CPU)."""
    from transformers.quantizers import quantizer_finegrained_fp8 as qm

    monkeypatch.setattr(qm.FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")


# ---------------------------------------------------------------- 1. ue8m0 scales


def _llama_config():
    return transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)


@pytest.fixture(scope="module")
def ue8m0(tmp_path_factory) -> SimpleNamespace:
    """A DeepSeek-V3.1-style FP8 Llama (power-of-two scales, amax / 448 rounded up), saved with F32 scales, with
    F8_E8M0 scales (transformers 5's float8_e8m0fnu) and with their U8 bytes (MXFP8 checkpoints, which
    transformers' FP8 loader views as float8_e8m0fnu), and a LoRA on q_proj / v_proj."""
    root = tmp_path_factory.mktemp("ue8m0")
    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(_llama_config()).to(torch.bfloat16).state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if v.ndim == 2 and "proj" in k:
            w = v.float()
            w[:128, :128] *= 37.0  # blocks of different magnitude
            amax = w.reshape(2, 128, 2, 128).abs().amax(dim=(1, 3))
            inv = torch.pow(2.0, torch.ceil(torch.log2(amax / 448)))
            tensors[k] = (w / expand(inv, (256, 256)).float()).clamp(-448, 448).to(F8)
            tensors[k[: -len("weight")] + "weight_scale_inv"] = inv
        else:
            tensors[k] = v.contiguous()
    cfg = _llama_config().to_dict()
    cfg["quantization_config"] = UE8M0
    for name in ("f32", "e8m0", "u8"):
        d = root / name
        d.mkdir()
        stored = {"f32": lambda v: v, "e8m0": lambda v: v.to(E8M0), "u8": lambda v: v.to(E8M0).view(torch.uint8)}
        save_file({k: stored[name](v) if k.endswith("scale_inv") else v for k, v in tensors.items()},
                  str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(1)
    factors = {n: (torch.randn(RANK, 256, generator=g) * 0.3, torch.randn(256, RANK, generator=g) * 0.3)
               for n in LORA_TARGETS}
    write_peft(root / "adapter", factors, RANK, ALPHA)
    deltas = {n: (ALPHA / RANK) * (b.double() @ a.double()) for n, (a, b) in factors.items()}
    return SimpleNamespace(root=root, tensors=tensors, deltas=deltas, adapter=root / "adapter")


def _ref64(case: SimpleNamespace, name: str) -> torch.Tensor:
    w = case.tensors[f"{name}.weight"].double() * expand(case.tensors[f"{name}.weight_scale_inv"], (256, 256))
    return w + case.deltas[name] if name in case.deltas else w


def test_e8m0_codes_match_torch():
    """Every float8_e8m0fnu code decodes as torch does (2^(e - 127), 255 NaN); powers of two encode back exactly,
    other values round up (a scale may only grow: the codes must still fit e4m3)."""
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.view(E8M0).float().numpy()
    got = e8m0_to_float32(codes.numpy())
    assert np.array_equal(got, ref, equal_nan=True) and np.isnan(got[255])
    assert np.array_equal(e8m0_from_float32(ref[:255]), np.arange(255))
    x = np.float32([3.0, 0.7, 2.0**-127, 2.0**127, 1e-45, 1e38, 0.0, np.nan])
    assert e8m0_from_float32(x).tolist() == [129, 127, 0, 254, 0, 254, 255, 255]


@pytest.mark.parametrize("scale_dtype", ["F32", "F8_E8M0"])
def test_ue8m0_quantize_matches_transformers(scale_dtype):
    """lorafuse's requantization of a weight with ue8m0 scales equals transformers' Fp8Quantize(scale_fmt='ue8m0')
    bit for bit: codes and scales (an all-zero block, magnitudes from 1e-30 to 1e3)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 384, generator=g) * torch.logspace(-30, 3, 256).reshape(-1, 1).float()
    w[:128, :128] = 0
    codes_t, inv_t = transformers_fp8_quantize(w, "ue8m0")
    scheme = Fp8Scaled("t", "fp8", "weight_scale_inv", (128, 128), ue8m0=True)
    codes, comps = scheme.quantize(w.numpy(), 0, (256, 384), {"scale": scale_dtype})
    assert np.array_equal(codes, codes_t.view(torch.uint8).numpy())
    if scale_dtype == "F8_E8M0":
        assert np.array_equal(comps["scale"].reshape(2, 3), inv_t.view(torch.uint8).numpy())
    else:
        assert np.array_equal(comps["scale"].reshape(2, 3), inv_t.float().numpy())
    # plain scales (scale_fmt float) still amax / 448: the same as transformers' within float32 rounding
    codes_f, inv_f = transformers_fp8_quantize(w, "float")
    _, plain = Fp8Scaled("t", "fp8", "weight_scale_inv", (128, 128)).quantize(w.numpy(), 0, (256, 384),
                                                                                {"scale": "F32"})
    np.testing.assert_allclose(plain["scale"].reshape(2, 3), inv_f.numpy(), rtol=2e-7, atol=0)


def test_ue8m0_keep_fp8_writes_powers_of_two(ue8m0, tmp_path, monkeypatch):
    """DeepSeek-V3.1 layout (F32 scales): the merged weights get power-of-two scales, the ones transformers'
    quantizer gives the float64 merge; transformers' loader reads the output unchanged (the repro saw 21%)."""
    out = tmp_path / "out"
    lorafuse.apply(ue8m0.root / "f32", [ue8m0.adapter], out=out, progress=False)
    got = read(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == UE8M0
    for name in LORA_TARGETS:
        codes, scale = got[f"{name}.weight"], got[f"{name}.weight_scale_inv"]
        assert scale.dtype == torch.float32
        ref = _ref64(ue8m0, name)
        _, inv_t = transformers_fp8_quantize(ref.float(), "ue8m0")
        assert torch.equal(scale, inv_t.float())
        back = codes.double() * expand(scale, (256, 256))
        s = expand(scale, (256, 256))
        assert ((back - ref).abs() <= ref.abs() / 16 + s * 2.0**-10 + 1e-6 * ref.abs().max()).all()
    for key in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.k_proj.weight_scale_inv"):
        assert torch.equal(got[key].view(torch.uint8), ue8m0.tensors[key].view(torch.uint8))

    q = load_fp8_with_transformers(out, monkeypatch).model.layers[0].self_attn.q_proj
    assert q.weight_scale_inv.dtype == E8M0  # transformers stores ue8m0 scales as float8_e8m0fnu ...
    file = got["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    assert torch.equal(q.weight_scale_inv.data.float(), file)  # ... and reads the written ones unchanged
    assert torch.equal(q.weight.data.view(torch.uint8), got["model.layers.0.self_attn.q_proj.weight"].view(torch.uint8))


@pytest.mark.parametrize("layout", ["e8m0", "u8"])
def test_e8m0_scales_read_and_written_back(ue8m0, tmp_path, monkeypatch, layout):
    """Scales stored as F8_E8M0 (transformers 5's float8_e8m0fnu) or as their U8 bytes: keep-FP8 writes them
    back in the same dtype, the same weights as from the F32 layout; --dtype bf16 dequantizes with torch's
    float8_e8m0fnu values; info reads the checkpoint. (transformers 5.25's loader cannot open an F8_E8M0 file
    itself, 'unknown dtype F8_E8M0'; it reads the U8 layout, which is checked through it.)"""
    lorafuse.apply(ue8m0.root / "f32", [ue8m0.adapter], out=tmp_path / "f32", progress=False)
    lorafuse.apply(ue8m0.root / layout, [ue8m0.adapter], out=tmp_path / layout, progress=False)
    from_f32, got = read(tmp_path / "f32"), read(tmp_path / layout)
    kinds = dtypes_in_file(tmp_path / layout / "model.safetensors")
    base = read(ue8m0.root / layout)
    for key, t in got.items():
        if key.endswith("scale_inv"):
            assert kinds[key] == {"e8m0": "F8_E8M0", "u8": "U8"}[layout]
            assert torch.equal(t.view(E8M0).float(), from_f32[key])
            if not any(key.startswith(n) for n in LORA_TARGETS):
                assert torch.equal(t.view(torch.uint8), base[key].view(torch.uint8))
        else:
            assert torch.equal(t.view(torch.uint8), from_f32[key].view(torch.uint8)), key
    if layout == "u8":
        q = load_fp8_with_transformers(tmp_path / layout, monkeypatch).model.layers[0].self_attn.q_proj
        assert q.weight_scale_inv.dtype == E8M0
        file = from_f32["model.layers.0.self_attn.q_proj.weight_scale_inv"]
        assert torch.equal(q.weight_scale_inv.data.float(), file)

    lorafuse.apply(ue8m0.root / layout, [ue8m0.adapter], out=tmp_path / "bf16", dtype="bf16", progress=False)
    bf16 = read(tmp_path / "bf16")
    assert not any(k.endswith("scale_inv") for k in bf16)
    for name in (*LORA_TARGETS, "model.layers.0.mlp.up_proj"):
        codes, scale = base[f"{name}.weight"], base[f"{name}.weight_scale_inv"].view(E8M0).float()  # torch's
        ref = codes.double() * expand(scale, (256, 256)) + ue8m0.deltas.get(name, 0)
        assert bf16[f"{name}.weight"].dtype == torch.bfloat16
        assert ((bf16[f"{name}.weight"].double() - ref).abs() <= bf16_ulp(ref)).all(), name

    d = lorafuse.describe(ue8m0.root / layout)
    assert d["dtypes"][{"e8m0": "F8_E8M0", "u8": "U8"}[layout]] == 7 and "ue8m0" in d["quantization"]["scheme"]
    assert d["parameters"] == sum(v.numel() for k, v in ue8m0.tensors.items() if not k.endswith("scale_inv"))


def test_unknown_scale_fmt_refused(ue8m0, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes((ue8m0.root / "f32" / "model.safetensors").read_bytes())
    cfg = json.loads((ue8m0.root / "f32" / "config.json").read_text())
    cfg["quantization_config"]["scale_fmt"] = "ue4m3"
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="scale_fmt 'ue4m3'"):
        lorafuse.apply(base, [ue8m0.adapter], out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 2. values the requantized format cannot hold


def _int8_base(folder: Path, scb: float = 60000.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-127, 128, (4, 8), dtype=torch.int8, generator=g)
    w[:, 0] = 127
    s = torch.full((4,), scb)
    folder.mkdir(parents=True)
    save_file({"a.weight": w, "a.SCB": s, "a.weight_format": torch.tensor(0, dtype=torch.uint8)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}, "torch_dtype": "float16"}))
    return w, s


def _one_entry_adapter(folder: Path, name: str, rows: int, cols: int, value: float) -> torch.Tensor:
    """A rank-1 LoRA adding `value` at [0, 0] of `name`; returns its float64 delta."""
    a, b = torch.zeros(1, cols), torch.zeros(rows, 1)
    a[0, 0], b[0, 0] = 1.0, value
    write_peft(folder, {name: (a, b)}, 1, 1.0)
    return b.double() @ a.double()


def test_int8_requantize_overflow_refused(tmp_path, capsys):
    """A merged LLM.int8 row beyond float16 (bitsandbytes quantizes the weight rounded to float16): refused
    naming the weight, with or without --allow-nonfinite, no numpy warning, nothing written; --dtype fp32 writes
    the float64 merge of bitsandbytes' own dequantize."""
    w, s = _int8_base(tmp_path / "base")
    delta = _one_entry_adapter(tmp_path / "ad", "a", 4, 8, 10000.0)
    for allow in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(NonFiniteError, match=r"a\.weight.*70000.*--dtype fp32"):
                lorafuse.apply(tmp_path / "base", [tmp_path / "ad"], out=tmp_path / "o", requantize=True,
                               allow_nonfinite=allow, progress=False)
        assert not (tmp_path / "o").exists()
    assert main(["apply", str(tmp_path / "base"), str(tmp_path / "ad"), "-o", str(tmp_path / "o"),
                 "--requantize"]) == 1
    err = capsys.readouterr().err
    assert "NonFiniteError" in err and "a.weight" in err and "RuntimeWarning" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(NonFiniteError, match=r"a\.weight \(F16"):  # the 16-bit output: the same refusal
        lorafuse.apply(tmp_path / "base", [tmp_path / "ad"], out=tmp_path / "o", progress=False)

    lorafuse.apply(tmp_path / "base", [tmp_path / "ad"], out=tmp_path / "o32", dtype="fp32", progress=False)
    ref = F.int8_vectorwise_dequant(w, s).double() + delta
    got = read(tmp_path / "o32")["a.weight"]
    assert got.dtype == torch.float32 and torch.equal(got, ref.float())


def test_int8_nonfinite_inputs_are_counted(tmp_path):
    """--allow-nonfinite with a NaN in the adapter: the NaN row is written (the user asked), and the report
    counts its values instead of leaving them out silently; the other rows' error is bitsandbytes' own."""
    w, s = _int8_base(tmp_path / "base", scb=100.0)
    a, b = torch.full((1, 8), 0.5), torch.zeros(4, 1)
    b[0, 0], b[1, 0] = float("nan"), 3.0
    write_peft(tmp_path / "ad", {"a": (a, b)}, 1, 1.0)
    report = lorafuse.apply(tmp_path / "base", [tmp_path / "ad"], out=tmp_path / "o", requantize=True,
                            allow_nonfinite=True, progress=False)
    e = report.requantized["a.weight"]
    assert e["nonfinite_values"] == 8
    merged = (F.int8_vectorwise_dequant(w, s).double() + b.double() @ a.double())[1:]
    codes, scb = F.int8_vectorwise_quant(merged.to(torch.float16))[:2]
    back = F.int8_vectorwise_dequant(codes, scb).double()
    assert np.isclose(e["max_abs_error"], float((back - merged).abs().max()), rtol=1e-5)
    got = read(tmp_path / "o")
    assert torch.equal(got["a.weight"][1:], codes) and torch.isnan(got["a.SCB"][0])


def test_quant_error_counts_nonfinite():
    err = QuantError()
    err.add(np.float32([1.0, np.nan, 2.0, 3.0]), np.float32([1.5, np.nan, np.inf, 3.0]))
    d = err.as_dict()
    assert d["nonfinite_values"] == 2 and d["max_abs_error"] == 0.5
    assert np.isclose(d["rel_fro_error"], np.sqrt(0.25 / 10.0))


def test_4bit_requantize_overflow_refused(tmp_path):
    """A 4-bit weight whose quant state says float16 (bitsandbytes dequantizes it to float16): a merged value
    beyond 65504 is refused when requantized, as the 16-bit output is; --dtype fp32 writes the float64 merge of
    bitsandbytes' dequantize_4bit."""
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(64, 64, generator=g) * 0.05).to(torch.float16)
    packed, st = F.quantize_4bit(w.float(), blocksize=64, quant_type="nf4")
    st.dtype = torch.float16
    (tmp_path / "base").mkdir()
    save_file({"a.weight": packed, **{f"a.weight.{k}": v for k, v in st.as_dict(packed=True).items()}},
              str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"torch_dtype": "float16", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    delta = _one_entry_adapter(tmp_path / "ad", "a", 64, 64, 1e5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NonFiniteError, match=r"a\.weight.*overflow F16"):
            lorafuse.apply(tmp_path / "base", [tmp_path / "ad"], out=tmp_path / "o", requantize=True,
                           progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(NonFiniteError, match=r"a\.weight \(F16"):
        lorafuse.apply(tmp_path / "base", [tmp_path / "ad"], out=tmp_path / "o", progress=False)
    lorafuse.apply(tmp_path / "base", [tmp_path / "ad"], out=tmp_path / "o32", dtype="fp32", progress=False)
    st.dtype = torch.float32
    ref = F.dequantize_4bit(packed, st).double() + delta
    assert torch.equal(read(tmp_path / "o32")["a.weight"], ref.float())


def test_fp8_scale_overflow_refused(tmp_path):
    """compressed-tensors float8 with F16 per-channel scales: a merged row whose amax / 448 is beyond F16 is
    refused (its scale would be Inf, its codes NaN); --dtype fp32 writes the float64 merge."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(16, 32, generator=g) * 0.05
    scale = (w.abs().amax(dim=1, keepdim=True) / 448).to(torch.float16)
    codes = (w / scale.float()).clamp(-448, 448).to(F8)
    (tmp_path / "base").mkdir()
    save_file({"m.weight": codes, "m.weight_scale": scale}, str(tmp_path / "base" / "model.safetensors"))
    weights = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
    (tmp_path / "base" / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"g": {"weights": weights, "targets": ["Linear"]}}}}))
    delta = _one_entry_adapter(tmp_path / "ad", "m", 16, 32, 1e8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NonFiniteError, match=r"m\.weight.*float8"):
            lorafuse.apply(tmp_path / "base", [tmp_path / "ad"], out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    lorafuse.apply(tmp_path / "base", [tmp_path / "ad"], out=tmp_path / "o32", dtype="fp32", progress=False)
    ref = codes.double() * scale.double() + delta
    assert torch.equal(read(tmp_path / "o32")["m.weight"], ref.float())


# ---------------------------------------------------------------- 3. a quantized weight without its companions


def _bnb4(w: torch.Tensor, quant_storage: torch.dtype = torch.uint8) -> dict[str, torch.Tensor]:
    packed, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=quant_storage)
    st.dtype = torch.bfloat16
    return {"weight": packed, **{f"weight.{k}": v for k, v in st.as_dict(packed=True).items()}}


@pytest.mark.parametrize("lost", ["4bit", "4bit-bf16-storage", "int8"])
def test_weight_without_companions_refused(tmp_path, lost):
    """One bitsandbytes weight lost its quant state / absmax / quant_map (or its SCB): refused naming it, in the
    16-bit output and with --requantize, nothing written (it was copied through as a weight)."""
    g = torch.Generator().manual_seed(0)
    storage = torch.bfloat16 if "bf16" in lost else torch.uint8
    tensors: dict[str, torch.Tensor] = {}
    if lost == "int8":
        for n in ("a", "b"):
            codes, scb = F.int8_vectorwise_quant(torch.randn(64, 64, generator=g).half())[:2]
            tensors[f"{n}.weight"] = codes
            if n == "a":
                tensors.update({"a.SCB": scb, "a.weight_format": torch.tensor(0, dtype=torch.uint8)})
        qc: dict[str, object] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    else:
        for n in ("a", "b"):
            t = _bnb4(torch.randn(64, 64, generator=g) * 0.05, storage)
            tensors.update({f"{n}.{k}": v for k, v in t.items() if n == "a" or k == "weight"})
        qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
              "bnb_4bit_quant_storage": "bfloat16" if "bf16" in lost else "uint8"}
    (tmp_path / "base").mkdir()
    save_file(tensors, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "quantization_config": qc}))
    write_peft(tmp_path / "ad", {"a": (torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g))}, 2, 2.0)
    for requantize in (None, True):
        with pytest.raises(UnsupportedError, match=r"b\.weight \((U8|BF16|I8) \[.*no bitsandbytes companions"):
            lorafuse.apply(tmp_path / "base", [tmp_path / "ad"], out=tmp_path / "o", requantize=requantize,
                           progress=False)
        assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 4. transformers' fp8 variants


def test_fp8_block_size_null_is_per_tensor(tmp_path):
    """`weight_block_size: null` is transformers' per-tensor FP8: merged exactly as the same file without the
    key (one fresh scale amax / 448), the config kept as it was."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 160, generator=g) * 0.05
    s = (w.abs().max() / 448).reshape(())
    codes = (w / s).clamp(-448, 448).to(F8)
    a, b = torch.randn(2, 160, generator=g) * 0.1, torch.randn(200, 2, generator=g) * 0.1
    write_peft(tmp_path / "ad", {"m": (a, b)}, 2, 2.0)
    ref = codes.double() * s.double() + b.double() @ a.double()
    outs = {}
    for name, qc in (("null", {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": None}),
                     ("absent", {"quant_method": "fp8", "activation_scheme": "dynamic"})):
        d = tmp_path / name
        d.mkdir()
        save_file({"m.weight": codes, "m.weight_scale_inv": s}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "quantization_config": qc}))
        lorafuse.apply(d, [tmp_path / "ad"], out=tmp_path / f"o_{name}", progress=False)
        outs[name] = read(tmp_path / f"o_{name}")
        assert json.loads((tmp_path / f"o_{name}" / "config.json").read_text())["quantization_config"] == qc
    for k in outs["null"]:
        null, absent = outs["null"][k].reshape(-1), outs["absent"][k].reshape(-1)
        assert torch.equal(null.view(torch.uint8), absent.view(torch.uint8)), k
    new_s = outs["null"]["m.weight_scale_inv"]
    assert new_s.shape == () and torch.isclose(new_s.double(), ref.abs().max() / 448, rtol=1e-6)
    back = outs["null"]["m.weight"].double() * new_s.double()
    assert ((back - ref).abs() <= ref.abs() / 16 + new_s.double() * 2.0**-10 + 1e-9).all()


def test_fp8_static_activation_scale(tmp_path):
    """activation_scheme static stores `activation_scale` beside the weight: kept as it is with the FP8 output,
    dropped with the quantization_config by --dtype (transformers' name for input_scale)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g) * 0.05
    amax = w.reshape(2, 128, 1, 128).abs().amax(dim=(1, 3))
    s = amax / 448
    codes = (w / expand(s, (256, 128)).float()).clamp(-448, 448).to(F8)
    act = torch.tensor(0.02)
    (tmp_path / "q").mkdir()
    save_file({"m.weight": codes, "m.weight_scale_inv": s, "m.activation_scale": act},
              str(tmp_path / "q" / "model.safetensors"))
    qc = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}
    (tmp_path / "q" / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "quantization_config": qc}))
    a, b = torch.randn(2, 128, generator=g) * 0.1, torch.randn(256, 2, generator=g) * 0.1
    write_peft(tmp_path / "ad", {"m": (a, b)}, 2, 2.0)
    ref = codes.double() * expand(s, (256, 128)) + b.double() @ a.double()

    lorafuse.apply(tmp_path / "q", [tmp_path / "ad"], out=tmp_path / "keep", progress=False)
    keep = read(tmp_path / "keep")
    assert torch.equal(keep["m.activation_scale"], act)
    s_new = expand(keep["m.weight_scale_inv"], (256, 128))
    assert ((keep["m.weight"].double() * s_new - ref).abs() <= ref.abs() / 16 + s_new * 2.0**-10).all()

    lorafuse.apply(tmp_path / "q", [tmp_path / "ad"], out=tmp_path / "bf16", dtype="bf16", progress=False)
    bf16 = read(tmp_path / "bf16")
    assert set(bf16) == {"m.weight"}
    assert ((bf16["m.weight"].double() - ref).abs() <= bf16_ulp(ref)).all()
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())


# ---------------------------------------------------------------- 5 / 6. info


def test_info_counts_real_parameters(tmp_path, capsys):
    """A bitsandbytes checkpoint (4-bit nested and not, bf16 storage, LLM.int8, a bf16 norm): `info` counts each
    weight by its real shape (bitsandbytes' quant state), not the packed bytes, and no absmax / quant map /
    quant state / SCB as parameters; the config names no quant type, the tensors say nf4 / fp4."""
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {"norm.weight": torch.ones(96, dtype=torch.bfloat16)}
    shapes = {"a": (96, 64), "b": (40, 96), "c": (64, 64), "d": (32, 48)}
    for n, qt, nested in (("a", "nf4", True), ("b", "fp4", False), ("c", "nf4", False)):
        packed, st = F.quantize_4bit(torch.randn(*shapes[n], generator=g), blocksize=64, quant_type=qt,
                                     compress_statistics=nested)
        tensors[f"{n}.weight"] = packed
        tensors.update({f"{n}.weight.{k}": v for k, v in st.as_dict(packed=True).items()})
    codes, scb = F.int8_vectorwise_quant(torch.randn(*shapes["d"], generator=g).half())[:2]
    tensors.update({"d.weight": codes, "d.SCB": scb, "d.weight_format": torch.tensor(0, dtype=torch.uint8)})
    (tmp_path / "q").mkdir()
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"))
    (tmp_path / "q" / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}))
    real = 96 + sum(int(np.prod(s)) for s in shapes.values())
    d = lorafuse.describe(tmp_path / "q")
    assert d["parameters"] == real
    scheme = d["quantization"]["scheme"]
    assert "fp4 / nf4" in scheme and "LLM.int8" in scheme
    assert main(["info", str(tmp_path / "q")]) == 0
    assert f"parameters  {real:,}" in capsys.readouterr().out


def test_bnb_config_without_quant_type_described_by_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    (tmp_path / "q").mkdir()
    save_file({f"a.{k}": v for k, v in _bnb4(torch.randn(64, 64, generator=g)).items()},
              str(tmp_path / "q" / "model.safetensors"))
    (tmp_path / "q" / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}))
    scheme = lorafuse.describe(tmp_path / "q")["quantization"]["scheme"]
    assert scheme == "bitsandbytes 4-bit nf4"
    assert lorafuse.describe(tmp_path / "q")["parameters"] == 64 * 64
