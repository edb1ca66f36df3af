// lorafuse._core: thin pybind11 bindings of the CPU core. The conversion of Python objects into
// the core's jobs (numpy arrays into views, numbers and names into C++ values) is convert.hpp,
// shared with lorafuse._cuda; the library's entry points (make_*_job, the batch functions) check
// every view, shape, rank and dtype with LORAFUSE_CHECK before a pointer reaches a kernel. The GIL
// is released around all numeric work; lorafuse::Error becomes lorafuse.errors.*.
//
// This module also owns the process's guard of memory-mapped inputs (mapguard.hpp): it installs
// the SIGBUS handler, keeps the fault table and refuses results computed from a mapping that
// faulted (check_intact, also exported for the CUDA backend, whose module keeps no table).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "convert.hpp"
#include "lorafuse/dtype.hpp"
#include "lorafuse/errors.hpp"
#include "lorafuse/extract.hpp"
#include "lorafuse/limits.hpp"
#include "lorafuse/lowrank.hpp"
#include "lorafuse/mapguard.hpp"
#include "lorafuse/merge.hpp"
#include "lorafuse/sketch.hpp"
#include "lorafuse/parallel.hpp"
#include "lorafuse/svd.hpp"
#include "lorafuse/taskmerge.hpp"
#include "lorafuse/tensor.hpp"

namespace py = pybind11;
using lorafuse::DType;
using lorafuse::Error;
using lorafuse::ErrorKind;
using namespace lorafuse::bind;  // NOLINT: the conversion helpers of convert.hpp

