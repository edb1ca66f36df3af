"""`--device cuda` / `device="cuda"` end to end.

Everywhere: asking for the GPU where it cannot run (a build without the CUDA module, no driver, no
device) fails before any work with DeviceError saying why and what to do, on the CLI as one line and
exit code 1, and leaves no output; an unknown device is a LorafuseValueError; every verb that takes
`--device` teaches it in its --help.

With a GPU (skipped with the reason elsewhere): apply, combine, resize and extract on the GPU against
independent references (PEFT's own merge_and_unload, numpy float64) and against the CPU core on the same
files. The per-operation comparisons against the reference backend are in test_backend_ops.py, where
'cuda' is one more backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft_fixtures as pf
import pytest
import torch
from safetensors.numpy import load_file

import lorafuse
from lorafuse.backends import available_backends
from lorafuse.backends import cuda as cuda_backend
from lorafuse.cli import main
from lorafuse.errors import DeviceError, LorafuseValueError

HAVE_CUDA = "cuda" in available_backends()
WHY = "" if HAVE_CUDA else cuda_backend.unavailable()
needs_gpu = pytest.mark.skipif(not HAVE_CUDA, reason=WHY or "no CUDA backend")
without_gpu = pytest.mark.skipif(HAVE_CUDA, reason="this machine runs the CUDA backend")


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> pf.Case:
    return pf.llama_case(tmp_path_factory.mktemp("cuda"), seed=3, r=8, lora_alpha=16)


@pytest.fixture(scope="module")
def second(case: pf.Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pf.extra_adapter(case, tmp_path_factory.mktemp("cuda2"), seed=4, r=4, lora_alpha=8)


def _verbs(case: pf.Case, second: Path, out: Path) -> dict[str, list[str]]:
    return {
        "apply": ["apply", str(case.base_dir), str(case.adapter_dir), "-o", str(out)],
        "combine": ["combine", str(case.adapter_dir), str(second), "-o", str(out), "--rank", "4"],
        "resize": ["resize", str(case.adapter_dir), "-o", str(out), "--rank", "2"],
        "extract": ["extract", str(case.base_dir), str(case.base_dir), "-o", str(out), "--rank", "2"],
    }


@without_gpu
@pytest.mark.parametrize("verb", ["apply", "combine", "resize", "extract"])
def test_cli_device_cuda_where_it_cannot_run(case, second, tmp_path, capsys, verb):
    out = tmp_path / "out"
    rc = main([*_verbs(case, second, out)[verb], "--device", "cuda", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"lorafuse {verb}: error: DeviceError: " in err
    assert "--device cpu" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


@without_gpu
def test_api_device_cuda_where_it_cannot_run(case, second, tmp_path):
    with pytest.raises(DeviceError, match="--device cpu"):
        lorafuse.apply(case.base_dir, [case.adapter_dir], out=tmp_path / "m", device="cuda")
    with pytest.raises(DeviceError):
        lorafuse.combine([case.adapter_dir, second], device="cuda")
    with pytest.raises(DeviceError):
        lorafuse.resize(case.adapter_dir, 2, device="cuda")
    with pytest.raises(DeviceError):
        lorafuse.extract(case.base_dir, case.base_dir, rank=2, device="cuda")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["tpu", "CUDA2", "", 0])
def test_unknown_devices_are_refused(case, second, tmp_path, device):
    with pytest.raises(LorafuseValueError, match="device"):
        lorafuse.apply(case.base_dir, [case.adapter_dir], out=tmp_path / "m", device=device)
    with pytest.raises(LorafuseValueError, match="device"):
        lorafuse.combine([case.adapter_dir, second], device=device)
    with pytest.raises(LorafuseValueError, match="device"):
        lorafuse.resize(case.adapter_dir, 2, device=device)
    with pytest.raises(LorafuseValueError, match="device"):
        lorafuse.extract(case.base_dir, case.base_dir, rank=2, device=device)


@without_gpu
@pytest.mark.parametrize("alias", ["gpu", "cuda:0", " CUDA "])
def test_every_verb_takes_the_same_device_names(case, second, tmp_path, alias):
    """One check of device names (backends.check_device) for every verb: the aliases of 'cuda' name the GPU
    in combine as in apply, resize and extract (here: DeviceError, the GPU cannot run)."""
    with pytest.raises(DeviceError):
        lorafuse.apply(case.base_dir, [case.adapter_dir], out=tmp_path / "m", device=alias)
    with pytest.raises(DeviceError):
        lorafuse.combine([case.adapter_dir, second], device=alias)
    with pytest.raises(DeviceError):
        lorafuse.resize(case.adapter_dir, 2, device=alias)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", ["apply", "combine", "resize", "extract"])
def test_help_teaches_the_device(capsys, verb):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--device {cpu,cuda}" in text and "NVIDIA GPU" in text and "docs/building.md" in text


def test_device_cpu_is_the_default_and_the_same(case, tmp_path):
    a = lorafuse.apply(case.base_dir, [case.adapter_dir], out=tmp_path / "a", progress=False)
    b = lorafuse.apply(case.base_dir, [case.adapter_dir], out=tmp_path / "b", progress=False, device="cpu")
    ta, tb = load_file(str(a.out / "model.safetensors")), load_file(str(b.out / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


# ---------------------------------------------------------------- on a GPU


def _state(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@needs_gpu
def test_apply_on_the_gpu_matches_peft_and_the_cpu(case, tmp_path):
    gpu = lorafuse.apply(case.base_dir, [case.adapter_dir], out=tmp_path / "gpu", progress=False, device="cuda")
    cpu = lorafuse.apply(case.base_dir, [case.adapter_dir], out=tmp_path / "cpu", progress=False, device="cpu")
    g, c = _state(gpu.out), _state(cpu.out)
    assert g.keys() == c.keys() == case.merged_state.keys()
    for k, ref in case.merged_state.items():
        # float32 outputs: PEFT's merge is float32 too; both within float32 accumulation error of each other
        np.testing.assert_allclose(g[k], ref, rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(g[k], c[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert sorted(gpu.merged) == sorted(cpu.merged)


@needs_gpu
def test_apply_bf16_on_the_gpu_rounds_once(case, tmp_path):
    gpu = lorafuse.apply(case.base_dir, [case.adapter_dir], out=tmp_path / "gpu", progress=False, device="cuda",
                         dtype="bf16")
    cpu = lorafuse.apply(case.base_dir, [case.adapter_dir], out=tmp_path / "cpu", progress=False, dtype="bf16")
    g, c = _state(gpu.out), _state(cpu.out)
    for k in c:
        a = torch.from_numpy(g[k].view(np.int16).astype(np.int32))
        b = torch.from_numpy(c[k].view(np.int16).astype(np.int32))
        # one rounding of nearly the same float32 value: equal, or one bf16 step apart where the float32
        # sums (in another order on the GPU) straddle a rounding boundary
        assert int((a - b).abs().max()) <= 1, k
        assert float((a != b).double().mean()) < 1e-3, k


@needs_gpu
def test_combine_resize_extract_on_the_gpu(case, second, tmp_path):
    for method in ("svd", "cat", "ties_svd"):
        kw = {"density": 0.5} if method == "ties_svd" else {}
        g = lorafuse.combine([case.adapter_dir, second], [0.7, 0.4], method=method, rank=4, device="cuda", **kw) \
            if method != "cat" else lorafuse.combine([case.adapter_dir, second], [0.7, 0.4], method=method,
                                                     device="cuda")
        c = lorafuse.combine([case.adapter_dir, second], [0.7, 0.4], method=method,
                             **({"rank": 4} if method != "cat" else {}), **kw)
        for n, u in c.updates.items():
            dg, dc = g.updates[n].delta().astype(np.float64), u.delta().astype(np.float64)
            assert np.linalg.norm(dg - dc) <= 1e-4 * max(np.linalg.norm(dc), 1e-30), (method, n)
    rg = lorafuse.resize(case.adapter_dir, 3, device="cuda")
    rc = lorafuse.resize(case.adapter_dir, 3)
    for n, u in rc.adapter.updates.items():
        dg, dc = rg.adapter.updates[n].delta().astype(np.float64), u.delta().astype(np.float64)
        assert np.linalg.norm(dg - dc) <= 1e-4 * max(np.linalg.norm(dc), 1e-30), n
    merged = lorafuse.apply(case.base_dir, [case.adapter_dir], out=tmp_path / "merged", progress=False)
    eg = lorafuse.extract(case.base_dir, merged.out, rank=8, device="cuda", progress=False)
    ec = lorafuse.extract(case.base_dir, merged.out, rank=8, progress=False)
    assert {m.name for m in eg.modules} == {m.name for m in ec.modules}
    for mg, mc in zip(sorted(eg.modules, key=lambda m: m.name), sorted(ec.modules, key=lambda m: m.name)):
        # rank-8 deltas extracted at rank 8: both recover them to float32 accuracy
        assert mg.rel_error < 1e-3 and mc.rel_error < 1e-3, mg.name
    report = json.dumps([m.name for m in eg.modules])
    assert report
