// One exception type for the core; the kind selects the Python class it becomes
// (lorafuse.errors.*) when it crosses the binding.
#pragma once
#include <stdexcept>
#include <string>

namespace lorafuse {

enum class ErrorKind { Value, Format, ShapeMismatch, Dtype, NonFinite };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace lorafuse
