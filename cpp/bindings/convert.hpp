// The Python side of the compiled modules: conversion of Python objects into the core's jobs, shared
// by lorafuse._core (cpp/bindings/core_module.cpp) and lorafuse._cuda (cpp/cuda/cuda_module.cpp), so
// both take the same arguments and refuse bad ones with the very same checks and messages.
//
// The bindings only convert: numpy arrays into views (lorafuse/tensor.hpp), numbers and names into C++
// values. The library's entry points (make_*_job, make_*_stage, the batch functions) check every view,
// shape, rank and dtype with LORAFUSE_CHECK before a pointer reaches a kernel. Each entry point here is
// a template over a kernel set `K` (CpuKernels in core_module.cpp, CudaKernels in cuda_module.cpp):
//
//   struct K {
//     static void guard(const std::vector<py::object>& inputs);  // after a kernel, with the GIL
//     static void to_f32(const TensorView& raw, DType, float* dst, int threads, const std::string& what);
//     static void from_f32(const TensorView& x, DType, void* dst, int threads, const std::string& what);
//     static void merge(std::vector<MergeJob>&, int threads);
//     static void frobenius_sq(const std::vector<FactorPairView>&, double* out, int threads);
//     static void inner(const std::vector<FactorInnerView>&, double* out, int threads);
//     static void factored_svd(std::vector<SvdJob>&, SvdSplit, const RandomizedSvdOptions&, int threads);
//     static void dense_svd(std::vector<SvdJob>&, SvdSplit, const RandomizedSvdOptions&, int threads);
//     static void extract(std::vector<ExtractJob>&, const ExtractOptions&, int threads);
//   };
//
// The GIL is released around every kernel; lorafuse::Error becomes lorafuse.errors.* (error_class).
// Everything is inline in lorafuse::bind; each module is one translation unit with hidden symbols.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <exception>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "lorafuse/dtype.hpp"
#include "lorafuse/errors.hpp"
#include "lorafuse/extract.hpp"
#include "lorafuse/limits.hpp"
#include "lorafuse/lowrank.hpp"
#include "lorafuse/mapguard.hpp"
#include "lorafuse/merge.hpp"
#include "lorafuse/svd.hpp"
#include "lorafuse/tensor.hpp"

