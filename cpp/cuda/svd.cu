// The device products of the CUDA backend's decompositions (products.hpp): a dense matrix, a
// factor list and the exact factored path's QR, all on the context's stream. The host side
// (the range finder, the small SVDs, the conventions) is svd_host.cpp.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

#include "products.hpp"

namespace lorafuse::cuda::products {
namespace {

constexpr int kThreads = 256;
constexpr std::int64_t kMaxBlocks = 4096;

unsigned grid_for(std::int64_t n) {
  return static_cast<unsigned>(std::max<std::int64_t>(1, std::min<std::int64_t>(kMaxBlocks, (n + kThreads - 1) / kThreads)));
}

__device__ inline bool nonfinite(float x) { return (__float_as_uint(x) & 0x7F800000u) == 0x7F800000u; }

__device__ inline std::int64_t first_index() {
  return static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ inline std::int64_t stride() { return static_cast<std::int64_t>(gridDim.x) * blockDim.x; }

// *flag = 1 when any of the n values is NaN or Inf.
__global__ void flag_nonfinite_kernel(const float* __restrict__ p, std::int64_t n, unsigned* flag) {
  bool bad = false;
  for (std::int64_t i = first_index(); i < n; i += stride()) bad |= nonfinite(p[i]);
  if (bad) *flag = 1u;
}

// dst (p x q, column-major, leading dimension p) = src (p x q, row-major), each value converted
// to T and, with `scale`, then multiplied by w in T; *flag = 1 when a source value is NaN or Inf.
template <class T>
__global__ void transpose_kernel(const float* __restrict__ src, std::int64_t p, std::int64_t q, double w, bool scale,
                                 T* __restrict__ dst, unsigned* flag) {
  const std::int64_t n = p * q;
  bool bad = false;
  for (std::int64_t idx = first_index(); idx < n; idx += stride()) {
    const std::int64_t i = idx / q, j = idx - i * q;
    const float v = src[idx];
    bad |= nonfinite(v);
    dst[i + j * p] = scale ? static_cast<T>(static_cast<double>(v) * w) : static_cast<T>(v);
  }
  if (bad) *flag = 1u;
}

// dst[i] = T(src[i]) for n values; *flag = 1 when one is NaN or Inf.
template <class T>
__global__ void convert_kernel(const float* __restrict__ src, std::int64_t n, T* __restrict__ dst, unsigned* flag) {
  bool bad = false;
  for (std::int64_t i = first_index(); i < n; i += stride()) {
    const float v = src[i];
    bad |= nonfinite(v);
    dst[i] = static_cast<T>(v);
  }
  if (bad) *flag = 1u;
}

// Row i of T (r x l, column-major) times w[i], in float32 (FactorListOp's T_ *= float(w)).
__global__ void scale_rows_kernel(float* __restrict__ t, std::int64_t r, std::int64_t l, const float* __restrict__ w) {
  const std::int64_t n = r * l;
  for (std::int64_t idx = first_index(); idx < n; idx += stride()) t[idx] = t[idx] * w[idx % r];
}

std::size_t count(std::int64_t a, std::int64_t b) { return static_cast<std::size_t>(a) * static_cast<std::size_t>(b); }

void sync(Context& ctx, const std::string& what) {
  LORAFUSE_CUDA_CHECK(cudaStreamSynchronize(ctx.stream()), what + ": waiting for the GPU");
}

void launched(const std::string& what) { LORAFUSE_CUDA_CHECK(cudaGetLastError(), what + ": launching a kernel"); }

void to_device(void* dst, const void* src, std::size_t bytes, Context& ctx, const std::string& what) {
  if (bytes == 0) return;
  LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, ctx.stream()), what + ": copy to the GPU");
}

void to_host(void* dst, const void* src, std::size_t bytes, Context& ctx, const std::string& what) {
  if (bytes == 0) return;
  LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, ctx.stream()), what + ": copy from the GPU");
}

void sgemm(Context& ctx, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float* A, int lda,
           const float* B, int ldb, float* C, int ldc, const std::string& what) {
  const float one = 1.0f, zero = 0.0f;
  LORAFUSE_CUBLAS_CHECK(cublasSgemm(ctx.blas(), ta, tb, m, n, k, &one, A, lda, B, ldb, &zero, C, ldc),
                        what + ": float32 product");
}

