#include "lorafuse/lowrank.hpp"

#include <Eigen/Core>

#include "lorafuse/errors.hpp"
#include "lorafuse/parallel.hpp"

namespace lorafuse {

double factored_frobenius_sq(const float* B, const float* A, std::int64_t out, std::int64_t r,
                             std::int64_t in) {
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const RowMat> Bm(B, out, r);
  const Eigen::Map<const RowMat> Am(A, r, in);
  const Eigen::MatrixXd btb = Bm.cast<double>().transpose() * Bm.cast<double>();
  const Eigen::MatrixXd aat = Am.cast<double>() * Am.cast<double>().transpose();
  return btb.cwiseProduct(aat).sum();
}

double factored_inner(const float* B1, const float* A1, std::int64_t r1, const float* B2, const float* A2,
                      std::int64_t r2, std::int64_t out, std::int64_t in) {
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const RowMat> b1(B1, out, r1), a1(A1, r1, in), b2(B2, out, r2), a2(A2, r2, in);
  const Eigen::MatrixXd btb = b1.cast<double>().transpose() * b2.cast<double>();
  const Eigen::MatrixXd aat = a1.cast<double>() * a2.cast<double>().transpose();
  return btb.cwiseProduct(aat).sum();
}

void factored_frobenius_sq_batch(const std::vector<FactorPairView>& pairs, double* out, int threads) {
  for (const FactorPairView& p : pairs) {
    check_f32(p.B, "B");
    check_f32(p.A, "A");
    LORAFUSE_CHECK(p.B.ndim() == 2 && p.A.ndim() == 2 && p.B.dim(1) == p.A.dim(0), ErrorKind::ShapeMismatch,
                   "B " + p.B.shape_str() + " and A " + p.A.shape_str() + " cannot be multiplied");
  }
  LORAFUSE_CHECK(out != nullptr || pairs.empty(), ErrorKind::Value, "factored_frobenius_sq: no output buffer");
  parallel_for(static_cast<std::int64_t>(pairs.size()), threads, [&](std::int64_t i, int) {
    const FactorPairView& p = pairs[static_cast<std::size_t>(i)];
    out[i] = factored_frobenius_sq(p.B.f32_data(), p.A.f32_data(), p.B.dim(0), p.B.dim(1), p.A.dim(1));
  });
}

void check_factor_inner_items(const std::vector<FactorInnerView>& items, const double* out) {
  for (const FactorInnerView& p : items) {
    check_f32(p.B1, "B1");
    check_f32(p.A1, "A1");
    check_f32(p.B2, "B2");
    check_f32(p.A2, "A2");
    LORAFUSE_CHECK(p.B1.ndim() == 2 && p.A1.ndim() == 2 && p.B2.ndim() == 2 && p.A2.ndim() == 2 &&
                       p.B1.dim(1) == p.A1.dim(0) && p.B2.dim(1) == p.A2.dim(0) && p.B1.dim(0) == p.B2.dim(0) &&
                       p.A1.dim(1) == p.A2.dim(1),
                   ErrorKind::ShapeMismatch,
                   "factors B1 " + p.B1.shape_str() + ", A1 " + p.A1.shape_str() + ", B2 " + p.B2.shape_str() + ", A2 " +
                       p.A2.shape_str() + " do not describe two deltas of one shape");
  }
  LORAFUSE_CHECK(out != nullptr || items.empty(), ErrorKind::Value, "factored_inner: no output buffer");
}

void factored_inner_batch(const std::vector<FactorInnerView>& items, double* out, int threads) {
  check_factor_inner_items(items, out);
  parallel_for(static_cast<std::int64_t>(items.size()), threads, [&](std::int64_t i, int) {
    const FactorInnerView& p = items[static_cast<std::size_t>(i)];
    out[i] = factored_inner(p.B1.f32_data(), p.A1.f32_data(), p.A1.dim(0), p.B2.f32_data(), p.A2.f32_data(),
                            p.A2.dim(0), p.B1.dim(0), p.A1.dim(1));
  });
}

}  // namespace lorafuse
