"""apply on bitsandbytes bases (issue 17): tiny Llama models quantized by transformers + bitsandbytes on CPU
(BitsAndBytesConfig load_in_4bit nf4 / fp4, nested or not, and load_in_8bit) and saved with save_pretrained, a
real PEFT LoRA adapter, and lorafuse's output compared with:

- float64(bitsandbytes' own float32 dequantize of the base + the adapter's delta), rounded once: the 16-bit
  output within one ulp of it; untargeted weights equal to bitsandbytes' dequantize in the quant state's dtype;
- PEFT merging the adapter into the bitsandbytes-dequantized 16-bit model (transformers' `dequantize()`);
- with --requantize: the output reloads in transformers as a 4-bit / 8-bit model whose dequantized weights are
  within the quantization bound of the float64 merge; untargeted weights and their companions byte for byte.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import lorafuse  # noqa: E402
from lorafuse.cli import main  # noqa: E402
from lorafuse.errors import FormatError, LorafuseError, LorafuseValueError, UnsupportedError  # noqa: E402
from lorafuse.io import quant_bnb as Q  # noqa: E402
from lorafuse.io.quant import Int8Weight  # noqa: E402
from lorafuse.ops.apply import apply  # noqa: E402  (lorafuse.apply does not take requantize yet)

TARGETS = ("q_proj", "v_proj", "down_proj")  # k_proj, o_proj, gate_proj, up_proj stay untargeted
SCALE = 8 / 4  # lora_alpha / r
# nf4 / fp4, nested or not, and LLM.int8, from a bf16 model; 'storage': packed into bf16 elements
# (bnb_4bit_quant_storage, as for FSDP) from a float16 model
KINDS = ["nf4-nested", "nf4", "fp4-nested", "fp4", "int8", "nf4-nested-storage"]
# half the largest gap between neighbouring code values: the 4-bit rounding bound, as a fraction of absmax
HALF_GAP = {q: float(np.max(np.diff(np.sort(Q.code_table(q))))) / 2 for q in Q.QUANT_TYPES}


@pytest.fixture(autouse=True)
def _no_torch_compile():
    """bitsandbytes wraps its reference kernels in torch.compile; run them eagerly (no compiler, no CPU burst)."""
    # torch's own config patch: pytest's monkeypatch on this config module can lose the attribute on undo
    with torch._dynamo.config.patch(disable=True):
        yield


def _config():
    return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _bnb_config(kind: str):
    if kind == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    quant_type = kind.split("-")[0]
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant="nested" in kind,
                                           bnb_4bit_compute_dtype=torch.bfloat16,
                                           bnb_4bit_quant_storage=torch.bfloat16 if "storage" in kind else torch.uint8)


def _dtype(kind: str):
    return torch.float16 if "storage" in kind else torch.bfloat16


def _load_quantized(path: Path, kind: str, quantize: bool = False):
    """A 16-bit model loaded in 4 / 8 bits (quantize), or a saved bitsandbytes model reloaded."""
    extra = {"quantization_config": _bnb_config(kind)} if quantize else {}
    return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=_dtype(kind), **extra)


def read(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def dequant4_32(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit in float32: the values it casts to the quant state's dtype."""
    qs = copy.copy(quant_state)
    qs.dtype = torch.float32
    return F.dequantize_4bit(packed, qs)


def dequant32(module) -> torch.Tensor:
    """bitsandbytes' own dequantize of a Linear4bit / Linear8bitLt's weight, in float32."""
    w = module.weight
    if hasattr(w, "quant_state"):
        return dequant4_32(w.data, w.quant_state)
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    return dequantize_bnb_weight(w, module.state).float()


def ulp(x: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """The spacing of bf16 (8 significant bits) or float16 (11, subnormals below 2^-14) numbers at |x|."""
    if dtype == torch.float16:
        e = torch.floor(torch.log2(x.abs().clamp_min(2.0**-14)))
        return torch.pow(2.0, e - 10)
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, e - 7)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bytes (packed codes stored as bf16 / fp16 may read as NaN, which torch.equal calls unequal)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(ints[a.element_size()]),
                                                                   b.contiguous().view(ints[b.element_size()]))


