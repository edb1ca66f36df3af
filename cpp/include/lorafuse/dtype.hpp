// Element types of safetensors tensors that the core reads and writes, and
// conversion to and from float32 (round to nearest even on the way down).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace lorafuse {

enum class DType : int { F32, F16, BF16, F64, F8_E4M3, F8_E5M2 };

DType dtype_from_name(const std::string& name);  // safetensors names: "F32", "BF16", ...
const char* dtype_name(DType d) noexcept;
std::size_t itemsize(DType d) noexcept;
bool writable(DType d) noexcept;  // F32, F16, BF16
// The smallest float32 magnitude that is stored as Inf in `d` (round to nearest even):
// 65520 for F16, 0x7F7F8000 (about 3.3961e38) for BF16, Inf for F32. A float32 x is
// written as a finite value exactly when |x| < overflow_threshold(d) (false for NaN).
float overflow_threshold(DType d) noexcept;

// n elements of type `src_type` at `src` -> n floats at `dst`.
void to_f32(const void* src, DType src_type, float* dst, std::size_t n);
// n floats -> n elements of a writable type, rounded to nearest even.
void from_f32(const float* src, void* dst, DType dst_type, std::size_t n);

// Scalar conversions, exposed for tests of the vector paths.
float bf16_to_f32(std::uint16_t h) noexcept;
std::uint16_t f32_to_bf16(float f) noexcept;
float f16_to_f32(std::uint16_t h) noexcept;
std::uint16_t f32_to_f16(float f) noexcept;

}  // namespace lorafuse
