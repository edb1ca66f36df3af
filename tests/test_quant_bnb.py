"""lorafuse.io.quant_bnb against bitsandbytes itself (CPU): 4-bit nf4 / fp4 dequantize and quantize bit for bit,
nested absmax, quant_storage types, row slices, LLM.int8 dequantize, parse errors, and the files transformers'
save_pretrained writes for a tiny model loaded in 4-bit / 8-bit."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

from lorafuse.errors import FormatError, LorafuseError, UnsupportedError  # noqa: E402
from lorafuse.io import quant_bnb as Q  # noqa: E402
from lorafuse.io.tensor import Tensor  # noqa: E402

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# shapes: multiples of every block size; a partial last block (700 = 10 * 64 + 60); an odd last dimension and an
# odd element count (bitsandbytes' generic kernel, one padding code); more than 256 blocks (two nested blocks)
SHAPES = [(64, 64), (7, 100), (5, 33), (160, 130)]


def _np(t):
    """A torch tensor as numpy: bf16 as lorafuse's raw uint16 wrapped in a Tensor (so its dtype travels)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return Tensor(t.view(torch.int16).numpy().view(np.uint16), "BF16")
    return t.numpy()


def _raw(x) -> np.ndarray:
    return x.raw if isinstance(x, Tensor) else x


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _torch_bits(t):
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, :3] = torch.tensor([0.3, -0.4, 0.0])  # a few outliers and an exact zero
    return w.to(dtype)


def _bnb_state_dict(w, quant_type, blocksize, nested, storage="uint8", name="m.weight"):
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type,
                                 quant_storage=TORCH_DTYPES.get(storage, torch.uint8))
    sd = {name: _np(packed)}
    for k, v in qs.as_dict(packed=True).items():
        sd[f"{name}.{k}"] = _np(v)
    return packed, qs, sd


@pytest.fixture(autouse=True)
def _no_torch_compile():
    """bitsandbytes wraps its reference kernels in torch.compile; run them eagerly (no compiler, no CPU burst)."""
    # torch's own config patch: pytest's monkeypatch on this config module can lose the attribute on undo
    with torch._dynamo.config.patch(disable=True):
        yield


