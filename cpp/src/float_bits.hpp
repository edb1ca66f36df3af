// Internal to the core: the bits of a float32 and back, without aliasing tricks.
#pragma once
#include <cstdint>
#include <cstring>

namespace lorafuse::detail {

inline std::uint32_t bits_of(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float float_of(std::uint32_t u) noexcept {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace lorafuse::detail
