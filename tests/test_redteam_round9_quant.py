"""Red-team round 9, quantized and fused bases: FP8 (block-scaled), bitsandbytes 4-bit, MoE experts (stacked and per
expert), Phi-3's fused qkv / gate_up, GGUF models given as a base.

Bases are written with the real libraries (torch float8 dtypes, bitsandbytes' own quantize_4bit on CPU, gguf's
writer); merged results are compared with a numpy float64 reference of dequantize -> add the LoRA delta (PEFT's
layout) -> quantize again as docs/formats.md says. Refusals must name the file or tensor and the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from redteam_fixtures import PREFIX, peft_deltas, peft_folder, run_cli
from safetensors.torch import load_file, save_file

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"


def _fp8_base(folder: Path, shapes: dict[str, tuple[int, int]], block: tuple[int, int], model_type: str = "llama",
              extra: dict[str, object] | None = None) -> dict[str, torch.Tensor]:
    """A transformers `fp8` checkpoint: F8_E4M3 codes and an F32 weight_scale_inv per block (partial edge blocks)."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    bm, bn = block
    t: dict[str, torch.Tensor] = {}
    for m, (o, i) in shapes.items():
        grid = (-(-o // bm), -(-i // bn))
        s = torch.rand(grid, generator=g) * 1e-3 + 1e-4
        full = s.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:o, :i]
        t[m + ".weight"] = (torch.randn(o, i, generator=g) * 0.05 / full).clamp(-448, 448).to(torch.float8_e4m3fn)
        t[m + ".weight_scale_inv"] = s
    save_file(t, str(folder / "model.safetensors"))
    config = {"model_type": model_type, "torch_dtype": "bfloat16", **(extra or {}),
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(block)}}
    (folder / "config.json").write_text(json.dumps(config))
    return t


def _fp8_values(t: dict[str, torch.Tensor], key: str, block: tuple[int, int]) -> np.ndarray:
    """codes * scale[block], float64 (DeepSeek-V3's block layout, partial edge blocks)."""
    c = t[key + ".weight"].double().numpy()
    if key + ".weight_scale_inv" not in t:
        return c
    s = t[key + ".weight_scale_inv"].double().numpy()
    return c * np.repeat(np.repeat(s, block[0], 0), block[1], 1)[: c.shape[0], : c.shape[1]]


