// LoRA extraction: the best rank-k factors of D = W_ft - W_base by a randomized SVD
// (Halko, Martinsson, Tropp 2011) that never forms D.
//
// Every product with D streams over panels of a few rows: chunks of both raw matrices
// are converted to float32, subtracted and consumed at once by register-blocked FMA
// loops, so neither D nor a float32 copy of a weight is ever held. With
// l = min(k + p, out, in):
//
//   Omega (in x l) Gaussian from a counter-based stream keyed by (seed, name);
//   Y = D Omega                                  (same pass: ||D||_F^2 in float64)
//   q times: Q = orth(Y); Z = orth(D^T Q); Y = D Z
//   Q = orth(Y); Z = D^T Q = (Q^T D)^T = Q_z R_z;  SVD R_z^T = U_s S V_s^T  (float64)
//   B = (Q U_s)_k S_k,  A = ((Q_z V_s)_k)^T
//
// This is the one randomized range finder of the core (cpp/src/range_finder.hpp, shared
// with factored_svd and dense_svd: the same Gaussian stream, float64 blocked Householder
// QR for orth(), the same write_factors); extract supplies only the streamed products.
// Every entry of Y = D X is one chain of fused multiply-adds over the columns
// in order, every entry of D^T Y one chain over the rows in order, and ||D||_F^2 is
// summed per panel in a fixed order, so the result is a function of the inputs alone:
// the same bits for any thread count (for one build: the FMA width follows the target).
// Conventions are those of factored_svd (svd.hpp): singular values descending, the
// entry of largest magnitude of each left singular vector positive, S on B; fewer
// than k singular values -> zero columns of B / rows of A; a zero singular value gets
// a zero column of B and a zero row of A (so D = 0 gives zeros).
// B A = P D with P the orthogonal projector onto span(B), so the Frobenius error of
// the result is ||D - B A||_F = sqrt(frob_sq - sum_{i<k} S_i^2) (up to rounding: when
// the error is below ~1e-3 ||D||_F the subtraction cancels; clamp at 0).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "lorafuse/dtype.hpp"
#include "lorafuse/tensor.hpp"

namespace lorafuse {

struct ExtractJob {
  std::string name;
  // Inputs: two row-major out x in matrices of raw elements (zero-copy views).
  const void* w_base = nullptr;
  DType base_type = DType::F32;
  const void* w_ft = nullptr;
  DType ft_type = DType::F32;
  std::int64_t out = 0, in = 0;
  std::int64_t k = 1;  // requested rank, >= 1
  // Outputs, allocated by the caller: B out x k and A k x in (row-major float32),
  // S of length s_len = extract_sv_count(out, in, k, oversample).
  float* B = nullptr;
  float* A = nullptr;
  double* S = nullptr;
  std::int64_t s_len = 0;
  double frob_sq = 0.0;  // written: ||D||_F^2, accumulated in float64
};

struct ExtractOptions {
  std::uint64_t seed = 0;
  std::int64_t oversample = 10;
  std::int64_t power_iters = 2;
};

// l = min(k + oversample, out, in) (>= 0): the number of singular values computed.
std::int64_t extract_sv_count(std::int64_t out, std::int64_t in, std::int64_t k, std::int64_t oversample) noexcept;

// Error(Value) unless 0 <= oversample <= kMaxOversample and 0 <= power_iters <= kMaxPowerIters.
void check_extract_options(const ExtractOptions& opt);

// A checked job from the caller's raw buffers (the entry point a binding calls): both 2-D
// of one shape (ShapeMismatch naming the module and both shapes), C-contiguous, item sizes
// matching their dtypes (Dtype), and the rank; sets out, in, k and s_len. The caller
// allocates B (out x k), A (k x in) and S (s_len) and points the job at them.
ExtractJob make_extract_job(const std::string& name, const TensorView& w_base, DType base_type,
                            const TensorView& w_ft, DType ft_type, std::int64_t k, const ExtractOptions& opt);

// Runs every job: modules in parallel; when there are fewer jobs than threads, the
// tile products of a module are spread over the spare threads too. Raises
// Error(Value) for bad options and Error(NonFinite) naming the first job (in job
// order) whose W_base or W_ft holds NaN or Inf, or whose difference overflows.
void extract_svd_batch(std::vector<ExtractJob>& jobs, const ExtractOptions& opt, int threads);
// extract_svd_batch's checks (every backend's): the options, then each job's rank, shape, inputs and
// output buffers (S sized by extract_sv_count), Error(Value / ShapeMismatch) naming the job.
void check_extract_jobs(const std::vector<ExtractJob>& jobs, const ExtractOptions& opt);

}  // namespace lorafuse
