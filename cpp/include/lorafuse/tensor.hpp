// What a caller hands the core: an n-D array as a view (where its elements are, what they
// are, its shape), not yet trusted. The library's entry points (make_*_job, the batch
// functions) check every view before a byte of it is read, with LORAFUSE_CHECK, so a
// binding (pybind11 today, a CUDA backend's later) only converts its objects into views.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "lorafuse/dtype.hpp"

namespace lorafuse {

struct TensorView {
  const void* data = nullptr;
  std::vector<std::int64_t> shape;
  std::string dtype = "float32";  // the caller's element type, for messages (numpy: dtype.name)
  bool f32 = true;                // elements are native float32
  std::int64_t itemsize = 4;      // bytes per element
  bool contiguous = true;         // C order without gaps
  bool writeable = false;

  int ndim() const noexcept { return static_cast<int>(shape.size()); }
  std::int64_t dim(int i) const noexcept { return shape[static_cast<std::size_t>(i)]; }
  std::int64_t numel() const noexcept;
  const float* f32_data() const noexcept { return static_cast<const float*>(data); }
  float* mutable_f32() const noexcept { return static_cast<float*>(const_cast<void*>(data)); }
  std::string shape_str() const;  // "(3, 4)", "(5,)"
};

// "(a, b)"
std::string shape_str(std::int64_t rows, std::int64_t cols);

// Each raises lorafuse::Error naming `what` (module name and operand):
//   Dtype "<what> must be a float32 numpy array, got <dtype>"; Value "<what> must be C-contiguous";
//   ShapeMismatch "<what> <shape> must be 2-D" (check_f32_matrix) or "... must be 1-D" (check_f32_vector).
void check_f32(const TensorView& t, const std::string& what);
void check_f32_matrix(const TensorView& t, const std::string& what);
void check_f32_vector(const TensorView& t, const std::string& what);
// A raw buffer of elements of `dt`: C-contiguous, and (Dtype) its item size is that of `dt`
// (BF16 travels as uint16, F8 as uint8).
void check_raw(const TensorView& t, DType dt, const std::string& what);
// lo <= v <= hi, else Error(Value) "<what> must be >= lo, got v (allowed: an integer from lo to hi)".
void check_int_in(std::int64_t v, const std::string& what, std::int64_t lo, std::int64_t hi);
// A requested rank: 1 .. kMaxRank ("<name>: rank must be ...").
void check_rank(std::int64_t k, const std::string& name);

// Checked dtype conversions of whole arrays, chunked over `threads` threads:
//   convert_to_f32: `raw` (elements of `src_type`, C-contiguous, item size matching: else
//     Error naming `what`) -> raw.numel() floats at dst.
//   convert_from_f32: `x` (float32, C-contiguous) -> x.numel() elements of the writable
//     `dst_type` (F32, F16, BF16; else Error(Dtype)) at dst, rounded to nearest even.
void convert_to_f32(const TensorView& raw, DType src_type, float* dst, int threads, const std::string& what);
void convert_from_f32(const TensorView& x, DType dst_type, void* dst, int threads, const std::string& what);

// One 2-D raw tensor widened to float32 into a caller's array (convert_into): `raw` (rows x cols,
// elements of `type`, C-contiguous) into `out` (float32, C-contiguous, writable): (rows x cols), or
// (cols x rows) with `transpose`. Streamed combine fills its factor stacks this way (B_i as B_i^T rows).
struct WidenJob {
  TensorView raw;
  DType type = DType::F32;
  TensorView out;
  bool transpose = false;
  std::string what;  // names the tensor in errors
};
// Checks every job (Dtype, Value, ShapeMismatch naming `what` and both shapes) before converting any,
// then converts them spread over `threads` threads; conversions are exact (F64 rounds to nearest).
void widen_batch(const std::vector<WidenJob>& jobs, int threads);

}  // namespace lorafuse
