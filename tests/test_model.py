"""The data model as a leaf: typed update classes, the format registry, typed per-format state,
arithmetic without formats, and the version from one place. References: numpy float64 and the real
safetensors package."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import lorafuse
from lorafuse.errors import LorafuseValueError
from lorafuse.io.tensor import Tensor
from lorafuse.model import (
    Adapter,
    DiffusersState,
    KohyaState,
    LohaUpdate,
    LokrUpdate,
    LoraUpdate,
    LycorisUpdate,
    PeftState,
    arithmetic,
    get_format,
    registry,
)
from lorafuse.model.state import ALPHA_DTYPES_KEY, as_diffusers, as_kohya, metadata_of

SRC = Path(__file__).resolve().parents[1] / "src"


def _t(rng: np.random.Generator, *shape: int) -> Tensor:
    return Tensor.from_array(rng.standard_normal(shape).astype(np.float32))


def test_the_one_class_constructor_builds_the_class_of_its_algorithm():
    rng = np.random.default_rng(0)
    loha = LycorisUpdate("m", "loha", "linear", (6, 5), 0.5, {"hada_w1_a": _t(rng, 6, 2), "hada_w1_b": _t(rng, 2, 5),
                                                              "hada_w2_a": _t(rng, 6, 2), "hada_w2_b": _t(rng, 2, 5)})
    lokr = LycorisUpdate("m", "lokr", "linear", (6, 4), 2.0, {"lokr_w1": _t(rng, 2, 2), "lokr_w2": _t(rng, 3, 2)})
    assert type(loha) is LohaUpdate and type(lokr) is LokrUpdate
    assert isinstance(loha, LycorisUpdate) and loha.algo == "loha" and lokr.algo == "lokr"
    t = {k: v.f32().astype(np.float64) for k, v in loha.tensors.items()}
    want = 0.5 * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    np.testing.assert_allclose(loha.delta(), want, rtol=1e-12)
    np.testing.assert_allclose(lokr.delta(), 2.0 * np.kron(lokr.tensors["lokr_w1"].f32().astype(np.float64),
                                                             lokr.tensors["lokr_w2"].f32().astype(np.float64)),
                               rtol=1e-12)
    # the exact factorization of each class reproduces its delta
    for u in (loha, lokr):
        b, a = u.stored_factors()
        np.testing.assert_allclose(u.scale * (b.astype(np.float64) @ a.astype(np.float64)), u.delta(),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(LorafuseValueError, match="LyCORIS algorithm must be one of loha, lokr, got 'boft'"):
        LycorisUpdate("m", "boft", "linear", (6, 4), 1.0, {})
    with pytest.raises(LorafuseValueError, match="a LohaUpdate has algo 'loha', not 'lokr'"):
        LohaUpdate("m", "lokr", "linear", (6, 5), 1.0, dict(loha.tensors))


def test_every_update_class_follows_the_protocol():
    rng = np.random.default_rng(1)
    lora = LoraUpdate("m", _t(rng, 3, 5), _t(rng, 6, 3), 0.25)
    lokr = LycorisUpdate("m", "lokr", "linear", (6, 4), 2.0, {"lokr_w1": _t(rng, 2, 2), "lokr_w2": _t(rng, 3, 2)},
                         magnitude=_t(rng, 6))
    for u in (lora, lokr):
        s = u.structure()
        assert (s.m, s.n) == u.delta_shape
        d = u.delta()
        assert s.fro2(u.name) * u.scale ** 2 == pytest.approx(float(np.sum(d * d)), rel=1e-10)
    assert lora.stored_tensors() == [lora.A, lora.B]
    assert lokr.stored_tensors() == [*lokr.tensors.values(), lokr.magnitude]


def test_arithmetic_lives_in_the_model_and_is_exact():
    rng = np.random.default_rng(2)
    a = Adapter({"m": LoraUpdate("m", _t(rng, 2, 5), _t(rng, 4, 2), 0.5)})
    b = Adapter({"m": LoraUpdate("m", _t(rng, 3, 5), _t(rng, 4, 3), 2.0)})
    da, db = a["m"].delta(), b["m"].delta()
    got = arithmetic.weighted_cat([(1.5, a), (-2.0, b)])
    np.testing.assert_allclose(got["m"].delta(), 1.5 * da - 2.0 * db, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose((a - b)["m"].delta(), da - db, rtol=1e-5, atol=1e-6)
    u, s, vt = np.linalg.svd(da + db)
    np.testing.assert_allclose((a + b).to_rank(1)["m"].delta(), s[0] * np.outer(u[:, 0], vt[0]), rtol=1e-4,
                               atol=1e-5)
    assert (a + b).norm() == pytest.approx(float(np.linalg.norm(da + db)), rel=1e-5)


def test_the_registry_detects_loads_and_saves(tmp_path):
    assert registry.names()[:3] == ["kohya", "diffusers", "peft"]
    rng = np.random.default_rng(3)
    path = tmp_path / "k.safetensors"
    save_file({"lora_unet_x.lora_down.weight": rng.standard_normal((2, 5)).astype(np.float32),
               "lora_unet_x.lora_up.weight": rng.standard_normal((4, 2)).astype(np.float32),
               "lora_unet_x.alpha": np.array(1.0, dtype=np.float16)}, str(path), {"ss_network_dim": "2"})
    assert lorafuse.detect_format(path) == "kohya" and registry.sniff(path, ["lora_unet_x.lora_down.weight"]) == "kohya"
    adapter = get_format("kohya").load(path)
    state = adapter.state
    assert state == KohyaState({"ss_network_dim": "2"}, {"lora_unet_x": "F16"})
    out = adapter.save(tmp_path / "out.safetensors")  # through the registry
    back = lorafuse.load(out)
    np.testing.assert_array_equal(back["lora_unet_x"].delta(), adapter["lora_unet_x"].delta())
    assert back.state.alpha_dtypes == {"lora_unet_x": "F16"}
    with pytest.raises(LorafuseValueError, match=re.escape("unknown adapter format 'onnx' (lorafuse writes 'kohya', "
                                                           "'diffusers' and 'peft')")):
        adapter.save(tmp_path / "x", format="onnx")


def test_format_state_is_typed_and_kept_out_of_config(tmp_path):
    k = KohyaState({"a": "1"}, {"m": None, "n": "F16"})
    assert KohyaState.from_record_config(k.record_config(), {"a": "1"}) == k
    assert k.record_config() == {ALPHA_DTYPES_KEY: {"m": None, "n": "F16"}}
    assert KohyaState.from_record_config("not a mapping", {}) == KohyaState()
    assert as_kohya(DiffusersState({"x": "y"})) == KohyaState({"x": "y"})
    assert as_diffusers(k) == DiffusersState({"a": "1"}) and metadata_of(PeftState()) == {}
    assert Adapter({}, config={"r": 8}).state == PeftState()
    # a kohya file's state stays with the adapter through resize and arithmetic, never in its config
    rng = np.random.default_rng(5)
    path = tmp_path / "k.safetensors"
    save_file({"lora_unet_x.lora_down.weight": rng.standard_normal((2, 5)).astype(np.float32),
               "lora_unet_x.lora_up.weight": rng.standard_normal((4, 2)).astype(np.float32),
               "lora_unet_x.alpha": np.array(1.0, dtype=np.float16)}, str(path), {"ss_network_dim": "2"})
    a = lorafuse.load(path)
    # its config states the modules' ranks and scales (as a result of arithmetic does), nothing of the file
    assert a.config == {"r": 2, "lora_alpha": 1, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False,
                        "use_dora": False}
    assert a.state == KohyaState({"ss_network_dim": "2"}, {"lora_unet_x": "F16"})
    for derived in (a + a, 0.5 * a):
        assert derived.state == a.state and derived.state is not a.state


def test_version_comes_from_one_place():
    try:
        want = importlib.metadata.version("lorafuse")
    except importlib.metadata.PackageNotFoundError:
        text = (SRC.parent / "pyproject.toml").read_text(encoding="utf-8")
        want = re.search(r'^version = "([^"]+)"', text, re.M).group(1)  # type: ignore[union-attr]
    from lorafuse.io.manifest import version

    assert lorafuse.__version__ == want == version()


def test_the_model_imports_without_formats_or_ops():
    code = ("import sys, lorafuse.model; bad = sorted(m for m in sys.modules if m.startswith(('lorafuse.formats', "
            "'lorafuse.ops', 'lorafuse.cli'))); print(bad)")
    # lorafuse/__init__ imports the formats (to fill the registry): load the model package without it
    # (the installed package's own folder: in CI the compiled core lives there, not in src/)
    here = str(Path(lorafuse.__file__).parent)
    stub = ("import sys, types; p = types.ModuleType('lorafuse'); "
            f"p.__path__ = [{here!r}]; sys.modules['lorafuse'] = p; ")
    out = subprocess.run([sys.executable, "-c", stub + code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
