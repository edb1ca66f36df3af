"""Red team, round 13: the streamed combine engine (ops.combine.many) now that svd's passes fold each chunk through
the backend's sketch_fold on the factors as stored.

Checked against numpy float64 (sum of c_i B_i A_i and its exact truncated SVD) and against engine 'memory':
adapters of F16, F32, F64 and BF16 factors (A and B of one module in different dtypes too) with ranks 1, 7, 33, 70
and 130 in one list, kohya conv modules and a module smaller than 16 either way, every pass count, chunks of one
adapter. Errors of one bad adapter in a list name its line and its path; oversample is never silently dropped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafuse
from lorafuse.errors import InputChangedError, LorafuseValueError, NonFiniteError
from lorafuse.ops.combine import CombineOptions, combine_to, many

pytestmark = pytest.mark.filterwarnings("ignore::lorafuse.errors.AdapterNote")  # mixed dtypes: said once

TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
MODULES = {  # kohya name -> (out, in, kernel: 0 linear)
    "down_blocks_0_attentions_0_proj_in": (40, 24, 0),
    "down_blocks_0_resnets_0_conv1": (20, 8, 3),
    "mid_block_attentions_0_proj_out": (3, 5, 0),
}
RANKS = [1, 7, 33, 70, 130]
DTYPES = [("F16", "BF16"), ("F32", "F64"), ("BF16", "F32"), ("F64", "F16"), ("F16", "F16")]  # (A, B)
WEIGHTS = [0.5, -1.0, 2.0, 0.25, -0.3]


def _kohya(path: Path, seed: int, rank: int, dtypes: tuple[str, str], alpha: float) -> dict[str, np.ndarray]:
    """A kohya LoRA file of MODULES (A in dtypes[0], B in dtypes[1]); each module's delta (float64, 2-D, scale
    alpha / rank applied) from the factors as stored."""
    g = np.random.default_rng(seed)
    tensors: dict[str, torch.Tensor] = {}
    deltas = {}
    for name, (o, i, k) in MODULES.items():
        a = torch.from_numpy(g.standard_normal((rank, i, k, k) if k else (rank, i))).to(TORCH[dtypes[0]])
        b = torch.from_numpy(g.standard_normal((o, rank, 1, 1) if k else (o, rank))).to(TORCH[dtypes[1]])
        tensors[f"lora_unet_{name}.lora_down.weight"] = a
        tensors[f"lora_unet_{name}.lora_up.weight"] = b
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
        deltas[name] = alpha / rank * (b.double().numpy().reshape(o, rank) @ a.double().numpy().reshape(rank, -1))
    save_file(tensors, str(path))
    return deltas


def _mixed(tmp_path: Path) -> tuple[list[Path], dict[str, np.ndarray]]:
    paths, total = [], {}
    for i, (r, dt, w) in enumerate(zip(RANKS, DTYPES, WEIGHTS)):
        p = tmp_path / f"a{i}.safetensors"
        for name, d in _kohya(p, i, r, dt, float(i + 1)).items():
            total[name] = total.get(name, 0) + w * d
        paths.append(p)
    return paths, total


def _deltas(path: Path) -> dict[str, np.ndarray]:
    t = load_file(str(path))
    out = {}
    for name in MODULES:
        a = t[f"lora_unet_{name}.lora_down.weight"].double().numpy()
        b = t[f"lora_unet_{name}.lora_up.weight"].double().numpy()
        r = a.shape[0]
        alpha = float(t[f"lora_unet_{name}.alpha"]) if f"lora_unet_{name}.alpha" in t else r
        out[name] = alpha / r * (b.reshape(b.shape[0], r) @ a.reshape(r, -1))
    return out


def _best(d: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.mark.parametrize("passes", [1, 2, 3, 4])
def test_mixed_dtypes_and_ranks_stream_to_the_float64_truncated_svd(tmp_path: Path, passes: int) -> None:
    """Every module here is sketched whole (min(out, in) <= 2 (k + 10)): each pass count gives numpy float64's
    best rank-k approximation of sum_i c_i B_i A_i, chunk of one adapter or of all, as engine 'memory' does."""
    paths, total = _mixed(tmp_path)
    k = 6
    results = {}
    for engine, group in (("memory", 64 << 20), ("stream", 1), ("stream", 64 << 20)):
        out = tmp_path / f"{engine}{group}.safetensors"
        combine_to(paths, WEIGHTS, CombineOptions(rank=k, engine=engine, group_bytes=group,
                                                  passes=None if engine == "memory" else passes), out)
        results[(engine, group)] = _deltas(out)
    for name, d in total.items():
        best = _best(d, min(k, *d.shape))
        optimum = np.linalg.norm(d - best)
        for key, got in results.items():  # float32 products: the optimum's error, to 1e-5 of ||D||
            assert np.linalg.norm(d - got[name]) <= optimum + 1e-5 * np.linalg.norm(d), (key, name)
            assert np.linalg.norm(got[name] - best) <= 1e-4 * np.linalg.norm(best), (key, name)


def test_a_randomized_module_of_mixed_dtypes_and_ranks_comes_near_the_optimum(tmp_path: Path) -> None:
    """A module sketched by k + oversample columns (200 x 160, k = 6), decaying spectra: 3 and 4 passes come within
    1.001x of the optimal error, 2 passes with oversample 40 too; F8 factors go through the float32 copy."""
    g = np.random.default_rng(0)
    o, i, k = 200, 160, 6
    dtypes = [("F16", "BF16"), ("F32", "F64"), ("BF16", "F32"), ("F64", "F16"), ("F8", "F32")]
    convert = {**TORCH, "F8": torch.float8_e4m3fn}
    paths, d = [], np.zeros((o, i))
    for n, (r, (da, db), w) in enumerate(zip(RANKS, dtypes, WEIGHTS)):
        a = torch.from_numpy(g.standard_normal((r, i)) * 0.5 ** np.arange(r)[:, None]).to(convert[da])
        b = torch.from_numpy(g.standard_normal((o, r))).to(convert[db])
        p = tmp_path / f"a{n}.safetensors"
        save_file({"lora_unet_x_proj.lora_down.weight": a, "lora_unet_x_proj.lora_up.weight": b,
                   "lora_unet_x_proj.alpha": torch.tensor(float(r))}, str(p))
        paths.append(p)
        d += w * (b.double().numpy() @ a.double().numpy())
    optimum = np.linalg.norm(d - _best(d, k))
    for passes, over in ((3, None), (4, None), (2, 40)):
        out = tmp_path / f"o{passes}.safetensors"
        combine_to(paths, WEIGHTS, CombineOptions(rank=k, engine="stream", passes=passes, oversample=over,
                                                  group_bytes=1), out)
        t = load_file(str(out))
        got = t["lora_unet_x_proj.lora_up.weight"].double().numpy() @ t["lora_unet_x_proj.lora_down.weight"].double(
        ).numpy()
        assert np.linalg.norm(d - got) <= 1.001 * optimum, (passes, over)


def _poisoned(tmp_path: Path, dtype: str, factor: str, value: float) -> Path:
    """A list of four adapters (ranks 1, 7, 33, 70), the third of `dtype` factors holding `value` in one entry of
    its conv module's `factor` ('down' or 'up'); the list: a comment line, then one adapter a line."""
    for n in range(4):
        p = tmp_path / f"a{n}.safetensors"
        _kohya(p, n, RANKS[n], (dtype, dtype) if n == 2 else ("F32", "F32"), 1.0)
    p = tmp_path / "a2.safetensors"
    t = load_file(str(p))
    key = f"lora_unet_down_blocks_0_resnets_0_conv1.lora_{factor}.weight"
    x = t[key].clone()
    x.view(-1)[3] = value
    t[key] = x
    save_file(t, str(p))
    listed = tmp_path / "list.txt"
    listed.write_text("# four adapters\n" + "".join(f"a{n}.safetensors 0.5\n" for n in range(4)))
    return listed


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64"])
@pytest.mark.parametrize("passes", [1, 3])
def test_a_nonfinite_factor_names_the_list_line_and_the_path(tmp_path: Path, dtype: str, passes: int) -> None:
    """The streamed engine's NaN / Inf refusal names the list's line and the adapter's path, as engine 'memory'
    does (a line number alone sends the user to the list to find which file)."""
    listed = _poisoned(tmp_path, dtype, "up" if passes == 1 else "down", float("nan") if dtype != "F64" else np.inf)
    out = tmp_path / "out.safetensors"
    r = subprocess.run([sys.executable, "-m", "lorafuse", "combine", "--from-list", str(listed), "-o", str(out),
                        "--engine", "stream", "--passes", str(passes), "--rank", "4"], capture_output=True, text=True)
    assert r.returncode != 0 and not out.exists()
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert f"{listed} line 4" in line and str(tmp_path / "a2.safetensors") in line, line
    assert "NaN or Inf" in line and "lora_unet_down_blocks_0_resnets_0_conv1" in line


