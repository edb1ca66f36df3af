"""The core's dtype conversions against independent references.

BF16 is checked against torch (its rounding is round-to-nearest-even), F16 against
numpy's float16 (also RNE), F64 against numpy's float64 -> float32 cast and the
two F8 formats against torch's float8 types. Every comparison is bitwise: the
same rounding, not merely close values. Arrays of awkward lengths exercise the
scalar tails after the vector loops; large arrays exercise the threaded chunks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorafuse
from lorafuse import _core

RNG_SEED = 20240611
# numpy warns when its reference cast overflows to inf: that is the behaviour under test
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def f32_from_bits(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def bits32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def torch_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Reference F32 -> BF16 (RNE) through torch, as uint16 bits."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def torch_bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)
    return t.float().numpy()


def tail_only(fn, x: np.ndarray, width: int = 7) -> np.ndarray:
    """Apply a conversion in pieces shorter than a vector (8 lanes): only the scalar code runs."""
    return np.concatenate([fn(x[i : i + width]) for i in range(0, len(x), width)])


def random_f32(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite float32 values with random signs over the whole exponent range, plus ordinary magnitudes."""
    bits = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    normal = rng.standard_normal(n).astype(np.float32) * np.float32(3.0)
    return np.concatenate([x, normal])


# ---------------------------------------------------------------- BF16


def test_bf16_decode_every_bit_pattern_matches_torch():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    ours = _core.to_float32(bits, "BF16")
    ref = torch_bf16_to_f32(bits)
    assert ours.dtype == np.float32 and ours.shape == (2**16,)
    # BF16 -> F32 is exact (a shift): every pattern, NaN payloads included, is bit-identical.
    np.testing.assert_array_equal(bits32(ours), bits32(ref))
    # and the obvious definition
    np.testing.assert_array_equal(bits32(ours), bits.astype(np.uint32) << 16)


def test_bf16_encode_random_values_match_torch():
    rng = np.random.default_rng(RNG_SEED)
    x = random_f32(rng, 200_003)  # odd length: a vector tail is left over
    ours = _core.from_float32(x, "BF16")
    assert ours.dtype == np.uint16 and ours.shape == x.shape
    np.testing.assert_array_equal(ours, torch_bf16_bits(x))
    np.testing.assert_array_equal(tail_only(lambda v: _core.from_float32(v, "BF16"), x[:5000]),
                                  torch_bf16_bits(x[:5000]))


def test_bf16_exact_ties_round_to_even():
    # Low 16 bits exactly 0x8000: halfway between two bf16 numbers.
    hi = np.array([0x3F80, 0x3F81, 0x3F82, 0x3F83, 0xBF80, 0xBF81, 0x4049, 0x404A, 0x0001, 0x0002, 0x7F7E], np.uint32)
    x = f32_from_bits((hi << 16) | 0x8000)
    even_hi = np.where(hi % 2 == 0, hi, hi + 1).astype(np.uint16)
    ours = _core.from_float32(x, "BF16")
    np.testing.assert_array_equal(ours, even_hi)
    np.testing.assert_array_equal(ours, torch_bf16_bits(x))
    # one ulp of f32 either side of the tie goes to the nearer neighbour
    below = _core.from_float32(f32_from_bits((hi << 16) | 0x7FFF), "BF16")
    above = _core.from_float32(f32_from_bits((hi << 16) | 0x8001), "BF16")
    np.testing.assert_array_equal(below, hi.astype(np.uint16))
    np.testing.assert_array_equal(above, (hi + 1).astype(np.uint16))
    # 1 + 2^-8 is the tie between 1 and 1 + 2^-7: goes to 1 (even); 1 + 3*2^-8 goes up to 1 + 2^-6
    y = np.array([1 + 2**-8, 1 + 3 * 2**-8], np.float32)
    np.testing.assert_array_equal(_core.to_float32(_core.from_float32(y, "BF16"), "BF16"), [1.0, 1 + 2**-6])


