// Exact quantities of low-rank products computed from the factors alone.
#pragma once
#include <cstdint>
#include <vector>

#include "lorafuse/tensor.hpp"

namespace lorafuse {

// ||B A||_F^2 = sum((B^T B) .* (A A^T)), in float64, for B (out x r), A (r x in).
double factored_frobenius_sq(const float* B, const float* A, std::int64_t out, std::int64_t r,
                             std::int64_t in);

// <B1 A1, B2 A2>_F = sum((B1^T B2) .* (A1 A2^T)), in float64, for B1 (out x r1), A1 (r1 x in),
// B2 (out x r2), A2 (r2 x in): O((out + in) r1 r2), no dense matrix.
double factored_inner(const float* B1, const float* A1, std::int64_t r1, const float* B2, const float* A2,
                      std::int64_t r2, std::int64_t out, std::int64_t in);

// Checked batches from the caller's arrays (the entry points a binding calls). Every B and A
// must be float32, C-contiguous and 2-D with shapes that multiply (and, for an inner product,
// describe two updates of one shape): else Error naming the operands and their shapes,
// before anything is computed. Results: one float64 per pair / quadruple, written to `out`.
struct FactorPairView {
  TensorView B, A;
};
struct FactorInnerView {
  TensorView B1, A1, B2, A2;
};
void factored_frobenius_sq_batch(const std::vector<FactorPairView>& pairs, double* out, int threads);
void factored_inner_batch(const std::vector<FactorInnerView>& items, double* out, int threads);
// factored_inner_batch's checks (every backend's): float32 2-D factors describing two deltas of one
// shape (ShapeMismatch naming the four shapes), and an output buffer unless there are no items.
void check_factor_inner_items(const std::vector<FactorInnerView>& items, const double* out);

}  // namespace lorafuse
