#include "lorafuse/parallel.hpp"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace lorafuse {

int resolve_threads(int threads) noexcept {
  if (threads > 0) return threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

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
  if (t == 1) {
    worker(0);
  } else {
    std::vector<std::thread> pool;
    pool.reserve(static_cast<std::size_t>(t - 1));
    for (int k = 1; k < t; ++k) pool.emplace_back(worker, k);
    worker(0);
    for (auto& th : pool) th.join();
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace lorafuse
