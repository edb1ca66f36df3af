// Reads of memory-mapped input files that survive the file shrinking underneath them.
//
// A file mapped with mmap that is truncated (or rewritten in place, or hits an I/O error)
// while it is read raises SIGBUS at the first access past its new end, in whichever
// thread reads it: numpy in Python or a kernel on a worker thread. The process would die.
// Instead lorafuse registers the address range of every mapping it makes, and a
// process-wide SIGBUS handler, for a fault inside a registered range, maps anonymous
// zero pages over the rest of that range (mmap MAP_FIXED, a plain system call), records
// the fault in a lock-free table and returns, so the read goes on with zeros. The
// mapping and every view of it stay valid. Callers then check the table (problem(),
// faulted_overlap()) before any result can be used or committed, and refuse it with
// Error(InputChanged) naming the file: zero-filled pages never reach an output.
// Faults outside registered ranges go to the handler that was installed before (Python's
// faulthandler, say) or to the default action, as if this handler were not there.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace lorafuse::mapguard {

// Installs the handler (again, if something replaced it since); false where the
// platform has no SIGBUS or sigaction failed. Called by register_range too.
bool install() noexcept;

// Registers [begin, begin + size) (rounded out to pages) as a mapping of the file named
// `label` in messages, found at the absolute path `path`, which was the file (st_dev, st_ino)
// = (dev, ino) with `file_size` bytes and modification time `mtime_ns` when it was validated.
// Returns a slot, or -1 when the table is full (65536 live mappings: more than Linux lets a
// process map by default).
int register_range(const void* begin, std::size_t size, const std::string& label, const std::string& path,
                   std::uint64_t dev, std::uint64_t ino, std::int64_t file_size, std::int64_t mtime_ns);
void unregister(int slot) noexcept;

// Faults caught in registered ranges since the process started (0: nothing to check).
std::uint64_t fault_count() noexcept;

// A slot whose range overlaps [begin, begin + size) and has faulted, or -1.
int faulted_overlap(const void* begin, std::size_t size) noexcept;

// What went wrong with the file of `slot`: empty when its range has not faulted and the
// file still has the size and modification time it had when registered (a file replaced by
// rename is another file: the mapping still holds the old one, whole); otherwise a
// message naming the file ("... changed or was truncated while lorafuse was reading it
// (was N bytes, now M); nothing was written").
std::string problem(int slot);

}  // namespace lorafuse::mapguard
