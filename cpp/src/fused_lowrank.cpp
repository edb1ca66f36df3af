// The fast path of the merge: out = round(W + sum_s B_s A_s) with no intermediate
// tile. A register block of MR rows x 16 columns is loaded from W (converted to
// float32 in registers), accumulates every rank-1 term of every stage, and is
// rounded straight into the output. Written with GCC/Clang vector extensions so
// it compiles to AVX2/FMA under -march=native and to SSE2 pairs otherwise.
#include "lorafuse/fused_lowrank.hpp"

#include <cmath>
#include <cstring>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define LORAFUSE_HAVE_F16C 1
#endif

namespace lorafuse {
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef std::uint32_t v8u __attribute__((vector_size(32)));
typedef std::int32_t v8i __attribute__((vector_size(32)));
typedef std::uint16_t v8h __attribute__((vector_size(16)));

constexpr int MR = 4;   // rows per register block
constexpr int NR = 16;  // columns per register block (two vectors)

template <DType T>
inline v8f load8(const void* base, std::int64_t i) {
  v8f v;
  if constexpr (T == DType::F32) {
    std::memcpy(&v, static_cast<const float*>(base) + i, 32);
  } else if constexpr (T == DType::BF16) {
    v8h h;
    std::memcpy(&h, static_cast<const std::uint16_t*>(base) + i, 16);
    const v8u u = __builtin_convertvector(h, v8u) << 16;
    std::memcpy(&v, &u, 32);
  } else {
    static_assert(T == DType::F16, "load8: F32, BF16 or F16");
#ifdef LORAFUSE_HAVE_F16C
    const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
        static_cast<const std::uint16_t*>(base) + i)));
    std::memcpy(&v, &x, 32);
#else
    float tmp[8];
    to_f32(static_cast<const std::uint16_t*>(base) + i, DType::F16, tmp, 8);
    std::memcpy(&v, tmp, 32);
#endif
  }
  return v;
}

template <DType T>
inline void store8(void* base, std::int64_t i, v8f v) {
  if constexpr (T == DType::F32) {
    std::memcpy(static_cast<float*>(base) + i, &v, 32);
  } else if constexpr (T == DType::BF16) {
    v8u u;
    std::memcpy(&u, &v, 32);
    const v8u rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const v8u nan = (u >> 16) | 0x40u;
    const v8u sel = ((u & 0x7FFFFFFFu) > 0x7F800000u) ? nan : rounded;
    const v8h h = __builtin_convertvector(sel, v8h);
    std::memcpy(static_cast<std::uint16_t*>(base) + i, &h, 16);
  } else {
    static_assert(T == DType::F16, "store8: F32, BF16 or F16");
#ifdef LORAFUSE_HAVE_F16C
    __m256 x;
    std::memcpy(&x, &v, 32);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<std::uint16_t*>(base) + i),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
#else
    float tmp[8];
    std::memcpy(tmp, &v, 32);
    from_f32(tmp, static_cast<std::uint16_t*>(base) + i, DType::F16, 8);
#endif
  }
}

// Lanes of v that are NaN or Inf, or finite but stored as Inf in the output type:
// |v| < limit fails exactly for those (limit = overflow_threshold of the output).
inline v8i not_storable_mask(v8f v, v8f limit) {
  v8u u;
  std::memcpy(&u, &v, 32);
  u &= 0x7FFFFFFFu;
  v8f a;
  std::memcpy(&a, &u, 32);
  return ~(a < limit);
}

template <DType TW, DType TO, int M>
bool rows_kernel(const FusedJob& job, std::int64_t r0) {
  const std::int64_t cols = job.cols;
  const float lim = overflow_threshold(TO);
  const v8f limit = {lim, lim, lim, lim, lim, lim, lim, lim};
  v8i bad = {};
  std::int64_t j = 0;
  for (; j + NR <= cols; j += NR) {
    v8f acc[M][2];
    for (int m = 0; m < M; ++m) {
      acc[m][0] = load8<TW>(job.w, (r0 + m) * cols + j);
      acc[m][1] = load8<TW>(job.w, (r0 + m) * cols + j + 8);
    }
    for (const FusedTerm& t : job.terms) {
      const float* b = t.B + r0 * t.rank;
      for (std::int64_t k = 0; k < t.rank; ++k) {
        v8f a0, a1;
        std::memcpy(&a0, t.A + k * cols + j, 32);
        std::memcpy(&a1, t.A + k * cols + j + 8, 32);
        for (int m = 0; m < M; ++m) {
          const float bk = b[m * t.rank + k];
          acc[m][0] += bk * a0;
          acc[m][1] += bk * a1;
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      bad |= not_storable_mask(acc[m][0], limit) | not_storable_mask(acc[m][1], limit);
      store8<TO>(job.out, (r0 + m) * cols + j, acc[m][0]);
      store8<TO>(job.out, (r0 + m) * cols + j + 8, acc[m][1]);
    }
  }
  bool any_bad = false;
  for (int l = 0; l < 8; ++l) any_bad |= bad[l] != 0;
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
