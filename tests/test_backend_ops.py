"""Every backend operation on every available backend against 'reference' (numpy float64), in the
shape of ggml's test-backend-ops: one case per (op, shape, dtype, options), the backend's result
compared with the reference's by a normalized error, NMSE = ||x - ref||^2 / ||ref||^2, below the
bound the table TOL states for that op and dtype.

Where a backend is randomized (factored_svd in mode 'randomized' / 'auto', dense_svd above its exact
threshold, extract_svd), the reference still returns the optimum: the singular values are compared
by NMSE and the error ||D - B A||_F against the Eckart-Young optimum within the factor EY_FACTOR.
Test matrices have a known, well separated spectrum (D = U diag(s) V^T), so singular vectors are
determined and factors can be compared too. Conversions are compared bit for bit (NaN payloads
aside: the core's F16C instructions keep them, its scalar code does not).

The reference is itself checked against values written out by hand (dtype corner cases), and the
whole seam end to end: a resize and a similarity run with LORAFUSE_BACKEND=reference give the cpu's
results, and the reference backend is seen doing the work.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import lorafuse
from lorafuse import _validate
from lorafuse.backends import (
    ConvertJob,
    DenseJob,
    ExtractJob,
    FactorJob,
    FactorListJob,
    FactorPair,
    FactorStage,
    InnerJob,
    LowRankStage,
    MergeJob,
    SketchJob,
    SketchTerm,
    TaskMergeJob,
    available_backends,
    get_backend,
    native,
)
from lorafuse.backends import cuda as cuda_backend
from lorafuse.errors import DeviceError, LorafuseValueError, NonFiniteError, ShapeMismatchError
from lorafuse.ops.rank import RankRule
from lorafuse.ops.resize import resize

# ---------------------------------------------------------------- thresholds (one table)

# NMSE bounds per (op, dtype). For merge_batch the dtype is the output's (decoding the input is exact);
# for extract_svd the weights'. A bound is what the backend's arithmetic allows (float32 work, one
# rounding to the output), with about 100x margin over what the cpu backend shows today.
TOL: dict[tuple[str, str], float] = {
    ("merge_batch", "F32"): 1e-12,      # float32 accumulation vs float64
    ("merge_batch", "F16"): 3e-8,       # a last-bit flip of a few values (2^-11 relative each)
    ("merge_batch", "BF16"): 1e-6,      # the same at 2^-8
    ("frobenius_sq", "F32"): 1e-12,     # relative, squared
    ("inner", "F32"): 1e-12,            # |x - ref|^2 / (||D1||^2 ||D2||^2): cancellation-proof
    ("svd_s", "F32"): 1e-12,            # exact paths: singular values
    ("svd_product", "F32"): 1e-10,      # exact paths: B A against the reference's B A
    ("svd_factors", "F32"): 1e-8,       # exact paths: B and A themselves (separated spectrum)
    ("svd_s_randomized", "decaying"): 1e-12,  # randomized paths: the k leading singular values
    ("svd_s_randomized", "flat"): 1e-6,       # (by the test matrix's spectrum)
    ("task_merge", "F32"): 1e-12,       # float64 merge rounded once (an FMA may flip the last bit)
    ("extract_s", "F32"): 1e-12,        # the k leading singular values of D = ft - base (randomized)
    ("extract_s", "F64"): 1e-12,
    ("extract_s", "F16"): 1e-12,
    ("extract_s", "BF16"): 1e-12,
    ("extract_s", "F8_E4M3"): 1e-5,     # 3 mantissa bits: D is mostly rounding noise, a flat spectrum
    ("extract_s", "F8_E5M2"): 1e-3,     # 2 mantissa bits: flatter still
    ("extract_frob", "any"): 1e-12,     # ||D||_F^2, relative, squared
    ("sketch_fold", "any"): 1e-11,      # float32 products and sums over a job's terms vs float64
}
# ||D - B A||_F <= EY_FACTOR * the optimum (plus 1e-6 ||D||_F for float32 rounding), randomized paths.
EY_FACTOR = {"decaying": 1.001, "flat": 1.02}

RAW_DTYPES = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F64")
OUT_DTYPES = ("F32", "F16", "BF16")
# 'cuda' is always a case: it runs where this build has the CUDA backend and a GPU is present, and
# skips with the reason (no module, no driver, no device) elsewhere.
_CUDA_MISSING = "" if "cuda" in available_backends() else cuda_backend.unavailable()
BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(bool(_CUDA_MISSING), reason=_CUDA_MISSING))]
RUNNABLE = [n for n in ("cpu", "cuda") if n in available_backends()]
REF = get_backend("reference")


def nmse(x: np.ndarray, ref: np.ndarray) -> float:
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert x.shape == ref.shape, f"shape {x.shape} != reference {ref.shape}"
    den = float(np.sum(ref**2))
    num = float(np.sum((x - ref) ** 2))
    return num / den if den > 0 else num


def seed_of(*key: object) -> int:
    """A seed from a test's parameters, the same in every process (str hashes are salted)."""
    return zlib.crc32(repr(key).encode())


def same_bits(x: np.ndarray, ref: np.ndarray, dtype: str) -> None:
    """Equal bit patterns of raw `dtype` elements, except that any NaN matches any NaN (same positions)."""
    assert x.dtype == ref.dtype and x.shape == ref.shape
    x, ref = x.reshape(-1), ref.reshape(-1)
    xn, rn = np.isnan(REF.to_float32(x, dtype)), np.isnan(REF.to_float32(ref, dtype))
    assert np.array_equal(xn, rn), "NaN at other positions"
    as_int = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]
    bad = np.nonzero((x.view(as_int) != ref.view(as_int)) & ~rn)[0]
    assert bad.size == 0, f"{bad.size} values differ, first at {bad[0]}: {x[bad[0]]!r} vs {ref[bad[0]]!r}"


# ---------------------------------------------------------------- test data


