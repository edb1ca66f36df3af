// Device-side dtype conversions of the CUDA backend, bit for bit those of the CPU core's scalar code
// (cpp/src/dtype.cpp), for any .cu file to use inside its own kernels, plus the host launchers of
// the whole-buffer conversion kernels (defined in dtype.cu) that work on device pointers.
//
// Decoding (-> float32) is exact:
//   F32   the bits themselves (NaN payloads kept).
//   BF16  bits << 16.
//   F16   dtype.cpp f16_to_f32: subnormals exact, Inf, NaN with its payload (not quieted).
//   F64   round to nearest even (__double2float_rn: overflow to Inf, float32 subnormals exact);
//         a NaN becomes what x86 cvtsd2ss (and numpy's cast) makes of it: the sign, the quiet bit
//         and the top 22 payload bits.
//   F8_E4M3 the "fn" variant: no Inf; S.1111.111 is the quiet NaN 0x7FC00000 of that sign
//         (dtype.cpp's table: +-nanf("")); exponent 0 is mant * 2^-9.
//   F8_E5M2 the top byte of a binary16: f16_to_f32(b << 8).
// Encoding (float32 ->) rounds to nearest even:
//   BF16  (u + 0x7FFF + lsb) >> 16; a NaN becomes (u >> 16) | 0x0040 (its payload kept, quieted).
//   F16   dtype.cpp f32_to_f16: subnormals and overflow (>= 65520 -> Inf) rounded correctly; a NaN
//         becomes 0x7E00 of its sign (the scalar code's and the reference backend's choice).
// The overflow test of the merge is `!(fabsf(x) < limit)`, limit = overflow_threshold(out_type)
// (dtype.hpp): NaN, Inf, and finite float32 values that round to Inf in the output type.
//
// Compile without --use_fast_math / -ftz=true: F64 -> F32 must keep float32 subnormals, and the
// kernels of the merge rely on IEEE float32 arithmetic.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "lorafuse/dtype.hpp"

#if defined(__USE_FAST_MATH__)
#error "lorafuse's CUDA kernels need IEEE float32 arithmetic: do not build them with --use_fast_math"
#endif

