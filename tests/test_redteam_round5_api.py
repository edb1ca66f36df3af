"""Red-team round 5, lorafuse as a Python library (the API's findings, fixed).

1. First calls from several threads at once work: the lazy imports (lorafuse.__getattr__, the format registry)
   run one thread at a time, and the registry never reads a lorafuse.formats another thread is still running.
2. Adapter.from_state_dict copies numpy arrays (as it did torch tensors): the adapter, and what is derived from it,
   never follow later writes to the caller's arrays; with_factors copies too.
3. A loaded kohya / diffusers adapter's config states r, lora_alpha and the patterns, so
   `from_state_dict(x.state_dict(), x.config)` is x; the r refusal names the config it read.
4. GGUF output of an adapter in a non-UTF-8 folder, or to a non-UTF-8 name, records the name with \\xNN; `info
   --json` shows such paths the same way.
5. Results' configs (and from_state_dict's) are deep copies: editing one changes no other adapter's config.
6. The arrays an adapter holds are read-only, in memory as in a mapped file (stored_factors, factors, pickled too).
7. from_state_dict refuses every non-float value with LorafuseValueError naming the key; big-endian floats are read.
8. A shape conflict in arithmetic, combine and similarity names both adapters, by position and path.
9. typing.get_type_hints(lorafuse.ExtractResult.__init__) resolves.
10. A loaded adapter holds no file descriptor from Python 3.13 on (mmap trackfd=False; the change detection goes by
    path); before, reaching the open-file limit says what to do.

Independent references: deltas in numpy float64 from the factors written here, GGUF files read back with the `gguf`
package, a fresh interpreter per thread race.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import pickle
import shutil
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from redteam_fixtures import peft_deltas, peft_folder
from safetensors.numpy import save_file

import lorafuse
from lorafuse import Adapter, LorafuseValueError, ShapeMismatchError

PREFIX = "base_model.model."
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
LLM = {Q: (12, 10), V: (12, 10)}
KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def deltas(adapter: Adapter) -> dict[str, np.ndarray]:
    return {n: adapter[n].delta() for n in adapter}


@pytest.fixture()
def two(tmp_path: Path) -> tuple[Path, Path]:
    return (peft_folder(tmp_path / "a", LLM, 1, rank=4, alpha=8),
            peft_folder(tmp_path / "b", LLM, 2, rank=2, alpha=2))


# ----------------------------------------------------------------------------- 1. first calls from threads

_RACE = r'''
import json, sys, threading, warnings
import numpy as np
warnings.simplefilter("ignore")
import lorafuse
scenario, a_dir, b_dir = sys.argv[1], sys.argv[2], sys.argv[3]
A = (np.arange(6, dtype=np.float32).reshape(2, 3) / 7).astype(np.float32)
B = (np.arange(8, dtype=np.float32).reshape(4, 2) / 5).astype(np.float32)
want = 3.0 / 2 * (B.astype(np.float64) @ A.astype(np.float64))
sd = {"base_model.model.x.lora_A.weight": A, "base_model.model.x.lora_B.weight": B}

def from_state_dict():
    got = lorafuse.Adapter.from_state_dict(sd, {"r": 2, "lora_alpha": 3})["x"].delta()
    assert np.array_equal(got, want), got

def load():
    assert len(lorafuse.load(a_dir)) == 2

calls = {
    "state_dict": [from_state_dict] * 4,
    "load_and_name": [load, lambda: lorafuse.LoraUpdate],
    "everything": [(lambda n=n: getattr(lorafuse, n)) for n in
                   ["Adapter", "LoraUpdate", "AdapterReport", "ExtractResult", "Report", "ResizeResult", "apply",
                    "combine", "convert", "describe", "detect_format", "extract", "load", "resize", "similarity",
                    "ApplyReport", "METHODS", "run", "__version__", "backends", "formats", "io", "model", "ops",
                    "recipes"]]
                  + [lambda: lorafuse.similarity([a_dir, b_dir]), lambda: lorafuse.combine([a_dir, b_dir], rank=2),
                     from_state_dict, load],
}[scenario]
barrier = threading.Barrier(len(calls))
out = [None] * len(calls)

def job(i, f):
    barrier.wait()
    try:
        f()
        out[i] = "ok"
    except Exception as e:
        out[i] = f"{type(e).__name__}: {e}"

threads = [threading.Thread(target=job, args=(i, f)) for i, f in enumerate(calls)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(out))
'''


@pytest.mark.parametrize("scenario", ["state_dict", "load_and_name", "everything"])
def test_first_calls_from_several_threads_at_once(two: tuple[Path, Path], scenario: str) -> None:
    """Each race in a fresh interpreter (the first calls are the ones that raced), five times: before, every run
    failed ("unknown adapter format 'peft' (lorafuse writes none)", "cannot import name ... partially initialized
    module")."""
    for run in range(5):
        res = subprocess.run([sys.executable, "-c", _RACE, scenario, str(two[0]), str(two[1])], capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        outcomes = json.loads(res.stdout.strip().splitlines()[-1])
        assert outcomes and all(o == "ok" for o in outcomes), (scenario, run, outcomes)


def test_the_import_lock_is_reentrant() -> None:
    """A lazy import under the lock may itself import lazily in the same thread (the registry filled while
    lorafuse.ops.api is imported): the lock is reentrant, the call returns instead of waiting on itself."""
    from lorafuse import _lazy
    from lorafuse.model import registry

    assert _lazy.LOCK.acquire(timeout=5)
    try:
        assert registry.get_format("peft").name == "peft"
        assert lorafuse.__getattr__("load") is lorafuse.ops.api.load
    finally:
        _lazy.LOCK.release()


# ----------------------------------------------------------------------------- 2. from_state_dict copies


def test_from_state_dict_copies_numpy_arrays() -> None:
    g = torch.Generator().manual_seed(0)
    a_p, b_p = torch.nn.Parameter(torch.randn(4, 10, generator=g)), torch.nn.Parameter(torch.randn(12, 4, generator=g))
    sd = {f"{PREFIX}{Q}.lora_A.weight": a_p.detach().numpy(), f"{PREFIX}{Q}.lora_B.weight": b_p.detach().numpy()}
    want = 0.5 * (b_p.detach().double().numpy() @ a_p.detach().double().numpy())  # lora_alpha 2 / r 4
    snap = Adapter.from_state_dict(sd, {"r": 4, "lora_alpha": 2})
    half, neg = 0.5 * snap, -snap
    with torch.no_grad():
        a_p.mul_(0)  # training goes on: the numpy arrays given share the parameters' memory
    sd[f"{PREFIX}{Q}.lora_B.weight"] *= 3
    np.testing.assert_allclose(snap[Q].delta(), want, rtol=1e-12)
    np.testing.assert_allclose(half[Q].delta(), 0.5 * want, rtol=1e-12)
    np.testing.assert_allclose(neg[Q].delta(), -want, rtol=1e-12)
    # the caller's arrays are theirs still: writable, and not made read-only by the adapter
    assert all(v.flags.writeable for v in sd.values())


def test_with_factors_copies_its_arrays(two: tuple[Path, Path]) -> None:
    u = lorafuse.load(two[0])[Q]
    rng = np.random.default_rng(3)
    b, a = rng.standard_normal((12, 3)).astype(np.float32), rng.standard_normal((3, 10)).astype(np.float32)
    w = u.with_factors(b, a, 2.0)
    want = 2.0 * (b.astype(np.float64) @ a.astype(np.float64))
    b[:] = 0
    a *= 5
    np.testing.assert_allclose(w.delta(), want, rtol=1e-12)


# ----------------------------------------------------------------------------- 3. kohya / diffusers configs


def _kohya(path: Path, rank: int = 4, alpha: float = 2.0) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(7)
    down, up = rng.standard_normal((rank, 8)).astype(np.float32), rng.standard_normal((8, rank)).astype(np.float32)
    save_file({f"{KOHYA}.lora_down.weight": down, f"{KOHYA}.lora_up.weight": up,
               f"{KOHYA}.alpha": np.array(alpha, np.float32)}, str(path))
    return path, alpha / rank * (up.astype(np.float64) @ down.astype(np.float64))


def test_a_loaded_kohya_adapter_states_its_ranks_and_scales(tmp_path: Path) -> None:
    path, want = _kohya(tmp_path / "k.safetensors")
    k = lorafuse.load(path)
    assert k.config == {"r": 4, "lora_alpha": 2, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False,
                        "use_dora": False}
    back = Adapter.from_state_dict(k.state_dict(), k.config)  # docs/api.md: this is k
    np.testing.assert_allclose(back[KOHYA].delta(), want, rtol=1e-6)
    np.testing.assert_allclose(k[KOHYA].delta(), want, rtol=1e-6)
    assert back[KOHYA].scale == k[KOHYA].scale == 0.5


def test_a_loaded_diffusers_adapter_states_its_ranks_and_scales(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    m1, m2 = "unet.down_blocks.0.attentions.0.proj_in", "unet.mid_block.attentions.0.proj_out"
    t = {f"{m1}.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
         f"{m1}.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
         f"{m2}.lora_A.weight": rng.standard_normal((4, 6)).astype(np.float32),
         f"{m2}.lora_B.weight": rng.standard_normal((8, 4)).astype(np.float32)}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    # diffusers' lora_adapter_metadata: r 2, alpha 6 for the UNet, module m2 of rank 4 by rank_pattern
    meta = {"unet.r": 2, "unet.lora_alpha": 6, "unet.rank_pattern": {"proj_out": 4}}
    save_file(t, str(path), {"lora_adapter_metadata": json.dumps(meta)})
    d = lorafuse.load(path)
    assert d.format == "diffusers"
    want = {m: 6 / r * (t[f"{m}.lora_B.weight"].astype(np.float64) @ t[f"{m}.lora_A.weight"].astype(np.float64))
            for m, r in ((m1, 2), (m2, 4))}
    assert d.config["r"] in (2, 4) and d.config["rank_pattern"] and d.config["use_rslora"] is False
    back = Adapter.from_state_dict(d.state_dict(), d.config)
    for m in (m1, m2):
        np.testing.assert_allclose(d[m].delta().reshape(want[m].shape), want[m], rtol=1e-6)
        np.testing.assert_allclose(back[m].delta().reshape(want[m].shape), want[m], rtol=1e-6)


def test_the_r_refusal_names_the_config_it_read(tmp_path: Path) -> None:
    sd = {f"{PREFIX}{Q}.lora_A.weight": np.ones((4, 10), np.float32),
          f"{PREFIX}{Q}.lora_B.weight": np.ones((12, 4), np.float32)}
    with pytest.raises(ShapeMismatchError, match=r"^<state dict>: module '.*q_proj': the config given "
                       r"\(<state dict config>\) gives no r \(PEFT's default: r=8\) but the tensors have rank 4$"):
        Adapter.from_state_dict(sd, {"lora_alpha": 2})
    with pytest.raises(ShapeMismatchError, match=r"the config given \(<state dict config>\) says r=2 but the "
                       r"tensors have rank 4$"):
        Adapter.from_state_dict(sd, {"r": 2, "lora_alpha": 2})
    folder = peft_folder(tmp_path / "p", {Q: (12, 10)}, 1, rank=2)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "r": 3}))
    with pytest.raises(ShapeMismatchError, match=r"adapter_model.safetensors: module '.*q_proj': "
                       r"adapter_config.json says r=3 but the tensors have rank 2$"):
        lorafuse.load(folder)