def test_bf16_special_values():
    smallest_sub = f32_from_bits([0x00000001])[0]  # rounds to +0
    x = np.array(
        [0.0, -0.0, np.inf, -np.inf,
         f32_from_bits([0x00010000])[0],  # smallest bf16 subnormal
         f32_from_bits([0x00018000])[0],  # tie between subnormals 1 and 2 -> 2
         f32_from_bits([0x0000C000])[0],  # above half of the smallest subnormal -> 1
         f32_from_bits([0x80008000])[0],  # -half of smallest subnormal: tie -> -0
         smallest_sub, -smallest_sub,
         f32_from_bits([0x007FFFFF])[0],  # largest f32 subnormal -> smallest bf16 normal
         np.finfo(np.float32).max, -np.finfo(np.float32).max,  # round up to +-inf
         f32_from_bits([0x7F7F8000])[0],  # tie at the top, odd -> inf
         f32_from_bits([0x7F7E8000])[0],  # tie at the top, even -> largest finite bf16
         f32_from_bits([0x7F7F7FFF])[0],  # just below the tie -> largest finite bf16
         ],
        np.float32,
    )
    expect = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x0002, 0x0001, 0x8000, 0x0000, 0x8000,
                       0x0080, 0x7F80, 0xFF80, 0x7F80, 0x7F7E, 0x7F7F], np.uint16)
    for n in (len(x), 8, 3):  # through the vector path and through the scalar tail
        np.testing.assert_array_equal(_core.from_float32(x[:n], "BF16"), expect[:n])
    np.testing.assert_array_equal(_core.from_float32(x, "BF16"), torch_bf16_bits(x))
    back = _core.to_float32(expect, "BF16")
    assert np.signbit(back[1]) and back[1] == 0 and back[0] == 0 and not np.signbit(back[0])
    assert back[2] == np.inf and back[3] == -np.inf
    assert back[4] == np.float32(2.0**-133)  # bf16 subnormal decoded exactly


def test_bf16_nan_stays_nan():
    nans = f32_from_bits([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F80FFFF, 0xFF800001, 0x7FBF0000, 0x7FFFFFFF,
                          0x7F810000, 0x7FC00001])
    assert np.isnan(nans).all()
    for n in (len(nans), 4):
        out = _core.from_float32(nans[:n], "BF16")
        back = _core.to_float32(out, "BF16")
        assert np.isnan(back).all(), [hex(b) for b in out]
        # signalling NaNs whose payload lives in the low bits must not become infinities
        assert ((out & 0x7F80) == 0x7F80).all() and ((out & 0x007F) != 0).all()
    assert np.isnan(torch_bf16_to_f32(_core.from_float32(nans, "BF16"))).all()


# ---------------------------------------------------------------- F16


def test_f16_decode_every_bit_pattern_matches_numpy():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    h = bits.view(np.float16)
    ref = h.astype(np.float32)
    finite = ~np.isnan(ref)
    for ours in (_core.to_float32(h, "F16"),                                     # vector path (65536 = 8k)
                 _core.to_float32(bits, "F16"),                                  # uint16 buffer works too
                 tail_only(lambda v: _core.to_float32(v, "F16"), h)):            # scalar path only
        np.testing.assert_array_equal(bits32(ours)[finite], bits32(ref)[finite])
        np.testing.assert_array_equal(np.isnan(ours), ~finite)
    sub = _core.to_float32(np.array([1, 0x3FF, 0x8001, 0x0400], np.uint16), "F16")
    np.testing.assert_array_equal(sub, np.array([2.0**-24, 1023 * 2.0**-24, -(2.0**-24), 2.0**-14], np.float32))


def test_f16_encode_random_values_match_numpy():
    rng = np.random.default_rng(RNG_SEED + 1)
    x = np.concatenate([
        random_f32(rng, 100_000),
        (rng.standard_normal(50_000) * 2.0 ** rng.integers(-30, 18, 50_000)).astype(np.float32),
    ])[:150_005]  # not a multiple of 8
    ref = x.astype(np.float16).view(np.uint16)
    ours = _core.from_float32(x, "F16")
    assert ours.dtype == np.float16 and ours.shape == x.shape
    np.testing.assert_array_equal(ours.view(np.uint16), ref)
    tail = tail_only(lambda v: _core.from_float32(v, "F16"), x[:20_000])
    np.testing.assert_array_equal(tail.view(np.uint16), ref[:20_000])


