#include "lorafuse/svd.hpp"

#include <Eigen/Core>
#include <Eigen/Householder>
#include <Eigen/QR>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "lorafuse/errors.hpp"
#include "lorafuse/limits.hpp"
#include "lorafuse/parallel.hpp"
#include "finite.hpp"
#include "range_finder.hpp"

namespace lorafuse {
namespace {

using Eigen::Index;
using MatD = Eigen::MatrixXd;
using MatF = Eigen::MatrixXf;
using VecD = Eigen::VectorXd;
using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

using detail::all_finite;
using detail::FactorOutput;
using detail::write_factors;

FactorOutput output_of(const SvdJob& job) { return {job.B2, job.A2, job.out, job.in, job.k, &job.name}; }

void write_zero(const SvdJob& job) { detail::write_zero(output_of(job)); }

// Zero factors and singular values: the outputs of a refused job.
void write_zero_all(const SvdJob& job) {
  write_zero(job);
  for (Index i = 0; i < job.s_len; ++i) job.S[i] = 0.0;
}

// A float64 SVD that did not succeed (BDCSVD's info(): its outputs are then unspecified): Error(NonFinite).
template <class Svd>
void check_svd_info(const Svd& svd, const SvdJob& job) {
  if (svd.info() != Eigen::Success) throw detail::svd_failed(job.name);
}

// Exact SVD of a float64 matrix; writes all min(rows, cols) singular values into
// job.S (which must hold that many: s_len) or the first s_len of them, and the
// leading min(k, rank) factors.
void dense_exact(const MatD& D, SvdSplit split, SvdJob& job) {
  const Eigen::BDCSVD<MatD> svd(D, Eigen::ComputeThinU | Eigen::ComputeThinV);
  check_svd_info(svd, job);
  const VecD& sv = svd.singularValues();
  const Index nsv = sv.size();
  for (Index i = 0; i < job.s_len; ++i) job.S[i] = i < nsv ? sv[i] : 0.0;
  const Index kk = std::min<Index>(job.k, nsv);
  MatD L = svd.matrixU().leftCols(kk);
  MatD R = svd.matrixV().leftCols(kk);
  write_factors(L, R, sv.head(kk), split, output_of(job));
}

// The factor pairs of a factored job: its terms, or the one pair (B, A).
std::vector<FactorTerm> terms_of(const SvdJob& job) {
  if (!job.terms.empty()) return job.terms;
  return {FactorTerm{job.B, job.A, job.r, 1.0}};
}

void stack_factors(const SvdJob& job, MatD& Bd, MatD& Ad) {
  Bd.resize(job.out, job.r);
  Ad.resize(job.in, job.r);
  Index c = 0;
  for (const FactorTerm& t : terms_of(job)) {
    if (t.r == 0) continue;
    Bd.middleCols(c, t.r) = Eigen::Map<const RowMatF>(t.B, job.out, t.r).cast<double>() * t.weight;
    Ad.middleCols(c, t.r) = Eigen::Map<const MatF>(t.A, job.in, t.r).cast<double>();  // A_i^T
    detail::release_term(t, job.out, job.in);
    c += t.r;
  }
}

void factored_one(SvdJob& job, SvdSplit split) {
  const Index out = job.out, in = job.in, r = job.r;
  if (job.s_len == 0) {
    write_zero(job);
    return;
  }
  // The stacked factors in float64: Bd = [w_1 B_1, ..., w_n B_n] (out x r), Ad = [A_1; ...; A_n]^T (in x r).
  MatD Bd, Ad;
  stack_factors(job, Bd, Ad);
  if (r >= std::min(out, in)) {
    // The factored path would cost as much as the dense one: form D in float64.
    const MatD D = Bd * Ad.transpose();
    dense_exact(D, split, job);
    return;
  }
  // B = Q_B R_B, A^T = Q_A R_A (Householder, in place on the float64 copies).
  Eigen::HouseholderQR<Eigen::Ref<MatD>> qb(Bd);
  Eigen::HouseholderQR<Eigen::Ref<MatD>> qa(Ad);
  const MatD Rb = qb.matrixQR().topRows(r).triangularView<Eigen::Upper>();
  const MatD Ra = qa.matrixQR().topRows(r).triangularView<Eigen::Upper>();
  // D = Q_B (R_B R_A^T) Q_A^T = (Q_B U) S (Q_A V)^T.
  const MatD core = Rb * Ra.transpose();
  const Eigen::BDCSVD<MatD> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
  check_svd_info(svd, job);
  const VecD& sv = svd.singularValues();
  for (Index i = 0; i < job.s_len; ++i) job.S[i] = sv[i];
  const Index kk = std::min<Index>(job.k, r);
  // Q_B U_k applied as a Householder sequence to [U_k; 0]: O(out r k), no explicit Q.
  MatD L = MatD::Zero(out, kk);
  L.topRows(r) = svd.matrixU().leftCols(kk);
  L.applyOnTheLeft(qb.householderQ());
  MatD R = MatD::Zero(in, kk);
  R.topRows(r) = svd.matrixV().leftCols(kk);
  R.applyOnTheLeft(qa.householderQ());
  write_factors(L, R, sv.head(kk), split, output_of(job));
}

// The randomized path: the range finder of range_finder.hpp on `op`, a sketch of width l.
template <class Op>
void randomized_one(SvdJob& job, SvdSplit split, const RandomizedSvdOptions& opt, Index l, Op& op) {
  const Index kk = std::min<Index>(job.k, l);
  detail::TruncatedSvd t;
  detail::randomized_svd(op, detail::sketch_key(opt.seed, job.name), l, kk, opt.power_iters, 1, t);
  if (!t.finite) throw detail::randomized_not_finite(job.name, "the randomized SVD");
  for (Index i = 0; i < job.s_len; ++i) job.S[i] = t.s[i];
  write_factors(t.L, t.R, t.s.head(kk), split, output_of(job));
}

// The randomized path of a factored job: every product goes through B (out x r) and A (r x in).
void factored_randomized_one(SvdJob& job, SvdSplit split, const RandomizedSvdOptions& opt) {
  const Index l = std::min<Index>({job.k + opt.oversample, job.r, job.out, job.in});
  const std::vector<FactorTerm> terms = terms_of(job);
  detail::FactorListOp op(terms.data(), terms.size(), job.out, job.in);
  randomized_one(job, split, opt, l, op);
}

void dense_one(SvdJob& job, SvdSplit split, const RandomizedSvdOptions& opt) {
  job.exact = dense_svd_is_exact(job.out, job.in, job.k, opt.oversample);
  if (std::min(job.out, job.in) == 0) {
    write_zero(job);
    return;
  }
  if (job.exact) {
    dense_exact(Eigen::Map<const RowMatF>(job.D, job.out, job.in).cast<double>(), split, job);
  } else {
    detail::DenseOp op(job.D, job.out, job.in);
    randomized_one(job, split, opt, job.k + opt.oversample, op);  // < min(out, in) / 4 on this path
  }
}

// Runs fn on every job, the most expensive first (the order affects no result),
// after a finiteness check of its inputs and with a finiteness check of its outputs
// (S, B2, A2); reports the first bad job in job order: Error(NonFinite) naming it, for
// a NaN or Inf input or a result that is not finite (fn's own Error(NonFinite) included).
// A bad job's outputs are zero.
template <class Cost, class Fn>
void run_jobs(std::vector<SvdJob>& jobs, int threads, Cost cost, Fn fn) {
  std::vector<std::size_t> order(jobs.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::vector<double> c(jobs.size());
  for (std::size_t i = 0; i < jobs.size(); ++i) c[i] = cost(jobs[i]);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return c[a] > c[b]; });
  std::vector<std::string> bad(jobs.size());  // the error message of a bad job
  parallel_for(static_cast<std::int64_t>(jobs.size()), threads, [&](std::int64_t t, int) {
    const std::size_t i = order[static_cast<std::size_t>(t)];
    SvdJob& job = jobs[i];
    bool finite = true;
    if (job.D != nullptr) {
      finite = all_finite(job.D, job.out * job.in);
    } else {
      for (const FactorTerm& t : terms_of(job)) {
        finite = finite && all_finite(t.B, job.out * t.r) && all_finite(t.A, t.r * job.in);
        detail::release_term(t, job.out, job.in);  // a read-only mapping's pages leave the resident set
      }
    }
    if (!finite) {
      bad[i] = job.name + ": input holds NaN or Inf";
      write_zero_all(job);
      return;
    }
    try {
      fn(job);
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::NonFinite) throw;
      bad[i] = e.what();
      write_zero_all(job);
      return;
    }
    // Every path checks its own results; this is the last line, whatever the path.
    if (!all_finite(job.S, job.s_len) || !all_finite(job.B2, job.out * job.k) || !all_finite(job.A2, job.k * job.in)) {
      bad[i] = job.name + ": the SVD gave NaN or Inf";
      write_zero_all(job);
    }
  });
  for (std::size_t i = 0; i < jobs.size(); ++i)
    if (!bad[i].empty()) throw Error(ErrorKind::NonFinite, bad[i]);
}


