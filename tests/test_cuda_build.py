"""lorafuse._cuda compiles wherever nvcc is found, and keeps the promises that need no GPU.

`pip install ".[test]"` (what CI runs) builds the CPU core only: the CUDA module takes LORAFUSE_CUDA=ON
(docs/building.md). So where a CUDA compiler is found this test configures the project with CMake itself
(LORAFUSE_CUDA=ON, one GPU architecture), builds the `_cuda` target with cuBLAS / cuSOLVER from NVIDIA's
wheels (in the test extra) and installs it alone into a temporary folder; every landing thus proves that
the CUDA backend compiles and links. Then:

- its dynamic section: cuBLAS and cuSOLVER by soname, no shared CUDA runtime (it is linked statically:
  only the driver is needed), and a RUNPATH into the pip packages beside lorafuse (site-packages/nvidia);
- loaded in a child process (the NVIDIA libraries preloaded from their pip packages, as
  lorafuse.backends.cuda does where the RUNPATH does not reach them): the functions of lorafuse._core
  with the same signatures and docstrings, the same refusals with the same messages for bad arguments
  (they are refused before any GPU work, by the same code), and a plain answer about the device.

Skipped, with the reason, where nvcc, CMake or the NVIDIA wheels are missing.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
ARCH = "90"  # one architecture (H100 / H200): the build proves the code compiles; ~2 minutes on 2 cores


def _nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _nvidia_include() -> str | None:
    """The include folder of NVIDIA's cuBLAS wheel importable here (nvidia/cu13/include), if any."""
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.isfile(os.path.join(inc, "cublas_v2.h")) and os.path.isfile(os.path.join(inc, "cusolverDn.h")):
                return inc
    return None


def _eigen_prefix() -> str | None:
    """The prefix under which cmeel-eigen keeps Eigen's CMake config (the build's own lookup)."""
    for base in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path]):
        if base and os.path.isdir(os.path.join(base, "cmeel.prefix", "share", "eigen3", "cmake")):
            return base
    return None


def _project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"])


def _missing() -> str:
    if _nvcc() is None:
        return "no CUDA compiler (nvcc): the CUDA module cannot be built here"
    if shutil.which("cmake") is None:
        return "no cmake"
    if _nvidia_include() is None:
        return 'no cuBLAS / cuSOLVER wheels (nvidia-cublas, nvidia-cusolver: pip install ".[test]")'
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "no pybind11"
    if _eigen_prefix() is None:
        return "no cmeel-eigen"
    return ""


WHY = _missing()
pytestmark = pytest.mark.skipif(bool(WHY), reason=WHY)


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installed module: <prefix>/lorafuse/_cuda*.so."""
    import pybind11

    tmp = tmp_path_factory.mktemp("cuda_build")
    build, prefix = tmp / "build", tmp / "inst"
    nvcc = _nvcc()
    assert nvcc is not None
    env = {**os.environ, "CUDACXX": nvcc}
    env.pop("CUDAARCHS", None)
    version = _project_version()
    cmd = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLORAFUSE_CUDA=ON",
           f"-DCMAKE_CUDA_ARCHITECTURES={ARCH}", f"-DCMAKE_CUDA_COMPILER={nvcc}",
           f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
           f"-DCMAKE_PREFIX_PATH={_eigen_prefix()}", f"-DSKBUILD_PROJECT_VERSION={version}"]
    if shutil.which("ninja"):
        cmd += ["-G", "Ninja"]
    configured = _run(cmd, 300, env)
    assert "lorafuse: building lorafuse._cuda" in configured
    _run(["cmake", "--build", str(build), "--target", "_cuda", "-j", str(os.cpu_count() or 2)], 1200, env)
    _run(["cmake", "--install", str(build), "--prefix", str(prefix), "--component", "cuda"], 120, env)
    found = sorted((prefix / "lorafuse").glob("_cuda*.so"))
    assert len(found) == 1, found
    return found[0]


def _dynamic(path: Path) -> tuple[list[str], list[str]]:
    """(NEEDED, RUNPATH entries) of an ELF shared object, read with readelf."""
    if shutil.which("readelf") is None:
        pytest.skip("no readelf")
    out = _run(["readelf", "-d", str(path)], 60)
    needed = [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    runpath = [p for line in out.splitlines() if "(RUNPATH)" in line or "(RPATH)" in line
               for p in line.split("[", 1)[1].rstrip("]").split(":")]
    return needed, runpath


def test_links_the_pip_libraries_and_the_static_runtime(built):
    needed, runpath = _dynamic(built)
    assert any(n.startswith("libcublas.so.") for n in needed), needed
    assert any(n.startswith("libcusolver.so.") for n in needed), needed
    assert not any(n.startswith(("libcudart", "libcuda.so")) for n in needed), needed  # only the driver, dlopened
    assert all(p.startswith("$ORIGIN/") for p in runpath), runpath  # nothing of the build machine
    assert any(p.startswith("$ORIGIN/../nvidia/cu") and p.endswith("/lib") for p in runpath), runpath


_CHILD = r"""
import ctypes, glob, importlib.util, json, os, sys
import numpy as np

