#include "lorafuse/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "lorafuse/limits.hpp"

namespace lorafuse {

namespace {

std::atomic<std::uint64_t> g_start_failures{0};

}  // namespace

int hardware_threads() noexcept {
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(std::min<unsigned>(hw, kMaxThreads));
}

int resolve_threads(int threads) noexcept {
  const int hw = hardware_threads();
  if (threads <= 0) return hw;
  return std::min({threads, kThreadsPerCore * hw, kMaxThreads});
}

std::uint64_t thread_start_failures() noexcept { return g_start_failures.load(); }

void parallel_for(std::int64_t n, int threads, const std::function<void(std::int64_t, int)>& fn) {
  if (n <= 0) return;
  const int t = static_cast<int>(std::min<std::int64_t>(resolve_threads(threads), n));
  std::atomic<std::int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&](int tid) {
    for (;;) {
      const std::int64_t i = next.fetch_add(1);
      if (i >= n || failed.load()) return;
      try {
        fn(i, tid);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed.store(true);
        return;
      }
    }
  };
  std::vector<std::thread> pool;
  if (t > 1) {
    try {
      pool.reserve(static_cast<std::size_t>(t - 1));
      for (int k = 1; k < t; ++k) pool.emplace_back(worker, k);
    } catch (const std::exception&) {
      // std::system_error (EAGAIN: a process / thread limit, no memory for a stack) or
      // std::bad_alloc: carry on with the threads that started; the counter hands every
      // index to one of them.
      g_start_failures.fetch_add(static_cast<std::uint64_t>(t - 1) - pool.size());
    }
  }
  worker(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace lorafuse
