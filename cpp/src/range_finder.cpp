#include "range_finder.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>

#if defined(__linux__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#define LORAFUSE_HAVE_MADVISE 1
#endif

#include "finite.hpp"
#include "lorafuse/errors.hpp"
#include "lorafuse/parallel.hpp"
#include "lorafuse/rng.hpp"
#include "svd_signs.hpp"

namespace lorafuse::detail {
namespace {

// Domain word that separates the sketch stream from other uses of the same seed.
constexpr std::uint64_t kSketchDomain = 0x736b657463680001ull;
// Rows of Omega generated per task.
constexpr Index kSketchRows = 256;

// The two standard normals of Box-Muller, in float32, on two 24-bit uniforms taken
// from the 64 random bits at counter p of the stream `key`.
inline void gaussian_pair(std::uint64_t key, std::uint64_t p, float& g0, float& g1) noexcept {
  const std::uint64_t bits = counter_bits(key, p);
  const float u1 = 1.0f - static_cast<float>(bits >> 40) * 0x1.0p-24f;  // (0, 1]
  const float u2 = static_cast<float>((bits >> 16) & 0xFFFFFFu) * 0x1.0p-24f;
  const float r = std::sqrt(-2.0f * std::log(u1)), a = 6.28318530717958648f * u2;
  g0 = r * std::cos(a);
  g1 = r * std::sin(a);
}

// out[t] = Gaussian number t for t in [t0, t1): number 2p is the first of
// gaussian_pair(key, p), number 2p + 1 the second.
void fill_gaussian(std::uint64_t key, std::uint64_t t0, std::uint64_t t1, float* out) noexcept {
  float g0, g1;
  std::uint64_t t = t0;
  if (t < t1 && (t & 1)) {
    gaussian_pair(key, t >> 1, g0, g1);
    out[t++] = g1;
  }
  for (; t + 1 < t1; t += 2) {
    gaussian_pair(key, t >> 1, g0, g1);
    out[t] = g0;
    out[t + 1] = g1;
  }
  if (t < t1) {
    gaussian_pair(key, t >> 1, g0, g1);
    out[t] = g0;
  }
}

}  // namespace

std::uint64_t sketch_key(std::uint64_t seed, const std::string& name) noexcept {
  return derive_key(derive_key(derive_key(0, seed), name_hash(name)), kSketchDomain);
}

MatF gaussian_sketch(std::uint64_t key, Index n, Index l, int threads) {
  MatF X(n, l);
  const Index blocks = (n + kSketchRows - 1) / kSketchRows;
  parallel_for(blocks, threads, [&](std::int64_t b, int) {
    const Index i0 = b * kSketchRows, i1 = std::min(n, i0 + kSketchRows);
    for (Index j = 0; j < l; ++j)
      fill_gaussian(key, static_cast<std::uint64_t>(j * n + i0), static_cast<std::uint64_t>(j * n + i1), X.data());
  });
  return X;
}

namespace {

void release_range(const float* p, std::int64_t count) noexcept {
#ifdef LORAFUSE_HAVE_MADVISE
  static const std::uintptr_t page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
  if (p == nullptr || count <= 0 || page == 0) return;
  const std::uintptr_t begin = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t end = begin + static_cast<std::uintptr_t>(count) * sizeof(float);
  const std::uintptr_t first = (begin + page - 1) / page * page, last = end / page * page;  // inward
  if (first < last) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);  // advice: errors ignored
#else
  (void)p;
  (void)count;
#endif
}

}  // namespace

void release_term(const FactorTerm& t, Index rows, Index cols) noexcept {
  if (!t.release || t.r == 0) return;
  release_range(t.B, rows * t.r);
  release_range(t.A, t.r * cols);
}

MatF orthonormal_columns(const MatF& Y) { return PanelQR<double>(Y.cast<double>()).thin_q().cast<float>(); }

void write_factors(MatD& L, MatD& R, const VecD& s, SvdSplit split, const FactorOutput& out) {
  const std::string prefix = out.name != nullptr && !out.name->empty() ? *out.name + ": " : std::string();
  if (!all_finite(s.data(), s.size()) || !all_finite(L.data(), L.size()) || !all_finite(R.data(), R.size())) {
    write_zero(out);
    throw Error(ErrorKind::NonFinite, prefix + "the SVD gave NaN or Inf (a product of the decomposition overflowed "
                                               "float32)");
  }
  fix_signs(L, R);
  Eigen::Map<RowMatF> B(out.B, out.rows, out.k);
  Eigen::Map<MatF> At(out.A, out.cols, out.k);  // A row-major (k x cols) is A^T column-major
  B.setZero();
  At.setZero();
  for (Index j = 0; j < L.cols(); ++j) {
    if (!(s[j] > 0.0)) continue;
    const double fl = split == SvdSplit::B ? s[j] : std::sqrt(s[j]);
    const double fr = split == SvdSplit::B ? 1.0 : fl;
    B.col(j) = (L.col(j) * fl).cast<float>();
    At.col(j) = (R.col(j) * fr).cast<float>();
  }
  // Singular values past float32's range (L and R have entries <= 1) give Inf factors: refused.
  if (!all_finite(out.B, out.rows * out.k) || !all_finite(out.A, out.k * out.cols)) {
    write_zero(out);
    char buf[160];
    std::snprintf(buf, sizeof buf, "the low-rank factors do not fit float32: the largest singular value is %.3g "
                  "(float32 holds up to %.3g)", s.size() > 0 ? s.maxCoeff() : 0.0,
                  static_cast<double>(std::numeric_limits<float>::max()));
    throw Error(ErrorKind::NonFinite, prefix + buf);
  }
}

void write_zero(const FactorOutput& out) {
  Eigen::Map<RowMatF>(out.B, out.rows, out.k).setZero();
  Eigen::Map<RowMatF>(out.A, out.k, out.cols).setZero();
}

}  // namespace lorafuse::detail
