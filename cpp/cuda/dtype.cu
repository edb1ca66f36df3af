// dtype conversion on the GPU (ops.hpp to_float32 / from_float32), the element-wise conversion
// kernels other .cu files launch on device buffers (dtype_kernels.cuh), and the device queries
// (device_count, unavailable_reason, device_description).
//
// to_float32 / from_float32 take host pointers: the data goes through two slots (a pinned
// buffer pair, device buffers, a stream and an event each) in chunks, so chunk i+1's copy to the
// GPU overlaps chunk i's kernel and chunk i-1's copy back; the host-side copies into and out of
// the pinned buffers run on the calling thread (split over a few threads for large chunks). The
// buffers stay allocated between calls (one set per device, guarded by the Context mutex).
#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "device.hpp"
#include "dtype_kernels.cuh"
#include "lorafuse/errors.hpp"
#include "lorafuse/parallel.hpp"
#include "ops.hpp"

namespace lorafuse::cuda {

namespace {

constexpr int kThreads = 256;  // threads per block of the element-wise kernels

// ---- kernels ----

// out[i] = float32 value of element i of `raw` (type T), for i < n: the exact decodings of
// dtype_kernels.cuh (grid-stride loop, one element per step).
template <DType T>
__global__ void to_f32_kernel(const void* __restrict__ raw, float* __restrict__ out, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = dev::load_f32<T>(raw, i);
}

// out[i] = x[i] rounded to T (nearest even), for i < n; with CHECK, *bad = 1 when any x[i] is not
// storable in T (|x| >= limit, or NaN). `out` may alias `x` only when T is F32.
template <DType T, bool CHECK>
__global__ void from_f32_kernel(const float* x, void* out, std::int64_t n, float limit, unsigned* __restrict__ bad) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  bool ok = true;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = x[i];
    if (CHECK) ok &= dev::storable(v, limit);
    dev::store_f32<T>(out, i, v);
  }
  if (CHECK && !ok) *bad = 1u;
}

// *bad = 1 when any of x[0..n) is not storable (|x| >= limit, or NaN); nothing is written else.
__global__ void check_storable_kernel(const float* __restrict__ x, std::int64_t n, float limit,
                                      unsigned* __restrict__ bad) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  bool ok = true;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    ok &= dev::storable(x[i], limit);
  if (!ok) *bad = 1u;
}

void check_launch(const std::string& what) { LORAFUSE_CUDA_CHECK(cudaGetLastError(), what); }

[[noreturn]] void not_writable(DType dt) {
  throw Error(ErrorKind::Dtype,
              std::string("cannot write dtype ") + dtype_name(dt) + " (lorafuse writes F32, F16 and BF16)");
}

// ---- staging for the host-pointer conversions ----

struct ConvSlot {
  Stream stream;
  Event done;
  PinnedMemory pin_in, pin_out;
  DeviceMemory dev_in, dev_out;
  void* pending_dst = nullptr;  // where pin_out goes once `done` has passed
  std::size_t pending_bytes = 0;
};

struct ConvWorkspace {
  std::array<ConvSlot, 2> slot;
};

// One workspace per device, created on first use and kept (like the Contexts) until the process ends.
ConvWorkspace& conv_workspace(int device) {
  struct Holder {
    std::mutex mutex;
    std::map<int, std::unique_ptr<ConvWorkspace>> map;
    ~Holder() {
      for (auto& e : map) static_cast<void>(e.second.release());  // left to the driver at exit
    }
  };
  static Holder holder;
  const std::lock_guard<std::mutex> lock(holder.mutex);
  auto it = holder.map.find(device);
  if (it == holder.map.end()) it = holder.map.emplace(device, std::make_unique<ConvWorkspace>()).first;
  return *it->second;
}

// Waits for both slots on the way out of an exception, so no copy is still in flight into or out of
// the buffers when the next call reuses them.
class ConvDrain {
 public:
  explicit ConvDrain(ConvWorkspace& ws) : ws_(ws) {}
  ~ConvDrain() {
    if (done_) return;
    for (ConvSlot& s : ws_.slot) {
      cudaStreamSynchronize(s.stream.get());
      s.pending_dst = nullptr;
      s.pending_bytes = 0;
    }
    cudaGetLastError();
  }
  void finished() { done_ = true; }

 private:
  ConvWorkspace& ws_;
  bool done_ = false;
};

void finish_slot(ConvSlot& s, const std::string& what) {
  s.done.synchronize(what);
  if (s.pending_dst != nullptr && s.pending_bytes > 0) parallel_copy(s.pending_dst, s.pin_out.get(), s.pending_bytes, 0);
  s.pending_dst = nullptr;
  s.pending_bytes = 0;
}

