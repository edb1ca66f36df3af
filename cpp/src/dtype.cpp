#include "lorafuse/dtype.hpp"

#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "lorafuse/errors.hpp"
#include "float_bits.hpp"

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define LORAFUSE_HAVE_F16C 1
#endif

namespace lorafuse {
namespace {

using detail::bits_of;
using detail::float_of;

// E4M3 "fn" variant (no infinities; S.1111.111 is NaN) and E5M2 (IEEE-like, the
// top byte of a binary16). Both decode through a 256-entry table.
std::array<float, 256> make_e4m3_table() {
  std::array<float, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int sign = b >> 7, exp = (b >> 3) & 0xF, mant = b & 0x7;
    float v;
    if (exp == 0xF && mant == 0x7) {
      v = std::nanf("");
    } else if (exp == 0) {
      v = std::ldexp(static_cast<float>(mant), -9);
    } else {
      v = std::ldexp(1.0f + static_cast<float>(mant) / 8.0f, exp - 7);
    }
    t[b] = sign ? -v : v;
  }
  return t;
}
std::array<float, 256> make_e5m2_table() {
  std::array<float, 256> t{};
  for (int b = 0; b < 256; ++b) t[b] = f16_to_f32(static_cast<std::uint16_t>(b << 8));
  return t;
}

}  // namespace

float bf16_to_f32(std::uint16_t h) noexcept { return float_of(static_cast<std::uint32_t>(h) << 16); }

std::uint16_t f32_to_bf16(float f) noexcept {
  const std::uint32_t u = bits_of(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  return static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

float f16_to_f32(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24
    return float_of(sign | bits_of(v));
  }
  if (exp == 0x1F) return float_of(sign | 0x7F800000u | (mant << 13));
  return float_of(sign | ((exp + 112u) << 23) | (mant << 13));
}

std::uint16_t f32_to_f16(float f) noexcept {
  std::uint32_t u = bits_of(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  std::uint32_t o;
  if (u >= (143u << 23)) {  // >= 65536 (after rounding everything >= 65520 overflows below), Inf, NaN
    o = (u > 0x7F800000u) ? 0x7E00u : 0x7C00u;
  } else if (u < (113u << 23)) {  // below the smallest normal half: let float addition round
    const std::uint32_t magic = 126u << 23;  // 0.5: aligns the half subnormal ulp (2^-24) to the float ulp
    o = bits_of(float_of(u) + float_of(magic)) - magic;
  } else {
    const std::uint32_t odd = (u >> 13) & 1u;
    u += (static_cast<std::uint32_t>(15 - 127) << 23) + 0xFFFu + odd;
    o = u >> 13;  // a carry into the exponent rounds up to Inf at 65520 correctly
  }
  return static_cast<std::uint16_t>(o | sign);
}

DType dtype_from_name(const std::string& name) {
  if (name == "F32") return DType::F32;
  if (name == "F16") return DType::F16;
  if (name == "BF16") return DType::BF16;
  if (name == "F64") return DType::F64;
  if (name == "F8_E4M3") return DType::F8_E4M3;
  if (name == "F8_E5M2") return DType::F8_E5M2;
  throw Error(ErrorKind::Dtype, "unsupported dtype '" + name +
                                    "' (the core handles F32, F16, BF16, F64, F8_E4M3, F8_E5M2)");
}

const char* dtype_name(DType d) noexcept {
  switch (d) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F64: return "F64";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::F8_E5M2: return "F8_E5M2";
  }
  return "?";
}

std::size_t itemsize(DType d) noexcept {
  switch (d) {
    case DType::F32: return 4;
    case DType::F16:
    case DType::BF16: return 2;
    case DType::F64: return 8;
    case DType::F8_E4M3:
    case DType::F8_E5M2: return 1;
  }
  return 0;
}

bool writable(DType d) noexcept { return d == DType::F32 || d == DType::F16 || d == DType::BF16; }

void to_f32(const void* src, DType src_type, float* dst, std::size_t n) {
  switch (src_type) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::BF16: {
      const auto* s = static_cast<const std::uint16_t*>(src);
      auto* d = reinterpret_cast<std::uint32_t*>(dst);
      for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<std::uint32_t>(s[i]) << 16;
      return;
    }
    case DType::F16: {
      const auto* s = static_cast<const std::uint16_t*>(src);
      std::size_t i = 0;
#ifdef LORAFUSE_HAVE_F16C
      // F16C quiets a signalling NaN; the scalar rule (and numpy's, the reference's) keeps its bits: a
      // block holding a NaN (rare) is done again through f16_to_f32, one test per 32 values
      for (; i + 32 <= n; i += 32) {
        __m256 nan = _mm256_setzero_ps();
        for (std::size_t k = i; k < i + 32; k += 8) {
          const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k)));
          nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
          _mm256_storeu_ps(dst + k, x);
        }
        if (_mm256_movemask_ps(nan) != 0)
          for (std::size_t k = i; k < i + 32; ++k) dst[k] = f16_to_f32(s[k]);
      }
      for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
        _mm256_storeu_ps(dst + i, x);
        if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)) != 0)
          for (std::size_t k = i; k < i + 8; ++k) dst[k] = f16_to_f32(s[k]);
      }
