// The fused merge W' = W + sum_i delta_i (and DoRA renormalization), computed tile
// by tile in float32 and rounded once to the output type. A delta is low-rank
// (B A), a LoHa Hadamard product ((B1 A1) * (B2 A2), elementwise) or a LoKr
// Kronecker product (kron(W1, W2)); none is ever materialized whole.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "lorafuse/dtype.hpp"
#include "lorafuse/tensor.hpp"

namespace lorafuse {

enum class StageKind { LowRank, Hadamard, Kron };

// One additive stage, all factors row-major float32 with every weight and scale
// already folded in (into B, B1 or W1):
//   LowRank:  tile += B[rows, rank] @ A[rank, cols]
//   Hadamard: tile += (B[rows, rank] @ A[rank, cols]) * (B2[rows, rank2] @ A2[rank2, cols])
//   Kron:     tile(i, j) += W1[(i + row_offset) / c, j / d] * W2[(i + row_offset) % c, j % d]
//             with W1 (a x b), W2 (c x d), b * d == cols and row_offset + rows <= a * c
//             (row_offset lets a caller merge a block of rows of a larger weight).
// When `magnitude` is set (DoRA), the result so far is then rescaled: each row (or, with
// `column_norm`, each column) i times magnitude[i] / ||row i of W + this stage's own delta||
// (PEFT's DoRA merge: each adapter's norm is of the base weight plus its own delta, not of
// the stages before it; for the first stage the two are the same). Column norms need the
// whole matrix: they are found by an extra pass over the tiles before the pass that
// writes the output.
struct MergeStage {
  StageKind kind = StageKind::LowRank;
  const float* B = nullptr;  // LowRank and Hadamard: first factor pair
  const float* A = nullptr;
  std::int64_t rank = 0;
  const float* B2 = nullptr;  // Hadamard: second factor pair
  const float* A2 = nullptr;
  std::int64_t rank2 = 0;
  const float* W1 = nullptr;  // Kron: W1 (a x b), W2 (c x d)
  const float* W2 = nullptr;
  std::int64_t a = 0, b = 0, c = 0, d = 0;
  std::int64_t row_offset = 0;
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
  bool nonfinite = false;   // set when any output value is NaN or Inf, or overflows out_type
};

// Checked jobs and stages from the caller's arrays (the entry points a binding calls); each
// raises Error naming the module, the operand and the shapes (ShapeMismatch for shapes that
// do not fit the base weight, Dtype for element types, Value for layout).
//   make_merge_job: w and out raw 2-D buffers of one shape (out writeable, out_type writable).
//   make_lowrank_stage: B (rows x r) and A (r x cols), float32.
//   make_hadamard_stage: (B1, A1, B2, A2), LoHa.
//   make_kron_stage: W1 (a x b), W2 (c x d) with b d = cols and a c = rows, or with a row
//     offset (has_offset): rows [row_offset, row_offset + rows) of kron(W1, W2).
//   set_magnitude: the DoRA magnitude of a stage, one value per row (per column with column_norm).
MergeJob make_merge_job(const std::string& name, const TensorView& w, DType w_type, const TensorView& out,
                        DType out_type);
MergeStage make_lowrank_stage(const MergeJob& job, const TensorView& B, const TensorView& A);
MergeStage make_hadamard_stage(const MergeJob& job, const TensorView& B1, const TensorView& A1, const TensorView& B2,
                               const TensorView& A2);
MergeStage make_kron_stage(const MergeJob& job, const TensorView& W1, const TensorView& W2, bool has_offset,
                           std::int64_t row_offset);
void set_magnitude(MergeStage& stage, const MergeJob& job, const TensorView& magnitude, bool column_norm);

// Runs every job; (job, row block) pairs are spread over `threads` threads. Jobs
// with only low-rank stages and no DoRA take a register-blocked path; the others
// go through float32 tiles. Results do not depend on the thread count.
void merge_batch(std::vector<MergeJob>& jobs, int threads);

}  // namespace lorafuse
