#include "lorafuse/mapguard.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <mutex>
#include <string>
#include <vector>

#include "lorafuse/errors.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define LORAFUSE_MAPGUARD 1
#else
#define LORAFUSE_MAPGUARD 0
#endif

namespace lorafuse::mapguard {

namespace {

constexpr int kSlots = 65536;

// What the signal handler reads: lock-free atomics in static storage (zero-initialized,
// no constructor runs), written under g_mutex by register / unregister.
struct Slot {
  std::atomic<std::uintptr_t> begin{0};
  std::atomic<std::uintptr_t> end{0};    // page-aligned; 0 when the slot is free
  std::atomic<std::uintptr_t> fault{0};  // 1 + the address of the first fault; 0: none
};
Slot g_slots[kSlots];
std::atomic<int> g_high{0};  // slots [0, g_high) have been used
std::atomic<std::uint64_t> g_faults{0};
std::uintptr_t g_page = 4096;

// What only ordinary code reads (the signal handler never touches it). Deliberately leaked,
// not a function-local static: Python may unregister mappings while the process exits
// (finalizers, daemon threads), after static destructors would have run, and a destroyed
// mutex or vector there is undefined behaviour. One allocation per process, never freed.
struct Meta {
  std::string label, path;
  std::uint64_t dev = 0, ino = 0;
  std::int64_t size = 0, mtime_ns = 0;
  std::uintptr_t begin = 0;
  bool used = false;
};
struct Registry {
  std::mutex mutex;
  std::vector<Meta> meta;
  std::vector<int> free;
};
Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

#if LORAFUSE_MAPGUARD
struct sigaction g_previous;       // the handler found when ours was installed
volatile sig_atomic_t g_chained = 0;  // a fault was passed on once: the next one takes the default action

void take_default(int sig, const siginfo_t* info) {
  struct sigaction dfl{};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(sig, &dfl, nullptr);
  // A fault recurs when the faulting instruction is retried; a signal sent with kill()
  // must be sent again (it stays pending until this handler returns).
  if (info == nullptr || info->si_code <= 0) raise(sig);
}

// A fault outside lorafuse's mappings: what would have happened without this handler.
void chain(int sig, siginfo_t* info, void* context) {
  const struct sigaction prev = g_previous;
  if (!g_chained) {
    // Once only: a handler such as faulthandler's restores its predecessor and raises the
    // signal again, which must not bring it back here in a loop.
    g_chained = 1;
    if (prev.sa_flags & SA_SIGINFO) {
      if (prev.sa_sigaction != nullptr) {
        prev.sa_sigaction(sig, info, context);
        return;
      }
    } else if (prev.sa_handler == SIG_IGN) {
      if (info != nullptr && info->si_code <= 0) return;  // an ignored kill -BUS stays ignored
    } else if (prev.sa_handler != SIG_DFL) {
      prev.sa_handler(sig);
      return;
    }
  }
  take_default(sig, info);
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  if (info != nullptr && info->si_code > 0) {  // a fault, not a signal sent by a process
    const auto addr = reinterpret_cast<std::uintptr_t>(info->si_addr);
    const int high = g_high.load(std::memory_order_acquire);
    for (int i = 0; i < high; ++i) {
      Slot& s = g_slots[i];
      const std::uintptr_t b = s.begin.load(std::memory_order_acquire);
      const std::uintptr_t e = s.end.load(std::memory_order_acquire);
      if (b == 0 || addr < b || addr >= e) continue;
      // Zero pages from the faulting page to the end of the mapping: one fault per
      // mapping, and every view of it stays valid (the same addresses, now readable).
      const std::uintptr_t page = addr & ~(g_page - 1);
      void* r = mmap(reinterpret_cast<void*>(page), e - page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
                     0);
      if (r == MAP_FAILED) break;
      std::uintptr_t none = 0;
      s.fault.compare_exchange_strong(none, addr + 1);
      g_faults.fetch_add(1);
      errno = saved_errno;
      return;
    }
  }
  errno = saved_errno;
  chain(sig, info, context);
}

bool install_locked() noexcept {
  struct sigaction current{};
  if (sigaction(SIGBUS, nullptr, &current) != 0) return false;
  if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == &on_sigbus) return true;
  const long page = sysconf(_SC_PAGESIZE);
  if (page > 0) g_page = static_cast<std::uintptr_t>(page);
  g_previous = current;
  g_chained = 0;
  struct sigaction act{};
  act.sa_sigaction = &on_sigbus;
  // SA_ONSTACK: on the thread's alternate stack where it has one (Python's main thread
  // under faulthandler); worker threads have none and run it on their own stack.
  act.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  sigemptyset(&act.sa_mask);
  return sigaction(SIGBUS, &act, nullptr) == 0;
}
#endif

// The size and modification time of the file at m.path when it is still the file that was
// mapped (same device and inode); false otherwise (removed, or replaced by rename).
bool same_file_now(const Meta& m, std::int64_t* size, std::int64_t* mtime_ns) {
#if LORAFUSE_MAPGUARD
  struct stat st{};
  if (stat(m.path.c_str(), &st) != 0) return false;
  if (static_cast<std::uint64_t>(st.st_dev) != m.dev || static_cast<std::uint64_t>(st.st_ino) != m.ino) return false;
  *size = static_cast<std::int64_t>(st.st_size);
#if defined(__APPLE__)
  *mtime_ns = static_cast<std::int64_t>(st.st_mtimespec.tv_sec) * 1000000000 + st.st_mtimespec.tv_nsec;
#else
  *mtime_ns = static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
#endif
  return true;
#else
  (void)m;
  (void)size;
  (void)mtime_ns;
  return false;
#endif
}

}  // namespace

