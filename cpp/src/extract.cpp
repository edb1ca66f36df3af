#include "lorafuse/extract.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <cstring>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "lorafuse/errors.hpp"
#include "lorafuse/limits.hpp"
#include "lorafuse/parallel.hpp"
#include "float_bits.hpp"
#include "range_finder.hpp"

namespace lorafuse {
namespace {

using Eigen::Index;
using MatF = Eigen::MatrixXf;
using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Non-finite flags of a module: found in its first pass (kBadBase, kBadFt, kBadDiff), or a
// result that is not finite (kBadResult: its message says why).
constexpr unsigned kBadBase = 1, kBadFt = 2, kBadDiff = 4, kBadResult = 8;

using detail::bits_of;
using detail::float_of;
// 1 when x is NaN or Inf (all exponent bits set): integer ops, so loops vectorize.
inline std::uint32_t nonfinite(float x) noexcept { return (bits_of(x) & 0x7F800000u) == 0x7F800000u; }

// Raw F32 or BF16 elements as float32 (exact).
template <DType T>
using Raw = std::conditional_t<T == DType::F32, float, std::uint16_t>;

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
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const auto load16 = [](const auto* p) {
    if constexpr (std::is_same_v<std::remove_cv_t<std::remove_reference_t<decltype(*p)>>, float>) {
      return _mm512_loadu_ps(p);
    } else {
      const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    }
  };
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(out + j, _mm512_sub_ps(load16(ft + j), load16(base + j)));
#endif
  for (; j < n; ++j) out[j] = load1<TF>(ft + j) - load1<TB>(base + j);  // auto-vectorized elsewhere
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

// Adds x[j]^2 (in float64) to lane j % 32 and flags NaN or Inf, for one row segment
// of a chunk.
void first_stats(const float* x, Index n, FirstAcc& acc) noexcept {
  Index j = 0;
  bool bad = false;
#if defined(__AVX512F__)
  __m512d a[4];
  for (int t = 0; t < 4; ++t) a[t] = _mm512_loadu_pd(acc.lane + 8 * t);
  __m512i nf = _mm512_setzero_si512();  // bits of x - x: 0 for finite x, NaN otherwise
  for (; j + 32 <= n; j += 32)
    for (int h = 0; h < 2; ++h) {
      const __m512 v = _mm512_loadu_ps(x + j + 16 * h);
      nf = _mm512_or_si512(nf, _mm512_castps_si512(_mm512_sub_ps(v, v)));
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
      a[2 * h] = _mm512_add_pd(a[2 * h], _mm512_mul_pd(lo, lo));
      a[2 * h + 1] = _mm512_add_pd(a[2 * h + 1], _mm512_mul_pd(hi, hi));
    }
  for (int t = 0; t < 4; ++t) _mm512_storeu_pd(acc.lane + 8 * t, a[t]);
  bad = _mm512_test_epi32_mask(nf, nf) != 0;
#elif defined(__AVX__)
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
    acc.lane[j % FirstAcc::kLanes] += d * d;
  }
  acc.bad |= bad;
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

// ---- Streaming products with D ----
//
// D is read in panels of kPanelRows rows; a panel is converted chunk by chunk
// (kChunkCols columns at a time, into a small float32 buffer that stays in L1) just
// before the register-blocked FMA loops consume the chunk, so the hardware prefetcher
// sees a few long sequential streams per input and memory traffic overlaps the
// arithmetic. Every output value is one chain of fused multiply-adds in a fixed
// order (Y(r, j) over columns c = 0..n-1, Z(c, j) over rows r = 0..m-1), so it does
// not depend on how rows or columns are split between threads.
constexpr Index kPanelRows = 8;
constexpr Index kChunkCols = 256;

#if defined(__AVX512F__)
constexpr int kVW = 16;  // floats per vector
typedef float vf __attribute__((vector_size(64)));
constexpr int kRowsA = 8, kVecA = 3;  // Y = D X: 8 rows x 3 vectors of Y in registers
constexpr int kColsB = 6, kVecB = 4;  // Z = D^T Y: 6 columns of Z x 4 vectors of rows
#elif defined(__AVX__)
constexpr int kVW = 8;
typedef float vf __attribute__((vector_size(32)));
constexpr int kRowsA = 4, kVecA = 3;
constexpr int kColsB = 3, kVecB = 3;
#else
constexpr int kVW = 4;
typedef float vf __attribute__((vector_size(16)));
constexpr int kRowsA = 4, kVecA = 3;
constexpr int kColsB = 3, kVecB = 3;
#endif
// Chunks start at multiples of kChunkCols, so a column's place in a vector (and in the
// lanes of ||D||^2) is the same for any split of the work.
static_assert(kChunkCols % kVW == 0 && kChunkCols % FirstAcc::kLanes == 0, "chunk width");

inline vf vload(const float* p) noexcept {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}
inline void vstore(float* p, vf v) noexcept { std::memcpy(p, &v, sizeof(vf)); }

// c + a b, lane by lane, with one rounding where the target has FMA; sfma is the
// same operation on one float, so vector and scalar tails agree bit for bit.
inline vf vfma(float a, vf b, vf c) noexcept {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(_mm512_set1_ps(a), b, c);
#elif defined(__FMA__)
  return _mm256_fmadd_ps(_mm256_set1_ps(a), b, c);
#else
  return b * a + c;
#endif
}
inline float sfma(float a, float b, float c) noexcept {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Conversion buffers of one task: a panel chunk (kPanelRows x kChunkCols) and two rows
// for dtype pairs that go through to_f32.
struct ChunkBuf {
  std::vector<float> tile, row_b, row_f;
  ChunkBuf()
      : tile(static_cast<std::size_t>(kPanelRows * kChunkCols)), row_b(kChunkCols), row_f(kChunkCols) {}
};

// One row segment: n elements of W_ft - W_base from element offset `off`.
void diff_row_any(const ExtractJob& job, std::size_t off, float* out, Index n, ChunkBuf& s) {
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

// s.tile (pr x cw, row stride kChunkCols) = D on rows [r0, r0 + pr), columns
// [c0, c0 + cw); with acc, also the first-pass statistics of every row segment.
void load_chunk(const ExtractJob& job, Index r0, Index pr, Index c0, Index cw, ChunkBuf& s, FirstAcc* acc) {
  for (Index i = 0; i < pr; ++i) {
    const std::size_t off = static_cast<std::size_t>(r0 + i) * static_cast<std::size_t>(job.in) +
                            static_cast<std::size_t>(c0);
    float* row = s.tile.data() + i * kChunkCols;
    diff_row_any(job, off, row, cw, s);
    if (acc != nullptr) first_stats(row, cw, *acc);
  }
}

// The cache lines of the next chunk to be converted (pr rows of both inputs from
// element (r0, c0), cw columns each), requested a few at a time between FMA blocks,
// so they arrive while the current chunk is being multiplied.
class ChunkPrefetch {
 public:
  ChunkPrefetch() = default;
  ChunkPrefetch(const ExtractJob& job, Index r0, Index pr, Index c0, Index cw) {
    const std::size_t isz[2] = {itemsize(job.base_type), itemsize(job.ft_type)};
    const unsigned char* src[2] = {static_cast<const unsigned char*>(job.w_base),
                                   static_cast<const unsigned char*>(job.w_ft)};
    for (int w = 0; w < 2; ++w) {
      const std::size_t bytes = static_cast<std::size_t>(cw) * isz[w];
      for (Index i = 0; i < pr; ++i) {
        const std::size_t off = (static_cast<std::size_t>(r0 + i) * static_cast<std::size_t>(job.in) +
                                 static_cast<std::size_t>(c0)) * isz[w];
        const auto first = reinterpret_cast<std::uintptr_t>(src[w] + off) & ~std::uintptr_t{63};
        const auto last = reinterpret_cast<std::uintptr_t>(src[w] + off + bytes - 1) & ~std::uintptr_t{63};
        streams_[n_streams_++] = Stream{first, static_cast<Index>((last - first) / 64 + 1)};
      }
    }
  }
  // Requests up to `count` more lines.
  void issue(Index count) noexcept {
    while (count-- > 0 && s_ < n_streams_) {
      __builtin_prefetch(reinterpret_cast<const void*>(streams_[s_].first + static_cast<std::uintptr_t>(line_) * 64), 0, 2);
      if (++line_ == streams_[s_].lines) {
        line_ = 0;
        ++s_;
      }
    }
  }
  Index total_lines() const noexcept {
    Index t = 0;
    for (int i = 0; i < n_streams_; ++i) t += streams_[i].lines;
    return t;
  }

 private:
  struct Stream {
    std::uintptr_t first;
    Index lines;
  };
  Stream streams_[2 * kPanelRows] = {};
  int n_streams_ = 0, s_ = 0;
  Index line_ = 0;
};

// Y rows (R of them, stride ldy, V vectors each) += T (R x w, stride ldt) X (w rows of
// stride ldx): the accumulators stay in registers over the chunk.
template <int R, int V>
void kernel_dx(const float* T, Index ldt, const float* X, Index ldx, Index w, float* Y, Index ldy,
               ChunkPrefetch& pf) noexcept {
  vf acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vload(Y + r * ldy + v * kVW);
  for (Index c = 0; c < w; ++c) {
    if (c & 1) pf.issue(1);
    vf x[V];
    for (int v = 0; v < V; ++v) x[v] = vload(X + c * ldx + v * kVW);
    for (int r = 0; r < R; ++r) {
      const float t = T[r * ldt + c];
      for (int v = 0; v < V; ++v) acc[r][v] = vfma(t, x[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) vstore(Y + r * ldy + v * kVW, acc[r][v]);
}

template <int R>
void kernel_dx_v(int v, const float* T, Index ldt, const float* X, Index ldx, Index w, float* Y, Index ldy,
                 ChunkPrefetch& pf) noexcept {
  static_assert(kVecA == 3, "kernel_dx_v dispatches 1..3 vectors");
  switch (v) {
    case 1: return kernel_dx<R, 1>(T, ldt, X, ldx, w, Y, ldy, pf);
    case 2: return kernel_dx<R, 2>(T, ldt, X, ldx, w, Y, ldy, pf);
    default: return kernel_dx<R, 3>(T, ldt, X, ldx, w, Y, ldy, pf);
  }
}

void kernel_dx_rv(int r, int v, const float* T, Index ldt, const float* X, Index ldx, Index w, float* Y,
                  Index ldy, ChunkPrefetch& pf) noexcept {
  switch (r) {
    case 1: return kernel_dx_v<1>(v, T, ldt, X, ldx, w, Y, ldy, pf);
    case 2: return kernel_dx_v<2>(v, T, ldt, X, ldx, w, Y, ldy, pf);
    case 3: return kernel_dx_v<3>(v, T, ldt, X, ldx, w, Y, ldy, pf);
#if defined(__AVX512F__)
    case 4: return kernel_dx_v<4>(v, T, ldt, X, ldx, w, Y, ldy, pf);
    case 5: return kernel_dx_v<5>(v, T, ldt, X, ldx, w, Y, ldy, pf);
    case 6: return kernel_dx_v<6>(v, T, ldt, X, ldx, w, Y, ldy, pf);
    case 7: return kernel_dx_v<7>(v, T, ldt, X, ldx, w, Y, ldy, pf);
#endif
    default: return kernel_dx_v<kRowsA>(v, T, ldt, X, ldx, w, Y, ldy, pf);
  }
}

// Z^T block (C rows of Z^T = columns of Z, stride ldz; V vectors of D's columns)
// += Y^T T over the pr rows of the chunk: Z(c, j) = fma(Y(r, j), D(r, c), Z(c, j)).
template <int C, int V>
void kernel_dty(const float* T, Index ldt, Index pr, const float* Y, Index ldy, float* Z, Index ldz) noexcept {
  vf acc[C][V];
  for (int j = 0; j < C; ++j)
    for (int v = 0; v < V; ++v) acc[j][v] = vload(Z + j * ldz + v * kVW);
  for (Index r = 0; r < pr; ++r) {
    vf t[V];
    for (int v = 0; v < V; ++v) t[v] = vload(T + r * ldt + v * kVW);
    for (int j = 0; j < C; ++j) {
      const float y = Y[r * ldy + j];
      for (int v = 0; v < V; ++v) acc[j][v] = vfma(y, t[v], acc[j][v]);
    }
  }
  for (int j = 0; j < C; ++j)
    for (int v = 0; v < V; ++v) vstore(Z + j * ldz + v * kVW, acc[j][v]);
}

template <int V>
void kernel_dty_c(int c, const float* T, Index ldt, Index pr, const float* Y, Index ldy, float* Z, Index ldz) noexcept {
  switch (c) {
    case 1: return kernel_dty<1, V>(T, ldt, pr, Y, ldy, Z, ldz);
    case 2: return kernel_dty<2, V>(T, ldt, pr, Y, ldy, Z, ldz);
#if defined(__AVX512F__)
    case 3: return kernel_dty<3, V>(T, ldt, pr, Y, ldy, Z, ldz);
    case 4: return kernel_dty<4, V>(T, ldt, pr, Y, ldy, Z, ldz);
    case 5: return kernel_dty<5, V>(T, ldt, pr, Y, ldy, Z, ldz);
#endif
    default: return kernel_dty<kColsB, V>(T, ldt, pr, Y, ldy, Z, ldz);
  }
}

// Per-panel results of the first pass.
struct FirstPass {
  std::vector<double> frob;
  std::vector<unsigned char> bad;
};

// Y (m x l, column-major) = D X for X (n x l, column-major). Tasks are panels of
// kPanelRows rows; with `first`, also the sum of squares and the non-finite check of
// every panel (a bad panel stops early: the module is reported, its Y is unused).
void pass_dx(const ExtractJob& job, const MatF& X, MatF& Y, FirstPass* first, int threads) {
  const Index m = job.out, n = job.in, l = X.cols();
  const Index nv = (l + kVW - 1) / kVW, lp = nv * kVW;  // padded row length of X and Y
  std::vector<float> xr(static_cast<std::size_t>(n * lp), 0.0f), yr(static_cast<std::size_t>(m * lp), 0.0f);
  for (Index c = 0; c < n; ++c)
    for (Index j = 0; j < l; ++j) xr[static_cast<std::size_t>(c * lp + j)] = X(c, j);
  const Index panels = (m + kPanelRows - 1) / kPanelRows;
  parallel_for(panels, threads, [&](std::int64_t p, int) {
    ChunkBuf s;
    FirstAcc acc;
    const Index r0 = p * kPanelRows, pr = std::min(kPanelRows, m - r0);
    for (Index c0 = 0; c0 < n; c0 += kChunkCols) {
      const Index cw = std::min(kChunkCols, n - c0);
      load_chunk(job, r0, pr, c0, cw, s, first != nullptr ? &acc : nullptr);
      if (acc.bad) break;
      ChunkPrefetch pf;  // the next chunk of this panel, or the first of the next panel
      if (c0 + kChunkCols < n) {
        pf = ChunkPrefetch(job, r0, pr, c0 + kChunkCols, std::min(kChunkCols, n - c0 - kChunkCols));
      } else if (r0 + pr < m) {
        pf = ChunkPrefetch(job, r0 + pr, std::min(kPanelRows, m - r0 - pr), 0, std::min(kChunkCols, n));
      }
      for (Index rb = 0; rb < pr; rb += kRowsA)
        for (Index v0 = 0; v0 < nv; v0 += kVecA)
          kernel_dx_rv(static_cast<int>(std::min<Index>(kRowsA, pr - rb)), static_cast<int>(std::min<Index>(kVecA, nv - v0)),
                       s.tile.data() + rb * kChunkCols, kChunkCols, xr.data() + c0 * lp + v0 * kVW, lp, cw,
                       yr.data() + (r0 + rb) * lp + v0 * kVW, lp, pf);
    }
    if (first != nullptr) {
      first->frob[static_cast<std::size_t>(p)] = acc.sum();
      first->bad[static_cast<std::size_t>(p)] = acc.bad ? 1 : 0;
    }
  });
  for (Index r = 0; r < m; ++r)
    for (Index j = 0; j < l; ++j) Y(r, j) = yr[static_cast<std::size_t>(r * lp + j)];
}

// Z (n x l, column-major) = D^T Y for Y (m x l, column-major). Tasks are column
// ranges (multiples of kChunkCols), each streaming all panels in row order.
void pass_dty(const ExtractJob& job, const MatF& Y, MatF& Z, int threads) {
  const Index m = job.out, n = job.in, l = Y.cols();
  std::vector<float> yr(static_cast<std::size_t>(m * l));
  for (Index r = 0; r < m; ++r)
    for (Index j = 0; j < l; ++j) yr[static_cast<std::size_t>(r * l + j)] = Y(r, j);
  Z.setZero();
  float* z = Z.data();  // column j of Z at z + j n: Z^T row-major
  const Index chunks = (n + kChunkCols - 1) / kChunkCols;
  const Index tasks = std::max<Index>(1, std::min<Index>(resolve_threads(threads), chunks));
  parallel_for(tasks, threads, [&](std::int64_t t, int) {
    ChunkBuf s;
    const Index cb = chunks * t / tasks * kChunkCols, ce = std::min(n, chunks * (t + 1) / tasks * kChunkCols);
    for (Index r0 = 0; r0 < m; r0 += kPanelRows) {
      const Index pr = std::min(kPanelRows, m - r0);
      for (Index c0 = cb; c0 < ce; c0 += kChunkCols) {
        const Index cw = std::min(kChunkCols, ce - c0);
        load_chunk(job, r0, pr, c0, cw, s, nullptr);
        ChunkPrefetch pf;  // the next chunk of this panel in the range, or the first of the next panel
        if (c0 + kChunkCols < ce) {
          pf = ChunkPrefetch(job, r0, pr, c0 + kChunkCols, std::min(kChunkCols, ce - c0 - kChunkCols));
        } else if (r0 + pr < m) {
          pf = ChunkPrefetch(job, r0 + pr, std::min(kPanelRows, m - r0 - pr), cb, std::min(kChunkCols, ce - cb));
        }
        const Index per_block = (pf.total_lines() + (l + kColsB - 1) / kColsB - 1) / ((l + kColsB - 1) / kColsB);
        const float* T = s.tile.data();
        const float* yp = yr.data() + r0 * l;
        for (Index j0 = 0; j0 < l; j0 += kColsB) {
          pf.issue(per_block);
          const int cj = static_cast<int>(std::min<Index>(kColsB, l - j0));
          float* zj = z + j0 * n + c0;
          Index c = 0;
          for (; c + kVecB * kVW <= cw; c += kVecB * kVW)
            kernel_dty_c<kVecB>(cj, T + c, kChunkCols, pr, yp + j0, l, zj + c, n);
          for (; c + kVW <= cw; c += kVW) kernel_dty_c<1>(cj, T + c, kChunkCols, pr, yp + j0, l, zj + c, n);
          for (; c < cw; ++c)
            for (int j = 0; j < cj; ++j) {
              float acc = zj[j * n + c];
              for (Index r = 0; r < pr; ++r) acc = sfma(yp[r * l + j0 + j], T[r * kChunkCols + c], acc);
              zj[j * n + c] = acc;
            }
        }
      }
    }
  });
}

void write_zero(const ExtractJob& job) {
  detail::write_zero({job.B, job.A, job.out, job.in, job.k});
  for (Index i = 0; i < job.s_len; ++i) job.S[i] = 0.0;
}

// D = W_ft - W_base as an operator of the range finder (range_finder.hpp): products
// streamed over panels on `threads` threads. The first product also sums ||D||_F^2 and
// checks every value; proceed() then stops on a NaN or Inf (flags: kBad*), on D = 0 (zero),
// and, at any product, when a job before this one in job order was found bad.
class ExtractOp {
 public:
  ExtractOp(ExtractJob& job, std::int64_t index, int threads, const std::atomic<std::int64_t>& first_bad)
      : job_(job), index_(index), threads_(threads), first_bad_(first_bad) {}
  Index rows() const { return job_.out; }
  Index cols() const { return job_.in; }
  void apply(const MatF& X, MatF& Y) {
    if (products_++ > 0) return pass_dx(job_, X, Y, nullptr, threads_);
    const Index panels = (job_.out + kPanelRows - 1) / kPanelRows;
    FirstPass fp{std::vector<double>(static_cast<std::size_t>(panels), 0.0),
                 std::vector<unsigned char>(static_cast<std::size_t>(panels), 0)};
    pass_dx(job_, X, Y, &fp, threads_);
    double frob = 0.0;
    for (Index b = 0; b < panels; ++b) {
      if (fp.bad[static_cast<std::size_t>(b)]) {
        flags = diagnose(job_);
        return;
      }
      frob += fp.frob[static_cast<std::size_t>(b)];
    }
    job_.frob_sq = frob;
    zero = frob == 0.0;
  }
  void apply_t(const MatF& Y, MatF& Z) {
    ++products_;
    pass_dty(job_, Y, Z, threads_);
  }
  bool proceed() const { return flags == 0 && !zero && first_bad_.load() >= index_; }

  unsigned flags = 0;  // kBad* flags of the first pass
  bool zero = false;   // D = 0

 private:
  ExtractJob& job_;
  std::int64_t index_;
  int threads_;
  const std::atomic<std::int64_t>& first_bad_;
  int products_ = 0;
};

// One module with `threads` threads for its tile products. Returns the kBad* flags
// (0: done; kBadResult: `message` says why, the outputs are zero). Gives up early
// (returning 0, outputs unspecified) when a job before it in job order has been found
// bad, since that job's error is the one raised.
unsigned extract_one(ExtractJob& job, std::int64_t index, const ExtractOptions& opt, int threads,
                     const std::atomic<std::int64_t>& first_bad, std::string& message) {
  const Index l = job.s_len;
  job.frob_sq = 0.0;
  if (l == 0) {  // an empty matrix
    write_zero(job);
    return 0;
  }
  const Index kk = std::min<Index>(job.k, l);
  ExtractOp op(job, index, threads, first_bad);
  detail::TruncatedSvd t;
  if (!detail::randomized_svd(op, detail::sketch_key(opt.seed, job.name), l, kk, opt.power_iters, threads, t)) {
    if (op.zero) write_zero(job);
    return op.flags;
  }
  if (!t.finite) {  // the products overflowed float32 at every scale, or the small SVD failed
    write_zero(job);
    message = detail::randomized_not_finite(job.name, "the randomized SVD of W_ft - W_base").what();
    return kBadResult;
  }
  try {  // refuses factors that do not fit float32 (singular values past its range)
    detail::write_factors(t.L, t.R, t.s.head(kk), SvdSplit::B, {job.B, job.A, job.out, job.in, job.k, &job.name});
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::NonFinite) throw;
    write_zero(job);
    message = e.what();
    return kBadResult;
  }
  for (Index i = 0; i < l; ++i) job.S[i] = t.s[i];
  return 0;
}

}  // namespace

std::int64_t extract_sv_count(std::int64_t out, std::int64_t in, std::int64_t k, std::int64_t oversample) noexcept {
  const std::int64_t l = oversample > std::numeric_limits<std::int64_t>::max() - k ? std::numeric_limits<std::int64_t>::max()
                                                                                    : k + oversample;
  return std::max<std::int64_t>(0, std::min({l, out, in}));
}

void check_extract_options(const ExtractOptions& opt) {
  LORAFUSE_CHECK(opt.oversample >= 0 && opt.oversample <= kMaxOversample, ErrorKind::Value,
                 "oversample must be from 0 to " + std::to_string(kMaxOversample) + ", got " + std::to_string(opt.oversample));
  LORAFUSE_CHECK(opt.power_iters >= 0 && opt.power_iters <= kMaxPowerIters, ErrorKind::Value,
                 "power_iters must be from 0 to " + std::to_string(kMaxPowerIters) + ", got " +
                     std::to_string(opt.power_iters));
}

ExtractJob make_extract_job(const std::string& name, const TensorView& w_base, DType base_type,
                            const TensorView& w_ft, DType ft_type, std::int64_t k, const ExtractOptions& opt) {
  check_extract_options(opt);
  LORAFUSE_CHECK(w_base.ndim() == 2 && w_ft.ndim() == 2 && w_base.dim(0) == w_ft.dim(0) && w_base.dim(1) == w_ft.dim(1),
                 ErrorKind::ShapeMismatch, name + ": base weight " + w_base.shape_str() + " and fine-tuned weight " +
                                               w_ft.shape_str() + " must be equal 2-D shapes (out, in)");
  check_raw(w_base, base_type, name + ": base weight");
  check_raw(w_ft, ft_type, name + ": fine-tuned weight");
  check_rank(k, name);
  ExtractJob job;
  job.name = name;
  job.w_base = w_base.data;
  job.base_type = base_type;
  job.w_ft = w_ft.data;
  job.ft_type = ft_type;
  job.out = w_base.dim(0);
  job.in = w_base.dim(1);
  job.k = k;
  job.s_len = extract_sv_count(job.out, job.in, job.k, opt.oversample);
  return job;
}

void check_extract_jobs(const std::vector<ExtractJob>& jobs, const ExtractOptions& opt) {
  check_extract_options(opt);
  for (const ExtractJob& j : jobs) {
    LORAFUSE_CHECK(j.k >= 1 && j.k <= kMaxRank, ErrorKind::Value,
                   j.name + ": rank must be from 1 to " + std::to_string(kMaxRank) + ", got " + std::to_string(j.k));
    LORAFUSE_CHECK(j.out >= 0 && j.in >= 0 && (j.out * j.in == 0 || (j.w_base != nullptr && j.w_ft != nullptr)),
                   ErrorKind::ShapeMismatch, j.name + ": bad shape " + shape_str(j.out, j.in) + " or missing inputs");
    LORAFUSE_CHECK(j.B != nullptr && j.A != nullptr && (j.S != nullptr || j.s_len == 0), ErrorKind::Value,
                   j.name + ": output buffers missing");
    LORAFUSE_CHECK(j.s_len == extract_sv_count(j.out, j.in, j.k, opt.oversample), ErrorKind::Value,
                   j.name + ": S must hold extract_sv_count(out, in, k, oversample) values");
  }
}

void extract_svd_batch(std::vector<ExtractJob>& jobs, const ExtractOptions& opt, int threads) {
  check_extract_jobs(jobs, opt);
  const auto n_jobs = static_cast<std::int64_t>(jobs.size());
  if (n_jobs == 0) return;
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
  std::vector<std::string> messages(jobs.size());  // kBadResult's
  std::atomic<std::int64_t> first_bad{n_jobs};
  parallel_for(n_jobs, outer, [&](std::int64_t i, int) {
    const std::size_t j = order[static_cast<std::size_t>(i)];
    const auto idx = static_cast<std::int64_t>(j);
    if (first_bad.load() < idx) return;
    const unsigned f = extract_one(jobs[j], idx, opt, inner, first_bad, messages[j]);
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
    if (f & kBadResult) throw Error(ErrorKind::NonFinite, messages[static_cast<std::size_t>(bad)]);
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