def orth(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, m)))
    return q


def spectrum(kind: str, m: int) -> np.ndarray:
    """Singular values: 'decaying' 3 * 0.7^i (gaps of 30%), 'flat' slowly decaying (a hard case)."""
    i = np.arange(m, dtype=np.float64)
    return 3.0 * 0.7**i if kind == "decaying" else 1.0 / (1.0 + 0.05 * i)


def dense_matrix(rng: np.random.Generator, out: int, in_: int, kind: str = "decaying") -> np.ndarray:
    m = min(out, in_)
    return (orth(rng, out, m) * spectrum(kind, m)) @ orth(rng, in_, m).T


def factors(rng: np.random.Generator, out: int, in_: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """B (out x r), A (r x in) float32 with B A of a separated spectrum, mixed by a random invertible r x r."""
    m = min(out, in_, r)
    u, v = orth(rng, out, m), orth(rng, in_, m)
    s = spectrum("decaying", m)
    mix = orth(rng, r, r) * rng.uniform(0.5, 2.0, r)  # Q diag(d)
    b = np.zeros((out, r))
    a = np.zeros((r, in_))
    b[:, :m], a[:m] = u * s, v.T
    return (b @ mix).astype(np.float32), (np.linalg.inv(mix) @ a).astype(np.float32)


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """Raw elements of `dtype` near the float32 values x (test data only: need not round to nearest)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "F32":
        return x
    if dtype == "F64":
        return x.astype(np.float64)
    if dtype == "F16":
        return x.astype(np.float16)
    if dtype == "BF16":
        return (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation
    if dtype == "F8_E5M2":
        return (x.astype(np.float16).view(np.uint16) >> 8).astype(np.uint8)  # the top byte of a binary16
    # F8_E4M3: the nearest of the finite codes (decoded by hand: 2^(e-7) (1 + m/8), subnormals m 2^-9)
    codes = np.arange(256)
    e, m = (codes >> 3) & 0xF, codes & 7
    val = np.where(e == 0, m * 2.0**-9, (1 + m / 8) * 2.0 ** (e - 7.0)) * np.where(codes >> 7, -1.0, 1.0)
    finite = ~((e == 15) & (m == 7))
    codes, val = codes[finite], val[finite]
    return codes[np.argmin(np.abs(val[None, :] - x.reshape(-1, 1)), axis=1)].astype(np.uint8).reshape(x.shape)


# ---------------------------------------------------------------- get_backend


def test_there_is_a_backend_to_compare():
    assert {"cpu", "reference"} <= set(available_backends())


def test_cuda_where_it_cannot_run_says_why_and_what_to_do():
    if "cuda" in available_backends():
        assert get_backend("cuda").name == "cuda"
        assert cuda_backend.unavailable() == ""
        return
    why = cuda_backend.unavailable()
    assert why
    with pytest.raises(DeviceError) as e:
        get_backend("cuda")
    assert str(e.value) == why
    # either the build has no CUDA module, or it has one and this machine no GPU / driver
    assert "no CUDA backend" in why or "device" in why.lower() or "driver" in why.lower()
    assert "--device cpu" in why


@pytest.mark.parametrize("name", ["tpu", "", "CPU2", "reference "])
def test_unknown_names_are_refused(name):
    if name.strip().lower() in ("cpu", "reference"):
        assert get_backend(name).name == name.strip().lower()
        return
    with pytest.raises(LorafuseValueError, match="unknown backend"):
        get_backend(name)


def test_a_name_must_be_a_string():
    with pytest.raises(LorafuseValueError, match="backend must be a name"):
        get_backend(3)  # type: ignore[arg-type]


def test_environment_chooses_auto(monkeypatch):
    monkeypatch.delenv("LORAFUSE_BACKEND", raising=False)
    assert get_backend().name == "cpu"
    monkeypatch.setenv("LORAFUSE_BACKEND", "reference")
    assert get_backend().name == "reference"
    assert get_backend("cpu").name == "cpu"  # a name asked for is not overridden
    monkeypatch.setenv("LORAFUSE_BACKEND", "bogus")
    with pytest.raises(LorafuseValueError, match="unknown backend 'bogus'"):
        get_backend()


def test_limits_of_validate_are_the_cores():
    assert (_validate.MAX_THREADS, _validate.MAX_RANK, _validate.MAX_OVERSAMPLE, _validate.MAX_POWER_ITERS) == (
        native.core.MAX_THREADS, native.core.MAX_RANK, native.core.MAX_OVERSAMPLE, native.core.MAX_POWER_ITERS)


# ---------------------------------------------------------------- dtype conversion


def test_reference_decodes_corner_values_by_hand():
    """Values written out from the format definitions, not from any implementation."""
    cases = {
        "BF16": ([0x3F80, 0xC000, 0x7F7F, 0x0001, 0x7F80], [1.0, -2.0, 3.3895313892515355e38, 9.183549615799121e-41,
                                                              np.inf]),
        "F16": ([0x3C00, 0x7BFF, 0x0001, 0xFC00], [1.0, 65504.0, 2.0**-24, -np.inf]),
        "F8_E4M3": ([0x38, 0x7E, 0x01, 0x08, 0xBE], [1.0, 448.0, 2.0**-9, 2.0**-6, -1.75]),
        "F8_E5M2": ([0x3C, 0x7B, 0x01, 0x7C, 0xC0], [1.0, 57344.0, 2.0**-16, np.inf, -2.0]),
    }
    for dtype, (bits, want) in cases.items():
        raw = np.asarray(bits, dtype=np.uint8 if dtype.startswith("F8") else np.uint16)
        if dtype == "F16":
            raw = raw.view(np.float16)
        np.testing.assert_array_equal(REF.to_float32(raw, dtype), np.asarray(want, dtype=np.float32))
    assert np.isnan(REF.to_float32(np.asarray([0x7F, 0xFF], dtype=np.uint8), "F8_E4M3")).all()
    # F32 -> BF16 / F16 rounding: ties to even, overflow to Inf at the halfway point
    x = np.asarray([1.0 + 2**-8, 1.0 + 3 * 2**-8, 65520.0, 65519.996, 3.3961775e38], dtype=np.float32)
    assert REF.from_float32(x[:2], "BF16").tolist() == [0x3F80, 0x3F82]
    assert REF.from_float32(x[2:4], "F16").view(np.uint16).tolist() == [0x7C00, 0x7BFF]
    assert REF.from_float32(x[4:], "BF16").tolist() == [0x7F80]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", RAW_DTYPES)
def test_to_float32(backend, dtype):
    be = get_backend(backend)
    rng = np.random.default_rng(1)
    if dtype == "F8_E4M3" or dtype == "F8_E5M2":
        raw = np.concatenate([np.arange(256, dtype=np.uint8), rng.integers(0, 256, 1001, dtype=np.uint8)])
    elif dtype in ("F16", "BF16"):
        raw = np.concatenate([np.arange(65536), rng.integers(0, 65536, 1001)]).astype(np.uint16)
        raw = raw.view(np.float16) if dtype == "F16" else raw
    elif dtype == "F32":
        raw = rng.integers(0, 2**32, 70001, dtype=np.uint64).astype(np.uint32).view(np.float32)
    else:
        raw = np.concatenate([rng.standard_normal(5000) * 10.0 ** rng.integers(-45, 45, 5000),
                              [np.inf, -np.inf, np.nan, 1e300, -1e-300, 3.4028235677973366e38]])
    same_bits(be.to_float32(raw, dtype), REF.to_float32(raw, dtype), "F32")
    matrix = raw[:1000].reshape(10, 100)  # any shape, kept
    same_bits(be.to_float32(matrix, dtype), REF.to_float32(matrix, dtype), "F32")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_from_float32(backend, dtype):
    be = get_backend(backend)
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2**32, 100003, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([bits.view(np.float32), rng.standard_normal(1001).astype(np.float32),
                        np.asarray([65504, 65519.996, 65520, 3.3961775e38, 2**-25, 2**-24 * 1.5], np.float32)])
    got, want = be.from_float32(x, dtype), REF.from_float32(x, dtype)
    assert got.dtype == want.dtype
    same_bits(got, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conversion_errors_are_the_same(backend):
    for be in (get_backend(backend), REF):
        with pytest.raises(lorafuse.DtypeError, match="unsupported dtype 'I8'"):
            be.to_float32(np.zeros(3, np.int8), "I8")
        with pytest.raises(lorafuse.DtypeError, match="cannot write dtype F64"):
            be.from_float32(np.zeros(3, np.float32), "F64")
        with pytest.raises(lorafuse.DtypeError, match="item size"):
            be.to_float32(np.zeros(3, np.float32), "BF16")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", RAW_DTYPES)
def test_convert_into(backend, dtype):
    """Raw 2-D tensors widened into slices of caller's arrays, as given or transposed (the AVX-512 core moves
    full 16 x 16 BF16 tiles through registers, the rest element by element): the bits of to_float32 in numpy,
    and nothing outside each output slice written."""
    be = get_backend(backend)
    rng = np.random.default_rng(3)
    itemsize = {"F8_E4M3": 1, "F8_E5M2": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}[dtype]
    shapes = [(5632, 16), (16, 2048), (37, 53), (16, 16), (1, 40), (40, 1), (48, 33), (0, 7)]
    raws = [rng.integers(0, 256, (r, c * itemsize), dtype=np.uint8).view(
        {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.float64}[itemsize]) for r, c in shapes]
    if dtype == "F64":
        raws = [rng.standard_normal(r.shape) * 1e3 for r in raws]
    outs = [np.full((sum(r.shape[1] for r in raws) + 3, 5632), 7.0, np.float32) for _ in range(2)]
    jobs, want = [], []
    for i, raw in enumerate(raws):
        transpose = i % 2 == 0
        rows, cols = raw.shape[::-1] if transpose else raw.shape
        start = 1 + sum(r.shape[1] for r in raws[:i])  # a block of rows inside a larger array, as in a stack
        out = outs[0][start:start + rows, :cols] if cols == 5632 else np.empty((rows, cols), np.float32)
        jobs.append(ConvertJob(raw, dtype, out, transpose))
        ref = REF.to_float32(raw, dtype)
        want.append(np.ascontiguousarray(ref.T) if transpose else ref)
    be.convert_into(jobs, 2)
    for job, ref in zip(jobs, want):
        same_bits(job.out, ref, "F32")
    assert (outs[0][0] == 7.0).all() and (outs[0][-3:] == 7.0).all()  # rows around the slices are untouched


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_convert_into_checks_every_job_first(backend):
    be = get_backend(backend)
    raw = np.arange(12, dtype=np.uint16).reshape(3, 4)
    good = np.full((4, 3), -1.0, np.float32)
    for bad, error, match in [
        (ConvertJob(raw, "BF16", np.empty((3, 4), np.float32), True), lorafuse.ShapeMismatchError, "does not fit"),
        (ConvertJob(raw, "BF16", np.empty((4, 3), np.float64), True), lorafuse.DtypeError, "float32"),
        (ConvertJob(raw.reshape(12), "BF16", np.empty(12, np.float32), False), lorafuse.ShapeMismatchError, "2-D"),
        (ConvertJob(raw, "F32", np.empty((4, 3), np.float32), True), lorafuse.DtypeError, "item size"),
    ]:
        with pytest.raises(error, match=match):
            be.convert_into([ConvertJob(raw, "BF16", good, True), bad], 1)
        assert (good == -1.0).all()  # the good job before the bad one was not run either


# ---------------------------------------------------------------- sketch_fold

# (out, in, ranks of the job's terms, w): ragged edges (rows, columns and ranks that are no multiple of
# a vector), a rank past four vectors (r = 70), sketches wider than a register block (w = 50, 150), and a
# job whose rows and columns span more than one of the kernels' chunks of the accumulator (1100 x 1900).
SKETCH_SHAPES = {
    "tiny": (5, 3, (1,), 1),
    "ragged": (37, 53, (5, 16, 20), 7),
    "tinyllama": (256, 2048, (16, 16), 36),
    "wide": (96, 80, (8, 70), 50),
    "oversampled": (64, 48, (16,), 150),
    "chunks": (1100, 1900, (4, 12), 9),
}


def sketch_data(rng: np.random.Generator, out: int, in_: int, ranks: tuple[int, ...], w: int, dtypes: tuple[str, ...]):
    """Terms (raw A, raw B of the given dtypes, coef), the float64 factors they decode to, and operands."""
    terms, decoded = [], []
    for i, r in enumerate(ranks):
        a_dt, b_dt = dtypes[i % len(dtypes)], dtypes[(i + 1) % len(dtypes)]
        a = encode(rng.standard_normal((r, in_)) * 0.5, a_dt)
        b = encode(rng.standard_normal((out, r)) * 0.5, b_dt)
        c = float(rng.uniform(-2, 2))
        terms.append(SketchTerm(a, a_dt, b, b_dt, c))
        decoded.append((REF.to_float32(a, a_dt).astype(np.float64), REF.to_float32(b, b_dt).astype(np.float64),
                        float(np.float32(c))))
    x_range = rng.standard_normal((in_, w)).astype(np.float32)
    x_corange = rng.standard_normal((out, w)).astype(np.float32)
    return terms, decoded, x_range, x_corange


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize("shape", list(SKETCH_SHAPES))
@pytest.mark.parametrize("dtypes", [("BF16",), ("F16",), ("F32",), ("F64",), ("F8_E4M3",), ("BF16", "F32", "F16")])
def test_sketch_fold(backend, shape, dtypes):
    """acc += sum_i c_i B_i (A_i X) and sum_i c_i A_i^T (B_i^T X) from the factors as stored, against numpy
    float64 on the decoded factors, added to what acc held."""
    be = get_backend(backend)
    out, in_, ranks, w = SKETCH_SHAPES[shape]
    rng = np.random.default_rng(zlib.crc32(f"{shape}{dtypes}".encode()))
    terms, decoded, xr, xc = sketch_data(rng, out, in_, ranks, w, dtypes)
    start_r, start_c = rng.standard_normal((out, w)), rng.standard_normal((in_, w))
    acc_r, acc_c = start_r.copy(), start_c.copy()
    be.sketch_fold([SketchJob(terms, "range", xr, acc_r), SketchJob(terms, "corange", xc, acc_c)], 2)
    want_r = sum(c * (b @ (a @ xr.astype(np.float64))) for a, b, c in decoded)
    want_c = sum(c * (a.T @ (b.T @ xc.astype(np.float64))) for a, b, c in decoded)
    assert nmse(acc_r - start_r, want_r) < TOL[("sketch_fold", "any")]
    assert nmse(acc_c - start_c, want_c) < TOL[("sketch_fold", "any")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sketch_fold_is_the_same_for_any_thread_count(backend):
    """One job per thread: a job's sums keep their order, so the bits do not depend on the threads."""
    be = get_backend(backend)
    rng = np.random.default_rng(11)
    terms, _, xr, xc = sketch_data(rng, 300, 200, (16, 8, 16), 26, ("BF16",))
    results = []
    for threads in (1, 2, 3):
        jobs = [SketchJob(terms, side, x, np.zeros((300 if side == "range" else 200, 26)))
                for side, x in (("range", xr), ("corange", xc), ("range", xr))]
        be.sketch_fold(jobs, threads)
        results.append([j.acc for j in jobs])
    for got in results[1:]:
        for x, y in zip(got, results[0]):
            assert np.array_equal(x, y)


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_sketch_fold_checks_every_job_first(backend):
    """A job the backend refuses leaves every job untouched, with the error naming the job, the term and the
    shapes."""
    be = get_backend(backend)
    rng = np.random.default_rng(5)
    terms, _, xr, _ = sketch_data(rng, 12, 10, (4,), 3, ("BF16",))
    good = np.zeros((12, 3))
    a, b = terms[0].a, terms[0].b
    for bad, error, match in [
        (SketchJob([SketchTerm(a, "BF16", b[:11], "BF16", 1.0)], "range", xr, np.zeros((12, 3))),
         ShapeMismatchError, r"term 0.*\(11, 4\)"),
        (SketchJob(terms, "range", xr, np.zeros((12, 3), np.float32)), lorafuse.DtypeError, "float64"),
        (SketchJob(terms, "range", xr.astype(np.float64), np.zeros((12, 3))), lorafuse.DtypeError, "float32"),
        (SketchJob(terms, "range", xr, np.zeros((12, 4))), ShapeMismatchError, "columns"),
        (SketchJob(terms, "corange", xr, np.zeros((12, 3))), ShapeMismatchError, "do not fit"),
        (SketchJob(terms, "sideways", xr, np.zeros((12, 3))), LorafuseValueError, "side"),
        (SketchJob([SketchTerm(a, "F32", b, "BF16", 1.0)], "range", xr, np.zeros((12, 3))), lorafuse.DtypeError,
         "item size"),
        (SketchJob([SketchTerm(a, "BF16", b, "BF16", 1e39)], "range", xr, np.zeros((12, 3))), LorafuseValueError,
         "coefficient"),
    ]:
        with pytest.raises(error, match=match):
            be.sketch_fold([SketchJob(terms, "range", xr, good), bad], 1)
        assert (good == 0).all()
    frozen = np.zeros((12, 3))
    frozen.flags.writeable = False
    with pytest.raises(LorafuseValueError, match="writable"):
        be.sketch_fold([SketchJob(terms, "range", xr, frozen)], 1)