def test_an_f64_factor_beyond_float32_names_the_list_line_and_the_path(tmp_path: Path) -> None:
    listed = _poisoned(tmp_path, "F64", "down", 1e200)
    sources, weights = many.read_list(listed)
    with pytest.raises(NonFiniteError) as e:
        combine_to(sources, weights, CombineOptions(rank=4, engine="stream"), tmp_path / "out.safetensors")
    text = str(e.value)
    assert f"{listed} line 4" in text and str(tmp_path / "a2.safetensors") in text and "1e+200" in text, text
    assert not (tmp_path / "out.safetensors").exists()


def test_an_adapter_changed_between_passes_names_its_line_and_path(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    paths, _ = _mixed(tmp_path)
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{p.name} 1\n" for p in paths))
    victim = paths[3]
    start = many.Sketching.start

    def rewriting(self: many.Sketching, pass_no: int) -> object:
        if pass_no == 2:
            data = victim.read_bytes()
            victim.write_bytes(data)  # the same bytes, written again: a new change time
            os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns - 10**9))
        return start(self, pass_no)

    monkeypatch.setattr(many.Sketching, "start", rewriting)
    sources, weights = many.read_list(listed)
    with pytest.raises(InputChangedError) as e:
        combine_to(sources, weights, CombineOptions(rank=4, engine="stream", passes=3),
                   tmp_path / "out.safetensors")
    text = str(e.value)
    assert f"{listed} line 4" in text and str(victim) in text and "pass 2" in text, text
    assert not (tmp_path / "out.safetensors").exists()


