// svd.hpp's batches with the CUDA backend: the host side. The range finder, the float64 QR of
// its blocks, the small SVDs and the output conventions are the CPU core's own code
// (cpp/src/range_finder.hpp: randomized_svd<Op>, sketch_key, gaussian_sketch, write_factors,
// write_zero), so signs, split, padding, S and the sketch are identical by construction; only
// the operators' products run on the GPU (products.hpp, svd.cu).
//
//   factored, randomized path: DeviceFactorListOp (the stacked factors on the GPU, two SGEMMs
//     per product, the weight applied to the r x l intermediate as FactorListOp does).
//   factored, exact path, r < min(out, in): the float64 stacks and their Householder QR on the
//     GPU (cuSOLVER geqrf), the r x r core R_B R_A^T and its BDCSVD on the host (svd.cpp's
//     factored_one), Q_B [U_k; 0] and Q_A [V_k; 0] on the GPU (ormqr).
//   factored, exact path, r >= min(out, in) (svd.cpp forms D in float64 and decomposes it
//     densely): the CPU core's factored_svd_batch on those jobs.
//   dense, randomized: DeviceDenseOp (D on the GPU, SGEMM products); dense, exact (float64
//     dense BDCSVD): the CPU core's dense_svd_batch on those jobs.
//
// GPU jobs run one after another in job order under the context's lock; the CPU core's jobs
// then run on `threads` threads. Non-finite inputs raise Error(NonFinite) naming the first bad
// job in job order, with svd.cpp's message.
#include <Eigen/Core>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "device.hpp"
#include "finite.hpp"
#include "lorafuse/errors.hpp"
#include "lorafuse/limits.hpp"
#include "lorafuse/svd.hpp"
#include "ops.hpp"
#include "products.hpp"
#include "range_finder.hpp"

namespace lorafuse::cuda {
namespace {

using detail::FactorOutput;
using Eigen::Index;
using MatD = Eigen::MatrixXd;
using MatF = Eigen::MatrixXf;
using VecD = Eigen::VectorXd;

FactorOutput output_of(const SvdJob& job) { return {job.B2, job.A2, job.out, job.in, job.k, &job.name}; }

void write_zero(const SvdJob& job) { detail::write_zero(output_of(job)); }

// svd.cpp's terms_of: the job's terms, or the one pair (B, A).
std::vector<FactorTerm> terms_of(const SvdJob& job) {
  if (!job.terms.empty()) return job.terms;
  return {FactorTerm{job.B, job.A, job.r, 1.0}};
}

std::int64_t max_term_rank(const std::vector<FactorTerm>& terms) {
  std::int64_t m = 0;
  for (const FactorTerm& t : terms) m = std::max(m, t.r);
  return m;
}


// svd.cpp's finiteness check of a job's inputs, on the host (jobs with nothing to decompose, and
// finding which job the CPU core refused).
bool inputs_finite(const SvdJob& job) {
  if (job.D != nullptr) return detail::all_finite(job.D, job.out * job.in);
  bool finite = true;
  for (const FactorTerm& t : terms_of(job)) {
    finite = finite && detail::all_finite(t.B, job.out * t.r) && detail::all_finite(t.A, t.r * job.in);
    detail::release_term(t, job.out, job.in);
  }
  return finite;
}

void throw_nonfinite(const SvdJob& job) { throw Error(ErrorKind::NonFinite, job.name + ": input holds NaN or Inf"); }

// ---- The range finder's operators: products on the GPU ----

class DeviceDenseOp {
 public:
  DeviceDenseOp(products::DeviceMatrix& m, const std::string& name) : m_(m), name_(name) {}
  Index rows() const { return m_.rows(); }
  Index cols() const { return m_.cols(); }
  void apply(const MatF& X, MatF& Y) {
    Y.resize(rows(), X.cols());
    m_.apply(X.data(), X.cols(), Y.data(), name_);
  }
  void apply_t(const MatF& Y, MatF& Z) {
    Z.resize(cols(), Y.cols());
    m_.apply_t(Y.data(), Y.cols(), Z.data(), name_);
  }
  bool proceed() const { return true; }

 private:
  products::DeviceMatrix& m_;
  const std::string& name_;
};

class DeviceFactorListOp {
 public:
  DeviceFactorListOp(products::DeviceFactorList& f, const std::string& name) : f_(f), name_(name) {}
  Index rows() const { return f_.rows(); }
  Index cols() const { return f_.cols(); }
  void apply(const MatF& X, MatF& Y) {
    Y.resize(rows(), X.cols());
    f_.apply(X.data(), X.cols(), Y.data(), name_);
  }
  void apply_t(const MatF& Y, MatF& Z) {
    Z.resize(cols(), Y.cols());
    f_.apply_t(Y.data(), Y.cols(), Z.data(), name_);
  }
  bool proceed() const { return true; }