// Cost models in seconds of one core, fitted to this code on x86-64 with AVX2 (timed
// over R = 64..1024 and shapes 256..5632): float64 Householder QR of the stacks about
// 1.2e-10 s per (o + i) R^2, BDCSVD of the R x R core 5.6e-10 s per R^3, the
// Householder products that form the k output vectors 4e-10 s per (o + i) R k, a dense
// BDCSVD 7.3e-10 s per o i min(o, i); the randomized path's float32 products 3e-11 s
// per (o + i) R l and its float64 re-orthonormalizations 2.5e-10 s per (o + i) l^2,
// both per product pair. Only the ratio of the two paths matters.
double exact_factored_cost(std::int64_t out, std::int64_t in, std::int64_t r, std::int64_t k) noexcept {
  const double o = static_cast<double>(out), i = static_cast<double>(in), R = static_cast<double>(r);
  const double m = std::min(o, i);
  if (R >= m) return 1.2e-10 * o * i * R + 7.3e-10 * o * i * m;
  return 1.2e-10 * (o + i) * R * R + 5.6e-10 * R * R * R + 4e-10 * (o + i) * R * static_cast<double>(k);
}

double randomized_factored_cost(std::int64_t out, std::int64_t in, std::int64_t r, std::int64_t k,
                                const RandomizedSvdOptions& opt) noexcept {
  const double o = static_cast<double>(out), i = static_cast<double>(in), R = static_cast<double>(r);
  const double l = std::min({static_cast<double>(k + opt.oversample), R, o, i});
  const double products = static_cast<double>(2 * opt.power_iters + 2);
  return 3e-11 * (o + i) * R * l * products + 2.5e-10 * (o + i) * l * l * products + 5.6e-10 * l * l * l;
}

}  // namespace

