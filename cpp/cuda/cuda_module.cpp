// lorafuse._cuda: the CPU core's operations on one NVIDIA GPU (cpp/cuda/ops.hpp), with the same
// Python signatures as lorafuse._core. The conversion of Python objects into jobs is the very same
// code as _core's (cpp/bindings/convert.hpp), and so are the jobs' checks (the CPU core's make_*
// entry points, linked from its generic static library): a call that _core refuses is refused here
// with the same error and message. Only the kernels differ (CudaKernels below). task_merge is not
// here: the Python backend runs it on the CPU core.
//
// Mapped inputs: lorafuse._core installs the process's SIGBUS guard and keeps the fault table; this
// module installs nothing. A mapped input truncated during a GPU call reads as zeros (the guard maps
// zero pages over it) and the Python backend refuses the result with _core.check_intact.
#include <cuda_runtime.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <string>
#include <vector>

#include "../bindings/convert.hpp"
#include "lorafuse/dtype.hpp"
#include "lorafuse/errors.hpp"
#include "lorafuse/limits.hpp"
#include "lorafuse/tensor.hpp"
#include "ops.hpp"

namespace py = pybind11;
using lorafuse::DType;
using lorafuse::TensorView;
using namespace lorafuse::bind;  // NOLINT: the conversion helpers of convert.hpp

#ifndef LORAFUSE_VERSION
#define LORAFUSE_VERSION "0+unknown"
#endif

namespace {

// The same view without elements: the CPU core's whole-array checks (dtype, item size, layout) run
// on it exactly as on the array, and then have nothing to convert.
TensorView without_elements(const TensorView& v) {
  TensorView e = v;
  e.shape.assign(1, 0);
  e.data = nullptr;
  return e;
}

// The kernels of this module (convert.hpp's kernel set): lorafuse::cuda, on device 0.
struct CudaKernels {
  // The fault table of mapped inputs lives in lorafuse._core: the Python backend asks it after each call.
  static void guard(const std::vector<py::object>&) {}

  static void to_f32(const TensorView& raw, DType dt, float* dst, int threads, const std::string& what) {
    lorafuse::convert_to_f32(without_elements(raw), dt, nullptr, threads, what);  // the CPU core's checks
    if (raw.numel() > 0) lorafuse::cuda::to_float32(raw.data, dt, dst, raw.numel());
  }
  static void from_f32(const TensorView& x, DType dt, void* dst, int threads, const std::string& what) {
    lorafuse::convert_from_f32(without_elements(x), dt, nullptr, threads, what);  // the CPU core's checks
    if (x.numel() > 0) lorafuse::cuda::from_float32(x.f32_data(), dt, dst, x.numel());
  }
  static void merge(std::vector<lorafuse::MergeJob>& jobs, int threads) { lorafuse::cuda::merge_batch(jobs, threads); }
  static void frobenius_sq(const std::vector<lorafuse::FactorPairView>& items, double* out, int threads) {
    lorafuse::cuda::factored_frobenius_sq_batch(items, out, threads);
  }
  static void inner(const std::vector<lorafuse::FactorInnerView>& items, double* out, int threads) {
    lorafuse::cuda::factored_inner_batch(items, out, threads);
  }
  static void factored_svd(std::vector<lorafuse::SvdJob>& jobs, lorafuse::SvdSplit split,
                           const lorafuse::RandomizedSvdOptions& opt, int threads) {
    lorafuse::cuda::factored_svd_batch(jobs, split, opt, threads);
  }
  static void dense_svd(std::vector<lorafuse::SvdJob>& jobs, lorafuse::SvdSplit split,
                        const lorafuse::RandomizedSvdOptions& opt, int threads) {
    lorafuse::cuda::dense_svd_batch(jobs, split, opt, threads);
  }
  static void extract(std::vector<lorafuse::ExtractJob>& jobs, const lorafuse::ExtractOptions& opt, int threads) {
    lorafuse::cuda::extract_svd_batch(jobs, opt, threads);
  }
};

// "13.0": the CUDA runtime this module carries (linked statically, so the one it was built with).
std::string runtime_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "lorafuse CUDA backend: the compiled core's operations on one NVIDIA GPU";
  m.attr("__version__") = LORAFUSE_VERSION;
  m.attr("cuda_runtime_version") = runtime_version();
  // The same functions, signatures and checks as lorafuse._core (convert.hpp); factored_svd_is_exact and
  // dense_svd_is_exact are the CPU core's own (linked): the GPU takes the same paths.
  def_shared<CudaKernels>(m);
  m.def(
      "device_count", []() { return lorafuse::cuda::device_count(); },
      "How many CUDA devices the driver reports; 0 (never an error) without a driver or a device.");
  m.def(
      "unavailable_reason",
      []() {
        py::gil_scoped_release release;
        return lorafuse::cuda::unavailable_reason();
      },
      "'' when device 0 can be used, else why not (no driver, no device, a driver too old for this build).");
  m.def(
      "device_description",
      [](const py::handle& device) {
        const int d = static_cast<int>(require_int_in(device, "device_description: device", 0, INT_MAX));
        py::gil_scoped_release release;
        return lorafuse::cuda::device_description(d);
      },
      py::arg("device") = 0, "The device's name, compute capability and memory, e.g. 'NVIDIA H200 (sm_90, 139 GiB)'.");
}
