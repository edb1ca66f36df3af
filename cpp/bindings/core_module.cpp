// lorafuse._core: thin pybind11 bindings. Every argument is checked here (types,
// contiguity, shapes) before any pointer reaches the kernels, and the GIL is
// released around all numeric work. lorafuse::Error becomes lorafuse.errors.*.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "lorafuse/dtype.hpp"
#include "lorafuse/errors.hpp"
#include "lorafuse/extract.hpp"
#include "lorafuse/limits.hpp"
#include "lorafuse/lowrank.hpp"
#include "lorafuse/mapguard.hpp"
#include "lorafuse/merge.hpp"
#include "lorafuse/parallel.hpp"
#include "lorafuse/svd.hpp"
#include "lorafuse/taskmerge.hpp"

namespace py = pybind11;
using lorafuse::DType;
using lorafuse::Error;
using lorafuse::ErrorKind;

namespace {

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

[[noreturn]] void fail(ErrorKind kind, const std::string& msg) { throw Error(kind, msg); }

// repr(h), cut to a readable length (an array passed by mistake must not flood the message).
std::string show(const py::handle& h) {
  const std::string r = py::repr(h);
  return r.size() <= 60 ? r : r.substr(0, 57) + "...";
}

// A Python integer (int, numpy integer; not bool) in [lo, hi], else a LorafuseValueError
// naming `what`, the value and the range. Nothing is allocated or started from a number
// that has not passed through here.
std::int64_t require_int_in(const py::handle& h, const std::string& what, std::int64_t lo, std::int64_t hi,
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
int require_threads(const py::handle& h) {
  return static_cast<int>(require_int_in(h, "threads", 0, lorafuse::kMaxThreads, " (all cores)"));
}

// Inputs that lie in a memory-mapped file which faulted while it was read (truncated,
// rewritten, unreadable: see mapguard.hpp) hold zeros instead of data: raise
// InputChangedError naming the file instead of returning anything computed from them.
void check_intact(const py::handle& a) {
  if (lorafuse::mapguard::fault_count() == 0 || !py::isinstance<py::array>(a)) return;
  auto arr = py::reinterpret_borrow<py::array>(a);
  const int slot = lorafuse::mapguard::faulted_overlap(arr.data(), static_cast<std::size_t>(arr.nbytes()));
  if (slot < 0) return;
  std::string msg = lorafuse::mapguard::problem(slot);
  if (msg.empty()) msg = "an input file changed or was truncated while lorafuse was reading it; nothing was written";
  fail(ErrorKind::InputChanged, msg);
}

void check_intact(const std::vector<py::object>& arrays) {
  if (lorafuse::mapguard::fault_count() == 0) return;
  for (const py::object& a : arrays) check_intact(a);
}

// Runs a kernel without the GIL, then refuses its results if one of its `inputs` lies in a
// mapped file that faulted meanwhile (before or during the call). A changed input also
// explains any error the kernel raised, so it is reported instead.
template <class Fn>
void run_guarded(const std::vector<py::object>& inputs, Fn fn) {
  try {
    py::gil_scoped_release release;
    fn();
  } catch (...) {
    check_intact(inputs);
    throw;
  }
  check_intact(inputs);
}

void require_c_contiguous(const py::array& a, const std::string& what) {
  if (!(a.flags() & py::array::c_style)) fail(ErrorKind::Value, what + " must be C-contiguous");
}

// A raw buffer holding elements of `dt`: any numpy dtype with the right item size
// (BF16 travels as uint16, F8 as uint8).
void require_raw(const py::array& a, DType dt, const std::string& what) {
  require_c_contiguous(a, what);
  if (static_cast<std::size_t>(a.itemsize()) != lorafuse::itemsize(dt))
    fail(ErrorKind::Dtype, what + ": buffer item size " + std::to_string(a.itemsize()) + " does not match dtype " +
                               lorafuse::dtype_name(dt));
}

py::array_t<float> require_f32(const py::handle& h, const std::string& what) {
  if (!py::isinstance<py::array_t<float>>(h))
    fail(ErrorKind::Dtype, what + " must be a float32 numpy array");
  auto a = py::reinterpret_borrow<py::array_t<float>>(h);
  require_c_contiguous(a, what);
  return a;
}

py::dtype raw_numpy_dtype(DType dt) {
  switch (dt) {
    case DType::F32: return py::dtype::of<float>();
    case DType::F16: return py::dtype("float16");
    case DType::BF16: return py::dtype::of<std::uint16_t>();
    case DType::F64: return py::dtype::of<double>();
    default: return py::dtype::of<std::uint8_t>();
  }
}

// Splits an elementwise conversion into chunks spread over threads.
template <class Fn>
void chunked(std::size_t n, int threads, Fn fn) {
  constexpr std::size_t chunk = 1 << 18;
  const auto blocks = static_cast<std::int64_t>((n + chunk - 1) / chunk);
  lorafuse::parallel_for(blocks, threads, [&](std::int64_t b, int) {
    const std::size_t lo = static_cast<std::size_t>(b) * chunk;
    fn(lo, std::min(chunk, n - lo));
  });
}

py::array to_float32(const py::array& raw, const std::string& dtype, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  const DType dt = lorafuse::dtype_from_name(dtype);
  require_raw(raw, dt, "to_float32 input");
  std::vector<py::ssize_t> shape(raw.shape(), raw.shape() + raw.ndim());
  py::array_t<float> out(shape);
  const auto* src = static_cast<const unsigned char*>(raw.data());
  float* dst = out.mutable_data();
  const std::size_t n = static_cast<std::size_t>(raw.size()), isz = lorafuse::itemsize(dt);
  run_guarded({raw}, [&] {
    chunked(n, threads, [&](std::size_t lo, std::size_t len) { lorafuse::to_f32(src + lo * isz, dt, dst + lo, len); });
  });
  return out;
}

py::array from_float32(const py::handle& x_handle, const std::string& dtype, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  const DType dt = lorafuse::dtype_from_name(dtype);
  if (!lorafuse::writable(dt)) fail(ErrorKind::Dtype, "cannot write dtype " + dtype + " (lorafuse writes F32, F16 and BF16)");
  auto x = require_f32(x_handle, "from_float32 input");
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  py::array out(raw_numpy_dtype(dt), shape);
  const float* src = x.data();
  auto* dst = static_cast<unsigned char*>(out.mutable_data());
  const std::size_t n = static_cast<std::size_t>(x.size()), isz = lorafuse::itemsize(dt);
  run_guarded({x}, [&] {
    chunked(n, threads, [&](std::size_t lo, std::size_t len) { lorafuse::from_f32(src + lo, dst + lo * isz, dt, len); });
  });
  return out;
}

// Defined with the combine kernels below.
py::sequence require_sequence(const py::handle& h, const std::string& what);
std::int64_t require_int(const py::handle& h, const std::string& what);

// ---- merge_batch: stage parsing ----

// A float32 C-contiguous 2-D factor, kept alive for the kernels.
py::array_t<float> require_factor(const py::handle& h, const std::string& what, std::vector<py::object>& keep_alive) {
  auto a = require_f32(h, what);
  if (a.ndim() != 2) fail(ErrorKind::ShapeMismatch, what + " " + shape_str(a) + " must be 2-D");
  keep_alive.push_back(a);
  return a;
}

// rows * cols of a Kronecker product, or -1 when it does not fit in 64 bits.
std::int64_t checked_product(std::int64_t x, std::int64_t y) {
  std::int64_t r = 0;
  return __builtin_mul_overflow(x, y, &r) ? -1 : r;
}

void parse_lowrank(const py::handle& B_in, const py::handle& A_in, const py::array& w, const lorafuse::MergeJob& job,
                   lorafuse::MergeStage& stage, std::vector<py::object>& keep_alive) {
  auto B = require_f32(B_in, job.name + ": B");
  auto A = require_f32(A_in, job.name + ": A");
  if (B.ndim() != 2 || A.ndim() != 2 || B.shape(0) != job.rows || A.shape(1) != job.cols || B.shape(1) != A.shape(0))
    fail(ErrorKind::ShapeMismatch, job.name + ": factors B " + shape_str(B) + " and A " + shape_str(A) +
                                       " do not fit the base weight " + shape_str(w));
  keep_alive.push_back(B);
  keep_alive.push_back(A);
  stage.kind = lorafuse::StageKind::LowRank;
  stage.B = B.data();
  stage.A = A.data();
  stage.rank = A.shape(0);
}

void parse_hadamard(const py::sequence& f, const py::array& w, const lorafuse::MergeJob& job,
                    lorafuse::MergeStage& stage, std::vector<py::object>& keep_alive) {
  if (f.size() != 4)
    fail(ErrorKind::Value, job.name + ": a hadamard stage takes factors (B1, A1, B2, A2), got " +
                               std::to_string(f.size()));
  auto B1 = require_factor(f[0], job.name + ": LoHa B1", keep_alive);
  auto A1 = require_factor(f[1], job.name + ": LoHa A1", keep_alive);
  auto B2 = require_factor(f[2], job.name + ": LoHa B2", keep_alive);
  auto A2 = require_factor(f[3], job.name + ": LoHa A2", keep_alive);
  if (B1.shape(0) != job.rows || B2.shape(0) != job.rows || A1.shape(1) != job.cols || A2.shape(1) != job.cols ||
      B1.shape(1) != A1.shape(0) || B2.shape(1) != A2.shape(0))
    fail(ErrorKind::ShapeMismatch, job.name + ": LoHa factors B1 " + shape_str(B1) + ", A1 " + shape_str(A1) +
                                       ", B2 " + shape_str(B2) + ", A2 " + shape_str(A2) +
                                       " do not fit the base weight " + shape_str(w));
  stage.kind = lorafuse::StageKind::Hadamard;
  stage.B = B1.data();
  stage.A = A1.data();
  stage.rank = A1.shape(0);
  stage.B2 = B2.data();
  stage.A2 = A2.data();
  stage.rank2 = A2.shape(0);
}

// (W1, W2) or (W1, W2, row_offset): the job's rows are rows [row_offset, row_offset + rows)
// of kron(W1, W2).
void parse_kron(const py::sequence& f, const py::array& w, const lorafuse::MergeJob& job, lorafuse::MergeStage& stage,
                std::vector<py::object>& keep_alive) {
  if (f.size() != 2 && f.size() != 3)
    fail(ErrorKind::Value, job.name + ": a kron stage takes factors (W1, W2) or (W1, W2, row_offset), got " +
                               std::to_string(f.size()));
  auto W1 = require_factor(f[0], job.name + ": LoKr W1", keep_alive);
  auto W2 = require_factor(f[1], job.name + ": LoKr W2", keep_alive);
  const std::int64_t offset = f.size() == 3 ? require_int(f[2], job.name + ": LoKr row_offset") : 0;
  const std::int64_t krows = checked_product(W1.shape(0), W2.shape(0));
  const std::int64_t kcols = checked_product(W1.shape(1), W2.shape(1));
  const bool rows_fit = f.size() == 3 ? offset >= 0 && krows >= 0 && offset <= krows && job.rows <= krows - offset
                                      : krows == job.rows;
  if (!rows_fit || kcols != job.cols) {
    std::string msg = job.name + ": LoKr factors W1 " + shape_str(W1) + " and W2 " + shape_str(W2);
    if (f.size() == 3) msg += " at row offset " + std::to_string(offset);
    fail(ErrorKind::ShapeMismatch, msg + " do not fit the base weight " + shape_str(w) +
                                       " (kron(W1, W2) has W1 rows * W2 rows by W1 cols * W2 cols)");
  }
  stage.kind = lorafuse::StageKind::Kron;
  stage.W1 = W1.data();
  stage.W2 = W2.data();
  stage.a = W1.shape(0);
  stage.b = W1.shape(1);
  stage.c = W2.shape(0);
  stage.d = W2.shape(1);
  stage.row_offset = offset;
}

// One stage: (B, A, magnitude|None, column_norm) or (kind, factors, magnitude|None, column_norm)
// with kind "lowrank" (B, A), "hadamard" (B1, A1, B2, A2) or "kron" (W1, W2[, row_offset]).
lorafuse::MergeStage parse_stage(const py::handle& s, const py::array& w, const lorafuse::MergeJob& job,
                                 std::vector<py::object>& keep_alive) {
  const std::string form = "(B, A, magnitude|None, column_norm) or (kind, factors, magnitude|None, column_norm)";
  if (!py::isinstance<py::tuple>(s) && !py::isinstance<py::list>(s))
    fail(ErrorKind::Value, job.name + ": a stage must be " + form);
  auto st = py::reinterpret_borrow<py::sequence>(s);
  if (st.size() != 4) fail(ErrorKind::Value, job.name + ": a stage must be " + form);
  lorafuse::MergeStage stage;
  if (!py::isinstance<py::str>(st[0])) {
    parse_lowrank(st[0], st[1], w, job, stage, keep_alive);
  } else {
    const std::string kind = py::cast<std::string>(st[0]);
    if (kind != "lowrank" && kind != "hadamard" && kind != "kron")
      fail(ErrorKind::Value, job.name + ": unknown stage kind '" + kind + "' (expected 'lowrank', 'hadamard' or 'kron')");
    auto f = require_sequence(st[1], job.name + ": " + kind + " stage factors");
    if (kind == "lowrank") {
      if (f.size() != 2)
        fail(ErrorKind::Value, job.name + ": a lowrank stage takes factors (B, A), got " + std::to_string(f.size()));
      parse_lowrank(f[0], f[1], w, job, stage, keep_alive);
    } else if (kind == "hadamard") {
      parse_hadamard(f, w, job, stage, keep_alive);
    } else {
      parse_kron(f, w, job, stage, keep_alive);
    }
  }
  if (!st[2].is_none()) {
    stage.column_norm = py::cast<bool>(st[3]);
    auto m = require_f32(st[2], job.name + ": DoRA magnitude");
    if (m.ndim() != 1 || m.shape(0) != (stage.column_norm ? job.cols : job.rows))
      fail(ErrorKind::ShapeMismatch, job.name + ": DoRA magnitude " + shape_str(m) + " does not fit the base weight " +
                                         shape_str(w));
    stage.magnitude = m.data();
    keep_alive.push_back(m);
  }
  return stage;
}

// jobs: list of (name, w, w_dtype, out, out_dtype, stages); stages: list of
//   (B, A, magnitude|None, column_norm)                              low-rank, B A
//   ("lowrank", (B, A), magnitude|None, column_norm)                 the same
//   ("hadamard", (B1, A1, B2, A2), magnitude|None, column_norm)      LoHa, (B1 A1) * (B2 A2)
//   ("kron", (W1, W2[, row_offset]), magnitude|None, column_norm)    LoKr, kron(W1, W2)
// Returns, per job, whether the output holds a NaN or an Inf (or overflowed its dtype).
std::vector<bool> merge_batch(const py::list& jobs_in, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  std::vector<lorafuse::MergeJob> jobs;
  std::vector<py::object> keep_alive;  // the arrays whose buffers the kernels read and write
  jobs.reserve(jobs_in.size());
  for (const py::handle& item : jobs_in) {
    auto t = py::cast<py::tuple>(item);
    if (t.size() != 6) fail(ErrorKind::Value, "merge job must be (name, w, w_dtype, out, out_dtype, stages)");
    lorafuse::MergeJob job;
    job.name = py::cast<std::string>(t[0]);
    auto w = py::cast<py::array>(t[1]);
    auto out = py::cast<py::array>(t[3]);
    job.w_type = lorafuse::dtype_from_name(py::cast<std::string>(t[2]));
    job.out_type = lorafuse::dtype_from_name(py::cast<std::string>(t[4]));
    require_raw(w, job.w_type, job.name + ": base weight");
    require_raw(out, job.out_type, job.name + ": output");
    if (!out.writeable()) fail(ErrorKind::Value, job.name + ": output buffer is read-only");
    if (w.ndim() != 2 || out.ndim() != 2 || w.shape(0) != out.shape(0) || w.shape(1) != out.shape(1))
      fail(ErrorKind::ShapeMismatch, job.name + ": base weight " + shape_str(w) + " and output " + shape_str(out) +
                                         " must be equal 2-D shapes");
    job.rows = w.shape(0);
    job.cols = w.shape(1);
    job.w = w.data();
    job.out = out.mutable_data();
    keep_alive.push_back(w);
    keep_alive.push_back(out);
    for (const py::handle& s : py::cast<py::list>(t[5])) job.stages.push_back(parse_stage(s, w, job, keep_alive));
    jobs.push_back(std::move(job));
  }
  run_guarded(keep_alive, [&] {
    lorafuse::merge_batch(jobs, threads);
  });
  std::vector<bool> nonfinite;
  nonfinite.reserve(jobs.size());
  for (const auto& j : jobs) nonfinite.push_back(j.nonfinite);
  return nonfinite;
}

// pairs: list of (B, A) float32; returns ||B A||_F^2 for each, in float64.
py::array_t<double> factored_frobenius_sq(const py::list& pairs, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  struct Pair {
    const float *B, *A;
    std::int64_t out, r, in;
  };
  std::vector<Pair> items;
  std::vector<py::object> keep_alive;
  for (const py::handle& h : pairs) {
    auto t = py::cast<py::tuple>(h);
    if (t.size() != 2) fail(ErrorKind::Value, "factored_frobenius_sq takes (B, A) pairs");
    auto B = require_f32(t[0], "B");
    auto A = require_f32(t[1], "A");
    if (B.ndim() != 2 || A.ndim() != 2 || B.shape(1) != A.shape(0))
      fail(ErrorKind::ShapeMismatch, "B " + shape_str(B) + " and A " + shape_str(A) + " cannot be multiplied");
    items.push_back({B.data(), A.data(), B.shape(0), B.shape(1), A.shape(1)});
    keep_alive.push_back(B);
    keep_alive.push_back(A);
  }
  py::array_t<double> out(static_cast<py::ssize_t>(items.size()));
  double* res = out.mutable_data();
  run_guarded(keep_alive, [&] {
    lorafuse::parallel_for(static_cast<std::int64_t>(items.size()), threads, [&](std::int64_t i, int) {
      const Pair& p = items[static_cast<std::size_t>(i)];
      res[i] = lorafuse::factored_frobenius_sq(p.B, p.A, p.out, p.r, p.in);
    });
  });
  return out;
}

// items: list of (B1, A1, B2, A2) float32; returns <B1 A1, B2 A2>_F for each, in float64.
py::array_t<double> factored_inner(const py::list& items_in, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  struct Item {
    const float *B1, *A1, *B2, *A2;
    std::int64_t r1, r2, out, in;
  };
  std::vector<Item> items;
  std::vector<py::object> keep_alive;
  for (const py::handle& h : items_in) {
    auto t = py::cast<py::tuple>(h);
    if (t.size() != 4) fail(ErrorKind::Value, "factored_inner takes (B1, A1, B2, A2) tuples");
    auto B1 = require_f32(t[0], "B1");
    auto A1 = require_f32(t[1], "A1");
    auto B2 = require_f32(t[2], "B2");
    auto A2 = require_f32(t[3], "A2");
    if (B1.ndim() != 2 || A1.ndim() != 2 || B2.ndim() != 2 || A2.ndim() != 2 || B1.shape(1) != A1.shape(0) ||
        B2.shape(1) != A2.shape(0) || B1.shape(0) != B2.shape(0) || A1.shape(1) != A2.shape(1))
      fail(ErrorKind::ShapeMismatch, "factors B1 " + shape_str(B1) + ", A1 " + shape_str(A1) + ", B2 " +
                                         shape_str(B2) + ", A2 " + shape_str(A2) + " do not describe two deltas of one shape");
    items.push_back({B1.data(), A1.data(), B2.data(), A2.data(), A1.shape(0), A2.shape(0), B1.shape(0), A1.shape(1)});
    for (auto* a : {&B1, &A1, &B2, &A2}) keep_alive.push_back(*a);
  }
  py::array_t<double> out(static_cast<py::ssize_t>(items.size()));
  double* res = out.mutable_data();
  run_guarded(keep_alive, [&] {
    lorafuse::parallel_for(static_cast<std::int64_t>(items.size()), threads, [&](std::int64_t i, int) {
      const Item& p = items[static_cast<std::size_t>(i)];
      res[i] = lorafuse::factored_inner(p.B1, p.A1, p.r1, p.B2, p.A2, p.r2, p.out, p.in);
    });
  });
  return out;
}

// ---- combine kernels: factored / dense rank-k SVD and PEFT-style task merging ----

// A tuple or list (not a string), else a LorafuseValueError naming `what`.
py::sequence require_sequence(const py::handle& h, const std::string& what) {
  if (!(py::isinstance<py::tuple>(h) || py::isinstance<py::list>(h)))
    fail(ErrorKind::Value, what + " must be a tuple or list, got " + std::string(py::str(py::type::of(h).attr("__name__"))));
  return py::reinterpret_borrow<py::sequence>(h);
}

std::string require_name(const py::handle& h, const std::string& what) {
  if (!py::isinstance<py::str>(h)) fail(ErrorKind::Value, what + ": the module name must be a str");
  return py::cast<std::string>(h);
}

// Any Python integer (int, numpy integer), not bool; else a LorafuseValueError.
std::int64_t require_int(const py::handle& h, const std::string& what) {
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

double require_float(const py::handle& h, const std::string& what) {
  if (py::isinstance<py::bool_>(h)) fail(ErrorKind::Value, what + " must be a number, got a bool");
  const double v = PyFloat_AsDouble(h.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    fail(ErrorKind::Value, what + " must be a number");
  }
  return v;
}

// A seed in [0, 2^64).
std::uint64_t require_seed(const py::handle& h, const std::string& fn) {
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
py::sequence require_ranks(const py::handle& ranks_in, std::size_t n_items, const std::string& fn) {
  auto ranks = require_sequence(ranks_in, fn + ": ranks");
  if (ranks.size() != n_items)
    fail(ErrorKind::Value, fn + ": " + std::to_string(ranks.size()) + " ranks for " + std::to_string(n_items) + " items");
  return ranks;
}

// The rank k in [1, kMaxRank] asked for the module `name`.
std::int64_t require_rank(const py::handle& h, const std::string& name) {
  return require_int_in(h, name + ": rank", 1, lorafuse::kMaxRank);
}

// Allocates B2 (out x k), A2 (k x in) and S (s_len) for a job and points the job at them.
py::tuple allocate_svd_outputs(lorafuse::SvdJob& job) {
  py::array_t<float> B2({static_cast<py::ssize_t>(job.out), static_cast<py::ssize_t>(job.k)});
  py::array_t<float> A2({static_cast<py::ssize_t>(job.k), static_cast<py::ssize_t>(job.in)});
  py::array_t<double> S(static_cast<py::ssize_t>(job.s_len));
  job.B2 = B2.mutable_data();
  job.A2 = A2.mutable_data();
  job.S = S.mutable_data();
  return py::make_tuple(B2, A2, S);
}

lorafuse::RandomizedSvdOptions require_randomized_options(const py::handle& seed, const py::handle& oversample,
                                                         const py::handle& power_iters, const std::string& fn) {
  lorafuse::RandomizedSvdOptions opt;
  opt.seed = require_seed(seed, fn);
  opt.oversample = require_int_in(oversample, fn + ": oversample", 0, lorafuse::kMaxOversample);
  opt.power_iters = require_int_in(power_iters, fn + ": power_iters", 0, lorafuse::kMaxPowerIters);
  return opt;
}

// items: list of (name, B (out x R), A (R x in)) float32; ranks: one k per item.
// Returns, per item, (B2 (out x k), A2 (k x in), S (float64: min(R, out, in) values on
// the exact path, min(k, R, out, in) on the randomized one)).
py::list factored_svd(const py::handle& items_in, const py::handle& ranks_in, const std::string& split_name,
                      const py::object& threads_in, const std::string& mode_name, const py::handle& seed,
                      const py::handle& oversample, const py::handle& power_iters) {
  const int threads = require_threads(threads_in);
  const lorafuse::SvdSplit split = lorafuse::svd_split_from_name(split_name);
  const lorafuse::FactoredMode mode = lorafuse::factored_mode_from_name(mode_name);
  const lorafuse::RandomizedSvdOptions opt = require_randomized_options(seed, oversample, power_iters, "factored_svd");
  auto items = require_sequence(items_in, "factored_svd: items");
  const py::sequence ranks = require_ranks(ranks_in, items.size(), "factored_svd");
  std::vector<lorafuse::SvdJob> jobs(items.size());
  std::vector<py::object> keep_alive;
  py::list results;
  for (std::size_t i = 0; i < items.size(); ++i) {
    auto t = require_sequence(items[i], "factored_svd: item " + std::to_string(i));
    if (t.size() != 3) fail(ErrorKind::Value, "factored_svd: item " + std::to_string(i) + " must be (name, B, A)");
    lorafuse::SvdJob& job = jobs[i];
    job.name = require_name(t[0], "factored_svd: item " + std::to_string(i));
    auto B = require_f32(t[1], job.name + ": B");
    auto A = require_f32(t[2], job.name + ": A");
    if (B.ndim() != 2 || A.ndim() != 2 || B.shape(1) != A.shape(0))
      fail(ErrorKind::ShapeMismatch, job.name + ": factors B " + shape_str(B) + " and A " + shape_str(A) +
                                         " cannot be multiplied (need B (out, R) and A (R, in))");
    job.B = B.data();
    job.A = A.data();
    job.out = B.shape(0);
    job.r = B.shape(1);
    job.in = A.shape(1);
    job.k = require_rank(ranks[i], job.name);
    job.exact = lorafuse::factored_svd_is_exact(job.out, job.in, job.r, job.k, mode, opt);
    job.s_len = job.exact ? lorafuse::factored_sv_count(job.out, job.r, job.in)
                          : lorafuse::dense_sv_count(std::min(job.out, job.r), job.in, job.k);
    keep_alive.push_back(B);
    keep_alive.push_back(A);
    results.append(allocate_svd_outputs(job));
  }
  run_guarded(keep_alive, [&] {
    lorafuse::factored_svd_batch(jobs, split, opt, threads);
  });
  return results;
}

// items: list of (name, D (out x in)) float32; ranks: one k per item.
// Returns, per item, (B2 (out x k), A2 (k x in), S (min(k, out, in) float64)).
py::list dense_svd(const py::handle& items_in, const py::handle& ranks_in, const std::string& split_name,
                   const py::handle& seed, const py::handle& oversample, const py::handle& power_iters,
                   const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  const lorafuse::SvdSplit split = lorafuse::svd_split_from_name(split_name);
  const lorafuse::RandomizedSvdOptions opt = require_randomized_options(seed, oversample, power_iters, "dense_svd");
  auto items = require_sequence(items_in, "dense_svd: items");
  const py::sequence ranks = require_ranks(ranks_in, items.size(), "dense_svd");
  std::vector<lorafuse::SvdJob> jobs(items.size());
  std::vector<py::object> keep_alive;
  py::list results;
  for (std::size_t i = 0; i < items.size(); ++i) {
    auto t = require_sequence(items[i], "dense_svd: item " + std::to_string(i));
    if (t.size() != 2) fail(ErrorKind::Value, "dense_svd: item " + std::to_string(i) + " must be (name, D)");
    lorafuse::SvdJob& job = jobs[i];
    job.name = require_name(t[0], "dense_svd: item " + std::to_string(i));
    auto D = require_f32(t[1], job.name + ": D");
    if (D.ndim() != 2) fail(ErrorKind::ShapeMismatch, job.name + ": D " + shape_str(D) + " must be 2-D (out, in)");
    job.D = D.data();
    job.out = D.shape(0);
    job.in = D.shape(1);
    job.k = require_rank(ranks[i], job.name);
    job.s_len = lorafuse::dense_sv_count(job.out, job.in, job.k);
    keep_alive.push_back(D);
    results.append(allocate_svd_outputs(job));
  }
  run_guarded(keep_alive, [&] {
    lorafuse::dense_svd_batch(jobs, split, opt, threads);
  });
  return results;
}

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
  if (!(opt.density >= 0.0) || !std::isfinite(opt.density))
    fail(ErrorKind::Value, "task_merge: density must be >= 0 (a finite number), got " + show(density));
  opt.rescale = rescale;
  opt.seed = require_seed(seed, "task_merge");
  auto items = require_sequence(items_in, "task_merge: items");
  auto weights = require_sequence(weights_in, "task_merge: weights");
  if (weights.size() != items.size())
    fail(ErrorKind::Value, "task_merge: " + std::to_string(weights.size()) + " weight lists for " +
                               std::to_string(items.size()) + " items");
  std::vector<lorafuse::TaskMergeItem> jobs(items.size());
  std::vector<py::object> keep_alive;
  py::list results;
  for (std::size_t i = 0; i < items.size(); ++i) {
    auto t = require_sequence(items[i], "task_merge: item " + std::to_string(i));
    if (t.size() != 2) fail(ErrorKind::Value, "task_merge: item " + std::to_string(i) + " must be (name, tensors)");
    lorafuse::TaskMergeItem& job = jobs[i];
    job.name = require_name(t[0], "task_merge: item " + std::to_string(i));
    auto tensors = require_sequence(t[1], job.name + ": tensors");
    auto w = require_sequence(weights[i], job.name + ": weights");
    if (tensors.size() == 0) fail(ErrorKind::Value, job.name + ": task_merge needs at least one tensor");
    if (w.size() != tensors.size())
      fail(ErrorKind::ShapeMismatch, job.name + ": " + std::to_string(w.size()) + " weights for " +
                                         std::to_string(tensors.size()) + " tensors");
    py::array_t<float> first;
    for (std::size_t j = 0; j < tensors.size(); ++j) {
      auto a = require_f32(tensors[j], job.name + ": task tensor " + std::to_string(j));
      if (j == 0) {
        first = a;
      } else if (a.ndim() != first.ndim() || !std::equal(a.shape(), a.shape() + a.ndim(), first.shape())) {
        fail(ErrorKind::ShapeMismatch, job.name + ": task tensor " + std::to_string(j) + " has shape " + shape_str(a) +
                                           ", task tensor 0 has " + shape_str(first));
      }
      job.tensors.push_back(a.data());
      const double wj = require_float(w[j], job.name + ": weight " + std::to_string(j));
      if (!std::isfinite(wj)) fail(ErrorKind::Value, job.name + ": weight " + std::to_string(j) + " must be finite, got " + show(w[j]));
      job.weights.push_back(wj);
      keep_alive.push_back(a);
    }
    job.numel = first.size();
    std::vector<py::ssize_t> shape(first.shape(), first.shape() + first.ndim());
    py::array_t<float> out(shape);
    job.out = out.mutable_data();
    results.append(out);
  }
  run_guarded(keep_alive, [&] {
    lorafuse::task_merge_batch(jobs, opt, threads);
  });
  return results;
}

// ---- extract: rank-k factors of W_ft - W_base by a streamed randomized SVD ----

// A numpy array (not converted from anything else), else a LorafuseValueError.
py::array require_array(const py::handle& h, const std::string& what) {
  if (!py::isinstance<py::array>(h))
    fail(ErrorKind::Value, what + " must be a numpy array, got " + std::string(py::str(py::type::of(h).attr("__name__"))));
  return py::reinterpret_borrow<py::array>(h);
}

std::string require_str(const py::handle& h, const std::string& what) {
  if (!py::isinstance<py::str>(h)) fail(ErrorKind::Value, what + " must be a str");
  return py::cast<std::string>(h);
}

// items: list of (name, w_base, base_dtype, w_ft, ft_dtype) with raw 2-D buffers of one
// shape (out, in); ranks: one k per item. Returns, per item, (B (out x k) float32,
// A (k x in) float32, S (min(k + oversample, out, in)) float64, frob_sq: float).
py::list extract_svd(const py::handle& items_in, const py::handle& ranks_in, const py::handle& oversample,
                     const py::handle& power_iters, const py::handle& seed, const py::object& threads_in) {
  const int threads = require_threads(threads_in);
  lorafuse::ExtractOptions opt;
  opt.seed = require_seed(seed, "extract_svd");
  opt.oversample = require_int_in(oversample, "extract_svd: oversample", 0, lorafuse::kMaxOversample);
  opt.power_iters = require_int_in(power_iters, "extract_svd: power_iters", 0, lorafuse::kMaxPowerIters);
  auto items = require_sequence(items_in, "extract_svd: items");
  const py::sequence ranks = require_ranks(ranks_in, items.size(), "extract_svd");
  std::vector<lorafuse::ExtractJob> jobs(items.size());
  std::vector<py::object> keep_alive;
  std::vector<py::tuple> outputs;
  for (std::size_t i = 0; i < items.size(); ++i) {
    const std::string where = "extract_svd: item " + std::to_string(i);
    auto t = require_sequence(items[i], where);
    if (t.size() != 5) fail(ErrorKind::Value, where + " must be (name, w_base, base_dtype, w_ft, ft_dtype)");
    lorafuse::ExtractJob& job = jobs[i];
    job.name = require_name(t[0], where);
    auto wb = require_array(t[1], job.name + ": base weight");
    auto wf = require_array(t[3], job.name + ": fine-tuned weight");
    job.base_type = lorafuse::dtype_from_name(require_str(t[2], job.name + ": base dtype"));
    job.ft_type = lorafuse::dtype_from_name(require_str(t[4], job.name + ": fine-tuned dtype"));
    if (wb.ndim() != 2 || wf.ndim() != 2 || wb.shape(0) != wf.shape(0) || wb.shape(1) != wf.shape(1))
      fail(ErrorKind::ShapeMismatch, job.name + ": base weight " + shape_str(wb) + " and fine-tuned weight " +
                                         shape_str(wf) + " must be equal 2-D shapes (out, in)");
    require_raw(wb, job.base_type, job.name + ": base weight");
    require_raw(wf, job.ft_type, job.name + ": fine-tuned weight");
    job.w_base = wb.data();
    job.w_ft = wf.data();
    job.out = wb.shape(0);
    job.in = wb.shape(1);
    job.k = require_rank(ranks[i], job.name);
    job.s_len = lorafuse::extract_sv_count(job.out, job.in, job.k, opt.oversample);
    keep_alive.push_back(wb);
    keep_alive.push_back(wf);
    py::array_t<float> B({static_cast<py::ssize_t>(job.out), static_cast<py::ssize_t>(job.k)});
    py::array_t<float> A({static_cast<py::ssize_t>(job.k), static_cast<py::ssize_t>(job.in)});
    py::array_t<double> S(static_cast<py::ssize_t>(job.s_len));
    job.B = B.mutable_data();
    job.A = A.mutable_data();
    job.S = S.mutable_data();
    outputs.push_back(py::make_tuple(B, A, S));
  }
  run_guarded(keep_alive, [&] {
    lorafuse::extract_svd_batch(jobs, opt, threads);
  });
  py::list results;
  for (std::size_t i = 0; i < jobs.size(); ++i)
    results.append(py::make_tuple(outputs[i][0], outputs[i][1], outputs[i][2], jobs[i].frob_sq));
  return results;
}

const char* error_class(ErrorKind k) {
  switch (k) {
    case ErrorKind::Format: return "FormatError";
    case ErrorKind::ShapeMismatch: return "ShapeMismatchError";
    case ErrorKind::Dtype: return "DtypeError";
    case ErrorKind::NonFinite: return "NonFiniteError";
    case ErrorKind::InputChanged: return "InputChangedError";
    case ErrorKind::Value: break;
  }
  return "LorafuseValueError";
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
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      py::object cls = py::module_::import("lorafuse.errors").attr(error_class(e.kind()));
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
  m.def("to_float32", &to_float32, py::arg("raw"), py::arg("dtype"), py::arg("threads") = 0,
        "Convert a raw buffer of safetensors dtype `dtype` (BF16 as uint16, F8 as uint8) to float32.");
  m.def("from_float32", &from_float32, py::arg("x"), py::arg("dtype"), py::arg("threads") = 0,
        "Round a float32 array to F32/F16/BF16 (nearest even); BF16 comes back as uint16.");
  m.def("merge_batch", &merge_batch, py::arg("jobs"), py::arg("threads") = 0,
        "Fused W' = W + sum B A (+ DoRA) for a batch of modules; returns per-job non-finite flags.");
  m.def("factored_frobenius_sq", &factored_frobenius_sq, py::arg("pairs"), py::arg("threads") = 0,
        "||B A||_F^2 from the factors, for each (B, A) pair.");
  m.def("factored_inner", &factored_inner, py::arg("items"), py::arg("threads") = 0,
        "<B1 A1, B2 A2>_F from the factors, for each (B1, A1, B2, A2).");
  m.def("hardware_threads", []() { return lorafuse::resolve_threads(0); });
  m.def("resolve_threads", [](const py::object& threads) { return lorafuse::resolve_threads(require_threads(threads)); },
        py::arg("threads"), "The number of worker threads a `threads` argument runs (0: all hardware threads; at most "
        "4 per hardware thread).");
  m.def("thread_start_failures", &lorafuse::thread_start_failures,
        "How many worker threads could not be started (and were done without) in this process so far.");
  m.attr("MAX_THREADS") = lorafuse::kMaxThreads;
  m.attr("MAX_RANK") = lorafuse::kMaxRank;
  m.attr("MAX_OVERSAMPLE") = lorafuse::kMaxOversample;
  m.attr("MAX_POWER_ITERS") = lorafuse::kMaxPowerIters;
  m.def("register_mapping", &register_mapping, py::arg("buffer"), py::arg("label"), py::arg("path"), py::arg("dev"),
        py::arg("ino"), py::arg("file_size"), py::arg("mtime_ns"),
        "Guard reads of a memory-mapped file against SIGBUS (truncated or rewritten while read): returns a slot for "
        "unregister_mapping / mapping_problem, or -1 when the table is full.");
  m.def("unregister_mapping", &lorafuse::mapguard::unregister, py::arg("slot"));
  m.def("mapping_problem", &lorafuse::mapguard::problem, py::arg("slot"),
        "'' while the mapping has not faulted and its file keeps its size and modification time; else why its data "
        "cannot be trusted, naming the file.");
  m.def("mapping_faults", &lorafuse::mapguard::fault_count, "Faults caught in guarded mappings so far.");
  m.def("factored_svd", &factored_svd, py::arg("items"), py::arg("ranks"), py::arg("split") = "B",
        py::arg("threads") = 0, py::arg("mode") = "exact", py::arg("seed") = 0, py::arg("oversample") = 10,
        py::arg("power_iters") = 4,
        "Best rank-k factors of D = B @ A for (name, B, A) items, without forming D when R < min(out, in). "
        "mode 'exact': QR of the factors and SVD of the R x R core (dense SVD when R >= min(out, in)); "
        "mode 'auto': the same unless the cost model finds a randomized SVD through the factors (seeded by seed "
        "and name) much cheaper (see factored_svd_is_exact). Returns (B2, A2, S) per item; S = all min(R, out, "
        "in) singular values (float64) on the exact path, the min(k, R, out, in) computed ones otherwise.");
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
  m.def("dense_svd", &dense_svd, py::arg("items"), py::arg("ranks"), py::arg("split") = "B", py::arg("seed") = 0,
        py::arg("oversample") = 10, py::arg("power_iters") = 4, py::arg("threads") = 0,
        "Best rank-k factors of dense (name, D) items: exact SVD when k + oversample >= min(out, in) / 4, else "
        "randomized (seeded by seed and name); returns (B2, A2, S) per item, S = the min(k, out, in) computed "
        "singular values.");
  m.def("task_merge", &task_merge, py::arg("items"), py::arg("weights"), py::arg("prune") = "none",
        py::arg("density") = 1.0, py::arg("rescale") = false, py::arg("merge") = "sum", py::arg("majority") = "total",
        py::arg("seed") = 0, py::arg("threads") = 0,
        "PEFT merge_utils semantics (prune: none/magnitude/random; merge: sum/ties; majority: total/frequency) "
        "for (name, [tensors]) items with per-item weight lists; returns the merged float32 tensor per item.");
  m.def("extract_svd", &extract_svd, py::arg("items"), py::arg("ranks"), py::arg("oversample") = 10,
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