// Reads the device flag (after the work queued before it) and waits: whether it is still 0.
bool flag_clear(DeviceBuffer<unsigned>& flag, Context& ctx, const std::string& what) {
  unsigned host = 0;
  to_host(&host, flag.data(), sizeof(unsigned), ctx, what);
  sync(ctx, what);
  return host == 0;
}

}  // namespace

int blas_dim(std::int64_t v, const std::string& what) {
  if (v < 0 || v > static_cast<std::int64_t>(INT_MAX))
    throw Error(ErrorKind::Device, what + ": dimension " + std::to_string(v) +
                                       " is too large for cuBLAS / cuSOLVER (at most 2^31 - 1; use --device cpu)");
  return static_cast<int>(v);
}

// ---- DeviceMatrix ----

float* DeviceMatrix::reset(std::int64_t rows, std::int64_t cols, const std::string& what) {
  blas_dim(rows, what);
  blas_dim(cols, what);
  rows_ = rows;
  cols_ = cols;
  m_.reserve(count(rows, cols), what + ": the matrix on the GPU");
  return m_.data();
}

void DeviceMatrix::upload(const float* M, std::int64_t rows, std::int64_t cols, const std::string& what) {
  reset(rows, cols, what);
  to_device(m_.data(), M, count(rows, cols) * sizeof(float), ctx_, what);
  sync(ctx_, what);
}

bool DeviceMatrix::all_finite(const std::string& what) {
  const std::int64_t n = rows_ * cols_;
  if (n == 0) return true;
  flag_.reserve(1, what);
  LORAFUSE_CUDA_CHECK(cudaMemsetAsync(flag_.data(), 0, sizeof(unsigned), ctx_.stream()), what + ": clearing a flag");
  flag_nonfinite_kernel<<<grid_for(n), kThreads, 0, ctx_.stream()>>>(m_.data(), n, flag_.data());
  launched(what);
  return flag_clear(flag_, ctx_, what);
}

void DeviceMatrix::apply(const float* X, std::int64_t l, float* Y, const std::string& what) {
  const int m = blas_dim(rows_, what), n = blas_dim(cols_, what), k = blas_dim(l, what);
  if (l == 0) return;
  in_.reserve(count(cols_, l), what + ": a block of the range finder");
  out_.reserve(count(rows_, l), what + ": a block of the range finder");
  to_device(in_.data(), X, count(cols_, l) * sizeof(float), ctx_, what);
  // M is row-major (rows x cols): column-major (cols x rows) with leading dimension cols.
  sgemm(ctx_, CUBLAS_OP_T, CUBLAS_OP_N, m, k, n, m_.data(), n, in_.data(), n, out_.data(), m, what);
  to_host(Y, out_.data(), count(rows_, l) * sizeof(float), ctx_, what);
  sync(ctx_, what);
}

void DeviceMatrix::apply_t(const float* Y, std::int64_t l, float* Z, const std::string& what) {
  const int m = blas_dim(rows_, what), n = blas_dim(cols_, what), k = blas_dim(l, what);
  if (l == 0) return;
  in_.reserve(count(rows_, l), what + ": a block of the range finder");
  out_.reserve(count(cols_, l), what + ": a block of the range finder");
  to_device(in_.data(), Y, count(rows_, l) * sizeof(float), ctx_, what);
  sgemm(ctx_, CUBLAS_OP_N, CUBLAS_OP_N, n, k, m, m_.data(), n, in_.data(), m, out_.data(), n, what);
  to_host(Z, out_.data(), count(cols_, l) * sizeof(float), ctx_, what);
  sync(ctx_, what);
}

// ---- DeviceFactorList ----

void DeviceFactorList::reset(std::int64_t rows, std::int64_t cols, std::int64_t r, std::int64_t max_term_r,
                             const std::string& what) {
  blas_dim(rows, what);
  blas_dim(cols, what);
  blas_dim(r, what);
  rows_ = rows;
  cols_ = cols;
  r_ = r;
  filled_ = 0;
  weighted_ = false;
  host_w_.assign(static_cast<std::size_t>(r), 1.0f);
  const std::string fac = what + ": the factors on the GPU";
  b_.reserve(count(rows, r), fac);
  a_.reserve(count(cols, r), fac);
  stage_b_.reserve(count(rows, max_term_r), fac);
  w_.reserve(static_cast<std::size_t>(r), fac);
  flag_.reserve(1, fac);
  LORAFUSE_CUDA_CHECK(cudaMemsetAsync(flag_.data(), 0, sizeof(unsigned), ctx_.stream()), what + ": clearing a flag");
}

