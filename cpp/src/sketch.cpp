// sketch_fold: acc += sum_i c_i B_i (A_i X) (range) or sum_i c_i A_i^T (B_i^T X) (corange) for one
// module and a chunk of adapters, read from the factors as stored. Each factor vector is widened to
// float32 in a register as it is loaded (BF16, F16, F32), so no float32 copy of the chunk's factors is
// written and read again. Two products per term, both with register blocks of float32 accumulators:
//   range:   T_i = c_i A_i X    (r x w): dot products along `in` (A_i's rows against X's columns, X
//                                transposed once per job), reduced across lanes at the end;
//            C  += B_i T_i      (out x w): rows of T_i (vectors along w) times B_i's values broadcast
//                                (a block of B_i's rows widened into a small buffer first).
//   corange: T_i = c_i B_i^T X  (r x w): B_i's rows (vectors along r) times X's values broadcast;
//            C^T += T_i^T A_i   (w x in): A_i's rows (vectors along `in`) times T_i's values broadcast.
// C, the job's float32 sum over its terms, stays in registers block by block and is added to the float64
// acc once. Written with GCC vector extensions as fused_lowrank.cpp: 16 lanes with AVX-512, else 8.
#include "lorafuse/sketch.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "lorafuse/errors.hpp"
#include "lorafuse/parallel.hpp"

#include "simd.hpp"

