"""Red-team round 6, numerics of extract / resize / arithmetic against numpy float64.

- factors rounded to F16 that fall wholly below its smallest subnormal (a delta of ~1e-20 has no F16 factors
  that hold it, even balanced between B and A) were written as zeros: extract and resize refuse them, naming
  the module, and write nothing; a sum that cancels to float32's noise (combine a, a with weights 1, -1) is
  still written;
- extract --sv-fro 1.0 on an exactly low-rank delta chose the rank cap (128) on the streamed randomized path,
  where the float32 singular values fall short of the float64 ||D||^2 by rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch

import lorafuse
from lorafuse.cli import main
from lorafuse.errors import UnsupportedError

pytestmark = pytest.mark.filterwarnings("ignore")

NAME = "model.layers.0.mlp.down_proj"
KOHYA = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _checkpoints(tmp: Path, d: np.ndarray) -> tuple[Path, Path]:
    w = np.zeros(d.shape, np.float32)
    save_file({f"{NAME}.weight": w}, str(tmp / "base.safetensors"))
    save_file({f"{NAME}.weight": (w + d).astype(np.float32)}, str(tmp / "ft.safetensors"))
    return tmp / "base.safetensors", tmp / "ft.safetensors"


def _tiny_delta(scale: float, shape: tuple[int, int] = (32, 40)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((shape[0], 2)) @ rng.standard_normal((2, shape[1])) * scale).astype(np.float32)


def _lora_delta(u: object) -> np.ndarray:
    return u.scale * u.B.f32().astype(np.float64) @ u.A.f32().astype(np.float64)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- 1. F16 factors below F16's range
@pytest.mark.parametrize("scale", [1e-20, 1e-30])
def test_extract_fp16_of_a_delta_f16_factors_cannot_hold_is_refused_not_zeroed(tmp_path: Path, scale: float) -> None:
    d = _tiny_delta(scale)
    base, ft = _checkpoints(tmp_path, d)
    exact = lorafuse.extract(base, ft, rank=2)  # float32 factors hold it
    (u,) = exact.adapter.updates.values()
    ref = d.astype(np.float64)
    assert np.linalg.norm(_lora_delta(u) - ref) / np.linalg.norm(ref) < 1e-5
    with pytest.raises(UnsupportedError) as e:  # was: an adapter of all-zero F16 factors, the delta lost
        lorafuse.extract(base, ft, rank=2, dtype="fp16")
    assert NAME in str(e.value) and "F16" in str(e.value) and "fp32" in str(e.value) and str(ft) in str(e.value)


def test_extract_cli_fp16_underflow_is_one_line_and_writes_nothing(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    base, ft = _checkpoints(tmp_path, _tiny_delta(1e-20))
    out = tmp_path / "out"
    assert main(["extract", str(base), str(ft), "--rank", "2", "--dtype", "fp16", "-o", str(out), "-q"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and NAME in err, err
    assert not out.exists()


def test_extract_fp16_of_a_small_delta_is_balanced_and_kept(tmp_path: Path) -> None:
    """The refusal is only for what F16 cannot hold: a delta of 1e-9 fits F16 factors once balanced."""
    d = _tiny_delta(1e-9)
    base, ft = _checkpoints(tmp_path, d)
    (u,) = lorafuse.extract(base, ft, rank=2, dtype="fp16").adapter.updates.values()
    assert u.B.dtype == "F16"
    ref = d.astype(np.float64)
    assert np.linalg.norm(_lora_delta(u) - ref) / np.linalg.norm(ref) < 5e-3


def _kohya_f32(tmp: Path, scale: float) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(1)
    down = (rng.standard_normal((4, 16)) * scale).astype(np.float32)
    up = (rng.standard_normal((24, 4)) * scale).astype(np.float32)
    path = tmp / "tiny.safetensors"
    save_file({f"{KOHYA}.lora_down.weight": down, f"{KOHYA}.lora_up.weight": up,
               f"{KOHYA}.alpha": np.array(4.0, np.float32)}, str(path))
    return path, up.astype(np.float64) @ down.astype(np.float64)


def test_resize_fp16_of_factors_f16_cannot_hold_is_refused_not_zeroed(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _kohya_f32(tmp_path, 1e-12)  # delta ~1e-24: below any product of two F16 values (3.6e-15)
    with pytest.raises(UnsupportedError) as e:
        lorafuse.resize(path, rank=2, dtype="fp16")
    assert KOHYA in str(e.value) and "F16" in str(e.value) and "tiny.safetensors" in str(e.value)
    out = tmp_path / "out.safetensors"
    assert main(["resize", str(path), "--rank", "2", "--dtype", "fp16", "-o", str(out), "-q"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_resize_fp16_of_small_factors_is_the_best_rank_k(tmp_path: Path) -> None:
    path, delta = _kohya_f32(tmp_path, 1e-4)
    out = tmp_path / "out.safetensors"
    assert main(["resize", str(path), "--rank", "2", "--dtype", "fp16", "-o", str(out), "-q"]) == 0
    sd = load_file(str(out))
    down = sd[f"{KOHYA}.lora_down.weight"].astype(np.float64)
    up = sd[f"{KOHYA}.lora_up.weight"].astype(np.float64)
    got = float(sd[f"{KOHYA}.alpha"]) / down.shape[0] * up @ down
    u, s, vt = np.linalg.svd(delta)
    best = (u[:, :2] * s[:2]) @ vt[:2]
    assert np.linalg.norm(got - best) / np.linalg.norm(best) < 5e-3


def test_combine_of_f16_adapters_that_cancel_is_still_written(tmp_path: Path) -> None:
    """a - a: the float32 SVD leaves rounding noise far below F16's range; writing it as zeros is right."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "a.safetensors"
    save_torch({f"{KOHYA}.lora_down.weight": torch.randn(4, 16, generator=g).half(),
                f"{KOHYA}.lora_up.weight": torch.randn(32, 4, generator=g).half(),
                f"{KOHYA}.alpha": torch.tensor(3.0).half()}, str(path))
    for method in ("svd", "linear"):
        (u,) = lorafuse.combine([path, path], [1.0, -1.0], method=method).updates.values()
        assert u.B.dtype == "F16"
        assert np.abs(_lora_delta(u)).max() < 1e-6


# ----------------------------------------------------------------------------- 2. --sv-fro 1.0 on the streamed path
def test_extract_sv_fro_one_keeps_the_exact_rank_on_the_streamed_path(tmp_path: Path) -> None:
    """A rank-2 delta of 1024 x 1024 (the randomized SVD's path): sv_fro=1.0 keeps 2 values, as numpy's float64
    spectrum says (the third is 1e-8 of the first), as the dense path does for a small matrix."""
    rng = np.random.default_rng(3)
    d = (rng.standard_normal((1024, 2)) @ rng.standard_normal((2, 1024))).astype(np.float32)
    s = np.linalg.svd(d.astype(np.float64), compute_uv=False)
    want = int(np.argmax(np.sqrt(np.cumsum(s**2) / np.sum(s**2)) >= 1.0 - 1e-12)) + 1
    assert want == 2
    base, ft = _checkpoints(tmp_path, d)
    result = lorafuse.extract(base, ft, sv_fro=1.0)
    assert result.modules[0].rank == want  # was 128, the cap
    (u,) = result.adapter.updates.values()
    assert np.linalg.norm(_lora_delta(u) - d) / np.linalg.norm(d) < 1e-5
