#include "lorafuse/lowrank.hpp"

#include <Eigen/Core>

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

}  // namespace lorafuse