class Case:
    def __init__(self, root: Path, kind: str) -> None:
        self.kind, self.root = kind, root
        torch.manual_seed(0)
        self.dtype = _dtype(kind)
        model = transformers.LlamaForCausalLM(_config()).to(self.dtype)
        model.save_pretrained(root / "base16")
        qmodel = _load_quantized(root / "base16", kind, quantize=True)
        qmodel.save_pretrained(root / "q")
        self.base = root / "q"
        self.modules = {n: m for n, m in qmodel.named_modules() if n.endswith(("_proj",))}
        self.dequant = {f"{n}.weight": dequant32(m).double() for n, m in self.modules.items()}
        self.quantized = qmodel
        # the adapter, trained on the same architecture (its shapes are the real ones)
        plain = transformers.LlamaForCausalLM(_config())
        lora = peft.LoraConfig(target_modules=list(TARGETS), r=4, lora_alpha=8, init_lora_weights=False)
        pm = peft.get_peft_model(plain, lora)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape) * 0.1)
        pm.save_pretrained(root / "adapter")
        self.adapter = root / "adapter"
        ad = read(root / "adapter")
        self.deltas = {}
        for k, a in ad.items():
            if k.endswith("lora_A.weight"):
                name = k[len("base_model.model."): -len(".lora_A.weight")] + ".weight"
                b = ad[k.replace("lora_A", "lora_B")]
                self.deltas[name] = SCALE * (b.double() @ a.double())
        assert len(self.deltas) == len(TARGETS)

    def merged64(self, name: str) -> torch.Tensor:
        w = self.dequant[name]
        return w + self.deltas[name] if name in self.deltas else w


@pytest.fixture(scope="module", params=KINDS)
def case(request, tmp_path_factory) -> Case:
    return Case(tmp_path_factory.mktemp(request.param), request.param)


# ---------------------------------------------------------------- 16-bit output (the default)


def test_default_writes_dequantized_16bit(case, tmp_path):
    out = tmp_path / "out"
    report = lorafuse.apply(case.base, [case.adapter], out=out, progress=False)
    assert sorted(report.merged) == sorted(case.deltas) and not report.requantized
    got = read(out)
    base16 = read(case.root / "base16")
    assert set(got) == set(base16)  # every companion dropped; the 16-bit model's own keys
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    for name, ref in case.dequant.items():
        w = got[name]
        assert w.dtype == case.dtype and tuple(w.shape) == tuple(ref.shape)  # the quant state's dtype
        exp = case.merged64(name)
        if name in case.deltas:  # float32 dequant + delta, rounded once: within one ulp of float64
            err = (w.double() - exp).abs()
            assert bool((err <= ulp(exp, case.dtype)).all()), (name, float(err.max()))
        else:  # untargeted: bitsandbytes' float32 dequantize rounded to bf16 (what it returns in bf16)
            assert torch.equal(w, exp.float().to(case.dtype)), name
    # the rest is copied as it was
    for name in set(got) - set(case.dequant):
        assert torch.equal(got[name], base16[name]), name
    # transformers loads it as a plain 16-bit model
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=case.dtype)
    assert not getattr(model, "is_quantized", False)


def test_matches_peft_on_the_dequantized_model(case, tmp_path):
    """PEFT merging into transformers' dequantize() of the bitsandbytes model: the same model up to PEFT's own
    rounding (it rounds the delta to bf16 and adds in bf16: two roundings)."""
    out = tmp_path / "out"
    lorafuse.apply(case.base, [case.adapter], out=out, progress=False)
    got = read(out)
    deq = _load_quantized(case.base, case.kind)
    deq.dequantize()
    merged = peft.PeftModel.from_pretrained(deq, case.adapter).merge_and_unload()
    sd = merged.state_dict()
    for name in case.dequant:
        ours, theirs = got[name].double(), sd[name].double()
        assert sd[name].dtype == case.dtype
        if name not in case.deltas:
            assert torch.equal(got[name], sd[name]), name
            continue
        # PEFT: bf16(dequantized) + bf16(delta), rounded again; lorafuse rounds once: they differ by at most
        # the three roundings, and lorafuse's is the closer to the float64 merge
        delta, exp = case.deltas[name], case.merged64(name)
        size = torch.stack([case.dequant[name].abs(), delta.abs(), ours.abs(), theirs.abs()]).amax(dim=0)
        assert bool(((ours - theirs).abs() <= 2 * ulp(size, case.dtype)).all()), name
        assert float((ours - exp).norm()) <= float((theirs - exp).norm()), name


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dtype_overrides_the_quant_state_dtype(case, tmp_path, dtype, torch_dtype):
    out = tmp_path / "out"
    lorafuse.apply(case.base, [case.adapter], out=out, dtype=dtype, progress=False)
    got = read(out)
    for name in case.dequant:
        assert got[name].dtype == torch_dtype
        if name not in case.deltas:
            assert torch.equal(got[name], case.dequant[name].float().to(torch_dtype)), name
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg.get("dtype", cfg.get("torch_dtype")) == str(torch_dtype)[6:]