def _reference_dequant(packed, qs, dtype=torch.float32):
    """bitsandbytes' reference 4-bit kernel (backends/default: what its CPU backend falls back to, and by
    bitsandbytes' own source comments what its CUDA kernel computes), with the nested absmax undone by
    bitsandbytes' own dequantize_blockwise, as dequantize_4bit does."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax.float(),
                                    _get_4bit_code(qs.quant_type, torch.device("cpu")), qs.blocksize, qs.shape, dtype)


def _cpu_kernel_reliable(shape, blocksize) -> bool:
    """bitsandbytes' native CPU dequantize_4bit (0.50) takes an AVX-512 path when the last dimension is a multiple
    of 16 and indexes absmax per row (row * (cols // blocksize) + col // blocksize): wrong unless cols is a
    multiple of blocksize. Its other paths (AVX2, scalar) index the flattened weight like every other kernel."""
    cols = shape[-1]
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return not (avx512 and cols % 16 == 0 and blocksize >= 16 and cols % blocksize)


def _zero_signs(a: np.ndarray) -> np.ndarray:
    """Bits with -0.0 turned into +0.0: bitsandbytes' kernels disagree on the sign of fp4's zero code (8)."""
    return _bits(np.asarray(a, dtype=np.float32) + np.float32(0.0))


@pytest.mark.parametrize("shape", SHAPES + [(48, 80), (16, 192)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 32, 4096])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_matches_bitsandbytes(shape, quant_type, blocksize, nested):
    w = _weight(shape, torch.bfloat16, seed=sum(shape) + blocksize + 2 * nested)
    packed, qs, sd = _bnb_state_dict(w, quant_type, blocksize, nested)
    st = Q.parse_bnb4(sd, "m.weight")
    assert (st.quant_type, st.blocksize, st.shape, st.dtype, st.nested) == (quant_type, blocksize, shape, "bfloat16",
                                                                             nested)
    ours = Q.dequantize_bnb4(sd["m.weight"], st)
    assert ours.dtype == np.float32 and ours.shape == shape
    # float32, bit for bit, against the reference kernel
    np.testing.assert_array_equal(_bits(ours), _bits(_reference_dequant(packed, qs).numpy()))
    # bitsandbytes' public dequantize_4bit in the stated dtype: ours rounded to nearest even (signs of zero aside)
    if _cpu_kernel_reliable(shape, blocksize):
        ref = F.dequantize_4bit(packed, qs)
        assert ref.dtype == torch.bfloat16
        mine = torch.from_numpy(ours).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(_zero_signs(mine), _zero_signs(ref.float().numpy()))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float16", "float32"])
@pytest.mark.parametrize("nested", [False, True])
def test_dtypes_and_quant_storage(dtype, storage, nested):
    w = _weight((96, 64), TORCH_DTYPES[dtype], seed=3)
    packed, qs, sd = _bnb_state_dict(w, "nf4", 64, nested, storage)
    st = Q.parse_bnb4(sd, "m.weight")
    assert st.dtype == dtype and st.storage_dtype == storage
    ours = Q.dequantize_bnb4(sd["m.weight"], st)
    ref = F.dequantize_4bit(packed, qs)  # 64 columns, blocks of 64: every CPU path is reliable here
    assert ref.dtype == TORCH_DTYPES[dtype]
    np.testing.assert_array_equal(_torch_bits(torch.from_numpy(ours).to(ref.dtype)), _torch_bits(ref))
    np.testing.assert_array_equal(_bits(ours), _bits(_reference_dequant(packed, qs).numpy()))
    mine = Q.quantize_bnb4(w.float().numpy(), "nf4", 64, nested, weight_name="m.weight", dtype=dtype,
                           quant_storage=storage, nested_offset=qs.offset.item() if nested else None)
    _assert_same_tensors(mine, sd)


def _assert_same_tensors(mine: dict, sd: dict) -> None:
    assert sorted(mine) == sorted(sd)
    for k, v in sd.items():
        a, b = _raw(v), mine[k]
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape, a.dtype, b.dtype)
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=k)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 32])
@pytest.mark.parametrize("nested", [False, True])
def test_quantize_matches_bitsandbytes(shape, quant_type, blocksize, nested):
    w = _weight(shape, torch.float32, seed=7 + blocksize)
    _, qs, sd = _bnb_state_dict(w, quant_type, blocksize, nested)
    mine = Q.quantize_bnb4(w.numpy(), quant_type, blocksize, nested, weight_name="m.weight",
                           nested_offset=qs.offset.item() if nested else None)
    _assert_same_tensors(mine, sd)  # packed codes, absmax, maps and the JSON bytes themselves
    # our own offset (a float64 mean rounded once) is torch's float32 mean to within rounding
    if nested:
        absmax = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)[1].absmax.numpy()
        _, _, off = Q.quantize_nested_absmax(absmax)
        assert abs(off - qs.offset.item()) <= 4 * np.spacing(np.float32(abs(off)))


def test_quantize_edge_values():
    """Values on and around every decision bound, zeros, an all-zero block and a lone tail element."""
    for quant_type in ("nf4", "fp4"):
        bounds = Q._BOUNDS[quant_type][0]
        near = np.concatenate([bounds, np.nextafter(bounds, 2), np.nextafter(bounds, -2), Q.code_table(quant_type),
                               [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30]]).astype(np.float32)
        x = np.concatenate([near, np.zeros(64, np.float32), near * np.float32(3.5), [0.25]]).astype(np.float32)
        packed, qs = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type=quant_type)
        ours_p, ours_a = Q.quantize_4bit_blocks(x, quant_type, 64)
        np.testing.assert_array_equal(ours_p, packed.numpy().reshape(-1))
        np.testing.assert_array_equal(_bits(ours_a), _bits(qs.absmax.numpy()))


def test_row_slices():
    w = _weight((37, 100), torch.float16, seed=11)  # 100 columns: rows straddle 64-element blocks
    for nested in (False, True):
        _, _, sd = _bnb_state_dict(w, "fp4", 64, nested)
        st = Q.parse_bnb4(sd, "m.weight")
        full = Q.dequantize_bnb4(sd["m.weight"], st)
        for r0, r1 in [(0, 1), (1, 2), (3, 17), (16, 37), (36, 37), (5, 5), (0, 37)]:
            part = Q.dequantize_bnb4(sd["m.weight"], st, slice(r0, r1))
            np.testing.assert_array_equal(_bits(part), _bits(full[r0:r1]))
    # odd columns: a row may start in the low nibble of a byte
    w = _weight((9, 33), torch.bfloat16, seed=12)
    _, _, sd = _bnb_state_dict(w, "nf4", 32, True)
    st = Q.parse_bnb4(sd, "m.weight")
    full = Q.dequantize_bnb4(sd["m.weight"], st)
    for r in range(9):
        row = Q.dequantize_bnb4(sd["m.weight"], st, slice(r, r + 1))
        np.testing.assert_array_equal(_bits(row), _bits(full[r:r + 1]))
    assert Q.bnb4_row_align((9, 33), 32) == 32
    assert Q.bnb4_row_align((4, 128), 64) == 1
    assert Q.bnb4_row_align((4, 96), 64) == 2


def test_streamed_quantize_equals_bitsandbytes():
    """Row chunks at bnb4_row_align boundaries, assembled by bnb4_tensors, give bitsandbytes' own tensors."""
    w = _weight((41, 96), torch.float32, seed=5)  # 41 * 96 = 3936 = 61.5 blocks: the last chunk ends mid-block
    _, qs, sd = _bnb_state_dict(w, "fp4", 64, True)
    step = Q.bnb4_row_align(tuple(w.shape), 64) * 3
    parts = [Q.quantize_4bit_blocks(w.numpy()[r:r + step], "fp4", 64) for r in range(0, 41, step)]
    packed = np.concatenate([p for p, _ in parts])
    absmax = np.concatenate([a for _, a in parts])
    mine = Q.bnb4_tensors(packed, absmax, shape=(41, 96), quant_type="fp4", blocksize=64, nested=True,
                          weight_name="m.weight", nested_offset=qs.offset.item())
    _assert_same_tensors(mine, sd)


def test_maps():
    assert np.array_equal(_bits(Q.code_table("nf4")), _bits(F.get_4bit_type("nf4", device="cpu").numpy()))
    assert np.array_equal(_bits(Q.code_table("fp4")), _bits(F.get_4bit_type("fp4", device="cpu").numpy()))
    np.testing.assert_array_equal(_bits(Q.dynamic_map()), _bits(F.create_dynamic_map().numpy()))
    _, qs = F.quantize_4bit(torch.randn(64, 64), compress_statistics=True)
    np.testing.assert_array_equal(_bits(Q.dynamic_map()), _bits(qs.state2.code.numpy()))


def test_blockwise_8bit_matches_bitsandbytes():
    """The nested absmax quantizer against bitsandbytes' CPU quantize_blockwise: a zero block, a partial
    last block, values spread over many magnitudes."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(256 * 300 + 77, generator=g) * torch.rand(256 * 300 + 77, generator=g) ** 4
    x[:256] = 0.0
    q, st = F.quantize_blockwise(x, blocksize=256)
    ours_q, ours_a = Q.quantize_blockwise_8bit(x.numpy(), st.code.numpy(), 256)
    np.testing.assert_array_equal(ours_q, q.numpy())
    np.testing.assert_array_equal(_bits(ours_a), _bits(st.absmax.numpy()))


def test_int8_matches_bitsandbytes():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        w = _weight((24, 40), dtype, seed=2)
        cb, scb, _ = F.int8_vectorwise_quant(w)
        ref = F.int8_vectorwise_dequant(cb, scb)
        ours = Q.dequantize_int8(cb.numpy(), scb.numpy())
        np.testing.assert_array_equal(_bits(ours), _bits(ref.numpy()))
    # the module's own state dict: weight int8, SCB, weight_format
    lin = bnb.nn.Linear8bitLt(40, 24, bias=False, has_fp16_weights=False)
    lin.weight = bnb.nn.Int8Params(_weight((24, 40), torch.float16, seed=4), requires_grad=False,
                                   has_fp16_weights=False)
    lin = lin.to("cpu")
    sd = {k: v.numpy() for k, v in lin.state_dict().items()}
    assert set(sd) == {"weight", "SCB", "weight_format"}
    assert Q.companions("weight", sd) == ["SCB", "weight_format"]
    Q.check_int8_format(sd, "weight")
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight
    ref = dequantize_bnb_weight(lin.weight, lin.state)
    np.testing.assert_array_equal(_bits(Q.dequantize_int8(sd["weight"], sd["SCB"])), _bits(ref.numpy()))


def test_companions():
    keys = ["a.weight", "a.weight.absmax", "a.weight.quant_map", "a.weight.quant_state.bitsandbytes__nf4", "a.bias",
            "ab.weight.absmax", "b.SCB", "b.weight", "b.weight_format", "a.weight.nested_absmax"]
    assert Q.companions("a.weight", keys) == ["a.weight.absmax", "a.weight.quant_map", "a.weight.nested_absmax",
                                              "a.weight.quant_state.bitsandbytes__nf4"]
    assert Q.companions("b.weight", keys) == ["b.SCB", "b.weight_format"]
    assert all(any(k.endswith(s) for s in Q.BNB_COMPANION_SUFFIXES) for k in Q.companions("a.weight", keys))


QS = "m.weight.quant_state.bitsandbytes__"


def _sd(nested=True, quant_type="nf4"):
    return _bnb_state_dict(_weight((32, 64), torch.bfloat16, seed=1), quant_type, 64, nested)[2]


@pytest.mark.parametrize(
    "edit, names",
    [
        (lambda sd: sd.pop("m.weight.quant_state.bitsandbytes__nf4"), "m.weight.quant_state.bitsandbytes__nf4"),
        (lambda sd: sd.pop("m.weight.absmax"), "m.weight.absmax"),
        (lambda sd: sd.pop("m.weight.quant_map"), "m.weight.quant_map"),
        (lambda sd: sd.pop("m.weight.nested_absmax"), "m.weight.nested_absmax"),
        (lambda sd: sd.pop("m.weight.nested_quant_map"), "m.weight.nested_quant_map"),
        (lambda sd: sd.pop("m.weight"), "m.weight"),
        (lambda sd: sd.__setitem__("m.weight", sd["m.weight"][:-1]), "m.weight"),
        (lambda sd: sd.__setitem__("m.weight.absmax", sd["m.weight.absmax"][:-1]), "m.weight.absmax"),
        (lambda sd: sd.__setitem__("m.weight.nested_absmax", np.ones(3, np.float32)), "m.weight.nested_absmax"),
        (lambda sd: sd.__setitem__("m.weight.quant_map", Q.code_table("fp4")), "m.weight.quant_map"),
        (lambda sd: sd.__setitem__("m.weight.nested_quant_map", np.ones(16, np.float32)), "m.weight.nested_quant_map"),
        (lambda sd: sd.__setitem__(QS + "fp4", sd[QS + "nf4"]), QS + "fp4"),
        (lambda sd: sd.__setitem__("m.weight.quant_state.bitsandbytes__nf4", np.frombuffer(b"{not json", np.uint8)),
         "m.weight.quant_state.bitsandbytes__nf4"),
    ],
)
def test_parse_errors_name_the_tensor(edit, names):
    sd = _sd()
    edit(sd)
    with pytest.raises(FormatError, match=names.replace(".", r"\.")):
        Q.parse_bnb4(sd, "m.weight")


def _with_json(sd, **changes):
    key = "m.weight.quant_state.bitsandbytes__nf4"
    obj = json.loads(_raw(sd[key]).tobytes())
    obj.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del obj[k]
    sd[key] = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    return sd


@pytest.mark.parametrize(
    "changes",
    [{"quant_type": "fp4"}, {"quant_type": "int4"}, {"blocksize": 48}, {"blocksize": "64"}, {"dtype": "int8"},
     {"shape": [32, 65]}, {"shape": "32x64"}, {"nested_offset": None}, {"nested_offset": "x"},
     {"nested_blocksize": 0}, {"nested_blocksize": 10**30}, {"nested_blocksize": 2**17}],
)
def test_bad_quant_state_json(changes):
    with pytest.raises(FormatError, match=r"m\.weight"):
        Q.parse_bnb4(_with_json(_sd(), **changes), "m.weight")


def test_unsupported_nested_dtype_and_int8_errors():
    with pytest.raises(UnsupportedError, match=r"nested_dtype"):
        Q.parse_bnb4(_with_json(_sd(), nested_dtype="bfloat16"), "m.weight")
    with pytest.raises(FormatError, match=r"m\.SCB"):
        Q.check_int8_format({"m.weight": np.zeros((2, 2), np.int8)}, "m.weight")
    with pytest.raises(FormatError, match=r"m\.weight_format"):
        Q.check_int8_format({"m.weight": np.zeros((2, 2), np.int8), "m.SCB": np.ones(2, np.float32),
                             "m.weight_format": np.array(1, np.uint8)}, "m.weight")
    with pytest.raises(FormatError, match="int8"):
        Q.dequantize_int8(np.zeros((2, 2), np.uint8), np.ones(2, np.float32))
    with pytest.raises(FormatError, match="SCB"):
        Q.dequantize_int8(np.zeros((2, 2), np.int8), np.ones(3, np.float32))
    with pytest.raises(LorafuseError):
        Q.quantize_bnb4(np.zeros((4, 4), np.float32), "int4")


# ---------------------------------------------------------------- transformers' save_pretrained


def _tiny_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    src = tmp_path / "base"
    model.save_pretrained(src)
    return transformers, src


def _saved_tensors(path):
    """Every tensor of a saved model as numpy (BF16 as a lorafuse Tensor of raw uint16)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                out[k] = _np(fh.get_tensor(k))
    return out


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _fold_fp4_zero(packed: np.ndarray) -> np.ndarray:
    """Packed fp4 bytes with the code 8 (-0) of either nibble replaced by 0 (+0)."""
    hi, lo = packed >> 4, packed & 15
    return ((np.where(hi == 8, 0, hi) << 4) | np.where(lo == 8, 0, lo)).astype(np.uint8)


@pytest.mark.parametrize("quant_type, double", [("nf4", True), ("fp4", False)])
def test_transformers_4bit_save_pretrained(tmp_path, quant_type, double):
    transformers, src = _tiny_llama(tmp_path)
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                         bnb_4bit_use_double_quant=double, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=qc, device_map="cpu",
                                                              dtype=torch.bfloat16)
    out = tmp_path / "q4"
    model.save_pretrained(out)
    sd = _saved_tensors(out)
    weights = sorted(k[: -len(".quant_state.bitsandbytes__" + quant_type)] for k in sd
                     if k.endswith(".quant_state.bitsandbytes__" + quant_type))
    assert len(weights) == 7  # q, k, v, o, gate, up, down
    modules = dict(model.named_modules())
    for name in weights:
        st = Q.parse_bnb4(sd, name)
        assert st.quant_type == quant_type and st.nested == double and st.dtype == "bfloat16"
        param = modules[name[: -len(".weight")]].weight
        ref = F.dequantize_4bit(param.data, param.quant_state)
        ours = Q.dequantize_bnb4(sd[name], st)
        assert tuple(ref.shape) == ours.shape == st.shape
        np.testing.assert_array_equal(_torch_bits(torch.from_numpy(ours).to(torch.bfloat16)), _torch_bits(ref))
        assert sorted(Q.companions(name, sd)) == sorted(k for k in sd if k.startswith(name + "."))
        # requantizing the dequantized weight (a zero delta) writes the file's own codes back, bit for bit; nested
        # absmax is quantized again from its dequantized values (lossy: the dynamic map's most negative entry is
        # -0.993, so the nested scale can shrink), so only its codes' meaning is compared there
        again = Q.quantize_bnb4(ours, quant_type, st.blocksize, st.nested, weight_name=name, dtype=st.dtype,
                                nested_offset=st.nested_offset if st.nested else None,
                                nested_quant_map=st.nested_quant_map)
        # fp4 has two zero codes, 0 and 8: bitsandbytes writes 8 for tiny positive values, which read back as 0.0
        # and quantize to 0; so fp4 codes are compared with 8 taken as 0
        lossy = {name + ".absmax", name + ".nested_absmax"} if st.nested else set()
        fold = _fold_fp4_zero if quant_type == "fp4" else _same
        _assert_same_tensors({k: fold(v) if k == name else v for k, v in again.items() if k not in lossy},
                             {k: fold(sd[k]) if k == name else sd[k] for k in [name, *Q.companions(name, sd)]
                              if k not in lossy})
        if st.nested:
            np.testing.assert_allclose(Q.parse_bnb4(again, name).absmax_f32(), st.absmax_f32(), rtol=1e-2)


def test_transformers_8bit_save_pretrained(tmp_path):
    transformers, src = _tiny_llama(tmp_path)
    qc = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=qc, device_map="cpu",
                                                              dtype=torch.bfloat16)
    out = tmp_path / "q8"
    model.save_pretrained(out)
    sd = _saved_tensors(out)
    weights = sorted(k[: -len("SCB")] + "weight" for k in sd if k.endswith(".SCB"))
    assert len(weights) == 7
    modules = dict(model.named_modules())
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    for name in weights:
        Q.check_int8_format(sd, name)
        mod = modules[name[: -len(".weight")]]
        ref = dequantize_bnb_weight(mod.weight, mod.state)
        ours = Q.dequantize_int8(sd[name], sd[name[: -len("weight")] + "SCB"], name)
        np.testing.assert_array_equal(_bits(ours), _bits(ref.float().numpy()))
