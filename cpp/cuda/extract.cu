// The device side of extract on the GPU (products.hpp): D = to_f32(W_ft) - to_f32(W_base) formed
// in float32 on the device from the two raw checkpoints, streamed in row blocks, with ||D||_F^2
// summed in float64 and extract.cpp's non-finite flags. The products with D are DeviceMatrix's
// (svd.cu); the range finder runs on the host (extract_host.cpp).
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "products.hpp"

namespace lorafuse::cuda::products {
namespace {

constexpr int kThreads = 256;
// Blocks of the difference kernel: fixed, so the float64 partial sums (one per block, summed on
// the host in block order) are the same on every run.
constexpr int kDiffBlocks = 1024;
// Raw bytes of one input copied to the device per row block.
constexpr std::size_t kStageBytes = std::size_t{64} << 20;

__device__ inline bool nonfinite(float x) { return (__float_as_uint(x) & 0x7F800000u) == 0x7F800000u; }

// dtype.cpp's decoders, bit for bit.
__device__ inline float f16_to_f32(unsigned h) {
  const unsigned sign = (h & 0x8000u) << 16;
  const unsigned exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
    return __uint_as_float(sign | __float_as_uint(v));
  }
  if (exp == 0x1Fu) return __uint_as_float(sign | 0x7F800000u | (mant << 13));
  return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// E4M3 "fn": no infinities, S.1111.111 is NaN (std::nanf("") with the sign applied, as the table).
__device__ inline float e4m3_to_f32(unsigned b) {
  const unsigned sign = b >> 7, exp = (b >> 3) & 0xFu, mant = b & 0x7u;
  float v;
  if (exp == 0xFu && mant == 0x7u) {
    v = __uint_as_float(0x7FC00000u);
  } else if (exp == 0) {
    v = static_cast<float>(mant) * 0x1p-9f;  // ldexp(mant, -9), exact
  } else {
    v = __uint_as_float(((exp + 120u) << 23) | (mant << 20));  // (1 + mant / 8) 2^(exp - 7)
  }
  return sign ? -v : v;
}

__device__ inline float load_f32(const unsigned char* __restrict__ p, DType t, std::int64_t i) {
  switch (t) {
    case DType::F32: return reinterpret_cast<const float*>(p)[i];
    case DType::F16: return f16_to_f32(reinterpret_cast<const unsigned short*>(p)[i]);
    case DType::BF16: return __uint_as_float(static_cast<unsigned>(reinterpret_cast<const unsigned short*>(p)[i]) << 16);
    case DType::F64: return static_cast<float>(reinterpret_cast<const double*>(p)[i]);  // round to nearest
    case DType::F8_E4M3: return e4m3_to_f32(p[i]);
    case DType::F8_E5M2: return f16_to_f32(static_cast<unsigned>(p[i]) << 8);  // the top byte of a binary16
  }
  return 0.0f;
}

// d[i] = ft[i] - base[i] (float32) for n elements; partials[block] += the block's sum of d^2 in
// float64 (a fixed tree per block); flags |= kBadBase / kBadFt / kBadDiff for a NaN or Inf in
// the decoded base, the decoded fine-tuned value or the difference.
__global__ void __launch_bounds__(kThreads)
    difference_kernel(const unsigned char* __restrict__ base, DType bt, const unsigned char* __restrict__ ft, DType ftt,
                      std::int64_t n, float* __restrict__ d, double* __restrict__ partials, unsigned* flags) {
  __shared__ double sums[kThreads];
  double acc = 0.0;
  unsigned bad = 0;
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const float b = load_f32(base, bt, i), f = load_f32(ft, ftt, i);
    const float x = f - b;
    bad |= (nonfinite(b) ? kBadBase : 0u) | (nonfinite(f) ? kBadFt : 0u) | (nonfinite(x) ? kBadDiff : 0u);
    d[i] = x;
    const double xd = static_cast<double>(x);
    acc = __dadd_rn(acc, __dmul_rn(xd, xd));  // square, then add: no fused multiply-add
  }
  if (bad != 0) atomicOr(flags, bad);
  sums[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) sums[threadIdx.x] += sums[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] += sums[0];  // each block owns its slot; launches run in order
}

std::size_t count(std::int64_t a, std::int64_t b) { return static_cast<std::size_t>(a) * static_cast<std::size_t>(b); }

}  // namespace

