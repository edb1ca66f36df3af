// Counter-based random numbers: every value is a pure function of (key, counter),
// so a stream can be evaluated in any order, on any thread, and gives the same
// bits. Keys are built from a user seed, a hash of a module name and indices.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>

namespace lorafuse {

// The SplitMix64 output function (Steele, Lea, Flood 2014): a bijection of 64-bit words
// with full avalanche.
inline std::uint64_t mix64(std::uint64_t x) noexcept {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A key derived from a parent key and one more word (seed, name hash, index, domain).
inline std::uint64_t derive_key(std::uint64_t key, std::uint64_t word) noexcept { return mix64(key ^ mix64(word)); }

// 64-bit FNV-1a of the UTF-8 bytes of a name: the same on every platform and run
// (std::hash is neither).
inline std::uint64_t name_hash(const std::string& s) noexcept {
  std::uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001B3ull;
  }
  return h;
}

// 64 random bits at position `counter` of the stream `key`.
inline std::uint64_t counter_bits(std::uint64_t key, std::uint64_t counter) noexcept {
  return mix64(key ^ mix64(counter));
}

// Uniform in [0, 1) with 53 random bits.
inline double uniform01(std::uint64_t bits) noexcept { return static_cast<double>(bits >> 11) * 0x1.0p-53; }

// Gaussian numbers: the one sketch stream of the range finder (cpp/src/range_finder.cpp,
// gaussian_sketch), Box-Muller pairs on these bits.

}  // namespace lorafuse