// n elements of in_size bytes at src -> n elements of out_size bytes at dst (both host memory), in
// chunks through the two slots; launch(dev_in, dev_out, m, stream) converts one chunk of m elements.
template <class Launch>
void convert_chunks(const void* src, std::size_t in_size, void* dst, std::size_t out_size, std::int64_t n,
                    const std::string& what, Launch launch) {
  if (n <= 0) return;
  Context& ctx = Context::get();
  const std::lock_guard<std::mutex> lock(ctx.mutex());
  ConvWorkspace& ws = conv_workspace(ctx.device());
  ConvDrain drain(ws);
  constexpr std::int64_t kChunk = std::int64_t{4} << 20;  // elements per chunk
  const auto* in = static_cast<const unsigned char*>(src);
  auto* out = static_cast<unsigned char*>(dst);
  std::size_t next = 0;
  for (std::int64_t c = 0; c < n; c += kChunk, next ^= 1) {
    ConvSlot& s = ws.slot[next];
    finish_slot(s, what + ": copy back");  // the chunk that used this slot two steps ago
    const std::int64_t m = std::min(kChunk, n - c);
    const std::size_t in_bytes = static_cast<std::size_t>(m) * in_size;
    const std::size_t out_bytes = static_cast<std::size_t>(m) * out_size;
    s.pin_in.reserve(in_bytes, what + ": pinned staging");
    s.pin_out.reserve(out_bytes, what + ": pinned staging");
    s.dev_in.reserve(in_bytes, what + ": input on the GPU");
    s.dev_out.reserve(out_bytes, what + ": output on the GPU");
    parallel_copy(s.pin_in.get(), in + static_cast<std::size_t>(c) * in_size, in_bytes, 0);
    const cudaStream_t st = s.stream.get();
    LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(s.dev_in.get(), s.pin_in.get(), in_bytes, cudaMemcpyHostToDevice, st),
                        what + ": copy to the GPU");
    launch(s.dev_in.get(), s.dev_out.get(), m, st);
    LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(s.pin_out.get(), s.dev_out.get(), out_bytes, cudaMemcpyDeviceToHost, st),
                        what + ": copy back from the GPU");
    s.done.record(st, what + ": copy back from the GPU");
    s.pending_dst = out + static_cast<std::size_t>(c) * out_size;
    s.pending_bytes = out_bytes;
  }
  for (ConvSlot& s : ws.slot) finish_slot(s, what + ": copy back");
  drain.finished();
}

std::string sm_name(int major, int minor) { return "sm_" + std::to_string(major) + std::to_string(minor); }

std::string version_name(int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); }

}  // namespace

void parallel_copy(void* dst, const void* src, std::size_t bytes, int threads) {
  constexpr std::size_t kPiece = std::size_t{4} << 20;
  if (bytes == 0) return;
  const int t = std::min(resolve_threads(threads), 16);  // a copy saturates memory with a few threads
  if (bytes <= 2 * kPiece || t <= 1) {
    std::memcpy(dst, src, bytes);
    return;
  }
  const auto pieces = static_cast<std::int64_t>((bytes + kPiece - 1) / kPiece);
  parallel_for(pieces, t, [&](std::int64_t i, int) {
    const std::size_t off = static_cast<std::size_t>(i) * kPiece;
    std::memcpy(static_cast<unsigned char*>(dst) + off, static_cast<const unsigned char*>(src) + off,
                std::min(kPiece, bytes - off));
  });
}

unsigned elementwise_blocks(std::int64_t n) {
  const std::int64_t per_block = std::int64_t{kThreads} * 4;
  return static_cast<unsigned>(std::clamp<std::int64_t>((n + per_block - 1) / per_block, 1, std::int64_t{1} << 16));
}

void launch_to_f32(const void* raw, DType dt, float* out, std::int64_t n, cudaStream_t stream, const std::string& what) {
  if (n <= 0) return;
  const unsigned blocks = elementwise_blocks(n);
  switch (dt) {
    case DType::F32:
      if (raw != out)
        LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(out, raw, static_cast<std::size_t>(n) * 4, cudaMemcpyDeviceToDevice, stream),
                            what);
      return;
    case DType::BF16: to_f32_kernel<DType::BF16><<<blocks, kThreads, 0, stream>>>(raw, out, n); break;
    case DType::F16: to_f32_kernel<DType::F16><<<blocks, kThreads, 0, stream>>>(raw, out, n); break;
    case DType::F64: to_f32_kernel<DType::F64><<<blocks, kThreads, 0, stream>>>(raw, out, n); break;
    case DType::F8_E4M3: to_f32_kernel<DType::F8_E4M3><<<blocks, kThreads, 0, stream>>>(raw, out, n); break;
    case DType::F8_E5M2: to_f32_kernel<DType::F8_E5M2><<<blocks, kThreads, 0, stream>>>(raw, out, n); break;
  }
  check_launch(what);
}

