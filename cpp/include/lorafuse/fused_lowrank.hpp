// Register-blocked out = round(W + sum_t B_t A_t) for rows of a weight, with the
// dtype conversions done in registers (no float32 tile). Used by merge_batch for
// jobs without DoRA stages when W and the output are F32, BF16 or F16.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "lorafuse/dtype.hpp"

namespace lorafuse {

struct FusedTerm {
  const float* B;  // rows x rank, row-major
  const float* A;  // rank x cols, row-major
  std::int64_t rank;
};

struct FusedJob {
  const void* w;
  DType w_type;
  void* out;
  DType out_type;
  std::int64_t cols;
  std::vector<FusedTerm> terms;
};

bool fused_supported(DType w_type, DType out_type) noexcept;
// Rows [r0, r0 + nr); returns true when any output value is NaN or Inf.
bool fused_rows(const FusedJob& job, std::int64_t r0, std::int64_t nr);

}  // namespace lorafuse
