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

}  // namespace lorafuse
