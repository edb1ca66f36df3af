#include "lorafuse/tensor.hpp"

#include "lorafuse/errors.hpp"
#include "lorafuse/limits.hpp"
#include "lorafuse/parallel.hpp"

#include <algorithm>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lorafuse {

std::int64_t TensorView::numel() const noexcept {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

std::string TensorView::shape_str() const {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

std::string shape_str(std::int64_t rows, std::int64_t cols) {
  return "(" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
}

void check_f32(const TensorView& t, const std::string& what) {
  LORAFUSE_CHECK(t.f32 && t.itemsize == 4, ErrorKind::Dtype, what + " must be a float32 numpy array, got " + t.dtype);
  LORAFUSE_CHECK(t.contiguous, ErrorKind::Value, what + " must be C-contiguous");
  LORAFUSE_CHECK(t.data != nullptr || t.numel() == 0, ErrorKind::Value, what + ": no data");
}

void check_f32_matrix(const TensorView& t, const std::string& what) {
  check_f32(t, what);
  LORAFUSE_CHECK(t.ndim() == 2, ErrorKind::ShapeMismatch, what + " " + t.shape_str() + " must be 2-D");
}

void check_f32_vector(const TensorView& t, const std::string& what) {
  check_f32(t, what);
  LORAFUSE_CHECK(t.ndim() == 1, ErrorKind::ShapeMismatch, what + " " + t.shape_str() + " must be 1-D");
}

void check_raw(const TensorView& t, DType dt, const std::string& what) {
  LORAFUSE_CHECK(t.contiguous, ErrorKind::Value, what + " must be C-contiguous");
  LORAFUSE_CHECK(t.itemsize == static_cast<std::int64_t>(itemsize(dt)), ErrorKind::Dtype,
                 what + ": buffer item size " + std::to_string(t.itemsize) + " does not match dtype " + dtype_name(dt));
  LORAFUSE_CHECK(t.data != nullptr || t.numel() == 0, ErrorKind::Value, what + ": no data");
}

void check_int_in(std::int64_t v, const std::string& what, std::int64_t lo, std::int64_t hi) {
  const std::string range = " (allowed: an integer from " + std::to_string(lo) + " to " + std::to_string(hi) + ")";
  LORAFUSE_CHECK(v >= lo, ErrorKind::Value, what + " must be >= " + std::to_string(lo) + ", got " + std::to_string(v) + range);
  LORAFUSE_CHECK(v <= hi, ErrorKind::Value, what + " must be <= " + std::to_string(hi) + ", got " + std::to_string(v) + range);
}

void check_rank(std::int64_t k, const std::string& name) { check_int_in(k, name + ": rank", 1, kMaxRank); }

namespace {

// fn(lo, len) over [0, n) in chunks spread over threads.
template <class Fn>
void chunked(std::size_t n, int threads, Fn fn) {
  constexpr std::size_t chunk = 1 << 18;
  const auto blocks = static_cast<std::int64_t>((n + chunk - 1) / chunk);
  parallel_for(blocks, threads, [&](std::int64_t b, int) {
    const std::size_t lo = static_cast<std::size_t>(b) * chunk;
    fn(lo, std::min(chunk, n - lo));
  });
}

}  // namespace

void convert_to_f32(const TensorView& raw, DType src_type, float* dst, int threads, const std::string& what) {
  check_raw(raw, src_type, what);
  const std::size_t n = static_cast<std::size_t>(raw.numel()), isz = itemsize(src_type);
  LORAFUSE_CHECK(dst != nullptr || n == 0, ErrorKind::Value, what + ": no output buffer");
  const auto* src = static_cast<const unsigned char*>(raw.data);
  chunked(n, threads, [&](std::size_t lo, std::size_t len) { to_f32(src + lo * isz, src_type, dst + lo, len); });
}

void convert_from_f32(const TensorView& x, DType dst_type, void* dst, int threads, const std::string& what) {
  LORAFUSE_CHECK(writable(dst_type), ErrorKind::Dtype,
                 std::string("cannot write dtype ") + dtype_name(dst_type) + " (lorafuse writes F32, F16 and BF16)");
  check_f32(x, what);
  const std::size_t n = static_cast<std::size_t>(x.numel()), isz = itemsize(dst_type);
  LORAFUSE_CHECK(dst != nullptr || n == 0, ErrorKind::Value, what + ": no output buffer");
  auto* out = static_cast<unsigned char*>(dst);
  const float* src = x.f32_data();
  chunked(n, threads, [&](std::size_t lo, std::size_t len) { from_f32(src + lo, out + lo * isz, dst_type, len); });
}


#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12 warns that the AVX-512 intrinsics' own _mm512_undefined_* operands "may be used uninitialized"
// once inlined into the tile transpose below (GCC bug 105593, fixed in GCC 13): a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace {

#if defined(__AVX512F__)
// 16 x 16 floats transposed in registers: r[i] holds row i; afterwards r[j] holds column j.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// A full 16 x 16 tile of BF16 (row stride ld_s elements) widened and written transposed (row stride ld_d).
inline void bf16_tile_transposed(const std::uint16_t* s, std::size_t ld_s, float* d, std::size_t ld_d) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + static_cast<std::size_t>(i) * ld_s));
    r[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  transpose16(r);
  for (int j = 0; j < 16; ++j) _mm512_storeu_ps(d + static_cast<std::size_t>(j) * ld_d, r[j]);
}
#endif

