#include "device.hpp"

#include <map>
#include <memory>

namespace lorafuse::cuda {
namespace {

std::string where(const char* file, int line) {
  const std::string path = file;
  const std::size_t at = path.rfind("cpp/");
  return (at == std::string::npos ? path : path.substr(at)) + ":" + std::to_string(line);
}

const char* cublas_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED (no usable GPU or driver)";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED (out of device memory)";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "unknown cuBLAS status";
}

const char* cusolver_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED (no usable GPU or driver)";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED (out of device memory)";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    default: break;
  }
  return "cuSOLVER error";
}

std::string free_memory_note() {
  std::size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  return "; the device has " + std::to_string(free_b >> 20) + " MiB free of " + std::to_string(total_b >> 20) +
         " MiB";
}

}  // namespace

void fail_cuda(const std::string& what, const char* call, cudaError_t code, const char* file, int line) {
  cudaGetLastError();  // clear a sticky-free error so the next call starts clean
  std::string msg = what + ": " + call + " failed: " + cudaGetErrorName(code) + " (" + cudaGetErrorString(code) +
                    ") at " + where(file, line);
  if (code == cudaErrorMemoryAllocation) msg += free_memory_note() + " (use --device cpu, or fewer --threads)";
  if (code == cudaErrorNoDevice || code == cudaErrorInsufficientDriver)
    msg += " (run with --device cpu on a machine without a usable GPU)";
  throw Error(ErrorKind::Device, msg);
}

void fail_cublas(const std::string& what, const char* call, cublasStatus_t code, const char* file, int line) {
  throw Error(ErrorKind::Device,
              what + ": " + call + " failed: " + cublas_name(code) + " at " + where(file, line));
}

void fail_cusolver(const std::string& what, const char* call, cusolverStatus_t code, const char* file, int line) {
  throw Error(ErrorKind::Device, what + ": " + call + " failed: " + cusolver_name(code) + " (" +
                                     std::to_string(static_cast<int>(code)) + ") at " + where(file, line));
}

// ---- DeviceMemory ----

DeviceMemory::DeviceMemory(std::size_t bytes, const std::string& what) { reserve(bytes, what); }

DeviceMemory::~DeviceMemory() {
  if (p_ != nullptr) cudaFree(p_);
}