void check_svd_job(const SvdJob& job) {
  LORAFUSE_CHECK(job.k >= 1 && job.k <= kMaxRank, ErrorKind::Value,
                 job.name + ": rank must be from 1 to " + std::to_string(kMaxRank) + ", got " + std::to_string(job.k));
  LORAFUSE_CHECK(job.out >= 0 && job.in >= 0 && job.r >= 0, ErrorKind::ShapeMismatch,
                 job.name + ": negative dimensions (" + std::to_string(job.out) + ", " + std::to_string(job.r) + ", " +
                     std::to_string(job.in) + ")");
  LORAFUSE_CHECK(job.B2 != nullptr && job.A2 != nullptr && (job.S != nullptr || job.s_len == 0), ErrorKind::Value,
                 job.name + ": output buffers missing");
  if (job.D != nullptr) return;
  std::int64_t r = 0;
  for (const FactorTerm& t : terms_of(job)) {
    LORAFUSE_CHECK(t.r >= 0 && (t.r == 0 || (t.B != nullptr && t.A != nullptr)) && std::isfinite(t.weight),
                   ErrorKind::Value, job.name + ": a factor pair has a negative rank, no data or a weight that is not finite");
    r += t.r;
  }
  LORAFUSE_CHECK(r == job.r, ErrorKind::ShapeMismatch,
                 job.name + ": the factor pairs have " + std::to_string(r) + " ranks in all, the job says r = " +
                     std::to_string(job.r));
}

void check_randomized_options(const RandomizedSvdOptions& opt) {
  LORAFUSE_CHECK(opt.oversample >= 0 && opt.oversample <= kMaxOversample, ErrorKind::Value,
                 "oversample must be from 0 to " + std::to_string(kMaxOversample) + ", got " + std::to_string(opt.oversample));
  LORAFUSE_CHECK(opt.power_iters >= 0 && opt.power_iters <= kMaxPowerIters, ErrorKind::Value,
                 "power_iters must be from 0 to " + std::to_string(kMaxPowerIters) + ", got " +
                     std::to_string(opt.power_iters));
}

