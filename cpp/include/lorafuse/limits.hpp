// Bounds on the numbers a caller may pass to the core. Arguments beyond them are refused
// (Error(Value)) before anything is allocated or started: no binding call can allocate
// from an unchecked number or start an unchecked number of threads. The Python layer
// (lorafuse._validate, the CLI) checks the same bounds, read from lorafuse._core.
#pragma once
#include <cstdint>

namespace lorafuse {

// threads arguments: 0 (all hardware threads) .. kMaxThreads. resolve_threads runs at
// most kThreadsPerCore workers per hardware thread whatever is asked (more only cost
// memory and never speed anything up).
constexpr int kMaxThreads = 1024;
constexpr int kThreadsPerCore = 4;
// Ranks (and the randomized SVD's oversampling): 1 .. 2^20, far above the smaller
// dimension of any real weight (output buffers are (out + in) x rank).
constexpr std::int64_t kMaxRank = std::int64_t{1} << 20;
constexpr std::int64_t kMaxOversample = std::int64_t{1} << 20;
// Power iterations of the randomized SVD: 0 .. 100 (each is a full pass over the matrix;
// beyond a handful nothing changes).
constexpr std::int64_t kMaxPowerIters = 100;

}  // namespace lorafuse