import nvidia
for lib in ("nvJitLink", "cublasLt", "cublas", "cusparse", "cusolver"):  # what the RUNPATH reaches when installed
    for root in nvidia.__path__:
        found = sorted(glob.glob(os.path.join(root, "*", "lib", f"lib{lib}.so*")))
        if found:
            ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
            break
spec = importlib.util.spec_from_file_location("_cuda", sys.argv[1])
cuda = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda)
from lorafuse import _core

f32, f64 = np.float32, np.float64
z = lambda *s, dt=f32: np.zeros(s, dt)
bad = {
    "threads": lambda m: m.to_float32(z(3, dt=np.uint16), "BF16", -1),
    "to_float32 item size": lambda m: m.to_float32(z(3, dt=np.uint8), "BF16"),
    "to_float32 dtype name": lambda m: m.to_float32(z(3, dt=np.uint8), "F4"),
    "from_float32 dtype": lambda m: m.from_float32(z(3), "F64"),
    "from_float32 layout": lambda m: m.from_float32(z(3, 4)[:, ::2], "BF16"),
    "from_float32 float64": lambda m: m.from_float32(z(3, dt=f64), "BF16"),
    "merge shapes": lambda m: m.merge_batch([("w", z(4, 5), "F32", z(4, 6), "F32", [])]),
    "merge stage": lambda m: m.merge_batch([("w", z(4, 5), "F32", z(4, 5), "F32", [(z(4, 2), z(3, 5), None, False)])]),
    "merge kind": lambda m: m.merge_batch([("w", z(4, 5), "F32", z(4, 5), "F32", [("tucker", (), None, False)])]),
    "factored dtype": lambda m: m.factored_svd([("m", z(4, 3, dt=f64), z(3, 5))], [2]),
    "factored shapes": lambda m: m.factored_svd([("m", z(4, 3), z(2, 5))], [2]),
    "factored ranks": lambda m: m.factored_svd([("m", z(4, 3), z(3, 5))], [2, 2]),
    "factored rank 0": lambda m: m.factored_svd([("m", z(4, 3), z(3, 5))], [0]),
    "factored mode": lambda m: m.factored_svd([("m", z(4, 3), z(3, 5))], [2], mode="fast"),
    "factored split": lambda m: m.factored_svd([("m", z(4, 3), z(3, 5))], [2], "C"),
    "factored seed": lambda m: m.factored_svd([("m", z(4, 3), z(3, 5))], [2], seed=-1),
    "lists release": lambda m: m.factored_svd_lists([("m", [(z(4, 3), z(3, 5))], [1.0])], [2], release=[[1]]),
    "lists weights": lambda m: m.factored_svd_lists([("m", [(z(4, 3), z(3, 5))], ["x"])], [2]),
    "lists shapes": lambda m: m.factored_svd_lists([("m", [(z(4, 3), z(3, 5)), (z(4, 2), z(2, 6))], [1, 1])], [2]),
    "dense 1-D": lambda m: m.dense_svd([("d", z(4))], [1]),
    "dense oversample": lambda m: m.dense_svd([("d", z(4, 4))], [1], oversample=-3),
    "extract shapes": lambda m: m.extract_svd([("e", z(4, 5), "F32", z(5, 4), "F32")], [2]),
    "extract item size": lambda m: m.extract_svd([("e", z(4, 5), "BF16", z(4, 5), "F32")], [2]),
    "extract power_iters": lambda m: m.extract_svd([("e", z(4, 5), "F32", z(4, 5), "F32")], [2], power_iters=1000),
    "frobenius shapes": lambda m: m.factored_frobenius_sq([(z(4, 3), z(2, 5))]),
    "frobenius dtype": lambda m: m.factored_frobenius_sq([(z(4, 3, dt=f64), z(3, 5))]),
    "inner shapes": lambda m: m.factored_inner([(z(4, 3), z(3, 5), z(4, 2), z(2, 6))]),
}

