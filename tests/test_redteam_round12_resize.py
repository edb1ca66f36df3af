"""Red-team round 12, resize: LoHa / LoKr modules whose pieces hold NaN / Inf or whose best factors do not fit
float32, deltas below float32's range, lora_B biases holding NaN / Inf, and the rule's spelling in the summary;
results against numpy float64 truncated SVDs of the deltas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from redteam_fixtures import PREFIX, peft_folder, run_cli
from safetensors.numpy import load_file, save_file

import lorafuse

M = "lora_unet_down_blocks_0_attentions_0_proj_in"  # an SD 1.x attention projection (a Linear layer)


def _save(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file(tensors, str(path))
    return path


def _rng_f32(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _lokr(path: Path, scale: float, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A LoKr file of two full halves (4x4, 8x8) times `scale` (no decomposition: scale 1), and its float64 delta."""
    w1 = (_rng_f32(seed, 4, 4) * np.float32(scale)).astype(np.float32)
    w2 = (_rng_f32(seed + 1, 8, 8) * np.float32(scale)).astype(np.float32)
    _save(path, {f"{M}.lokr_w1": w1, f"{M}.lokr_w2": w2, f"{M}.alpha": np.array(2.0, np.float32)})
    return path, np.kron(w1.astype(np.float64), w2.astype(np.float64))


def _written_delta(path: Path) -> np.ndarray:
    """alpha / r * lora_up @ lora_down of the one module of a kohya file, float64."""
    t = load_file(str(path))
    down, up = t[f"{M}.lora_down.weight"].astype(np.float64), t[f"{M}.lora_up.weight"].astype(np.float64)
    r = down.shape[0]
    alpha = float(t[f"{M}.alpha"].reshape(())) if f"{M}.alpha" in t else r
    return alpha / r * up.reshape(up.shape[0], -1) @ down.reshape(r, -1)


