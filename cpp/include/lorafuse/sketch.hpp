// The streamed combine's products (sketch_fold): one module's sketch accumulators folded over a chunk of
// adapters, read from the adapters' factors as stored (BF16, F16, F32 widened in registers as they are
// loaded; other dtypes through a float32 copy), not from float32 stacks of them.
#pragma once
#include <string>
#include <vector>

#include "lorafuse/dtype.hpp"
#include "lorafuse/tensor.hpp"

namespace lorafuse {

// One adapter's term c B A of a module: a (r x in) and b (out x r), raw elements of a_type / b_type
// (BF16 as uint16, F8 as uint8), C-contiguous; `what` names the adapter's factors in errors.
struct SketchTerm {
  TensorView a, b;
  DType a_type = DType::F32, b_type = DType::F32;
  double coef = 1.0;
  std::string what;
};

// A range job: acc (out x w, float64) += sum_i c_i B_i (A_i X), x (in x w, float32).
// A corange job: acc (in x w, float64) += sum_i c_i A_i^T (B_i^T X), x (out x w, float32).
// Each term's inner product in float32 with its coefficient rounded to float32 (T_i = c_i A_i X, or
// c_i B_i^T X), the job's sum over its terms in float32, added once to acc.
struct SketchJob {
  std::vector<SketchTerm> terms;
  bool corange = false;
  TensorView x, acc;
  std::string what;  // names the module in errors
};

// Checks every job (Dtype, Value, ShapeMismatch naming the module, the term and the shapes) before any
// is run, then runs them spread over `threads` threads (one job per thread: its sums keep their order).
void sketch_fold_batch(const std::vector<SketchJob>& jobs, int threads);

}  // namespace lorafuse