void DeviceFactorList::add_term(const float* B, const float* A, std::int64_t r_i, double weight,
                                const std::string& what) {
  if (r_i <= 0) return;
  if (filled_ + r_i > r_ || count(rows_, r_i) > stage_b_.size())
    throw Error(ErrorKind::Value, what + ": internal error: a factor term does not fit the stack reserved for it");
  // B_i (rows x r_i, row-major) -> columns [filled, filled + r_i) of the column-major stack.
  to_device(stage_b_.data(), B, count(rows_, r_i) * sizeof(float), ctx_, what);
  transpose_kernel<float><<<grid_for(rows_ * r_i), kThreads, 0, ctx_.stream()>>>(
      stage_b_.data(), rows_, r_i, 1.0, false, b_.data() + count(rows_, filled_), flag_.data());
  launched(what);
  // A_i (r_i x cols, row-major) is A_i^T column-major: the next columns of the stack A^T as they are.
  float* a = a_.data() + count(cols_, filled_);
  to_device(a, A, count(r_i, cols_) * sizeof(float), ctx_, what);
  flag_nonfinite_kernel<<<grid_for(r_i * cols_), kThreads, 0, ctx_.stream()>>>(a, r_i * cols_, flag_.data());
  launched(what);
  if (weight != 1.0) {
    weighted_ = true;
    std::fill(host_w_.begin() + filled_, host_w_.begin() + filled_ + r_i, static_cast<float>(weight));
  }
  filled_ += r_i;
}

bool DeviceFactorList::finish(const std::string& what) {
  if (filled_ != r_) throw Error(ErrorKind::Value, what + ": internal error: the factor terms do not fill the stack");
  if (weighted_) to_device(w_.data(), host_w_.data(), host_w_.size() * sizeof(float), ctx_, what);
  return flag_clear(flag_, ctx_, what);  // waits, so host_w_ may change after this
}

void DeviceFactorList::apply(const float* X, std::int64_t l, float* Y, const std::string& what) {
  two_products(X, l, Y, false, what);
}

void DeviceFactorList::apply_t(const float* Y, std::int64_t l, float* Z, const std::string& what) {
  two_products(Y, l, Z, true, what);
}

// apply: T (r x l) = A X through the stack a_ (A^T, cols x r, column-major), then Y (rows x l) = B T through
// b_ (B, rows x r); apply_t: T = B^T Y through b_, then Z (cols x l) = A^T T through a_. T's rows are weighted
// in between when the terms carry weights.
void DeviceFactorList::two_products(const float* in, std::int64_t l, float* out, bool transposed,
                                    const std::string& what) {
  const int m = blas_dim(rows_, what), n = blas_dim(cols_, what), r = blas_dim(r_, what), k = blas_dim(l, what);
  if (l == 0) return;
  const std::string blk = what + ": a block of the range finder";
  x_.reserve(count(cols_, l), blk);
  y_.reserve(count(rows_, l), blk);
  t_.reserve(count(r_, l), blk);
  const int ni = transposed ? m : n, no = transposed ? n : m;
  const DeviceBuffer<float>& first = transposed ? b_ : a_;
  const DeviceBuffer<float>& second = transposed ? a_ : b_;
  const DeviceBuffer<float>& in_buf = transposed ? y_ : x_;
  const DeviceBuffer<float>& out_buf = transposed ? x_ : y_;
  to_device(in_buf.data(), in, count(ni, l) * sizeof(float), ctx_, what);
  sgemm(ctx_, CUBLAS_OP_T, CUBLAS_OP_N, r, k, ni, first.data(), ni, in_buf.data(), ni, t_.data(), r, what);
  if (weighted_) {
    scale_rows_kernel<<<grid_for(r_ * l), kThreads, 0, ctx_.stream()>>>(t_.data(), r_, l, w_.data());
    launched(what);
  }
  sgemm(ctx_, CUBLAS_OP_N, CUBLAS_OP_N, no, k, r, second.data(), no, t_.data(), r, out_buf.data(), no, what);
  to_host(out, out_buf.data(), count(no, l) * sizeof(float), ctx_, what);
  sync(ctx_, what);
}

// ---- DeviceFactorQR ----

