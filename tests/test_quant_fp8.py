"""apply on quantized bases (issue 17): block-scaled float8 merged against float64 references built here
with torch, and every quantization lorafuse cannot honour refused by name.

The FP8 checkpoints are made in the DeepSeek-V3 / transformers `fp8` layout: `weight` F8_E4M3, one
`weight_scale_inv` F32 per 128x128 block (partial edge blocks included), W = codes * scale_inv[block].
References: float64 dequant + the LoRA delta in float64; bf16 outputs within one bf16 ulp of it; FP8
outputs, dequantized, within the FP8 rounding bound of it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import LorafuseError, UnsupportedError
from lorafuse.io.quant import e4m3_from_float32

F8 = torch.float8_e4m3fn
BLOCK = 128
PREFIX = "base_model.model."
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
# name -> (out, in); q_proj full blocks, up_proj partial blocks on both sides, down_proj untargeted
SHAPES = {"model.layers.0.self_attn.q_proj": (256, 384), "model.layers.0.mlp.up_proj": (200, 300),
          "model.layers.0.mlp.down_proj": (300, 200)}
TARGETS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj")
RANK, ALPHA = 4, 8.0


def quantize_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (out, in) -> (float8 codes, float32 scale_inv (ceil(out/b), ceil(in/b))), amax / 448 per block."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    scale = torch.ones(nr, nc, dtype=torch.float32)
    codes = torch.empty(rows, cols, dtype=F8)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            amax = blk.abs().max()
            s = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            scale[i, j] = s
            codes[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).clamp(-448, 448).to(F8)
    return codes, scale


def dequant64(codes: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    rows, cols = codes.shape
    s = scale.double().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return codes.double() * s


def write_base(folder: Path, seed: int = 0, config: dict | None = None, shards: int = 1) -> dict[str, torch.Tensor]:
    """An FP8 checkpoint folder; returns its tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (o, i) in SHAPES.items():
        w = torch.randn(o, i, generator=g) * 0.05
        w[:BLOCK, :BLOCK] *= 40  # blocks of very different magnitude
        codes, scale = quantize_blocks(w)
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = codes, scale
    tensors["model.norm.weight"] = torch.randn(384, generator=g).to(torch.bfloat16)
    tensors["lm_head.weight"] = torch.randn(64, 384, generator=g).to(torch.bfloat16)
    folder.mkdir(parents=True)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:  # the weights in one shard, their scales in the other
        names = sorted(tensors)
        parts = {"model-00001-of-00002.safetensors": [n for n in names if not n.endswith("scale_inv")],
                 "model-00002-of-00002.safetensors": [n for n in names if n.endswith("scale_inv")]}
        for file, keys in parts.items():
            save_file({k: tensors[k] for k in keys}, str(folder / file))
        index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = {"model_type": "llama", "torch_dtype": "bfloat16",
           "quantization_config": FP8_CONFIG if config is None else config}
    (folder / "config.json").write_text(json.dumps(cfg))
    return tensors