# ---------------------------------------------------------------- --requantize


def _bound(case: Case, name: str, module, exp: torch.Tensor) -> torch.Tensor:
    """Per element, how far a correct requantization may land from the float64 merge `exp`."""
    if case.kind == "int8":  # half a step of the row's scale, after the float16 rounding bitsandbytes does
        scb = exp.abs().amax(dim=1, keepdim=True)
        return scb / 127 / 2 * (1 + 1e-3) + exp.abs() * 2.0**-11 + 1e-7
    qs = module.weight.quant_state
    flat = exp.reshape(-1)
    n, bs = flat.numel(), qs.blocksize
    pad = torch.zeros(math.ceil(n / bs) * bs, dtype=torch.float64)
    pad[:n] = flat
    true_absmax = pad.reshape(-1, bs).abs().amax(dim=1)
    stored = (F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax).double()
    per_block = true_absmax * (HALF_GAP[qs.quant_type] + 1e-5) + (stored - true_absmax).abs() + 1e-7
    return per_block.repeat_interleave(bs)[:n].reshape(exp.shape)


def test_requantize_writes_the_same_format(case, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["apply", str(case.base), str(case.adapter), "-o", str(out), "--requantize", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(report["requantized"]) == sorted(case.deltas)
    for e in report["requantized"].values():
        assert 0 < e["rel_fro_error"] < (0.02 if case.kind == "int8" else 0.2) and e["max_abs_error"] > 0
    base, got = read(case.base), read(out)
    assert set(got) == set(base)
    cfg_in = json.loads((case.base / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["quantization_config"] == cfg_in["quantization_config"]
    for name in case.dequant:
        comps = Q.companions(name, base)
        assert Q.companions(name, got) == comps
        for k in [name, *comps]:
            assert got[k].dtype == base[k].dtype and got[k].shape == base[k].shape, k
        if name not in case.deltas:  # untargeted: the weight and every companion byte for byte
            for k in [name, *comps]:
                assert same_bits(got[k], base[k]), k
        else:  # the quant state (quant type, block size, shape, dtype, nested offset) and maps are kept
            for k in comps:
                if "quant_state" in k or k.endswith(("quant_map", "weight_format")):
                    assert same_bits(got[k], base[k]), k
            assert not same_bits(got[name], base[name])
    # transformers reloads it quantized; its dequantized weights are within the quantization bound
    model = _load_quantized(out, case.kind)
    modules = dict(model.named_modules())
    for name in case.deltas:
        mod = modules[name[: -len(".weight")]]
        back = dequant32(mod).double()
        exp = case.merged64(name)
        err = (back - exp).abs()
        assert bool((err <= _bound(case, name, mod, exp)).all()), (name, float(err.max()))
        # and it is a requantization, not the old codes: closer to the merge than the base is
        assert float((back - exp).norm()) < float((case.dequant[name] - exp).norm())


def test_requantize_conflicts_with_dtype(case, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["apply", str(case.base), str(case.adapter), "-o", str(out), "--requantize", "--dtype", "bf16"]) == 2
    assert "--requantize" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("requantize", [False, True])
def test_small_pieces_match_one_piece(case, tmp_path, monkeypatch, requantize):
    """Row pieces (memory bounded: no whole-tensor float32 copy) give the same bytes as one piece per tensor."""
    import lorafuse.ops.apply as apply_mod

    apply(case.base, [case.adapter], out=tmp_path / "one", progress=False, requantize=requantize)
    monkeypatch.setattr(apply_mod, "CHUNK_BYTES", 700)
    monkeypatch.setattr(apply_mod, "BATCH_BYTES", 3000)
    apply(case.base, [case.adapter], out=tmp_path / "many", progress=False, requantize=requantize)
    assert (tmp_path / "one/model.safetensors").read_bytes() == (tmp_path / "many/model.safetensors").read_bytes()


# ---------------------------------------------------------------- one kind is enough below


@pytest.fixture(scope="module")
def nf4(tmp_path_factory) -> Case:
    return Case(tmp_path_factory.mktemp("nf4-nested-b"), "nf4-nested")


def test_single_file_without_config(nf4, tmp_path):
    """No config.json: the companions' names say bitsandbytes, the quant states say the rest."""
    single = tmp_path / "q.safetensors"
    single.write_bytes((nf4.base / "model.safetensors").read_bytes())
    out = tmp_path / "out.safetensors"
    lorafuse.apply(single, [nf4.adapter], out=out, progress=False)
    got = read(out)
    ref = read(nf4.root / "base16")
    assert set(got) == set(ref)
    for name in nf4.dequant:
        assert got[name].dtype == torch.bfloat16 and got[name].shape == ref[name].shape


def test_info_says_bitsandbytes(nf4, capsys):
    assert main(["info", str(nf4.base)]) == 0
    assert "bitsandbytes" in capsys.readouterr().out


def _tamper(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    tensors = read(src)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


QS = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"


def test_broken_quant_state_is_refused_by_name(nf4, tmp_path, capsys):
    def edit(t):
        t[QS] = torch.frombuffer(bytearray(b'{"quant_type": "nf4"}'), dtype=torch.uint8)

    base = _tamper(nf4.base, tmp_path / "bad", edit)
    with pytest.raises(FormatError, match=str(base)) as e:
        lorafuse.apply(base, [nf4.adapter], out=tmp_path / "out", progress=False)
    assert QS in str(e.value)
    assert main(["apply", str(base), str(nf4.adapter), "-o", str(tmp_path / "out")]) == 1
    assert QS in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_companion_without_its_weight_is_refused(nf4, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.extra.weight.absmax"] = torch.ones(4)

    base = _tamper(nf4.base, tmp_path / "orphan", edit)
    with pytest.raises(UnsupportedError, match=r"mlp\.extra\.weight\.absmax"):
        lorafuse.apply(base, [nf4.adapter], out=tmp_path / "out", progress=False)


def test_missing_companion_is_refused(nf4, tmp_path):
    def edit(t):
        del t["model.layers.0.self_attn.q_proj.weight.quant_map"]

    base = _tamper(nf4.base, tmp_path / "nomap", edit)
    with pytest.raises(UnsupportedError, match=r"q_proj\.weight\.quant_map"):
        lorafuse.apply(base, [nf4.adapter], out=tmp_path / "out", progress=False)


def test_errors_are_lorafuse_errors():
    assert issubclass(FormatError, LorafuseError) and issubclass(UnsupportedError, LorafuseError)
    assert issubclass(LorafuseValueError, LorafuseError)


# ---------------------------------------------------------------- the int8 requantizer, bit for bit


def test_int8_quantize_matches_bitsandbytes():
    """What loading a 16-bit model in 8 bits does (Int8Params: float16, then int8_vectorwise_quant on CPU)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 72, generator=g) * torch.rand(40, 1, generator=g)
    x[3] = 0.0  # an all-zero row
    x[5, :4] = torch.tensor([1e-3, -2.5, 2.5, 0.5])  # ties of the absmax
    x[7] = x[7] * 1e-6  # tiny values (float16 subnormals)
    cb, scb, _ = F.int8_vectorwise_quant(x.half())
    scheme = Int8Weight("int8")
    codes, comps = scheme.quantize(x.numpy(), 0, tuple(x.shape), {"SCB": "F32"})
    np.testing.assert_array_equal(codes, cb.numpy())
    np.testing.assert_array_equal(comps["SCB"].view(np.uint32), scb.numpy().view(np.uint32))
    back = scheme.dequantize(codes, {"SCB": (comps["SCB"], "F32")}, 0, tuple(x.shape))
    np.testing.assert_array_equal(back, F.int8_vectorwise_dequant(cb, scb).numpy())


# ---------------------------------------------------------------- shapes whose rows straddle blocks


@pytest.mark.parametrize("quant_type, nested", [("nf4", True), ("fp4", False)])
def test_rows_straddling_blocks(tmp_path, monkeypatch, quant_type, nested):
    """A 37 x 100 weight in blocks of 64 (a row starts mid-block; an odd last block) and a 9 x 33 one in blocks of
    32 (an odd element count: rows start in the low nibble of a byte): any row pieces dequantize the same; requantized
    row blocks start at block boundaries (bnb4_row_align) and give the bytes of one piece; against bitsandbytes'
    reference kernel (its native CPU kernel misreads such shapes, see tests/test_quant_bnb.py)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    import lorafuse.ops.apply as apply_mod

    g = torch.Generator().manual_seed(5)
    shapes = {"a": ((37, 100), 64), "b": ((9, 33), 32)}
    tensors, ref32 = {}, {}
    for m, (shape, bs) in shapes.items():
        w = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
        packed, qs = F.quantize_4bit(w, blocksize=bs, compress_statistics=nested, quant_type=quant_type)
        tensors[f"{m}.weight"] = packed
        tensors.update({f"{m}.weight.{k}": v for k, v in qs.as_dict(packed=True).items()})
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if nested else qs.absmax
        ref32[f"{m}.weight"] = _dequantize_4bit_compute(packed.reshape(-1), absmax.float(),
                                                        _get_4bit_code(quant_type, torch.device("cpu")), bs, qs.shape,
                                                        torch.float32).double()
    base = tmp_path / "base"
    base.mkdir()
    save_file(tensors, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": quant_type}}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    lora, deltas = {}, {}
    for m, (shape, _) in shapes.items():
        a, b = torch.randn(2, shape[1], generator=g) * 0.1, torch.randn(shape[0], 2, generator=g) * 0.1
        lora[f"base_model.model.{m}.lora_A.weight"], lora[f"base_model.model.{m}.lora_B.weight"] = a, b
        deltas[f"{m}.weight"] = b.double() @ a.double()  # alpha = r: scale 1
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                             "target_modules": ["a", "b"]}))
    for requantize in (False, True):
        apply(base, [adapter], out=tmp_path / f"one{requantize}", progress=False, requantize=requantize)
        with monkeypatch.context() as mp:
            mp.setattr(apply_mod, "CHUNK_BYTES", 300)
            mp.setattr(apply_mod, "BATCH_BYTES", 1000)
            apply(base, [adapter], out=tmp_path / f"many{requantize}", progress=False, requantize=requantize)
        one = (tmp_path / f"one{requantize}/model.safetensors").read_bytes()
        assert one == (tmp_path / f"many{requantize}/model.safetensors").read_bytes()
    got = read(tmp_path / "oneFalse")
    for name, w in ref32.items():
        exp = w + deltas[name]
        assert got[name].dtype == torch.bfloat16
        assert bool(((got[name].double() - exp).abs() <= ulp(exp)).all()), name
    again = read(tmp_path / "oneTrue")
    for name in (f"{m}.weight" for m in shapes):
        st = Q.parse_bnb4({k: v.numpy() for k, v in again.items() if k.startswith(name)}, name)
        back = torch.from_numpy(Q.dequantize_bnb4(again[name].numpy(), st)).double()
        exp = ref32[name] + deltas[name]
        assert float((back - exp).abs().max()) <= float(exp.abs().max()) * (HALF_GAP[quant_type] + 0.02)
        assert float((back - exp).norm()) < float((ref32[name] - exp).norm())


def test_pipeline_component_in_4bit(tmp_path):
    """A diffusers pipeline whose transformer is saved in 4 bits (diffusers writes bitsandbytes weights as transformers
    does): its weights are matched by their real shape and written 16-bit; the config loses quantization_config."""
    g = torch.Generator().manual_seed(8)
    w = (torch.randn(64, 128, generator=g) * 0.05).to(torch.bfloat16)  # whole blocks per row: bnb's CPU kernel
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    name = "transformer_blocks.0.attn.to_q.weight"
    tensors = {name: packed, **{f"{name}.{k}": v for k, v in qs.as_dict(packed=True).items()},
               "transformer_blocks.0.attn.to_k.weight": w}
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                       "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    save_file(tensors, str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    (pipe / "transformer" / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    a, b = torch.randn(2, 128, generator=g) * 0.1, torch.randn(64, 2, generator=g) * 0.1
    lora = tmp_path / "lora.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b}, str(lora))
    out = tmp_path / "out"
    lorafuse.apply(pipe, [lora], out=out, progress=False)
    got = read(out / "transformer")
    assert set(got) == {name, "transformer_blocks.0.attn.to_k.weight"}
    ref = dequant4_32(packed, qs).double()
    exp = ref + b.double() @ a.double()
    assert got[name].dtype == torch.bfloat16 and tuple(got[name].shape) == (64, 128)
    assert bool(((got[name].double() - exp).abs() <= ulp(exp)).all())
    assert "quantization_config" not in json.loads((out / "transformer" / "config.json").read_text())