// raw (rows x cols) -> dst (cols x rows) in 16 x 16 tiles: each tile's rows are widened into a float
// tile (to_f32's vector paths), then written out column by column in runs of up to 16. Full BF16 tiles
// go through registers where the build has AVX-512.
void widen_transposed(const unsigned char* src, DType t, std::size_t rows, std::size_t cols, float* dst) {
  constexpr std::size_t kTile = 16;
  const std::size_t isz = itemsize(t);
  float tile[kTile][kTile];
  for (std::size_t r0 = 0; r0 < rows; r0 += kTile) {
    const std::size_t rn = std::min(kTile, rows - r0);
    for (std::size_t c0 = 0; c0 < cols; c0 += kTile) {
      const std::size_t cn = std::min(kTile, cols - c0);
#if defined(__AVX512F__)
      if (t == DType::BF16 && rn == kTile && cn == kTile) {
        bf16_tile_transposed(reinterpret_cast<const std::uint16_t*>(src) + r0 * cols + c0, cols, dst + c0 * rows + r0,
                             rows);
        continue;
      }
#endif
      for (std::size_t i = 0; i < rn; ++i) to_f32(src + ((r0 + i) * cols + c0) * isz, t, tile[i], cn);
      for (std::size_t j = 0; j < cn; ++j) {
        float* d = dst + (c0 + j) * rows + r0;
        for (std::size_t i = 0; i < rn; ++i) d[i] = tile[i][j];
      }
    }
  }
}

}  // namespace

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic pop
#endif

void widen_batch(const std::vector<WidenJob>& jobs, int threads) {
  for (const WidenJob& job : jobs) {
    check_raw(job.raw, job.type, job.what);
    LORAFUSE_CHECK(job.raw.ndim() == 2, ErrorKind::ShapeMismatch, job.what + " " + job.raw.shape_str() + " must be 2-D");
    check_f32_matrix(job.out, job.what + ": the output");
    LORAFUSE_CHECK(job.out.writeable, ErrorKind::Value, job.what + ": the output must be writable");
    const std::int64_t rows = job.raw.dim(0), cols = job.raw.dim(1);
    const bool fits = job.transpose ? (job.out.dim(0) == cols && job.out.dim(1) == rows)
                                    : (job.out.dim(0) == rows && job.out.dim(1) == cols);
    LORAFUSE_CHECK(fits, ErrorKind::ShapeMismatch,
                   job.what + " " + job.raw.shape_str() + " does not fit the output " + job.out.shape_str() +
                       (job.transpose ? " (transposed)" : ""));
  }
  parallel_for(static_cast<std::int64_t>(jobs.size()), threads, [&](std::int64_t i, int) {
    const WidenJob& job = jobs[static_cast<std::size_t>(i)];
    const auto rows = static_cast<std::size_t>(job.raw.dim(0)), cols = static_cast<std::size_t>(job.raw.dim(1));
    const auto* src = static_cast<const unsigned char*>(job.raw.data);
    float* dst = job.out.mutable_f32();
    if (job.transpose && rows > 1 && cols > 1) {
      widen_transposed(src, job.type, rows, cols, dst);
    } else {
      to_f32(src, job.type, dst, rows * cols);
    }
  });
}

}  // namespace lorafuse
