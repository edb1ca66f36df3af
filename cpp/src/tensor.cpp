#include "lorafuse/tensor.hpp"

#include "lorafuse/errors.hpp"
#include "lorafuse/limits.hpp"
#include "lorafuse/parallel.hpp"

#include <algorithm>

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

}  // namespace lorafuse
