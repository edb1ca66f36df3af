"""LyCORIS stages of the fused merge (`_core.merge_batch`): LoHa and LoKr, tile by tile.

Every result is checked against a numpy float64 reference on random inputs: the
merged value must be within one ulp of the output dtype of the exact merge, plus
the float32 error bound of the kernel's arithmetic (gamma_n * sum of magnitudes),
both derived from the dtypes. Shapes are odd, with rows that are not a multiple of
the tile height and columns wide enough for several tiles (the core's tiles hold
about 64 Ki float32: 15 rows of 4101 columns). BF16 is encoded by torch and decoded
by a bit shift, F16 by numpy, independently of the core's conversions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from lycoris.functional import loha as lycoris_loha
from lycoris.functional import lokr as lycoris_lokr

from lorafuse import DtypeError, LorafuseValueError, ShapeMismatchError, _core

DTYPES = ("F32", "F16", "BF16")
RAW = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
MANTISSA_BITS = {"F32": 23, "F16": 10, "BF16": 7}
MIN_EXPONENT = {"F32": -126, "F16": -14, "BF16": -126}
UNIT_ROUNDOFF_F32 = 2.0**-24

ROWS, COLS = 39, 4101  # 39 = 3 * 13 and 4101 = 3 * 1367: tiles of 15 rows, the last one of 9
JOB = "lora_unet_blocks_3_attn_to_q"


# ----------------------------------------------------------------------------- helpers


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the raw buffer of `dtype` (round to nearest even)."""
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "F32":
        return x32
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return x32.astype(np.float16)
    return torch.from_numpy(x32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A raw buffer of `dtype` -> its exact values in float64."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.astype(np.float64)


def ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of `dtype` at |x| (subnormal spacing below the smallest normal)."""
    exponent = np.frexp(np.abs(x))[1] - 1
    exponent = np.maximum(np.where(x == 0, MIN_EXPONENT[dtype], exponent), MIN_EXPONENT[dtype])
    return np.ldexp(1.0, exponent - MANTISSA_BITS[dtype])


def gamma(n: int) -> float:
    """Higham's gamma_n for float32: the relative error bound of n roundings."""
    return n * UNIT_ROUNDOFF_F32 / (1 - n * UNIT_ROUNDOFF_F32)


def assert_rounded_once(out: np.ndarray, out_dtype: str, ref: np.ndarray, err32: np.ndarray) -> None:
    """out is the float64 reference, off by at most the float32 error err32, rounded once to out_dtype."""
    got = decode(out, out_dtype)
    assert got.shape == ref.shape
    if ref.size == 0:
        return
    tol = ulp(np.abs(ref) + err32, out_dtype) + err32
    excess = np.abs(got - ref) - tol
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, (
        f"{out_dtype}: element {worst} is {got[worst]!r}, reference {ref[worst]!r}, tolerance {tol[worst]!r}"
    )


def f32(rng: np.random.Generator, *shape: int, scale: float = 0.7) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def f64(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64)


def merge(w_raw: np.ndarray, w_dtype: str, out_dtype: str, stages: list, threads: int = 2,
          name: str = JOB) -> tuple[np.ndarray, bool]:
    out = np.empty(w_raw.shape, dtype=RAW[out_dtype])
    (flag,) = _core.merge_batch([(name, w_raw, w_dtype, out, out_dtype, stages)], threads)
    return out, flag


class Base:
    """A random base weight stored as `dtype`, with its exact values."""

    def __init__(self, rng: np.random.Generator, dtype: str, rows: int = ROWS, cols: int = COLS) -> None:
        self.dtype = dtype
        self.raw = encode(f32(rng, rows, cols, scale=1.0), dtype)
        self.exact = decode(self.raw, dtype)


# Each stage below returns (stage tuple, exact float64 delta, float32 error bound of the
# delta, rank-like count of roundings).


def hadamard_stage(rng: np.random.Generator, rows: int, cols: int, r1: int, r2: int,
                   coef: float = 0.8) -> tuple[tuple, np.ndarray, np.ndarray, int]:
    B1 = (f32(rng, rows, r1) * np.float32(coef)).astype(np.float32)  # the coefficient folded into B1
    A1, B2, A2 = f32(rng, r1, cols), f32(rng, rows, r2), f32(rng, r2, cols)
    delta = (f64(B1) @ f64(A1)) * (f64(B2) @ f64(A2))
    mag = (np.abs(f64(B1)) @ np.abs(f64(A1))) * (np.abs(f64(B2)) @ np.abs(f64(A2)))
    return ("hadamard", (B1, A1, B2, A2), None, False), delta, mag, r1 + r2 + 1


def kron_stage(rng: np.random.Generator, a: int, b: int, c: int, d: int) -> tuple[tuple, np.ndarray, np.ndarray, int]:
    W1, W2 = f32(rng, a, b, scale=1.2), f32(rng, c, d)
    delta = np.kron(f64(W1), f64(W2))
    return ("kron", (W1, W2), None, False), delta, np.abs(delta), 1


def lowrank_stage(rng: np.random.Generator, rows: int, cols: int, r: int,
                  explicit: bool) -> tuple[tuple, np.ndarray, np.ndarray, int]:
    B, A = f32(rng, rows, r), f32(rng, r, cols)
    stage = ("lowrank", (B, A), None, False) if explicit else (B, A, None, False)
    return stage, f64(B) @ f64(A), np.abs(f64(B)) @ np.abs(f64(A)), r


def merged_reference(base: Base,
                     parts: Sequence[tuple[tuple, np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """W + sum of the deltas in float64, and the float32 error bound of computing it tile by tile."""
    ref = base.exact.copy()
    magnitude = np.abs(base.exact)
    for _, delta, mag, _ in parts:
        ref += delta
        magnitude += mag
    roundings = max(n for *_, n in parts) + len(parts) + 1
    return ref, gamma(roundings) * magnitude


def with_magnitude(stage: tuple, m: np.ndarray, column_norm: bool) -> tuple:
    return (stage[0], stage[1], m, column_norm)


def dora_reference(v: np.ndarray, err_v: np.ndarray, m: np.ndarray, column_norm: bool,
                   own: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """m * V / ||N|| per row (or column) in float64, N = `own` (W + the DoRA stage's own delta, PEFT's
    norm; V itself when None), and the error bound when V and N are known to +-err_v, +-err_n."""
    axis = 0 if column_norm else 1
    n, err_n = (v, err_v) if own is None else own
    norm = np.linalg.norm(n, axis=axis, keepdims=True)
    err_norm = np.linalg.norm(err_n, axis=axis, keepdims=True)
    mm = f64(m)[None, :] if column_norm else f64(m)[:, None]
    ref = mm * v / norm
    err = np.abs(mm) / norm * (err_v + np.abs(v) * err_norm / norm) + gamma(4) * np.abs(ref)
    return ref, err


# ----------------------------------------------------------------------------- LoHa


@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_hadamard_matches_float64(w_dtype: str, out_dtype: str) -> None:
    rng = np.random.default_rng([1, DTYPES.index(w_dtype), DTYPES.index(out_dtype)])
    base = Base(rng, w_dtype)
    part = hadamard_stage(rng, ROWS, COLS, r1=3, r2=5)
    out, flag = merge(base.raw, w_dtype, out_dtype, [part[0]])
    ref, err = merged_reference(base, [part])
    assert not flag
    assert_rounded_once(out, out_dtype, ref, err)


@pytest.mark.parametrize(("rows", "cols", "r1", "r2"), [(1, 1, 1, 1), (7, 9, 2, 1), (300, 37, 4, 7), (16, 4101, 1, 8)])
def test_hadamard_odd_shapes(rows: int, cols: int, r1: int, r2: int) -> None:
    # (300, 37): tiles of 256 rows and a tail of 44; (16, 4101): 15 rows, then one.
    rng = np.random.default_rng([2, rows, cols])
    base = Base(rng, "BF16", rows, cols)
    part = hadamard_stage(rng, rows, cols, r1, r2)
    out, flag = merge(base.raw, "BF16", "F32", [part[0]])
    ref, err = merged_reference(base, [part])
    assert not flag
    assert_rounded_once(out, "F32", ref, err)


def test_hadamard_rank_zero_adds_nothing() -> None:
    rng = np.random.default_rng(3)
    base = Base(rng, "F32", 5, 6)
    B1, A1 = np.zeros((5, 0), np.float32), np.zeros((0, 6), np.float32)
    B2, A2 = f32(rng, 5, 2), f32(rng, 2, 6)
    out, flag = merge(base.raw, "F32", "F32", [("hadamard", (B1, A1, B2, A2), None, False)])
    assert not flag
    np.testing.assert_array_equal(out, base.raw)


def test_hadamard_matches_lycoris_diff_weight() -> None:
    """The stage's semantics are LyCORIS's: delta = gamma * (w1a @ w1b) * (w2a @ w2b)."""
    rng = np.random.default_rng(4)
    base = Base(rng, "F32", 21, 530)
    w1a, w1b, w2a, w2b = f32(rng, 21, 4), f32(rng, 4, 530), f32(rng, 21, 6), f32(rng, 6, 530)
    scale = 0.375  # exact in float32: folding it into w1a loses nothing
    delta = lycoris_loha.diff_weight(*(torch.from_numpy(f64(x)) for x in (w1b, w1a, w2b, w2a)), None, None,
                                     gamma=scale, backend="torch").numpy()
    stage = ("hadamard", ((w1a * np.float32(scale)).astype(np.float32), w1b, w2a, w2b), None, False)
    out, flag = merge(base.raw, "F32", "F32", [stage])
    mag = (np.abs(f64(w1a)) @ np.abs(f64(w1b))) * (np.abs(f64(w2a)) @ np.abs(f64(w2b))) * scale
    assert not flag
    assert_rounded_once(out, "F32", base.exact + delta, gamma(12) * (np.abs(base.exact) + mag))


# ----------------------------------------------------------------------------- LoKr

# (a, b, c, d) with a * c == ROWS and b * d == COLS: general, wide W2, c = 1, a = 1, d = 1, b = 1.
KRON_SHAPES = [(3, 1367, 13, 3), (13, 3, 3, 1367), (39, 4101, 1, 1), (1, 1, 39, 4101), (39, 3, 1, 1367),
               (1, 4101, 39, 1), (3, 4101, 13, 1)]


@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_kron_matches_float64(w_dtype: str, out_dtype: str) -> None:
    rng = np.random.default_rng([5, DTYPES.index(w_dtype), DTYPES.index(out_dtype)])
    base = Base(rng, w_dtype)
    part = kron_stage(rng, 3, 1367, 13, 3)
    out, flag = merge(base.raw, w_dtype, out_dtype, [part[0]])
    ref, err = merged_reference(base, [part])
    assert not flag
    assert_rounded_once(out, out_dtype, ref, err)


@pytest.mark.parametrize(("a", "b", "c", "d"), KRON_SHAPES)
def test_kron_factorizations(a: int, b: int, c: int, d: int) -> None:
    rng = np.random.default_rng([6, a, b, c, d])
    base = Base(rng, "BF16")
    part = kron_stage(rng, a, b, c, d)
    out, flag = merge(base.raw, "BF16", "F32", [part[0]])
    ref, err = merged_reference(base, [part])
    assert not flag
    assert_rounded_once(out, "F32", ref, err)


def test_kron_matches_lycoris_make_kron() -> None:
    rng = np.random.default_rng(7)
    base = Base(rng, "F16", 12, 35)
    W1, W2 = f32(rng, 4, 5), f32(rng, 3, 7)
    delta = lycoris_lokr.make_kron(torch.from_numpy(f64(W1)), torch.from_numpy(f64(W2)), 1.0).numpy()
    out, flag = merge(base.raw, "F16", "F32", [("kron", (W1, W2), None, False)])
    assert not flag
    assert_rounded_once(out, "F32", base.exact + delta, gamma(2) * (np.abs(base.exact) + np.abs(delta)))


def test_kron_row_offset_merges_a_block_of_rows() -> None:
    """(W1, W2, row_offset): rows [offset, offset + rows) of kron(W1, W2), for weights merged in row blocks."""
    rng = np.random.default_rng(8)
    W1, W2 = f32(rng, 6, 4), f32(rng, 5, 1031)  # kron: 30 x 4124
    full = np.kron(f64(W1), f64(W2))
    for r0, r1 in [(0, 30), (7, 23), (29, 30), (3, 3)]:
        base = Base(rng, "F32", r1 - r0, 4124)
        out, flag = merge(base.raw, "F32", "F32", [("kron", (W1, W2, r0), None, False)])
        ref = base.exact + full[r0:r1]
        assert not flag
        assert_rounded_once(out, "F32", ref, gamma(2) * (np.abs(base.exact) + np.abs(full[r0:r1])))


# ----------------------------------------------------------------------------- mixed stages and DoRA


def test_mixed_stages_in_one_job() -> None:
    rng = np.random.default_rng(9)
    base = Base(rng, "BF16")
    parts = [lowrank_stage(rng, ROWS, COLS, 4, explicit=False), hadamard_stage(rng, ROWS, COLS, 2, 6),
             kron_stage(rng, 13, 3, 3, 1367), lowrank_stage(rng, ROWS, COLS, 3, explicit=True),
             kron_stage(rng, 39, 1, 1, 4101), hadamard_stage(rng, ROWS, COLS, 5, 1)]
    ref, err = merged_reference(base, parts)
    for order in ([0, 1, 2, 3, 4, 5], [5, 2, 3, 0, 4, 1]):
        for out_dtype in DTYPES:
            out, flag = merge(base.raw, "BF16", out_dtype, [parts[i][0] for i in order])
            assert not flag
            assert_rounded_once(out, out_dtype, ref, err)


def test_explicit_lowrank_equals_plain_tuple() -> None:
    rng = np.random.default_rng(10)
    base = Base(rng, "F16")
    B, A = f32(rng, ROWS, 5), f32(rng, 5, COLS)
    plain, _ = merge(base.raw, "F16", "BF16", [(B, A, None, False)])
    explicit, _ = merge(base.raw, "F16", "BF16", [("lowrank", (B, A), None, False)])
    np.testing.assert_array_equal(plain, explicit)
    assert_rounded_once(plain, "BF16", base.exact + f64(B) @ f64(A),
                        gamma(7) * (np.abs(base.exact) + np.abs(f64(B)) @ np.abs(f64(A))))


@pytest.mark.parametrize("column_norm", [False, True], ids=["row_norm", "column_norm"])
@pytest.mark.parametrize("kind", ["hadamard", "kron"])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dora_after_lycoris_stage(kind: str, column_norm: bool, out_dtype: str) -> None:
    """A kron stage, then the DoRA stage (of `kind`) scales W + both deltas by m / ||W + its own delta||
    (PEFT's DoRA merge; the norm used to include the kron stage's delta)."""
    rng = np.random.default_rng([11, column_norm, DTYPES.index(out_dtype), kind == "kron"])
    base = Base(rng, "BF16")
    first = kron_stage(rng, 3, 1367, 13, 3)
    dora = hadamard_stage(rng, ROWS, COLS, 3, 4) if kind == "hadamard" else kron_stage(rng, 39, 3, 1, 1367)
    m = (rng.uniform(0.5, 2.0, COLS if column_norm else ROWS)).astype(np.float32)
    v, err_v = merged_reference(base, [first, dora])
    ref, err = dora_reference(v, err_v, m, column_norm, own=merged_reference(base, [dora]))
    out, flag = merge(base.raw, "BF16", out_dtype, [first[0], with_magnitude(dora[0], m, column_norm)])
    assert not flag
    assert_rounded_once(out, out_dtype, ref, err)


def test_stage_after_column_dora_sees_the_normalized_weight() -> None:
    rng = np.random.default_rng(12)
    base = Base(rng, "F32", 40, 1500)
    had = hadamard_stage(rng, 40, 1500, 2, 3)
    kron = kron_stage(rng, 8, 300, 5, 5)
    m = rng.uniform(0.5, 2.0, 1500).astype(np.float32)
    v, err_v = merged_reference(base, [had])
    normalized, err_n = dora_reference(v, err_v, m, column_norm=True)
    ref = normalized + kron[1]
    err = err_n + gamma(2) * (np.abs(normalized) + kron[2])
    out, flag = merge(base.raw, "F32", "F32", [with_magnitude(had[0], m, True), kron[0]])
    assert not flag
    assert_rounded_once(out, "F32", ref, err)


# ----------------------------------------------------------------------------- threads


def test_thread_counts_are_bit_identical() -> None:
    rng = np.random.default_rng(13)
    rows = 97  # 7 tiles of 15 rows, the last of 7
    jobs_spec = []
    for k, out_dtype in enumerate(DTYPES):
        base = Base(rng, DTYPES[(k + 1) % 3], rows, COLS)
        had = hadamard_stage(rng, rows, COLS, 3, 2)[0]
        kron = kron_stage(rng, 97, 3, 1, 1367)[0]
        low = lowrank_stage(rng, rows, COLS, 4, explicit=False)[0]
        stages = [kron, with_magnitude(had, rng.uniform(0.5, 2, COLS).astype(np.float32), True), low,
                  with_magnitude(kron_stage(rng, 1, 4101, 97, 1)[0], rng.uniform(0.5, 2, rows).astype(np.float32),
                                 False)]
        jobs_spec.append((f"job{k}", base.raw, base.dtype, out_dtype, stages))

    def run(threads: int) -> list[np.ndarray]:
        outs = [np.empty(w.shape, RAW[o]) for _, w, _, o, _ in jobs_spec]
        flags = _core.merge_batch([(n, w, wd, out, o, s) for (n, w, wd, o, s), out in zip(jobs_spec, outs)], threads)
        assert flags == [False] * len(jobs_spec)
        return outs

    one = run(1)
    for threads in (2, 3, 8):
        for a, b in zip(one, run(threads)):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


# ----------------------------------------------------------------------------- overflow and non-finite


def test_f16_overflow_is_flagged() -> None:
    rng = np.random.default_rng(14)
    base = Base(rng, "F32", 3, 20)
    B1 = np.full((3, 1), 300.0, np.float32)
    A1, B2, A2 = np.ones((1, 20), np.float32), np.ones((3, 1), np.float32), np.ones((1, 20), np.float32)
    A2[0, 7] = 300.0  # one column reaches 90000 + W: Inf in F16
    out, flag = merge(base.raw, "F32", "F16", [("hadamard", (B1, A1, B2, A2), None, False)])
    assert flag
    assert np.isinf(out[:, 7].astype(np.float32)).all() and np.isfinite(np.delete(out, 7, axis=1)).all()
    # the same merge in F32 is finite, and not flagged
    assert not merge(base.raw, "F32", "F32", [("hadamard", (B1, A1, B2, A2), None, False)])[1]


@pytest.mark.parametrize(("value", "flagged"), [(65519.0, False), (65520.0, True), (-65520.0, True)])
def test_kron_f16_overflow_threshold(value: float, flagged: bool) -> None:
    """65520 is the halfway point above F16's largest finite 65504: it and larger round to Inf."""
    zeros = np.zeros((4, 6), np.float32)
    W1, W2 = np.array([[value, 0.0], [0.0, 1.0]], np.float32), np.ones((2, 3), np.float32)
    out, flag = merge(encode(zeros, "BF16"), "BF16", "F16", [("kron", (W1, W2), None, False)])
    assert flag is flagged
    top = out[:2, :3].astype(np.float64)
    np.testing.assert_array_equal(top, np.float16(value).astype(np.float64) if not flagged
                                  else np.copysign(np.inf, value))


def test_bf16_overflow_and_nan_are_flagged() -> None:
    base = np.zeros((6, 10), np.float32)
    # 3.39e38 is below BF16's largest finite value (about 3.3895e38 rounds to it); 3.4e38 rounds to Inf
    W1, W2 = np.array([[3.4e38], [3.39e38]], np.float32), np.ones((3, 10), np.float32)
    out, flag = merge(base, "F32", "BF16", [("kron", (W1, W2), None, False)])
    assert flag and (out[:3] == 0x7F80).all() and np.isfinite(decode(out[3:], "BF16")).all()
    nan_base = base.copy()
    nan_base[5, 9] = np.nan
    B = np.ones((6, 1), np.float32)
    _, flag = merge(nan_base, "F32", "F32", [("hadamard", (B, np.ones((1, 10), np.float32), B,
                                                            np.ones((1, 10), np.float32)), None, False)])
    assert flag


# ----------------------------------------------------------------------------- errors


def factors_loha(rows: int = 8, cols: int = 12, r1: int = 2, r2: int = 3) -> tuple[np.ndarray, ...]:
    return (np.ones((rows, r1), np.float32), np.ones((r1, cols), np.float32),
            np.ones((rows, r2), np.float32), np.ones((r2, cols), np.float32))


def run_error_job(stages: list) -> None:
    merge(np.zeros((8, 12), np.float32), "F32", "F32", stages)


@pytest.mark.parametrize(("factors", "shapes"), [
    (factors_loha(rows=9), ["B1 (9, 2)", "B2 (9, 3)"]),
    (factors_loha(cols=13), ["A1 (2, 13)", "A2 (3, 13)"]),
    ((np.ones((8, 2), np.float32), np.ones((3, 12), np.float32), *factors_loha()[2:]), ["B1 (8, 2)", "A1 (3, 12)"]),
    ((*factors_loha()[:2], np.ones((8, 3), np.float32), np.ones((4, 12), np.float32)), ["B2 (8, 3)", "A2 (4, 12)"]),
])
def test_hadamard_bad_shapes(factors: tuple, shapes: list[str]) -> None:
    with pytest.raises(ShapeMismatchError, match="LoHa factors") as info:
        run_error_job([("hadamard", factors, None, False)])
    msg = str(info.value)
    assert JOB in msg and "base weight (8, 12)" in msg and all(s in msg for s in shapes), msg


@pytest.mark.parametrize("factors", [
    (np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)),  # 6 x 12
    (np.ones((4, 3), np.float32), np.ones((2, 5), np.float32)),  # 8 x 15
    (np.ones((8, 12), np.float32), np.ones((1, 1), np.float32), 1),  # offset 1 + 8 rows > 8
    (np.ones((8, 12), np.float32), np.ones((1, 1), np.float32), -1),
])
def test_kron_bad_shapes(factors: tuple) -> None:
    with pytest.raises(ShapeMismatchError, match="LoKr factors") as info:
        run_error_job([("kron", factors, None, False)])
    msg = str(info.value)
    assert JOB in msg and "base weight (8, 12)" in msg and str(factors[0].shape) in msg, msg


def test_kron_rows_that_overflow_64_bits_are_refused() -> None:
    """24 * (2**61 + 1) / 3 wraps to 8 in 64-bit arithmetic: the shapes must still be refused."""
    c = (2**61 + 1) // 3
    W1, W2 = np.empty((24, 0), np.float32), np.empty((c, 0), np.float32)
    with pytest.raises(ShapeMismatchError, match=f"{JOB}: LoKr factors W1 \\(24, 0\\) and W2 \\({c}, 0\\)"):
        merge(np.zeros((8, 0), np.float32), "F32", "F32", [("kron", (W1, W2), None, False)])


def test_factors_must_be_2d_float32() -> None:
    B1, A1, B2, A2 = factors_loha()
    with pytest.raises(ShapeMismatchError, match=f"{JOB}: LoHa A2 \\(36,\\) must be 2-D"):
        run_error_job([("hadamard", (B1, A1, B2, A2.reshape(-1)), None, False)])
    with pytest.raises(DtypeError, match=f"{JOB}: LoKr W2 must be a float32"):
        run_error_job([("kron", (np.ones((8, 3), np.float32), np.ones((1, 4))), None, False)])


@pytest.mark.parametrize(("stage", "pattern"), [
    (("lokr", (np.ones((8, 1), np.float32), np.ones((1, 12), np.float32)), None, False), "unknown stage kind 'lokr'"),
    (("", (), None, False), "unknown stage kind ''"),
    (("hadamard", factors_loha()[:3], None, False), "hadamard stage takes factors \\(B1, A1, B2, A2\\), got 3"),
    (("kron", (np.ones((8, 12), np.float32),), None, False), "kron stage takes factors"),
    (("lowrank", factors_loha(), None, False), "lowrank stage takes factors \\(B, A\\), got 4"),
    (("kron", np.ones((8, 12), np.float32), None, False), "kron stage factors must be a tuple or list"),
    (("hadamard", factors_loha(), None), "a stage must be"),
])
def test_bad_stage_kinds_and_arity(stage: tuple, pattern: str) -> None:
    with pytest.raises(LorafuseValueError, match=pattern) as info:
        run_error_job([stage])
    assert str(info.value).startswith(JOB + ":")


def test_dora_magnitude_must_fit_after_lycoris_stage() -> None:
    with pytest.raises(ShapeMismatchError, match=f"{JOB}: DoRA magnitude \\(8,\\) does not fit"):
        run_error_job([("hadamard", factors_loha(), np.ones(8, np.float32), True)])  # columns: needs 12
    with pytest.raises(ShapeMismatchError, match=f"{JOB}: DoRA magnitude \\(12,\\) does not fit"):
        run_error_job([("kron", (np.ones((2, 3), np.float32), np.ones((4, 4), np.float32)), np.ones(12, np.float32),
                        False)])


def test_bad_stage_leaves_output_untouched() -> None:
    """Validation happens before any kernel runs: a bad second job writes nothing in the first."""
    w = np.ones((8, 12), np.float32)
    good_out = np.full((8, 12), 7.0, np.float32)
    bad_out = np.full((8, 12), 7.0, np.float32)
    jobs = [("good", w, "F32", good_out, "F32", [("hadamard", factors_loha(), None, False)]),
            ("bad", w, "F32", bad_out, "F32", [("kron", (np.ones((3, 3), np.float32), np.ones((3, 4), np.float32)),
                                                None, False)])]
    with pytest.raises(ShapeMismatchError, match="bad: LoKr factors W1 \\(3, 3\\) and W2 \\(3, 4\\)"):
        _core.merge_batch(jobs, 2)
    assert (good_out == 7.0).all() and (bad_out == 7.0).all()