void DeviceFactorQR::reset(std::int64_t rows, std::int64_t cols, std::int64_t r, std::int64_t max_term_r,
                           const std::string& what) {
  blas_dim(rows, what);
  blas_dim(cols, what);
  blas_dim(r, what);
  rows_ = rows;
  cols_ = cols;
  r_ = r;
  filled_ = 0;
  const std::string fac = what + ": the float64 factors on the GPU";
  b_.reserve(count(rows, r), fac);
  a_.reserve(count(cols, r), fac);
  stage_b_.reserve(count(rows, max_term_r), fac);
  stage_a_.reserve(count(cols, max_term_r), fac);
  flag_.reserve(1, fac);
  LORAFUSE_CUDA_CHECK(cudaMemsetAsync(flag_.data(), 0, sizeof(unsigned), ctx_.stream()), what + ": clearing a flag");
}

void DeviceFactorQR::add_term(const float* B, const float* A, std::int64_t r_i, double weight, const std::string& what) {
  if (r_i <= 0) return;
  if (filled_ + r_i > r_ || count(rows_, r_i) > stage_b_.size() || count(cols_, r_i) > stage_a_.size())
    throw Error(ErrorKind::Value, what + ": internal error: a factor term does not fit the stack reserved for it");
  // Bd.middleCols(c, r_i) = B_i.cast<double>() * w (svd.cpp's stack_factors).
  to_device(stage_b_.data(), B, count(rows_, r_i) * sizeof(float), ctx_, what);
  transpose_kernel<double><<<grid_for(rows_ * r_i), kThreads, 0, ctx_.stream()>>>(
      stage_b_.data(), rows_, r_i, weight, true, b_.data() + count(rows_, filled_), flag_.data());
  launched(what);
  // Ad.middleCols(c, r_i) = A_i^T.cast<double>().
  to_device(stage_a_.data(), A, count(r_i, cols_) * sizeof(float), ctx_, what);
  convert_kernel<double><<<grid_for(r_i * cols_), kThreads, 0, ctx_.stream()>>>(
      stage_a_.data(), r_i * cols_, a_.data() + count(cols_, filled_), flag_.data());
  launched(what);
  filled_ += r_i;
}

bool DeviceFactorQR::finish(const std::string& what) {
  if (filled_ != r_) throw Error(ErrorKind::Value, what + ": internal error: the factor terms do not fill the stack");
  return flag_clear(flag_, ctx_, what);
}

void DeviceFactorQR::factor(double* Rb, double* Ra, const std::string& what) {
  const int mb = blas_dim(rows_, what), ma = blas_dim(cols_, what), r = blas_dim(r_, what);
  if (r == 0) return;
  cusolverDnHandle_t h = ctx_.solver();
  int lb = 0, la = 0;
  LORAFUSE_CUSOLVER_CHECK(cusolverDnDgeqrf_bufferSize(h, mb, r, b_.data(), mb, &lb), what + ": QR of B");
  LORAFUSE_CUSOLVER_CHECK(cusolverDnDgeqrf_bufferSize(h, ma, r, a_.data(), ma, &la), what + ": QR of A^T");
  const int lwork = std::max({lb, la, 1});
  const std::string ws = what + ": the QR workspace on the GPU";
  work_.reserve(static_cast<std::size_t>(lwork), ws);
  tau_b_.reserve(static_cast<std::size_t>(r), ws);
  tau_a_.reserve(static_cast<std::size_t>(r), ws);
  info_.reserve(2, ws);
  LORAFUSE_CUDA_CHECK(cudaMemsetAsync(info_.data(), 0, 2 * sizeof(int), ctx_.stream()), what + ": clearing a flag");
  LORAFUSE_CUSOLVER_CHECK(cusolverDnDgeqrf(h, mb, r, b_.data(), mb, tau_b_.data(), work_.data(), lwork, info_.data()),
                          what + ": QR of B");
  LORAFUSE_CUSOLVER_CHECK(
      cusolverDnDgeqrf(h, ma, r, a_.data(), ma, tau_a_.data(), work_.data(), lwork, info_.data() + 1),
      what + ": QR of A^T");
  // The top r rows of each factored stack: R (upper triangle) above the Householder vectors.
  const std::size_t rb = static_cast<std::size_t>(r) * sizeof(double);
  LORAFUSE_CUDA_CHECK(cudaMemcpy2DAsync(Rb, rb, b_.data(), static_cast<std::size_t>(mb) * sizeof(double), rb,
                                        static_cast<std::size_t>(r), cudaMemcpyDeviceToHost, ctx_.stream()),
                      what + ": copy of R_B from the GPU");
  LORAFUSE_CUDA_CHECK(cudaMemcpy2DAsync(Ra, rb, a_.data(), static_cast<std::size_t>(ma) * sizeof(double), rb,
                                        static_cast<std::size_t>(r), cudaMemcpyDeviceToHost, ctx_.stream()),
                      what + ": copy of R_A from the GPU");
  int info[2] = {0, 0};
  to_host(info, info_.data(), sizeof(info), ctx_, what);
  sync(ctx_, what);
  if (info[0] != 0 || info[1] != 0)
    throw Error(ErrorKind::Device, what + ": cusolverDnDgeqrf reported info " + std::to_string(info[0]) + " / " +
                                       std::to_string(info[1]));
}