bool install() noexcept {
#if LORAFUSE_MAPGUARD
  std::lock_guard<std::mutex> lock(registry().mutex);
  return install_locked();
#else
  return false;
#endif
}

int register_range(const void* begin, std::size_t size, const std::string& label, const std::string& path,
                   std::uint64_t dev, std::uint64_t ino, std::int64_t file_size, std::int64_t mtime_ns) {
  LORAFUSE_CHECK(begin != nullptr && size > 0, ErrorKind::Value, label + ": an empty mapping cannot be registered");
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
#if LORAFUSE_MAPGUARD
  install_locked();  // again, in case something (faulthandler.enable()) replaced it since
#endif
  const auto b = reinterpret_cast<std::uintptr_t>(begin);
  const std::uintptr_t e = (b + size + g_page - 1) & ~(g_page - 1);
  int slot;
  if (!reg.free.empty()) {
    slot = reg.free.back();
    reg.free.pop_back();
  } else {
    slot = g_high.load(std::memory_order_relaxed);
    if (slot >= kSlots) return -1;
    reg.meta.emplace_back();
  }
  reg.meta[static_cast<std::size_t>(slot)] = Meta{label, path, dev, ino, file_size, mtime_ns, b, true};
  Slot& s = g_slots[slot];
  s.end.store(0, std::memory_order_release);
  s.fault.store(0, std::memory_order_release);
  s.begin.store(b, std::memory_order_release);
  s.end.store(e, std::memory_order_release);
  if (slot >= g_high.load(std::memory_order_relaxed)) g_high.store(slot + 1, std::memory_order_release);
  return slot;
}

void unregister(int slot) noexcept {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  if (slot < 0 || static_cast<std::size_t>(slot) >= reg.meta.size() || !reg.meta[static_cast<std::size_t>(slot)].used)
    return;
  Slot& s = g_slots[slot];
  s.end.store(0, std::memory_order_release);
  s.begin.store(0, std::memory_order_release);
  reg.meta[static_cast<std::size_t>(slot)] = Meta{};
  try {
    reg.free.push_back(slot);
  } catch (...) {  // no memory to recycle the slot: it stays unused
  }
}

std::uint64_t fault_count() noexcept { return g_faults.load(std::memory_order_acquire); }

int faulted_overlap(const void* begin, std::size_t size) noexcept {
  if (fault_count() == 0 || begin == nullptr) return -1;
  const auto b = reinterpret_cast<std::uintptr_t>(begin);
  const std::uintptr_t e = b + std::max<std::size_t>(size, 1);
  const int high = g_high.load(std::memory_order_acquire);
  for (int i = 0; i < high; ++i) {
    const Slot& s = g_slots[i];
    if (s.fault.load(std::memory_order_acquire) == 0) continue;
    const std::uintptr_t sb = s.begin.load(std::memory_order_acquire), se = s.end.load(std::memory_order_acquire);
    if (sb != 0 && b < se && sb < e) return i;
  }
  return -1;
}

std::string problem(int slot) {
  Registry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  if (slot < 0 || static_cast<std::size_t>(slot) >= reg.meta.size() || !reg.meta[static_cast<std::size_t>(slot)].used)
    return "";
  const Meta& m = reg.meta[static_cast<std::size_t>(slot)];
  const std::uintptr_t fault = g_slots[slot].fault.load(std::memory_order_acquire);
  std::int64_t size_now = m.size, mtime_now = m.mtime_ns;
  const bool changed = same_file_now(m, &size_now, &mtime_now) && (size_now != m.size || mtime_now != m.mtime_ns);
  if (fault == 0 && !changed) return "";
  std::string msg = m.label;
  if (changed) {
    msg += " changed or was truncated while lorafuse was reading it (was " + std::to_string(m.size) + " bytes, now " +
           std::to_string(size_now) + (size_now == m.size ? ", rewritten in place" : "") + ")";
  } else {
    msg += " could not be read at byte " + std::to_string(fault - 1 - m.begin) +
           " while lorafuse was reading it (an I/O error, or the file changed; it has " + std::to_string(m.size) +
           " bytes)";
  }
  return msg + "; nothing was written. Run again once the file is complete and nothing else writes to it";
}

}  // namespace lorafuse::mapguard
