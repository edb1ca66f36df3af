// Best rank-k approximations (Eckart-Young) of low-rank products and dense
// matrices, returned as factors B2 (out x k) and A2 (k x in) with B2 @ A2 ~ D.
//
// factored_svd_batch: D = B A given by its factors (B out x R, A R x in).
//   exact path: when R < min(out, in), D is never formed: thin QR of B and of A^T,
//     SVD of the R x R core R_B R_A^T, all in float64, cost O((out + in) R^2 + R^3).
//     Otherwise D is formed in float64 and decomposed densely.
//   randomized path: the range finder of dense_svd_batch with every product taken
//     through the factors (D X = B (A X), D^T Y = A^T (B^T Y)), cost
//     O((out + in) R l (2 q + 2)): linear in R, so many stacked adapters cost a
//     constant time each. D is never formed.
//   FactoredMode::Exact always takes the exact path; Auto takes the randomized one
//   only where the cost model says the exact one would cost more than
//   kAutoExactFactor times as much (see factored_svd_is_exact); Randomized takes it
//   wherever k + oversample < min(r, out, in) (for tests and benchmarks).
//
// dense_svd_batch: D given densely. Exact (float64 dense SVD) when
// k + oversample >= min(out, in) / 4, else randomized (Halko, Martinsson, Tropp)
// with a Gaussian sketch from a counter-based stream keyed by (seed, name).
//
// Conventions shared by both: singular values descending; the entry of largest
// magnitude of each left singular vector is positive (first such entry on ties);
// split B puts S on B2 (B2 = U_k S_k, A2 = V_k^T, like PEFT), split sqrt puts
// sqrt(S) on both; when fewer than k singular values exist, B2 and A2 are padded
// with zero columns / rows so they always have exactly k. Every job is computed
// by one thread with a fixed sequence of operations, so results do not depend on
// the thread count.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "lorafuse/tensor.hpp"

namespace lorafuse {

enum class SvdSplit { B, Sqrt };

SvdSplit svd_split_from_name(const std::string& name);  // "B" or "sqrt"; Error(Value) otherwise

// One term w B A of a factored job given as a list: B (out x r) and A (r x in), row-major float32.
struct FactorTerm {
  const float* B = nullptr;
  const float* A = nullptr;
  std::int64_t r = 0;
  double weight = 1.0;
  // B and A are views of a read-only file mapping (the caller knows; never set it for anonymous or
  // writable memory): the whole pages inside them are dropped from the resident set (MADV_DONTNEED)
  // after each use, and come back from the page cache on the next. No effect on any result.
  bool release = false;
};

struct SvdJob {
  std::string name;
  // Input: factored jobs set B (out x r, row-major) and A (r x in, row-major), or
  // `terms` (D = sum_i w_i B_i A_i, r = sum_i r_i: never stacked by the caller);
  // dense jobs set D (out x in, row-major). All float32.
  const float* B = nullptr;
  const float* A = nullptr;
  const float* D = nullptr;
  std::vector<FactorTerm> terms;
  std::int64_t out = 0, in = 0, r = 0;
  std::int64_t k = 1;  // requested rank, >= 1
  // Outputs, allocated by the caller: B2 out x k and A2 k x in (row-major float32),
  // S of length s_len = factored_sv_count(...) or dense_sv_count(...).
  float* B2 = nullptr;
  float* A2 = nullptr;
  double* S = nullptr;
  std::int64_t s_len = 0;
  // Dense jobs: set to whether the exact path was taken. Factored jobs: set by the
  // caller (factored_svd_is_exact) to the path to take.
  bool exact = true;
};

enum class FactoredMode { Exact, Auto, Randomized };

FactoredMode factored_mode_from_name(const std::string& name);  // "exact", "auto" or "randomized"; Error(Value) otherwise

// Auto mode keeps the exact path while it costs at most this many times the randomized one.
constexpr double kAutoExactFactor = 1.5;

struct RandomizedSvdOptions {
  std::uint64_t seed = 0;
  std::int64_t oversample = 10;
  std::int64_t power_iters = 4;
};

// Whether a factored job takes the exact path (always in Exact mode; in Auto mode
// when k + oversample >= min(r, out, in), or when the exact path's modelled cost is
// at most kAutoExactFactor times the randomized path's).
bool factored_svd_is_exact(std::int64_t out, std::int64_t in, std::int64_t r, std::int64_t k, FactoredMode mode,
                           const RandomizedSvdOptions& opt) noexcept;
// Number of singular values a factored job returns: min(r, out, in) on the exact
// path, min(k, r, out, in) on the randomized one.
std::int64_t factored_sv_count(std::int64_t out, std::int64_t r, std::int64_t in) noexcept;
// Number of singular values a dense job returns: min(k, out, in).
std::int64_t dense_sv_count(std::int64_t out, std::int64_t in, std::int64_t k) noexcept;
// Whether dense_svd_batch takes the exact path: (k + oversample) * 4 >= min(out, in).
bool dense_svd_is_exact(std::int64_t out, std::int64_t in, std::int64_t k, std::int64_t oversample) noexcept;

// Error(Value) unless 0 <= oversample <= kMaxOversample and 0 <= power_iters <= kMaxPowerIters.
void check_randomized_options(const RandomizedSvdOptions& opt);

// Checked jobs from the caller's arrays (the entry points a binding calls): each checks
// dtypes, contiguity, shapes and the rank and raises Error naming the module and the
// shapes (ShapeMismatch for shapes that do not fit), then sets out, in, r, k, exact and
// s_len; the caller allocates B2 (out x k), A2 (k x in) and S (s_len) and points the job
// at them.
//   make_factored_job: D = B A.
//   make_factored_list_job: D = sum_i weights[i] B_i A_i for pairs (Bs[i], As[i]) of one
//     (out, in) and any ranks; the result is that of make_factored_job on the stacked
//     (w_i B_i, A_i), without the stacked copy (the exact path stacks in its float64 workspace).
//     `release` (empty, or one flag per pair): FactorTerm::release of each pair.
//   make_dense_job: D given densely.
SvdJob make_factored_job(const std::string& name, const TensorView& B, const TensorView& A, std::int64_t k,
                         FactoredMode mode, const RandomizedSvdOptions& opt);
SvdJob make_factored_list_job(const std::string& name, const std::vector<TensorView>& Bs,
                              const std::vector<TensorView>& As, const std::vector<double>& weights, std::int64_t k,
                              FactoredMode mode, const RandomizedSvdOptions& opt,
                              const std::vector<bool>& release = {});
SvdJob make_dense_job(const std::string& name, const TensorView& D, std::int64_t k, const RandomizedSvdOptions& opt);

// The checks every backend's factored_svd_batch / dense_svd_batch runs on each job first: the rank
// (1..kMaxRank), the dimensions, the output buffers, and (factored jobs) every factor pair's rank, data
// and weight against the job's r. Error(Value / ShapeMismatch) naming the job.
void check_svd_job(const SvdJob& job);

// Both raise Error(NonFinite) naming the job when an input holds NaN or Inf.
// Factored jobs must have `exact` set from factored_svd_is_exact (the caller sized S by it).
void factored_svd_batch(std::vector<SvdJob>& jobs, SvdSplit split, const RandomizedSvdOptions& opt, int threads);
void dense_svd_batch(std::vector<SvdJob>& jobs, SvdSplit split, const RandomizedSvdOptions& opt, int threads);

}  // namespace lorafuse