namespace lorafuse::cuda {

namespace dev {

// ---- scalar conversions (device) ----

__device__ __forceinline__ float bf16_to_f32(std::uint16_t h) { return __uint_as_float(static_cast<unsigned>(h) << 16); }

__device__ __forceinline__ std::uint16_t f32_to_bf16(float f) {
  const unsigned u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  return static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float f16_to_f32(std::uint16_t h) {
  const unsigned sign = static_cast<unsigned>(h & 0x8000u) << 16;
  const unsigned exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {
    // mant * 2^-24: exact (mant < 2^10, the product is a normal float32 or zero)
    const float v = __fmul_rn(static_cast<float>(mant), 5.9604644775390625e-8f);
    return __uint_as_float(sign | __float_as_uint(v));
  }
  if (exp == 0x1F) return __uint_as_float(sign | 0x7F800000u | (mant << 13));
  return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

__device__ __forceinline__ std::uint16_t f32_to_f16(float f) {
  unsigned u = __float_as_uint(f);
  const unsigned sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  unsigned o;
  if (u >= (143u << 23)) {  // >= 65536, Inf, NaN (65520 .. 65536 carries into Inf below)
    o = (u > 0x7F800000u) ? 0x7E00u : 0x7C00u;
  } else if (u < (113u << 23)) {  // below the smallest normal half: the float addition rounds
    const unsigned magic = 126u << 23;  // 0.5: the half subnormal ulp 2^-24 becomes the float ulp
    o = __float_as_uint(__fadd_rn(__uint_as_float(u), __uint_as_float(magic))) - magic;
  } else {
    const unsigned odd = (u >> 13) & 1u;
    u += (static_cast<unsigned>(15 - 127) << 23) + 0xFFFu + odd;
    o = u >> 13;
  }
  return static_cast<std::uint16_t>(o | sign);
}

__device__ __forceinline__ float f64_to_f32(double d) {
  const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(d));
  if ((u & 0x7FFFFFFFFFFFFFFFull) > 0x7FF0000000000000ull) {  // NaN: sign, quiet bit, top payload bits
    const unsigned sign = static_cast<unsigned>(u >> 32) & 0x80000000u;
    return __uint_as_float(sign | 0x7FC00000u | static_cast<unsigned>((u >> 29) & 0x7FFFFFull));
  }
  return __double2float_rn(d);
}

__device__ __forceinline__ float e4m3_to_f32(std::uint8_t b) {
  const unsigned sign = static_cast<unsigned>(b & 0x80u) << 24;
  const unsigned exp = (b >> 3) & 0xFu, mant = b & 0x7u;
  unsigned v;
  if (exp == 0xF && mant == 0x7) {
    v = 0x7FC00000u;  // nanf("")
  } else if (exp == 0) {
    v = __float_as_uint(__fmul_rn(static_cast<float>(mant), 0.001953125f));  // mant * 2^-9, exact
  } else {
    v = ((exp + 120u) << 23) | (mant << 20);  // (1 + mant / 8) * 2^(exp - 7)
  }
  return __uint_as_float(sign | v);
}

__device__ __forceinline__ float e5m2_to_f32(std::uint8_t b) { return f16_to_f32(static_cast<std::uint16_t>(b << 8)); }

// ---- element access by type (T a DType) ----

// Element i of a raw buffer of type T, as float32.
template <DType T>
__device__ __forceinline__ float load_f32(const void* base, std::int64_t i) {
  if constexpr (T == DType::F32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (T == DType::BF16) {
    return bf16_to_f32(static_cast<const std::uint16_t*>(base)[i]);
  } else if constexpr (T == DType::F16) {
    return f16_to_f32(static_cast<const std::uint16_t*>(base)[i]);
  } else if constexpr (T == DType::F64) {
    return f64_to_f32(static_cast<const double*>(base)[i]);
  } else if constexpr (T == DType::F8_E4M3) {
    return e4m3_to_f32(static_cast<const std::uint8_t*>(base)[i]);
  } else {
    static_assert(T == DType::F8_E5M2, "load_f32: unknown dtype");
    return e5m2_to_f32(static_cast<const std::uint8_t*>(base)[i]);
  }
}

// Elements i .. i+3 (i a multiple of 4, the buffer 16-byte aligned) of F32 / BF16 / F16, as float32.
template <DType T>
__device__ __forceinline__ void load4_f32(const void* base, std::int64_t i, float (&x)[4]) {
  if constexpr (T == DType::F32) {
    const float4 v = *reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
    x[0] = v.x;
    x[1] = v.y;
    x[2] = v.z;
    x[3] = v.w;
  } else {
    static_assert(T == DType::BF16 || T == DType::F16, "load4_f32: F32, BF16 or F16");
    const uint2 v = *reinterpret_cast<const uint2*>(static_cast<const std::uint16_t*>(base) + i);
    const std::uint16_t h[4] = {static_cast<std::uint16_t>(v.x & 0xFFFFu), static_cast<std::uint16_t>(v.x >> 16),
                                static_cast<std::uint16_t>(v.y & 0xFFFFu), static_cast<std::uint16_t>(v.y >> 16)};
#pragma unroll
    for (int e = 0; e < 4; ++e) x[e] = (T == DType::BF16) ? bf16_to_f32(h[e]) : f16_to_f32(h[e]);
  }
}

// Stores x as element i of a buffer of the writable type T (rounded to nearest even).
template <DType T>
__device__ __forceinline__ void store_f32(void* base, std::int64_t i, float x) {
  if constexpr (T == DType::F32) {
    static_cast<float*>(base)[i] = x;
  } else if constexpr (T == DType::BF16) {
    static_cast<std::uint16_t*>(base)[i] = f32_to_bf16(x);
  } else {
    static_assert(T == DType::F16, "store_f32: F32, BF16 or F16");
    static_cast<std::uint16_t*>(base)[i] = f32_to_f16(x);
  }
}

// Stores x[0..3] as elements i .. i+3 (i a multiple of 4, the buffer 16-byte aligned).
template <DType T>
__device__ __forceinline__ void store4_f32(void* base, std::int64_t i, const float (&x)[4]) {
  if constexpr (T == DType::F32) {
    *reinterpret_cast<float4*>(static_cast<float*>(base) + i) = make_float4(x[0], x[1], x[2], x[3]);
  } else {
    static_assert(T == DType::BF16 || T == DType::F16, "store4_f32: F32, BF16 or F16");
    std::uint16_t h[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) h[e] = (T == DType::BF16) ? f32_to_bf16(x[e]) : f32_to_f16(x[e]);
    *reinterpret_cast<uint2*>(static_cast<std::uint16_t*>(base) + i) =
        make_uint2(static_cast<unsigned>(h[0]) | (static_cast<unsigned>(h[1]) << 16),
                   static_cast<unsigned>(h[2]) | (static_cast<unsigned>(h[3]) << 16));
  }
}

// True when x is stored as a finite value of the output type whose overflow threshold is `limit`
// (false for NaN, Inf and values that round to Inf): the CPU core's `|x| < overflow_threshold`.
__device__ __forceinline__ bool storable(float x, float limit) { return fabsf(x) < limit; }

}  // namespace dev

// ---- whole-buffer conversions on device pointers (dtype.cu), enqueued on `stream` ----
// `what` names the work in error messages (a launch failure raises Error(Device)).

// n elements of `dt` at raw -> n floats at out.
void launch_to_f32(const void* raw, DType dt, float* out, std::int64_t n, cudaStream_t stream, const std::string& what);
// n floats at x -> n elements of the writable `dt` at out (out may equal x only for F32). When
// `bad` is set, *bad is set to 1 if any value is not storable (NaN, Inf, overflow in dt); it is
// never cleared here.
void launch_from_f32(const float* x, DType dt, void* out, std::int64_t n, unsigned* bad, cudaStream_t stream,
                     const std::string& what);
// Only the check of launch_from_f32: *bad = 1 if any of the n floats is not storable in dt.
void launch_check_storable(const float* x, DType dt, std::int64_t n, unsigned* bad, cudaStream_t stream,
                           const std::string& what);
// Host memcpy of `bytes` bytes (caller memory <-> pinned staging), split into 4 MiB pieces over up
// to `threads` threads (0: all, at most 16) when large: a read of a memory-mapped file faults its
// pages in on several threads at once. Runs on the calling thread when small.
void parallel_copy(void* dst, const void* src, std::size_t bytes, int threads);
// Grid size of the element-wise kernels: enough blocks of 256 threads for n elements (each thread
// a few), at most 2^16.
unsigned elementwise_blocks(std::int64_t n);

}  // namespace lorafuse::cuda