F16_EDGES = np.array(
    [0.0, -0.0, np.inf, -np.inf, 1.0, -1.0,
     65504.0, -65504.0,            # largest finite half
     65519.0, 65519.99609375,      # below the 65520 tie: stays 65504
     65520.0, -65520.0,            # tie with odd mantissa: rounds to inf
     65536.0, 1e6, 3.4e38,         # overflow
     2.0**-24, 2.0**-25,           # smallest subnormal, and the tie half of it -> 0 (even)
     3 * 2.0**-25, 5 * 2.0**-25,   # ties between subnormals: -> 2 and 2 (even) ulps
     2.0**-25 + 2.0**-40,          # just above half of the smallest subnormal -> 1 ulp
     2.0**-26, 1e-10, 1e-45,       # underflow to 0
     2.0**-14, 2.0**-14 - 2.0**-25, 2.0**-14 - 2.0**-24,  # around the smallest normal
     -(2.0**-24), -(2.0**-26),
     1 + 2.0**-11, 1 + 3 * 2.0**-11,  # ties in the normal range
     2048 + 1.0, 2048 + 3.0, 4095.5, 0.1, -0.3333333],
    np.float32,
)


def test_f16_encode_edge_values():
    ref = F16_EDGES.astype(np.float16).view(np.uint16)
    # spot-check the reference itself on the values that matter most
    assert ref[6] == 0x7BFF and ref[8] == 0x7BFF and ref[9] == 0x7BFF and ref[10] == 0x7C00 and ref[11] == 0xFC00
    assert ref[15] == 0x0001 and ref[16] == 0x0000 and ref[17] == 0x0002 and ref[18] == 0x0002 and ref[19] == 0x0001
    for start in range(8):  # every element lands in the vector body and in the scalar tail at some offset
        x = np.ascontiguousarray(F16_EDGES[start:])
        np.testing.assert_array_equal(_core.from_float32(x, "F16").view(np.uint16), ref[start:])
    np.testing.assert_array_equal(tail_only(lambda v: _core.from_float32(v, "F16"), F16_EDGES).view(np.uint16), ref)
    # every float32 between 65504 and 65536: the boundary is exactly 65520
    lo, hi = int(np.float32(65504.0).view(np.uint32)), int(np.float32(65536.0).view(np.uint32))
    near = f32_from_bits(np.arange(lo, hi + 1, dtype=np.uint32))
    near_ref = near.astype(np.float16).view(np.uint16)
    assert set(np.unique(near_ref)) == {0x7BFF, 0x7C00}
    np.testing.assert_array_equal(_core.from_float32(near, "F16").view(np.uint16), near_ref)
    np.testing.assert_array_equal(tail_only(lambda v: _core.from_float32(v, "F16"), near).view(np.uint16), near_ref)


def test_f16_every_subnormal_and_near_normal_input():
    # all float32 in [0, 2^-13): the whole half subnormal range and the first normal binade
    step = 997  # a prime stride keeps the test fast but touches every rounding case
    b = np.arange(0, int(np.float32(2.0**-13).view(np.uint32)), step, dtype=np.uint32)
    b = np.concatenate([b, b | 0x80000000])
    x = f32_from_bits(b)
    ref = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(_core.from_float32(x, "F16").view(np.uint16), ref)
    np.testing.assert_array_equal(tail_only(lambda v: _core.from_float32(v, "F16"), x[:30_000]).view(np.uint16),
                                  ref[:30_000])


def test_f16_nan_stays_nan():
    nans = f32_from_bits([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F801000, 0xFF800001, 0x7FFFFFFF, 0x7FC00001,
                          0x7F800100, 0x7F802000])
    for n in (len(nans), 8, 5):
        out = _core.from_float32(nans[:n], "F16")
        assert np.isnan(out).all(), [hex(v) for v in out.view(np.uint16)]
        assert np.isnan(_core.to_float32(out, "F16")).all()


# ---------------------------------------------------------------- F64, F8


