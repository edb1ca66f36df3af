// lowrank.hpp's batches on the GPU: ||B A||_F^2 = sum((B^T B) .* (A A^T)) and
// <B1 A1, B2 A2>_F = sum((B1^T B2) .* (A1 A2^T)), in float64 like the CPU core (lowrank.cpp
// converts the float32 factors to float64 and forms both Gram matrices in float64): the factors
// are copied to the GPU as float32, converted to float64 there, the Grams formed by cuBLAS DGEMM
// and the sum of their elementwise product taken by DDOT (the two r1 x r2 Grams as vectors).
// Every item's result stays on the device until the batch ends (one copy back, one wait).
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "device.hpp"
#include "lorafuse/errors.hpp"
#include "ops.hpp"
#include "products.hpp"

namespace lorafuse::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void to_f64_kernel(const float* __restrict__ src, std::int64_t n, double* __restrict__ dst) {
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step)
    dst[i] = static_cast<double>(src[i]);
}

unsigned grid_for(std::int64_t n) {
  return static_cast<unsigned>(std::max<std::int64_t>(1, std::min<std::int64_t>(4096, (n + kThreads - 1) / kThreads)));
}

// One Gram item: <B1 A1, B2 A2> with B1 (out x r1), A1 (r1 x in), B2 (out x r2), A2 (r2 x in),
// row-major float32; `same` when (B2, A2) is (B1, A1) (a squared norm: uploaded once).
struct GramItem {
  const float *B1, *A1, *B2, *A2;
  std::int64_t r1, r2, out, in;
  bool same;
};

// Scalars of the products in device memory while the handle is in device pointer mode (DDOT
// writes its result to device memory); host pointer mode, which every other user of the
// context expects, is restored on the way out.
class DevicePointerMode {
 public:
  explicit DevicePointerMode(cublasHandle_t h) : h_(h) {
    LORAFUSE_CUBLAS_CHECK(cublasSetPointerMode(h_, CUBLAS_POINTER_MODE_DEVICE), "factored norms: cuBLAS pointer mode");
  }
  ~DevicePointerMode() { cublasSetPointerMode(h_, CUBLAS_POINTER_MODE_HOST); }
  DevicePointerMode(const DevicePointerMode&) = delete;
  DevicePointerMode& operator=(const DevicePointerMode&) = delete;

 private:
  cublasHandle_t h_;
};

std::size_t count(std::int64_t a, std::int64_t b) { return static_cast<std::size_t>(a) * static_cast<std::size_t>(b); }