def _best(d: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "Warning" not in err, err
    return lines[0]


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_resize_refuses_a_lokr_whose_pieces_hold_nan_or_inf(tmp_path: Path, bad: float) -> None:
    """A LoKr with an Inf (or NaN) in lokr_w1 took the structured path, which checked nothing: resize wrote a
    lora_up full of NaN and exited 0."""
    w1 = _rng_f32(1, 4, 4)
    w1[1, 1] = bad
    src = _save(tmp_path / "lokr.safetensors", {f"{M}.lokr_w1": w1, f"{M}.lokr_w2": _rng_f32(2, 8, 8),
                                                 f"{M}.alpha": np.array(2.0, np.float32)})
    out = tmp_path / "small.safetensors"
    code, _, err = run_cli(["resize", str(src), "--rank", "2", "-o", str(out)])
    line = _one_line_error(err)
    assert code == 1 and not out.exists()
    assert "NonFiniteError" in line and "lokr.safetensors" in line and M in line
    assert ("NaN" if np.isnan(bad) else "Inf") in line


def test_resize_refuses_a_lokr_whose_best_factors_do_not_fit_float32(tmp_path: Path) -> None:
    """A LoKr of finite halves whose delta's singular values pass float32's range (1e30 x 1e30): the float64 factors
    were cast to float32 (a RuntimeWarning on stderr) and a lora_up of Inf was written, exit status 0 (the core
    refuses the same delta stored as a LoRA, naming its largest singular value)."""
    src, d = _lokr(tmp_path / "big.safetensors", 1e30)
    out = tmp_path / "small.safetensors"
    code, _, err = run_cli(["resize", str(src), "--rank", "2", "-o", str(out)])
    line = _one_line_error(err)
    assert code == 1 and not out.exists()
    assert "do not fit float32" in line and M in line and "big.safetensors" in line
    largest = np.linalg.svd(d, compute_uv=False)[0]
    assert f"{largest:.3g}" in line


def test_resize_of_a_lokr_past_float32_with_the_roots_on_both_factors_is_its_best_rank_k(tmp_path: Path) -> None:
    """A LoKr whose singular values (~1e40) pass float32's range fits float32 as their square roots on both factors:
    --split sqrt made that split after rounding U S to float32 (Inf), and wrote NaN; now its best rank-2 delta."""
    src, d = _lokr(tmp_path / "big.safetensors", 1e20)
    out = tmp_path / "small.safetensors"
    code, _, err = run_cli(["resize", str(src), "--rank", "2", "--split", "sqrt", "-o", str(out), "-q"])
    assert code == 0, err
    best = _best(d, 2)
    np.testing.assert_allclose(_written_delta(out), best, rtol=0, atol=1e-5 * np.abs(best).max())


def test_resize_of_a_loha_whose_finite_pieces_overflow_says_so_not_nan(tmp_path: Path) -> None:
    """A LoHa of finite pieces (1e20 in hada_w1_a and hada_w2_a) whose products overflow float32: resize said
    'input holds NaN or Inf' (the core saw the Inf of the float32 exact factorization) after a numpy
    RuntimeWarning printed on stderr."""
    a1, a2 = _rng_f32(1, 32, 2), _rng_f32(2, 32, 2)
    a1[0, 0] = a2[0, 0] = 1e20
    src = _save(tmp_path / "loha.safetensors", {f"{M}.hada_w1_a": a1, f"{M}.hada_w1_b": _rng_f32(3, 2, 32),
                                                 f"{M}.hada_w2_a": a2, f"{M}.hada_w2_b": _rng_f32(4, 2, 32),
                                                 f"{M}.alpha": np.array(2.0, np.float32)})
    out = tmp_path / "small.safetensors"
    code, _, err = run_cli(["resize", str(src), "--rank", "1", "-o", str(out)])
    line = _one_line_error(err)
    assert code == 1 and not out.exists()
    assert "NaN" not in line and "overflows float32" in line and M in line and "loha.safetensors" in line


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_resize_of_a_delta_below_float32s_range_is_refused_not_written_as_zeros(tmp_path: Path, kind: str) -> None:
    """Factors of 1e-30 give a delta of singular values ~1e-59: the core rounds U S to float32 and wrote a lora_up
    of zeros (exit status 0), a delta of nothing. Refused now, naming the module and --split sqrt, which writes
    the best rank-k delta (square roots ~1e-30 on both factors)."""
    if kind == "lora":
        down, up = _rng_f32(1, 4, 32) * np.float32(1e-30), _rng_f32(2, 32, 4) * np.float32(1e-30)
        src = _save(tmp_path / "tiny.safetensors", {f"{M}.lora_down.weight": down, f"{M}.lora_up.weight": up,
                                                     f"{M}.alpha": np.array(4.0, np.float32)})
        d = up.astype(np.float64) @ down.astype(np.float64)
    else:
        src, d = _lokr(tmp_path / "tiny.safetensors", 1e-30)
    out = tmp_path / "small.safetensors"
    code, _, err = run_cli(["resize", str(src), "--rank", "2", "-o", str(out)])
    line = _one_line_error(err)
    assert code == 1 and not out.exists()
    assert "below float32's range" in line and "--split sqrt" in line and M in line
    code, _, err = run_cli(["resize", str(src), "--rank", "2", "--split", "sqrt", "-o", str(out), "-q"])
    assert code == 0, err
    best = _best(d, 2)
    got = _written_delta(out)
    assert np.abs(got).max() > 0
    np.testing.assert_allclose(got, best, rtol=0, atol=1e-5 * np.abs(best).max())


def test_python_resize_of_a_tiny_lokr_with_split_sqrt_is_its_best_rank_k(tmp_path: Path) -> None:
    """LoKr's structured path made the sqrt split after rounding U S to float32, so the roots of a delta below
    float32's range were zeros too (and --split sqrt could not help). Each factor now holds sqrt(S) per direction."""
    src, d = _lokr(tmp_path / "tiny.safetensors", 1e-30)
    res = lorafuse.resize(src, rank=3, split="sqrt")
    u = res.adapter.updates[M]
    best = _best(d, 3)
    np.testing.assert_allclose(u.delta().reshape(best.shape), best, rtol=0, atol=1e-5 * np.abs(best).max())
    s = np.linalg.svd(d, compute_uv=False)[:3]
    b, a = u.B.f32().astype(np.float64), u.A.f32().astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(b, axis=0) * np.sqrt(u.scale), np.sqrt(s), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1) * np.sqrt(u.scale), np.sqrt(s), rtol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_resize_refuses_a_lora_b_bias_holding_nan_or_inf(tmp_path: Path, bad: float) -> None:
    """A PEFT adapter with lora_bias whose lora_B bias holds NaN: resize refuses NaN in the factors but copied the
    bias as it was, writing an adapter whose output rows are NaN (exit status 0)."""
    name = "model.layers.0.self_attn.q_proj"
    bias = np.ones(8, np.float32)
    bias[2] = bad
    src = peft_folder(tmp_path / "a", {name: (8, 16)}, 1, rank=4, alpha=8, extra={"lora_bias": True},
                      tensors={f"{PREFIX}{name}.lora_B.bias": bias})
    out = tmp_path / "small"
    code, _, err = run_cli(["resize", str(src), "--rank", "2", "-o", str(out)])
    line = _one_line_error(err)
    assert code == 1 and not out.exists()
    assert "NonFiniteError" in line and name in line and "bias" in line and "(8,)" in line
    assert ("NaN" if np.isnan(bad) else "Inf") in line
    with pytest.raises(lorafuse.NonFiniteError, match="lora_B bias"):
        lorafuse.resize(src, rank=2)