def test_f64_to_f32_matches_numpy_cast():
    rng = np.random.default_rng(RNG_SEED + 2)
    x = np.concatenate([
        rng.standard_normal(10_001) * 10.0 ** rng.integers(-50, 50, 10_001),
        [0.0, -0.0, np.inf, -np.inf, 1e39, -1e39, 3.4028235677973366e38, 3.4028235e38, 1e-46, 1e-45, 7e-46,
         2.0**-149, 2.0**-150, 3 * 2.0**-150, 1 + 2.0**-24, 1 + 3 * 2.0**-24, np.finfo(np.float64).max],
    ])
    ours = _core.to_float32(x, "F64")
    ref = x.astype(np.float32)
    np.testing.assert_array_equal(bits32(ours), bits32(ref))
    assert ours[-6] == np.float32(2.0**-149)  # the smallest subnormal is exact
    assert ours[-5] == 0 and ours[-4] == np.float32(2.0**-148)  # ties to even in the subnormal range
    assert ours[-3] == np.float32(1.0) and ours[-2] == np.float32(1 + 2.0**-22)  # ties to even among normals
    edge = ours[-17:]
    assert edge[2] == np.inf and edge[3] == -np.inf and edge[4] == np.inf and edge[5] == -np.inf
    assert edge[6] == np.inf and edge[7] == np.finfo(np.float32).max and edge[-1] == np.inf
    assert edge[8] == 0 and edge[9] == np.float32(2.0**-149) and edge[10] == 0  # 7e-46 is just below half of 2^-149
    assert np.isnan(_core.to_float32(np.array([np.nan, -np.nan]), "F64")).all()


@pytest.mark.parametrize("name,torch_dtype", [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)])
def test_f8_decode_all_bytes_matches_torch(name, torch_dtype):
    b = np.arange(256, dtype=np.uint8)
    ref = torch.tensor(b, dtype=torch.uint8).view(torch_dtype).float().numpy()
    for ours in (_core.to_float32(b, name), tail_only(lambda v: _core.to_float32(v, name), b),
                 _core.to_float32(b.reshape(16, 16), name).reshape(-1)):
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
        ok = ~np.isnan(ref)
        np.testing.assert_array_equal(bits32(ours)[ok], bits32(ref)[ok])  # -0.0 included
    out = _core.to_float32(b, name)
    if name == "F8_E4M3":
        assert out[0x7E] == 448.0 and out[0x01] == 2.0**-9 and np.isnan(out[[0x7F, 0xFF]]).all()
        assert np.isfinite(out[[0x78, 0xF8]]).all()  # e4m3fn has no infinities
    else:
        assert out[0x7B] == 57344.0 and out[0x7C] == np.inf and out[0xFC] == -np.inf and out[0x01] == 2.0**-16
    assert out[0x80] == 0 and np.signbit(out[0x80])


# ---------------------------------------------------------------- shapes, threads, errors


def test_shapes_are_preserved_and_empty_arrays_work():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    for d in ("BF16", "F16", "F32"):
        y = _core.from_float32(x, d)
        assert y.shape == (2, 3, 4)
        z = _core.to_float32(y, d)
        assert z.shape == (2, 3, 4)
        np.testing.assert_allclose(z, x, rtol=2.0**-8)
    np.testing.assert_array_equal(_core.from_float32(x, "F32"), x)
    for d in ("BF16", "F16", "F64", "F8_E4M3"):
        e = _core.to_float32(np.zeros((0, 5), dtype={"BF16": np.uint16, "F16": np.float16, "F64": np.float64,
                                                     "F8_E4M3": np.uint8}[d]), d)
        assert e.shape == (0, 5) and e.dtype == np.float32
    assert _core.from_float32(np.zeros((3, 0), np.float32), "BF16").shape == (3, 0)
    scalar = _core.from_float32(np.array(1.5, np.float32), "BF16")
    assert scalar.shape == () and int(scalar) == 0x3FC0