def outcome(fn, m):
    try:
        fn(m)
    except Exception as e:
        return [type(e).__name__, str(e)]
    return ["returned", ""]

shared = ["to_float32", "from_float32", "merge_batch", "factored_frobenius_sq", "factored_inner", "factored_svd",
          "factored_svd_lists", "factored_svd_is_exact", "dense_svd", "dense_svd_is_exact", "extract_svd"]
exact = [(m.factored_svd_is_exact(o, i, r, k, mode), m.dense_svd_is_exact(o, i, k))
         for m in (cuda, _core) for o, i, r, k, mode in [(4096, 4096, 64, 16, "auto"), (300, 200, 150, 140, "auto"),
                                                          (4096, 11008, 2048, 8, "exact")]]
count = cuda.device_count()
out = {
    "missing": [n for n in shared + ["MAX_THREADS", "MAX_RANK", "MAX_OVERSAMPLE", "MAX_POWER_ITERS", "device_count",
                                     "unavailable_reason", "device_description", "cuda_runtime_version"]
                if not hasattr(cuda, n)],
    "task_merge": hasattr(cuda, "task_merge"),
    "docs": {n: [getattr(cuda, n).__doc__, getattr(_core, n).__doc__] for n in shared},
    "limits": [[getattr(m, n) for n in ("MAX_THREADS", "MAX_RANK", "MAX_OVERSAMPLE", "MAX_POWER_ITERS")]
               for m in (cuda, _core)],
    "exact": exact,
    "bad": {k: [outcome(fn, cuda), outcome(fn, _core)] for k, fn in bad.items()},
    "version": [cuda.__version__, _core.__version__],
    "runtime": cuda.cuda_runtime_version,
    "count": count,
    "why": cuda.unavailable_reason(),
    "describe": outcome(lambda m: m.device_description(0), cuda) if count == 0 else [cuda.device_description(0)],
    "work": outcome(lambda m: m.to_float32(z(3, dt=np.uint16), "BF16"), cuda) if count == 0 else [],
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(built) -> dict:
    p = subprocess.run([sys.executable, "-c", _CHILD, str(built)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_the_functions_of_the_cpu_core(probe):
    assert probe["missing"] == []
    assert probe["task_merge"] is False  # the Python backend runs task_merge on the CPU core
    for name, (cuda_doc, core_doc) in probe["docs"].items():
        assert cuda_doc == core_doc, name  # signature line and text
    assert probe["limits"][0] == probe["limits"][1]
    half = len(probe["exact"]) // 2
    assert probe["exact"][:half] == probe["exact"][half:]
    assert probe["version"][0] == _project_version()  # passed as scikit-build-core passes it


def _without_location(outcome: list[str]) -> list[str]:
    """The error's class and message without the " (check `...` failed at <file>:<line>)" that names the
    source line of the check (the same line where the check is the CPU core's code)."""
    return [outcome[0], re.sub(r" \(check `.*` failed at [^)]*\)$", "", outcome[1])]


def test_bad_arguments_are_refused_alike(probe):
    for case, (cuda_outcome, core_outcome) in probe["bad"].items():
        assert core_outcome[0] != "returned", case
        assert _without_location(cuda_outcome) == _without_location(core_outcome), case


def test_the_device_answer(probe):
    nvcc = _nvcc()
    assert nvcc is not None
    version = _run([nvcc, "--version"], 60)
    assert f"release {probe['runtime']}," in version  # the runtime linked in is the compiler's
    if probe["count"] == 0:  # CI: no GPU
        assert probe["why"]
        assert probe["describe"][0] == "DeviceError"
        assert probe["work"][0] == "DeviceError" and "--device cpu" in probe["work"][1]
    else:
        assert probe["why"] == ""
        assert "sm_" in probe["describe"][0]