 private:
  products::DeviceFactorList& f_;
  const std::string& name_;
};

// svd.cpp's randomized_one (the sketch filled on `threads` threads: the same values for any count).
template <class Op>
void randomized_one(SvdJob& job, SvdSplit split, const RandomizedSvdOptions& opt, Index l, Op& op, int threads) {
  const Index kk = std::min<Index>(job.k, l);
  detail::TruncatedSvd t;
  detail::randomized_svd(op, detail::sketch_key(opt.seed, job.name), l, kk, opt.power_iters, threads, t);
  for (Index i = 0; i < job.s_len; ++i) job.S[i] = t.s[i];
  detail::write_factors(t.L, t.R, t.s.head(kk), split, output_of(job));
}

// Uploads a job's terms (dropping the pages of released ones once copied) and reports whether
// all are finite.
template <class Stack>
bool upload_terms(const SvdJob& job, Stack& dev) {
  const std::vector<FactorTerm> terms = terms_of(job);
  dev.reset(job.out, job.in, job.r, max_term_rank(terms), job.name);
  for (const FactorTerm& t : terms)
    if (t.r > 0) dev.add_term(t.B, t.A, t.r, t.weight, job.name);
  const bool finite = dev.finish(job.name);  // waits for the copies
  for (const FactorTerm& t : terms) detail::release_term(t, job.out, job.in);
  return finite;
}

// factored_randomized_one. False (outputs zero) on a non-finite input.
bool factored_randomized_gpu(SvdJob& job, SvdSplit split, const RandomizedSvdOptions& opt,
                             products::DeviceFactorList& dev, int threads) {
  const Index l = std::min<Index>({job.k + opt.oversample, job.r, job.out, job.in});
  if (!upload_terms(job, dev)) {
    write_zero(job);
    return false;
  }
  DeviceFactorListOp op(dev, job.name);
  randomized_one(job, split, opt, l, op, threads);
  return true;
}

// factored_one for 0 < r < min(out, in). False (outputs zero) on a non-finite input.
bool factored_exact_gpu(SvdJob& job, SvdSplit split, products::DeviceFactorQR& dev) {
  const Index out = job.out, in = job.in, r = job.r;
  if (!upload_terms(job, dev)) {
    write_zero(job);
    return false;
  }
  // B = Q_B R_B, A^T = Q_A R_A (Householder, on the GPU).
  MatD Rb(r, r), Ra(r, r);
  dev.factor(Rb.data(), Ra.data(), job.name);
  Rb.triangularView<Eigen::StrictlyLower>().setZero();
  Ra.triangularView<Eigen::StrictlyLower>().setZero();
  // D = Q_B (R_B R_A^T) Q_A^T = (Q_B U) S (Q_A V)^T.
  const MatD core = Rb * Ra.transpose();
  const Eigen::BDCSVD<MatD> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
  if (svd.info() != Eigen::Success || !detail::all_finite(svd.singularValues().data(), svd.singularValues().size())) {
    write_zero(job);
    throw detail::svd_failed(job.name);
  }
  const VecD& sv = svd.singularValues();
  for (Index i = 0; i < job.s_len; ++i) job.S[i] = sv[i];
  const Index kk = std::min<Index>(job.k, r);
  const MatD U = svd.matrixU().leftCols(kk);
  const MatD V = svd.matrixV().leftCols(kk);
  MatD L(out, kk), R(in, kk);
  dev.apply_q(U.data(), V.data(), kk, L.data(), R.data(), job.name);
  detail::write_factors(L, R, sv.head(kk), split, output_of(job));
  return true;
}

// Runs the CPU core's batch `cpu` on the jobs listed in `host` whose index is below `limit`
// (their order kept). Returns the index of the first of them whose input is not finite, or
// `limit` when none is.
template <class CpuBatch>
std::size_t run_on_host(std::vector<SvdJob>& jobs, const std::vector<std::size_t>& host, std::size_t limit,
                        CpuBatch cpu) {
  std::vector<SvdJob> sub;
  std::vector<std::size_t> where;
  for (std::size_t i : host)
    if (i < limit) {
      sub.push_back(jobs[i]);
      where.push_back(i);
    }
  if (sub.empty()) return limit;
  try {
    cpu(sub);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::NonFinite) throw;
    // The CPU core names the first bad job of `sub`: find its index.
    for (std::size_t k = 0; k < sub.size(); ++k)
      if (!inputs_finite(sub[k])) return where[k];
    throw;
  }
  for (std::size_t k = 0; k < sub.size(); ++k) jobs[where[k]].exact = sub[k].exact;
  return limit;
}

}  // namespace

