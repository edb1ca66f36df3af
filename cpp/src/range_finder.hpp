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
//
// Overflow: a finite operator can still overflow a float32 product (an entry near float32's
// max times a Gaussian, or factors of 1e19 each). A product that comes out NaN or Inf is run
// again on its input scaled by 2^-kScaleStep, 2^-2 kScaleStep, ... (products are linear, so
// this is exact but for the underflow of negligible entries); the scale of the last product
// is undone on S in float64. Where no scale helps, or the small SVD fails, the result is
// marked not finite (TruncatedSvd::finite false, s NaN) and write_factors refuses it.
#pragma once
#include <Eigen/Core>
#include <Eigen/SVD>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "finite.hpp"
#include "lorafuse/errors.hpp"
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

// Where a rank-k result goes: B (rows x k) and A (k x cols), row-major float32. `name` (may
// be null): the job, for the error messages of write_factors.
struct FactorOutput {
  float* B;
  float* A;
  Index rows, cols, k;
  const std::string* name = nullptr;
};

// B = L diag(f_left) and A = diag(f_right) R^T, padded with zero columns / rows to k, with
// (f_left, f_right) = (s, 1) for split B and (sqrt(s), sqrt(s)) for split sqrt. L (rows x kk)
// and R (cols x kk) hold the leading singular vectors, s their kk singular values. The sign
// convention of svd_signs.hpp is applied first; a singular value that is not > 0 gives a
// zero column of B and a zero row of A (so a zero matrix gives zeros).
// Throws Error(NonFinite) naming out.name, with B and A zero, when s, L or R hold NaN or Inf
// (a failed SVD) or when B or A would not fit float32 (singular values past float32's range).
void write_factors(MatD& L, MatD& R, const VecD& s, SvdSplit split, const FactorOutput& out);
void write_zero(const FactorOutput& out);

// The leading kk singular triplets and all l singular values that the range finder computed.
// finite false: no product could be kept finite or the small SVD failed; s is then NaN (l
// values) and L, R zero, so write_factors refuses it.
struct TruncatedSvd {
  VecD s;
  MatD L, R;
  bool finite = true;
};

// Products that overflow are run again with their input scaled by 2^-kScaleStep per try, up
// to 2^-kMaxScale: float32 inputs of norm ~1 keep their significant entries far above the
// subnormal range (2^-126) at that scale.
constexpr int kScaleStep = 32;
constexpr int kMaxScale = 96;

// res = op.apply(in) or op.apply_t(in) (`transposed`) of in scaled by 2^-e, from the scale e
// the run has reached (never lowered: the next product of the same operator needs as much).
// Returns 1 on a finite result, 0 when op.proceed() stopped it, -1 when no scale up to
// kMaxScale gives a finite result.
template <class Op>
int scaled_product(Op& op, bool transposed, const MatF& in, MatF& res, int& e) {
  for (;;) {
    if (e == 0) {
      transposed ? op.apply_t(in, res) : op.apply(in, res);
    } else {
      const MatF scaled = in * std::ldexp(1.0f, -e);
      transposed ? op.apply_t(scaled, res) : op.apply(scaled, res);
    }
    if (!op.proceed()) return 0;
    if (all_finite(res.data(), res.size())) return 1;
    if (e + kScaleStep > kMaxScale) return -1;
    e += kScaleStep;
  }
}

// The errors of an SVD whose result is not finite, worded once for the CPU and CUDA paths: a float64
// SVD that did not succeed (Eigen's info()), and a randomized SVD (`what`: "the randomized SVD", or
// what it decomposed) whose float32 products overflow at every scale (TruncatedSvd::finite false).
inline Error svd_failed(const std::string& name) {
  return Error(ErrorKind::NonFinite, name + ": the float64 SVD failed (NaN or Inf in its input: a weighted product "
                                            "of the factors overflows float64)");
}
inline Error randomized_not_finite(const std::string& name, const std::string& what) {
  return Error(ErrorKind::NonFinite, name + ": " + what + " gave NaN or Inf (its float32 products overflow, even with "
                                     "the input scaled down by 2^" + std::to_string(kMaxScale) + ")");
}

// Marks `out` as a failed (not finite) result of width l, kk.
inline void mark_not_finite(TruncatedSvd& out, Index rows, Index cols, Index l, Index kk) {
  out.finite = false;
  out.s = VecD::Constant(l, std::numeric_limits<double>::quiet_NaN());
  out.L = MatD::Zero(rows, kk);
  out.R = MatD::Zero(cols, kk);
}

// Randomized SVD of `op` with a sketch of width l (1 <= l <= min(rows, cols)); kk <= l.
// Returns false when op.proceed() stopped it (`out` is then unspecified). A run that could
// not be kept finite returns true with out.finite false (see TruncatedSvd).
template <class Op>
bool randomized_svd(Op& op, std::uint64_t key, Index l, Index kk, std::int64_t power_iters, int threads,
                    TruncatedSvd& out) {
  const Index m = op.rows(), n = op.cols();
  out.finite = true;
  MatF X = gaussian_sketch(key, n, l, threads);
  MatF Y(m, l);
  int e = 0;  // the products' inputs are scaled by 2^-e (only the last one's scale matters: see below)
  int st = scaled_product(op, false, X, Y, e);
  for (std::int64_t it = 0; it < power_iters && st > 0; ++it) {
    st = scaled_product(op, true, orthonormal_columns(Y), X, e);
    if (st > 0) st = scaled_product(op, false, orthonormal_columns(X), Y, e);
  }
  if (st == 0) return false;
  if (st < 0) {
    mark_not_finite(out, m, n, l, kk);
    return true;
  }
  // Y only fixes the range (orthonormalized); the last product Z = M^T Q sets the singular values:
  // X = 2^-e Z, undone on S (a power of two: exact in float64).
  const PanelQR<double> qy(Y.cast<double>());
  const MatD Q = qy.thin_q();
  st = scaled_product(op, true, Q.cast<float>(), X, e);
  if (st == 0) return false;
  if (st < 0) {
    mark_not_finite(out, m, n, l, kk);
    return true;
  }
  const PanelQR<double> qz(X.cast<double>());
  const Eigen::BDCSVD<MatD> svd(MatD(qz.r().transpose()), Eigen::ComputeThinU | Eigen::ComputeThinV);
  if (svd.info() != Eigen::Success) {
    mark_not_finite(out, m, n, l, kk);
    return true;
  }
  out.s = svd.singularValues();
  if (e != 0) out.s *= std::ldexp(1.0, e);
  out.L = Q * svd.matrixU().leftCols(kk);
  out.R = qz.apply_q(svd.matrixV().leftCols(kk));
  if (!all_finite(out.s.data(), out.s.size()) || !all_finite(out.L.data(), out.L.size()) ||
      !all_finite(out.R.data(), out.R.size()))
    mark_not_finite(out, m, n, l, kk);
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