FactoredMode factored_mode_from_name(const std::string& name) {
  if (name == "exact") return FactoredMode::Exact;
  if (name == "auto") return FactoredMode::Auto;
  if (name == "randomized") return FactoredMode::Randomized;
  throw Error(ErrorKind::Value, "unknown mode '" + name + "' (expected 'exact', 'auto' or 'randomized')");
}

bool factored_svd_is_exact(std::int64_t out, std::int64_t in, std::int64_t r, std::int64_t k, FactoredMode mode,
                           const RandomizedSvdOptions& opt) noexcept {
  if (mode == FactoredMode::Exact) return true;
  if (k + opt.oversample >= std::min({r, out, in})) return true;
  if (mode == FactoredMode::Randomized) return false;
  return exact_factored_cost(out, in, r, k) <= kAutoExactFactor * randomized_factored_cost(out, in, r, k, opt);
}

SvdSplit svd_split_from_name(const std::string& name) {
  if (name == "B") return SvdSplit::B;
  if (name == "sqrt") return SvdSplit::Sqrt;
  throw Error(ErrorKind::Value, "unknown split '" + name + "' (expected 'B' or 'sqrt')");
}

std::int64_t factored_sv_count(std::int64_t out, std::int64_t r, std::int64_t in) noexcept {
  return std::max<std::int64_t>(0, std::min({out, r, in}));
}

std::int64_t dense_sv_count(std::int64_t out, std::int64_t in, std::int64_t k) noexcept {
  return std::max<std::int64_t>(0, std::min({out, in, k}));
}

bool dense_svd_is_exact(std::int64_t out, std::int64_t in, std::int64_t k, std::int64_t oversample) noexcept {
  const std::int64_t m = std::min(out, in);
  return k + oversample >= (m + 3) / 4;  // (k + oversample) * 4 >= m, without overflow
}

void factored_svd_batch(std::vector<SvdJob>& jobs, SvdSplit split, const RandomizedSvdOptions& opt, int threads) {
  check_randomized_options(opt);
  for (const SvdJob& j : jobs) {
    check_svd_job(j);
    LORAFUSE_CHECK(j.s_len == (j.exact ? factored_sv_count(j.out, j.r, j.in) : dense_sv_count(std::min(j.out, j.r), j.in, j.k)),
                   ErrorKind::Value, j.name + ": S must hold factored_sv_count(...) values");
  }
  run_jobs(
      jobs, threads,
      [&](const SvdJob& j) {
        return j.exact ? exact_factored_cost(j.out, j.in, j.r, j.k) : randomized_factored_cost(j.out, j.in, j.r, j.k, opt);
      },
      [&](SvdJob& j) {
        if (j.exact)
          factored_one(j, split);
        else
          factored_randomized_one(j, split, opt);
      });
}

void dense_svd_batch(std::vector<SvdJob>& jobs, SvdSplit split, const RandomizedSvdOptions& opt, int threads) {
  check_randomized_options(opt);
  for (const SvdJob& j : jobs) {
    check_svd_job(j);
    LORAFUSE_CHECK(j.s_len == dense_sv_count(j.out, j.in, j.k), ErrorKind::Value,
                   j.name + ": S must hold dense_sv_count(out, in, k) values");
  }
  run_jobs(
      jobs, threads,
      [&](const SvdJob& j) {
        const double o = static_cast<double>(j.out), i = static_cast<double>(j.in);
        return dense_svd_is_exact(j.out, j.in, j.k, opt.oversample)
                   ? 4.0 * o * i * std::min(o, i)
                   : o * i * static_cast<double>(j.k + opt.oversample) * static_cast<double>(2 * opt.power_iters + 2);
      },
      [&](SvdJob& j) { dense_one(j, split, opt); });
}

namespace {

// Sets k, exact and s_len of a factored job whose out, in and r are set.
void size_factored_job(SvdJob& job, std::int64_t k, FactoredMode mode, const RandomizedSvdOptions& opt) {
  check_rank(k, job.name);
  job.k = k;
  job.exact = factored_svd_is_exact(job.out, job.in, job.r, job.k, mode, opt);
  job.s_len = job.exact ? factored_sv_count(job.out, job.r, job.in) : dense_sv_count(std::min(job.out, job.r), job.in, job.k);
}

}  // namespace