def test_exact_with_oversample_is_refused_not_silently_dropped(tmp_path: Path) -> None:
    """oversample selects the streamed engine under 'auto', as passes does; exact takes the in-memory exact SVD,
    which has no sketch: the two together are refused (as exact with passes), not run with oversample ignored."""
    paths, _ = _mixed(tmp_path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(LorafuseValueError, match="exact"):
        combine_to(paths, WEIGHTS, CombineOptions(rank=4, exact=True, oversample=5), out)
    assert not out.exists()
    r = subprocess.run([sys.executable, "-m", "lorafuse", "combine", *map(str, paths), "-o", str(out), "--exact",
                        "--oversample", "5"], capture_output=True, text=True)
    assert r.returncode == 2 and not out.exists(), r.stderr
    assert "oversample" in r.stderr and "exact" in r.stderr and "Traceback" not in r.stderr
    assert lorafuse.load(paths[0]).updates  # the inputs are untouched


def _tiny(tmp_path: Path, size: float, dtype: str) -> tuple[list[Path], np.ndarray]:
    """Three adapters of one 64 x 48 module whose factors' entries are about `size` (rank 4, alpha 4): their
    products about size^2, below float32's normal range for size <= 1e-20."""
    g = np.random.default_rng(5)
    paths, d = [], np.zeros((64, 48))
    for n in range(3):
        a = torch.from_numpy(g.standard_normal((4, 48)) * size).to(TORCH[dtype])
        b = torch.from_numpy(g.standard_normal((64, 4)) * size).to(TORCH[dtype])
        p = tmp_path / f"t{n}.safetensors"
        save_file({"lora_unet_x_proj.lora_down.weight": a, "lora_unet_x_proj.lora_up.weight": b,
                   "lora_unet_x_proj.alpha": torch.tensor(4.0)}, str(p))
        paths.append(p)
        d += b.double().numpy() @ a.double().numpy()
    return paths, d


@pytest.mark.parametrize("passes", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["F32", "F64", "BF16"])
def test_factors_whose_products_underflow_float32_still_give_the_truncated_svd(tmp_path: Path, passes: int,
                                                                               dtype: str) -> None:
    """Factors of about 1e-21 (products about 1e-42, float32 subnormals: the streamed products kept a few bits of
    them, and a factor of 1e-25 none: a zero adapter written, exit 0) combine as engine 'memory' combines them
    (split 'sqrt': factors of about 1e-21 each, which F32 holds): numpy float64's best rank-4 approximation."""
    paths, d = _tiny(tmp_path, 1e-21, dtype)
    best = _best(d, 4)
    out = tmp_path / "out.safetensors"
    combine_to(paths, None, CombineOptions(rank=4, split="sqrt", engine="stream", passes=passes, dtype="fp32"), out)
    t = load_file(str(out))
    got = t["lora_unet_x_proj.lora_up.weight"].double().numpy() @ t["lora_unet_x_proj.lora_down.weight"].double(
    ).numpy()
    assert np.linalg.norm(d - got) <= np.linalg.norm(d - best) + 1e-5 * np.linalg.norm(d)
    assert np.linalg.norm(got - best) <= 1e-4 * np.linalg.norm(best)


def test_factors_too_small_for_any_scale_are_refused_not_written_as_zeros(tmp_path: Path) -> None:
    paths, _ = _tiny(tmp_path, 1e-25, "F32")
    out = tmp_path / "out.safetensors"
    with pytest.raises(LorafuseValueError, match=r"module 'lora_unet_x_proj': its terms .* too small"):
        combine_to(paths, None, CombineOptions(rank=4, split="sqrt", engine="stream"), out)
    assert not out.exists()


def test_adapters_of_zero_factors_still_combine_to_zero(tmp_path: Path) -> None:
    """A module whose factors are all zero (PEFT's B at initialization) sketches to zero: zero factors written."""
    paths, _ = _tiny(tmp_path, 0.0, "F32")
    out = tmp_path / "out.safetensors"
    combine_to(paths, None, CombineOptions(rank=4, engine="stream"), out)
    t = load_file(str(out))
    assert not t["lora_unet_x_proj.lora_up.weight"].any() or not t["lora_unet_x_proj.lora_down.weight"].any()
