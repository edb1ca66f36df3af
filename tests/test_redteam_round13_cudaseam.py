"""Red-team round 13, the backend seam as a user without a GPU meets it: --device cuda / device="cuda",
LORAFUSE_BACKEND (cpu, reference, cuda), lorafuse.backends' get_backend / available_backends /
backend_for_device, and the 'reference' backend run end to end against the 'cpu' backend and numpy.

A GPU is never needed: `no_cuda` hides any lorafuse._cuda (this build has none), `fake_cuda` puts in its
place a module of the same functions that runs lorafuse._core's (the CUDA module's contract: the CPU core's
functions, signatures and refusals), so the wiring of --device cuda is checked on any machine."""

from __future__ import annotations

import collections
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import PREFIX, kohya_file, llm_base, peft_deltas, peft_folder, read_torch, run_cli
from safetensors.numpy import load_file, save_file

import lorafuse
from lorafuse import backends
from lorafuse.backends import FactorStage, LowRankStage, MergeJob, available_backends, backend_for_device, get_backend
from lorafuse.errors import DeviceError, LorafuseValueError

SHAPES = {"model.layers.0.self_attn.q_proj": (48, 32), "model.layers.0.self_attn.v_proj": (16, 32)}
CUDA_FUNCTIONS = ("to_float32", "from_float32", "merge_batch", "factored_frobenius_sq", "factored_inner",
                  "factored_svd", "factored_svd_lists", "dense_svd", "extract_svd", "task_merge", "convert_into",
                  "sketch_fold", "factored_svd_is_exact", "dense_svd_is_exact")