@pytest.mark.parametrize("n", [1, 7, 9, 15, 17, 1023, 4099])
def test_lengths_not_multiple_of_eight(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 100).astype(np.float32)
    x[-1] = 65520.0  # the last element is always in the scalar tail
    np.testing.assert_array_equal(_core.from_float32(x, "BF16"), torch_bf16_bits(x))
    h = _core.from_float32(x, "F16")
    np.testing.assert_array_equal(h.view(np.uint16), x.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(_core.to_float32(h, "F16"), x.astype(np.float16).astype(np.float32))
    bf = torch_bf16_bits(x)
    np.testing.assert_array_equal(bits32(_core.to_float32(bf, "BF16")), bits32(torch_bf16_to_f32(bf)))


def test_large_arrays_threads_give_identical_bits():
    rng = np.random.default_rng(RNG_SEED + 3)
    n = 3_000_001  # about 11.4 chunks of 2^18: a partial last chunk
    x = rng.standard_normal(n, dtype=np.float32) * np.float32(1000.0)
    x[::1001] = np.float32(65520.0)
    x[5::1003] = np.float32(3e-6)  # half subnormals
    bf1 = _core.from_float32(x, "BF16", threads=1)
    bf2 = _core.from_float32(x, "BF16", threads=2)
    np.testing.assert_array_equal(bf1, bf2)
    np.testing.assert_array_equal(bf1, torch_bf16_bits(x))
    h1 = _core.from_float32(x, "F16", threads=1)
    h2 = _core.from_float32(x, "F16", threads=2)
    np.testing.assert_array_equal(h1.view(np.uint16), h2.view(np.uint16))
    np.testing.assert_array_equal(h1.view(np.uint16), x.astype(np.float16).view(np.uint16))
    for raw, d, ref in ((bf1, "BF16", torch_bf16_to_f32(bf1)), (h1, "F16", h1.astype(np.float32)),
                        (x.astype(np.float64), "F64", x)):
        one = _core.to_float32(raw, d, threads=1)
        two = _core.to_float32(raw, d, threads=2)
        default = _core.to_float32(raw, d)
        np.testing.assert_array_equal(bits32(one), bits32(two))
        np.testing.assert_array_equal(bits32(one), bits32(default))
        np.testing.assert_array_equal(bits32(one), bits32(ref))


def test_wrong_item_size_is_a_dtype_error():
    with pytest.raises(lorafuse.DtypeError, match=r"item size 4 does not match dtype BF16"):
        _core.to_float32(np.zeros(4, np.float32), "BF16")
    with pytest.raises(lorafuse.DtypeError, match=r"item size 2 does not match dtype F32"):
        _core.to_float32(np.zeros(4, np.uint16), "F32")
    with pytest.raises(lorafuse.DtypeError, match=r"item size 2 does not match dtype F8_E4M3"):
        _core.to_float32(np.zeros(4, np.uint16), "F8_E4M3")
    with pytest.raises(lorafuse.DtypeError, match=r"must be a float32 numpy array"):
        _core.from_float32(np.zeros(4, np.float64), "BF16")
    with pytest.raises(lorafuse.DtypeError, match=r"unsupported dtype 'F7'"):
        _core.to_float32(np.zeros(4, np.uint8), "F7")
    with pytest.raises(lorafuse.DtypeError, match=r"cannot write dtype F64"):
        _core.from_float32(np.zeros(4, np.float32), "F64")
    with pytest.raises(lorafuse.DtypeError, match=r"cannot write dtype F8_E4M3"):
        _core.from_float32(np.zeros(4, np.float32), "F8_E4M3")
    assert issubclass(lorafuse.DtypeError, lorafuse.LorafuseError)


def test_non_contiguous_input_is_a_value_error():
    with pytest.raises(lorafuse.LorafuseValueError, match=r"to_float32 input must be C-contiguous"):
        _core.to_float32(np.zeros(16, np.uint16)[::2], "BF16")
    with pytest.raises(lorafuse.LorafuseValueError, match=r"to_float32 input must be C-contiguous"):
        _core.to_float32(np.zeros((4, 4), np.float16).T, "F16")
    with pytest.raises(lorafuse.LorafuseValueError, match=r"from_float32 input must be C-contiguous"):
        _core.from_float32(np.zeros((4, 4), np.float32)[:, :2], "F16")
    with pytest.raises(ValueError):  # also a plain ValueError for callers that catch that
        _core.from_float32(np.zeros(8, np.float32)[::2], "BF16")
