// The fast path of the merge: out = round(W + sum_s B_s A_s) with no intermediate
// tile. A register block of MR rows x NR columns is loaded from W (converted to
// float32 in registers), accumulates every rank-1 term of every stage, and is
// rounded straight into the output. Written with GCC/Clang vector extensions whose
// width follows the build's instruction set: 16 lanes (zmm) in the AVX-512 core,
// 8 lanes (ymm) in the AVX2 core, and SSE2 pairs of 4 in the generic one.
#include "lorafuse/fused_lowrank.hpp"

#include <cmath>
#include <cstring>

#include "simd.hpp"

namespace lorafuse {
namespace {

using simd::VL;
using simd::vf;
using simd::vh;
using simd::vi;
using simd::vu;

#if defined(__AVX512F__)
// 32 vector registers: 8 rows x 2 vectors of accumulators, two of A, the broadcasts.
constexpr int MR = 8;
#else
// 16 vector registers: 4 rows x 2 vectors of accumulators.
constexpr int MR = 4;
#endif
constexpr int NR = 2 * VL;  // columns per register block (two vectors)

#if defined(LORAFUSE_HAVE_F16C)
// The NaN lanes of v (decoded by F16C from the halves at base + i) as f16_to_f32 decodes them: F16C
// quiets a signalling NaN (float bit 22), the scalar rule keeps the half's own quiet bit (bit 9).
inline vf f16_nan_bits(vf v, const void* base, std::int64_t i) {
  vh h;
  std::memcpy(&h, static_cast<const std::uint16_t*>(base) + i, sizeof(vh));
  vu u;
  std::memcpy(&u, &v, sizeof(vf));
  const vu quiet = (__builtin_convertvector(h, vu) & 0x200u) << 13;
  u = ((u & 0x7FFFFFFFu) > 0x7F800000u) ? ((u & ~0x400000u) | quiet) : u;
  std::memcpy(&v, &u, sizeof(vf));
  return v;
}

// v with each NaN lane the quiet NaN of its sign (0x7FC00000), which F16C rounds to f32_to_f16's
// 0x7E00 of that sign; F16C would keep the top payload bits of any other NaN.
inline vf canonical_nan(vf v) {
  vu u;
  std::memcpy(&u, &v, sizeof(vf));
  u = ((u & 0x7FFFFFFFu) > 0x7F800000u) ? ((u & 0x80000000u) | 0x7FC00000u) : u;
  std::memcpy(&v, &u, sizeof(vf));
  return v;
}
#endif

template <DType T>
inline vf loadv(const void* base, std::int64_t i) {
  vf v = simd::widen<T>(base, i);
#if defined(LORAFUSE_HAVE_F16C)
  if constexpr (T == DType::F16) v = f16_nan_bits(v, base, i);
#endif
  return v;
}

template <DType T>
inline void storev(void* base, std::int64_t i, vf v) {
  if constexpr (T == DType::F32) {
    std::memcpy(static_cast<float*>(base) + i, &v, sizeof(vf));
  } else if constexpr (T == DType::BF16) {
    vu u;
    std::memcpy(&u, &v, sizeof(vf));
    const vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const vu nan = (u >> 16) | 0x40u;
    const vu sel = ((u & 0x7FFFFFFFu) > 0x7F800000u) ? nan : rounded;
    const vh h = __builtin_convertvector(sel, vh);
    std::memcpy(static_cast<std::uint16_t*>(base) + i, &h, sizeof(vh));
  } else {
    static_assert(T == DType::F16, "storev: F32, BF16 or F16");
#if defined(LORAFUSE_HAVE_F16C)
    v = canonical_nan(v);
#endif
#if defined(LORAFUSE_HAVE_F16C) && defined(__AVX512F__)
    __m512 x;
    std::memcpy(&x, &v, sizeof(vf));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<std::uint16_t*>(base) + i),
                        _mm512_mask_cvtps_ph(_mm256_setzero_si256(), 0xFFFF, x, _MM_FROUND_TO_NEAREST_INT));
#elif defined(LORAFUSE_HAVE_F16C)
    __m256 x;
    std::memcpy(&x, &v, sizeof(vf));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<std::uint16_t*>(base) + i),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
#else
    float tmp[VL];
    std::memcpy(tmp, &v, sizeof(vf));
    from_f32(tmp, static_cast<std::uint16_t*>(base) + i, DType::F16, VL);
#endif
  }
}