namespace lorafuse::bind {

namespace py = pybind11;

[[noreturn]] inline void fail(ErrorKind kind, const std::string& msg) { throw Error(kind, msg); }

// repr(h), cut to a readable length (an array passed by mistake must not flood the message).
inline std::string show(const py::handle& h) {
  const std::string r = py::repr(h);
  return r.size() <= 60 ? r : r.substr(0, 57) + "...";
}

// A Python integer (int, numpy integer; not bool) in [lo, hi], else a LorafuseValueError
// naming `what`, the value and the range. Nothing is allocated or started from a number
// that has not passed through here.
inline std::int64_t require_int_in(const py::handle& h, const std::string& what, std::int64_t lo, std::int64_t hi,
                                   const std::string& lo_note = "") {
  const std::string range = "an integer from " + std::to_string(lo) + lo_note + " to " + std::to_string(hi);
  if (py::isinstance<py::bool_>(h)) fail(ErrorKind::Value, what + " must be " + range + ", got a bool");
  PyObject* idx = PyNumber_Index(h.ptr());
  if (idx == nullptr) {
    PyErr_Clear();
    fail(ErrorKind::Value, what + " must be " + range + ", got " + show(h));
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
  Py_DECREF(idx);
  if (overflow < 0 || (overflow == 0 && v < lo))
    fail(ErrorKind::Value, what + " must be >= " + std::to_string(lo) + ", got " + show(h) + " (allowed: " + range + ")");
  if (overflow > 0 || v > hi)
    fail(ErrorKind::Value, what + " must be <= " + std::to_string(hi) + ", got " + show(h) + " (allowed: " + range + ")");
  return v;
}

// A threads argument: 0 (all hardware threads) .. kMaxThreads.
inline int require_threads(const py::handle& h) {
  return static_cast<int>(require_int_in(h, "threads", 0, lorafuse::kMaxThreads, " (all cores)"));
}

// Inputs that lie in a memory-mapped file which faulted while it was read (truncated,
// rewritten, unreadable: see mapguard.hpp) hold zeros instead of data: raise
// InputChangedError naming the file instead of returning anything computed from them.
// Only the module that keeps the fault table (lorafuse._core, which installs the guard) can
// answer: lorafuse._cuda leaves this to the Python backend, which asks _core.check_intact.
inline void check_intact(const py::handle& a) {
  if (lorafuse::mapguard::fault_count() == 0 || !py::isinstance<py::array>(a)) return;
  auto arr = py::reinterpret_borrow<py::array>(a);
  const int slot = lorafuse::mapguard::faulted_overlap(arr.data(), static_cast<std::size_t>(arr.nbytes()));
  if (slot < 0) return;
  std::string msg = lorafuse::mapguard::problem(slot);
  if (msg.empty()) msg = "an input file changed or was truncated while lorafuse was reading it; nothing was written";
  fail(ErrorKind::InputChanged, msg);
}

inline void check_intact(const std::vector<py::object>& arrays) {
  if (lorafuse::mapguard::fault_count() == 0) return;
  for (const py::object& a : arrays) check_intact(a);
}

// Runs a kernel without the GIL, then lets K::guard refuse its results (_core: when one of its
// `inputs` lies in a mapped file that faulted meanwhile, before or during the call). A changed
// input also explains any error the kernel raised, so it is reported instead.
template <class K, class Fn>
void run_guarded(const std::vector<py::object>& inputs, Fn fn) {
  try {
    py::gil_scoped_release release;
    fn();
  } catch (...) {
    K::guard(inputs);
    throw;
  }
  K::guard(inputs);
}

// ---- conversion of Python objects into the core's views (the core checks them) ----

inline std::string type_name(const py::handle& h) { return py::str(py::type::of(h).attr("__name__")); }

// numpy's name of a dtype ("float32", "uint16", ...), for messages. The common kinds are named here from
// the descriptor's kind and size: numpy computes `dtype.name` in Python (~3 us a call, several per job).
inline std::string dtype_name_of(const py::dtype& d) {
  const std::string bits = std::to_string(d.itemsize() * 8);
  switch (d.kind()) {
    case 'f': return "float" + bits;
    case 'u': return "uint" + bits;
    case 'i': return "int" + bits;
    case 'c': return "complex" + bits;
    case 'b': return "bool";
    default: return py::str(d.attr("name"));
  }
}

// The view of a numpy array: where its elements are, their type, its shape and layout.
inline lorafuse::TensorView view_of(const py::array& a) {
  lorafuse::TensorView v;
  v.data = a.data();
  v.shape.assign(a.shape(), a.shape() + a.ndim());
  v.dtype = dtype_name_of(a.dtype());
  v.f32 = py::isinstance<py::array_t<float>>(a);
  v.itemsize = a.itemsize();
  v.contiguous = (a.flags() & py::array::c_style) != 0;
  v.writeable = a.writeable();
  return v;
}

// A numpy array meant to hold float32 (anything else is refused here: it has no view), kept alive.
inline lorafuse::TensorView f32_view(const py::handle& h, const std::string& what,
                                     std::vector<py::object>& keep_alive) {
  if (!py::isinstance<py::array>(h)) fail(ErrorKind::Dtype, what + " must be a float32 numpy array, got " + type_name(h));
  auto a = py::reinterpret_borrow<py::array>(h);
  keep_alive.push_back(a);
  return view_of(a);
}

// A numpy array of raw elements (the caller names their safetensors dtype), kept alive.
inline lorafuse::TensorView array_view(const py::handle& h, const std::string& what,
                                       std::vector<py::object>& keep_alive) {
  if (!py::isinstance<py::array>(h)) fail(ErrorKind::Value, what + " must be a numpy array, got " + type_name(h));
  auto a = py::reinterpret_borrow<py::array>(h);
  keep_alive.push_back(a);
  return view_of(a);
}

inline py::dtype raw_numpy_dtype(DType dt) {
  switch (dt) {
    case DType::F32: return py::dtype::of<float>();
    case DType::F16: return py::dtype("float16");
    case DType::BF16: return py::dtype::of<std::uint16_t>();
    case DType::F64: return py::dtype::of<double>();
    default: return py::dtype::of<std::uint8_t>();
  }
}

// A tuple or list (not a string), else a LorafuseValueError naming `what`.
inline py::sequence require_sequence(const py::handle& h, const std::string& what) {
  if (!(py::isinstance<py::tuple>(h) || py::isinstance<py::list>(h)))
    fail(ErrorKind::Value, what + " must be a tuple or list, got " + std::string(py::str(py::type::of(h).attr("__name__"))));
  return py::reinterpret_borrow<py::sequence>(h);
}

inline std::string require_name(const py::handle& h, const std::string& what) {
  if (!py::isinstance<py::str>(h)) fail(ErrorKind::Value, what + ": the module name must be a str");
  return py::cast<std::string>(h);
}

inline std::string require_str(const py::handle& h, const std::string& what) {
  if (!py::isinstance<py::str>(h)) fail(ErrorKind::Value, what + " must be a str");
  return py::cast<std::string>(h);
}

// Any Python integer (int, numpy integer), not bool; else a LorafuseValueError.
inline std::int64_t require_int(const py::handle& h, const std::string& what) {
  if (py::isinstance<py::bool_>(h)) fail(ErrorKind::Value, what + " must be an integer, got a bool");
  PyObject* idx = PyNumber_Index(h.ptr());
  if (idx == nullptr) {
    PyErr_Clear();
    fail(ErrorKind::Value, what + " must be an integer");
  }
  const long long v = PyLong_AsLongLong(idx);
  Py_DECREF(idx);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    fail(ErrorKind::Value, what + " is out of range");
  }
  return v;
}

inline double require_float(const py::handle& h, const std::string& what) {
  if (py::isinstance<py::bool_>(h)) fail(ErrorKind::Value, what + " must be a number, got a bool");
  const double v = PyFloat_AsDouble(h.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    fail(ErrorKind::Value, what + " must be a number");
  }
  return v;
}

// A seed in [0, 2^64).
inline std::uint64_t require_seed(const py::handle& h, const std::string& fn) {
  if (py::isinstance<py::bool_>(h)) fail(ErrorKind::Value, fn + ": seed must be a non-negative integer, got a bool");
  PyObject* idx = PyNumber_Index(h.ptr());
  if (idx == nullptr) {
    PyErr_Clear();
    fail(ErrorKind::Value, fn + ": seed must be a non-negative integer");
  }
  const unsigned long long v = PyLong_AsUnsignedLongLong(idx);
  Py_DECREF(idx);
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    fail(ErrorKind::Value, fn + ": seed must be an integer in [0, 2**64)");
  }
  return v;
}

