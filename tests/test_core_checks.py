"""Argument checks of the compiled core's entry points.

The binding only converts Python objects (numpy arrays into views, numbers, names); the
library's entry points (cpp/include/lorafuse/*.hpp: make_*_job, the batch functions) check
every shape, rank, dtype and layout with LORAFUSE_CHECK. Each case calls a compiled entry
point with one bad argument and asserts the Python exception class, that the message names
the module (or operand) and the shapes, and that it carries the check's place in the C++
source (file:line). factored_svd_lists is checked against factored_svd on the stacked factors
and against numpy's float64 SVD.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from lorafuse.backends.native import core
from lorafuse.errors import DtypeError, LorafuseValueError, ShapeMismatchError

CHECK_AT = re.compile(r"check `.+` failed at cpp/src/[a-z_]+\.cpp:\d+\)")


@pytest.fixture
def rng():
    return np.random.default_rng(1212)


def f32(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def raises(cls, call, *fragments: str) -> str:
    """Runs call(), expecting exactly `cls`; every fragment must appear literally in the message."""
    with pytest.raises(cls) as info:
        call()
    assert type(info.value) is cls
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert CHECK_AT.search(msg), f"no C++ check location in {msg!r}"
    return msg


# ----------------------------------------------------------------------------- factored / dense SVD


def test_factored_svd_shapes_ranks_dtypes(rng):
    B, A = f32(rng, 20, 4), f32(rng, 5, 10)
    raises(ShapeMismatchError, lambda: core.factored_svd([("m.q_proj", B, A)], [2]),
           "m.q_proj", "(20, 4)", "(5, 10)", "cannot be multiplied")
    raises(ShapeMismatchError, lambda: core.factored_svd([("m.k_proj", f32(rng, 20), f32(rng, 4, 10))], [2]),
           "m.k_proj", "(20,)", "(4, 10)")
    good_B = f32(rng, 20, 4)
    raises(LorafuseValueError, lambda: core.factored_svd([("m.v_proj", good_B, f32(rng, 4, 10))], [0]),
           "m.v_proj: rank must be >= 1, got 0")
    raises(LorafuseValueError, lambda: core.factored_svd([("m.v_proj", good_B, f32(rng, 4, 10))], [core.MAX_RANK + 1]),
           "m.v_proj: rank must be <=", str(core.MAX_RANK + 1))
    raises(DtypeError, lambda: core.factored_svd([("m.o_proj", good_B.astype(np.float64), f32(rng, 4, 10))], [2]),
           "m.o_proj: B must be a float32", "float64")
    raises(LorafuseValueError, lambda: core.factored_svd([("m.up", np.asfortranarray(good_B), f32(rng, 4, 10))], [2]),
           "m.up: B must be C-contiguous")


def test_dense_svd_checks(rng):
    raises(ShapeMismatchError, lambda: core.dense_svd([("lm_head", f32(rng, 200))], [3]), "lm_head", "(200,)", "2-D")
    raises(DtypeError, lambda: core.dense_svd([("lm_head", f32(rng, 8, 6).astype(np.float16))], [3]),
           "lm_head: D must be a float32", "float16")
    raises(LorafuseValueError, lambda: core.dense_svd([("lm_head", f32(rng, 8, 6))], [-1]),
           "lm_head: rank must be >= 1")


# ----------------------------------------------------------------------------- extract


def test_extract_svd_checks(rng):
    wb, wf = f32(rng, 4, 5), f32(rng, 4, 6)
    raises(ShapeMismatchError, lambda: core.extract_svd([("layers.3.q_proj", wb, "F32", wf, "F32")], [2]),
           "layers.3.q_proj", "(4, 5)", "(4, 6)")
    raises(DtypeError, lambda: core.extract_svd([("layers.3.q_proj", wb, "BF16", wb, "F32")], [2]),
           "layers.3.q_proj: base weight: buffer item size 4 does not match dtype BF16")
    raises(ShapeMismatchError, lambda: core.extract_svd([("layers.3.q_proj", wb, "F32", wb.T, "F32")], [2]),
           "layers.3.q_proj", "(4, 5)", "(5, 4)")
    sq = f32(rng, 5, 5)
    raises(LorafuseValueError, lambda: core.extract_svd([("layers.3.q_proj", sq, "F32", sq.T, "F32")], [2]),
           "layers.3.q_proj: fine-tuned weight must be C-contiguous")
    raises(LorafuseValueError, lambda: core.extract_svd([("layers.3.q_proj", sq, "F32", sq, "F32")], [0]),
           "layers.3.q_proj: rank must be >= 1")


# ----------------------------------------------------------------------------- merge_batch


def merge_job(name, w, out, stages):
    return (name, w, "F32", out, "F32", stages)


def test_merge_batch_checks(rng):
    w = f32(rng, 12, 8)
    out = np.empty_like(w)
    bad_lowrank = [(f32(rng, 12, 2), f32(rng, 3, 8), None, False)]
    raises(ShapeMismatchError, lambda: core.merge_batch([merge_job("blk.attn", w, out, bad_lowrank)]),
           "blk.attn: factors B (12, 2) and A (3, 8) do not fit the base weight (12, 8)")
    raises(ShapeMismatchError, lambda: core.merge_batch([merge_job("blk.attn", w, np.empty((12, 9), np.float32), [])]),
           "blk.attn: base weight (12, 8) and output (12, 9)")
    ro = np.empty_like(w)
    ro.flags.writeable = False
    raises(LorafuseValueError, lambda: core.merge_batch([merge_job("blk.attn", w, ro, [])]),
           "blk.attn: output buffer is read-only")
    raises(DtypeError, lambda: core.merge_batch([("blk.attn", w, "BF16", out, "F32", [])]),
           "blk.attn: base weight: buffer item size 4 does not match dtype BF16")
    hada = [("hadamard", (f32(rng, 12, 2), f32(rng, 2, 8), f32(rng, 12, 2), f32(rng, 36)), None, False)]
    raises(ShapeMismatchError, lambda: core.merge_batch([merge_job("blk.mlp", w, out, hada)]),
           "blk.mlp: LoHa A2 (36,) must be 2-D")
    kron = [("kron", (f32(rng, 3, 2), f32(rng, 4, 5)), None, False)]
    raises(ShapeMismatchError, lambda: core.merge_batch([merge_job("blk.mlp", w, out, kron)]),
           "blk.mlp: LoKr factors W1 (3, 2) and W2 (4, 5) do not fit the base weight (12, 8)")
    kron_f64 = [("kron", (f32(rng, 3, 2), f32(rng, 4, 4).astype(np.float64)), None, False)]
    raises(DtypeError, lambda: core.merge_batch([merge_job("blk.mlp", w, out, kron_f64)]),
           "blk.mlp: LoKr W2 must be a float32", "float64")
    dora = [(f32(rng, 12, 2), f32(rng, 2, 8), f32(rng, 8), False)]  # row norms need 12 values
    raises(ShapeMismatchError, lambda: core.merge_batch([merge_job("blk.attn", w, out, dora)]),
           "blk.attn: DoRA magnitude (8,) does not fit the base weight (12, 8)")


# ----------------------------------------------------------------------------- task_merge, norms, dtypes


def test_task_merge_checks(rng):
    raises(ShapeMismatchError, lambda: core.task_merge([("k_proj", [f32(rng, 4, 8), f32(rng, 8, 4)])], [[1.0, 1.0]]),
           "k_proj: task tensor 1 has shape (8, 4), task tensor 0 has (4, 8)")
    raises(ShapeMismatchError, lambda: core.task_merge([("k_proj", [f32(rng, 4), f32(rng, 4)])], [[1.0]]),
           "k_proj: 1 weights for 2 tensors")
    raises(LorafuseValueError, lambda: core.task_merge([("k_proj", [f32(rng, 4)])], [[float("nan")]]),
           "k_proj: weight 0 must be finite")
    raises(DtypeError, lambda: core.task_merge([("k_proj", [np.zeros(4, np.int32)])], [[1.0]]),
           "k_proj: task tensor 0 must be a float32", "int32")
    raises(LorafuseValueError, lambda: core.task_merge([("k_proj", [f32(rng, 4)])], [[1.0]], density=-0.5),
           "density must be >= 0")


def test_factored_norm_checks(rng):
    raises(ShapeMismatchError, lambda: core.factored_frobenius_sq([(f32(rng, 6, 2), f32(rng, 3, 5))]),
           "B (6, 2) and A (3, 5) cannot be multiplied")
    raises(ShapeMismatchError,
           lambda: core.factored_inner([(f32(rng, 6, 2), f32(rng, 2, 5), f32(rng, 7, 2), f32(rng, 2, 5))]),
           "B1 (6, 2)", "B2 (7, 2)", "do not describe two deltas of one shape")


def test_dtype_conversion_checks(rng):
    raises(DtypeError, lambda: core.to_float32(np.zeros(4, np.float32), "BF16"),
           "to_float32 input: buffer item size 4 does not match dtype BF16")
    raises(LorafuseValueError, lambda: core.to_float32(np.zeros((4, 4), np.uint16).T, "BF16"),
           "to_float32 input must be C-contiguous")
    raises(DtypeError, lambda: core.from_float32(np.zeros(4, np.float64), "F16"),
           "from_float32 input must be a float32", "float64")
    raises(DtypeError, lambda: core.from_float32(np.zeros(4, np.float32), "F8_E4M3"), "cannot write dtype F8_E4M3")


# ----------------------------------------------------------------------------- factored_svd_lists


def stacked(pairs, weights):
    B = np.concatenate([w * b for (b, _), w in zip(pairs, weights)], axis=1).astype(np.float32)
    A = np.concatenate([a for _, a in pairs], axis=0)
    return B, A


@pytest.mark.parametrize("mode", ["exact", "randomized"])
@pytest.mark.parametrize("split", ["B", "sqrt"])
def test_factored_svd_lists_matches_stacked(rng, mode, split):
    out, inn, k = 96, 80, 6
    ranks = [4, 8, 2, 6, 4]
    pairs = [(f32(rng, out, r), f32(rng, r, inn)) for r in ranks]
    weights = [0.5, -1.25, 2.0, 1.0, 0.75]
    B, A = stacked(pairs, weights)
    kw = dict(split=split, mode=mode, seed=7, oversample=4, power_iters=3)
    ref = core.factored_svd([("model.q", B, A)], [k], **kw)[0]
    got = core.factored_svd_lists([("model.q", pairs, weights)], [k], **kw)[0]
    assert [x.shape for x in got] == [x.shape for x in ref]
    D = sum(w * b.astype(np.float64) @ a.astype(np.float64) for (b, a), w in zip(pairs, weights))
    s = np.linalg.svd(D, compute_uv=False)
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-5, atol=1e-6 * s[0])
    recon = got[0].astype(np.float64) @ got[1].astype(np.float64)
    recon_ref = ref[0].astype(np.float64) @ ref[1].astype(np.float64)
    np.testing.assert_allclose(recon, recon_ref, atol=2e-5 * s[0])
    err = np.linalg.norm(D - recon)
    best = np.sqrt(np.sum(s[k:] ** 2))  # Eckart-Young: exact within float32 rounding, randomized near it
    assert err <= best * (1 + (1e-4 if mode == "exact" else 2e-2)) + 1e-5 * s[0]


def test_factored_svd_lists_checks(rng):
    good = (f32(rng, 10, 2), f32(rng, 2, 7))
    raises(ShapeMismatchError,
           lambda: core.factored_svd_lists([("up", [good, (f32(rng, 11, 2), f32(rng, 2, 7))], [1.0, 1.0])], [2]),
           "up: pair 1", "(11, 2)", "(11, 7)", "(10, 7)")
    raises(ShapeMismatchError, lambda: core.factored_svd_lists([("up", [good], [1.0, 2.0])], [2]),
           "up: 1 B factors, 1 A factors and 2 weights")
    raises(ShapeMismatchError,
           lambda: core.factored_svd_lists([("up", [(f32(rng, 10, 2), f32(rng, 3, 7))], [1.0])], [2]),
           "up: pair 0: factors B (10, 2) and A (3, 7) cannot be multiplied")
    raises(LorafuseValueError, lambda: core.factored_svd_lists([("up", [], [])], [2]), "up: needs at least one")
    raises(LorafuseValueError, lambda: core.factored_svd_lists([("up", [good], [float("inf")])], [2]),
           "up: pair 0: the weight must be finite")
