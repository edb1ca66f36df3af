"""Red-team round 6, quantized bases.

1. A bitsandbytes 4-bit weight whose nested (double) quantization uses a `nested_blocksize` other than 256 is read
   with that block size (bitsandbytes' `QuantState.from_dict` / `dequantize_blockwise` do) and, requantized, written
   back with it: the quant state, written back unchanged, says it.
2. An FP8 scale stored transposed ([2, 1] where the 128x256 weight's 128x128 blocks need [1, 2]) is refused as
   misshapen (transformers' loader refuses it: a size mismatch), not read in the other orientation.
3. A folder that holds a GGUF model and no safetensors says so: lorafuse does not merge into GGUF models.

References: bitsandbytes 0.50's own CPU quantize / dequantize on the same tensors, float64 in torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from redteam_fixtures import PREFIX, peft_folder, read_torch
from safetensors.torch import save_file

from lorafuse.cli import main

DOWN = "model.layers.0.mlp.down_proj"


# ---------------------------------------------------------------- 1. nested_blocksize


@pytest.fixture
def _eager():
    """bitsandbytes wraps its reference kernels in torch.compile: run them eagerly."""
    with torch._dynamo.config.patch(disable=True):
        yield


def _nested_base(folder: Path, nested_blocksize: int):
    """A one-weight bitsandbytes nf4 checkpoint (transformers' names) nested in blocks of `nested_blocksize`, made by
    bitsandbytes itself; returns (folder, bitsandbytes' float32 dequantize of it)."""
    from bitsandbytes import functional as F

    torch.manual_seed(0)
    w = (torch.randn(128, 128) * 0.05).to(torch.bfloat16)
    packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=False, blocksize=64)
    offset = qs.absmax.mean()
    codes, state2 = F.quantize_blockwise(qs.absmax - offset, blocksize=nested_blocksize)
    nested = F.QuantState(absmax=codes, shape=qs.shape, code=qs.code, blocksize=64, quant_type="nf4",
                          dtype=torch.bfloat16, offset=offset, state2=state2)
    tensors = {f"{DOWN}.weight": packed}
    tensors.update({f"{DOWN}.weight.{k}": v for k, v in nested.as_dict(packed=True).items()})
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                "bnb_4bit_use_double_quant": True}}))
    state32 = F.QuantState(absmax=codes, shape=qs.shape, code=qs.code, blocksize=64, quant_type="nf4",
                           dtype=torch.float32, offset=offset, state2=state2)
    return folder, F.dequantize_4bit(packed, state32).double()