// Lanes of v that are NaN or Inf, or finite but stored as Inf in the output type:
// |v| < limit fails exactly for those (limit = overflow_threshold of the output).
inline vi not_storable_mask(vf v, vf limit) {
  vu u;
  std::memcpy(&u, &v, sizeof(vf));
  u &= 0x7FFFFFFFu;
  vf a;
  std::memcpy(&a, &u, sizeof(vf));
  return ~(a < limit);
}

template <DType TW, DType TO, int M>
bool rows_kernel(const FusedJob& job, std::int64_t r0) {
  const std::int64_t cols = job.cols;
  const float lim = overflow_threshold(TO);
  const vf limit = vf{} + lim;  // every lane
  vi bad = {};
  std::int64_t j = 0;
  for (; j + NR <= cols; j += NR) {
    vf acc[M][2];
    for (int m = 0; m < M; ++m) {
      acc[m][0] = loadv<TW>(job.w, (r0 + m) * cols + j);
      acc[m][1] = loadv<TW>(job.w, (r0 + m) * cols + j + VL);
    }
    for (const FusedTerm& t : job.terms) {
      const float* b = t.B + r0 * t.rank;
      for (std::int64_t k = 0; k < t.rank; ++k) {
        vf a0, a1;
        std::memcpy(&a0, t.A + k * cols + j, sizeof(vf));
        std::memcpy(&a1, t.A + k * cols + j + VL, sizeof(vf));
        for (int m = 0; m < M; ++m) {
          const float bk = b[m * t.rank + k];
          acc[m][0] += bk * a0;
          acc[m][1] += bk * a1;
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      bad |= not_storable_mask(acc[m][0], limit) | not_storable_mask(acc[m][1], limit);
      storev<TO>(job.out, (r0 + m) * cols + j, acc[m][0]);
      storev<TO>(job.out, (r0 + m) * cols + j + VL, acc[m][1]);
    }
  }
  bool any_bad = false;
  for (int l = 0; l < VL; ++l) any_bad |= bad[l] != 0;
  // Column tail: one element at a time through the scalar conversions.
  const std::size_t wsz = itemsize(job.w_type), osz = itemsize(job.out_type);
  for (; j < cols; ++j) {
    for (int m = 0; m < M; ++m) {
      const std::int64_t idx = (r0 + m) * cols + j;
      float x;
      to_f32(static_cast<const unsigned char*>(job.w) + idx * wsz, job.w_type, &x, 1);
      for (const FusedTerm& t : job.terms)
        for (std::int64_t k = 0; k < t.rank; ++k) x += t.B[(r0 + m) * t.rank + k] * t.A[k * cols + j];
      any_bad |= !(std::fabs(x) < lim);
      from_f32(&x, static_cast<unsigned char*>(job.out) + idx * osz, job.out_type, 1);
    }
  }
  return any_bad;
}

template <DType TW, DType TO>
bool block_kernel(const FusedJob& job, std::int64_t r0, std::int64_t nr) {
  bool bad = false;
  std::int64_t i = 0;
  for (; i + MR <= nr; i += MR) bad |= rows_kernel<TW, TO, MR>(job, r0 + i);
  for (; i < nr; ++i) bad |= rows_kernel<TW, TO, 1>(job, r0 + i);
  return bad;
}

template <DType TW>
bool dispatch_out(const FusedJob& job, std::int64_t r0, std::int64_t nr) {
  switch (job.out_type) {
    case DType::F32: return block_kernel<TW, DType::F32>(job, r0, nr);
    case DType::BF16: return block_kernel<TW, DType::BF16>(job, r0, nr);
    case DType::F16: return block_kernel<TW, DType::F16>(job, r0, nr);
    default: return false;  // not reached: fused_supported() checked the types
  }
}

}  // namespace

bool fused_supported(DType w_type, DType out_type) noexcept {
  const auto ok = [](DType d) { return d == DType::F32 || d == DType::BF16 || d == DType::F16; };
  return ok(w_type) && ok(out_type);
}

bool fused_rows(const FusedJob& job, std::int64_t r0, std::int64_t nr) {
  switch (job.w_type) {
    case DType::F32: return dispatch_out<DType::F32>(job, r0, nr);
    case DType::BF16: return dispatch_out<DType::BF16>(job, r0, nr);
    case DType::F16: return dispatch_out<DType::F16>(job, r0, nr);
    default: return false;
  }
}

}  // namespace lorafuse