DeviceMemory& DeviceMemory::operator=(DeviceMemory&& o) noexcept {
  if (this != &o) {
    if (p_ != nullptr) cudaFree(p_);
    p_ = std::exchange(o.p_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void DeviceMemory::reserve(std::size_t bytes, const std::string& what) {
  if (bytes <= bytes_ && p_ != nullptr) return;
  if (p_ != nullptr) {
    cudaFree(p_);
    p_ = nullptr;
    bytes_ = 0;
  }
  if (bytes == 0) return;
  void* p = nullptr;
  const cudaError_t st = cudaMalloc(&p, bytes);
  if (st != cudaSuccess) {
    cudaGetLastError();
    throw Error(ErrorKind::Device, what + ": cannot allocate " + std::to_string((bytes + (1 << 20) - 1) >> 20) +
                                       " MiB on the GPU (" + cudaGetErrorString(st) + ")" + free_memory_note() +
                                       " (use --device cpu for this work)");
  }
  p_ = p;
  bytes_ = bytes;
}

// ---- PinnedMemory ----

PinnedMemory::PinnedMemory(std::size_t bytes, const std::string& what) { reserve(bytes, what); }

PinnedMemory::~PinnedMemory() {
  if (p_ != nullptr) cudaFreeHost(p_);
}

PinnedMemory& PinnedMemory::operator=(PinnedMemory&& o) noexcept {
  if (this != &o) {
    if (p_ != nullptr) cudaFreeHost(p_);
    p_ = std::exchange(o.p_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void PinnedMemory::reserve(std::size_t bytes, const std::string& what) {
  if (bytes <= bytes_ && p_ != nullptr) return;
  if (p_ != nullptr) {
    cudaFreeHost(p_);
    p_ = nullptr;
    bytes_ = 0;
  }
  if (bytes == 0) return;
  void* p = nullptr;
  const cudaError_t st = cudaMallocHost(&p, bytes);
  if (st != cudaSuccess) {
    cudaGetLastError();
    throw Error(ErrorKind::Device, what + ": cannot allocate " + std::to_string((bytes + (1 << 20) - 1) >> 20) +
                                       " MiB of pinned host memory (" + cudaGetErrorString(st) + ")");
  }
  p_ = p;
  bytes_ = bytes;
}

// ---- Stream, Event ----

Stream::Stream() { LORAFUSE_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "creating a CUDA stream"); }

Stream::~Stream() {
  if (s_ != nullptr) cudaStreamDestroy(s_);
}

void Stream::synchronize(const std::string& what) const { LORAFUSE_CUDA_CHECK(cudaStreamSynchronize(s_), what); }

Event::Event() { LORAFUSE_CUDA_CHECK(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming), "creating a CUDA event"); }

Event::~Event() {
  if (e_ != nullptr) cudaEventDestroy(e_);
}

void Event::record(cudaStream_t s, const std::string& what) { LORAFUSE_CUDA_CHECK(cudaEventRecord(e_, s), what); }

void Event::synchronize(const std::string& what) const { LORAFUSE_CUDA_CHECK(cudaEventSynchronize(e_), what); }

// ---- Context ----

namespace {

int select_device(int device) {
  int count = 0;
  LORAFUSE_CUDA_CHECK(cudaGetDeviceCount(&count), "looking for a CUDA device");
  if (device < 0 || device >= count)
    throw Error(ErrorKind::Device, "CUDA device " + std::to_string(device) + " does not exist (this machine has " +
                                       std::to_string(count) + ")");
  LORAFUSE_CUDA_CHECK(cudaSetDevice(device), "selecting CUDA device " + std::to_string(device));
  return device;
}

}  // namespace

Context::Context(Key, int device) : device_(select_device(device)) {
  LORAFUSE_CUBLAS_CHECK(cublasCreate(&blas_), "starting cuBLAS");
  LORAFUSE_CUBLAS_CHECK(cublasSetStream(blas_, stream_.get()), "starting cuBLAS");
  // No TF32 or other reduced-precision shortcuts: float32 products stay float32.
  LORAFUSE_CUBLAS_CHECK(cublasSetMathMode(blas_, CUBLAS_PEDANTIC_MATH), "starting cuBLAS");
  LORAFUSE_CUSOLVER_CHECK(cusolverDnCreate(&solver_), "starting cuSOLVER");
  LORAFUSE_CUSOLVER_CHECK(cusolverDnSetStream(solver_, stream_.get()), "starting cuSOLVER");
}

Context::~Context() {
  if (solver_ != nullptr) cusolverDnDestroy(solver_);
  if (blas_ != nullptr) cublasDestroy(blas_);
}

void Context::activate() const { LORAFUSE_CUDA_CHECK(cudaSetDevice(device_), "selecting CUDA device"); }

namespace {

// The contexts live until the process ends and are then left to the driver on purpose: at exit the
// CUDA runtime may already be unloaded, and destroying handles then can crash (torch and CuPy do the same).
struct Registry {
  std::mutex mutex;
  std::map<int, std::unique_ptr<Context>> contexts;
  ~Registry() {
    for (auto& entry : contexts) static_cast<void>(entry.second.release());
  }
};

}  // namespace

Context& Context::get(int device) {
  static Registry registry;
  const std::lock_guard<std::mutex> lock(registry.mutex);
  auto it = registry.contexts.find(device);
  if (it == registry.contexts.end()) it = registry.contexts.emplace(device, std::make_unique<Context>(Key{}, device)).first;
  it->second->activate();
  return *it->second;
}

}  // namespace lorafuse::cuda
