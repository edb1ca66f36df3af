// Internal to the core: the finiteness check of float32 inputs and results (and of float64
// SVD results), one copy for every kernel (svd, task merge, range finder, extract).
#pragma once
#include <cstdint>

namespace lorafuse::detail {

// Whether n floats are all finite. The sum of x - x is 0 for finite x and NaN as soon as
// one entry is NaN or Inf; no early exit keeps the loop vectorized.
inline bool all_finite(const float* p, std::int64_t n) noexcept {
  float acc = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) acc += p[i] - p[i];
  return acc == 0.0f;
}

// The same for n doubles (singular values and vectors of the float64 SVDs).
inline bool all_finite(const double* p, std::int64_t n) noexcept {
  double acc = 0.0;
  for (std::int64_t i = 0; i < n; ++i) acc += p[i] - p[i];
  return acc == 0.0;
}

}  // namespace lorafuse::detail