DifferenceStats DifferenceStage::form(DeviceMatrix& D, const void* w_base, DType base_type, const void* w_ft,
                                      DType ft_type, std::int64_t rows, std::int64_t cols, const std::string& what) {
  DifferenceStats st;
  float* d = D.reset(rows, cols, what + ": D = W_ft - W_base");
  if (rows == 0 || cols == 0) return st;
  const std::size_t isb = itemsize(base_type), isf = itemsize(ft_type);
  const std::size_t row_bytes = static_cast<std::size_t>(cols) * std::max(isb, isf);
  const std::int64_t block_rows =
      std::max<std::int64_t>(1, std::min<std::int64_t>(rows, static_cast<std::int64_t>(kStageBytes / row_bytes)));
  const std::string stage = what + ": staging the weights on the GPU";
  base_.reserve(count(block_rows, cols) * isb, stage);
  ft_.reserve(count(block_rows, cols) * isf, stage);
  partials_.reserve(kDiffBlocks, stage);
  flags_.reserve(1, stage);
  cudaStream_t s = ctx_.stream();
  LORAFUSE_CUDA_CHECK(cudaMemsetAsync(partials_.data(), 0, kDiffBlocks * sizeof(double), s), what + ": clearing sums");
  LORAFUSE_CUDA_CHECK(cudaMemsetAsync(flags_.data(), 0, sizeof(unsigned), s), what + ": clearing a flag");
  const auto* bsrc = static_cast<const unsigned char*>(w_base);
  const auto* fsrc = static_cast<const unsigned char*>(w_ft);
  for (std::int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    const std::int64_t nr = std::min(block_rows, rows - r0);
    const std::size_t off = count(r0, cols), n = count(nr, cols);
    // The staging buffers are reused block after block: the copies are ordered after the kernel
    // that read the previous block (one stream).
    LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(base_.data(), bsrc + off * isb, n * isb, cudaMemcpyHostToDevice, s),
                        what + ": copy of the base weight to the GPU");
    LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(ft_.data(), fsrc + off * isf, n * isf, cudaMemcpyHostToDevice, s),
                        what + ": copy of the fine-tuned weight to the GPU");
    difference_kernel<<<kDiffBlocks, kThreads, 0, s>>>(base_.data(), base_type, ft_.data(), ft_type,
                                                       static_cast<std::int64_t>(n), d + off, partials_.data(),
                                                       flags_.data());
    LORAFUSE_CUDA_CHECK(cudaGetLastError(), what + ": launching the difference kernel");
  }
  std::vector<double> partials(kDiffBlocks);
  unsigned raw = 0;
  LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(partials.data(), partials_.data(), kDiffBlocks * sizeof(double),
                                      cudaMemcpyDeviceToHost, s),
                      what + ": copy of ||D||^2 from the GPU");
  LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(&raw, flags_.data(), sizeof(unsigned), cudaMemcpyDeviceToHost, s),
                      what + ": copy of a flag from the GPU");
  LORAFUSE_CUDA_CHECK(cudaStreamSynchronize(s), what + ": waiting for the GPU");
  for (double p : partials) st.frob_sq += p;
  // extract.cpp's diagnose(): which input holds a NaN or Inf; kBadDiff when both are finite and
  // only the difference is not (a NaN or Inf in an input always makes the difference one too).
  if (raw != 0) st.flags = (raw & (kBadBase | kBadFt)) != 0 ? (raw & (kBadBase | kBadFt)) : kBadDiff;
  return st;
}

}  // namespace lorafuse::cuda::products