def write_adapter(folder: Path, seed: int = 1) -> dict[str, torch.Tensor]:
    """A PEFT LoRA on TARGETS (float32 factors); returns module -> float64 delta."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for name in TARGETS:
        o, i = SHAPES[name]
        a = torch.randn(RANK, i, generator=g) * 0.1
        b = torch.randn(o, RANK, generator=g) * 0.1
        tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = a, b
        deltas[name] = (ALPHA / RANK) * (b.double() @ a.double())
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": ["q_proj", "up_proj"]}))
    return deltas


def read(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, e - 7)


def expected(base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    w = dequant64(base[f"{name}.weight"], base[f"{name}.weight_scale_inv"])
    return w + deltas[name] if name in deltas else w


@pytest.fixture(scope="module")
def fp8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, dict]:
    tmp = tmp_path_factory.mktemp("fp8")
    base = write_base(tmp / "base")
    deltas = write_adapter(tmp / "adapter")
    return tmp / "base", tmp / "adapter", base, deltas


def check_keep_fp8(out: Path, base: dict, deltas: dict) -> dict[str, torch.Tensor]:
    got = read(out)
    assert set(got) == set(base)
    for name in TARGETS:
        codes, scale = got[f"{name}.weight"], got[f"{name}.weight_scale_inv"]
        assert codes.dtype == F8 and codes.shape == base[f"{name}.weight"].shape
        o, i = SHAPES[name]
        assert scale.dtype == torch.float32 and tuple(scale.shape) == (-(-o // BLOCK), -(-i // BLOCK))
        ref = expected(base, deltas, name)
        # fresh scales: amax of the merged block / 448
        amax = torch.stack([torch.stack([ref[r:r + BLOCK, c:c + BLOCK].abs().max() for c in range(0, i, BLOCK)])
                            for r in range(0, o, BLOCK)])
        torch.testing.assert_close(scale.double(), amax / 448, rtol=1e-5, atol=0)
        # dequantized output within FP8 rounding of the float64 merge: half an ulp of e4m3 (3 mantissa bits)
        s = scale.double().repeat_interleave(BLOCK, 0)[:o].repeat_interleave(BLOCK, 1)[:, :i]
        back = codes.double() * s
        bound = ref.abs() / 16 + s * 2.0**-10 + 1e-6 * ref.abs().max()
        assert ((back - ref).abs() <= bound).all()
        assert (back - ref).norm() / ref.norm() < 0.05
    for key in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight_scale_inv",
                "model.norm.weight", "lm_head.weight"):  # untouched: byte for byte
        assert torch.equal(got[key].view(torch.uint8), base[key].view(torch.uint8)), key
    return got


def test_keep_fp8_by_default(fp8, tmp_path, capsys):
    base_dir, adapter, base, deltas = fp8
    out = tmp_path / "out"
    assert main(["apply", str(base_dir), str(adapter), "-o", str(out), "--verbose"]) == 0
    check_keep_fp8(out, base, deltas)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == FP8_CONFIG and cfg["torch_dtype"] == "bfloat16"
    text = capsys.readouterr().out
    assert "quantized 2 merged weights again" in text and "model.layers.0.mlp.up_proj.weight: max |error|" in text


def test_keep_fp8_reports_errors_as_json(fp8, tmp_path, capsys):
    base_dir, adapter, base, deltas = fp8
    assert main(["apply", str(base_dir), str(adapter), "-o", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    errors = report["requantized"]
    assert sorted(errors) == sorted(f"{n}.weight" for n in TARGETS)
    got = read(tmp_path / "out")
    for name in TARGETS:  # the reported errors are those of the written weights (vs the float64 merge here)
        o, i = SHAPES[name]
        s = got[f"{name}.weight_scale_inv"].double().repeat_interleave(BLOCK, 0)[:o].repeat_interleave(BLOCK, 1)
        diff = got[f"{name}.weight"].double() * s[:, :i] - expected(base, deltas, name)
        e = errors[f"{name}.weight"]
        assert math.isclose(e["max_abs_error"], float(diff.abs().max()), rel_tol=1e-3)
        assert math.isclose(e["rel_fro_error"], float(diff.norm() / expected(base, deltas, name).norm()),
                            rel_tol=1e-3)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_dtype_writes_dequantized_weights(fp8, tmp_path, dtype):
    base_dir, adapter, base, deltas = fp8
    out = tmp_path / "out"
    report = lorafuse.apply(base_dir, [adapter], out=out, dtype=dtype, progress=False)
    assert not report.requantized
    got = read(out)
    assert not any(k.endswith("scale_inv") for k in got)
    for name in SHAPES:  # merged or not, every FP8 weight is written in the dtype
        w = got[f"{name}.weight"]
        assert w.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        ref = expected(base, deltas, name)
        if dtype == "bf16":
            assert ((w.double() - ref).abs() <= bf16_ulp(ref)).all(), name
        else:
            torch.testing.assert_close(w.double(), ref, rtol=2e-6, atol=1e-6)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["torch_dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[dtype]


def test_sharded_base_scales_in_another_shard(tmp_path):
    base = write_base(tmp_path / "base", seed=3, shards=2)
    deltas = write_adapter(tmp_path / "adapter", seed=4)
    out = tmp_path / "out"
    lorafuse.apply(tmp_path / "base", [tmp_path / "adapter"], out=out, progress=False)
    check_keep_fp8(out, base, deltas)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for name in TARGETS:  # a fresh scale is written next to its weight
        assert index[f"{name}.weight_scale_inv"] == index[f"{name}.weight"]
    out16 = tmp_path / "out16"
    lorafuse.apply(tmp_path / "base", [tmp_path / "adapter"], out=out16, dtype="bf16", progress=False)
    got = read(out16)
    assert not any(k.endswith("scale_inv") for k in got)
    assert set(json.loads((out16 / "model.safetensors.index.json").read_text())["weight_map"]) == set(got)


def test_single_file_base_without_config(fp8, tmp_path):
    """A lone .safetensors file: the float8 layout is recognized from weight_scale_inv beside F8 weights."""
    base_dir, adapter, base, deltas = fp8
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes((base_dir / "model.safetensors").read_bytes())
    out = tmp_path / "merged.safetensors"
    report = lorafuse.apply(lone / "model.safetensors", [adapter], out=out, progress=False)
    assert sorted(report.requantized) == sorted(f"{n}.weight" for n in TARGETS)
    check_keep_fp8(out, base, deltas)


def test_small_pieces_match_one_piece(fp8, tmp_path, monkeypatch):
    """Row pieces aligned to the 128-row blocks give the same bytes as one piece per tensor."""
    import lorafuse.ops.apply as apply_mod

    base_dir, adapter, _, _ = fp8
    lorafuse.apply(base_dir, [adapter], out=tmp_path / "one", progress=False)
    monkeypatch.setattr(apply_mod, "CHUNK_BYTES", 1000)
    lorafuse.apply(base_dir, [adapter], out=tmp_path / "many", progress=False)
    assert (tmp_path / "one/model.safetensors").read_bytes() == (tmp_path / "many/model.safetensors").read_bytes()


# ---------------------------------------------------------------- refusals


REFUSED = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "awq": {"quant_method": "awq", "bits": 4, "version": "gemm"},
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "hqq": {"quant_method": "hqq"},
    "somethingnew": {"quant_method": "somethingnew"},
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                           "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}},
}


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_refuses_quantization_it_cannot_honour(fp8, tmp_path, capsys, method):
    _, adapter, _, _ = fp8
    write_base(tmp_path / "base", config=REFUSED[method])
    with pytest.raises(UnsupportedError) as e:
        lorafuse.apply(tmp_path / "base", [adapter], out=tmp_path / "out", progress=False)
    msg = str(e.value)
    assert method in msg and str(tmp_path / "base") in msg
    if method in ("gptq", "awq"):
        assert "16-bit" in msg and "quantize" in msg
    assert not (tmp_path / "out").exists()
    assert main(["apply", str(tmp_path / "base"), str(adapter), "-o", str(tmp_path / "out")]) == 1
    assert method in capsys.readouterr().err


@pytest.mark.parametrize("names", [("qweight", "qzeros"), ("weight.absmax", "weight.quant_map"), ("SCB",)])
def test_refuses_quantized_tensor_names_without_config(fp8, tmp_path, names):
    _, adapter, _, _ = fp8
    tensors = {f"model.layers.0.self_attn.q_proj.{n}": torch.zeros(4, dtype=torch.int32) for n in names}
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(200, 300, dtype=torch.bfloat16)
    path = tmp_path / "q.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UnsupportedError, match=str(path)):
        lorafuse.apply(path, [adapter], out=tmp_path / "out.safetensors", progress=False, skip_missing=True)


def test_refuses_fp8_weight_with_unknown_scale(fp8, tmp_path):
    """No quantization_config, an F8 weight with a scale-like tensor lorafuse does not know: refused."""
    _, adapter, base, _ = fp8
    tensors = {k: v for k, v in base.items() if not k.endswith("scale_inv")}
    tensors["model.layers.0.mlp.up_proj.weight_scale_2"] = torch.ones(1)
    tensors["model.layers.0.self_attn.q_proj.weight_scale_2"] = torch.ones(1)
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UnsupportedError, match="weight_scale_2") as e:
        lorafuse.apply(path, [adapter], out=tmp_path / "out.safetensors", progress=False)
    assert str(path) in str(e.value)


def test_refuses_fp8_config_weight_without_scale(fp8, tmp_path):
    _, adapter, base, _ = fp8
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    tensors = {k: v for k, v in base.items() if k != "model.layers.0.mlp.up_proj.weight_scale_inv"}
    save_file(tensors, str(base_dir / "model.safetensors"))
    (base_dir / "config.json").write_text(json.dumps({"quantization_config": FP8_CONFIG}))
    with pytest.raises(UnsupportedError, match=r"up_proj\.weight .*no model\.layers\.0\.mlp\.up_proj\.weight_scale"):
        lorafuse.apply(base_dir, [adapter], out=tmp_path / "out", progress=False)


def test_plain_float8_without_scales_merges_as_values(tmp_path):
    """An unscaled float8 checkpoint (no config, no companions) is legal: its values are merged (as BF16)."""
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(200, 300, generator=g)).to(F8)
    path = tmp_path / "plain.safetensors"
    save_file({"model.layers.0.mlp.up_proj.weight": w}, str(path))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    a, b = torch.randn(RANK, 300, generator=g), torch.randn(200, RANK, generator=g)
    save_file({f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight": a,
               f"{PREFIX}model.layers.0.mlp.up_proj.lora_B.weight": b}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": ["up_proj"]}))
    out = tmp_path / "out.safetensors"
    lorafuse.apply(path, [adapter], out=out, progress=False)
    got = read(out)["model.layers.0.mlp.up_proj.weight"]
    delta = (ALPHA / RANK) * (b.double() @ a.double())
    ref = w.double() + delta
    # one bf16 rounding of the float32 sum: an ulp of the largest operand (W and dW may cancel)
    scale = torch.maximum(torch.maximum(w.double().abs(), delta.abs()), ref.abs())
    assert got.dtype == torch.bfloat16 and ((got.double() - ref).abs() <= bf16_ulp(scale)).all()


def test_pipeline_component_quantized(fp8, tmp_path):
    """A diffusers pipeline whose merged component is quantized with an unsupported method: refused."""
    from safetensors.torch import save_file as save

    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                        "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    save({"transformer_blocks.0.attn.to_q.weight": torch.zeros(8, 8, dtype=torch.bfloat16)},
         str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    (pipe / "transformer" / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    lora = tmp_path / "lora.safetensors"
    save({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 8),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(8, 2)}, str(lora))
    with pytest.raises(UnsupportedError, match="gptq") as e:
        lorafuse.apply(pipe, [lora], out=tmp_path / "out", progress=False)
    assert str(pipe / "transformer") in str(e.value)


def test_extract_refuses_quantized(fp8, tmp_path):
    base_dir, _, _, _ = fp8
    with pytest.raises(UnsupportedError, match="fp8"):
        lorafuse.extract(base_dir, base_dir, rank=4, out=tmp_path / "x")


def test_info_says_quantized(fp8, tmp_path, capsys):
    base_dir, _, _, _ = fp8
    assert main(["info", str(base_dir)]) == 0
    assert "quantized   fp8 (float8 e4m3, block 128x128" in capsys.readouterr().out
    write_base(tmp_path / "g", config=REFUSED["gptq"])
    assert main(["info", str(tmp_path / "g"), "--json"]) == 0
    q = json.loads(capsys.readouterr().out)["quantization"]
    assert q["method"] == "gptq" and q["supported"] is False and "16-bit" in q["why"]


def test_errors_are_lorafuse_errors():
    assert issubclass(UnsupportedError, LorafuseError)


# ---------------------------------------------------------------- float8 encoding


def test_e4m3_encoding_matches_torch():
    """float32 -> e4m3fn: round to nearest even, saturating at 448 (torch's conversion after clamping)."""
    codes = torch.arange(256, dtype=torch.uint8).view(F8).float()
    finite = codes[~codes.isnan()]
    vals = finite.sort().values
    mids = (vals[1:] + vals[:-1]) / 2  # ties: round to even
    rng = np.random.default_rng(0)
    rand = torch.from_numpy((rng.standard_normal(200_000) * np.exp(rng.uniform(-14, 8, 200_000))).astype(np.float32))
    x = torch.cat([finite, mids, mids.nextafter(torch.tensor(math.inf)), mids.nextafter(torch.tensor(-math.inf)),
                   rand, torch.tensor([0.0, -0.0, 448.0, 449.0, 464.0, 1e30, -1e30, 2.0**-10, 2.0**-11, 1e-30])])
    ref = x.clamp(-448, 448).to(F8).view(torch.uint8).numpy()
    got = e4m3_from_float32(x.numpy())
    np.testing.assert_array_equal(got, ref)
    nan = e4m3_from_float32(np.array([np.nan, -np.nan], dtype=np.float32))
    assert (nan & 0x7F == 0x7F).all()
    # a stride through every float32 bit pattern (NaNs left out)
    bits = torch.from_numpy(np.arange(0, 1 << 32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32))
    bits = bits[~bits.isnan()]
    np.testing.assert_array_equal(e4m3_from_float32(bits.numpy()),
                                  bits.clamp(-448, 448).to(F8).view(torch.uint8).numpy())


@pytest.mark.parametrize("shape", [(256, 384), (384, 640)])
def test_dequant_matches_transformers(shape):
    """lorafuse's block dequantization against transformers' own Fp8Dequantize (when it is there on CPU).

    Shapes are multiples of the block only: transformers' Fp8Quantize refuses others, and its dequantize
    derives the block from the scale grid (a 200x300 weight with a 2x3 grid becomes 100x100 blocks),
    where DeepSeek-V3's kernels and lorafuse take weight_block_size with partial edge blocks."""
    try:
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize

        dequant = Fp8Dequantize(None)._dequantize_one
    except Exception as e:  # triton or another layout of that module: nothing to compare against
        pytest.skip(f"transformers' Fp8Dequantize not usable here: {e}")
    from lorafuse.io.quant import Fp8Scaled

    g = torch.Generator().manual_seed(2)
    codes, scale = quantize_blocks(torch.randn(*shape, generator=g))
    theirs = dequant(codes, scale, torch.float32)
    scheme = Fp8Scaled("t", "fp8", "weight_scale_inv", (128, 128))
    ours = scheme.dequantize(codes.view(torch.uint8).numpy(), {"scale": (scale.numpy(), "F32")}, 0, shape)
    np.testing.assert_array_equal(ours, theirs.numpy())


# ---------------------------------------------------------------- compressed-tensors float8


def ct_config(strategy: str, block: list[int] | None = None) -> dict:
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
    if block is not None:
        weights["block_structure"] = block
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"weights": weights, "targets": ["Linear"],
                                          "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                                "dynamic": False}}},
            "ignore": ["lm_head"]}


