// Internal to the core: the sign convention shared by factored_svd, dense_svd and
// extract_svd (see svd.hpp), in one place so the three cannot drift apart.
#pragma once
#include <Eigen/Core>
#include <cmath>

namespace lorafuse::detail {

// Makes the entry of largest magnitude of each column of L positive (first such
// entry on ties); the matching column of R follows so L diag(s) R^T is unchanged.
inline void fix_signs(Eigen::MatrixXd& L, Eigen::MatrixXd& R) {
  for (Eigen::Index j = 0; j < L.cols(); ++j) {
    Eigen::Index best = 0;
    double best_abs = -1.0;
    for (Eigen::Index i = 0; i < L.rows(); ++i) {
      const double a = std::abs(L(i, j));
      if (a > best_abs) {
        best_abs = a;
        best = i;
      }
    }
    if (L(best, j) < 0.0) {
      L.col(j) *= -1.0;
      R.col(j) *= -1.0;
    }
  }
}

}  // namespace lorafuse::detail