def test_resize_summary_and_plan_spell_the_cap_as_the_option(tmp_path: Path) -> None:
    """The summary said '(sv-fro 0.9, max_rank 3)': the rule in the CLI's spelling, its cap in Python's."""
    down, up = _rng_f32(1, 6, 16), _rng_f32(2, 16, 6)
    src = _save(tmp_path / "k.safetensors", {f"{M}.lora_down.weight": down, f"{M}.lora_up.weight": up,
                                              f"{M}.alpha": np.array(6.0, np.float32)})
    code, out, err = run_cli(["resize", str(src), "--sv-fro", "0.9", "--max-rank", "3", "-o",
                              str(tmp_path / "o.safetensors")])
    assert code == 0, err
    assert "(sv-fro 0.9, max-rank 3)" in out and "max_rank" not in out
    code, out, err = run_cli(["resize", str(src), "--sv-fro", "0.9", "--max-rank", "3", "-o",
                              str(tmp_path / "p.safetensors"), "--dry-run"])
    assert code == 0, err
    assert "sv-fro 0.9, max-rank 3" in out and "max_rank" not in out


def test_dry_run_refuses_the_lokr_the_run_refuses_for_its_size(tmp_path: Path) -> None:
    """A LoKr of two 256x256 halves (a 65536 x 65536 delta) resized to --rank 65536: the run refuses its rank-k LoRA
    (65536 x 131072, past the one-module limit) from shapes alone, but --dry-run said it would write 32 GiB and
    exited 0 ('Refusals and exit status are those of a real run')."""
    src = _save(tmp_path / "lokr.safetensors", {f"{M}.lokr_w1": _rng_f32(1, 256, 256),
                                                 f"{M}.lokr_w2": _rng_f32(2, 256, 256)})
    out = tmp_path / "small.safetensors"
    for extra in (["--dry-run"], []):
        code, _, err = run_cli(["resize", str(src), "--rank", "65536", "-o", str(out), *extra])
        line = _one_line_error(err)
        assert code == 1 and not out.exists(), extra
        assert "65536 x 131072" in line and M in line and "lokr.safetensors" in line
    code, _, err = run_cli(["resize", str(src), "--rank", "65536", "--max-rank", "2", "-o", str(out), "--dry-run"])
    assert code == 0, err  # the cap makes it small