@pytest.mark.parametrize(("strategy", "grid", "sdtype"), [
    ("channel", (200, 1), torch.bfloat16), ("tensor", (1,), torch.float32), ("block", (2, 3), torch.float32)])
def test_compressed_tensors_float8(tmp_path, strategy, grid, sdtype):
    """compressed-tensors float8: weight_scale multiplies (per channel, per tensor or per block), input_scale
    static; kept as it is by default, dropped with --dtype."""
    name = "model.layers.0.mlp.up_proj"
    g = torch.Generator().manual_seed(11)
    w = torch.randn(200, 300, generator=g) * 0.05
    if strategy == "channel":
        scale = (w.abs().amax(dim=1, keepdim=True) / 448).to(sdtype)
        s_full = scale.double().expand(200, 300)
    elif strategy == "tensor":
        scale = (w.abs().amax() / 448).reshape(1).to(sdtype)
        s_full = scale.double().expand(200, 300)
    else:
        _, scale = quantize_blocks(w)
        s_full = scale.double().repeat_interleave(BLOCK, 0)[:200].repeat_interleave(BLOCK, 1)[:, :300]
    codes = (w / s_full.float()).clamp(-448, 448).to(F8)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file({f"{name}.weight": codes, f"{name}.weight_scale": scale, f"{name}.input_scale": torch.ones(1),
               "lm_head.weight": torch.randn(8, 300, generator=g).to(torch.bfloat16)},
              str(base_dir / "model.safetensors"))
    config = ct_config(strategy, [128, 128] if strategy == "block" else None)
    (base_dir / "config.json").write_text(json.dumps({"quantization_config": config}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    a, b = torch.randn(RANK, 300, generator=g) * 0.1, torch.randn(200, RANK, generator=g) * 0.1
    save_file({f"{PREFIX}{name}.lora_A.weight": a, f"{PREFIX}{name}.lora_B.weight": b},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": ["up_proj"]}))
    ref = codes.double() * s_full + (ALPHA / RANK) * (b.double() @ a.double())

    lorafuse.apply(base_dir, [adapter], out=tmp_path / "keep", progress=False)
    got = read(tmp_path / "keep")
    new_scale = got[f"{name}.weight_scale"]
    assert new_scale.dtype == sdtype and tuple(new_scale.shape) == grid
    if strategy == "block":
        s_new = new_scale.double().repeat_interleave(BLOCK, 0)[:200].repeat_interleave(BLOCK, 1)[:, :300]
    else:
        s_new = new_scale.double().expand(200, 300)
    back = got[f"{name}.weight"].double() * s_new
    # half an e4m3 ulp, the subnormal step, and a bf16-rounded scale's clamping (2^-8 of the block's amax)
    bound = ref.abs() / 16 + s_new * 2.0**-10 + s_new * 448 * 2.0**-8
    assert ((back - ref).abs() <= bound).all()
    assert torch.equal(got[f"{name}.input_scale"], torch.ones(1))
    assert json.loads((tmp_path / "keep/config.json").read_text())["quantization_config"] == config

    lorafuse.apply(base_dir, [adapter], out=tmp_path / "bf16", dtype="bf16", progress=False)
    got = read(tmp_path / "bf16")
    assert set(got) == {f"{name}.weight", "lm_head.weight"}
    assert ((got[f"{name}.weight"].double() - ref).abs() <= bf16_ulp(ref)).all()
    assert "quantization_config" not in json.loads((tmp_path / "bf16/config.json").read_text())
