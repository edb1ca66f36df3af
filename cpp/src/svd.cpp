#include "lorafuse/svd.hpp"

#include <Eigen/Core>
#include <Eigen/Householder>
#include <Eigen/QR>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <numeric>

#include "lorafuse/errors.hpp"
#include "lorafuse/limits.hpp"
#include "lorafuse/parallel.hpp"
#include "lorafuse/rng.hpp"
#include "svd_signs.hpp"

namespace lorafuse {
namespace {

using Eigen::Index;
using MatD = Eigen::MatrixXd;
using MatF = Eigen::MatrixXf;
using VecD = Eigen::VectorXd;
using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Domain word that separates the sketch stream from other uses of the same seed.
constexpr std::uint64_t kSketchDomain = 0x736b657463680001ull;

bool all_finite(const float* p, std::int64_t n) {
  // Sum of x - x is 0 for finite x and NaN otherwise; no early exit keeps it vectorized.
  float acc = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) acc += p[i] - p[i];
  return acc == 0.0f;
}

using detail::fix_signs;

// Writes B2 = L diag(f_left) (padded to k columns) and A2 = diag(f_right) R^T
// (padded to k rows), where L (out x kk) and R (in x kk) hold the leading singular
// vectors and s their kk singular values.
void write_factors(MatD& L, MatD& R, const VecD& s, SvdSplit split, const SvdJob& job) {
  fix_signs(L, R);
  const Index kk = L.cols();
  VecD fl(kk), fr(kk);
  for (Index j = 0; j < kk; ++j) {
    if (split == SvdSplit::B) {
      fl[j] = s[j];
      fr[j] = 1.0;
    } else {
      fl[j] = fr[j] = std::sqrt(s[j]);
    }
  }
  Eigen::Map<RowMatF> B2(job.B2, job.out, job.k);
  Eigen::Map<MatF> A2t(job.A2, job.in, job.k);  // A2 row-major (k x in) is A2^T column-major
  B2.setZero();
  A2t.setZero();
  if (kk == 0) return;
  B2.leftCols(kk) = (L * fl.asDiagonal()).cast<float>();
  A2t.leftCols(kk) = (R * fr.asDiagonal()).cast<float>();
}

void write_zero(const SvdJob& job) {
  Eigen::Map<RowMatF>(job.B2, job.out, job.k).setZero();
  Eigen::Map<RowMatF>(job.A2, job.k, job.in).setZero();
}

// Exact SVD of a float64 matrix; writes all min(rows, cols) singular values into
// job.S (which must hold that many: s_len) or the first s_len of them, and the
// leading min(k, rank) factors.
void dense_exact(const MatD& D, SvdSplit split, SvdJob& job) {
  const Eigen::BDCSVD<MatD> svd(D, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const VecD& sv = svd.singularValues();
  const Index nsv = sv.size();
  for (Index i = 0; i < job.s_len; ++i) job.S[i] = i < nsv ? sv[i] : 0.0;
  const Index kk = std::min<Index>(job.k, nsv);
  MatD L = svd.matrixU().leftCols(kk);
  MatD R = svd.matrixV().leftCols(kk);
  write_factors(L, R, sv.head(kk), split, job);
}

void factored_one(SvdJob& job, SvdSplit split) {
  const Index out = job.out, in = job.in, r = job.r;
  if (job.s_len == 0) {
    write_zero(job);
    return;
  }
  const Eigen::Map<const RowMatF> B(job.B, out, r);
  const Eigen::Map<const MatF> At(job.A, in, r);  // A row-major (r x in) is A^T column-major
  if (r >= std::min(out, in)) {
    // The factored path would cost as much as the dense one: form D in float64.
    const MatD D = B.cast<double>() * At.cast<double>().transpose();
    dense_exact(D, split, job);
    return;
  }
  // B = Q_B R_B, A^T = Q_A R_A (Householder, in place on float64 copies).
  MatD Bd = B.cast<double>();
  MatD Ad = At.cast<double>();
  Eigen::HouseholderQR<Eigen::Ref<MatD>> qb(Bd);
  Eigen::HouseholderQR<Eigen::Ref<MatD>> qa(Ad);
  const MatD Rb = qb.matrixQR().topRows(r).triangularView<Eigen::Upper>();
  const MatD Ra = qa.matrixQR().topRows(r).triangularView<Eigen::Upper>();
  // D = Q_B (R_B R_A^T) Q_A^T = (Q_B U) S (Q_A V)^T.
  const MatD core = Rb * Ra.transpose();
  const Eigen::BDCSVD<MatD> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
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
  write_factors(L, R, sv.head(kk), split, job);
}

// Orthonormal basis (m x l, float64) of the columns of a float32 m x l matrix.
MatD orthonormal_basis(const MatF& Y) {
  MatD Yd = Y.cast<double>();
  Eigen::HouseholderQR<Eigen::Ref<MatD>> qr(Yd);
  MatD Q = MatD::Identity(Y.rows(), Y.cols());
  Q.applyOnTheLeft(qr.householderQ());
  return Q;
}

// Randomized SVD (Halko, Martinsson, Tropp) of an m x n operator given by its
// products: times(X) = D X (X n x l) and times_t(Y) = D^T Y (Y m x l), both float32.
// The Gaussian sketch comes from the counter stream keyed by (seed, name).
template <class Times, class TimesT>
void randomized_core(SvdJob& job, SvdSplit split, const RandomizedSvdOptions& opt, Index l, Times times,
                     TimesT times_t) {
  const Index n = job.in, k = job.k;
  const std::uint64_t key = derive_key(derive_key(derive_key(0, opt.seed), name_hash(job.name)), kSketchDomain);
  MatF omega(n, l);
  for (Index j = 0; j < l; ++j)
    for (Index i = 0; i < n; ++i)
      omega(i, j) = static_cast<float>(normal_at(key, static_cast<std::uint64_t>(j * n + i)));
  // Range finder with power iterations, re-orthonormalized after every product.
  // The products run in float32 (the inputs are float32); bases and the small SVD in float64.
  MatD Q = orthonormal_basis(times(omega));
  for (std::int64_t it = 0; it < opt.power_iters; ++it) {
    const MatD Qz = orthonormal_basis(times_t(Q.cast<float>()));
    Q = orthonormal_basis(times(Qz.cast<float>()));
  }
  // Q^T D = Z^T with Z = D^T Q = Q_z R_z, so D ~ Q R_z^T Q_z^T; SVD of the l x l R_z^T.
  const MatF Zf = times_t(Q.cast<float>());
  MatD Z = Zf.cast<double>();
  Eigen::HouseholderQR<Eigen::Ref<MatD>> qz(Z);
  const MatD Rzt = qz.matrixQR().topRows(l).triangularView<Eigen::Upper>().transpose();
  const Eigen::BDCSVD<MatD> svd(Rzt, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const VecD& sv = svd.singularValues();
  for (Index i = 0; i < job.s_len; ++i) job.S[i] = sv[i];
  const Index kk = std::min<Index>(k, l);
  MatD L = Q * svd.matrixU().leftCols(kk);
  MatD R = MatD::Zero(n, kk);
  R.topRows(l) = svd.matrixV().leftCols(kk);
  R.applyOnTheLeft(qz.householderQ());
  write_factors(L, R, sv.head(kk), split, job);
}

void randomized_one(SvdJob& job, SvdSplit split, const RandomizedSvdOptions& opt) {
  const Eigen::Map<const RowMatF> D(job.D, job.out, job.in);
  randomized_core(
      job, split, opt, job.k + opt.oversample,  // < min(m, n) / 4 on this path
      [&](const MatF& X) -> MatF { return D * X; }, [&](const MatF& Y) -> MatF { return D.transpose() * Y; });
}

// The randomized path of a factored job: every product goes through B (out x r) and A (r x in).
void factored_randomized_one(SvdJob& job, SvdSplit split, const RandomizedSvdOptions& opt) {
  const Eigen::Map<const RowMatF> B(job.B, job.out, job.r);
  const Eigen::Map<const RowMatF> A(job.A, job.r, job.in);
  const Index l = std::min<Index>({job.k + opt.oversample, job.r, job.out, job.in});
  randomized_core(
      job, split, opt, l,
      [&](const MatF& X) -> MatF {
        const MatF T = A * X;
        return B * T;
      },
      [&](const MatF& Y) -> MatF {
        const MatF T = B.transpose() * Y;
        return A.transpose() * T;
      });
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
    randomized_one(job, split, opt);
  }
}

// Runs fn on every job, the most expensive first (the order affects no result),
// after a finiteness check of its inputs; reports the first bad job in job order.
template <class Cost, class Fn>
void run_jobs(std::vector<SvdJob>& jobs, int threads, Cost cost, Fn fn) {
  std::vector<std::size_t> order(jobs.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::vector<double> c(jobs.size());
  for (std::size_t i = 0; i < jobs.size(); ++i) c[i] = cost(jobs[i]);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return c[a] > c[b]; });
  std::vector<unsigned char> bad(jobs.size(), 0);
  parallel_for(static_cast<std::int64_t>(jobs.size()), threads, [&](std::int64_t t, int) {
    const std::size_t i = order[static_cast<std::size_t>(t)];
    SvdJob& job = jobs[i];
    const bool finite = job.D != nullptr ? all_finite(job.D, job.out * job.in)
                                         : all_finite(job.B, job.out * job.r) && all_finite(job.A, job.r * job.in);
    if (!finite) {
      bad[i] = 1;
      write_zero(job);
      return;
    }
    fn(job);
  });
  for (std::size_t i = 0; i < jobs.size(); ++i)
    if (bad[i]) throw Error(ErrorKind::NonFinite, jobs[i].name + ": input holds NaN or Inf");
}

void check_randomized_options(const RandomizedSvdOptions& opt) {
  LORAFUSE_CHECK(opt.oversample >= 0 && opt.oversample <= kMaxOversample, ErrorKind::Value,
                 "oversample must be from 0 to " + std::to_string(kMaxOversample) + ", got " + std::to_string(opt.oversample));
  LORAFUSE_CHECK(opt.power_iters >= 0 && opt.power_iters <= kMaxPowerIters, ErrorKind::Value,
                 "power_iters must be from 0 to " + std::to_string(kMaxPowerIters) + ", got " +
                     std::to_string(opt.power_iters));
}

void check_job(const SvdJob& job) {
  LORAFUSE_CHECK(job.k >= 1 && job.k <= kMaxRank, ErrorKind::Value,
                 job.name + ": rank must be from 1 to " + std::to_string(kMaxRank) + ", got " + std::to_string(job.k));
  LORAFUSE_CHECK(job.out >= 0 && job.in >= 0 && job.r >= 0, ErrorKind::ShapeMismatch,
                 job.name + ": negative dimensions (" + std::to_string(job.out) + ", " + std::to_string(job.r) + ", " +
                     std::to_string(job.in) + ")");
  LORAFUSE_CHECK(job.B2 != nullptr && job.A2 != nullptr && (job.S != nullptr || job.s_len == 0), ErrorKind::Value,
                 job.name + ": output buffers missing");
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
    check_job(j);
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
    check_job(j);
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

}  // namespace lorafuse
