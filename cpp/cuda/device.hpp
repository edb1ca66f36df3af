// The CUDA backend's resources, RAII only: device and pinned host buffers, streams, events, the
// cuBLAS and cuSOLVER handles of one device (Context), and the checks that turn every failed CUDA,
// cuBLAS or cuSOLVER call into lorafuse::Error(ErrorKind::Device) (lorafuse.errors.DeviceError),
// naming the call, the code and what was being done. Host code only (no kernels): included by the
// .cu files and by the binding.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>

#include "lorafuse/errors.hpp"

namespace lorafuse::cuda {

// Throws Error(Device, "<what>: <call> failed: <code name> (<description>) at <file>:<line>").
[[noreturn]] void fail_cuda(const std::string& what, const char* call, cudaError_t code, const char* file, int line);
[[noreturn]] void fail_cublas(const std::string& what, const char* call, cublasStatus_t code, const char* file,
                              int line);
[[noreturn]] void fail_cusolver(const std::string& what, const char* call, cusolverStatus_t code, const char* file,
                                int line);

}  // namespace lorafuse::cuda

// LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(...), job.name + ": copy-in"): `what` is built only on failure.
#define LORAFUSE_CUDA_CHECK(call, what)                                                          \
  do {                                                                                           \
    const cudaError_t lorafuse_status_ = (call);                                                 \
    if (lorafuse_status_ != cudaSuccess)                                                         \
      ::lorafuse::cuda::fail_cuda((what), #call, lorafuse_status_, __FILE__, __LINE__);         \
  } while (0)
#define LORAFUSE_CUBLAS_CHECK(call, what)                                                        \
  do {                                                                                           \
    const cublasStatus_t lorafuse_status_ = (call);                                              \
    if (lorafuse_status_ != CUBLAS_STATUS_SUCCESS)                                               \
      ::lorafuse::cuda::fail_cublas((what), #call, lorafuse_status_, __FILE__, __LINE__);       \
  } while (0)
#define LORAFUSE_CUSOLVER_CHECK(call, what)                                                      \
  do {                                                                                           \
    const cusolverStatus_t lorafuse_status_ = (call);                                            \
    if (lorafuse_status_ != CUSOLVER_STATUS_SUCCESS)                                             \
      ::lorafuse::cuda::fail_cusolver((what), #call, lorafuse_status_, __FILE__, __LINE__);     \
  } while (0)

namespace lorafuse::cuda {

// Raw device memory; out-of-memory raises Error(Device) naming `what`, the bytes asked for and the
// bytes free. Move-only.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(std::size_t bytes, const std::string& what);
  ~DeviceMemory();
  DeviceMemory(DeviceMemory&& o) noexcept : p_(std::exchange(o.p_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceMemory& operator=(DeviceMemory&& o) noexcept;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  void* get() const noexcept { return p_; }
  std::size_t bytes() const noexcept { return bytes_; }
  // Grows (never shrinks) to at least `bytes`; the contents are not kept.
  void reserve(std::size_t bytes, const std::string& what);

 private:
  void* p_ = nullptr;
  std::size_t bytes_ = 0;
};

// Typed device buffer of n elements of T (uninitialized).
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::size_t n, const std::string& what) : mem_(n * sizeof(T), what), n_(n) {}
  T* data() const noexcept { return static_cast<T*>(mem_.get()); }
  std::size_t size() const noexcept { return n_; }
  void reserve(std::size_t n, const std::string& what) {
    mem_.reserve(n * sizeof(T), what);
    n_ = mem_.bytes() / sizeof(T);
  }

 private:
  DeviceMemory mem_;
  std::size_t n_ = 0;
};

// Page-locked host memory (cudaMallocHost), for copies that overlap compute. Move-only.
class PinnedMemory {
 public:
  PinnedMemory() = default;
  PinnedMemory(std::size_t bytes, const std::string& what);
  ~PinnedMemory();
  PinnedMemory(PinnedMemory&& o) noexcept : p_(std::exchange(o.p_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  PinnedMemory& operator=(PinnedMemory&& o) noexcept;
  PinnedMemory(const PinnedMemory&) = delete;
  PinnedMemory& operator=(const PinnedMemory&) = delete;
  void* get() const noexcept { return p_; }
  std::size_t bytes() const noexcept { return bytes_; }
  void reserve(std::size_t bytes, const std::string& what);

 private:
  void* p_ = nullptr;
  std::size_t bytes_ = 0;
};

// A non-blocking stream. Move-only.
class Stream {
 public:
  Stream();
  ~Stream();
  Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  Stream& operator=(Stream&&) = delete;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const noexcept { return s_; }
  void synchronize(const std::string& what) const;

 private:
  cudaStream_t s_ = nullptr;
};

// An event without timing. Move-only.
class Event {
 public:
  Event();
  ~Event();
  Event(Event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  Event& operator=(Event&&) = delete;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const noexcept { return e_; }
  void record(cudaStream_t s, const std::string& what);
  void synchronize(const std::string& what) const;

 private:
  cudaEvent_t e_ = nullptr;
};

// One device's handles: cuBLAS (pedantic float32 math: no TF32, so products keep float32
// accuracy like the CPU core) and cuSOLVER, both bound to `stream()`. Operations lock `mutex()`
// for their whole run: one operation at a time per device. Created on first use of the device.
class Context {
 public:
  static Context& get(int device = 0);  // Error(Device) when the device cannot be used
  int device() const noexcept { return device_; }
  cublasHandle_t blas() const noexcept { return blas_; }
  cusolverDnHandle_t solver() const noexcept { return solver_; }
  cudaStream_t stream() const noexcept { return stream_.get(); }
  std::mutex& mutex() noexcept { return mutex_; }
  // Makes this context's device current on the calling thread.
  void activate() const;
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

 private:
  struct Key {
    explicit Key() = default;
  };

 public:
  Context(Key, int device);  // only get() can make a Key

 private:
  int device_;
  Stream stream_;
  cublasHandle_t blas_ = nullptr;
  cusolverDnHandle_t solver_ = nullptr;
  std::mutex mutex_;
};

}  // namespace lorafuse::cuda