SvdJob make_factored_job(const std::string& name, const TensorView& B, const TensorView& A, std::int64_t k,
                         FactoredMode mode, const RandomizedSvdOptions& opt) {
  check_randomized_options(opt);
  check_f32(B, name + ": B");
  check_f32(A, name + ": A");
  LORAFUSE_CHECK(B.ndim() == 2 && A.ndim() == 2 && B.dim(1) == A.dim(0), ErrorKind::ShapeMismatch,
                 name + ": factors B " + B.shape_str() + " and A " + A.shape_str() +
                     " cannot be multiplied (need B (out, R) and A (R, in))");
  SvdJob job;
  job.name = name;
  job.B = B.f32_data();
  job.A = A.f32_data();
  job.out = B.dim(0);
  job.r = B.dim(1);
  job.in = A.dim(1);
  size_factored_job(job, k, mode, opt);
  return job;
}

SvdJob make_factored_list_job(const std::string& name, const std::vector<TensorView>& Bs,
                              const std::vector<TensorView>& As, const std::vector<double>& weights, std::int64_t k,
                              FactoredMode mode, const RandomizedSvdOptions& opt,
                              const std::vector<bool>& release) {
  check_randomized_options(opt);
  LORAFUSE_CHECK(!Bs.empty(), ErrorKind::Value, name + ": needs at least one (B, A) pair");
  LORAFUSE_CHECK(As.size() == Bs.size() && weights.size() == Bs.size(), ErrorKind::ShapeMismatch,
                 name + ": " + std::to_string(Bs.size()) + " B factors, " + std::to_string(As.size()) + " A factors and " +
                     std::to_string(weights.size()) + " weights (need one of each per pair)");
  LORAFUSE_CHECK(release.empty() || release.size() == Bs.size(), ErrorKind::ShapeMismatch,
                 name + ": " + std::to_string(release.size()) + " release flags for " + std::to_string(Bs.size()) +
                     " pairs (need none or one per pair)");
  SvdJob job;
  job.name = name;
  for (std::size_t i = 0; i < Bs.size(); ++i) {
    const std::string pair = name + ": pair " + std::to_string(i);
    const TensorView &B = Bs[i], &A = As[i];
    check_f32(B, pair + " B");
    check_f32(A, pair + " A");
    LORAFUSE_CHECK(B.ndim() == 2 && A.ndim() == 2 && B.dim(1) == A.dim(0), ErrorKind::ShapeMismatch,
                   pair + ": factors B " + B.shape_str() + " and A " + A.shape_str() +
                       " cannot be multiplied (need B (out, R) and A (R, in))");
    LORAFUSE_CHECK(B.dim(0) == Bs[0].dim(0) && A.dim(1) == As[0].dim(1), ErrorKind::ShapeMismatch,
                   pair + ": factors B " + B.shape_str() + " and A " + A.shape_str() + " give a " +
                       shape_str(B.dim(0), A.dim(1)) + " update, pair 0 a " + shape_str(Bs[0].dim(0), As[0].dim(1)) +
                       " one");
    LORAFUSE_CHECK(std::isfinite(weights[i]), ErrorKind::Value, pair + ": the weight must be finite");
    job.terms.push_back(FactorTerm{B.f32_data(), A.f32_data(), B.dim(1), weights[i], !release.empty() && release[i]});
    job.r += B.dim(1);
  }
  job.out = Bs[0].dim(0);
  job.in = As[0].dim(1);
  size_factored_job(job, k, mode, opt);
  return job;
}

SvdJob make_dense_job(const std::string& name, const TensorView& D, std::int64_t k, const RandomizedSvdOptions& opt) {
  check_randomized_options(opt);
  check_f32(D, name + ": D");
  LORAFUSE_CHECK(D.ndim() == 2, ErrorKind::ShapeMismatch, name + ": D " + D.shape_str() + " must be 2-D (out, in)");
  check_rank(k, name);
  SvdJob job;
  job.name = name;
  job.D = D.f32_data();
  job.out = D.dim(0);
  job.in = D.dim(1);
  job.k = k;
  job.s_len = dense_sv_count(job.out, job.in, job.k);
  return job;
}

}  // namespace lorafuse