void launch_from_f32(const float* x, DType dt, void* out, std::int64_t n, unsigned* bad, cudaStream_t stream,
                     const std::string& what) {
  if (n <= 0) return;
  if (!writable(dt)) not_writable(dt);
  if (dt == DType::F32 && static_cast<const void*>(x) == out) {
    if (bad != nullptr) launch_check_storable(x, dt, n, bad, stream, what);
    return;
  }
  const unsigned blocks = elementwise_blocks(n);
  const float limit = overflow_threshold(dt);
  switch (dt) {
    case DType::F32:
      if (bad != nullptr) from_f32_kernel<DType::F32, true><<<blocks, kThreads, 0, stream>>>(x, out, n, limit, bad);
      else from_f32_kernel<DType::F32, false><<<blocks, kThreads, 0, stream>>>(x, out, n, limit, bad);
      break;
    case DType::BF16:
      if (bad != nullptr) from_f32_kernel<DType::BF16, true><<<blocks, kThreads, 0, stream>>>(x, out, n, limit, bad);
      else from_f32_kernel<DType::BF16, false><<<blocks, kThreads, 0, stream>>>(x, out, n, limit, bad);
      break;
    case DType::F16:
      if (bad != nullptr) from_f32_kernel<DType::F16, true><<<blocks, kThreads, 0, stream>>>(x, out, n, limit, bad);
      else from_f32_kernel<DType::F16, false><<<blocks, kThreads, 0, stream>>>(x, out, n, limit, bad);
      break;
    default: not_writable(dt);
  }
  check_launch(what);
}

void launch_check_storable(const float* x, DType dt, std::int64_t n, unsigned* bad, cudaStream_t stream,
                           const std::string& what) {
  if (n <= 0) return;
  check_storable_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(x, n, overflow_threshold(dt), bad);
  check_launch(what);
}

// ---- ops.hpp: conversions of host buffers ----

void to_float32(const void* raw, DType dt, float* out, std::int64_t n) {
  if (n <= 0) return;
  if (dt == DType::F32) {  // the bits themselves, NaN payloads included: no trip to the GPU
    parallel_copy(out, raw, static_cast<std::size_t>(n) * 4, 0);
    return;
  }
  const std::string what = std::string("to_float32 (") + dtype_name(dt) + ")";
  convert_chunks(raw, itemsize(dt), out, 4, n, what, [&](const void* din, void* dout, std::int64_t m, cudaStream_t st) {
    launch_to_f32(din, dt, static_cast<float*>(dout), m, st, what);
  });
}

void from_float32(const float* x, DType dt, void* out, std::int64_t n) {
  if (!writable(dt)) not_writable(dt);
  if (n <= 0) return;
  if (dt == DType::F32) {
    parallel_copy(out, x, static_cast<std::size_t>(n) * 4, 0);
    return;
  }
  const std::string what = std::string("from_float32 (") + dtype_name(dt) + ")";
  convert_chunks(x, 4, out, itemsize(dt), n, what, [&](const void* din, void* dout, std::int64_t m, cudaStream_t st) {
    launch_from_f32(static_cast<const float*>(din), dt, dout, m, nullptr, st, what);
  });
}

// ---- ops.hpp: device queries ----

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string unavailable_reason() {
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0) {
    cudaGetLastError();
    return "no NVIDIA driver was found on this machine (libcuda could not be loaded)";
  }
  int count = 0;
  const cudaError_t st = cudaGetDeviceCount(&count);
  if (st != cudaSuccess) cudaGetLastError();
  if (st == cudaErrorInsufficientDriver)
    return "the NVIDIA driver supports CUDA " + version_name(driver) + ", older than the CUDA " +
           version_name(CUDART_VERSION) + " this build of lorafuse needs (update the driver)";
  if (st == cudaErrorNoDevice || (st == cudaSuccess && count == 0)) return "no CUDA device was found";
  if (st != cudaSuccess)
    return std::string("CUDA cannot start: ") + cudaGetErrorName(st) + " (" + cudaGetErrorString(st) + ")";
  int mode = 0, major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&mode, cudaDevAttrComputeMode, 0) == cudaSuccess && mode == cudaComputeModeProhibited)
    return "CUDA device 0 is in prohibited compute mode (nvidia-smi -c)";
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
  cudaGetLastError();
  // A kernel image (or PTX the driver can compile) for this device must be in the build.
  cudaFuncAttributes attr{};
  const cudaError_t k = cudaFuncGetAttributes(&attr, to_f32_kernel<DType::BF16>);
  if (k != cudaSuccess) {
    cudaGetLastError();
    if (k == cudaErrorNoKernelImageForDevice || k == cudaErrorInvalidDeviceFunction ||
        k == cudaErrorUnsupportedPtxVersion)
      return "this build of lorafuse has no GPU code for device 0 (" + sm_name(major, minor) +
             "): rebuild with CMAKE_CUDA_ARCHITECTURES including " + std::to_string(major * 10 + minor);
    return std::string("CUDA device 0 cannot be used: ") + cudaGetErrorName(k) + " (" + cudaGetErrorString(k) + ")";
  }
  return "";
}

std::string device_description(int device) {
  cudaDeviceProp p{};
  LORAFUSE_CUDA_CHECK(cudaGetDeviceProperties(&p, device), "describing CUDA device " + std::to_string(device));
  const std::size_t gib = (p.totalGlobalMem + (std::size_t{1} << 29)) >> 30;
  return std::string(p.name) + " (" + sm_name(p.major, p.minor) + ", " + std::to_string(gib) + " GiB)";
}

}  // namespace lorafuse::cuda