namespace {

// The kernels of this module: the CPU core's batch functions (convert.hpp's kernel set).
struct CpuKernels {
  static void guard(const std::vector<py::object>& inputs) { check_intact(inputs); }
  static void to_f32(const lorafuse::TensorView& raw, DType dt, float* dst, int threads, const std::string& what) {
    lorafuse::convert_to_f32(raw, dt, dst, threads, what);
  }
  static void from_f32(const lorafuse::TensorView& x, DType dt, void* dst, int threads, const std::string& what) {
    lorafuse::convert_from_f32(x, dt, dst, threads, what);
  }
  static void merge(std::vector<lorafuse::MergeJob>& jobs, int threads) { lorafuse::merge_batch(jobs, threads); }
  static void frobenius_sq(const std::vector<lorafuse::FactorPairView>& items, double* out, int threads) {
    lorafuse::factored_frobenius_sq_batch(items, out, threads);
  }
  static void inner(const std::vector<lorafuse::FactorInnerView>& items, double* out, int threads) {
    lorafuse::factored_inner_batch(items, out, threads);
  }
  static void factored_svd(std::vector<lorafuse::SvdJob>& jobs, lorafuse::SvdSplit split,
                           const lorafuse::RandomizedSvdOptions& opt, int threads) {
    lorafuse::factored_svd_batch(jobs, split, opt, threads);
  }
  static void dense_svd(std::vector<lorafuse::SvdJob>& jobs, lorafuse::SvdSplit split,
                        const lorafuse::RandomizedSvdOptions& opt, int threads) {
    lorafuse::dense_svd_batch(jobs, split, opt, threads);
  }
  static void extract(std::vector<lorafuse::ExtractJob>& jobs, const lorafuse::ExtractOptions& opt, int threads) {
    lorafuse::extract_svd_batch(jobs, opt, threads);
  }
};

// ---- PEFT-style task merging (CPU only: the CUDA backend calls this module for it) ----

// items: list of (name, [t_1 .. t_n]) with float32 arrays of one shape;
// weights: list (per item) of n floats. Returns the merged float32 tensor per item.
py::list task_merge(const py::handle& items_in, const py::handle& weights_in, const std::string& prune,
                    const py::handle& density, bool rescale, const std::string& merge, const std::string& majority,
                    const py::handle& seed, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  lorafuse::TaskMergeOptions opt;
  opt.prune = lorafuse::prune_method_from_name(prune);
  opt.merge = lorafuse::merge_method_from_name(merge);
  opt.majority = lorafuse::majority_sign_from_name(majority);
  opt.density = require_float(density, "task_merge: density");
  opt.rescale = rescale;
  opt.seed = require_seed(seed, "task_merge");
  lorafuse::check_task_merge_options(opt);
  auto items = require_sequence(items_in, "task_merge: items");
  auto weights = require_sequence(weights_in, "task_merge: weights");
  if (weights.size() != items.size())
    fail(ErrorKind::Value, "task_merge: " + std::to_string(weights.size()) + " weight lists for " +
                               std::to_string(items.size()) + " items");
  std::vector<lorafuse::TaskMergeItem> jobs;
  std::vector<py::object> keep_alive;
  py::list results;
  for (std::size_t i = 0; i < items.size(); ++i) {
    auto t = require_sequence(items[i], "task_merge: item " + std::to_string(i));
    if (t.size() != 2) fail(ErrorKind::Value, "task_merge: item " + std::to_string(i) + " must be (name, tensors)");
    const std::string name = require_name(t[0], "task_merge: item " + std::to_string(i));
    auto tensors_in = require_sequence(t[1], name + ": tensors");
    auto w = require_sequence(weights[i], name + ": weights");
    std::vector<lorafuse::TensorView> tensors;
    std::vector<double> wts;
    for (std::size_t j = 0; j < tensors_in.size(); ++j)
      tensors.push_back(f32_view(tensors_in[j], name + ": task tensor " + std::to_string(j), keep_alive));
    for (std::size_t j = 0; j < w.size(); ++j) wts.push_back(require_float(w[j], name + ": weight " + std::to_string(j)));
    jobs.push_back(lorafuse::make_task_merge_item(name, tensors, wts));
    py::array_t<float> out(std::vector<py::ssize_t>(tensors[0].shape.begin(), tensors[0].shape.end()));
    jobs.back().out = out.mutable_data();
    results.append(out);
  }
  run_guarded<CpuKernels>(keep_alive, [&] {
    lorafuse::task_merge_batch(jobs, opt, threads);
  });
  return results;
}

// jobs: list of (raw, dtype, out, transpose): raw a 2-D buffer of safetensors dtype `dtype` (BF16 as
// uint16, F8 as uint8), out a float32 array of its shape (transposed with `transpose`) that receives it.
void convert_into(const py::handle& jobs_in, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  auto items = require_sequence(jobs_in, "convert_into: jobs");
  std::vector<lorafuse::WidenJob> jobs;
  std::vector<py::object> keep_alive;
  for (std::size_t i = 0; i < items.size(); ++i) {
    const std::string what = "convert_into: job " + std::to_string(i);
    auto t = require_sequence(items[i], what);
    if (t.size() != 4) fail(ErrorKind::Value, what + " must be (raw, dtype, out, transpose)");
    lorafuse::WidenJob job;
    job.what = what;
    job.raw = array_view(t[0], what, keep_alive);
    job.type = lorafuse::dtype_from_name(require_str(t[1], what + ": dtype"));
    job.out = f32_view(t[2], what + ": the output", keep_alive);
    if (!py::isinstance<py::bool_>(t[3])) fail(ErrorKind::Value, what + ": transpose must be a bool");
    job.transpose = py::cast<bool>(t[3]);
    jobs.push_back(std::move(job));
  }
  run_guarded<CpuKernels>(keep_alive, [&] { lorafuse::widen_batch(jobs, threads); });
}

// jobs: list of (terms, side, x, acc): terms a list of (a, a_dtype, b, b_dtype, coef) (raw factors of
// safetensors dtypes: A r x in, B out x r), side "range" or "corange", x the float32 operand, acc the
// float64 accumulator (see sketch.hpp).
void sketch_fold(const py::handle& jobs_in, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  auto items = require_sequence(jobs_in, "sketch_fold: jobs");
  std::vector<lorafuse::SketchJob> jobs;
  std::vector<py::object> keep_alive;
  for (std::size_t i = 0; i < items.size(); ++i) {
    const std::string what = "sketch_fold: job " + std::to_string(i);
    auto t = require_sequence(items[i], what);
    if (t.size() != 4) fail(ErrorKind::Value, what + " must be (terms, side, x, acc)");
    lorafuse::SketchJob job;
    job.what = what;
    auto terms = require_sequence(t[0], what + ": terms");
    for (std::size_t k = 0; k < terms.size(); ++k) {
      const std::string tw = what + ": term " + std::to_string(k);
      auto tt = require_sequence(terms[k], tw);
      if (tt.size() != 5) fail(ErrorKind::Value, tw + " must be (a, a_dtype, b, b_dtype, coef)");
      lorafuse::SketchTerm term;
      term.what = "term " + std::to_string(k);
      term.a = array_view(tt[0], tw + ": A", keep_alive);
      term.a_type = lorafuse::dtype_from_name(require_str(tt[1], tw + ": A's dtype"));
      term.b = array_view(tt[2], tw + ": B", keep_alive);
      term.b_type = lorafuse::dtype_from_name(require_str(tt[3], tw + ": B's dtype"));
      term.coef = require_float(tt[4], tw + ": coef");
      job.terms.push_back(std::move(term));
    }
    const std::string side = require_str(t[1], what + ": side");
    if (side != "range" && side != "corange") fail(ErrorKind::Value, what + ": side must be 'range' or 'corange', got '" + side + "'");
    job.corange = side == "corange";
    job.x = f32_view(t[2], what + ": the operand", keep_alive);
    job.acc = array_view(t[3], what + ": the accumulator", keep_alive);
    jobs.push_back(std::move(job));
  }
  run_guarded<CpuKernels>(keep_alive, [&] { lorafuse::sketch_fold_batch(jobs, threads); });
}

// A memory-mapped file to guard (see mapguard.hpp): `buffer` is the mmap object; `label`
// names the file in messages (UTF-8 bytes), `path` is its absolute path (file system bytes),
// and (dev, ino, file_size, mtime_ns) its os.stat when it was validated.
int register_mapping(const py::buffer& buffer, const py::bytes& label, const py::bytes& path, const py::handle& dev,
                     const py::handle& ino, const py::handle& file_size, const py::handle& mtime_ns) {
  constexpr auto i64_max = std::numeric_limits<std::int64_t>::max();
  const auto d = static_cast<std::uint64_t>(require_int_in(dev, "register_mapping: dev", 0, i64_max));
  const auto i = static_cast<std::uint64_t>(require_int_in(ino, "register_mapping: ino", 0, i64_max));
  const auto size = require_int_in(file_size, "register_mapping: file_size", 0, i64_max);
  const auto mtime = require_int_in(mtime_ns, "register_mapping: mtime_ns", std::numeric_limits<std::int64_t>::min(),
                                    i64_max);
  const py::buffer_info info = buffer.request();
  const auto nbytes = static_cast<std::size_t>(info.size) * static_cast<std::size_t>(info.itemsize);
  return lorafuse::mapguard::register_range(info.ptr, nbytes, std::string(label), std::string(path), d, i, size,
                                            mtime);
}

}  // namespace

