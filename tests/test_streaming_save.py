"""Streamed outputs (formats.streaming): an adapter written module by module, modules put in any order,
gives the same bytes as `Adapter.save` of the same adapter (every file, the manifest included: it holds
no times), loads in the real PEFT / safetensors with the deltas numpy float64 computes, and follows the
output rules (nothing at `out` on an error, a previous output intact)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import struct
import weakref
from pathlib import Path

import numpy as np
import pytest
from peft_fixtures import llama_case
from safetensors import safe_open
from safetensors.numpy import save as save_bytes
from safetensors.numpy import save_file

import lorafuse
from lorafuse.errors import LorafuseValueError, ShapeMismatchError, UnsupportedError
from lorafuse.formats.streaming import open_stream
from lorafuse.io.safetensors import SafetensorsWriter, TensorSpec
from lorafuse.io.tensor import Tensor
from lorafuse.model import Adapter, DiffusersState, LoraUpdate, PeftState
from lorafuse.model.layout import AdapterLayout, ModuleLayout


def _files(root: Path) -> dict[str, bytes]:
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def _recomputed(adapter: Adapter, ranks: dict[str, int], seed: int, scale: float = 1.0) -> dict[str, LoraUpdate]:
    """New float32 factors for every module, as combine / resize make them (with_factors)."""
    g = np.random.default_rng(seed)
    out = {}
    for name, u in adapter.updates.items():
        assert isinstance(u, LoraUpdate)
        k = ranks[name]
        b = g.standard_normal((u.B.shape[0], k)).astype(np.float32) * 0.1
        a = g.standard_normal((k, int(np.prod(u.A.shape[1:])))).astype(np.float32)
        out[name] = u.with_factors(b, a, scale)
    return out


def _stream(fmt: str, out: Path, expected: Adapter, seed: int = 0, **kw: object) -> Path:
    """Write `expected` through a stream: a template without updates, the layout, modules shuffled."""
    layout = AdapterLayout(ModuleLayout.like(u, u.rank, u.scale, u.A.dtype) for u in expected.updates.values())
    template = dataclasses.replace(expected, updates={})
    names = list(expected.updates)
    random.Random(seed).shuffle(names)
    assert names != list(expected.updates)
    with open_stream(fmt, out, layout, template, **kw) as w:  # type: ignore[arg-type]
        for name in names:
            w.put(name, expected.updates[name])
    return out


# ----------------------------------------------------------------------------- PEFT


def test_peft_stream_is_byte_identical_and_loads_in_peft(tmp_path):
    case = llama_case(tmp_path / "case", r=4, lora_alpha=8)
    src = lorafuse.load(case.adapter_dir)
    ranks = {n: (3 if "mlp" in n else 5) for n in src.updates}  # two ranks: rank_pattern in the config
    expected = Adapter(updates=dict(_recomputed(src, ranks, 1)), config=dict(src.config), format="peft",
                       derived_from=[case.adapter_dir])
    saved = expected.save(tmp_path / "saved")
    streamed = _stream("peft", tmp_path / "streamed", expected)
    assert _files(streamed) == _files(saved)
    assert sorted(_files(streamed)) == ["adapter_config.json", "adapter_model.safetensors", "lorafuse_manifest.json"]

    from peft import PeftModel

    base = case.model_cls.from_pretrained(str(case.base_dir))
    before = {k: v.double().numpy().copy() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(streamed)).merge_and_unload().state_dict()
    for name, u in expected.updates.items():
        b, a = u.factors()
        want = before[name + ".weight"] + u.scale * (b.astype(np.float64) @ a.astype(np.float64))
        np.testing.assert_allclose(merged[name + ".weight"].double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_peft_stream_writes_the_template_full_tensors(tmp_path):
    g = np.random.default_rng(2)
    updates = {f"layers.{i}.q_proj": LoraUpdate(f"layers.{i}.q_proj", Tensor.from_array(g.standard_normal((2, 6),
                                                                                                       np.float32)),
                                                Tensor.from_array(g.standard_normal((5, 2), np.float32)), 0.5)
               for i in range(3)}
    full = {"lm_head.weight": Tensor.from_array(g.standard_normal((7, 6), np.float32))}
    expected = Adapter(updates=updates, full=full, config={"target_modules": ["q_proj"]}, format="peft")
    saved = expected.save(tmp_path / "saved")
    streamed = _stream("peft", tmp_path / "streamed", expected)
    assert _files(streamed) == _files(saved)
    with safe_open(str(streamed / "adapter_model.safetensors"), "numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("base_model.model.lm_head.weight"), full["lm_head.weight"].raw)


# ----------------------------------------------------------------------------- kohya

KOHYA = [  # (name, out, in, kernel, rank, alpha); kernel 0: linear
    ("lora_unet_down_blocks_0_resnets_0_conv1", 320, 320, 3, 4, 1.0),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, 1, 8, 4.0),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2", 1280, 1280, 0, 64, 32.0),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, 0, 8, None),
]


def _kohya_file(path: Path) -> Path:
    g = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    for name, o, i, k, r, alpha in KOHYA:
        tensors[f"{name}.lora_down.weight"] = (g.standard_normal((r, i, k, k) if k else (r, i)) / i).astype(np.float16)
        tensors[f"{name}.lora_up.weight"] = g.standard_normal((o, r, 1, 1) if k else (o, r)).astype(np.float16)
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float16)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
            "sshs_model_hash": "stale", "sshs_legacy_hash": "stale", "modelspec.title": "t"}
    save_file(tensors, str(path), metadata=meta)
    return path


def _data_buffer(raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n:]


def test_kohya_stream_with_conv_modules_is_byte_identical(tmp_path):
    src = lorafuse.load(_kohya_file(tmp_path / "in.safetensors"))
    ranks = {n: (2 if "conv1" in n else 96) for n in src.updates}
    expected = Adapter(updates=dict(_recomputed(src, ranks, 3)), format="kohya", state=src.state,
                       derived_from=[tmp_path / "in.safetensors"])
    saved = expected.save(tmp_path / "saved.safetensors")
    streamed = _stream("kohya", tmp_path / "streamed.safetensors", expected)
    raw = streamed.read_bytes()
    assert raw == saved.read_bytes()
    assert len(_data_buffer(raw)) > 0x110000  # the legacy hash's window holds data
    with safe_open(str(streamed), "numpy") as f:
        meta = f.metadata()
        back = {k: f.get_tensor(k) for k in f.keys()}
    # sd-scripts' hashes, from the real safetensors serialization with only ss_* metadata
    ref = save_bytes(back, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_model_hash"] == hashlib.sha256(_data_buffer(ref)).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ref[0x100000:0x110000]).hexdigest()[:8]
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("96", "96.0")
    loaded = lorafuse.load(streamed)
    for name, u in expected.updates.items():
        assert loaded[name].kind == u.kind and tuple(loaded[name].delta_shape) == tuple(u.delta_shape)
        np.testing.assert_allclose(loaded[name].delta(), u.delta(), rtol=1e-6, atol=1e-9)
    # .alpha in the input's dtype (KohyaState), exact; none where the input had none and the scale is 1
    assert {k: (v.dtype, float(v)) for k, v in back.items() if k.endswith(".alpha")} == {
        f"{n}.alpha": (np.float16, float(ranks[n])) for n, *_, alpha in KOHYA if alpha is not None}


# ----------------------------------------------------------------------------- diffusers

DIFFUSERS = [  # (name, out, in, kernel, rank, scale)
    ("unet.down_blocks.0.resnets.0.conv1", 32, 16, 3, 4, 1.0),
    ("unet.down_blocks.0.attentions.0.proj_in", 32, 32, 0, 8, 0.5),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 64, 32, 0, 8, 0.5),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 24, 24, 0, 2, 2.0),
]


def _diffusers_adapter() -> Adapter:
    g = np.random.default_rng(4)
    updates = {}
    for name, o, i, k, r, scale in DIFFUSERS:
        a = g.standard_normal((r, i, k, k) if k else (r, i)).astype(np.float32)
        b = g.standard_normal((o, r, 1, 1) if k else (o, r)).astype(np.float32)
        updates[name] = LoraUpdate(name, Tensor.from_array(a), Tensor.from_array(b), scale, "conv" if k else "linear")
    return Adapter(updates=updates, format="diffusers", state=DiffusersState({"ss_note": "kept"}))


def test_diffusers_stream_is_byte_identical_and_reads_back(tmp_path):
    expected = _diffusers_adapter()
    saved = expected.save(tmp_path / "saved.safetensors")
    streamed = _stream("diffusers", tmp_path / "streamed.safetensors", expected, seed=1)
    assert streamed.read_bytes() == saved.read_bytes()
    with safe_open(str(streamed), "numpy") as f:
        assert f.metadata()["ss_note"] == "kept"
        for name, u in expected.updates.items():
            np.testing.assert_array_equal(f.get_tensor(name + ".lora_A.weight"), u.A.raw)
    loaded = lorafuse.load(streamed)
    for name, u in expected.updates.items():
        b, a = u.factors()
        want = (u.scale * (b.astype(np.float64) @ a.astype(np.float64))).reshape(u.delta_shape)
        np.testing.assert_allclose(loaded[name].delta(), want, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- errors and output rules


def _layout(adapter: Adapter) -> AdapterLayout:
    return AdapterLayout.of(adapter.updates)


def test_put_errors_name_the_module_and_both_layouts(tmp_path):
    expected = _diffusers_adapter()
    template = dataclasses.replace(expected, updates={})
    first, second = list(expected.updates)[:2]
    out = tmp_path / "out.safetensors"
    with open_stream(None, out, _layout(expected), template) as w:
        w.put(first, expected[first])
        with pytest.raises(LorafuseValueError, match=rf"module '{first}' put twice"):
            w.put(first, expected[first])
        with pytest.raises(LorafuseValueError, match=r"module 'unet.nope' is not in the output's layout"):
            w.put("unet.nope", expected[first])
        u = expected[second]
        b, a = u.factors()
        with pytest.raises(ShapeMismatchError, match=rf"module '{second}': the update has rank 3, .* but the layout "
                                                     r"says rank 8"):
            w.put(second, u.with_factors(b[:, :3], a[:3], u.scale))
        with pytest.raises(ShapeMismatchError, match=r"A \(8, 31\).*the layout says rank 8, A \(8, 32\)"):
            w.put(second, dataclasses.replace(u, A=Tensor.from_array(np.zeros((8, 31), np.float32))))
        with pytest.raises(ShapeMismatchError, match=r"F16.*layout says .*F32"):
            w.put(second, dataclasses.replace(u, A=u.A.to("F16"), B=u.B.to("F16")))
        with pytest.raises(LorafuseValueError, match=r"scale 1.0 but the layout says 0.5"):
            w.put(second, dataclasses.replace(u, scale=1.0))
        w.put(second, u)  # nothing of the refused puts was written
        for name in list(expected.updates)[2:]:
            w.put(name, expected[name])
    assert out.read_bytes() == expected.save(tmp_path / "saved.safetensors").read_bytes()


def test_missing_module_at_close_writes_nothing(tmp_path):
    expected = _diffusers_adapter()
    out = tmp_path / "out.safetensors"
    names = list(expected.updates)
    with pytest.raises(LorafuseValueError, match=rf"closed before every module was put: 2 of 4 missing "
                                                 rf"\('{names[1]}', '{names[3]}'\)"):
        with open_stream(None, out, _layout(expected), dataclasses.replace(expected, updates={})) as w:
            w.put(names[0], expected[names[0]])
            w.put(names[2], expected[names[2]])
    assert _entries(tmp_path) == []


@pytest.mark.parametrize("fmt", ["peft", "diffusers"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_inside_the_stream_leaves_the_previous_output(tmp_path, fmt, error):
    expected = _diffusers_adapter()
    if fmt == "peft":
        expected = dataclasses.replace(expected, format="peft", state=PeftState())
    out = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    before = _files(expected.save(out))
    other = Adapter(updates=_recomputed(expected, {n: 1 for n in expected.updates}, 5), format=expected.format,
                    state=expected.state)
    with pytest.raises(error):
        with open_stream(fmt, out, _layout(other), dataclasses.replace(other, updates={})) as w:
            w.put(next(iter(other.updates)), next(iter(other.updates.values())))
            raise error("stop")
    assert _files(out) == before
    assert _entries(tmp_path) == [out.name]  # no temporary entry left


def test_open_refuses_before_writing(tmp_path):
    expected = _diffusers_adapter()
    template = dataclasses.replace(expected, updates={})
    theirs = tmp_path / "theirs.safetensors"
    theirs.write_bytes(b"not lorafuse's")
    with pytest.raises(lorafuse.OutputError, match="a file lorafuse did not write"):
        open_stream(None, theirs, _layout(expected), template)
    assert theirs.read_bytes() == b"not lorafuse's"
    with pytest.raises(UnsupportedError, match="not a kohya module name"):  # the format's own checks, at open
        open_stream("kohya", tmp_path / "k.safetensors", _layout(expected), template)
    src = expected.save(tmp_path / "src.safetensors")
    with pytest.raises(lorafuse.OutputError, match="would overwrite the input"):
        open_stream(None, src, _layout(expected), template, inputs=[src])
    assert sorted(_entries(tmp_path)) == ["src.safetensors", "theirs.safetensors"]


def test_put_keeps_nothing_of_the_update(tmp_path):
    expected = _diffusers_adapter()
    name = next(iter(expected.updates))
    u = expected.updates.pop(name)
    refs = [weakref.ref(u.A.raw), weakref.ref(u.B.raw)]
    layout = AdapterLayout([ModuleLayout.of(u), *(ModuleLayout.of(v) for v in expected.updates.values())])
    with open_stream(None, tmp_path / "o.safetensors", layout, dataclasses.replace(expected, updates={})) as w:
        w.put(name, u)
        del u
        assert [r() for r in refs] == [None, None]
        for n, v in expected.updates.items():
            w.put(n, v)


def test_layout_like_matches_with_factors():
    g = np.random.default_rng(6)
    cases = [
        LoraUpdate("conv", Tensor.from_array(g.standard_normal((4, 3, 3, 3), np.float32)),
                   Tensor.from_array(g.standard_normal((5, 4, 1, 1), np.float32)), 2.0, "conv"),
        LoraUpdate("emb", Tensor.from_array(g.standard_normal((4, 11), np.float32)),
                   Tensor.from_array(g.standard_normal((6, 4), np.float32)), 1.0, "embedding", transposed=True),
        LoraUpdate("lin", Tensor.from_array(g.standard_normal((4, 7)).astype(np.float16)),
                   Tensor.from_array(g.standard_normal((9, 4)).astype(np.float16)), 0.25, "linear"),
    ]
    for u in cases:
        b, a = u.stored_factors()
        v = u.with_factors(g.standard_normal((b.shape[0], 2)), g.standard_normal((2, a.shape[1])))
        m = ModuleLayout.like(u, 2)
        assert ModuleLayout.of(v) == m
        assert m.check(v, "here") is v
        p = m.placeholder()
        assert (p.A.shape, p.B.shape, p.delta_shape) == (v.A.shape, v.B.shape, v.delta_shape)
        assert p.A.raw.strides == (0,) * len(p.A.shape)  # takes no memory
    with pytest.raises(LorafuseValueError, match="cannot have the delta shape"):
        ModuleLayout("x", "conv", (4, 4), 2)
    with pytest.raises(LorafuseValueError, match="twice in the layout"):
        AdapterLayout([ModuleLayout("x", "linear", (4, 4), 2)] * 2)


# ----------------------------------------------------------------------------- SafetensorsWriter.write_at


def test_write_at_any_order_and_its_checks(tmp_path):
    g = np.random.default_rng(7)
    arrays = {"c": g.standard_normal((3, 5)).astype(np.float32), "a": np.arange(7, dtype=np.float16),
              "z": np.zeros((0,), np.float32), "b": g.standard_normal(4)}
    specs = [TensorSpec(k, {np.float32: "F32", np.float16: "F16", np.float64: "F64"}[v.dtype.type], v.shape)
             for k, v in arrays.items()]
    out = tmp_path / "x.safetensors"
    with SafetensorsWriter(out, specs, {"m": "1"}) as w:
        for k in ["b", "z", "a", "c"]:
            w.write_at(k, arrays[k])
        with pytest.raises(LorafuseValueError, match="tensor 'a' written twice"):
            w.write_at("a", arrays["a"])
        with pytest.raises(LorafuseValueError, match="no tensor named 'q'"):
            w.write_at("q", arrays["a"])
        with pytest.raises(LorafuseValueError, match="after tensors written by write_at"):
            w.write("c", arrays["c"])
    with safe_open(str(out), "numpy") as f:
        assert f.metadata() == {"m": "1"}
        for k, v in arrays.items():
            np.testing.assert_array_equal(f.get_tensor(k), v)
    with pytest.raises(LorafuseValueError, match=r"closed with 2 of 4 tensors not written: 'c', 'b'"):
        with SafetensorsWriter(tmp_path / "y.safetensors", specs) as w:
            w.write_at("a", arrays["a"])
            w.write_at("z", arrays["z"])
            with pytest.raises(LorafuseValueError, match=r"tensor 'c' \(F32, shape \(3, 5\)\) needs 60 bytes"):
                w.write_at("c", arrays["c"][:2])
            with pytest.raises(LorafuseValueError, match="4-byte elements"):
                w.write_at("c", np.zeros(30, np.float16))
    with SafetensorsWriter(tmp_path / "w.safetensors", specs, {"h": "0000"}) as w:
        for k, v in arrays.items():
            w.write_at(k, v)
        w.rewrite_metadata({"h": "abcd"})
        with pytest.raises(LorafuseValueError, match="header of"):
            w.rewrite_metadata({"h": "a much longer value than before"})
    with safe_open(str(tmp_path / "w.safetensors"), "numpy") as f:
        assert f.metadata() == {"h": "abcd"}
        np.testing.assert_array_equal(f.get_tensor("c"), arrays["c"])


def test_stream_of_an_unstreamable_update_is_refused(tmp_path):
    expected = _diffusers_adapter()
    u = next(iter(expected.updates.values()))
    dora = dataclasses.replace(u, magnitude=Tensor.from_array(np.ones(u.B.shape[0], np.float32)))
    with pytest.raises(UnsupportedError, match="DoRA magnitude or a bias cannot be streamed"):
        ModuleLayout.of(dora)
    with open_stream(None, tmp_path / "o.safetensors", _layout(expected),
                     dataclasses.replace(expected, updates={})) as w:
        with pytest.raises(UnsupportedError, match="cannot be streamed"):
            w.put(u.name, dora)
        for n, v in expected.updates.items():
            w.put(n, v)
    assert lorafuse.load(tmp_path / "o.safetensors")[u.name].magnitude is None