// ranks: a tuple or list with one entry per item.
inline py::sequence require_ranks(const py::handle& ranks_in, std::size_t n_items, const std::string& fn) {
  auto ranks = require_sequence(ranks_in, fn + ": ranks");
  if (ranks.size() != n_items)
    fail(ErrorKind::Value, fn + ": " + std::to_string(ranks.size()) + " ranks for " + std::to_string(n_items) + " items");
  return ranks;
}

// The rank k in [1, kMaxRank] asked for the module `name`.
inline std::int64_t require_rank(const py::handle& h, const std::string& name) {
  return require_int_in(h, name + ": rank", 1, lorafuse::kMaxRank);
}

inline lorafuse::RandomizedSvdOptions require_randomized_options(const py::handle& seed, const py::handle& oversample,
                                                                const py::handle& power_iters, const std::string& fn) {
  lorafuse::RandomizedSvdOptions opt;
  opt.seed = require_seed(seed, fn);
  opt.oversample = require_int_in(oversample, fn + ": oversample", 0, lorafuse::kMaxOversample);
  opt.power_iters = require_int_in(power_iters, fn + ": power_iters", 0, lorafuse::kMaxPowerIters);
  return opt;
}

// A Python rank as an integer (the core checks its range; one beyond 64 bits has no C++ value,
// so its message is made here, in the core's words).
inline std::int64_t rank_arg(const py::handle& h, const std::string& name) {
  if (py::isinstance<py::bool_>(h) || !PyIndex_Check(h.ptr())) return require_int(h, name + ": rank");
  PyObject* idx = PyNumber_Index(h.ptr());
  if (idx == nullptr) {
    PyErr_Clear();
    return require_int(h, name + ": rank");
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
  Py_DECREF(idx);
  if (overflow != 0) return require_rank(h, name);  // out of range: raises
  return v;
}

// Allocates B2 (out x k), A2 (k x in) and S (s_len) for a job and points the job at them.
inline py::tuple allocate_svd_outputs(lorafuse::SvdJob& job) {
  py::array_t<float> B2({static_cast<py::ssize_t>(job.out), static_cast<py::ssize_t>(job.k)});
  py::array_t<float> A2({static_cast<py::ssize_t>(job.k), static_cast<py::ssize_t>(job.in)});
  py::array_t<double> S(static_cast<py::ssize_t>(job.s_len));
  job.B2 = B2.mutable_data();
  job.A2 = A2.mutable_data();
  job.S = S.mutable_data();
  return py::make_tuple(B2, A2, S);
}

// Runs a batch of SVD jobs (built and checked by the core) on outputs allocated here.
template <class K, class Batch>
py::list run_svd_jobs(std::vector<lorafuse::SvdJob>& jobs, const std::vector<py::object>& keep_alive, Batch batch) {
  py::list results;
  for (lorafuse::SvdJob& job : jobs) results.append(allocate_svd_outputs(job));
  run_guarded<K>(keep_alive, [&] { batch(); });
  return results;
}

// ---- dtype conversion ----

template <class K>
py::array to_float32(const py::handle& raw_in, const std::string& dtype, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  const DType dt = lorafuse::dtype_from_name(dtype);
  std::vector<py::object> keep_alive;
  const lorafuse::TensorView raw = array_view(raw_in, "to_float32 input", keep_alive);
  py::array_t<float> out(std::vector<py::ssize_t>(raw.shape.begin(), raw.shape.end()));
  float* dst = out.mutable_data();
  run_guarded<K>(keep_alive, [&] { K::to_f32(raw, dt, dst, threads, "to_float32 input"); });
  return out;
}

template <class K>
py::array from_float32(const py::handle& x_in, const std::string& dtype, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  const DType dt = lorafuse::dtype_from_name(dtype);
  std::vector<py::object> keep_alive;
  const lorafuse::TensorView x = f32_view(x_in, "from_float32 input", keep_alive);
  py::array out(raw_numpy_dtype(dt), std::vector<py::ssize_t>(x.shape.begin(), x.shape.end()));
  void* dst = out.mutable_data();
  run_guarded<K>(keep_alive, [&] { K::from_f32(x, dt, dst, threads, "from_float32 input"); });
  return out;
}

// ---- merge_batch: stage parsing (the core checks every array: make_*_stage) ----

// One stage: (B, A, magnitude|None, column_norm) or (kind, factors, magnitude|None, column_norm)
// with kind "lowrank" (B, A), "hadamard" (B1, A1, B2, A2) or "kron" (W1, W2[, row_offset]).
inline lorafuse::MergeStage parse_stage(const py::handle& s, const lorafuse::MergeJob& job,
                                        std::vector<py::object>& keep_alive) {
  const std::string form = "(B, A, magnitude|None, column_norm) or (kind, factors, magnitude|None, column_norm)";
  if (!py::isinstance<py::tuple>(s) && !py::isinstance<py::list>(s))
    fail(ErrorKind::Value, job.name + ": a stage must be " + form);
  auto st = py::reinterpret_borrow<py::sequence>(s);
  if (st.size() != 4) fail(ErrorKind::Value, job.name + ": a stage must be " + form);
  const auto view = [&](const py::handle& h, const std::string& what) {
    return f32_view(h, job.name + ": " + what, keep_alive);
  };
  lorafuse::MergeStage stage;
  if (!py::isinstance<py::str>(st[0])) {
    stage = lorafuse::make_lowrank_stage(job, view(st[0], "B"), view(st[1], "A"));
  } else {
    const std::string kind = py::cast<std::string>(st[0]);
    if (kind != "lowrank" && kind != "hadamard" && kind != "kron")
      fail(ErrorKind::Value, job.name + ": unknown stage kind '" + kind + "' (expected 'lowrank', 'hadamard' or 'kron')");
    auto f = require_sequence(st[1], job.name + ": " + kind + " stage factors");
    if (kind == "lowrank") {
      if (f.size() != 2)
        fail(ErrorKind::Value, job.name + ": a lowrank stage takes factors (B, A), got " + std::to_string(f.size()));
      stage = lorafuse::make_lowrank_stage(job, view(f[0], "B"), view(f[1], "A"));
    } else if (kind == "hadamard") {
      if (f.size() != 4)
        fail(ErrorKind::Value, job.name + ": a hadamard stage takes factors (B1, A1, B2, A2), got " +
                                   std::to_string(f.size()));
      stage = lorafuse::make_hadamard_stage(job, view(f[0], "LoHa B1"), view(f[1], "LoHa A1"), view(f[2], "LoHa B2"),
                                            view(f[3], "LoHa A2"));
    } else {
      if (f.size() != 2 && f.size() != 3)
        fail(ErrorKind::Value, job.name + ": a kron stage takes factors (W1, W2) or (W1, W2, row_offset), got " +
                                   std::to_string(f.size()));
      const auto W1 = view(f[0], "LoKr W1");
      const auto W2 = view(f[1], "LoKr W2");
      const std::int64_t offset = f.size() == 3 ? require_int(f[2], job.name + ": LoKr row_offset") : 0;
      stage = lorafuse::make_kron_stage(job, W1, W2, f.size() == 3, offset);
    }
  }
  if (!st[2].is_none()) lorafuse::set_magnitude(stage, job, view(st[2], "DoRA magnitude"), py::cast<bool>(st[3]));
  return stage;
}

// jobs: list of (name, w, w_dtype, out, out_dtype, stages); stages: list of
//   (B, A, magnitude|None, column_norm)                              low-rank, B A
//   ("lowrank", (B, A), magnitude|None, column_norm)                 the same
//   ("hadamard", (B1, A1, B2, A2), magnitude|None, column_norm)      LoHa, (B1 A1) * (B2 A2)
//   ("kron", (W1, W2[, row_offset]), magnitude|None, column_norm)    LoKr, kron(W1, W2)
// Returns, per job, whether the output holds a NaN or an Inf (or overflowed its dtype).
template <class K>
std::vector<bool> merge_batch(const py::list& jobs_in, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  std::vector<lorafuse::MergeJob> jobs;
  std::vector<py::object> keep_alive;  // the arrays whose buffers the kernels read and write
  jobs.reserve(jobs_in.size());
  for (const py::handle& item : jobs_in) {
    auto t = py::cast<py::tuple>(item);
    if (t.size() != 6) fail(ErrorKind::Value, "merge job must be (name, w, w_dtype, out, out_dtype, stages)");
    const std::string name = py::cast<std::string>(t[0]);
    const auto w = array_view(t[1], name + ": base weight", keep_alive);
    const auto out = array_view(t[3], name + ": output", keep_alive);
    lorafuse::MergeJob job = lorafuse::make_merge_job(name, w, lorafuse::dtype_from_name(py::cast<std::string>(t[2])),
                                                      out, lorafuse::dtype_from_name(py::cast<std::string>(t[4])));
    for (const py::handle& s : py::cast<py::list>(t[5])) job.stages.push_back(parse_stage(s, job, keep_alive));
    jobs.push_back(std::move(job));
  }
  run_guarded<K>(keep_alive, [&] { K::merge(jobs, threads); });
  std::vector<bool> nonfinite;
  nonfinite.reserve(jobs.size());
  for (const auto& j : jobs) nonfinite.push_back(j.nonfinite);
  return nonfinite;
}

// ---- factored norms ----

// pairs: list of (B, A) float32; returns ||B A||_F^2 for each, in float64.
template <class K>
py::array_t<double> factored_frobenius_sq(const py::list& pairs, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  std::vector<lorafuse::FactorPairView> items;
  std::vector<py::object> keep_alive;
  for (const py::handle& h : pairs) {
    auto t = py::cast<py::tuple>(h);
    if (t.size() != 2) fail(ErrorKind::Value, "factored_frobenius_sq takes (B, A) pairs");
    items.push_back({f32_view(t[0], "B", keep_alive), f32_view(t[1], "A", keep_alive)});
  }
  py::array_t<double> out(static_cast<py::ssize_t>(items.size()));
  double* res = out.mutable_data();
  run_guarded<K>(keep_alive, [&] { K::frobenius_sq(items, res, threads); });
  return out;
}

// items: list of (B1, A1, B2, A2) float32; returns <B1 A1, B2 A2>_F for each, in float64.
template <class K>
py::array_t<double> factored_inner(const py::list& items_in, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  std::vector<lorafuse::FactorInnerView> items;
  std::vector<py::object> keep_alive;
  for (const py::handle& h : items_in) {
    auto t = py::cast<py::tuple>(h);
    if (t.size() != 4) fail(ErrorKind::Value, "factored_inner takes (B1, A1, B2, A2) tuples");
    items.push_back({f32_view(t[0], "B1", keep_alive), f32_view(t[1], "A1", keep_alive),
                     f32_view(t[2], "B2", keep_alive), f32_view(t[3], "A2", keep_alive)});
  }
  py::array_t<double> out(static_cast<py::ssize_t>(items.size()));
  double* res = out.mutable_data();
  run_guarded<K>(keep_alive, [&] { K::inner(items, res, threads); });
  return out;
}

// ---- factored / dense rank-k SVD ----

// items: list of (name, B (out x R), A (R x in)) float32; ranks: one k per item.
// Returns, per item, (B2 (out x k), A2 (k x in), S (float64: min(R, out, in) values on
// the exact path, min(k, R, out, in) on the randomized one)).
template <class K>
py::list factored_svd(const py::handle& items_in, const py::handle& ranks_in, const std::string& split_name,
                      const py::object& threads_in, const std::string& mode_name, const py::handle& seed,
                      const py::handle& oversample, const py::handle& power_iters) {
  const int threads = require_threads(threads_in);
  const lorafuse::SvdSplit split = lorafuse::svd_split_from_name(split_name);
  const lorafuse::FactoredMode mode = lorafuse::factored_mode_from_name(mode_name);
  const lorafuse::RandomizedSvdOptions opt = require_randomized_options(seed, oversample, power_iters, "factored_svd");
  auto items = require_sequence(items_in, "factored_svd: items");
  const py::sequence ranks = require_ranks(ranks_in, items.size(), "factored_svd");
  std::vector<lorafuse::SvdJob> jobs;
  std::vector<py::object> keep_alive;
  for (std::size_t i = 0; i < items.size(); ++i) {
    auto t = require_sequence(items[i], "factored_svd: item " + std::to_string(i));
    if (t.size() != 3) fail(ErrorKind::Value, "factored_svd: item " + std::to_string(i) + " must be (name, B, A)");
    const std::string name = require_name(t[0], "factored_svd: item " + std::to_string(i));
    const auto B = f32_view(t[1], name + ": B", keep_alive);
    const auto A = f32_view(t[2], name + ": A", keep_alive);
    jobs.push_back(lorafuse::make_factored_job(name, B, A, rank_arg(ranks[i], name), mode, opt));
  }
  return run_svd_jobs<K>(jobs, keep_alive, [&] { K::factored_svd(jobs, split, opt, threads); });
}

// items: list of (name, [(B_1, A_1), ..., (B_n, A_n)], [w_1, ..., w_n]) with float32 factors of
// one update shape (out, in) and any ranks; ranks: one k per item. The same results as
// factored_svd on the stacked items (name, [w_1 B_1 | ... | w_n B_n], [A_1; ...; A_n]), without
// the caller stacking (the exact path stacks in the core's float64 workspace, the randomized
// one takes every product term by term). release: see the docstring (checked here; the CPU
// kernels use the flags, the GPU ones copy each factor once and have no use for them).
template <class K>
py::list factored_svd_lists(const py::handle& items_in, const py::handle& ranks_in, const std::string& split_name,
                            const py::object& threads_in, const std::string& mode_name, const py::handle& seed,
                            const py::handle& oversample, const py::handle& power_iters,
                            const py::handle& release_in) {
  const int threads = require_threads(threads_in);
  const lorafuse::SvdSplit split = lorafuse::svd_split_from_name(split_name);
  const lorafuse::FactoredMode mode = lorafuse::factored_mode_from_name(mode_name);
  const lorafuse::RandomizedSvdOptions opt =
      require_randomized_options(seed, oversample, power_iters, "factored_svd_lists");
  std::optional<py::sequence> release_lists;
  if (!release_in.is_none()) release_lists = require_sequence(release_in, "factored_svd_lists: release");
  auto items = require_sequence(items_in, "factored_svd_lists: items");
  const py::sequence ranks = require_ranks(ranks_in, items.size(), "factored_svd_lists");
  if (release_lists && release_lists->size() != items.size())
    fail(ErrorKind::Value, "factored_svd_lists: " + std::to_string(release_lists->size()) + " release lists for " +
                               std::to_string(items.size()) + " items");
  std::vector<lorafuse::SvdJob> jobs;
  std::vector<py::object> keep_alive;
  for (std::size_t i = 0; i < items.size(); ++i) {
    const std::string where = "factored_svd_lists: item " + std::to_string(i);
    auto t = require_sequence(items[i], where);
    if (t.size() != 3) fail(ErrorKind::Value, where + " must be (name, [(B, A), ...], [weight, ...])");
    const std::string name = require_name(t[0], where);
    auto pairs = require_sequence(t[1], name + ": factor pairs");
    auto weights_in = require_sequence(t[2], name + ": weights");
    std::vector<lorafuse::TensorView> Bs, As;
    std::vector<double> weights;
    for (std::size_t j = 0; j < pairs.size(); ++j) {
      const std::string pair = name + ": pair " + std::to_string(j);
      auto p = require_sequence(pairs[j], pair);
      if (p.size() != 2) fail(ErrorKind::Value, pair + " must be (B, A)");
      Bs.push_back(f32_view(p[0], pair + " B", keep_alive));
      As.push_back(f32_view(p[1], pair + " A", keep_alive));
    }
    for (std::size_t j = 0; j < weights_in.size(); ++j)
      weights.push_back(require_float(weights_in[j], name + ": weight " + std::to_string(j)));
    std::vector<bool> release;
    if (release_lists && !(*release_lists)[i].is_none()) {
      auto flags = require_sequence((*release_lists)[i], name + ": release flags");
      for (std::size_t j = 0; j < flags.size(); ++j) {
        if (!py::isinstance<py::bool_>(flags[j]))
          fail(ErrorKind::Value, name + ": release flag " + std::to_string(j) + " must be a bool");
        release.push_back(flags[j].cast<bool>());
      }
    }
    jobs.push_back(
        lorafuse::make_factored_list_job(name, Bs, As, weights, rank_arg(ranks[i], name), mode, opt, release));
  }
  return run_svd_jobs<K>(jobs, keep_alive, [&] { K::factored_svd(jobs, split, opt, threads); });
}

// items: list of (name, D (out x in)) float32; ranks: one k per item.
// Returns, per item, (B2 (out x k), A2 (k x in), S (min(k, out, in) float64)).
template <class K>
py::list dense_svd(const py::handle& items_in, const py::handle& ranks_in, const std::string& split_name,
                   const py::handle& seed, const py::handle& oversample, const py::handle& power_iters,
                   const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  const lorafuse::SvdSplit split = lorafuse::svd_split_from_name(split_name);
  const lorafuse::RandomizedSvdOptions opt = require_randomized_options(seed, oversample, power_iters, "dense_svd");
  auto items = require_sequence(items_in, "dense_svd: items");
  const py::sequence ranks = require_ranks(ranks_in, items.size(), "dense_svd");
  std::vector<lorafuse::SvdJob> jobs;
  std::vector<py::object> keep_alive;
  for (std::size_t i = 0; i < items.size(); ++i) {
    auto t = require_sequence(items[i], "dense_svd: item " + std::to_string(i));
    if (t.size() != 2) fail(ErrorKind::Value, "dense_svd: item " + std::to_string(i) + " must be (name, D)");
    const std::string name = require_name(t[0], "dense_svd: item " + std::to_string(i));
    const auto D = f32_view(t[1], name + ": D", keep_alive);
    jobs.push_back(lorafuse::make_dense_job(name, D, rank_arg(ranks[i], name), opt));
  }
  return run_svd_jobs<K>(jobs, keep_alive, [&] { K::dense_svd(jobs, split, opt, threads); });
}

// ---- extract: rank-k factors of W_ft - W_base by a streamed randomized SVD ----

// items: list of (name, w_base, base_dtype, w_ft, ft_dtype) with raw 2-D buffers of one
// shape (out, in); ranks: one k per item. Returns, per item, (B (out x k) float32,
// A (k x in) float32, S (min(k + oversample, out, in)) float64, frob_sq: float).
template <class K>
py::list extract_svd(const py::handle& items_in, const py::handle& ranks_in, const py::handle& oversample,
                     const py::handle& power_iters, const py::handle& seed, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  lorafuse::ExtractOptions opt;
  opt.seed = require_seed(seed, "extract_svd");
  opt.oversample = require_int_in(oversample, "extract_svd: oversample", 0, lorafuse::kMaxOversample);
  opt.power_iters = require_int_in(power_iters, "extract_svd: power_iters", 0, lorafuse::kMaxPowerIters);
  auto items = require_sequence(items_in, "extract_svd: items");
  const py::sequence ranks = require_ranks(ranks_in, items.size(), "extract_svd");
  std::vector<lorafuse::ExtractJob> jobs;
  std::vector<py::object> keep_alive;
  std::vector<py::tuple> outputs;
  for (std::size_t i = 0; i < items.size(); ++i) {
    const std::string where = "extract_svd: item " + std::to_string(i);
    auto t = require_sequence(items[i], where);
    if (t.size() != 5) fail(ErrorKind::Value, where + " must be (name, w_base, base_dtype, w_ft, ft_dtype)");
    const std::string name = require_name(t[0], where);
    const auto wb = array_view(t[1], name + ": base weight", keep_alive);
    const auto wf = array_view(t[3], name + ": fine-tuned weight", keep_alive);
    const DType tb = lorafuse::dtype_from_name(require_str(t[2], name + ": base dtype"));
    const DType tf = lorafuse::dtype_from_name(require_str(t[4], name + ": fine-tuned dtype"));
    jobs.push_back(lorafuse::make_extract_job(name, wb, tb, wf, tf, rank_arg(ranks[i], name), opt));
    lorafuse::ExtractJob& job = jobs.back();
    py::array_t<float> B({static_cast<py::ssize_t>(job.out), static_cast<py::ssize_t>(job.k)});
    py::array_t<float> A({static_cast<py::ssize_t>(job.k), static_cast<py::ssize_t>(job.in)});
    py::array_t<double> S(static_cast<py::ssize_t>(job.s_len));
    job.B = B.mutable_data();
    job.A = A.mutable_data();
    job.S = S.mutable_data();
    outputs.push_back(py::make_tuple(B, A, S));
  }
  run_guarded<K>(keep_alive, [&] { K::extract(jobs, opt, threads); });
  py::list results;
  for (std::size_t i = 0; i < jobs.size(); ++i)
    results.append(py::make_tuple(outputs[i][0], outputs[i][1], outputs[i][2], jobs[i].frob_sq));
  return results;
}

// ---- errors ----

inline const char* error_class(ErrorKind k) {
  switch (k) {
    case ErrorKind::Format: return "FormatError";
    case ErrorKind::ShapeMismatch: return "ShapeMismatchError";
    case ErrorKind::Dtype: return "DtypeError";
    case ErrorKind::NonFinite: return "NonFiniteError";
    case ErrorKind::InputChanged: return "InputChangedError";
    case ErrorKind::Device: return "DeviceError";
    case ErrorKind::Value: break;
  }
  return "LorafuseValueError";
}

// lorafuse::Error -> lorafuse.errors.<error_class(kind)>, for every function of the module. Local to
// the module: pybind11 modules built alike share their global translators, and lorafuse._core and
// lorafuse._cuda each have their own lorafuse::Error (hidden symbols), so each translates its own.
inline void register_error_translator() {
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      py::object cls = py::module_::import("lorafuse.errors").attr(error_class(e.kind()));
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
}

// ---- the functions both modules export, with one signature and one docstring ----

template <class K>
void def_shared(py::module_& m) {
  register_error_translator();
  m.def("to_float32", &to_float32<K>, py::arg("raw"), py::arg("dtype"), py::arg("threads") = 0,
        "Convert a raw buffer of safetensors dtype `dtype` (BF16 as uint16, F8 as uint8) to float32.");
  m.def("from_float32", &from_float32<K>, py::arg("x"), py::arg("dtype"), py::arg("threads") = 0,
        "Round a float32 array to F32/F16/BF16 (nearest even); BF16 comes back as uint16.");
  m.def("merge_batch", &merge_batch<K>, py::arg("jobs"), py::arg("threads") = 0,
        "Fused W' = W + sum B A (+ DoRA) for a batch of modules; returns per-job non-finite flags.");
  m.def("factored_frobenius_sq", &factored_frobenius_sq<K>, py::arg("pairs"), py::arg("threads") = 0,
        "||B A||_F^2 from the factors, for each (B, A) pair.");
  m.def("factored_inner", &factored_inner<K>, py::arg("items"), py::arg("threads") = 0,
        "<B1 A1, B2 A2>_F from the factors, for each (B1, A1, B2, A2).");
  m.attr("MAX_THREADS") = lorafuse::kMaxThreads;
  m.attr("MAX_RANK") = lorafuse::kMaxRank;
  m.attr("MAX_OVERSAMPLE") = lorafuse::kMaxOversample;
  m.attr("MAX_POWER_ITERS") = lorafuse::kMaxPowerIters;
  m.def("factored_svd", &factored_svd<K>, py::arg("items"), py::arg("ranks"), py::arg("split") = "B",
        py::arg("threads") = 0, py::arg("mode") = "exact", py::arg("seed") = 0, py::arg("oversample") = 10,
        py::arg("power_iters") = 4,
        "Best rank-k factors of D = B @ A for (name, B, A) items, without forming D when R < min(out, in). "
        "mode 'exact': QR of the factors and SVD of the R x R core (dense SVD when R >= min(out, in)); "
        "mode 'auto': the same unless the cost model finds a randomized SVD through the factors (seeded by seed "
        "and name) much cheaper (see factored_svd_is_exact). Returns (B2, A2, S) per item; S = all min(R, out, "
        "in) singular values (float64) on the exact path, the min(k, R, out, in) computed ones otherwise.");
  m.def("factored_svd_lists", &factored_svd_lists<K>, py::arg("items"), py::arg("ranks"), py::arg("split") = "B",
        py::arg("threads") = 0, py::arg("mode") = "exact", py::arg("seed") = 0, py::arg("oversample") = 10,
        py::arg("power_iters") = 4, py::arg("release") = py::none(),
        "factored_svd for (name, [(B_1, A_1), ..., (B_n, A_n)], [w_1, ..., w_n]) items: the best rank-k factors of "
        "D = sum_i w_i B_i A_i, the same as factored_svd on (name, [w_1 B_1 | ... | w_n B_n], [A_1; ...; A_n]) "
        "without stacking the factors (one update shape (out, in), any ranks). Returns (B2, A2, S) per item. "
        "release: None, or per item None or one bool per pair: True where B_i and A_i are views of a read-only "
        "file mapping, whose pages are then dropped from the resident set after each use (MADV_DONTNEED; they "
        "come back from the page cache); never True for anonymous or writable memory, which DONTNEED would zero.");
  m.def(
      "factored_svd_is_exact",
      [](const py::handle& out, const py::handle& in, const py::handle& r, const py::handle& k,
         const std::string& mode, const py::handle& oversample, const py::handle& power_iters) {
        const auto big = std::numeric_limits<std::int64_t>::max() / 4;
        lorafuse::RandomizedSvdOptions opt = require_randomized_options(py::int_(0), oversample, power_iters,
                                                                        "factored_svd_is_exact");
        return lorafuse::factored_svd_is_exact(require_int_in(out, "out", 0, big), require_int_in(in, "in", 0, big),
                                               require_int_in(r, "r", 0, big), require_rank(k, "factored_svd_is_exact"),
                                               lorafuse::factored_mode_from_name(mode), opt);
      },
      py::arg("out"), py::arg("in_"), py::arg("r"), py::arg("k"), py::arg("mode") = "auto", py::arg("oversample") = 10,
      py::arg("power_iters") = 4, "Whether factored_svd takes the exact path for a job of this shape.");
  m.def(
      "dense_svd_is_exact",
      [](const py::handle& out, const py::handle& in, const py::handle& k, const py::handle& oversample) {
        const auto big = std::numeric_limits<std::int64_t>::max() / 4;
        return lorafuse::dense_svd_is_exact(
            require_int_in(out, "out", 0, big), require_int_in(in, "in", 0, big), require_rank(k, "dense_svd_is_exact"),
            require_int_in(oversample, "dense_svd_is_exact: oversample", 0, lorafuse::kMaxOversample));
      },
      py::arg("out"), py::arg("in_"), py::arg("k"), py::arg("oversample") = 10,
      "Whether dense_svd takes the exact path: (k + oversample) * 4 >= min(out, in).");
  m.def("dense_svd", &dense_svd<K>, py::arg("items"), py::arg("ranks"), py::arg("split") = "B", py::arg("seed") = 0,
        py::arg("oversample") = 10, py::arg("power_iters") = 4, py::arg("threads") = 0,
        "Best rank-k factors of dense (name, D) items: exact SVD when k + oversample >= min(out, in) / 4, else "
        "randomized (seeded by seed and name); returns (B2, A2, S) per item, S = the min(k, out, in) computed "
        "singular values.");
  m.def("extract_svd", &extract_svd<K>, py::arg("items"), py::arg("ranks"), py::arg("oversample") = 10,
        py::arg("power_iters") = 2, py::arg("seed") = 0, py::arg("threads") = 0,
        "Rank-k LoRA factors of D = W_ft - W_base for (name, w_base, base_dtype, w_ft, ft_dtype) items (raw "
        "2-D buffers of one shape, BF16 as uint16, F8 as uint8), by a randomized SVD (l = min(k + oversample, "
        "out, in) Gaussian test vectors seeded by (seed, name), power_iters re-orthonormalized power iterations) "
        "that streams over tiles of both matrices and never forms D. Returns, per item, (B (out, k) float32 = "
        "U_k S_k, A (k, in) float32 = V_k^T, S (l,) float64 = the computed singular values, descending, "
        "frob_sq = ||D||_F^2 in float64); B A is the orthogonal projection of D onto span(B), so its error is "
        "||D - B A||_F = sqrt(max(0, frob_sq - sum(S[:k]**2))) (S is float32-accurate, so this cancels when the "
        "error is below ~1e-3 ||D||_F). Padded with zeros when k > min(out, in); bit-identical for any thread "
        "count.");
}

}  // namespace lorafuse::bind