void DeviceFactorQR::apply_q(const double* U, const double* V, std::int64_t kk, double* L, double* R,
                             const std::string& what) {
  const int mb = blas_dim(rows_, what), ma = blas_dim(cols_, what), r = blas_dim(r_, what), k = blas_dim(kk, what);
  if (k == 0 || r == 0) return;
  cusolverDnHandle_t h = ctx_.solver();
  const std::string ws = what + ": the QR workspace on the GPU";
  cb_.reserve(count(rows_, kk), ws);
  ca_.reserve(count(cols_, kk), ws);
  int lb = 0, la = 0;
  LORAFUSE_CUSOLVER_CHECK(cusolverDnDormqr_bufferSize(h, CUBLAS_SIDE_LEFT, CUBLAS_OP_N, mb, k, r, b_.data(), mb,
                                                      tau_b_.data(), cb_.data(), mb, &lb),
                          what + ": Q_B U");
  LORAFUSE_CUSOLVER_CHECK(cusolverDnDormqr_bufferSize(h, CUBLAS_SIDE_LEFT, CUBLAS_OP_N, ma, k, r, a_.data(), ma,
                                                      tau_a_.data(), ca_.data(), ma, &la),
                          what + ": Q_A V");
  const int lwork = std::max({lb, la, 1});
  work_.reserve(static_cast<std::size_t>(lwork), ws);
  LORAFUSE_CUDA_CHECK(cudaMemsetAsync(cb_.data(), 0, count(rows_, kk) * sizeof(double), ctx_.stream()),
                      what + ": clearing a block");
  LORAFUSE_CUDA_CHECK(cudaMemsetAsync(ca_.data(), 0, count(cols_, kk) * sizeof(double), ctx_.stream()),
                      what + ": clearing a block");
  LORAFUSE_CUDA_CHECK(cudaMemsetAsync(info_.data(), 0, 2 * sizeof(int), ctx_.stream()), what + ": clearing a flag");
  // [U; 0] and [V; 0]: U (r x kk) into the top r rows.
  const std::size_t rb = static_cast<std::size_t>(r) * sizeof(double);
  LORAFUSE_CUDA_CHECK(cudaMemcpy2DAsync(cb_.data(), static_cast<std::size_t>(mb) * sizeof(double), U, rb, rb,
                                        static_cast<std::size_t>(k), cudaMemcpyHostToDevice, ctx_.stream()),
                      what + ": copy of U to the GPU");
  LORAFUSE_CUDA_CHECK(cudaMemcpy2DAsync(ca_.data(), static_cast<std::size_t>(ma) * sizeof(double), V, rb, rb,
                                        static_cast<std::size_t>(k), cudaMemcpyHostToDevice, ctx_.stream()),
                      what + ": copy of V to the GPU");
  LORAFUSE_CUSOLVER_CHECK(cusolverDnDormqr(h, CUBLAS_SIDE_LEFT, CUBLAS_OP_N, mb, k, r, b_.data(), mb, tau_b_.data(),
                                           cb_.data(), mb, work_.data(), lwork, info_.data()),
                          what + ": Q_B U");
  LORAFUSE_CUSOLVER_CHECK(cusolverDnDormqr(h, CUBLAS_SIDE_LEFT, CUBLAS_OP_N, ma, k, r, a_.data(), ma, tau_a_.data(),
                                           ca_.data(), ma, work_.data(), lwork, info_.data() + 1),
                          what + ": Q_A V");
  to_host(L, cb_.data(), count(rows_, kk) * sizeof(double), ctx_, what);
  to_host(R, ca_.data(), count(cols_, kk) * sizeof(double), ctx_, what);
  int info[2] = {0, 0};
  to_host(info, info_.data(), sizeof(info), ctx_, what);
  sync(ctx_, what);
  if (info[0] != 0 || info[1] != 0)
    throw Error(ErrorKind::Device, what + ": cusolverDnDormqr reported info " + std::to_string(info[0]) + " / " +
                                       std::to_string(info[1]));
}

}  // namespace lorafuse::cuda::products
