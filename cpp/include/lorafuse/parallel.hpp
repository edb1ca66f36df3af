// A tiny fork-join helper: run fn(i) for i in [0, n) on `threads` std::threads
// that pull indices from a shared counter. The first exception is rethrown.
#pragma once
#include <cstdint>
#include <functional>

namespace lorafuse {

int resolve_threads(int threads) noexcept;  // <= 0 means all hardware threads
void parallel_for(std::int64_t n, int threads, const std::function<void(std::int64_t, int)>& fn);

}  // namespace lorafuse
