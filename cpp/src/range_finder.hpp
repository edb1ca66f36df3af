// Internal to the core: one randomized range finder (Halko, Martinsson, Tropp 2011) for
// every operator the core decomposes without forming it, and the output conventions
// (write_factors) shared with the exact paths of svd.cpp.
//
// An operator M (m x n) is any type with
//   Index rows() const; Index cols() const;
//   void apply(const MatF& X, MatF& Y);    // Y (m x l) = M X   for X (n x l)
//   void apply_t(const MatF& Y, MatF& Z);  // Z (n x l) = M^T Y for Y (m x l)
//   bool proceed();                        // after every product: false stops the run
// (column-major float32 blocks; proceed() lets an operator stop on a bad input, an all-zero
// matrix or a cancelled batch). The operators: DenseOp (a float32 matrix) and FactorListOp
// (sum_i w_i B_i A_i: the stacked factors of factored_svd, or a list never stacked) below, and the streamed difference of two
// mapped checkpoints in extract.cpp. Another backend implements only the products.
//
// With l the sketch width (l <= min(m, n)):
//   X = Omega (n x l), Gaussian, from the counter stream keyed by sketch_key(seed, name)
//   Y = M X;  power_iters times: Y = M orth(M^T orth(Y))
//   Q = orth(Y); Z = M^T Q = Q_z R_z; SVD R_z^T = U S V^T
//   M ~ (Q U) diag(S) (Q_z V)^T
// orth() is a blocked Householder QR in float64 (panel_qr.hpp), the small SVD float64 too,
// the products float32. Nothing depends on the thread count unless the operator's products
// do (those here run on the calling thread; extract's are thread-count independent).
#pragma once
#include <Eigen/Core>
#include <Eigen/SVD>
#include <cstdint>
#include <string>
#include <vector>

#include "lorafuse/svd.hpp"
#include "panel_qr.hpp"

namespace lorafuse::detail {

using Eigen::Index;
using MatD = Eigen::MatrixXd;
using MatF = Eigen::MatrixXf;
using VecD = Eigen::VectorXd;
using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// The key of the Gaussian sketch of the module `name` under a user seed.
std::uint64_t sketch_key(std::uint64_t seed, const std::string& name) noexcept;

// Omega (n x l, column-major): entry (i, j) is Gaussian number j n + i of the stream `key`
// (Box-Muller pairs in float32); filled in row blocks on `threads` threads, the same values
// for any thread count.
MatF gaussian_sketch(std::uint64_t key, Index n, Index l, int threads);

// An orthonormal basis of the columns of Y (rows >= cols), computed in float64.
MatF orthonormal_columns(const MatF& Y);

// When t.release is set: drops the whole pages inside t.B (rows x t.r) and t.A (t.r x cols) from the
// resident set (MADV_DONTNEED; the range rounded inward to page boundaries, so no byte outside the two
// buffers is touched). Only for read-only file-backed mappings, where the pages come back unchanged from
// the page cache on the next read; a no-op where madvise is not available.
void release_term(const FactorTerm& t, Index rows, Index cols) noexcept;

// Where a rank-k result goes: B (rows x k) and A (k x cols), row-major float32.
struct FactorOutput {
  float* B;
  float* A;
  Index rows, cols, k;
};

// B = L diag(f_left) and A = diag(f_right) R^T, padded with zero columns / rows to k, with
// (f_left, f_right) = (s, 1) for split B and (sqrt(s), sqrt(s)) for split sqrt. L (rows x kk)
// and R (cols x kk) hold the leading singular vectors, s their kk singular values. The sign
// convention of svd_signs.hpp is applied first; a singular value that is not > 0 gives a
// zero column of B and a zero row of A (so a zero matrix gives zeros).
void write_factors(MatD& L, MatD& R, const VecD& s, SvdSplit split, const FactorOutput& out);
void write_zero(const FactorOutput& out);

// The leading kk singular triplets and all l singular values that the range finder computed.
struct TruncatedSvd {
  VecD s;
  MatD L, R;
};

// Randomized SVD of `op` with a sketch of width l (1 <= l <= min(rows, cols)); kk <= l.
// Returns false when op.proceed() stopped it (`out` is then unspecified).
template <class Op>
bool randomized_svd(Op& op, std::uint64_t key, Index l, Index kk, std::int64_t power_iters, int threads,
                    TruncatedSvd& out) {
  const Index m = op.rows(), n = op.cols();
  MatF X = gaussian_sketch(key, n, l, threads);
  MatF Y(m, l);
  op.apply(X, Y);
  if (!op.proceed()) return false;
  for (std::int64_t it = 0; it < power_iters; ++it) {
    op.apply_t(orthonormal_columns(Y), X);
    if (!op.proceed()) return false;
    op.apply(orthonormal_columns(X), Y);
    if (!op.proceed()) return false;
  }
  const PanelQR<double> qy(Y.cast<double>());
  const MatD Q = qy.thin_q();
  op.apply_t(Q.cast<float>(), X);
  if (!op.proceed()) return false;
  const PanelQR<double> qz(X.cast<double>());
  const Eigen::BDCSVD<MatD> svd(MatD(qz.r().transpose()), Eigen::ComputeThinU | Eigen::ComputeThinV);
  out.s = svd.singularValues();
  out.L = Q * svd.matrixU().leftCols(kk);
  out.R = qz.apply_q(svd.matrixV().leftCols(kk));
  return true;
}

// ---- Operators whose products run on the calling thread (one job per thread) ----

// A dense row-major float32 matrix.
class DenseOp {
 public:
  DenseOp(const float* D, Index rows, Index cols) : D_(D, rows, cols) {}
  Index rows() const { return D_.rows(); }
  Index cols() const { return D_.cols(); }
  void apply(const MatF& X, MatF& Y) const { Y.noalias() = D_ * X; }
  void apply_t(const MatF& Y, MatF& Z) const { Z.noalias() = D_.transpose() * Y; }
  bool proceed() const { return true; }

