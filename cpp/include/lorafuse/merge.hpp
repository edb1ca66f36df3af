// The fused merge W' = W + sum_i w_i s_i B_i A_i (and DoRA renormalization),
// computed tile by tile in float32 and rounded once to the output type.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "lorafuse/dtype.hpp"

namespace lorafuse {

// One additive stage: tile += B[rows, rank] @ A[rank, cols] (both row-major float32,
// with every weight and scale already folded into B). When `magnitude` is set
// (DoRA), the result is then rescaled so each row (or, with `column_norm`, each
// column) has the norm magnitude[i]. Column norms need the whole matrix: they are
// found by an extra pass over the tiles before the pass that writes the output.
struct MergeStage {
  const float* B = nullptr;
  const float* A = nullptr;
  std::int64_t rank = 0;
  const float* magnitude = nullptr;
  bool column_norm = false;
  std::vector<float> column_scale;  // filled by merge_batch for column_norm stages
};

struct MergeJob {
  std::string name;
  const void* w = nullptr;  // rows x cols, row-major, of type w_type
  DType w_type = DType::F32;
  void* out = nullptr;      // rows x cols, row-major, of type out_type
  DType out_type = DType::F32;
  std::int64_t rows = 0, cols = 0;
  std::vector<MergeStage> stages;
  bool nonfinite = false;   // set when any output value is NaN or Inf
};

// Runs every job; (job, row block) pairs are spread over `threads` threads.
void merge_batch(std::vector<MergeJob>& jobs, int threads);

}  // namespace lorafuse