# ---------------------------------------------------------------- merge_batch

MERGE_SHAPES = {"tall": (96, 40), "wide": (24, 200), "conv": (32, 144), "rank1": (17, 9)}


def merge_stages(rng: np.random.Generator, rows: int, cols: int, which: str) -> list:
    f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    r = 1 if rows < 20 else 4
    if which == "lowrank":
        return [LowRankStage(f(rows, r), f(r, cols))]
    stages = [LowRankStage(f(rows, r), f(r, cols)),
              FactorStage("hadamard", (f(rows, 2), f(2, cols), f(rows, 3), f(3, cols)))]
    # a LoKr cut into rows: rows 8.. of kron(W1, W2) with W1 (a x b), W2 (c x d), b d = cols
    d = next(x for x in (8, 4, 3, 2, 1) if cols % x == 0)
    c = 4
    a = (rows + 8 + c - 1) // c
    stages.append(FactorStage("kron", (f(a, cols // d), f(c, d), 8)))
    stages.append(LowRankStage(f(rows, 2), f(2, cols), (np.abs(f(rows)) + 1.0).astype(np.float32), False))
    stages.append(FactorStage("lowrank", (f(rows, 2), f(2, cols)), (np.abs(f(cols)) + 1.0).astype(np.float32), True))
    return stages


def run_merge(be, w_raw: np.ndarray, w_dtype: str, out_dtype: str, stages: list) -> tuple[np.ndarray, bool]:
    out = np.zeros(w_raw.shape, dtype={"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[out_dtype])
    (flag,) = be.merge_batch([MergeJob("m", w_raw, w_dtype, out, out_dtype, stages)])
    return REF.to_float32(out, out_dtype), flag


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(MERGE_SHAPES))
@pytest.mark.parametrize("w_dtype", RAW_DTYPES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("which", ["lowrank", "all"])
def test_merge_batch(backend, shape, w_dtype, out_dtype, which):
    rng = np.random.default_rng(seed_of(shape, w_dtype, out_dtype, which))
    rows, cols = MERGE_SHAPES[shape]
    w_raw = encode(rng.standard_normal((rows, cols)), w_dtype)
    stages = merge_stages(rng, rows, cols, which)
    got, flag = run_merge(get_backend(backend), w_raw, w_dtype, out_dtype, stages)
    want, ref_flag = run_merge(REF, w_raw, w_dtype, out_dtype, stages)
    assert flag == ref_flag is False
    assert nmse(got, want) < TOL[("merge_batch", out_dtype)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_batch_flags_and_batches(backend):
    """Several jobs in one call (in place, one output aliasing nothing else), with overflow and NaN flags."""
    be = get_backend(backend)
    rng = np.random.default_rng(3)
    w = np.full((8, 16), 60000.0, dtype=np.float32)
    big = [LowRankStage(np.full((8, 1), 100.0, np.float32), np.full((1, 16), 100.0, np.float32))]
    nan_b = np.ones((8, 1), np.float32)
    nan_b[3, 0] = np.nan
    small = [LowRankStage(rng.standard_normal((8, 2)).astype(np.float32),
                          rng.standard_normal((2, 16)).astype(np.float32))]
    jobs = lambda: [  # noqa: E731
        MergeJob("over_f16", w, "F32", np.zeros((8, 16), np.float16), "F16", big),
        MergeJob("fine_f32", w, "F32", np.zeros((8, 16), np.float32), "F32", big),
        MergeJob("nan", w, "F32", np.zeros((8, 16), np.float32), "F32",
                 [LowRankStage(nan_b, np.ones((1, 16), np.float32))]),
        MergeJob("ok_bf16", w, "F32", np.zeros((8, 16), np.uint16), "BF16", small),
    ]
    got_jobs, want_jobs = jobs(), jobs()
    assert be.merge_batch(got_jobs) == REF.merge_batch(want_jobs) == [True, False, True, False]
    for g, r in zip(got_jobs, want_jobs):
        same_bits(g.out, r.out, g.out_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_batch_shape_errors_are_the_same(backend):
    w = np.zeros((4, 6), np.float32)
    bad = [LowRankStage(np.zeros((5, 2), np.float32), np.zeros((2, 6), np.float32))]
    for be in (get_backend(backend), REF):
        with pytest.raises(ShapeMismatchError, match=r"m: .*B \(5, 2\).*A \(2, 6\)"):
            be.merge_batch([MergeJob("m", w, "F32", np.zeros((4, 6), np.float32), "F32", bad)])


# ---------------------------------------------------------------- norms


@pytest.mark.parametrize("backend", BACKENDS)
def test_frobenius_sq_and_inner(backend):
    be = get_backend(backend)
    rng = np.random.default_rng(4)
    shapes = [(40, 30, 1, 3), (300, 40, 12, 5), (40, 300, 12, 7), (32, 144, 8, 8), (20, 12, 16, 2)]
    pairs = [FactorPair(*factors(rng, o, i, r)) for o, i, r, _ in shapes]
    got, want = be.frobenius_sq(pairs), REF.frobenius_sq(pairs)
    assert nmse(got, want) < TOL[("frobenius_sq", "F32")]
    jobs = [InnerJob(*factors(rng, o, i, r1), *factors(rng, o, i, r2)) for o, i, r1, r2 in shapes]
    got, want = be.inner(jobs), REF.inner(jobs)
    scale = np.sqrt(REF.frobenius_sq([FactorPair(j.b1, j.a1) for j in jobs])
                    * REF.frobenius_sq([FactorPair(j.b2, j.a2) for j in jobs]))
    assert float(np.max(((got - want) / scale) ** 2)) < TOL[("inner", "F32")]
    same = [InnerJob(p.b, p.a, p.b, p.a) for p in pairs]  # <D, D> = ||D||^2
    np.testing.assert_allclose(be.inner(same), REF.frobenius_sq(pairs), rtol=1e-6)


# ---------------------------------------------------------------- factored / dense SVD

# name: (out, in, R, k)
SVD_SHAPES = {
    "rank1": (40, 30, 1, 1),
    "tall": (300, 40, 12, 5),
    "wide": (40, 300, 12, 5),
    "conv": (32, 144, 8, 4),         # a conv weight (32, 16, 3, 3) flattened
    "k>=R": (50, 40, 4, 8),          # fewer singular values than asked: zero padding
    "R>=min": (20, 12, 16, 6),       # the factored path falls back to a dense SVD
    "big": (200, 160, 48, 6),        # randomized where allowed (k + oversample < R)
}


def check_exact(got, want, d: np.ndarray) -> None:
    assert got.b.shape == want.b.shape and got.a.shape == want.a.shape and got.s.shape == want.s.shape
    assert nmse(got.s, want.s) < TOL[("svd_s", "F32")]
    assert nmse(got.b @ got.a, want.b @ want.a) < TOL[("svd_product", "F32")]
    assert nmse(got.b, want.b) < TOL[("svd_factors", "F32")]
    assert nmse(got.a, want.a) < TOL[("svd_factors", "F32")]


def check_randomized(got, want, d: np.ndarray, k: int, kind: str, s_tol: float) -> None:
    """Leading singular values close to the optimum's (NMSE below s_tol), error within EY_FACTOR[kind]
    of the optimum."""
    assert got.b.shape == want.b.shape and got.a.shape == want.a.shape and got.s.shape == want.s.shape
    kk = min(k, len(want.s))
    assert nmse(got.s[:kk], want.s[:kk]) < s_tol
    s_all = np.linalg.svd(d, compute_uv=False)
    optimum = float(np.sqrt(np.sum(s_all[k:] ** 2)))
    err = float(np.linalg.norm(d - got.b.astype(np.float64) @ got.a.astype(np.float64)))
    ref_err = float(np.linalg.norm(d - want.b.astype(np.float64) @ want.a.astype(np.float64)))
    slack = 1e-6 * float(np.linalg.norm(d))
    assert ref_err <= optimum * (1 + 1e-9) + slack  # the reference is the optimum
    assert err <= EY_FACTOR[kind] * optimum + slack, f"error {err:.6g} vs optimum {optimum:.6g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SVD_SHAPES))
@pytest.mark.parametrize("split", ["B", "sqrt"])
@pytest.mark.parametrize("mode", ["exact", "auto", "randomized"])
def test_factored_svd(backend, shape, split, mode):
    be = get_backend(backend)
    rng = np.random.default_rng(seed_of(shape))
    out, in_, r, k = SVD_SHAPES[shape]
    b, a = factors(rng, out, in_, r)
    b2, a2 = factors(rng, out, in_, r)  # a second job in the same batch
    jobs = [FactorJob(f"{shape}.0", b, a), FactorJob(f"{shape}.1", b2, a2)]
    opts = {"mode": mode, "oversample": 2, "power_iters": 4, "seed": 5}
    got, want = be.factored_svd(jobs, [k, k], split, **opts), REF.factored_svd(jobs, [k, k], split, **opts)
    exact = be.factored_svd_is_exact(out, in_, r, k, mode, 2, 4)
    assert exact == REF.factored_svd_is_exact(out, in_, r, k, mode, 2, 4)
    for job, g, w in zip(jobs, got, want):
        d = job.b.astype(np.float64) @ job.a.astype(np.float64)
        if exact:
            check_exact(g, w, d)
        else:
            check_randomized(g, w, d, k, "decaying", TOL[("svd_s_randomized", "decaying")])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SVD_SHAPES))
@pytest.mark.parametrize("mode", ["exact", "auto", "randomized"])
def test_factored_svd_lists(backend, shape, mode):
    """Per-adapter factors with weights (ranks differ): the same rank-k factors as the stacked call."""
    be = get_backend(backend)
    rng = np.random.default_rng(seed_of(shape) + 1)
    out, in_, r, k = SVD_SHAPES[shape]
    ranks = [max(1, r // 3), max(1, r - 2 * (r // 3)), max(1, r // 3)]
    pairs = [factors(rng, out, in_, ri) for ri in ranks]
    weights = [0.7, -1.3, 2.0]
    job = FactorListJob(f"{shape}.list", pairs, weights)
    stacked = FactorJob(job.name, np.hstack([np.float32(w) * b for (b, _), w in zip(pairs, weights)]),
                        np.vstack([a for _, a in pairs]))
    opts = {"mode": mode, "oversample": 2, "power_iters": 4, "seed": 5}
    (got,) = be.factored_svd_lists([job], [k], "B", **opts)
    (want,) = REF.factored_svd([stacked], [k], "B", **opts)
    d = stacked.b.astype(np.float64) @ stacked.a.astype(np.float64)
    if be.factored_svd_is_exact(out, in_, sum(ranks), k, mode, 2, 4):
        check_exact(got, want, d)
    else:
        check_randomized(got, want, d, k, "flat", TOL[("svd_s_randomized", "flat")])  # a sum: no decay


def test_factored_svd_lists_refuses_pairs_that_do_not_fit():
    b, a = np.ones((4, 2), np.float32), np.ones((2, 5), np.float32)
    for be in [get_backend(n) for n in RUNNABLE] + [REF]:
        with pytest.raises(ShapeMismatchError, match="m.q"):
            be.factored_svd_lists([FactorListJob("m.q", [(b, a), (b, np.ones((2, 6), np.float32))], [1.0, 1.0])], [1])


DENSE_CASES = {  # name: (out, in, k, spectrum); randomized when (k + 10) * 4 < min(out, in)
    "small": (40, 30, 5, "decaying"),
    "rank1": (30, 1, 1, "decaying"),
    "k>min": (6, 9, 8, "decaying"),
    "tall_randomized": (400, 120, 4, "decaying"),
    "wide_randomized": (90, 500, 6, "decaying"),
    "conv_randomized": (64, 576, 5, "decaying"),
    "flat_randomized": (300, 200, 5, "flat"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DENSE_CASES))
@pytest.mark.parametrize("split", ["B", "sqrt"])
def test_dense_svd(backend, case, split):
    be = get_backend(backend)
    rng = np.random.default_rng(seed_of(case))
    out, in_, k, kind = DENSE_CASES[case]
    d = dense_matrix(rng, out, in_, kind).astype(np.float32)
    jobs = [DenseJob(case, d)]
    got, want = be.dense_svd(jobs, [k], split, seed=3), REF.dense_svd(jobs, [k], split, seed=3)
    exact = be.dense_svd_is_exact(out, in_, k, 10)
    assert exact == REF.dense_svd_is_exact(out, in_, k, 10) == ((k + 10) * 4 >= min(out, in_))
    if exact:
        check_exact(got[0], want[0], d.astype(np.float64))
    else:
        check_randomized(got[0], want[0], d.astype(np.float64), k, kind, TOL[("svd_s_randomized", kind)])


def test_path_rules_agree():
    """factored_svd_is_exact / dense_svd_is_exact over a grid of shapes: the reference copies the rule."""
    be = get_backend("cpu")
    for out in (1, 16, 300, 4096):
        for in_ in (1, 40, 5000):
            for r in (1, 8, 64, 1024):
                for k in (1, 4, 32):
                    for mode in ("exact", "auto", "randomized"):
                        for oversample, power_iters in ((0, 0), (10, 4)):
                            assert be.factored_svd_is_exact(out, in_, r, k, mode, oversample, power_iters) == \
                                REF.factored_svd_is_exact(out, in_, r, k, mode, oversample, power_iters)
                    assert be.dense_svd_is_exact(out, in_, k, 10) == REF.dense_svd_is_exact(out, in_, k, 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_svd_errors_are_the_same(backend):
    nan = np.ones((4, 2), np.float32)
    nan[1, 1] = np.inf
    for be in (get_backend(backend), REF):
        with pytest.raises(NonFiniteError, match="bad: input holds NaN or Inf"):
            be.factored_svd([FactorJob("bad", nan, np.ones((2, 3), np.float32))], [1])
        with pytest.raises(NonFiniteError, match="bad: input holds NaN or Inf"):
            be.dense_svd([DenseJob("bad", nan)], [1])
        with pytest.raises(ShapeMismatchError, match=r"m: .*B \(4, 2\).*A \(3, 3\)"):
            be.factored_svd([FactorJob("m", nan, np.ones((3, 3), np.float32))], [1])
        with pytest.raises(LorafuseValueError, match="unknown split 'C'"):
            be.dense_svd([DenseJob("m", np.ones((2, 2), np.float32))], [1], "C")


# ---------------------------------------------------------------- task_merge

TASK_SHAPES = {"matrix": (30, 20), "vector": (1000,), "conv": (8, 4, 3, 3)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prune", ["none", "magnitude", "random"])
@pytest.mark.parametrize("merge, majority", [("sum", "total"), ("ties", "total"), ("ties", "frequency")])
@pytest.mark.parametrize("density, rescale", [(0.4, False), (0.4, True), (0.0, False), (1.0, True)])
def test_task_merge(backend, prune, merge, majority, density, rescale):
    be = get_backend(backend)
    rng = np.random.default_rng(6)
    jobs, weights = [], []
    for name, shape in TASK_SHAPES.items():
        for n in (1, 3):
            ts = [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]
            ts[0].reshape(-1)[:5] = 0.5  # ties at a magnitude threshold
            jobs.append(TaskMergeJob(f"{name}.{n}", ts))
            weights.append(list(rng.uniform(-1.0, 2.0, n)))
    if prune == "random" and rescale and density == 0.0:
        return  # refused: tested below
    args = (weights, prune, density, rescale, merge, majority, 11)
    got, want = be.task_merge(jobs, *args), REF.task_merge(jobs, *args)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == np.float32
        assert nmse(g, w) < TOL[("task_merge", "F32")]
    if prune == "random" and 0 < density < 1:  # the masks: kept where the input was, about `density` of them
        kept = np.concatenate([(g != 0).reshape(-1) for g, j in zip(got, jobs) if len(j.tensors) == 1])
        assert abs(kept.mean() - density) < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_task_merge_errors_are_the_same(backend):
    t = np.ones((3, 2), np.float32)
    bad = t.copy()
    bad[0, 0] = np.nan
    for be in (get_backend(backend), REF):
        with pytest.raises(NonFiniteError, match="m: task tensor 1 holds NaN or Inf"):
            be.task_merge([TaskMergeJob("m", [t, bad])], [[1.0, 1.0]])
        with pytest.raises(NonFiniteError, match="m: merged result overflows float32"):
            be.task_merge([TaskMergeJob("m", [t * 3e38, t * 3e38])], [[1.0, 1.0]])
        with pytest.raises(LorafuseValueError, match="random pruning with density 0 and rescale"):
            be.task_merge([TaskMergeJob("m", [t])], [[1.0]], "random", 0.0, True)
        with pytest.raises(ShapeMismatchError, match="m: task tensor 1 has shape"):
            be.task_merge([TaskMergeJob("m", [t, np.ones(6, np.float32)])], [[1.0, 1.0]])


# ---------------------------------------------------------------- extract_svd

EXTRACT_SHAPES = {"tall": (160, 48, 6), "wide": (40, 200, 5), "conv": (32, 144, 4), "rank1": (30, 20, 1),
                  "k>min": (12, 6, 8)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(EXTRACT_SHAPES))
@pytest.mark.parametrize("dtype", RAW_DTYPES)
def test_extract_svd(backend, shape, dtype):
    be = get_backend(backend)
    rng = np.random.default_rng(seed_of(shape, dtype))
    out, in_, k = EXTRACT_SHAPES[shape]
    base = rng.standard_normal((out, in_))
    ft = base + dense_matrix(rng, out, in_)
    jobs = [ExtractJob(shape, encode(base, dtype), dtype, encode(ft, dtype), dtype)]
    (got,), (want,) = be.extract_svd(jobs, [k], 10, 2, 7), REF.extract_svd(jobs, [k], 10, 2, 7)
    d = REF.to_float32(jobs[0].w_ft, dtype).astype(np.float64) - REF.to_float32(jobs[0].w_base, dtype)
    assert (got.frob_sq - want.frob_sq) ** 2 / want.frob_sq**2 < TOL[("extract_frob", "any")]
    assert want.frob_sq == pytest.approx(float(np.sum(d * d)), rel=1e-12)
    assert got.s.shape == want.s.shape == (min(k + 10, out, in_),)
    kind = "flat" if dtype.startswith("F8") or dtype == "BF16" else "decaying"  # rounding noise in D
    check_randomized(got, want, d, k, kind, TOL[("extract_s", dtype)])
    # B A is the projection of D onto span(B): its error follows from frob_sq and S (documented)
    err = np.sqrt(max(got.frob_sq - float(np.sum(got.s[:k] ** 2)), 0.0))
    assert err == pytest.approx(float(np.linalg.norm(d - got.b.astype(np.float64) @ got.a)), abs=1e-3 * np.sqrt(
        want.frob_sq))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extract_svd_zero_difference_and_errors(backend):
    w = np.ones((6, 4), np.float32)
    bad = w.copy()
    bad[2, 2] = np.inf
    for be in (get_backend(backend), REF):
        (r,) = be.extract_svd([ExtractJob("z", w, "F32", w.copy(), "F32")], [2])
        assert r.frob_sq == 0.0 and not r.b.any() and not r.a.any() and not r.s.any() and r.b.shape == (6, 2)
        with pytest.raises(NonFiniteError, match="x: the fine-tuned weight holds NaN or Inf"):
            be.extract_svd([ExtractJob("x", w, "F32", bad, "F32")], [2])
        with pytest.raises(NonFiniteError, match="x: W_ft - W_base overflows float32"):
            be.extract_svd([ExtractJob("x", w * -3e38, "F32", w * 3e38, "F32")], [2])


# ---------------------------------------------------------------- end to end through the seam


def small_adapter(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {}
    for i, (o, n) in enumerate([(48, 32), (32, 48), (64, 64), (40, 40)]):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal((6, n)).astype(np.float16)
        tensors[f"{key}.lora_B.weight"] = rng.standard_normal((o, 6)).astype(np.float16)
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 6, "lora_alpha": 12,
                                                          "target_modules": ["q_proj"]}))
    return path


def test_resize_and_similarity_through_the_reference_backend(tmp_path, monkeypatch):
    """A whole operation with LORAFUSE_BACKEND=reference: the reference does the work, and the result
    is the cpu backend's (the reference's SVD is exact, the cpu's exact path too)."""
    adapter_dir, other = small_adapter(tmp_path / "a", 8), small_adapter(tmp_path / "b", 9)
    monkeypatch.delenv("LORAFUSE_BACKEND", raising=False)
    cpu_out, cpu_report = resize(lorafuse.load(adapter_dir), RankRule(rank=3))
    cpu_sim = lorafuse.similarity([adapter_dir, other])

    calls: list[str] = []
    for op in ("to_float32", "factored_svd", "inner"):
        original = getattr(REF, op)
        monkeypatch.setattr(REF, op, lambda *a, _op=op, _f=original, **kw: calls.append(_op) or _f(*a, **kw))
    monkeypatch.setenv("LORAFUSE_BACKEND", "reference")
    ref_out, ref_report = resize(lorafuse.load(adapter_dir), RankRule(rank=3))
    ref_sim = lorafuse.similarity([adapter_dir, other])
    assert {"to_float32", "factored_svd", "inner"} <= set(calls)

    assert [(m.name, m.rank_in, m.rank_out) for m in cpu_report] == [(m.name, m.rank_in, m.rank_out)
                                                                      for m in ref_report]
    for m_cpu, m_ref in zip(cpu_report, ref_report):
        assert m_cpu.fro_kept == pytest.approx(m_ref.fro_kept, rel=1e-9)
    for name, u in cpu_out.updates.items():
        assert nmse(u.delta(), ref_out.updates[name].delta()) < TOL[("svd_product", "F32")]
    np.testing.assert_allclose(np.asarray(ref_sim), np.asarray(cpu_sim), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_merge_batch_flags_every_lane(backend, out_dtype):
    """One value that cannot be stored, in any lane of the register blocks (up to 16 lanes x 2 vectors
    x 8 rows in the AVX-512 core) or in the column / row tails, flags its job; none flags none."""
    be = get_backend(backend)
    rows, cols = 19, 72  # two full 8-row blocks and a tail of 3; two 32-column blocks and a tail of 8
    rng = np.random.default_rng(11)
    stages = [LowRankStage((rng.standard_normal((rows, 3)) * 0.1).astype(np.float32),
                           (rng.standard_normal((3, cols)) * 0.1).astype(np.float32))]
    out_np = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[out_dtype]
    positions = [(5, c) for c in range(cols)] + [(r, 13) for r in range(rows)]
    jobs = []
    for r, c in positions:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        w[r, c] = np.nan if (r + c) % 2 else np.inf
        jobs.append(MergeJob(f"m{r}_{c}", w, "F32", np.zeros((rows, cols), out_np), out_dtype, stages))
    clean = rng.standard_normal((rows, cols)).astype(np.float32)
    jobs.append(MergeJob("clean", clean, "F32", np.zeros((rows, cols), out_np), out_dtype, stages))
    assert be.merge_batch(jobs) == [True] * len(positions) + [False]