def _e4m3_requantized(x: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """x quantized as docs/formats.md says (a fresh float32 scale amax / 448 per block, codes round-to-nearest-even
    of x / scale clamped to +-448: torch's float8_e4m3fn cast) and dequantized again, float64."""
    bm, bn = block
    out = np.empty_like(x)
    for r in range(0, x.shape[0], bm):
        for c in range(0, x.shape[1], bn):
            b = x[r : r + bm, c : c + bn].astype(np.float32)
            s = np.float32(np.abs(b).max() / np.float32(448)) or np.float32(1)
            q = torch.from_numpy(np.clip(b / s, -448, 448)).to(torch.float8_e4m3fn).double().numpy()
            out[r : r + bm, c : c + bn] = q * np.float64(s)
    return out


def _bnb4(name: str, w: torch.Tensor, nested: bool = False) -> dict[str, torch.Tensor]:
    """A bitsandbytes nf4 weight and its companions, as transformers' save_pretrained writes them (bitsandbytes'
    own quantize_4bit and QuantState.as_dict)."""
    F = pytest.importorskip("bitsandbytes.functional")
    with torch._dynamo.config.patch(disable=True):
        packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    return {name: packed, **{f"{name}.{k}": v for k, v in qs.as_dict(packed=True).items()}}


# ---------------------------------------------------------------------------------------------- GGUF as a base


def _gguf_model(path: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("name", ["model-Q8_0.gguf", "model.safetensors"])
def test_a_gguf_model_file_given_as_the_base_says_what_to_do(tmp_path: Path, name: str) -> None:
    """docs/formats.md: `apply` on a `.gguf` file, or on a folder holding only `.gguf` files, says so and what to do
    instead. The folder did; the file got only 'not a safetensors file: it looks like a GGUF file' (whatever its
    name), and so did extract's BASE."""
    base = _gguf_model(tmp_path / name)
    adapter = peft_folder(tmp_path / "a", {Q: (64, 256)}, 1)
    for argv in (["apply", str(base), str(adapter), "-o", str(tmp_path / "out")],
                 ["extract", str(base), str(base), "--rank", "2", "-o", str(tmp_path / "x")]):
        code, _, err = run_cli(argv)
        assert code != 0 and "Traceback" not in err, err
        assert str(base) in err and "GGUF" in err, err
        assert "convert_hf_to_gguf" in err and "--to gguf" in err, err  # what to do instead
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- a non-finite scale names the scale


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fp8_scale_that_is_not_finite_is_named(tmp_path: Path, bad: float) -> None:
    """A NaN / Inf block scale makes the dequantized weight NaN / Inf: refused (without --allow-nonfinite), and the
    message names the scale tensor it came from (it said only 'its base weight holds NaN or Inf', while the codes
    are finite)."""
    _fp8_base(tmp_path / "base", {Q: (256, 256)}, (128, 128))
    t = load_file(str(tmp_path / "base" / "model.safetensors"))
    t[Q + ".weight_scale_inv"][1, 0] = bad
    save_file(t, str(tmp_path / "base" / "model.safetensors"))
    adapter = peft_folder(tmp_path / "a", {Q: (256, 256)}, 1)
    for extra in ([], ["--dtype", "bf16"]):
        code, _, err = run_cli(["apply", str(tmp_path / "base"), str(adapter), "-o", str(tmp_path / "out"), *extra])
        assert code == 1 and "NonFiniteError" in err and "Traceback" not in err, err
        assert Q + ".weight_scale_inv" in err and "model.safetensors" in err, err
        assert not (tmp_path / "out").exists()


def test_bnb_absmax_that_is_not_finite_is_named(tmp_path: Path) -> None:
    """The same for a bitsandbytes 4-bit weight whose absmax holds NaN: the absmax tensor is named."""
    (tmp_path / "base").mkdir()
    g = torch.Generator().manual_seed(0)
    t = _bnb4(Q + ".weight", torch.randn(64, 64, generator=g).to(torch.bfloat16))
    t[Q + ".weight.absmax"][3] = float("nan")
    save_file(t, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    adapter = peft_folder(tmp_path / "a", {Q: (64, 64)}, 1)
    code, _, err = run_cli(["apply", str(tmp_path / "base"), str(adapter), "-o", str(tmp_path / "out")])
    assert code == 1 and "NonFiniteError" in err and "Traceback" not in err, err
    assert Q + ".weight.absmax" in err, err


# ------------------------------------------------------------------------------------------------- MoE experts


def _stacked_base(folder: Path, e: int = 4, h: int = 16, i: int = 8) -> None:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.randn(e, 2 * i, h, generator=g),
               "model.layers.0.mlp.experts.down_proj": torch.randn(e, h, i, generator=g),
               "model.layers.1.mlp.gate_proj.weight": torch.zeros(i, h)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))


@pytest.mark.parametrize("leaf,shape", [("gate_proj", (8, 16)), ("down_proj", (16, 8))])
def test_a_lora_on_one_expert_of_stacked_experts_names_the_stacked_tensors(tmp_path: Path, leaf: str,
                                                                           shape: tuple[int, int]) -> None:
    """A LoRA on one expert's own layer (`experts.3.gate_proj`, as transformers 4 named it) onto a base that stacks
    the experts in 3-D tensors (`experts.gate_up_proj` [E, 2I, H]) has no weight of its own: refused, nothing
    written, and the message names the stacked tensors (it said 'no base weight belongs to a layer named
    gate_proj' for gate_proj, and nothing at all for down_proj, a name the base does hold)."""
    _stacked_base(tmp_path / "base")
    adapter = peft_folder(tmp_path / "a", {f"model.layers.0.mlp.experts.3.{leaf}": shape}, 1)
    code, _, err = run_cli(["apply", str(tmp_path / "base"), str(adapter), "-o", str(tmp_path / "out")])
    assert code != 0 and "MissingModuleError" in err and "Traceback" not in err, err
    assert "model.layers.0.mlp.experts.gate_up_proj" in err and "[4, 16, 16]" in err, err
    assert not (tmp_path / "out").exists()


def test_a_dense_layer_beside_stacked_experts_is_not_said_to_be_stacked(tmp_path: Path) -> None:
    """The hint speaks of the layer's own experts only: a module of layer 5 (not in the base) is not told about
    layer 0's stacked tensors."""
    _stacked_base(tmp_path / "base")
    adapter = peft_folder(tmp_path / "a", {"model.layers.5.mlp.experts.3.gate_proj": (8, 16)}, 1)
    code, _, err = run_cli(["apply", str(tmp_path / "base"), str(adapter), "-o", str(tmp_path / "out")])
    assert code != 0 and "MissingModuleError" in err and "3-D tensors" not in err, err


def _expert_adapter(folder: Path, e: int, h: int, i: int, r: int, seed: int = 5) -> dict[str, np.ndarray]:
    """A PEFT target_parameters LoRA on mlp.experts.gate_up_proj / down_proj (PEFT 0.21's layout: the outermost
    wrapper, down_proj, saved as `experts.lora_A`, gate_up as `experts.base_layer.lora_A`), alpha 4."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    f = {"A_gu": rng.standard_normal((r * e, h)), "B_gu": rng.standard_normal((2 * i, r * e)),
         "A_d": rng.standard_normal((r * e, i)), "B_d": rng.standard_normal((h, r * e))}
    f = {k: (v * 0.3).astype(np.float32) for k, v in f.items()}
    m = PREFIX + "model.layers.0.mlp.experts"
    save_file({m + ".lora_A.weight": torch.from_numpy(f["A_d"]), m + ".lora_B.weight": torch.from_numpy(f["B_d"]),
               m + ".base_layer.lora_A.weight": torch.from_numpy(f["A_gu"]),
               m + ".base_layer.lora_B.weight": torch.from_numpy(f["B_gu"])}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": None,
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}))
    return f


def test_per_expert_base_missing_an_expert_is_named(tmp_path: Path) -> None:
    """A per-expert checkpoint with a hole (experts 0, 1, 3: expert 2 lost) under a LoRA on the fused parameters:
    refused, naming the missing weights (it said the base had 2 experts and the adapter was made for a model with 4,
    which the base is)."""
    (tmp_path / "base").mkdir()
    rng = np.random.default_rng(0)
    t = {}
    for e in (0, 1, 3):
        for part, shape in (("gate_proj", (8, 16)), ("up_proj", (8, 16)), ("down_proj", (16, 8))):
            t[f"model.layers.0.mlp.experts.{e}.{part}.weight"] = torch.from_numpy(
                rng.standard_normal(shape).astype(np.float32))
    save_file(t, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    _expert_adapter(tmp_path / "a", 4, 16, 8, 2)
    code, _, err = run_cli(["apply", str(tmp_path / "base"), str(tmp_path / "a"), "-o", str(tmp_path / "out")])
    assert code != 0 and "Traceback" not in err, err
    assert "model.layers.0.mlp.experts.2.gate_proj.weight" in err and "missing" in err, err
    assert "made for a model with" not in err, err
    assert not (tmp_path / "out").exists()


def test_fused_expert_lora_onto_a_per_expert_fp8_base(tmp_path: Path) -> None:
    """DeepSeek-V3's layout: one FP8 weight per expert (block scales, partial edge blocks), a LoRA on the fused
    parameters (target_parameters): expert e's gate_up delta rows [0, I) land on its gate_proj, [I, 2I) on up_proj,
    down on down_proj, each dequantized, merged and quantized again with fresh block scales (numpy reference);
    --dtype fp32 gives the float64 merge within float32 rounding."""
    e, h, i, r, block = 4, 32, 24, 2, (16, 16)
    shapes = {}
    for x in range(e):
        m = f"model.layers.0.mlp.experts.{x}"
        shapes.update({f"{m}.gate_proj": (i, h), f"{m}.up_proj": (i, h), f"{m}.down_proj": (h, i)})
    base = _fp8_base(tmp_path / "base", shapes, block, model_type="deepseek_v3")
    f = _expert_adapter(tmp_path / "a", e, h, i, r)
    deltas = {}
    for x in range(e):
        gu = 2.0 * f["B_gu"][:, x::e].astype(np.float64) @ f["A_gu"][x * r : (x + 1) * r].astype(np.float64)
        deltas[f"model.layers.0.mlp.experts.{x}.gate_proj"] = gu[:i]
        deltas[f"model.layers.0.mlp.experts.{x}.up_proj"] = gu[i:]
        deltas[f"model.layers.0.mlp.experts.{x}.down_proj"] = (
            2.0 * f["B_d"][:, x::e].astype(np.float64) @ f["A_d"][x * r : (x + 1) * r].astype(np.float64))
    for extra in ([], ["--dtype", "fp32"]):
        out = tmp_path / ("out" + "".join(extra))
        code, _, err = run_cli(["apply", str(tmp_path / "base"), str(tmp_path / "a"), "-o", str(out), *extra])
        assert code == 0, err
        o = load_file(str(out / "model.safetensors"))
        for key, delta in deltas.items():
            ref = _fp8_values(base, key, block) + delta
            got = _fp8_values(o, key, block)
            if extra:
                np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
            else:
                assert o[key + ".weight"].dtype == torch.float8_e4m3fn
                assert o[key + ".weight_scale_inv"].shape == base[key + ".weight_scale_inv"].shape
                # the float32 merge requantized: within one e4m3 step of the float64 reference's requantization
                want = _e4m3_requantized(ref, block)
                step = np.abs(want) / 8 + 1e-9
                assert (np.abs(got - want) <= step).all(), key


# ---------------------------------------------------------------------------------- Phi-3 fused qkv / gate_up


def test_separate_qkv_and_gate_up_loras_onto_a_fused_fp8_phi3(tmp_path: Path) -> None:
    """q / k / v and gate / up LoRAs on a Phi-3 checkpoint whose fused qkv_proj / gate_up_proj are block FP8, the
    parts' rows not aligned to the 32-row blocks (q 96, k = v 32; I = 80): each delta on its row block, the weight
    requantized whole (numpy reference), and --dtype fp32 exact."""
    hidden, heads, kv, inter, block = 96, 6, 2, 80, (32, 32)
    hd = hidden // heads
    qkv, gu = "model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"
    base = _fp8_base(tmp_path / "base", {qkv: (heads * hd + 2 * kv * hd, hidden), gu: (2 * inter, hidden)}, block,
                     model_type="phi3", extra={"hidden_size": hidden, "num_attention_heads": heads,
                                               "num_key_value_heads": kv, "intermediate_size": inter})
    mods = {"model.layers.0.self_attn.q_proj": (heads * hd, hidden),
            "model.layers.0.self_attn.k_proj": (kv * hd, hidden), "model.layers.0.self_attn.v_proj": (kv * hd, hidden),
            "model.layers.0.mlp.gate_proj": (inter, hidden), "model.layers.0.mlp.up_proj": (inter, hidden)}
    adapter = peft_folder(tmp_path / "a", mods, 1)
    d = peft_deltas(adapter)
    q, k = heads * hd, kv * hd
    ref_qkv = _fp8_values(base, qkv, block)
    ref_qkv[:q] += d["model.layers.0.self_attn.q_proj"]
    ref_qkv[q : q + k] += d["model.layers.0.self_attn.k_proj"]
    ref_qkv[q + k :] += d["model.layers.0.self_attn.v_proj"]
    ref_gu = _fp8_values(base, gu, block)
    ref_gu[:inter] += d["model.layers.0.mlp.gate_proj"]
    ref_gu[inter:] += d["model.layers.0.mlp.up_proj"]
    for extra in ([], ["--dtype", "fp32"]):
        out = tmp_path / ("out" + "".join(extra))
        code, _, err = run_cli(["apply", str(tmp_path / "base"), str(adapter), "-o", str(out), *extra])
        assert code == 0, err
        o = load_file(str(out / "model.safetensors"))
        for key, ref in ((qkv, ref_qkv), (gu, ref_gu)):
            got = _fp8_values(o, key, block)
            if extra:
                np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
            else:
                want = _e4m3_requantized(ref, block)
                assert (np.abs(got - want) <= np.abs(want) / 8 + 1e-9).all(), key


# ------------------------------------------------------------------------------- bitsandbytes odd shapes, nested


@pytest.mark.parametrize("shape", [(33, 7), (301, 129)])
def test_bnb_nested_requantize_of_odd_shapes_is_bitsandbytes_quantize(tmp_path: Path, shape: tuple[int, int]) -> None:
    """Partial last blocks (33 * 7 = 231 elements, blocks of 64) and more than one nested block: the requantized
    codes equal bitsandbytes' own quantize_4bit of the float32 merge (dequantized with bitsandbytes' reference
    kernel, which indexes the flattened weight), and the written quant state dequantizes (bitsandbytes'
    QuantState.from_dict) to within the nested 8-bit step of that merge."""
    F = pytest.importorskip("bitsandbytes.functional")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    (tmp_path / "base").mkdir()
    g = torch.Generator().manual_seed(0)
    t = _bnb4(Q + ".weight", torch.randn(*shape, generator=g).to(torch.bfloat16), nested=True)
    save_file(t, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True}}))
    adapter = peft_folder(tmp_path / "a", {Q: shape}, 1)
    code, _, err = run_cli(["apply", str(tmp_path / "base"), str(adapter), "-o", str(tmp_path / "out"), "--requantize"])
    assert code == 0, err
    o = load_file(str(tmp_path / "out" / "model.safetensors"))

    def dequant(sd: dict[str, torch.Tensor]) -> np.ndarray:
        qs = F.QuantState.from_dict({k.removeprefix(Q + ".weight."): v for k, v in sd.items()
                                     if k.startswith(Q + ".weight.")}, device=torch.device("cpu"))
        with torch._dynamo.config.patch(disable=True):
            absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        return _dequantize_4bit_compute(sd[Q + ".weight"].view(torch.uint8).reshape(-1), absmax.float(),
                                        _get_4bit_code("nf4", torch.device("cpu")), 64, qs.shape,
                                        torch.float32).double().numpy()

    merged = dequant(t) + peft_deltas(adapter)[Q]
    with torch._dynamo.config.patch(disable=True):
        codes, _ = F.quantize_4bit(torch.from_numpy(merged.astype(np.float32)), blocksize=64, quant_type="nf4",
                                   compress_statistics=True)
    assert torch.equal(codes, o[Q + ".weight"])
    bound = np.abs(merged).max() * (0.16 + 2.0**-6)  # half nf4's widest gap, plus the nested absmax's 8-bit step
    assert np.abs(dequant(o) - merged).max() <= bound


def _nf4_dequant(packed: torch.Tensor, absmax: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """nf4 codes (high nibble first, along the flattened weight) times their block's absmax, float64 (numpy)."""
    from lorafuse.io.quant_bnb import code_table

    b = packed.view(torch.uint8).reshape(-1).numpy()
    codes = np.stack([b >> 4, b & 15], axis=1).reshape(-1)[: shape[0] * shape[1]]
    scale = np.repeat(absmax.astype(np.float64), 64)[: codes.size]
    return (code_table("nf4")[codes].astype(np.float64) * scale).reshape(shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_bnb_absmax_stored_in_another_float_dtype_is_requantized_in_it(tmp_path: Path, dtype: torch.dtype) -> None:
    """A 4-bit weight whose (not nested) absmax is stored BF16 / F16 / F64 instead of bitsandbytes' F32 is read (the
    16-bit output was written); --requantize stopped mid-run with 'the requantized companion has 256 bytes, but the
    base's BF16 [64] holds 128'. Now the fresh absmax is written in the base's dtype and the written weight is the
    merge within nf4's rounding."""
    (tmp_path / "base").mkdir()
    g = torch.Generator().manual_seed(0)
    t = _bnb4(Q + ".weight", torch.randn(64, 64, generator=g).to(torch.bfloat16))
    t[Q + ".weight.absmax"] = t[Q + ".weight.absmax"].to(dtype)
    save_file(t, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    adapter = peft_folder(tmp_path / "a", {Q: (64, 64)}, 1)
    code, _, err = run_cli(["apply", str(tmp_path / "base"), str(adapter), "-o", str(tmp_path / "out"), "--requantize"])
    assert code == 0 and "Traceback" not in err, err
    o = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert o[Q + ".weight.absmax"].dtype == dtype and o[Q + ".weight.absmax"].shape == (64,)
    merged = _nf4_dequant(t[Q + ".weight"], t[Q + ".weight.absmax"].double().numpy(), (64, 64)) + \
        peft_deltas(adapter)[Q]
    got = _nf4_dequant(o[Q + ".weight"], o[Q + ".weight.absmax"].double().numpy(), (64, 64))
    absmax = np.abs(merged.reshape(-1, 64)).max(axis=1)
    assert np.allclose(o[Q + ".weight.absmax"].double().numpy(), absmax, rtol=2.0**-7)
    assert (np.abs(got - merged).reshape(-1, 64) <= absmax[:, None] * (0.16 + 2.0**-7)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bnb_nested_absmax_stored_in_another_float_dtype_is_requantized_in_it(tmp_path: Path,
                                                                            dtype: torch.dtype) -> None:
    """The same for double quantization: a nested_absmax stored F16 / BF16 (read by lorafuse) stopped --requantize
    mid-run (the fresh nested absmax was written as float32 bytes); now written in its dtype, and the output reads
    back (nested map, offset and nested absmax, numpy) within nf4's rounding plus the 8-bit absmax step."""
    (tmp_path / "base").mkdir()
    g = torch.Generator().manual_seed(0)
    t = _bnb4(Q + ".weight", torch.randn(96, 64, generator=g).to(torch.bfloat16), nested=True)
    t[Q + ".weight.nested_absmax"] = t[Q + ".weight.nested_absmax"].to(dtype)
    save_file(t, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True}}))
    adapter = peft_folder(tmp_path / "a", {Q: (96, 64)}, 1)
    code, _, err = run_cli(["apply", str(tmp_path / "base"), str(adapter), "-o", str(tmp_path / "out"), "--requantize"])
    assert code == 0 and "Traceback" not in err, err
    o = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert o[Q + ".weight.nested_absmax"].dtype == dtype

    def absmax(sd: dict[str, torch.Tensor]) -> np.ndarray:
        state = json.loads(bytes(sd[Q + ".weight.quant_state.bitsandbytes__nf4"].numpy()).decode())
        nmap = sd[Q + ".weight.nested_quant_map"].double().numpy()
        codes = sd[Q + ".weight.absmax"].numpy()
        nabs = np.repeat(sd[Q + ".weight.nested_absmax"].double().numpy(), state["nested_blocksize"])[: codes.size]
        return nmap[codes] * nabs + state["nested_offset"]

    merged = _nf4_dequant(t[Q + ".weight"], absmax(t), (96, 64)) + peft_deltas(adapter)[Q]
    got = _nf4_dequant(o[Q + ".weight"], absmax(o), (96, 64))
    top = np.abs(merged.reshape(-1, 64)).max(axis=1)
    assert (np.abs(got - merged).reshape(-1, 64) <= top[:, None] * 0.16 + top.max() * 2.0**-6).all()


