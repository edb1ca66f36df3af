// lorafuse._core: thin pybind11 bindings. Every argument is checked here (types,
// contiguity, shapes) before any pointer reaches the kernels, and the GIL is
// released around all numeric work. lorafuse::Error becomes lorafuse.errors.*.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

#include "lorafuse/dtype.hpp"
#include "lorafuse/errors.hpp"
#include "lorafuse/lowrank.hpp"
#include "lorafuse/merge.hpp"
#include "lorafuse/parallel.hpp"

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

py::array to_float32(const py::array& raw, const std::string& dtype, int threads) {
  const DType dt = lorafuse::dtype_from_name(dtype);
  require_raw(raw, dt, "to_float32 input");
  std::vector<py::ssize_t> shape(raw.shape(), raw.shape() + raw.ndim());
  py::array_t<float> out(shape);
  const auto* src = static_cast<const unsigned char*>(raw.data());
  float* dst = out.mutable_data();
  const std::size_t n = static_cast<std::size_t>(raw.size()), isz = lorafuse::itemsize(dt);
  {
    py::gil_scoped_release release;
    chunked(n, threads, [&](std::size_t lo, std::size_t len) { lorafuse::to_f32(src + lo * isz, dt, dst + lo, len); });
  }
  return out;
}

py::array from_float32(const py::handle& x_handle, const std::string& dtype, int threads) {
  const DType dt = lorafuse::dtype_from_name(dtype);
  if (!lorafuse::writable(dt)) fail(ErrorKind::Dtype, "cannot write dtype " + dtype + " (lorafuse writes F32, F16 and BF16)");
  auto x = require_f32(x_handle, "from_float32 input");
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  py::array out(raw_numpy_dtype(dt), shape);
  const float* src = x.data();
  auto* dst = static_cast<unsigned char*>(out.mutable_data());
  const std::size_t n = static_cast<std::size_t>(x.size()), isz = lorafuse::itemsize(dt);
  {
    py::gil_scoped_release release;
    chunked(n, threads, [&](std::size_t lo, std::size_t len) { lorafuse::from_f32(src + lo, dst + lo * isz, dt, len); });
  }
  return out;
}

// jobs: list of (name, w, w_dtype, out, out_dtype, stages);
// stages: list of (B, A, magnitude|None, column_norm: bool).
// Returns, per job, whether the output holds a NaN or an Inf.
std::vector<bool> merge_batch(const py::list& jobs_in, int threads) {
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
    for (const py::handle& s : py::cast<py::list>(t[5])) {
      auto st = py::cast<py::tuple>(s);
      if (st.size() != 4) fail(ErrorKind::Value, job.name + ": a stage must be (B, A, magnitude|None, column_norm)");
      lorafuse::MergeStage stage;
      auto B = require_f32(st[0], job.name + ": B");
      auto A = require_f32(st[1], job.name + ": A");
      if (B.ndim() != 2 || A.ndim() != 2 || B.shape(0) != job.rows || A.shape(1) != job.cols ||
          B.shape(1) != A.shape(0))
        fail(ErrorKind::ShapeMismatch, job.name + ": factors B " + shape_str(B) + " and A " + shape_str(A) +
                                           " do not fit the base weight " + shape_str(w));
      stage.B = B.data();
      stage.A = A.data();
      stage.rank = A.shape(0);
      keep_alive.push_back(B);
      keep_alive.push_back(A);
      if (!st[2].is_none()) {
        stage.column_norm = py::cast<bool>(st[3]);
        auto m = require_f32(st[2], job.name + ": DoRA magnitude");
        if (m.ndim() != 1 || m.shape(0) != (stage.column_norm ? job.cols : job.rows))
          fail(ErrorKind::ShapeMismatch, job.name + ": DoRA magnitude " + shape_str(m) + " does not fit the base weight " +
                                             shape_str(w));
        stage.magnitude = m.data();
        keep_alive.push_back(m);
      }
      job.stages.push_back(stage);
    }
    jobs.push_back(std::move(job));
  }
  {
    py::gil_scoped_release release;
    lorafuse::merge_batch(jobs, threads);
  }
  std::vector<bool> nonfinite;
  nonfinite.reserve(jobs.size());
  for (const auto& j : jobs) nonfinite.push_back(j.nonfinite);
  return nonfinite;
}

// pairs: list of (B, A) float32; returns ||B A||_F^2 for each, in float64.
py::array_t<double> factored_frobenius_sq(const py::list& pairs, int threads) {
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
  {
    py::gil_scoped_release release;
    lorafuse::parallel_for(static_cast<std::int64_t>(items.size()), threads, [&](std::int64_t i, int) {
      const Pair& p = items[static_cast<std::size_t>(i)];
      res[i] = lorafuse::factored_frobenius_sq(p.B, p.A, p.out, p.r, p.in);
    });
  }
  return out;
}

const char* error_class(ErrorKind k) {
  switch (k) {
    case ErrorKind::Format: return "FormatError";
    case ErrorKind::ShapeMismatch: return "ShapeMismatchError";
    case ErrorKind::Dtype: return "DtypeError";
    case ErrorKind::NonFinite: return "NonFiniteError";
    case ErrorKind::Value: break;
  }
  return "LorafuseValueError";
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "lorafuse compiled core: dtype conversion, fused merge, factored norms";
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
  m.def("hardware_threads", []() { return lorafuse::resolve_threads(0); });
}