 private:
  Eigen::Map<const RowMatF> D_;
};

// sum_i w_i B_i A_i through the factors: M X = sum_i w_i B_i (A_i X), M^T Y = sum_i w_i A_i^T (B_i^T Y),
// cost O((rows + cols) sum_i r_i l) per product; no stacked copy of the factors. A term marked `release`
// has its pages dropped right after its part of each product (one job runs on one thread, so no other
// thread of the job still reads it; another job reading the same file pages refaults them unchanged):
// the resident set holds about one term at a time, whatever the number of terms.
class FactorListOp {
 public:
  FactorListOp(const FactorTerm* terms, std::size_t n_terms, Index rows, Index cols)
      : terms_(terms), n_(n_terms), rows_(rows), cols_(cols) {}
  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  void apply(const MatF& X, MatF& Y) {
    Y.setZero();
    for (std::size_t i = 0; i < n_; ++i) {
      const FactorTerm& t = terms_[i];
      if (t.r == 0) continue;
      const Eigen::Map<const RowMatF> B(t.B, rows_, t.r), A(t.A, t.r, cols_);
      T_.noalias() = A * X;
      if (t.weight != 1.0) T_ *= static_cast<float>(t.weight);
      Y.noalias() += B * T_;
      if (t.release) release_term(t, rows_, cols_);
    }
  }
  void apply_t(const MatF& Y, MatF& Z) {
    Z.setZero();
    for (std::size_t i = 0; i < n_; ++i) {
      const FactorTerm& t = terms_[i];
      if (t.r == 0) continue;
      const Eigen::Map<const RowMatF> B(t.B, rows_, t.r), A(t.A, t.r, cols_);
      T_.noalias() = B.transpose() * Y;
      if (t.weight != 1.0) T_ *= static_cast<float>(t.weight);
      Z.noalias() += A.transpose() * T_;
      if (t.release) release_term(t, rows_, cols_);
    }
  }
  bool proceed() const { return true; }

 private:
  const FactorTerm* terms_;
  std::size_t n_;
  Index rows_, cols_;
  MatF T_;  // r_i x l
};

}  // namespace lorafuse::detail
