// Internal to the core: a blocked Householder QR for the randomized range finder
// (range_finder.hpp), used by every operator (dense, factored, extract).
#pragma once
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace lorafuse::detail {

using Eigen::Index;

// Householder QR of a tall matrix (rows >= cols) in panels of kPanel columns: each
// panel is factored column by column (LAPACK's dgeqr2 conventions: H = I - tau v v^T,
// v(0) = 1, tau = 0 when the column below the diagonal is already zero), and applied
// to the columns on its right as one block reflector I - V T V^T (dlarft), so the
// bulk of the work runs in matrix products. A rank-deficient input still gives an
// orthonormal Q. The range finder runs it in float64 on float32 products.
template <class S>
class PanelQR {
 public:
  using M = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;
  static constexpr Index kPanel = 8;

  explicit PanelQR(M a) : a_(std::move(a)) {
    const Index rows = a_.rows(), cols = a_.cols();
    for (Index p0 = 0; p0 < cols; p0 += kPanel) {
      const Index pb = std::min(kPanel, cols - p0), r = rows - p0;
      Panel p{p0, M(r, pb), M::Zero(pb, pb)};
      std::vector<S> tau(static_cast<std::size_t>(pb));
      factor_panel(p0, pb, tau.data());
      p.V = a_.block(p0, p0, r, pb).template triangularView<Eigen::StrictlyLower>();
      p.V.diagonal().setOnes();
      const M G = p.V.transpose() * p.V;
      for (Index i = 0; i < pb; ++i) {
        p.T(i, i) = tau[static_cast<std::size_t>(i)];
        if (i > 0) {
          const Eigen::Matrix<S, Eigen::Dynamic, 1> t =
              p.T.topLeftCorner(i, i).template triangularView<Eigen::Upper>() * G.col(i).head(i);
          p.T.col(i).head(i) = -tau[static_cast<std::size_t>(i)] * t;
        }
      }
      const Index tc = cols - p0 - pb;
      if (tc > 0) {  // trailing columns <- H^T C = C - V T^T V^T C
        auto C = a_.block(p0, p0 + pb, r, tc);
        M W = p.V.transpose() * C;
        W = p.T.transpose().template triangularView<Eigen::Lower>() * W;
        C.noalias() -= p.V * W;
      }
      panels_.push_back(std::move(p));
    }
  }

  // The cols x cols upper triangular factor R.
  M r() const {
    const Index l = a_.cols();
    return a_.topRows(l).template triangularView<Eigen::Upper>();
  }

  // Q [C; 0] (rows x c) for C (cols x c); `identity` says C is the identity, whose
  // first p0 columns no reflector of a later panel touches.
  M apply_q(const M& C, bool identity = false) const {
    const Index rows = a_.rows(), l = a_.cols(), c = C.cols();
    M X = M::Zero(rows, c);
    X.topRows(l) = C;
    for (auto it = panels_.rbegin(); it != panels_.rend(); ++it) {
      const Index c0 = identity ? std::min(it->p0, c) : 0;
      auto Xs = X.block(it->p0, c0, rows - it->p0, c - c0);
      M W = it->V.transpose() * Xs;
      W = it->T.template triangularView<Eigen::Upper>() * W;
      Xs.noalias() -= it->V * W;
    }
    return X;
  }

  M thin_q() const { return apply_q(M::Identity(a_.cols(), a_.cols()), true); }

 private:
  struct Panel {
    Index p0;
    M V;  // r x pb, unit lower trapezoidal
    M T;  // pb x pb, upper triangular
  };

  void factor_panel(Index p0, Index pb, S* tau) {
    const Index rows = a_.rows();
    for (Index j = 0; j < pb; ++j) {
      const Index c = p0 + j, t = rows - c - 1;
      auto ess = a_.col(c).segment(c + 1, t);
      const S alpha = a_(c, c), sigma = ess.squaredNorm();
      if (!(sigma > S(0))) {
        tau[j] = S(0);
        continue;
      }
      const S beta = -std::copysign(std::sqrt(alpha * alpha + sigma), alpha);
      tau[j] = (beta - alpha) / beta;
      ess /= (alpha - beta);
      a_(c, c) = beta;
      const Index rest = pb - j - 1;
      if (rest > 0) {
        auto top = a_.row(c).segment(c + 1, rest);
        auto tail = a_.block(c + 1, c + 1, t, rest);
        Eigen::Matrix<S, 1, Eigen::Dynamic> w = top + ess.transpose() * tail;
        w *= tau[j];
        top -= w;
        tail.noalias() -= ess * w;
      }
    }
  }

  M a_;
  std::vector<Panel> panels_;
};

}  // namespace lorafuse::detail
