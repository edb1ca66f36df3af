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
// (DoRA), each row is then rescaled to magnitude[row] / ||row||_2.
struct MergeStage {
  const float* B = nullptr;
  const float* A = nullptr;
  std::int64_t rank = 0;
  const float* magnitude = nullptr;
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
