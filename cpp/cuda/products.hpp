// The device side of the CUDA backend's decompositions: matrices held on the GPU and their
// products with blocks in host memory. Plain C++ declarations (no Eigen, no kernels): the
// definitions live in svd.cu and extract.cu (compiled by nvcc), the users in svd_host.cpp and
// extract_host.cpp (compiled by the host compiler with Eigen and cpp/src/range_finder.hpp).
//
// Layouts: every host block handed to a product is column-major (Eigen's default MatrixXf /
// MatrixXd), contiguous, with the leading dimension equal to its number of rows. Inputs given
// by the caller (D, B, A, raw weights) are row-major, as in the CPU core.
//
// Every object binds one Context (whose mutex the caller holds for the whole batch) and issues
// its work on the context's stream; each public call returns with the stream idle, so the host
// blocks it was given may be reused or freed at once and the object's buffers may grow.
// Failures raise Error(Device) (device.hpp): out of memory names the bytes and `what`.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "device.hpp"
#include "lorafuse/dtype.hpp"

namespace lorafuse::cuda::products {

// `v` as an int for a cuBLAS / cuSOLVER dimension; Error(Device) naming `what` when it does not fit.
int blas_dim(std::int64_t v, const std::string& what);

// A dense float32 matrix M (rows x cols) on the device, stored row-major as the CPU core's
// DenseOp reads it, with the range finder's two products (cuBLAS SGEMM, float32, no TF32).
class DeviceMatrix {
 public:
  explicit DeviceMatrix(Context& ctx) : ctx_(ctx) {}
  std::int64_t rows() const noexcept { return rows_; }
  std::int64_t cols() const noexcept { return cols_; }
  // Storage for a rows x cols matrix (row-major; contents unspecified until written).
  float* reset(std::int64_t rows, std::int64_t cols, const std::string& what);
  // reset() and copy a row-major float32 matrix from host memory.
  void upload(const float* M, std::int64_t rows, std::int64_t cols, const std::string& what);
  // Whether every entry is finite (one pass on the device).
  bool all_finite(const std::string& what);
  // Y (rows x l) = M X for X (cols x l); Z (cols x l) = M^T Y for Y (rows x l).
  void apply(const float* X, std::int64_t l, float* Y, const std::string& what);
  void apply_t(const float* Y, std::int64_t l, float* Z, const std::string& what);

 private:
  Context& ctx_;
  std::int64_t rows_ = 0, cols_ = 0;
  DeviceBuffer<float> m_, in_, out_;
  DeviceBuffer<unsigned> flag_;
};

// sum_i w_i B_i A_i (rows x cols) through its factors, uploaded once as float32 stacks
// B = [B_1 ... B_n] (rows x r) and A = [A_1; ...; A_n] (r x cols). The products are those of the
// CPU core's FactorListOp: T = A X (r x l), row block i of T multiplied by float(w_i), Y = B T
// (and T = B^T Y, scaled, Z = A^T T for the transpose), each a single SGEMM over the stack.
class DeviceFactorList {
 public:
  explicit DeviceFactorList(Context& ctx) : ctx_(ctx) {}
  std::int64_t rows() const noexcept { return rows_; }
  std::int64_t cols() const noexcept { return cols_; }
  // Room for terms of ranks summing to r (none above max_term_r).
  void reset(std::int64_t rows, std::int64_t cols, std::int64_t r, std::int64_t max_term_r, const std::string& what);
  // Uploads the next term: B (rows x r_i) and A (r_i x cols), row-major float32, r_i >= 1.
  void add_term(const float* B, const float* A, std::int64_t r_i, double weight, const std::string& what);
  // After the last term: whether every uploaded value is finite.
  bool finish(const std::string& what);
  void apply(const float* X, std::int64_t l, float* Y, const std::string& what);
  void apply_t(const float* Y, std::int64_t l, float* Z, const std::string& what);

 private:
  // apply (transposed false) and apply_t (true): the same two products through the stacks, sides swapped.
  void two_products(const float* in, std::int64_t l, float* out, bool transposed, const std::string& what);

  Context& ctx_;
  std::int64_t rows_ = 0, cols_ = 0, r_ = 0, filled_ = 0;
  bool weighted_ = false;
  std::vector<float> host_w_;
  DeviceBuffer<float> b_, a_, stage_b_, w_, x_, y_, t_;
  DeviceBuffer<unsigned> flag_;
};

// The exact factored path of svd.cpp (factored_one, r < min(rows, cols)) on the device: the
// stacks Bd = [w_1 B_1 ... w_n B_n] (rows x r) and Ad = [A_1; ...; A_n]^T (cols x r) in float64
// (each float32 value converted, then multiplied by the float64 weight, as stack_factors does),
// their Householder QR by cuSOLVER (geqrf, in place), and the products Q [U; 0] by the
// Householder sequences (ormqr), never forming Q.
class DeviceFactorQR {
 public:
  explicit DeviceFactorQR(Context& ctx) : ctx_(ctx) {}
  void reset(std::int64_t rows, std::int64_t cols, std::int64_t r, std::int64_t max_term_r, const std::string& what);
  void add_term(const float* B, const float* A, std::int64_t r_i, double weight, const std::string& what);
  // After the last term: whether every uploaded float32 value is finite.
  bool finish(const std::string& what);
  // QR of both stacks; writes the r x r upper triangles R_B and R_A (column-major, host; the
  // entries below the diagonal are unspecified).
  void factor(double* Rb, double* Ra, const std::string& what);
  // L (rows x kk) = Q_B [U; 0] and R (cols x kk) = Q_A [V; 0] for U, V (r x kk); host, column-major.
  void apply_q(const double* U, const double* V, std::int64_t kk, double* L, double* R, const std::string& what);

 private:
  Context& ctx_;
  std::int64_t rows_ = 0, cols_ = 0, r_ = 0, filled_ = 0;
  DeviceBuffer<double> b_, a_, tau_b_, tau_a_, work_, cb_, ca_;
  DeviceBuffer<float> stage_b_, stage_a_;
  DeviceBuffer<int> info_;
  DeviceBuffer<unsigned> flag_;
};

// What forming D = W_ft - W_base found: ||D||_F^2 (float64) and extract.cpp's non-finite flags
// (kBadBase = 1, kBadFt = 2: that input holds NaN or Inf; kBadDiff = 4: both are finite and only
// the difference overflows float32; 0: D is finite).
struct DifferenceStats {
  double frob_sq = 0.0;
  unsigned flags = 0;
};
constexpr unsigned kBadBase = 1, kBadFt = 2, kBadDiff = 4;

// Forms D = to_f32(W_ft) - to_f32(W_base) (float32 subtraction, dtype.cpp's decoding) in a
// DeviceMatrix, streaming both raw row-major inputs to the device in row blocks.
class DifferenceStage {
 public:
  explicit DifferenceStage(Context& ctx) : ctx_(ctx) {}
  DifferenceStats form(DeviceMatrix& D, const void* w_base, DType base_type, const void* w_ft, DType ft_type,
                       std::int64_t rows, std::int64_t cols, const std::string& what);

 private:
  Context& ctx_;
  DeviceBuffer<unsigned char> base_, ft_;
  DeviceBuffer<double> partials_;
  DeviceBuffer<unsigned> flags_;
};

}  // namespace lorafuse::cuda::products
