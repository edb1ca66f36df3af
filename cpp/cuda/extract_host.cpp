// extract.hpp's batch with the CUDA backend: the host side. For each module, in job order:
// D = to_f32(W_ft) - to_f32(W_base) is formed once on the GPU in float32 (the raw weights
// streamed there in row blocks; extract.cu), with ||D||_F^2 in float64 and the non-finite check;
// then the CPU core's range finder (cpp/src/range_finder.hpp: randomized_svd with
// sketch_key(seed, name), l = s_len, write_factors with split B) runs on the host with every
// product D X / D^T Y taken on the GPU (DeviceExtractOp: cuBLAS SGEMM on D). The degenerate
// cases are extract.cpp's: an empty matrix (l = 0) and D = 0 give zero factors and S.
#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "device.hpp"
#include "lorafuse/errors.hpp"
#include "lorafuse/extract.hpp"
#include "lorafuse/limits.hpp"
#include "ops.hpp"
#include "products.hpp"
#include "range_finder.hpp"

namespace lorafuse::cuda {
namespace {

using Eigen::Index;
using MatF = Eigen::MatrixXf;

// D = W_ft - W_base as an operator of the range finder: D held on the GPU.
class DeviceExtractOp {
 public:
  DeviceExtractOp(products::DeviceMatrix& d, const std::string& name) : d_(d), name_(name) {}
  Index rows() const { return d_.rows(); }
  Index cols() const { return d_.cols(); }
  void apply(const MatF& X, MatF& Y) {
    Y.resize(rows(), X.cols());
    d_.apply(X.data(), X.cols(), Y.data(), name_);
  }
  void apply_t(const MatF& Y, MatF& Z) {
    Z.resize(cols(), Y.cols());
    d_.apply_t(Y.data(), Y.cols(), Z.data(), name_);
  }
  bool proceed() const { return true; }  // bad inputs and D = 0 are found before the range finder starts

 private:
  products::DeviceMatrix& d_;
  const std::string& name_;
};

void write_zero(const ExtractJob& job) {
  detail::write_zero({job.B, job.A, job.out, job.in, job.k});
  for (Index i = 0; i < job.s_len; ++i) job.S[i] = 0.0;
}

// extract.cpp's error message for the kBad* flags of a module.
std::string nonfinite_message(const ExtractJob& j, unsigned f) {
  std::string what;
  if (f & (products::kBadBase | products::kBadFt)) {
    what = (f & products::kBadBase) && (f & products::kBadFt) ? "the base and the fine-tuned weight hold"
           : (f & products::kBadBase)                         ? "the base weight holds"
                                                              : "the fine-tuned weight holds";
    what += " NaN or Inf";
  } else {
    what = "W_ft - W_base overflows float32";
  }
  return j.name + ": " + what;
}

}  // namespace

void extract_svd_batch(std::vector<ExtractJob>& jobs, const ExtractOptions& opt, int threads) {
  check_extract_jobs(jobs, opt);
  if (jobs.empty()) return;
  bool any = false;
  for (const ExtractJob& j : jobs) any = any || j.s_len > 0;
  if (!any) {  // only empty matrices: no GPU needed
    for (ExtractJob& j : jobs) {
      j.frob_sq = 0.0;
      write_zero(j);
    }
    return;
  }
  Context& ctx = Context::get();
  const std::lock_guard<std::mutex> lock(ctx.mutex());
  products::DeviceMatrix D(ctx);
  products::DifferenceStage stage(ctx);
  // Job order: the first bad module (in job order) is the one reported, as on the CPU.
  for (ExtractJob& job : jobs) {
    const Index l = job.s_len;
    job.frob_sq = 0.0;
    if (l == 0) {  // an empty matrix
      write_zero(job);
      continue;
    }
    const products::DifferenceStats st =
        stage.form(D, job.w_base, job.base_type, job.w_ft, job.ft_type, job.out, job.in, job.name);
    if (st.flags != 0) throw Error(ErrorKind::NonFinite, nonfinite_message(job, st.flags));
    job.frob_sq = st.frob_sq;
    if (st.frob_sq == 0.0) {  // D = 0
      write_zero(job);
      continue;
    }
    const Index kk = std::min<Index>(job.k, l);
    DeviceExtractOp op(D, job.name);
    detail::TruncatedSvd t;
    detail::randomized_svd(op, detail::sketch_key(opt.seed, job.name), l, kk, opt.power_iters, threads, t);
    for (Index i = 0; i < l; ++i) job.S[i] = t.s[i];
    detail::write_factors(t.L, t.R, t.s.head(kk), SvdSplit::B, {job.B, job.A, job.out, job.in, job.k, &job.name});
  }
}

}  // namespace lorafuse::cuda