void gram_batch(const std::vector<GramItem>& items, double* out, const std::string& op) {
  if (items.empty()) return;
  // Sizes of the largest item, so that nothing grows while work is queued.
  std::size_t max_stage = 1, max_b1 = 1, max_a1 = 1, max_b2 = 1, max_a2 = 1, max_g = 1;
  for (const GramItem& it : items) {
    max_stage = std::max({max_stage, count(it.out, it.r1), count(it.r1, it.in), count(it.out, it.r2), count(it.r2, it.in)});
    max_b1 = std::max(max_b1, count(it.out, it.r1));
    max_a1 = std::max(max_a1, count(it.r1, it.in));
    if (!it.same) {
      max_b2 = std::max(max_b2, count(it.out, it.r2));
      max_a2 = std::max(max_a2, count(it.r2, it.in));
    }
    max_g = std::max(max_g, count(it.r1, it.r2));
    for (std::int64_t v : {it.r1, it.r2, it.out, it.in, it.r1 * it.r2}) products::blas_dim(v, op);
  }
  Context& ctx = Context::get();
  const std::lock_guard<std::mutex> lock(ctx.mutex());
  cudaStream_t s = ctx.stream();
  const std::string mem = op + ": factors on the GPU";
  DeviceBuffer<float> stage(max_stage, mem);
  DeviceBuffer<double> b1(max_b1, mem), a1(max_a1, mem), b2(max_b2, mem), a2(max_a2, mem);
  DeviceBuffer<double> g1(max_g, mem), g2(max_g, mem), results(items.size(), mem), scalars(2, mem);
  const double host_scalars[2] = {1.0, 0.0};
  LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(scalars.data(), host_scalars, sizeof(host_scalars), cudaMemcpyHostToDevice, s),
                      op + ": copy to the GPU");
  LORAFUSE_CUDA_CHECK(cudaMemsetAsync(results.data(), 0, items.size() * sizeof(double), s), op + ": clearing results");
  const double* one = scalars.data();
  const double* zero = scalars.data() + 1;
  // float32 host factor -> float64 on the device (through the float32 staging buffer; the
  // copies are ordered after the conversion that read it last: one stream).
  const auto upload = [&](const float* src, std::size_t n, double* dst) {
    LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(stage.data(), src, n * sizeof(float), cudaMemcpyHostToDevice, s),
                        op + ": copy of a factor to the GPU");
    to_f64_kernel<<<grid_for(static_cast<std::int64_t>(n)), kThreads, 0, s>>>(stage.data(), static_cast<std::int64_t>(n),
                                                                                dst);
    LORAFUSE_CUDA_CHECK(cudaGetLastError(), op + ": launching a kernel");
  };
  {
    const DevicePointerMode mode(ctx.blas());
    for (std::size_t i = 0; i < items.size(); ++i) {
      const GramItem& it = items[i];
      if (it.r1 == 0 || it.r2 == 0 || it.out == 0 || it.in == 0) continue;  // an empty sum: 0
      upload(it.B1, count(it.out, it.r1), b1.data());
      upload(it.A1, count(it.r1, it.in), a1.data());
      const double* pb2 = b1.data();
      const double* pa2 = a1.data();
      if (!it.same) {
        upload(it.B2, count(it.out, it.r2), b2.data());
        upload(it.A2, count(it.r2, it.in), a2.data());
        pb2 = b2.data();
        pa2 = a2.data();
      }
      const int r1 = static_cast<int>(it.r1), r2 = static_cast<int>(it.r2);
      const int o = static_cast<int>(it.out), n = static_cast<int>(it.in);
      // B (out x r, row-major) is B^T column-major (r x out): G1 (r1 x r2) = B1^T B2.
      LORAFUSE_CUBLAS_CHECK(
          cublasDgemm(ctx.blas(), CUBLAS_OP_N, CUBLAS_OP_T, r1, r2, o, one, b1.data(), r1, pb2, r2, zero, g1.data(), r1),
          op + ": float64 Gram of B");
      // A (r x in, row-major) is A^T column-major (in x r): G2 (r1 x r2) = A1 A2^T.
      LORAFUSE_CUBLAS_CHECK(
          cublasDgemm(ctx.blas(), CUBLAS_OP_T, CUBLAS_OP_N, r1, r2, n, one, a1.data(), n, pa2, n, zero, g2.data(), r1),
          op + ": float64 Gram of A");
      LORAFUSE_CUBLAS_CHECK(cublasDdot(ctx.blas(), r1 * r2, g1.data(), 1, g2.data(), 1, results.data() + i),
                            op + ": sum of the Grams' product");
    }
  }
  LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(out, results.data(), items.size() * sizeof(double), cudaMemcpyDeviceToHost, s),
                      op + ": copy of the results from the GPU");
  LORAFUSE_CUDA_CHECK(cudaStreamSynchronize(s), op + ": waiting for the GPU");
}

}  // namespace

// The checks and messages are lowrank.cpp's.
void factored_frobenius_sq_batch(const std::vector<FactorPairView>& pairs, double* out, int threads) {
  static_cast<void>(threads);  // every step runs on the GPU
  for (const FactorPairView& p : pairs) {
    check_f32(p.B, "B");
    check_f32(p.A, "A");
    LORAFUSE_CHECK(p.B.ndim() == 2 && p.A.ndim() == 2 && p.B.dim(1) == p.A.dim(0), ErrorKind::ShapeMismatch,
                   "B " + p.B.shape_str() + " and A " + p.A.shape_str() + " cannot be multiplied");
  }
  LORAFUSE_CHECK(out != nullptr || pairs.empty(), ErrorKind::Value, "factored_frobenius_sq: no output buffer");
  std::vector<GramItem> items;
  items.reserve(pairs.size());
  for (const FactorPairView& p : pairs)
    items.push_back(GramItem{p.B.f32_data(), p.A.f32_data(), p.B.f32_data(), p.A.f32_data(), p.B.dim(1), p.B.dim(1),
                             p.B.dim(0), p.A.dim(1), true});
  gram_batch(items, out, "factored_frobenius_sq");
}

void factored_inner_batch(const std::vector<FactorInnerView>& items_in, double* out, int threads) {
  static_cast<void>(threads);
  check_factor_inner_items(items_in, out);
  std::vector<GramItem> items;
  items.reserve(items_in.size());
  for (const FactorInnerView& p : items_in)
    items.push_back(GramItem{p.B1.f32_data(), p.A1.f32_data(), p.B2.f32_data(), p.A2.f32_data(), p.A1.dim(0),
                             p.A2.dim(0), p.B1.dim(0), p.A1.dim(1), false});
  gram_batch(items, out, "factored_inner");
}

}  // namespace lorafuse::cuda