#ifndef LORAFUSE_MODULE_NAME
#define LORAFUSE_MODULE_NAME _core_generic
#define LORAFUSE_ISA_NAME "generic"
#endif
#ifndef LORAFUSE_VERSION
#define LORAFUSE_VERSION "0+unknown"
#endif

namespace {

// What the running CPU (and OS: AVX state saved) supports; lorafuse/_core.py checks its own choice of
// variant against it (tests/test_isa.py).
py::dict cpu_features() {
  py::dict d;
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  d["avx2"] = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  d["f16c"] = static_cast<bool>(__builtin_cpu_supports("f16c"));
  d["avx512"] = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                __builtin_cpu_supports("avx512vl");
#else
  d["avx2"] = false;
  d["f16c"] = false;
  d["avx512"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(LORAFUSE_MODULE_NAME, m) {
  m.doc() = "lorafuse compiled core: dtype conversion, fused merge, factored norms";
  m.attr("isa") = LORAFUSE_ISA_NAME;
  m.attr("__version__") = LORAFUSE_VERSION;
  m.def("cpu_features", &cpu_features, "Instruction sets this CPU and OS support: {'avx2', 'f16c', 'avx512'}.");
  lorafuse::mapguard::install();
  // to_float32, from_float32, merge_batch, factored_frobenius_sq, factored_inner, factored_svd,
  // factored_svd_lists, factored_svd_is_exact, dense_svd, dense_svd_is_exact, extract_svd, MAX_*,
  // and the translation of lorafuse::Error: the same in lorafuse._cuda.
  def_shared<CpuKernels>(m);
  m.def("hardware_threads", []() { return lorafuse::resolve_threads(0); });
  m.def("resolve_threads", [](const py::object& threads) { return lorafuse::resolve_threads(require_threads(threads)); },
        py::arg("threads"), "The number of worker threads a `threads` argument runs (0: all hardware threads; at most "
        "4 per hardware thread).");
  m.def("thread_start_failures", &lorafuse::thread_start_failures,
        "How many worker threads could not be started (and were done without) in this process so far.");
  m.def("register_mapping", &register_mapping, py::arg("buffer"), py::arg("label"), py::arg("path"), py::arg("dev"),
        py::arg("ino"), py::arg("file_size"), py::arg("mtime_ns"),
        "Guard reads of a memory-mapped file against SIGBUS (truncated or rewritten while read): returns a slot for "
        "unregister_mapping / mapping_problem, or -1 when the table is full.");
  m.def("unregister_mapping", &lorafuse::mapguard::unregister, py::arg("slot"));
  m.def("mapping_problem", &lorafuse::mapguard::problem, py::arg("slot"),
        "'' while the mapping has not faulted and its file keeps its size and modification time; else why its data "
        "cannot be trusted, naming the file.");
  m.def("mapping_faults", &lorafuse::mapguard::fault_count, "Faults caught in guarded mappings so far.");
  m.def(
      "check_intact",
      [](const py::handle& arrays) {
        const py::sequence seq = require_sequence(arrays, "check_intact: arrays");
        if (lorafuse::mapguard::fault_count() == 0) return;
        for (std::size_t i = 0; i < seq.size(); ++i) check_intact(py::object(seq[i]));
      },
      py::arg("arrays"),
      "Raise InputChangedError (naming the file) if one of these numpy arrays overlaps a guarded mapping that "
      "faulted (its file was truncated or rewritten while read: the faulted pages read as zeros); other items are "
      "ignored. For results computed elsewhere (the CUDA backend) from arrays that may be such views.");
  m.def("convert_into", &convert_into, py::arg("jobs"), py::arg("threads") = 0,
        "For each (raw, dtype, out, transpose): the 2-D raw buffer of safetensors dtype `dtype` widened to float32 "
        "into `out` (its shape, or transposed); every job is checked before any is converted.");
  m.def("sketch_fold", &sketch_fold, py::arg("jobs"), py::arg("threads") = 0,
        "For each (terms, side, x, acc), terms (a, a_dtype, b, b_dtype, coef) of raw factors (A r x in, B out x r): "
        "acc += sum c B (A x) ('range') or sum c A^T (B^T x) ('corange'), float32 products summed in float32, "
        "added to the float64 acc; every job is checked before any is run.");
  m.def("task_merge", &task_merge, py::arg("items"), py::arg("weights"), py::arg("prune") = "none",
        py::arg("density") = 1.0, py::arg("rescale") = false, py::arg("merge") = "sum", py::arg("majority") = "total",
        py::arg("seed") = 0, py::arg("threads") = 0,
        "PEFT merge_utils semantics (prune: none/magnitude/random; merge: sum/ties; majority: total/frequency) "
        "for (name, [tensors]) items with per-item weight lists; returns the merged float32 tensor per item.");
}
