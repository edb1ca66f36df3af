// One exception type for the core; the kind selects the Python class it becomes
// (lorafuse.errors.*) when it crosses the binding.
#pragma once
#include <stdexcept>
#include <string>

namespace lorafuse {

// Device: a GPU (CUDA) call failed or the device lacks memory (lorafuse.errors.DeviceError).
enum class ErrorKind { Value, Format, ShapeMismatch, Dtype, NonFinite, InputChanged, Device };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

// Throws Error(kind, "<what> (check `<condition>` failed at <file>:<line>)").
[[noreturn]] inline void check_failed(ErrorKind kind, const std::string& what, const char* condition,
                                      const char* file, int line) {
  const std::string path = file;
  const std::size_t at = path.rfind("cpp/");  // the path inside the source tree
  throw Error(kind, what + " (check `" + condition + "` failed at " + (at == std::string::npos ? path : path.substr(at)) +
                        ":" + std::to_string(line) + ")");
}

}  // namespace lorafuse

// Argument checks at the core's entry points: LORAFUSE_CHECK(k >= 1, ErrorKind::Value, name + ": rank ...").
// The message is built only when the check fails.
#define LORAFUSE_CHECK(condition, kind, what)                                          \
  do {                                                                                 \
    if (!(condition)) ::lorafuse::check_failed((kind), (what), #condition, __FILE__, __LINE__); \
  } while (0)