def _bnb_dequant(tensors: dict, key: str) -> torch.Tensor:
    from bitsandbytes import functional as F

    qs = F.QuantState.from_dict({k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")},
                                device=torch.device("cpu"))
    qs.dtype = torch.float32
    return F.dequantize_4bit(tensors[key], qs).double()


@pytest.mark.usefixtures("_eager")
def test_nested_blocksize_other_than_256_is_written_back_as_the_quant_state_says(tmp_path):
    base, w = _nested_base(tmp_path / "base", 128)
    adapter = peft_folder(tmp_path / "ad", {DOWN: (128, 128)}, seed=3)
    a = read_torch(adapter / "adapter_model.safetensors")
    delta = a[f"{PREFIX}{DOWN}.lora_B.weight"].double() @ a[f"{PREFIX}{DOWN}.lora_A.weight"].double()
    merged = w + delta

    # the default (16-bit) output: the base read with its nested block size
    assert main(["apply", str(base), str(adapter), "-o", str(tmp_path / "o16"), "-q"]) == 0
    got16 = read_torch(tmp_path / "o16")[f"{DOWN}.weight"].double()
    assert torch.equal(got16, merged.to(torch.bfloat16).double())

    assert main(["apply", str(base), str(adapter), "-o", str(tmp_path / "o4"), "--requantize", "-q"]) == 0
    out = read_torch(tmp_path / "o4")
    qs = json.loads(bytes(out[f"{DOWN}.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert qs["nested_blocksize"] == 128
    assert out[f"{DOWN}.weight.nested_absmax"].numel() == 2  # 256 absmax codes in blocks of 128
    # bitsandbytes' own requantize of the merge: quantize_4bit, then the absmax nested in blocks of 128 with the
    # base's offset and map (what the unchanged quant state says), bit for bit
    from bitsandbytes import functional as F

    base_t = read_torch(base)
    packed, st = F.quantize_4bit(merged.float(), quant_type="nf4", compress_statistics=False, blocksize=64)
    codes, state2 = F.quantize_blockwise(st.absmax - qs["nested_offset"], blocksize=128,
                                         code=base_t[f"{DOWN}.weight.nested_quant_map"])
    assert torch.equal(out[f"{DOWN}.weight"], packed)
    assert torch.equal(out[f"{DOWN}.weight.absmax"], codes)
    assert torch.equal(out[f"{DOWN}.weight.nested_absmax"], state2.absmax)
    assert torch.equal(_bnb_dequant(out, f"{DOWN}.weight"), F.dequantize_4bit(packed, F.QuantState(
        absmax=codes, shape=st.shape, code=st.code, blocksize=64, quant_type="nf4", dtype=torch.float32,
        offset=torch.tensor(qs["nested_offset"]), state2=state2)).double())
    # and lorafuse reads its own output back
    assert main(["apply", str(tmp_path / "o4"), str(adapter), "-o", str(tmp_path / "again"), "-q"]) == 0


# ---------------------------------------------------------------- 2. transposed FP8 scale


def test_fp8_scale_in_the_other_orientation_is_refused(tmp_path, capsys):
    base = tmp_path / "fp8"
    base.mkdir()
    torch.manual_seed(0)
    codes = (torch.randn(128, 256) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    save_file({f"{DOWN}.weight": codes, f"{DOWN}.weight_scale_inv": torch.tensor([[0.01], [1.0]])},
              str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3", "activation_scheme": "dynamic"}}))
    adapter = peft_folder(tmp_path / "ad", {DOWN: (128, 256)}, seed=1)
    for extra in ([], ["--dtype", "bf16"]):
        capsys.readouterr()
        assert main(["apply", str(base), str(adapter), "-o", str(tmp_path / "out"), *extra]) == 1
        err = capsys.readouterr().err
        assert "[2, 1]" in err and "[1, 2]" in err and f"{DOWN}.weight" in err
        assert not (tmp_path / "out").exists()


def test_fp8_scale_layouts_that_are_read(tmp_path):
    """The layouts real checkpoints use still pass: a per-channel [out, 1] and [out], per-tensor [] / [1] / [1, 1],
    the block grid with a leading 1."""
    from lorafuse.io.quant import Fp8Scaled

    channel = Fp8Scaled("c", "compressed-tensors", "weight_scale", (1, 0))
    tensor = Fp8Scaled("t", "compressed-tensors", "weight_scale", (0, 0))
    block = Fp8Scaled("b", "fp8", "weight_scale_inv", (128, 128))
    ok = [(channel, (64, 32), (64, 1)), (channel, (64, 32), (64,)), (tensor, (64, 32), ()), (tensor, (64, 32), (1,)),
          (tensor, (64, 32), (1, 1)), (block, (384, 640), (3, 5)), (block, (384, 640), (1, 3, 5)),
          (block, (128, 256), (1, 2)), (block, (128, 256), (2,))]
    for scheme, shape, sshape in ok:
        assert scheme.check("w", shape, "F8_E4M3", {"scale": ("F32", sshape)}) is None, (shape, sshape)
    bad = [(channel, (64, 32), (1, 64)), (block, (384, 640), (15,)), (block, (384, 640), (5, 3)),
           (block, (128, 256), (2, 1)), (block, (256, 128), (1, 2))]
    for scheme, shape, sshape in bad:
        assert scheme.check("w", shape, "F8_E4M3", {"scale": ("F32", sshape)}) is not None, (shape, sshape)


# ---------------------------------------------------------------- 3. a GGUF model as the base


def test_folder_of_a_gguf_model_says_gguf(tmp_path, capsys):
    import gguf
    folder = tmp_path / "model-GGUF"
    folder.mkdir()
    w = gguf.GGUFWriter(str(folder / "model-Q8_0.gguf"), "llama")
    w.add_block_count(1)
    x = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight", gguf.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    adapter = peft_folder(tmp_path / "ad", {"model.layers.0.self_attn.q_proj": (32, 32)}, seed=1)
    assert main(["apply", str(folder), str(adapter), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "model-Q8_0.gguf" in err and "GGUF" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 4. GPT-OSS MXFP4 experts without a config


def _mxfp4_base(folder: Path, config: dict) -> Path:
    e, h, i = 2, 64, 32
    x, u8 = "model.layers.0.mlp.experts.", torch.uint8
    folder.mkdir()
    save_file({x + "gate_up_proj_blocks": torch.zeros((e, 2 * i, h // 32, 16), dtype=u8),
               x + "gate_up_proj_scales": torch.full((e, 2 * i, h // 32), 127, dtype=u8),
               x + "gate_up_proj_bias": torch.zeros((e, 2 * i)),
               x + "down_proj_blocks": torch.zeros((e, h, i // 32, 16), dtype=u8),
               x + "down_proj_scales": torch.full((e, h, i // 32), 127, dtype=u8),
               "model.layers.0.self_attn.q_proj.weight": torch.zeros((64, 64))}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_oss", **config}))
    return folder


@pytest.mark.parametrize("config", [{}, {"quantization_config": {"quant_method": "mxfp4"}}])
def test_mxfp4_experts_are_refused_as_mxfp4(tmp_path, capsys, config):
    """GPT-OSS as published: experts in MXFP4 (`gate_up_proj_blocks` + `_scales`). Without its config.json the tensor
    names say so, as they do for GPTQ's qweight: refused naming mxfp4, not merged around (nor "no base weight")."""
    base = _mxfp4_base(tmp_path / "oss", config)
    adapter = peft_folder(tmp_path / "ad", {"model.layers.0.self_attn.q_proj": (64, 64)}, seed=1)
    assert main(["apply", str(base), str(adapter), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "mxfp4" in err and "UnsupportedError" in err
    assert not (tmp_path / "out").exists()
    assert main(["info", str(base)]) == 0
    assert "mxfp4" in capsys.readouterr().out


# ---------------------------------------------------------------- 5. LLM.int8 weight_format not an integer


@pytest.mark.parametrize("fmt", [torch.tensor(float("nan")), torch.tensor(0.5),
                                 torch.tensor([0.0], dtype=torch.bfloat16)])
def test_int8_weight_format_that_is_no_integer_is_refused_by_name(tmp_path, capsys, fmt):
    """bitsandbytes writes `weight_format` as one uint8 (0: row-major). A float one (NaN: a traceback before; 0.5:
    read as 0) is refused naming the tensor, its dtype and shape."""
    base = tmp_path / "int8"
    base.mkdir()
    torch.manual_seed(0)
    save_file({f"{DOWN}.weight": torch.randint(-127, 128, (16, 8), dtype=torch.int8),
               f"{DOWN}.SCB": torch.rand(16) + 0.5, f"{DOWN}.weight_format": fmt}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16",
                                                  "quantization_config": {"quant_method": "bitsandbytes",
                                                                          "load_in_8bit": True}}))
    adapter = peft_folder(tmp_path / "ad", {DOWN: (16, 8)}, seed=1)
    assert main(["apply", str(base), str(adapter), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{DOWN}.weight_format" in err and "Traceback" not in err and "FormatError" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 6. a 3-D bitsandbytes experts tensor


EXPERTS = "model.layers.0.mlp.experts"


def _nf4_reference(tensors: dict, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """table[code] * absmax[block] in float64, from the bytes (bitsandbytes' formula, without its CPU kernel's
    AVX-512 quirk on a last dimension of 32)."""
    from lorafuse.io.quant_bnb import code_table

    p = tensors[key].numpy().reshape(-1)
    codes = np.stack([p >> 4, p & 15], axis=1).reshape(-1)
    absmax = tensors[key + ".absmax"].numpy().astype(np.float64)
    return torch.from_numpy((code_table("nf4")[codes] * np.repeat(absmax, 64)[: codes.size]).reshape(shape))


@pytest.fixture
def experts4bit(tmp_path):
    """Qwen3-MoE experts as transformers 5 holds them ([E, 2I, H] gate_up_proj, [E, H, I] down_proj), each one 3-D
    bitsandbytes nf4 weight (quantize_4bit flattens it), and a PEFT target_parameters LoRA on both."""
    from bitsandbytes import functional as F

    e, i, h, r = 4, 32, 64, 2
    torch.manual_seed(0)
    tensors = {}
    with torch._dynamo.config.patch(disable=True):
        for name, shape in (("gate_up_proj", (e, 2 * i, h)), ("down_proj", (e, h, i))):
            packed, qs = F.quantize_4bit((torch.randn(shape) * 0.05).to(torch.bfloat16), quant_type="nf4",
                                         blocksize=64, compress_statistics=False)
            tensors[f"{EXPERTS}.{name}"] = packed
            tensors.update({f"{EXPERTS}.{name}.{k}": v for k, v in qs.as_dict(packed=True).items()})
    base = tmp_path / "base"
    base.mkdir()
    save_file(tensors, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    rng = np.random.default_rng(5)
    p = f"{PREFIX}{EXPERTS}."
    factors = {p + "base_layer.lora_A.weight": (r * e, h), p + "base_layer.lora_B.weight": (2 * i, r * e),
               p + "lora_A.weight": (r * e, i), p + "lora_B.weight": (h, r * e)}
    ad = tmp_path / "ad"
    ad.mkdir()
    save_file({k: torch.from_numpy(rng.standard_normal(s).astype(np.float32) * 0.1) for k, s in factors.items()},
              str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": [],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}))
    merged = {}
    a = read_torch(ad / "adapter_model.safetensors")
    for name, pre, shape in (("gate_up_proj", "base_layer.", (e, 2 * i, h)), ("down_proj", "", (e, h, i))):
        w = _nf4_reference(tensors, f"{EXPERTS}.{name}", shape)
        A, B = a[p + pre + "lora_A.weight"].double(), a[p + pre + "lora_B.weight"].double()
        for x in range(e):  # PEFT ParamWrapper: expert x's factors A[x*r:(x+1)*r], B[:, x::E]; scale alpha / r = 2
            w[x] += 2.0 * B[:, x::e] @ A[x * r:(x + 1) * r]
        merged[f"{EXPERTS}.{name}"] = w
    return base, ad, merged


@pytest.mark.parametrize("chunk", [None, 4096])
def test_3d_bnb_experts_are_merged(experts4bit, tmp_path, monkeypatch, chunk):
    """The two parameters of one `experts` module are each other's siblings, not unknown scales (refused so before);
    merged as PEFT merges them, in one piece or in small row pieces (the C++ kernel's shape check failed before)."""
    import lorafuse.ops.apply as apply_mod

    if chunk:
        monkeypatch.setattr(apply_mod, "CHUNK_BYTES", chunk)
    base, ad, merged = experts4bit
    assert main(["apply", str(base), str(ad), "-o", str(tmp_path / "out"), "-q"]) == 0
    out = read_torch(tmp_path / "out")
    for k, ref in merged.items():
        assert out[k].dtype == torch.bfloat16 and out[k].shape == ref.shape
        assert torch.equal(out[k].double(), ref.to(torch.bfloat16).double()), k


@pytest.mark.parametrize("chunk", [None, 4096])
def test_3d_bnb_experts_requantized(experts4bit, tmp_path, monkeypatch, chunk):
    """--requantize: the codes bitsandbytes' quantize_4bit gives the merge (its absmax within a float32 rounding of
    the merge's, computed here in float64), in one piece or in small row pieces."""
    from bitsandbytes import functional as F

    import lorafuse.ops.apply as apply_mod

    if chunk:
        monkeypatch.setattr(apply_mod, "CHUNK_BYTES", chunk)
    base, ad, merged = experts4bit
    assert main(["apply", str(base), str(ad), "-o", str(tmp_path / "out"), "--requantize", "-q"]) == 0
    out = read_torch(tmp_path / "out")
    with torch._dynamo.config.patch(disable=True):
        for k, ref in merged.items():
            packed, qs = F.quantize_4bit(ref.float(), quant_type="nf4", blocksize=64, compress_statistics=False)
            assert out[k].shape == packed.shape and torch.equal(out[k], packed), k
            assert torch.allclose(out[k + ".absmax"], qs.absmax, rtol=1e-6, atol=0)
