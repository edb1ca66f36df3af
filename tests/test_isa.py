"""The portable core: every variant the build has and the CPU runs gives the same results.

The wheel carries the core built for generic x86-64, AVX2 and AVX-512 (CMakeLists.txt);
lorafuse/_core.py loads the best one, LORAFUSE_ISA forces one. Each variant runs the
same work in a child process; the results are compared with numpy float64 and with
each other (dtype rounding is exact in every variant; float32 sums may differ in the
last bits where FMA contracts them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lorafuse import _core

_WORK = r"""
import json, sys
import numpy as np
from lorafuse import _core

rng = np.random.default_rng(7)
out = {"isa": _core.isa}
x = (rng.standard_normal(4099) * 3).astype(np.float32)
x[:4] = [65520.0, -1e-8, 3.0e38, np.float32(1) / 3]
# NaNs with payloads (quiet and signalling, both signs) where the vector loops take them and in the
# scalar tails (4099 = 8 * 512 + 3 = 16 * 256 + 3): every path rounds a NaN by the same rule
NAN32 = [0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFFBFFFFF, 0x7FC00001]
xb = x.view(np.uint32)
xb[4:9] = NAN32
xb[4096:4099] = NAN32[:3]
xb[2049] = NAN32[3]
out["bf16"] = np.asarray(_core.from_float32(x, "BF16")).view(np.uint16).tolist()
out["f16"] = np.asarray(_core.from_float32(x, "F16")).view(np.uint16).tolist()
raw = np.frombuffer(rng.bytes(2 * 777), dtype=np.uint16).copy()
out["bf16_back"] = np.asarray(_core.to_float32(raw, "BF16")).view(np.uint32).tolist()
h = np.frombuffer(rng.bytes(2 * 777), dtype=np.uint16).copy()  # 777 = 8 * 97 + 1 = 16 * 48 + 9
h[[0, 3, 16, 100, 776]] = [0x7C01, 0xFD55, 0x7E01, 0xFFFF, 0x7C01]  # NaNs: signalling, quiet
out["f16_back"] = np.asarray(_core.to_float32(h, "F16")).view(np.uint32).tolist()
out["f16_back_ref"] = h.view(np.float16).astype(np.float32).view(np.uint32).tolist()  # numpy: payload as is
# 43 = 32 + 8 + 3: a NaN in a block of 32, in the loop of 8 that follows and in the tail
y = np.full(43, 1.5, np.float32)
y.view(np.uint32)[[5, 33, 38, 41, 42]] = [0xFFFFFFFF, 0x7FBFFFFF, 0xFFC00001, 0x7FFFFFFF, 0xFF800001]
out["f16_short"] = np.asarray(_core.from_float32(y, "F16")).view(np.uint16).tolist()
hy = np.full(43, 0x3C00, np.uint16)
hy[[5, 33, 38, 41, 42]] = [0x7C01, 0xFC02, 0x7DFF, 0x7E01, 0xFC01]
out["f16_short_back"] = np.asarray(_core.to_float32(hy, "F16")).view(np.uint32).tolist()
out["f16_short_back_ref"] = hy.view(np.float16).astype(np.float32).view(np.uint32).tolist()
b = rng.standard_normal((96, 12)).astype(np.float32)
a = rng.standard_normal((12, 80)).astype(np.float32)
out["fro"] = _core.factored_frobenius_sq([(b, a)], 1)[0]
d = b.astype(np.float64) @ a.astype(np.float64)  # the float64 references
out["fro_ref"] = float(np.sum(d * d))
out["svd_ref"] = np.linalg.svd(d, compute_uv=False)[:5].tolist()
B2, A2, S = _core.factored_svd([("m", b, a)], [5], "B", 1)[0]
out["svd_delta"] = (B2.astype(np.float64) @ A2.astype(np.float64)).tolist()
out["svd_s"] = np.asarray(S).tolist()
w = rng.standard_normal((96, 80)).astype(np.float32)
B3, A3, S3, fro = _core.extract_svd([("e", np.zeros_like(w), "F32", w, "F32")], [6], 10, 2, 3, 1)[0]
out["extract_s"] = np.asarray(S3)[:6].tolist()
# the streamed combine's products from BF16 factors (ranks 5 and 16, 53 columns: vector tails everywhere)
sa = [(rng.standard_normal((r, 53)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for r in (5, 16)]
sb = [(rng.standard_normal((37, r)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for r in (5, 16)]
sx, sy = rng.standard_normal((53, 7)).astype(np.float32), rng.standard_normal((37, 7)).astype(np.float32)
sterms = [(a, "BF16", b, "BF16", c) for a, b, c in zip(sa, sb, (0.5, -1.25))]
acc_r, acc_c = np.zeros((37, 7)), np.zeros((53, 7))
_core.sketch_fold([(sterms, "range", sx, acc_r), (sterms, "corange", sy, acc_c)], 1)
f64 = [((a.astype(np.uint32) << 16).view(np.float32).astype(np.float64),
        (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64), c) for a, b, c in zip(sa, sb, (0.5, -1.25))]
out["sketch"] = acc_r.ravel().tolist() + acc_c.ravel().tolist()
out["sketch_ref"] = (sum(c * (b @ (a @ sx)) for a, b, c in f64).ravel().tolist()
                     + sum(c * (a.T @ (b.T @ sy)) for a, b, c in f64).ravel().tolist())

# the fused merge: a PEFT adapter into an F32 and a BF16 weight, through lorafuse.apply
import lorafuse
from pathlib import Path
from safetensors.numpy import save_file
import torch
from safetensors.torch import load_file
tmp = Path(sys.argv[1])
w32 = rng.standard_normal((72, 40)).astype(np.float32)
w16 = rng.standard_normal((64, 72)).astype(np.float32)
(tmp / "base").mkdir()
save_file({"q.weight": w32, "k.weight": w16}, str(tmp / "base" / "model.safetensors"))
(tmp / "lora").mkdir()
fa = {f"base_model.model.{m}.lora_{x}.weight": rng.standard_normal(s).astype(np.float32)
      for m, o, i in (("q", 72, 40), ("k", 64, 72)) for x, s in (("A", (4, i)), ("B", (o, 4)))}
save_file(fa, str(tmp / "lora" / "adapter_model.safetensors"))
(tmp / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
lorafuse.apply(str(tmp / "base"), [str(tmp / "lora")], None, str(tmp / "out"), dtype="bf16", progress=False)
merged = load_file(str(tmp / "out" / "model.safetensors"))
for m, w in (("q", w32), ("k", w16)):
    ref = w.astype(np.float64) + 2.0 * (fa[f"base_model.model.{m}.lora_B.weight"].astype(np.float64)
                                        @ fa[f"base_model.model.{m}.lora_A.weight"].astype(np.float64))
    out[f"merge_{m}"] = merged[f"{m}.weight"].double().numpy().tolist()
    out[f"merge_{m}_ref"] = ref.tolist()
# a NaN with a payload in the base, rounded to F16 by the fused merge's vector stores and its column tail
# (40 columns: blocks of 16 or 32, then a tail of 8)
w_nan = w32.copy()
w_nan.view(np.uint32)[[0, 1, 5, 70], [0, 17, 39, 38]] = [0x7FFFFFFF, 0xFFBFFFFF, 0x7FFFFFFF, 0xFF800001]
(tmp / "base_nan").mkdir()
save_file({"q.weight": w_nan, "k.weight": w16}, str(tmp / "base_nan" / "model.safetensors"))
lorafuse.apply(str(tmp / "base_nan"), [str(tmp / "lora")], None, str(tmp / "out_nan"), dtype="fp16",
               progress=False, allow_nonfinite=True)
merged = load_file(str(tmp / "out_nan" / "model.safetensors"))
out["merge_nan_f16"] = merged["q.weight"].view(torch.int16).numpy().view(np.uint16).tolist()
json.dump(out, sys.stdout)
"""


def _variants() -> list[str]:
    from lorafuse import _core as loaded

    here = Path(loaded.__file__).parent
    built = sorted({p.name.split(".")[0].removeprefix("_core_") for p in here.glob("_core_*.so")})
    if not built:  # an editable install keeps them in site-packages' lorafuse/
        built = [v for v in ("generic", "avx2", "avx512", "native")
                 if importlib.util.find_spec(f"lorafuse._core_{v}") is not None]
    features = loaded.cpu_features()
    return [v for v in built if v in ("generic", "native") or features.get(v)]


def _python() -> list[str]:
    return [sys.executable, *(["-S"] if sys.flags.no_site else [])]  # a child like this interpreter


def _run(isa: str, tmp: Path) -> dict[str, object]:
    env = dict(os.environ, LORAFUSE_ISA=isa)
    work = tmp / isa
    work.mkdir()
    res = subprocess.run([*_python(), "-c", _WORK, str(work)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_the_loader_reads_the_cpu_like_the_compiler_does() -> None:
    import types

    import lorafuse

    origin = Path(lorafuse.__file__).parent / "_core.py"  # the loader, not the module it became
    source = origin.read_text(encoding="utf-8").replace("sys.modules[__name__] = _choose()", "")
    loader = types.ModuleType("lorafuse_core_loader")
    exec(compile(source, str(origin), "exec"), loader.__dict__)
    ours = loader.cpu_features()
    theirs = _core.cpu_features()  # __builtin_cpu_supports in the loaded module
    assert ours["avx2"] == bool(theirs["avx2"] and theirs["f16c"])
    assert ours["avx512"] == bool(theirs["avx512"] and ours["avx2"])


def test_the_best_supported_variant_is_loaded_by_default(tmp_path: Path) -> None:
    # Asked of a fresh process with LORAFUSE_ISA=auto: this one may run with a forced variant.
    features = _core.cpu_features()
    variants = _variants()
    assert "generic" in variants or "native" in variants
    loaded = _run("auto", tmp_path)["isa"]
    if "native" in variants:
        assert loaded == "native"
    else:
        supported = {"avx512": features["avx512"] and features["avx2"] and features["f16c"],
                     "avx2": features["avx2"] and features["f16c"], "generic": True}
        best = next(v for v in ("avx512", "avx2", "generic") if v in variants and supported[v])
        assert loaded == best, (loaded, features)


def test_every_variant_gives_the_same_results(tmp_path: Path) -> None:
    variants = _variants()
    results = {v: _run(v, tmp_path) for v in variants}
    for v, r in results.items():
        assert r["isa"] == v
    ref = results[variants[0]]
    for v, r in results.items():
        # rounding to BF16 / F16 and widening are exact operations: identical bits everywhere
        assert r["bf16"] == ref["bf16"], v
        assert r["f16"] == ref["f16"], v
        assert r["bf16_back"] == ref["bf16_back"], v
        assert r["f16_back"] == r["f16_back_ref"], v  # decoding is exact: a signalling NaN stays one
        assert r["f16_short_back"] == r["f16_short_back_ref"], v
        assert [r["f16_short"][i] for i in (5, 33, 38, 41, 42)] == [0xFE00, 0x7E00, 0xFE00, 0x7E00, 0xFE00], v
        assert all(r["f16_short"][i] == 0x3E00 for i in range(43) if i not in (5, 33, 38, 41, 42)), v
        nan16 = [r["f16"][i] for i in (4, 5, 6, 7, 8, 2049, 4096, 4097, 4098)]
        assert nan16 == [0x7E00, 0xFE00, 0x7E00, 0xFE00, 0x7E00, 0xFE00, 0x7E00, 0xFE00, 0x7E00], v
        nan_bf16 = [r["bf16"][i] for i in (4, 5, 6, 7, 8, 2049, 4096, 4097, 4098)]  # the top half, quieted
        assert nan_bf16 == [0x7FFF, 0xFFFF, 0x7FC0, 0xFFFF, 0x7FC0, 0xFFFF, 0x7FFF, 0xFFFF, 0x7FC0], v
        got_nan = np.asarray(r["merge_nan_f16"], dtype=np.uint16)
        assert got_nan[[0, 1, 5, 70], [0, 17, 39, 38]].tolist() == [0x7E00, 0xFE00, 0x7E00, 0xFE00], v
        assert int(np.sum((got_nan & 0x7C00) == 0x7C00)) == 4, v  # and nothing else is NaN or Inf
        assert r["fro"] == pytest.approx(r["fro_ref"], rel=1e-9), v
        np.testing.assert_allclose(r["svd_s"][:5], r["svd_ref"], rtol=1e-6)
        np.testing.assert_allclose(r["svd_s"], ref["svd_s"], rtol=1e-9)
        np.testing.assert_allclose(r["svd_delta"], ref["svd_delta"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(r["extract_s"], ref["extract_s"], rtol=1e-4)
        sk, sk_ref = np.asarray(r["sketch"]), np.asarray(r["sketch_ref"])  # float32 sums of ~50 products
        assert np.max(np.abs(sk - sk_ref)) <= 1e-5 * np.max(np.abs(sk_ref)), v
        for m in ("q", "k"):  # rounded once from float32: within one bf16 ulp (2^-7 relative) of float64
            got, want = np.asarray(r[f"merge_{m}"]), np.asarray(r[f"merge_{m}_ref"])
            assert np.all(np.abs(got - want) <= 2.0 ** -8 * np.abs(want) + 1e-6), v
            # variants differ at most where float32 FMA contraction flips a rounding: one bf16 step
            other = np.asarray(ref[f"merge_{m}"])
            assert np.mean(got == other) > 0.99, v
            assert np.all(np.abs(got - other) <= 2.0 ** -7 * np.abs(other) + 1e-6), v


def test_an_unknown_or_missing_variant_is_refused_in_words() -> None:
    env = dict(os.environ, LORAFUSE_ISA="sse9")
    res = subprocess.run([*_python(), "-c", "import lorafuse; print('imported'); lorafuse.load"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "imported"  # the core loads on first use, and is refused there
    assert res.returncode != 0
    assert "ImportError: LORAFUSE_ISA='sse9'" in res.stderr and "generic" in res.stderr


@pytest.mark.parametrize("isa", ["sse9", "avx1024"])
@pytest.mark.parametrize("command", [["--version"], ["info", "x.safetensors"], ["--help"]])
def test_the_command_refuses_a_bad_variant_in_one_line(isa: str, command: list[str]) -> None:
    env = dict(os.environ, LORAFUSE_ISA=isa)
    res = subprocess.run([*_python(), "-m", "lorafuse.cli", *command], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr == f"lorafuse: error: LORAFUSE_ISA={isa!r}: choose one of auto, native, avx512, avx2, generic\n"
    assert res.stdout == ""


def test_the_version_has_one_source() -> None:
    import tomllib

    import lorafuse

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    want = pyproject["project"]["version"]
    assert lorafuse.__version__ == want
    # the compiled core was built from the same pyproject (a stale build says so here)
    assert _core.__version__ == want, f"the compiled core is {_core.__version__}: rebuild (pip install .)"
    # an installed lorafuse records the same version in its metadata (a source tree on sys.path has none)
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("lorafuse")
    except PackageNotFoundError:
        return
    if Path(str(dist.locate_file("lorafuse"))).resolve() == Path(lorafuse.__file__).parent.resolve():
        assert dist.version == want