def _swap_cuda(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType | None) -> Iterator[None]:
    """lorafuse._cuda replaced by `module` (None: not built); the 'cuda' backend made anew from it at each request
    (not the one lorafuse.backends may hold), the other backends' instances left as they are."""
    from lorafuse.backends.cuda import CudaBackend

    made = backends._make
    with monkeypatch.context() as m:  # undone on leaving, alone (the test's own changes stay)
        m.setitem(sys.modules, "lorafuse._cuda", module)
        m.setattr(backends, "_make", lambda name: CudaBackend() if name == "cuda" else made(name))
        yield


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A build without the CUDA module, whatever this machine has."""
    yield from _swap_cuda(monkeypatch, None)


def _fake_module(reason: str = "") -> tuple[types.ModuleType, collections.Counter[str]]:
    """A stand-in for lorafuse._cuda: lorafuse._core's functions (counted), device 0 usable unless `reason`."""
    from lorafuse import _core

    calls: collections.Counter[str] = collections.Counter()
    fake = types.ModuleType("lorafuse._cuda")

    def counted(name: str) -> object:
        def call(*args: object, **kw: object) -> object:
            calls[name] += 1
            return getattr(_core, name)(*args, **kw)
        return call

    for name in CUDA_FUNCTIONS:
        setattr(fake, name, counted(name))
    fake.unavailable_reason = lambda: reason  # type: ignore[attr-defined]
    fake.device_description = lambda device=0: "Fake GPU (sm_90, 80 GiB)"  # type: ignore[attr-defined]
    return fake, calls


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[collections.Counter[str]]:
    fake, calls = _fake_module()
    for _ in _swap_cuda(monkeypatch, fake):
        yield calls


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """base/ (a Llama checkpoint of SHAPES), ft/ (its fine-tune), a/ and b/ (PEFT adapters, rank 4), k.safetensors
    (a kohya LoRA), r.yml (a recipe combining a and b); the current folder."""
    llm_base(tmp_path / "base", SHAPES)
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    rng = np.random.default_rng(5)
    (tmp_path / "ft").mkdir()
    save_file({k: v + (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()},
              str(tmp_path / "ft" / "model.safetensors"))
    (tmp_path / "ft" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    peft_folder(tmp_path / "a", SHAPES, 1, rank=4)
    peft_folder(tmp_path / "b", SHAPES, 2, rank=4)
    kohya_file(tmp_path / "k.safetensors", "lora_unet_mid_block_attentions_0_proj_out", 3, rank=2, width=8)
    (tmp_path / "r.yml").write_text("merge_method: svd\nmodels:\n  - model: a\n  - model: b\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- 1: LORAFUSE_BACKEND=cuda, no --device


@pytest.mark.parametrize("argv", [["info", "a"], ["similarity", "a", "b"]])
def test_a_command_without_device_under_lorafuse_backend_cuda_says_to_unset_it(tree: Path, no_cuda: None,
                                                                               monkeypatch: pytest.MonkeyPatch,
                                                                               argv: list[str]):
    """`LORAFUSE_BACKEND=cuda lorafuse info a` said '... or run with --device cpu', an option info and similarity do
    not have: the way out is the variable."""
    monkeypatch.setenv("LORAFUSE_BACKEND", "cuda")
    code, out, err = run_cli(argv)
    line = _one_line(err)
    assert code == 1 and out == ""
    assert "DeviceError" in line and "no CUDA backend" in line
    assert "LORAFUSE_BACKEND" in line and "unset LORAFUSE_BACKEND" in line
    assert "--device" not in line, line


@pytest.mark.parametrize("call", [lambda: lorafuse.similarity(["a", "b"]), lambda: lorafuse.describe("a")])
def test_python_without_device_under_lorafuse_backend_cuda_says_to_unset_it(tree: Path, no_cuda: None,
                                                                           monkeypatch: pytest.MonkeyPatch, call):
    monkeypatch.setenv("LORAFUSE_BACKEND", "Cuda ")
    with pytest.raises(DeviceError) as e:
        call()
    assert "unset LORAFUSE_BACKEND" in str(e.value) and "device='cpu'" not in str(e.value)


def test_device_cuda_under_lorafuse_backend_cuda_says_to_unset_it_too(tree: Path, no_cuda: None,
                                                                      monkeypatch: pytest.MonkeyPatch):
    """With LORAFUSE_BACKEND=cuda set, the advice '--device cpu' alone is refused in turn (exit 2): the message
    must say to unset the variable as well."""
    monkeypatch.setenv("LORAFUSE_BACKEND", "cuda")
    code, _, err = run_cli(["combine", "a", "b", "-o", "c", "--device", "cuda"])
    line = _one_line(err)
    assert code == 1 and "DeviceError" in line and "unset LORAFUSE_BACKEND" in line
    assert not (tree / "c").exists()
    code2, _, err2 = run_cli(["combine", "a", "b", "-o", "c", "--device", "cpu"])  # the old advice alone
    assert code2 == 2 and "LORAFUSE_BACKEND=cuda" in err2


# ------------------------------------------------------------------- 2: device='cpu' under LORAFUSE_BACKEND=cuda

PYTHON_CALLS = {
    "apply": lambda out: lorafuse.apply("base", ["a"], out=out),
    "apply_device_cpu": lambda out: lorafuse.apply("base", ["a"], out=out, device="cpu"),
    "combine": lambda out: lorafuse.combine(["a", "b"], rank=3).save(out),
    "combine_bf16": lambda out: lorafuse.combine(["a", "b"], rank=3, dtype="bf16", device="cpu").save(out),
    "combine_stream": lambda out: lorafuse.combine(["a", "b"], rank=3, engine="stream").save(out),
    "resize": lambda out: lorafuse.resize("a", 2, out=out),
    "extract": lambda out: lorafuse.extract("base", "ft", out, rank=2),
    "run": lambda out: lorafuse.run("r.yml", out),
}


@pytest.mark.parametrize("verb", sorted(PYTHON_CALLS))
def test_python_on_the_cpu_under_lorafuse_backend_cuda_is_refused_as_the_cli_refuses_it(
        tree: Path, monkeypatch: pytest.MonkeyPatch, verb: str):
    """`LORAFUSE_BACKEND=cuda lorafuse apply ...` is refused (exit 2, round 12), but lorafuse.apply(...) ran on the
    CPU without a word, and combine(dtype='bf16', device='cpu') / combine(engine='stream') / the same in a recipe
    stopped with a DeviceError telling the user to pass device='cpu', which they had. One rule now, said once."""
    monkeypatch.setenv("LORAFUSE_BACKEND", "cuda")
    with pytest.raises(LorafuseValueError) as e:
        PYTHON_CALLS[verb](tree / "out")
    said = str(e.value)
    assert "LORAFUSE_BACKEND=cuda" in said and "device='cuda'" in said and "unset LORAFUSE_BACKEND" in said, said
    assert not (tree / "out").exists()
    with pytest.raises(LorafuseValueError, match="LORAFUSE_BACKEND=cuda"):
        backend_for_device("cpu")
    monkeypatch.setenv("LORAFUSE_BACKEND", "cpu")  # the way out the message names
    PYTHON_CALLS[verb](tree / "out")
    assert (tree / "out").exists()


# ----------------------------------------------------------------------------- 3: what the seam says

def test_unavailable_is_the_message_get_backend_raises(monkeypatch: pytest.MonkeyPatch):
    """cuda.unavailable() returned the module's bare reason ('no CUDA-capable device is detected') where the module
    is built but no GPU is usable, while get_backend('cuda') raised more (what to do): they are one message."""
    from lorafuse.backends import cuda

    fake, _ = _fake_module("no CUDA-capable device is detected")
    for _ in _swap_cuda(monkeypatch, fake):
        with pytest.raises(DeviceError) as e:
            get_backend("cuda")
        assert str(e.value) == cuda.unavailable()
        assert "no CUDA-capable device" in str(e.value) and "--device cpu" in str(e.value)
        assert available_backends() == ["cpu", "reference"]


def test_a_build_without_the_cuda_module_loads_no_nvidia_library(no_cuda: None, monkeypatch: pytest.MonkeyPatch):
    """get_backend('cuda') / --device cuda / available_backends() on a build without lorafuse._cuda loaded NVIDIA's
    cuBLAS, cuBLASLt, cuSPARSE, cuSOLVER and nvJitLink into the process (RTLD_GLOBAL; 0.5 s and ~216 MiB here,
    wherever the nvidia pip packages are installed, as torch brings them) only to say the module is not built."""
    from lorafuse.backends import cuda

    loaded: list[str] = []
    monkeypatch.setattr(cuda, "_preload_nvidia", lambda: loaded.append("nvidia"))
    with pytest.raises(DeviceError, match="this build of lorafuse has no CUDA backend"):
        get_backend("cuda")
    assert "cuda" not in available_backends()
    assert loaded == []


@pytest.mark.parametrize("device", ["cuda:1", "CUDA:3"])
def test_a_second_gpu_says_how_to_pick_it(tree: Path, device: str):
    """device='cuda:1' was 'unknown device: choose cpu or cuda': lorafuse runs on the first GPU CUDA sees, and
    CUDA_VISIBLE_DEVICES picks which one that is."""
    n = device.split(":")[1]
    with pytest.raises(LorafuseValueError) as e:
        lorafuse.resize("a", 2, device=device)
    assert f"CUDA_VISIBLE_DEVICES={n}" in str(e.value) and repr(device) in str(e.value)
    assert backends.check_device("cuda:0") == "cuda"


@pytest.mark.parametrize("value", ["GPU", " Cuda0 "])
def test_an_unknown_lorafuse_backend_is_quoted_as_set(tree: Path, monkeypatch: pytest.MonkeyPatch, value: str):
    """LORAFUSE_BACKEND=GPU was refused as 'gpu', a value the user never set (get_backend('Bogus') the same)."""
    monkeypatch.setenv("LORAFUSE_BACKEND", value)
    code, out, err = run_cli(["info", "a"])
    assert code == 2 and out == ""
    assert _one_line(err) == (f"lorafuse: error: LORAFUSE_BACKEND: unknown backend {value.strip()!r}: choose one of "
                              "auto, cpu, reference, cuda (or leave it unset)")
    monkeypatch.delenv("LORAFUSE_BACKEND")
    with pytest.raises(LorafuseValueError, match="unknown backend 'Bogus'"):
        get_backend("Bogus")


# ------------------------------------------------------------------- 4: --device cuda's wiring (no GPU needed)

CLI_RUNS = [["apply", "base", "a", "b", "--weights", "0.7,0.3", "-o", "{o}"],
            ["apply", "base", "a", "-o", "{o}", "--dtype", "bf16"],
            ["combine", "a", "b", "--rank", "3", "-o", "{o}"],
            ["combine", "a", "b", "--method", "ties_svd", "--density", "0.5", "-o", "{o}"],
            ["resize", "a", "--rank", "2", "-o", "{o}"],
            ["extract", "base", "ft", "--rank", "3", "-o", "{o}"]]


def _tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a file or a folder's files, as float32 (bf16 exactly), the dtype in the key."""
    return {f"{k}:{t.dtype}": t.float().numpy() for k, t in read_torch(path).items()}


@pytest.mark.parametrize("argv", CLI_RUNS, ids=lambda a: "-".join(a[:1] + a[-2:]))
def test_device_cuda_runs_the_math_through_the_cuda_module(tree: Path, fake_cuda: collections.Counter[str],
                                                           argv: list[str]):
    """--device cuda reaches lorafuse._cuda for the verb's math (no silent CPU path) and writes what --device cpu
    writes, when the module computes what the CPU core computes (the CUDA module's contract)."""
    outs = {}
    for device in ("cpu", "cuda"):
        fake_cuda.clear()
        code, _, err = run_cli([a.format(o=f"out_{device}") for a in argv] + ["--device", device, "-q"])
        assert code == 0, err
        assert (sum(fake_cuda.values()) > 0) == (device == "cuda"), dict(fake_cuda)
        outs[device] = _tensors(tree / f"out_{device}")
    assert outs["cpu"].keys() == outs["cuda"].keys()
    for k, v in outs["cpu"].items():
        np.testing.assert_array_equal(outs["cuda"][k], v, err_msg=k)


# ----------------------------------------------------------------------------- 5: LORAFUSE_BACKEND=reference end to end

def _lora_deltas(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """B A in float64 per module of a PEFT file's tensors (the scale 1 lorafuse writes)."""
    return {k.removesuffix(".lora_A.weight:torch.float32"):
            t[k.replace("lora_A", "lora_B")].astype(np.float64) @ t[k].astype(np.float64)
            for k in t if k.endswith(".lora_A.weight:torch.float32")}


def test_reference_backend_runs_every_verb_and_agrees_with_cpu_and_numpy(tree: Path, monkeypatch: pytest.MonkeyPatch):
    """LORAFUSE_BACKEND=reference (the float64 oracle) on apply, combine (memory and stream engines), resize,
    extract, convert and similarity: the same outputs as the cpu backend, and apply / combine cat as numpy float64
    computes them from the files."""
    runs = {"apply": ["apply", "base", "a", "b", "--weights", "0.7,0.3", "-o", "{o}"],
            "cat": ["combine", "a", "b", "--method", "cat", "--weights", "0.6,0.4", "-o", "{o}"],
            "memory": ["combine", "a", "b", "--rank", "3", "--engine", "memory", "-o", "{o}"],
            "stream": ["combine", "a", "b", "--rank", "3", "--engine", "stream", "-o", "{o}"],
            "resize": ["resize", "a", "--rank", "2", "-o", "{o}"],
            "extract": ["extract", "base", "ft", "--rank", "3", "-o", "{o}"],
            "convert": ["convert", "k.safetensors", "--to", "peft", "--family", "sd1", "-o", "{o}.safetensors"]}
    got: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    sims = {}
    for be in ("cpu", "reference"):
        monkeypatch.setenv("LORAFUSE_BACKEND", be)
        got[be] = {}
        for name, argv in runs.items():
            out = f"{be}_{name}"
            code, _, err = run_cli([a.format(o=out) for a in argv] + ["-q"])
            assert code == 0, (be, name, err)
            got[be][name] = _tensors(tree / (out + ".safetensors" if name == "convert" else out))
        code, text, err = run_cli(["similarity", "a", "b", "--json"])
        assert code == 0, err
        sims[be] = np.asarray(json.loads(text)["cosine"])
    for name in runs:
        cpu, ref = got["cpu"][name], got["reference"][name]
        assert cpu.keys() == ref.keys(), name
        if name in ("apply", "convert"):
            for k in cpu:
                np.testing.assert_allclose(ref[k], cpu[k], rtol=2e-6, atol=1e-6, err_msg=f"{name} {k}")
            continue
        dc, dr = _lora_deltas(cpu), _lora_deltas(ref)
        for k in dc:
            scale = np.abs(dr[k]).max()
            assert np.abs(dc[k] - dr[k]).max() <= 1e-5 * scale, (name, k)
    # independent references: the merge and the exact concatenation, from the files in float64
    base = load_file("base/model.safetensors")
    da, db = peft_deltas(tree / "a"), peft_deltas(tree / "b")
    for m in SHAPES:
        want = base[f"{m}.weight"].astype(np.float64) + 0.7 * da[m] + 0.3 * db[m]
        np.testing.assert_allclose(got["reference"]["apply"][f"{m}.weight:torch.float32"], want, rtol=1e-6, atol=1e-5)
        cat = _lora_deltas(got["reference"]["cat"])[PREFIX + m]
        np.testing.assert_allclose(cat, 0.6 * da[m] + 0.4 * db[m], rtol=1e-5, atol=1e-5)
    fa, fb = (np.concatenate([d[m].ravel() for m in SHAPES]) for d in (da, db))
    cos = fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb)
    for be in ("cpu", "reference"):
        np.testing.assert_allclose(sims[be], [[1, cos], [cos, 1]], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 6: a merge job's output buffer

def _overlapping_job(kind: str, rng: np.random.Generator) -> MergeJob:
    """A merge job whose output (rows 0..7 of a buffer) shares memory with its stage's first factor (the same
    buffer's elements 16..31): the merge would overwrite B while it still reads it."""
    w = rng.standard_normal((8, 4)).astype(np.float32)
    buf = np.zeros(64, np.float32)
    buf[16:32] = rng.standard_normal(16).astype(np.float32)
    b, out = buf[16:32].reshape(8, 2), buf[:32].reshape(8, 4)
    a = rng.standard_normal((2, 4)).astype(np.float32)
    stage = LowRankStage(b, a) if kind == "LowRankStage" else FactorStage("lowrank", (b, a))
    return MergeJob("m", w, "F32", out, "F32", [stage])


@pytest.mark.parametrize("backend", ["cpu", "reference", "cuda"])
@pytest.mark.parametrize("kind", ["LowRankStage", "FactorStage"])
def test_a_merge_output_overlapping_an_input_is_refused_by_every_backend(monkeypatch: pytest.MonkeyPatch,
                                                                        backend: str, kind: str):
    """The 'cpu' backend refused an output sharing memory with a LowRankStage's B but not with a FactorStage's
    (its factors are a tuple: unchecked), and wrote a wrong merge (off by ~7 here); the 'cuda' backend, which
    writes each piece back while it reads the next, and the 'reference' backend checked nothing. One refusal,
    the cpu backend's, everywhere."""
    fake, _ = _fake_module()
    for _ in _swap_cuda(monkeypatch, fake):
        job = _overlapping_job(kind, np.random.default_rng(0))
        with pytest.raises(LorafuseValueError, match="merge job 'm': out overlaps stage 1's"):
            get_backend(backend).merge_batch([job])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_merge_job_given_as_a_plain_tuple_runs_as_the_core_takes_it(backend: str):
    """The core takes a merge job as any 6-tuple; the overlap check read job.out and crashed (AttributeError) on
    one that is not a MergeJob."""
    rng = np.random.default_rng(1)
    w, b, a = (rng.standard_normal(s).astype(np.float32) for s in ((6, 5), (6, 2), (2, 5)))
    out = np.zeros_like(w)
    flags = get_backend(backend).merge_batch([("m", w, "F32", out, "F32", [(b, a, None, False)])])  # type: ignore[list-item]
    assert flags == [False]
    np.testing.assert_allclose(out, w + b.astype(np.float64) @ a, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 7: a GPU that fails mid-run

@pytest.mark.parametrize(("function", "argv"), [
    ("merge_batch", ["apply", "base", "a", "-o", "out"]),
    ("factored_svd_lists", ["combine", "a", "b", "-o", "out"]),
    ("dense_svd", ["extract", "base", "ft", "--rank", "2", "-o", "out"]),
    ("factored_svd", ["resize", "a", "--rank", "2", "-o", "out"])])
def test_a_device_error_mid_run_keeps_the_previous_output(tree: Path, monkeypatch: pytest.MonkeyPatch,
                                                          function: str, argv: list[str]):
    """The GPU running out of memory in the middle of --device cuda --overwrite: one line, exit 1, and the
    output written before (by --device cpu) is there as it was, with nothing beside it."""
    code, _, err = run_cli([*argv, "-q"])
    assert code == 0, err
    before = {p.relative_to(tree): p.read_bytes() for p in (tree / "out").rglob("*") if p.is_file()}
    fake, _ = _fake_module()

    def out_of_memory(*args: object, **kw: object) -> object:
        raise DeviceError("m: CUDA out of memory: 12.0 GiB needed, 3.1 GiB free")

    setattr(fake, function, out_of_memory)
    for _ in _swap_cuda(monkeypatch, fake):
        code, out, err = run_cli([*argv, "--device", "cuda", "--overwrite", "-q"])
    assert code == 1 and out == ""
    assert _one_line(err).endswith("DeviceError: m: CUDA out of memory: 12.0 GiB needed, 3.1 GiB free")
    after = {p.relative_to(tree): p.read_bytes() for p in (tree / "out").rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tree.iterdir()) == ["a", "b", "base", "ft", "k.safetensors", "out", "r.yml"]
