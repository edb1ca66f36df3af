// Vectors for the kernels written with GCC/Clang vector extensions (fused_lowrank.cpp, sketch.cpp), whose width
// follows the build's instruction set: 16 float lanes (zmm) in the AVX-512 core, 8 (ymm) in the AVX2 core and
// SSE2 pairs of 4 in the generic one; and the load of VL stored elements widened to float32 in a register.
#pragma once
#include <cstdint>
#include <cstring>

#include "lorafuse/dtype.hpp"

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define LORAFUSE_HAVE_F16C 1
#endif

namespace lorafuse::simd {

#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif

typedef float vf __attribute__((vector_size(4 * VL)));
typedef std::uint32_t vu __attribute__((vector_size(4 * VL)));
typedef std::int32_t vi __attribute__((vector_size(4 * VL)));
typedef std::uint16_t vh __attribute__((vector_size(2 * VL)));

// VL elements of type T (F32, BF16 or F16) at element i of base, as float32. F16 goes through F16C where the
// build has it, which quiets a signalling NaN (fused_lowrank.cpp restores the scalar rule where it matters),
// else through the scalar conversion.
template <DType T>
inline vf widen(const void* base, std::int64_t i) {
  vf v;
  if constexpr (T == DType::F32) {
    std::memcpy(&v, static_cast<const float*>(base) + i, sizeof(vf));
  } else if constexpr (T == DType::BF16) {
    vh h;
    std::memcpy(&h, static_cast<const std::uint16_t*>(base) + i, sizeof(vh));
    const vu u = __builtin_convertvector(h, vu) << 16;
    std::memcpy(&v, &u, sizeof(vf));
  } else {
    static_assert(T == DType::F16, "widen: F32, BF16 or F16");
    const auto* p = static_cast<const std::uint16_t*>(base) + i;
#if defined(LORAFUSE_HAVE_F16C) && defined(__AVX512F__)
    // the masked form: GCC 12 warns about the unmasked one's undefined pass-through
    const __m512 x = _mm512_mask_cvtph_ps(_mm512_setzero_ps(), 0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    std::memcpy(&v, &x, sizeof(vf));
#elif defined(LORAFUSE_HAVE_F16C)
    const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    std::memcpy(&v, &x, sizeof(vf));
#else
    float tmp[VL];
    to_f32(p, DType::F16, tmp, VL);
    std::memcpy(&v, tmp, sizeof(vf));
#endif
  }
  return v;
}

}  // namespace lorafuse::simd
