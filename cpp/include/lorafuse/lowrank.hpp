// Exact quantities of low-rank products computed from the factors alone.
#pragma once
#include <cstdint>

namespace lorafuse {

// ||B A||_F^2 = sum((B^T B) .* (A A^T)), in float64, for B (out x r), A (r x in).
double factored_frobenius_sq(const float* B, const float* A, std::int64_t out, std::int64_t r,
                             std::int64_t in);

}  // namespace lorafuse