# ----------------------------------------------------------------------------- 4. GGUF and info, non-UTF-8 names


def test_gguf_of_a_non_utf8_folder_or_name(two: tuple[Path, Path], tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    odd = os.fsencode(tmp_path) + b"/odd\xff"
    shutil.copytree(os.fsencode(two[0]), odd)
    out1 = tmp_path / "x.gguf"
    lorafuse.convert(odd, out1, to="gguf", arch="qwen2")
    out2 = os.fsencode(tmp_path) + b"/y\xfe.gguf"
    lorafuse.convert(lorafuse.load(two[0]) * 1.0, out2, to="gguf", arch="qwen2")
    for out, name in ((out1, "\\xff"), (out2, "y\\xfe")):
        reader = gguf.GGUFReader(out)
        field = reader.fields["general.name"]
        text = bytes(field.parts[field.data[0]]).decode("utf-8")  # strict: it is UTF-8
        assert name in text, text
        # the factors went in as they are: lora_b @ lora_a (llama.cpp's scale alpha / r folded in) is the delta
        t = {x.name: np.array(x.data, dtype=np.float64) for x in reader.tensors}
        alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
        a, b = t["blk.0.attn_q.weight.lora_a"], t["blk.0.attn_q.weight.lora_b"]
        np.testing.assert_allclose(alpha / a.shape[0] * (b @ a), peft_deltas(two[0])[Q], rtol=1e-5, atol=1e-6)
    assert lorafuse.describe(out2)["path"] == os.fsdecode(tmp_path) + "/y\\xfe.gguf"


def test_info_json_shows_a_non_utf8_path_as_xNN(two: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from lorafuse.cli import main

    odd = os.fsencode(tmp_path) + b"/odd\xff"
    shutil.copytree(os.fsencode(two[0]), odd)
    assert lorafuse.describe(odd)["path"] == os.fsdecode(tmp_path) + "/odd\\xff"
    capsys.readouterr()
    assert main(["info", "--json", os.fsdecode(odd)]) == 0
    out = capsys.readouterr().out
    assert "\\udcff" not in out
    assert json.loads(out)["path"] == os.fsdecode(tmp_path) + "/odd\\xff"


# ----------------------------------------------------------------------------- 5. configs are copies


def test_results_configs_are_their_own(two: tuple[Path, Path], tmp_path: Path) -> None:
    a = lorafuse.load(two[0])
    want = copy.deepcopy(a.config)
    results = {"resize": lorafuse.resize(a, rank=2).adapter, "scaled": a * 1.0, "to_rank": a.to_rank(2),
               "cat": lorafuse.combine([a], method="cat"), "sum": a + a, "neg": -a}
    for what, r in results.items():
        r.config["target_modules"].append("o_proj")
        assert a.config == want, what
    (a * 1.0).save(tmp_path / "scaled")
    saved = json.loads((tmp_path / "scaled" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["q_proj", "v_proj"]


def test_from_state_dict_keeps_its_own_config() -> None:
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "layers_to_transform": [0]}
    sd = {f"{PREFIX}{Q}.lora_A.weight": np.ones((4, 10), np.float32),
          f"{PREFIX}{Q}.lora_B.weight": np.ones((12, 4), np.float32)}
    e = Adapter.from_state_dict(sd, cfg)
    cfg["target_modules"].append("k_proj")
    cfg["layers_to_transform"].append(1)
    assert e.config["target_modules"] == ["q_proj"] and e.config["layers_to_transform"] == [0]


# ----------------------------------------------------------------------------- 6. read-only arrays


def test_the_arrays_an_adapter_holds_are_read_only(two: tuple[Path, Path]) -> None:
    s = lorafuse.load(two[0]) + lorafuse.load(two[1])
    want = {m: peft_deltas(two[0])[m] + peft_deltas(two[1])[m] for m in LLM}
    sd = {f"{PREFIX}{Q}.lora_A.weight": np.ones((4, 10), np.float32),
          f"{PREFIX}{Q}.lora_B.weight": np.ones((12, 4), np.float32)}
    memory = Adapter.from_state_dict(sd, {"r": 4, "lora_alpha": 4})
    for adapter in (s, s.to_rank(2), memory, pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        before = deltas(adapter)
        for u in adapter.updates.values():
            for arr in (*u.stored_factors(), *u.factors()):
                assert not arr.flags.writeable
                with pytest.raises(ValueError, match="read-only"):
                    arr[...] = 0
        for n, d in deltas(adapter).items():
            np.testing.assert_array_equal(d, before[n])
    for m in LLM:
        np.testing.assert_allclose(s[m].delta(), want[m], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(pickle.loads(pickle.dumps(s))[m].delta(), want[m], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 7. from_state_dict's refusals


@pytest.mark.parametrize("value, shown", [
    (np.ones((2, 3), np.int32), "numpy int32"),
    (np.ones((2, 3), np.bool_), "numpy bool"),
    (np.ones((2, 3), np.complex64), "numpy complex64"),
    (np.ones((2, 3), np.longdouble), "numpy float128"),
    (torch.ones(2, 3, dtype=torch.complex64), "torch.complex64"),
    (torch.ones(2, 3, dtype=torch.int64), "torch.int64"),
    (torch.nn.Linear(3, 2), "torch.nn.modules.linear.Linear"),
    (torch.Size([2, 3]), "torch.Size"),
])
def test_from_state_dict_refuses_with_lorafuse_value_error(value: object, shown: str) -> None:
    if shown == "numpy float128" and np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("longdouble is float64 here")
    key = "base_model.model.x.lora_A.weight"
    with pytest.raises(LorafuseValueError, match=rf"^state_dict\['{key}'\]: .*{shown}"):
        Adapter.from_state_dict({key: value, "base_model.model.x.lora_B.weight": np.ones((4, 2), np.float32)})


def test_from_state_dict_reads_big_endian_floats() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((4, 2))
    sd = {"base_model.model.x.lora_A.weight": a.astype(">f4"), "base_model.model.x.lora_B.weight": b.astype(">f8")}
    ad = Adapter.from_state_dict(sd, {"r": 2, "lora_alpha": 4})
    want = 2.0 * (b.astype(np.float32).astype(np.float64) @ a.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(ad["x"].delta(), want, rtol=1e-6)


# ----------------------------------------------------------------------------- 8. both adapters named


def test_shape_conflicts_name_both_adapters(two: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two
    a13 = peft_folder(tmp_path / "a13", {Q: (24, 20), V: (24, 20)}, 3, rank=4, alpha=8)
    mod = r"module 'model.layers.0.self_attn.q_proj': "
    with pytest.raises(ShapeMismatchError, match=rf"{mod}adapter 3 \({a13}\) has a linear update of shape \(24, 20\), "
                       rf"adapter 1 \({a}\) has a linear update of shape \(12, 10\)"):
        lorafuse.combine([a, b, a13], rank=1)
    with pytest.raises(ShapeMismatchError, match=rf"{mod}adapter 2 \({a13}\) .* adapter 1 \({a}\) has"):
        lorafuse.load(a) + lorafuse.load(a13)
    with pytest.raises(ShapeMismatchError, match=rf"{mod}adapter 2 \(<in-memory adapter>\) has a linear update of "
                       r"shape \(24, 20\), adapter 1 \(<in-memory adapter>\) has"):
        lorafuse.load(a) * 1.0 + lorafuse.load(a13) * 1.0
    with pytest.raises(ShapeMismatchError, match=rf"{mod}adapter 1 \(<in-memory adapter>\) has shape \(12, 10\), "
                       r"adapter 2 \(<in-memory adapter>\) has \(24, 20\)"):
        lorafuse.similarity([lorafuse.load(a) * 1.0, lorafuse.load(a13) * 1.0])


# ----------------------------------------------------------------------------- 9. ExtractResult's type hints


def test_extract_result_type_hints_resolve() -> None:
    from lorafuse.ops.extract import ExtractReport

    hints = typing.get_type_hints(lorafuse.ExtractResult.__init__)
    assert hints["modules"] == list[ExtractReport] and hints["adapter"] is Adapter
    sig = inspect.signature(lorafuse.ExtractResult, eval_str=True)
    assert sig.parameters["modules"].annotation == list[ExtractReport]
    assert sig.parameters["out"].annotation == Path | None


# ----------------------------------------------------------------------------- 10. file descriptors


_FDS = r'''
import os, resource, sys, warnings
warnings.simplefilter("ignore")
import lorafuse
folder = sys.argv[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (96, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
keep = []
try:
    for _ in range(300):
        keep.append(lorafuse.load(folder))
    print("loaded", len(keep))
except lorafuse.FormatError as e:
    print("refused", len(keep), e)
'''


def test_loaded_adapters_and_the_open_file_limit(two: tuple[Path, Path]) -> None:
    res = subprocess.run([sys.executable, "-c", _FDS, str(two[0])], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    # 3.13+: mmap(trackfd=False) holds no descriptor; before, once the mappings hold half the limit, a small
    # file is read into anonymous memory (io.safetensors): either way every adapter loads
    assert line == "loaded 300", line


def test_a_loaded_adapter_still_notices_its_file_rewritten(two: tuple[Path, Path]) -> None:
    """The change detection goes by the file's path (device, inode, size, times), not by a descriptor."""
    folder = two[0]
    ad = lorafuse.load(folder)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    with open(weights, "r+b") as f:  # rewritten in place, shorter: the mapping's pages past the end are gone
        f.truncate(len(data) // 2)
    with warnings.catch_warnings(), pytest.raises(lorafuse.InputChangedError):
        warnings.simplefilter("ignore")
        deltas(ad)