#endif
      for (; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::F64: {
      const auto* s = static_cast<const double*>(src);
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      return;
    }
    case DType::F8_E4M3: {
      static const std::array<float, 256> table = make_e4m3_table();
      const auto* s = static_cast<const std::uint8_t*>(src);
      for (std::size_t i = 0; i < n; ++i) dst[i] = table[s[i]];
      return;
    }
    case DType::F8_E5M2: {
      static const std::array<float, 256> table = make_e5m2_table();
      const auto* s = static_cast<const std::uint8_t*>(src);
      for (std::size_t i = 0; i < n; ++i) dst[i] = table[s[i]];
      return;
    }
  }
}

void from_f32(const float* src, void* dst, DType dst_type, std::size_t n) {
  switch (dst_type) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::BF16: {
      const auto* s = reinterpret_cast<const std::uint32_t*>(src);
      auto* d = static_cast<std::uint16_t*>(dst);
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint32_t u = s[i];
        const std::uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        const std::uint32_t nan = (u >> 16) | 0x0040u;
        d[i] = static_cast<std::uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
      }
      return;
    }
    case DType::F16: {
      auto* d = static_cast<std::uint16_t*>(dst);
      std::size_t i = 0;
#ifdef LORAFUSE_HAVE_F16C
      // F16C keeps a NaN's top payload bits; the rule is f32_to_f16's 0x7E00 of its sign (the reference
      // backend's and the CUDA kernels'): a block holding a NaN (rare) is done again through it, one
      // test per 32 values
      for (; i + 32 <= n; i += 32) {
        __m256 nan = _mm256_setzero_ps();
        for (std::size_t k = i; k < i + 32; k += 8) {
          const __m256 x = _mm256_loadu_ps(src + k);
          nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + k), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
        }
        if (_mm256_movemask_ps(nan) != 0)
          for (std::size_t k = i; k < i + 32; ++k) d[k] = f32_to_f16(src[k]);
      }
      for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(src + i);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
        if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)) != 0)
          for (std::size_t k = i; k < i + 8; ++k) d[k] = f32_to_f16(src[k]);
      }
#endif
      for (; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    default:
      throw Error(ErrorKind::Dtype, std::string("cannot write dtype ") + dtype_name(dst_type) +
                                        " (lorafuse writes F32, F16 and BF16)");
  }
}

float overflow_threshold(DType d) noexcept {
  switch (d) {
    case DType::F16:
      return 65520.0f;  // halfway between 65504 and the next binade: rounds to even = Inf
    case DType::BF16:
      return float_of(0x7F7F8000u);  // halfway above 0x7F7F (odd): rounds up to Inf
    default:
      return std::numeric_limits<float>::infinity();
  }
}

}  // namespace lorafuse