namespace lorafuse {
namespace {

using Index = std::int64_t;
using simd::VL;
using simd::vf;

#if defined(__AVX512F__)
constexpr int NACC = 24;  // accumulator vectors of a register block (of 32 registers)
#else
constexpr int NACC = 12;  // (of 16)
#endif

// Loops over a register block's vectors, unrolled whole (GCC keeps their accumulators in registers only then).
#define LF_UNROLL _Pragma("GCC unroll 32")

template <DType T>
constexpr Index elem_size() {
  return T == DType::F32 ? 4 : 2;
}

// VL elements of type T at element i of base, as float32 (a NaN's payload is not kept: it is a NaN in the sums).
template <DType T>
inline vf load(const void* base, Index i) {
  return simd::widen<T>(base, i);
}

// The n elements at element i (n < VL; none when n <= 0), zeros after them.
template <DType T>
inline vf load_part(const void* base, Index i, Index n) {
  alignas(64) unsigned char tmp[4 * VL] = {};
  if (n > 0) std::memcpy(tmp, static_cast<const unsigned char*>(base) + i * elem_size<T>(), n * elem_size<T>());
  return load<T>(tmp, 0);
}

template <DType T>
inline vf load_n(const void* base, Index i, Index n) {
  return n >= VL ? load<T>(base, i) : load_part<T>(base, i, n);
}

inline float hsum(vf v) {
  float s = 0.0f;
  for (int l = 0; l < VL; ++l) s += v[l];
  return s;
}

// fn(std::integral_constant<int, G>) for the G equal to g (1 <= g <= GMAX).
template <int G, int GMAX, class Fn>
inline void with_count(int g, Fn&& fn) {
  if constexpr (G <= GMAX) {
    if (g == G) {
      fn(std::integral_constant<int, G>{});
      return;
    }
    with_count<G + 1, GMAX>(g, std::forward<Fn>(fn));
  }
}

// A term as the kernels read it: factors in a fast type (F32, BF16, F16), converted once where not.
struct Term {
  const void* a;
  const void* b;
  DType a_type, b_type;
  Index r;
  float c;
};

// Groups of at most gmax of n columns, as even as possible: their number and size.
inline std::pair<Index, int> groups(Index n, int gmax) {
  const Index count = (n + gmax - 1) / gmax;
  return {count, static_cast<int>((n + count - 1) / count)};
}

// ---- range: T = c A X (dot products along `in`) -------------------------------------------------------

#if defined(__AVX512F__)
constexpr int JB = 4, QB = 6;  // 24 accumulators
#else
constexpr int JB = 2, QB = 5;  // 10 accumulators
#endif

// t (r x wp, row j's first w entries) = c * A X, from A (r x in, type T) and xt = X^T (w x in).
template <DType T>
void range_t(const void* a, Index r, Index in, const float* xt, Index w, float c, float* t, Index wp) {
  // X's columns outside, A's rows inside: a block of X^T's rows (QB x in) is read from memory once and then
  // from the cache for every block of A's rows (A, r x in, is the smaller; a wide X^T overflows the L2 cache)
  for (Index q0 = 0; q0 < w; q0 += QB) {
    const float* xr[QB];  // a tail block repeats the last column (its sums are not stored)
    LF_UNROLL for (int qq = 0; qq < QB; ++qq) xr[qq] = xt + std::min<Index>(q0 + qq, w - 1) * in;
    for (Index j0 = 0; j0 < r; j0 += JB) {
      Index ar[JB];  // likewise the last row
      LF_UNROLL for (int jj = 0; jj < JB; ++jj) ar[jj] = std::min<Index>(j0 + jj, r - 1) * in;
      vf acc[JB][QB];
      LF_UNROLL for (int jj = 0; jj < JB; ++jj)
        LF_UNROLL for (int qq = 0; qq < QB; ++qq) acc[jj][qq] = vf{};
      Index p = 0;
      for (; p + VL <= in; p += VL) {
        vf av[JB];
        LF_UNROLL for (int jj = 0; jj < JB; ++jj) av[jj] = load<T>(a, ar[jj] + p);
        LF_UNROLL for (int qq = 0; qq < QB; ++qq) {
          const vf xv = load<DType::F32>(xr[qq], p);
          LF_UNROLL for (int jj = 0; jj < JB; ++jj) acc[jj][qq] += av[jj] * xv;
        }
      }
      if (p < in) {
        vf av[JB];
        LF_UNROLL for (int jj = 0; jj < JB; ++jj) av[jj] = load_part<T>(a, ar[jj] + p, in - p);
        LF_UNROLL for (int qq = 0; qq < QB; ++qq) {
          const vf xv = load_part<DType::F32>(xr[qq], p, in - p);
          LF_UNROLL for (int jj = 0; jj < JB; ++jj) acc[jj][qq] += av[jj] * xv;
        }
      }
      for (int jj = 0; jj < JB && j0 + jj < r; ++jj)
        for (int qq = 0; qq < QB && q0 + qq < w; ++qq) t[(j0 + jj) * wp + q0 + qq] = c * hsum(acc[jj][qq]);
    }
  }
}

// ---- range: C += B T over the terms (rows of T against B's values) ---------------------------------------

// Floats of a chunk of the job's float32 sum C, kept in L1 / L2 while every term is added to it: each term's
// factor rows of the chunk are then read in one run (a chunk of 64 adapters' factors is far larger than
// the cache, and one register block's rows of every term would be as many scattered streams).
constexpr Index kChunkFloats = 16384;

// cbuf (rows x wp, rows <= MR) columns [q0, q0 + QV VL) += B T, B's rows widened in bs (rows x r).
template <int MR, int QV>
void range_c_block(const float* bs, Index rows, Index r, const float* t, Index wp, Index q0, float* cbuf) {
  vf cc[MR][QV];
  LF_UNROLL for (int m = 0; m < MR; ++m)
    LF_UNROLL for (int v = 0; v < QV; ++v)
      cc[m][v] = m < rows ? load<DType::F32>(cbuf, m * wp + q0 + v * VL) : vf{};
  for (Index j = 0; j < r; ++j) {
    vf tv[QV];
    LF_UNROLL for (int v = 0; v < QV; ++v) tv[v] = load<DType::F32>(t, j * wp + q0 + v * VL);
    LF_UNROLL for (int m = 0; m < MR; ++m) {
      const vf bb = vf{} + bs[(m < rows ? m : 0) * r + j];
      LF_UNROLL for (int v = 0; v < QV; ++v) cc[m][v] += bb * tv[v];
    }
  }
  for (int m = 0; m < MR && m < rows; ++m)
    LF_UNROLL for (int v = 0; v < QV; ++v) std::memcpy(cbuf + m * wp + q0 + v * VL, &cc[m][v], sizeof(vf));
}

// acc (out x w) += sum_i B_i T_i, in chunks of rows.
void range_c(const std::vector<Term>& terms, const std::vector<const float*>& ts, Index out, Index w, Index wp,
             Index rmax, double* acc) {
  constexpr int QMAX = 3;
  const Index chunk = std::max<Index>(NACC, kChunkFloats / wp / NACC * NACC);
  std::vector<float> cbuf(static_cast<std::size_t>(chunk * wp));
  std::vector<float> bs(static_cast<std::size_t>(chunk * rmax));
  for (Index o0 = 0; o0 < out; o0 += chunk) {
    const Index rows = std::min(chunk, out - o0);
    std::fill(cbuf.begin(), cbuf.end(), 0.0f);
    for (std::size_t i = 0; i < terms.size(); ++i) {
      const Term& tm = terms[i];
      const Index r = tm.r;
      to_f32(static_cast<const unsigned char*>(tm.b) + o0 * r * static_cast<Index>(itemsize(tm.b_type)), tm.b_type,
             bs.data(), static_cast<std::size_t>(rows * r));
      for (Index q0 = 0; q0 < wp; q0 += QMAX * VL) {
        const int qv = static_cast<int>(std::min<Index>(QMAX, (wp - q0) / VL));
        with_count<1, QMAX>(qv, [&](auto qc) {
          constexpr int QV = decltype(qc)::value;
          constexpr int MR = NACC / QV;
          for (Index m0 = 0; m0 < rows; m0 += MR)
            range_c_block<MR, QV>(bs.data() + m0 * r, std::min<Index>(MR, rows - m0), r, ts[i], wp, q0,
                                  cbuf.data() + m0 * wp);
        });
      }
    }
    for (Index m = 0; m < rows; ++m) {
      double* row = acc + (o0 + m) * w;
      const float* c = cbuf.data() + m * wp;
      for (Index q = 0; q < w; ++q) row[q] += c[q];
    }
  }
}

// ---- corange: T = c B^T X (B's rows against X's values) ----------------------------------------------

// t rows [j0, j0 + RV VL) of r, columns [q0, q0 + G) of w: c * B^T X, B (out x r, type T), X (out x w).
template <DType T, int RV, int G, bool FULL>
void corange_t_block(const void* b, Index out, Index r, Index j0, const float* x, Index w, Index q0, float c, float* t,
                     Index wp) {
  vf acc[G][RV];
  LF_UNROLL for (int g = 0; g < G; ++g)
    LF_UNROLL for (int v = 0; v < RV; ++v) acc[g][v] = vf{};
  Index n[RV];  // elements of each vector (a partial last one)
  LF_UNROLL for (int v = 0; v < RV; ++v) n[v] = std::min<Index>(VL, r - j0 - v * VL);
  for (Index o = 0; o < out; ++o) {
    vf bv[RV];
    LF_UNROLL for (int v = 0; v < RV; ++v) {
      bv[v] = FULL ? load<T>(b, o * r + j0 + v * VL) : load_n<T>(b, o * r + j0 + v * VL, n[v]);
    }
    const float* xr = x + o * w + q0;
    LF_UNROLL for (int g = 0; g < G; ++g) {
      const vf xx = vf{} + xr[g];
      LF_UNROLL for (int v = 0; v < RV; ++v) acc[g][v] += xx * bv[v];
    }
  }
  LF_UNROLL for (int g = 0; g < G; ++g)
    LF_UNROLL for (int v = 0; v < RV; ++v)
      for (Index l = 0; l < n[v]; ++l) t[(j0 + v * VL + l) * wp + q0 + g] = c * acc[g][v][l];
}

template <DType T>
void corange_t(const void* b, Index out, Index r, const float* x, Index w, float c, float* t, Index wp) {
  for (Index j0 = 0; j0 < r; j0 += 4 * VL) {
    const int rv = static_cast<int>(std::min<Index>(4, (r - j0 + VL - 1) / VL));
    with_count<1, 4>(rv, [&](auto rvc) {
      constexpr int RV = decltype(rvc)::value;
      const auto [count, g] = groups(w, NACC / RV);
      for (Index k = 0, q0 = 0; k < count; ++k, q0 += g) {
        const int gk = static_cast<int>(std::min<Index>(g, w - q0));
        with_count<1, NACC / RV>(gk, [&](auto gc) {
          constexpr int G = decltype(gc)::value;
          if (j0 + RV * VL <= r) {
            corange_t_block<T, RV, G, true>(b, out, r, j0, x, w, q0, c, t, wp);
          } else {
            corange_t_block<T, RV, G, false>(b, out, r, j0, x, w, q0, c, t, wp);
          }
        });
      }
    });
  }
}

// ---- corange: C^T += T^T A over the terms (rows of A against T's values) ---------------------------------

// cbuf (w x pc: C^T's columns [p0, p0 + pc) of in) rows [q0, q0 + G), columns [c0, c0 + VL) += T^T A's, from
// A (r x in, type T; FULL: the VL columns lie inside `in`, else np of them).
template <DType T, int G, bool FULL>
void corange_c_block(const void* a, Index r, Index in, Index p, Index np, const float* t, Index wp, Index q0,
                     float* cbuf, Index pc, Index c0) {
  vf cc[G];
  LF_UNROLL for (int g = 0; g < G; ++g) cc[g] = load<DType::F32>(cbuf, (q0 + g) * pc + c0);
  for (Index j = 0; j < r; ++j) {
    const vf av = FULL ? load<T>(a, j * in + p) : load_part<T>(a, j * in + p, np);
    const float* tr = t + j * wp + q0;
    LF_UNROLL for (int g = 0; g < G; ++g) cc[g] += tr[g] * av;
  }
  LF_UNROLL for (int g = 0; g < G; ++g) std::memcpy(cbuf + (q0 + g) * pc + c0, &cc[g], sizeof(vf));
}

// acc (in x w) += sum_i A_i^T T_i, in chunks of columns of `in` (every A of type T).
template <DType T>
void corange_c(const std::vector<Term>& terms, const std::vector<const float*>& ts, Index in, Index w, Index wp,
               double* acc) {
  const auto [count, g] = groups(w, NACC);
  const Index pc = std::max<Index>(VL, kChunkFloats / w / VL * VL);
  std::vector<float> cbuf(static_cast<std::size_t>(w * pc));
  for (Index p0 = 0; p0 < in; p0 += pc) {
    const Index cols = std::min(pc, in - p0);
    std::fill(cbuf.begin(), cbuf.end(), 0.0f);
    for (std::size_t i = 0; i < terms.size(); ++i) {
      for (Index c0 = 0; c0 < cols; c0 += VL) {
        const Index np = std::min<Index>(VL, cols - c0);
        for (Index k = 0, q0 = 0; k < count; ++k, q0 += g) {
          const int gk = static_cast<int>(std::min<Index>(g, w - q0));
          with_count<1, NACC>(gk, [&](auto gc) {
            constexpr int G = decltype(gc)::value;
            if (np == VL) {
              corange_c_block<T, G, true>(terms[i].a, terms[i].r, in, p0 + c0, np, ts[i], wp, q0, cbuf.data(), pc, c0);
            } else {
              corange_c_block<T, G, false>(terms[i].a, terms[i].r, in, p0 + c0, np, ts[i], wp, q0, cbuf.data(), pc,
                                           c0);
            }
          });
        }
      }
    }
    for (Index c = 0; c < cols; ++c) {
      double* row = acc + (p0 + c) * w;
      for (Index q = 0; q < w; ++q) row[q] += cbuf[static_cast<std::size_t>(q * pc + c)];
    }
  }
}

// ---- one job ---------------------------------------------------------------------------------------------

template <class Fn>
void by_type(DType t, Fn&& fn) {
  switch (t) {
    case DType::BF16: fn(std::integral_constant<DType, DType::BF16>{}); break;
    case DType::F16: fn(std::integral_constant<DType, DType::F16>{}); break;
    default: fn(std::integral_constant<DType, DType::F32>{}); break;
  }
}

bool fast_type(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

void run_job(const SketchJob& job) {
  const Index w = job.x.dim(1);
  const Index rows_x = job.x.dim(0), rows_acc = job.acc.dim(0);
  if (w == 0 || job.terms.empty()) return;
  const Index in = job.corange ? rows_acc : rows_x, out = job.corange ? rows_x : rows_acc;
  const Index wp = (w + VL - 1) / VL * VL;
  // factors of other dtypes (F64, F8) as float32 copies, once
  std::vector<std::vector<float>> copies;
  std::vector<Term> terms;
  terms.reserve(job.terms.size());
  Index rmax = 0, rsum = 0;
  for (const SketchTerm& st : job.terms) {
    Term tm{st.a.data, st.b.data, st.a_type, st.b_type, st.a.dim(0), static_cast<float>(st.coef)};
    if (!fast_type(tm.a_type)) {
      copies.emplace_back(static_cast<std::size_t>(st.a.numel()));
      to_f32(tm.a, tm.a_type, copies.back().data(), copies.back().size());
      tm.a = copies.back().data();
      tm.a_type = DType::F32;
    }
    if (!fast_type(tm.b_type)) {
      copies.emplace_back(static_cast<std::size_t>(st.b.numel()));
      to_f32(tm.b, tm.b_type, copies.back().data(), copies.back().size());
      tm.b = copies.back().data();
      tm.b_type = DType::F32;
    }
    if (tm.r == 0) continue;
    rmax = std::max(rmax, tm.r);
    rsum += tm.r;
    terms.push_back(tm);
  }
  if (terms.empty()) return;
  // the corange's second product reads every A as one type: mixed types are read as float32 copies
  const bool mixed = std::any_of(terms.begin(), terms.end(), [&](const Term& tm) { return tm.a_type != terms.front().a_type; });
  if (job.corange && mixed) {
    for (Term& tm : terms) {
      if (tm.a_type == DType::F32) continue;
      copies.emplace_back(static_cast<std::size_t>(tm.r * in));
      to_f32(tm.a, tm.a_type, copies.back().data(), copies.back().size());
      tm.a = copies.back().data();
      tm.a_type = DType::F32;
    }
  }
  // each term's T_i (r_i x wp), zeros past column w
  std::vector<float> tbuf(static_cast<std::size_t>(rsum * wp), 0.0f);
  std::vector<const float*> ts;
  ts.reserve(terms.size());
  const float* x = job.x.f32_data();
  double* acc = static_cast<double*>(const_cast<void*>(job.acc.data));
  float* t = tbuf.data();
  if (!job.corange) {
    std::vector<float> xt(static_cast<std::size_t>(w * in));
    for (Index p = 0; p < in; ++p)
      for (Index q = 0; q < w; ++q) xt[static_cast<std::size_t>(q * in + p)] = x[p * w + q];
    for (const Term& tm : terms) {
      by_type(tm.a_type, [&](auto tc) { range_t<decltype(tc)::value>(tm.a, tm.r, in, xt.data(), w, tm.c, t, wp); });
      ts.push_back(t);
      t += tm.r * wp;
    }
    range_c(terms, ts, out, w, wp, rmax, acc);
  } else {
    for (const Term& tm : terms) {
      by_type(tm.b_type, [&](auto tc) { corange_t<decltype(tc)::value>(tm.b, out, tm.r, x, w, tm.c, t, wp); });
      ts.push_back(t);
      t += tm.r * wp;
    }
    by_type(terms.front().a_type, [&](auto tc) { corange_c<decltype(tc)::value>(terms, ts, in, w, wp, acc); });
  }
}

// The byte range of a view.
std::pair<const unsigned char*, const unsigned char*> bytes_of(const TensorView& v) {
  const auto* p = static_cast<const unsigned char*>(v.data);
  return {p, p + v.numel() * v.itemsize};
}

bool overlaps(const TensorView& x, const TensorView& y) {
  const auto [a0, a1] = bytes_of(x);
  const auto [b0, b1] = bytes_of(y);
  return a0 < b1 && b0 < a1;
}

void check_job(const SketchJob& job) {
  const std::string& what = job.what;
  check_f32_matrix(job.x, what + ": the operand");
  const TensorView& acc = job.acc;
  LORAFUSE_CHECK(acc.dtype == "float64" && acc.itemsize == 8, ErrorKind::Dtype,
                 what + ": the accumulator must be a float64 numpy array, got " + acc.dtype);
  LORAFUSE_CHECK(acc.contiguous, ErrorKind::Value, what + ": the accumulator must be C-contiguous");
  LORAFUSE_CHECK(acc.writeable, ErrorKind::Value, what + ": the accumulator must be writable");
  LORAFUSE_CHECK(acc.ndim() == 2, ErrorKind::ShapeMismatch, what + ": the accumulator " + acc.shape_str() + " must be 2-D");
  LORAFUSE_CHECK(acc.dim(1) == job.x.dim(1), ErrorKind::ShapeMismatch,
                 what + ": the accumulator " + acc.shape_str() + " and the operand " + job.x.shape_str() +
                     " must have as many columns");
  LORAFUSE_CHECK(!overlaps(acc, job.x), ErrorKind::Value, what + ": the accumulator overlaps the operand");
  const Index in = job.corange ? acc.dim(0) : job.x.dim(0), out = job.corange ? job.x.dim(0) : acc.dim(0);
  const std::string side = job.corange ? " (corange: operand out x w, accumulator in x w)"
                                       : " (range: operand in x w, accumulator out x w)";
  for (const SketchTerm& t : job.terms) {
    const std::string tw = what + ": " + t.what;
    check_raw(t.a, t.a_type, tw + ": A");
    check_raw(t.b, t.b_type, tw + ": B");
    LORAFUSE_CHECK(t.a.ndim() == 2 && t.b.ndim() == 2, ErrorKind::ShapeMismatch,
                   tw + ": A " + t.a.shape_str() + " and B " + t.b.shape_str() + " must be 2-D");
    LORAFUSE_CHECK(t.a.dim(0) == t.b.dim(1) && t.a.dim(1) == in && t.b.dim(0) == out, ErrorKind::ShapeMismatch,
                   tw + ": A " + t.a.shape_str() + " and B " + t.b.shape_str() + " do not fit the operand " +
                       job.x.shape_str() + " and the accumulator " + acc.shape_str() + side);
    LORAFUSE_CHECK(std::isfinite(static_cast<float>(t.coef)), ErrorKind::Value,
                   tw + ": the coefficient must be finite in float32, got " + std::to_string(t.coef));
    LORAFUSE_CHECK(!overlaps(acc, t.a) && !overlaps(acc, t.b), ErrorKind::Value,
                   tw + ": the accumulator overlaps the factors");
  }
}

}  // namespace

void sketch_fold_batch(const std::vector<SketchJob>& jobs, int threads) {
  for (const SketchJob& job : jobs) check_job(job);
  parallel_for(static_cast<std::int64_t>(jobs.size()), threads,
               [&](std::int64_t i, int) { run_job(jobs[static_cast<std::size_t>(i)]); });
}

}  // namespace lorafuse
