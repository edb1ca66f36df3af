#include "lorafuse/extract.hpp"

#include <Eigen/Core>
#include <Eigen/Householder>
#include <Eigen/QR>
#include <Eigen/SVD>
#include <algorithm>
#include <cstring>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "lorafuse/errors.hpp"
#include "lorafuse/parallel.hpp"
#include "lorafuse/rng.hpp"

namespace lorafuse {
namespace {

using Eigen::Index;
using MatD = Eigen::MatrixXd;
using MatF = Eigen::MatrixXf;
using VecD = Eigen::VectorXd;
using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Domain word that separates the extraction sketch from other uses of the same seed.
constexpr std::uint64_t kExtractDomain = 0x6578747261637401ull;

// Non-finite flags of a module, found in its first pass.
constexpr unsigned kBadBase = 1, kBadFt = 2, kBadDiff = 4;

inline std::uint32_t bits_of(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(std::uint32_t u) noexcept {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// 1 when x is NaN or Inf (all exponent bits set): integer ops, so loops vectorize.
inline std::uint32_t nonfinite(float x) noexcept { return (bits_of(x) & 0x7F800000u) == 0x7F800000u; }

// The fixed tile grid of a module: row blocks of kExtractRowBlock, column blocks of
// kExtractColBlock (the last of each possibly shorter).
struct Grid {
  Index m, n, nrb, ncb;
  Grid(Index m_, Index n_)
      : m(m_), n(n_), nrb((m_ + kExtractRowBlock - 1) / kExtractRowBlock),
        ncb((n_ + kExtractColBlock - 1) / kExtractColBlock) {}
  Index r0(Index b) const { return b * kExtractRowBlock; }
  Index rows(Index b) const { return std::min<Index>(kExtractRowBlock, m - r0(b)); }
  Index c0(Index c) const { return c * kExtractColBlock; }
  Index cols(Index c) const { return std::min<Index>(kExtractColBlock, n - c0(c)); }
};

// Scratch of one task: the float32 tile of D (row-major) and two converted rows.
struct Scratch {
  std::vector<float> tile, row_b, row_f;
  Scratch()
      : tile(static_cast<std::size_t>(kExtractRowBlock * kExtractColBlock)), row_b(kExtractColBlock),
        row_f(kExtractColBlock) {}
};

// Raw F32 or BF16 elements as float32 (exact), eight at a time with GCC/Clang vector
// extensions (AVX2 / AVX-512 under -march=native, SSE2 pairs otherwise).
typedef float v8f __attribute__((vector_size(32)));
typedef std::uint32_t v8u __attribute__((vector_size(32)));
typedef std::uint16_t v8h __attribute__((vector_size(16)));

template <DType T>
using Raw = std::conditional_t<T == DType::F32, float, std::uint16_t>;

template <DType T>
inline v8f load8(const Raw<T>* p) noexcept {
  v8f v;
  if constexpr (T == DType::F32) {
    std::memcpy(&v, p, 32);
  } else {
    static_assert(T == DType::BF16, "load8: F32 or BF16");
    v8h h;
    std::memcpy(&h, p, 16);
    const v8u u = __builtin_convertvector(h, v8u) << 16;
    std::memcpy(&v, &u, 32);
  }
  return v;
}

template <DType T>
inline float load1(const Raw<T>* p) noexcept {
  if constexpr (T == DType::F32) {
    return *p;
  } else {
    return float_of(static_cast<std::uint32_t>(*p) << 16);
  }
}

// out[j] = ft[j] - base[j] for n elements, in float32.
template <DType TB, DType TF>
void diff_row(const void* base_v, const void* ft_v, float* out, Index n) noexcept {
  const auto* base = static_cast<const Raw<TB>*>(base_v);
  const auto* ft = static_cast<const Raw<TF>*>(ft_v);
  Index j = 0;
  for (; j + 8 <= n; j += 8) {
    const v8f d = load8<TF>(ft + j) - load8<TB>(base + j);
    std::memcpy(out + j, &d, 32);
  }
  for (; j < n; ++j) out[j] = load1<TF>(ft + j) - load1<TB>(base + j);
}

// Running state of the first pass over a row block: ||D||^2 in 32 float64 lanes
// (element j of a row segment goes to lane j % 32: a fixed order, whatever the
// vector width) and whether any D value is NaN or Inf. D is finite exactly when
// both inputs are and their difference does not overflow.
struct FirstAcc {
  static constexpr int kLanes = 32;
  double lane[kLanes] = {};
  bool bad = false;
  double sum() const {
    double s[kLanes];
    std::copy(lane, lane + kLanes, s);
    for (int w = kLanes / 2; w >= 1; w /= 2)
      for (int t = 0; t < w; ++t) s[t] += s[t + w];
    return s[0];
  }
};

// Adds x[j]^2 (in float64, a multiply and an add, never fused) to lane j % 32 and
// flags NaN or Inf, for one row segment of a tile.
void first_stats(const float* x, Index n, FirstAcc& acc) noexcept {
  Index j = 0;
  bool bad = false;
#ifdef __AVX__
  __m256d a[8];
  for (int t = 0; t < 8; ++t) a[t] = _mm256_loadu_pd(acc.lane + 4 * t);
  __m256 nf = _mm256_setzero_ps();  // x - x: +0 for finite x, NaN otherwise
  for (; j + 32 <= n; j += 32)
    for (int q = 0; q < 4; ++q) {
      const __m256 v = _mm256_loadu_ps(x + j + 8 * q);
      nf = _mm256_or_ps(nf, _mm256_sub_ps(v, v));
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
      a[2 * q] = _mm256_add_pd(a[2 * q], _mm256_mul_pd(lo, lo));
      a[2 * q + 1] = _mm256_add_pd(a[2 * q + 1], _mm256_mul_pd(hi, hi));
    }
  for (int t = 0; t < 8; ++t) _mm256_storeu_pd(acc.lane + 4 * t, a[t]);
  bad = !_mm256_testz_si256(_mm256_castps_si256(nf), _mm256_castps_si256(nf));
#endif
  for (; j < n; ++j) {
    const double d = x[j];
    bad |= nonfinite(x[j]) != 0;
    const double sq = d * d;
    acc.lane[j % FirstAcc::kLanes] += sq;
  }
  acc.bad |= bad;
}

// One row segment of the tile: n elements from element offset `off` of both inputs.
void diff_row_any(const ExtractJob& job, std::size_t off, float* out, Index n, Scratch& s) {
  const void* base = static_cast<const unsigned char*>(job.w_base) + off * itemsize(job.base_type);
  const void* ft = static_cast<const unsigned char*>(job.w_ft) + off * itemsize(job.ft_type);
  const DType tb = job.base_type, tf = job.ft_type;
  if (tb == DType::BF16 && tf == DType::BF16) return diff_row<DType::BF16, DType::BF16>(base, ft, out, n);
  if (tb == DType::F32 && tf == DType::F32) return diff_row<DType::F32, DType::F32>(base, ft, out, n);
  if (tb == DType::BF16 && tf == DType::F32) return diff_row<DType::BF16, DType::F32>(base, ft, out, n);
  if (tb == DType::F32 && tf == DType::BF16) return diff_row<DType::F32, DType::BF16>(base, ft, out, n);
  // Any other pair: through float32 rows (lorafuse::to_f32; F16 uses F16C where built).
  to_f32(base, tb, s.row_b.data(), static_cast<std::size_t>(n));
  to_f32(ft, tf, s.row_f.data(), static_cast<std::size_t>(n));
  diff_row<DType::F32, DType::F32>(s.row_b.data(), s.row_f.data(), out, n);
}

// Tile (rb x cb, row-major) = W_ft - W_base on rows [r0, r0 + rb), columns [c0, c0 + cb);
// with acc, also the first-pass statistics of every row segment.
void load_tile(const ExtractJob& job, Index r0, Index rb, Index c0, Index cb, Scratch& s, FirstAcc* acc) {
  for (Index i = 0; i < rb; ++i) {
    const std::size_t off = static_cast<std::size_t>(r0 + i) * static_cast<std::size_t>(job.in) +
                            static_cast<std::size_t>(c0);
    float* row = s.tile.data() + i * cb;
    diff_row_any(job, off, row, cb, s);
    if (acc != nullptr) first_stats(row, cb, *acc);
  }
}

// Which input holds a NaN or Inf, for the error message (kBad* flags; kBadDiff when
// both are finite and only their difference overflows). Reads the whole module.
unsigned diagnose(const ExtractJob& job) {
  std::vector<float> row(static_cast<std::size_t>(job.in));
  unsigned flags = 0;
  for (int which = 0; which < 2; ++which) {
    const void* p = which == 0 ? job.w_base : job.w_ft;
    const DType t = which == 0 ? job.base_type : job.ft_type;
    for (Index r = 0; r < job.out; ++r) {
      to_f32(static_cast<const unsigned char*>(p) + static_cast<std::size_t>(r * job.in) * itemsize(t), t, row.data(),
             row.size());
      std::uint32_t bad = 0;
      for (float x : row) bad |= nonfinite(x);
      if (bad) {
        flags |= which == 0 ? kBadBase : kBadFt;
        break;
      }
    }
  }
  return flags != 0 ? flags : kBadDiff;
}

// Per-row-block results of the first pass.
struct FirstPass {
  std::vector<double> frob;
  std::vector<unsigned char> bad;
};

// Y (m x l) = D X for X (n x l); row block b is the sum over column tiles in order.
// With `first`, also the sum of squares and the non-finite check of every row block.
void pass_dx(const ExtractJob& job, const Grid& g, const MatF& X, MatF& Y, FirstPass* first, int threads) {
  const Index l = X.cols();
  parallel_for(g.nrb, threads, [&](std::int64_t b, int) {
    Scratch s;
    const Index r0 = g.r0(b), rb = g.rows(b);
    MatF Yb = MatF::Zero(rb, l);
    FirstAcc acc;
    for (Index c = 0; c < g.ncb; ++c) {
      const Index c0 = g.c0(c), cb = g.cols(c);
      load_tile(job, r0, rb, c0, cb, s, first != nullptr ? &acc : nullptr);
      if (acc.bad) break;  // the module is reported; no product with NaN
      const Eigen::Map<const RowMatF> T(s.tile.data(), rb, cb);
      Yb.noalias() += T * X.middleRows(c0, cb);
    }
    Y.middleRows(r0, rb) = Yb;
    if (first != nullptr) {
      first->frob[static_cast<std::size_t>(b)] = acc.sum();
      first->bad[static_cast<std::size_t>(b)] = acc.bad ? 1 : 0;
    }
  });
}

// Z (n x l) = D^T Y for Y (m x l); column block c is the sum over row tiles in order.
void pass_dty(const ExtractJob& job, const Grid& g, const MatF& Y, MatF& Z, int threads) {
  const Index l = Y.cols();
  parallel_for(g.ncb, threads, [&](std::int64_t c, int) {
    Scratch s;
    const Index c0 = g.c0(c), cb = g.cols(c);
    MatF Zc = MatF::Zero(cb, l);
    for (Index b = 0; b < g.nrb; ++b) {
      const Index r0 = g.r0(b), rb = g.rows(b);
      load_tile(job, r0, rb, c0, cb, s, nullptr);
      const Eigen::Map<const RowMatF> T(s.tile.data(), rb, cb);
      Zc.noalias() += T.transpose() * Y.middleRows(r0, rb);
    }
    Z.middleRows(c0, cb) = Zc;
  });
}

// Householder QR of a tall matrix (rows >= cols) in panels of kPanel columns: each
// panel is factored column by column (LAPACK's dgeqr2 conventions: H = I - tau v v^T,
// v(0) = 1, tau = 0 when the column below the diagonal is already zero), and applied
// to the columns on its right as one block reflector I - V T V^T (dlarft), so the
// bulk of the work runs in matrix products. A rank-deficient input still gives an
// orthonormal Q. Used in float32 for the power iterations and float64 at the end.
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

// Orthonormal basis (rows x l) of the columns of a float32 matrix, in float32.
MatF orthonormal_basis_f(const MatF& Y) { return PanelQR<float>(Y).thin_q(); }

// Makes the entry of largest magnitude of each column of L positive (first such
// entry on ties); the matching column of R follows so L diag(s) R^T is unchanged.
// (The convention of svd.cpp.)
void fix_signs(MatD& L, MatD& R) {
  for (Index j = 0; j < L.cols(); ++j) {
    Index best = 0;
    double best_abs = -1.0;
    for (Index i = 0; i < L.rows(); ++i) {
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

void write_zero(const ExtractJob& job) {
  Eigen::Map<RowMatF>(job.B, job.out, job.k).setZero();
  Eigen::Map<RowMatF>(job.A, job.k, job.in).setZero();
  for (Index i = 0; i < job.s_len; ++i) job.S[i] = 0.0;
}

// B = L diag(s) (padded to k columns), A = R^T (padded to k rows); a zero singular
// value gives a zero column of B and a zero row of A.
void write_factors(MatD& L, MatD& R, const VecD& s, const ExtractJob& job) {
  fix_signs(L, R);
  const Index kk = L.cols();
  Eigen::Map<RowMatF> B(job.B, job.out, job.k);
  Eigen::Map<MatF> At(job.A, job.in, job.k);  // A row-major (k x in) is A^T column-major
  B.setZero();
  At.setZero();
  for (Index j = 0; j < kk; ++j) {
    if (!(s[j] > 0.0)) continue;
    B.col(j) = (L.col(j) * s[j]).cast<float>();
    At.col(j) = R.col(j).cast<float>();
  }
}

// The two standard normals of Box-Muller on the uniforms at counters 2p and 2p + 1 of
// the stream `key` (those of rng.hpp's normal_at(key, p), whose value is the first).
inline void gaussian_pair(std::uint64_t key, std::uint64_t p, double& g0, double& g1) noexcept {
  const double u1 = 1.0 - uniform01(counter_bits(key, 2 * p));  // (0, 1]
  const double u2 = uniform01(counter_bits(key, 2 * p + 1));
  const double r = std::sqrt(-2.0 * std::log(u1)), a = 6.283185307179586 * u2;
  g0 = r * std::cos(a);
  g1 = r * std::sin(a);
}

// out[t] = Gaussian number t for t in [t0, t1): element 2p is the first of
// gaussian_pair(key, p), element 2p + 1 the second (one log and sqrt per two values).
void fill_gaussian(std::uint64_t key, std::uint64_t t0, std::uint64_t t1, float* out) noexcept {
  double g0, g1;
  std::uint64_t t = t0;
  if (t < t1 && (t & 1)) {
    gaussian_pair(key, t >> 1, g0, g1);
    out[t++] = static_cast<float>(g1);
  }
  for (; t + 1 < t1; t += 2) {
    gaussian_pair(key, t >> 1, g0, g1);
    out[t] = static_cast<float>(g0);
    out[t + 1] = static_cast<float>(g1);
  }
  if (t < t1) {
    gaussian_pair(key, t >> 1, g0, g1);
    out[t] = static_cast<float>(g0);
  }
}

// One module with `threads` threads for its tile products. Returns the kBad* flags
// (0: done). Gives up early (returning 0, outputs unspecified) when a job before it
// in job order has been found bad, since that job's error is the one raised.
unsigned extract_one(ExtractJob& job, std::int64_t index, const ExtractOptions& opt, int threads,
                     const std::atomic<std::int64_t>& first_bad) {
  const Index m = job.out, n = job.in, l = job.s_len;
  job.frob_sq = 0.0;
  if (l == 0) {  // an empty matrix
    write_zero(job);
    return 0;
  }
  const Grid g(m, n);
  const std::uint64_t key = derive_key(derive_key(derive_key(0, opt.seed), name_hash(job.name)), kExtractDomain);
  // Omega: the Gaussian at flat position t = j n + i (column-major) comes from
  // gaussian_pair(key, t / 2), generated by column blocks.
  MatF X(n, l);
  parallel_for(g.ncb, threads, [&](std::int64_t c, int) {
    for (Index j = 0; j < l; ++j) {
      const auto t0 = static_cast<std::uint64_t>(j * n + g.c0(c));
      fill_gaussian(key, t0, t0 + static_cast<std::uint64_t>(g.cols(c)), X.data());
    }
  });
  MatF Y(m, l);
  FirstPass fp{std::vector<double>(static_cast<std::size_t>(g.nrb), 0.0),
               std::vector<unsigned char>(static_cast<std::size_t>(g.nrb), 0)};
  pass_dx(job, g, X, Y, &fp, threads);
  double frob = 0.0;
  for (Index b = 0; b < g.nrb; ++b) {
    if (fp.bad[static_cast<std::size_t>(b)]) return diagnose(job);
    frob += fp.frob[static_cast<std::size_t>(b)];
  }
  job.frob_sq = frob;
  if (frob == 0.0) {
    write_zero(job);
    return 0;
  }
  // Range finder: power iterations re-orthonormalized after every product.
  for (std::int64_t it = 0; it < opt.power_iters; ++it) {
    if (first_bad.load() < index) return 0;
    const MatF Q = orthonormal_basis_f(Y);
    pass_dty(job, g, Q, X, threads);
    X = orthonormal_basis_f(X);
    pass_dx(job, g, X, Y, nullptr, threads);
  }
  if (first_bad.load() < index) return 0;
  // Q^T D = Z^T with Z = D^T Q = Q_z R_z, so D ~ Q R_z^T Q_z^T; SVD of the l x l R_z^T.
  const PanelQR<double> qy(Y.cast<double>());
  const MatD Q = qy.thin_q();
  MatF Zf(n, l);
  pass_dty(job, g, Q.cast<float>(), Zf, threads);
  const PanelQR<double> qz(Zf.cast<double>());
  const MatD Rzt = qz.r().transpose();
  const Eigen::BDCSVD<MatD> svd(Rzt, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const VecD& sv = svd.singularValues();
  for (Index i = 0; i < l; ++i) job.S[i] = sv[i];
  const Index kk = std::min<Index>(job.k, l);
  MatD L = Q * svd.matrixU().leftCols(kk);
  MatD R = qz.apply_q(svd.matrixV().leftCols(kk));
  write_factors(L, R, sv.head(kk), job);
  return 0;
}

}  // namespace

std::int64_t extract_sv_count(std::int64_t out, std::int64_t in, std::int64_t k, std::int64_t oversample) noexcept {
  const std::int64_t l = oversample > std::numeric_limits<std::int64_t>::max() - k ? std::numeric_limits<std::int64_t>::max()
                                                                                    : k + oversample;
  return std::max<std::int64_t>(0, std::min({l, out, in}));
}

void extract_svd_batch(std::vector<ExtractJob>& jobs, const ExtractOptions& opt, int threads) {
  if (opt.oversample < 0) throw Error(ErrorKind::Value, "oversample must be >= 0, got " + std::to_string(opt.oversample));
  if (opt.power_iters < 0)
    throw Error(ErrorKind::Value, "power_iters must be >= 0, got " + std::to_string(opt.power_iters));
  const auto n_jobs = static_cast<std::int64_t>(jobs.size());
  if (n_jobs == 0) return;
  for (const ExtractJob& j : jobs) {
    if (j.k < 1) throw Error(ErrorKind::Value, j.name + ": rank must be >= 1, got " + std::to_string(j.k));
    if (j.s_len != extract_sv_count(j.out, j.in, j.k, opt.oversample))
      throw Error(ErrorKind::Value, j.name + ": S must hold extract_sv_count(out, in, k, oversample) values");
  }
  // Largest modules first (the order affects no result, only the load balance).
  std::vector<std::size_t> order(jobs.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return static_cast<double>(jobs[a].out) * static_cast<double>(jobs[a].in) >
           static_cast<double>(jobs[b].out) * static_cast<double>(jobs[b].in);
  });
  const int t = resolve_threads(threads);
  const int outer = static_cast<int>(std::min<std::int64_t>(t, n_jobs));
  const int inner = std::max(1, t / outer);
  std::vector<unsigned> flags(jobs.size(), 0u);
  std::atomic<std::int64_t> first_bad{n_jobs};
  parallel_for(n_jobs, outer, [&](std::int64_t i, int) {
    const std::size_t j = order[static_cast<std::size_t>(i)];
    const auto idx = static_cast<std::int64_t>(j);
    if (first_bad.load() < idx) return;
    const unsigned f = extract_one(jobs[j], idx, opt, inner, first_bad);
    if (f != 0) {
      flags[j] = f;
      std::int64_t cur = first_bad.load();
      while (idx < cur && !first_bad.compare_exchange_weak(cur, idx)) {
      }
    }
  });
  const std::int64_t bad = first_bad.load();
  if (bad < n_jobs) {
    const ExtractJob& j = jobs[static_cast<std::size_t>(bad)];
    const unsigned f = flags[static_cast<std::size_t>(bad)];
    std::string what;
    if (f & (kBadBase | kBadFt)) {
      what = (f & kBadBase) && (f & kBadFt) ? "the base and the fine-tuned weight hold"
             : (f & kBadBase)               ? "the base weight holds"
                                            : "the fine-tuned weight holds";
      what += " NaN or Inf";
    } else {
      what = "W_ft - W_base overflows float32";
    }
    throw Error(ErrorKind::NonFinite, j.name + ": " + what);
  }
}

}  // namespace lorafuse