void factored_svd_batch(std::vector<SvdJob>& jobs, SvdSplit split, const RandomizedSvdOptions& opt, int threads) {
  check_randomized_options(opt);
  for (const SvdJob& j : jobs) {
    check_svd_job(j);
    LORAFUSE_CHECK(j.s_len == (j.exact ? factored_sv_count(j.out, j.r, j.in) : dense_sv_count(std::min(j.out, j.r), j.in, j.k)),
                   ErrorKind::Value, j.name + ": S must hold factored_sv_count(...) values");
  }
  std::vector<std::size_t> host;  // exact jobs that svd.cpp decomposes densely
  std::size_t first_bad = jobs.size();
  bool any_gpu = false;
  for (const SvdJob& j : jobs)
    if (!(j.exact && j.s_len > 0 && j.r >= std::min(j.out, j.in))) any_gpu = true;
  if (any_gpu) {
    Context& ctx = Context::get();
    const std::lock_guard<std::mutex> lock(ctx.mutex());
    products::DeviceFactorList list(ctx);
    products::DeviceFactorQR qr(ctx);
    for (std::size_t i = 0; i < jobs.size(); ++i) {
      SvdJob& j = jobs[i];
      bool ok = true;
      if (j.exact && j.s_len > 0 && j.r >= std::min(j.out, j.in)) {
        host.push_back(i);
        continue;
      }
      if (j.exact && j.s_len == 0) {  // nothing to decompose (min(out, r, in) = 0)
        ok = inputs_finite(j);
        write_zero(j);
      } else if (j.exact) {
        ok = factored_exact_gpu(j, split, qr);
      } else {
        ok = factored_randomized_gpu(j, split, opt, list, threads);
      }
      if (!ok) {
        first_bad = i;
        break;
      }
    }
  } else {
    for (std::size_t i = 0; i < jobs.size(); ++i) host.push_back(i);
  }
  first_bad = run_on_host(jobs, host, first_bad, [&](std::vector<SvdJob>& sub) {
    lorafuse::factored_svd_batch(sub, split, opt, threads);
  });
  if (first_bad < jobs.size()) throw_nonfinite(jobs[first_bad]);
}

void dense_svd_batch(std::vector<SvdJob>& jobs, SvdSplit split, const RandomizedSvdOptions& opt, int threads) {
  check_randomized_options(opt);
  for (const SvdJob& j : jobs) {
    check_svd_job(j);
    LORAFUSE_CHECK(j.s_len == dense_sv_count(j.out, j.in, j.k), ErrorKind::Value,
                   j.name + ": S must hold dense_sv_count(out, in, k) values");
  }
  std::vector<std::size_t> host;  // exact jobs: the CPU core's float64 dense SVD
  std::size_t first_bad = jobs.size();
  bool any_gpu = false;
  for (SvdJob& j : jobs) {
    j.exact = dense_svd_is_exact(j.out, j.in, j.k, opt.oversample);
    any_gpu = any_gpu || !j.exact;
  }
  if (any_gpu) {
    Context& ctx = Context::get();
    const std::lock_guard<std::mutex> lock(ctx.mutex());
    products::DeviceMatrix D(ctx);
    for (std::size_t i = 0; i < jobs.size(); ++i) {
      SvdJob& j = jobs[i];
      if (j.exact) {
        host.push_back(i);
        continue;
      }
      // Randomized: min(out, in) >= 4 (k + oversample) > 0 on this path.
      D.upload(j.D, j.out, j.in, j.name);
      if (!D.all_finite(j.name)) {
        write_zero(j);
        first_bad = i;
        break;
      }
      DeviceDenseOp op(D, j.name);
      randomized_one(j, split, opt, j.k + opt.oversample, op, threads);
    }
  } else {
    for (std::size_t i = 0; i < jobs.size(); ++i) host.push_back(i);
  }
  first_bad = run_on_host(jobs, host, first_bad, [&](std::vector<SvdJob>& sub) {
    lorafuse::dense_svd_batch(sub, split, opt, threads);
  });
  if (first_bad < jobs.size()) throw_nonfinite(jobs[first_bad]);
}

}  // namespace lorafuse::cuda
