// A tiny fork-join helper: run fn(i) for i in [0, n) on `threads` std::threads
// that pull indices from a shared counter. The first exception is rethrown.
//
// Threads that cannot be started (std::system_error from std::thread: EAGAIN under a
// process or thread limit, or no memory for a stack) are not an error: the work is
// shared among the threads that did start, the calling thread included, so every
// index still runs exactly once and results are those of any other thread count.
#pragma once
#include <cstdint>
#include <functional>

namespace lorafuse {

// The number of workers for a `threads` argument: <= 0 means all hardware threads;
// otherwise min(threads, kThreadsPerCore * hardware threads, kMaxThreads) (limits.hpp).
int resolve_threads(int threads) noexcept;
int hardware_threads() noexcept;
void parallel_for(std::int64_t n, int threads, const std::function<void(std::int64_t, int)>& fn);
// How many thread starts failed (and were absorbed) in this process so far.
std::uint64_t thread_start_failures() noexcept;

}  // namespace lorafuse