def test_fp8_block_holding_a_nan_keeps_its_finite_values(tmp_path: Path) -> None:
    """--allow-nonfinite with a NaN in a block-FP8 weight (a NaN code, 0x7F, in the base): the NaN is written as
    e4m3's NaN and counted, and the block's finite values are requantized with the scale of the finite values
    (amax / 448). They were quantized with scale 1 (the NaN block's amax is NaN), which rounds weights of a few
    hundredths to e4m3's coarse low range (and smaller ones to 0), while the report's error looked normal."""
    import lorafuse

    block = (64, 64)
    base = _fp8_base(tmp_path / "base", {Q: (128, 128)}, block)
    codes = base[Q + ".weight"].view(torch.uint8)
    codes[3, 5] = 0x7F
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    adapter = peft_folder(tmp_path / "a", {Q: (128, 128)}, 1, alpha=0.002)
    report = lorafuse.apply(tmp_path / "base", [adapter], out=tmp_path / "out", allow_nonfinite=True)
    assert report.requantized[Q + ".weight"]["nonfinite_values"] == 1
    o = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref = _fp8_values(base, Q, block) + peft_deltas(adapter)[Q]
    got = _fp8_values(o, Q, block)
    assert np.isnan(got[3, 5]) and np.isfinite(np.delete(got.reshape(-1), 3 * 128 + 5)).all()
    finite = np.where(np.isfinite(ref), ref, 0.0)
    want = _e4m3_requantized(finite, block)
    want[3, 5] = np.nan
    scale = np.float32(np.abs(finite[:64, :64]).max() / np.float32(448))
    assert np.isclose(o[Q + ".weight_scale_inv"][0, 0].item(), scale, rtol=1e-6)
    mask = np.isfinite(ref)
    assert (np.abs(got - want)[mask] <= np.abs(want)[mask] / 8 + 1e-9).all()
