// merge.hpp's merge_batch on the GPU (ops.hpp): W' = round(W + stage_1 + ... + stage_n), with
// DoRA norms in float64 (each over W + that stage's own delta, PEFT's), float32 accumulation and one
// rounding, as merge.cpp.
//
// Pieces. A job is cut into row blocks ("pieces") of at most `piece_elems` elements (16 Mi while the
// device has room; fewer when free memory is short), so any weight fits whatever its size (an
// 8192 x 28672 bf16 weight is 15 pieces) and memory per piece is bounded. A job with
// column-normalized DoRA stages needs its column norms over all rows: it is one piece (the whole
// matrix on the GPU, norms computed there) when that fits in half the free memory; otherwise
// ("multi-pass", as merge.cpp does on the CPU) one pass over the row blocks per such stage sums the
// squares of each column (float64) of W + that stage's delta, the scales are formed, and a last pass
// writes the output.
//
// Slots. Two slots (each: a stream, an event, pinned input/output staging, device buffers) take the
// pieces in turn. For piece i on slot s the calling thread waits for piece i-2 (same slot), copies its
// output from pinned memory to the caller's buffer, copies piece i's inputs (base weight rows and the
// factors) into pinned memory, and enqueues on s: one host->device copy, the kernels, the
// device->host copy of the result and of the non-finite flag. So piece i's host copies and upload
// overlap piece i-1's kernels and download. cuBLAS runs on the slot's stream with a workspace of its
// own (two streams must not share one); the handle's stream and pointer mode are restored on exit.
//
// Two paths per piece:
//   fused (only plain low-rank stages, W and the output F32 / BF16 / F16, total rank <= 256): one
//     kernel reads W, adds every rank-1 term of every stage in order with FMAs into registers and
//     rounds into the output: one read and one write of the weight. Same operation order as the
//     CPU core's fused_lowrank.cpp (acc = W; acc = fma(b_k, a_k, acc) for each stage, each k), so
//     the results match the CPU core's FMA builds bit for bit.
//   tile: T = to_f32(W) (in place when W is F32), then per stage T += B A (cuBLAS SGEMM, beta 1),
//     T += (B1 A1) .* (B2 A2) (two GEMMs into scratch over row chunks, then an FMA kernel), the
//     Kronecker kernel, the DoRA scaling; then one rounding kernel (with the non-finite check). A
//     DoRA stage after the first takes its norms over W + its own delta, not over T: before the
//     stages run, T is loaded with W and that stage alone for each such stage (own_norms), and the
//     scales are kept for when the stage comes.
//
// Memory per slot (n = piece elements): pinned in = n * itemsize(W) + factors, pinned out =
// n * itemsize(out); device: the same input bytes, T (4n, not for the fused path, nor for F32 W
// unless a DoRA stage after the first needs W again), the
// output (n * itemsize(out), not for an F32 output on the tile path), Hadamard scratch (2 x 16 MiB),
// column partial sums (64 x cols doubles) and 32 MiB of cuBLAS workspace. The buffers persist
// between calls (grown as needed; the ones grown past 512 MiB by a whole-matrix job are freed at the
// end of the call).
#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "device.hpp"
#include "dtype_kernels.cuh"
#include "lorafuse/errors.hpp"
#include "lorafuse/merge.hpp"
#include "ops.hpp"

namespace lorafuse::cuda {
namespace {

// ================================================================ kernels

constexpr int kThreads = 256;

// ---- fused low-rank merge ----

constexpr int kFusedBM = 64;        // output rows per block
constexpr int kFusedBN = 128;       // output columns per block
constexpr int kFusedKC = 16;        // rank terms staged in shared memory at a time
constexpr int kFusedThreads = 256;  // 16 x 16 threads, 4 rows x 8 columns each
constexpr int kFusedBPad = 4;       // row padding of the B stage (fewer bank conflicts filling it)
constexpr std::int64_t kFusedMaxRank = 256;

// out = round(W + sum_t B_t A_t) for a piece of `rows` x `cols` (row-major), no float32 tile:
//   W: rows x cols of type TW at w; out: rows x cols of type TO.
//   The terms: B_t (rows x r_t, row-major) at bcat + rows * kstart[t] floats, A_t (r_t x cols,
//   row-major) at acat + kstart[t] * cols floats, r_t = kstart[t + 1] - kstart[t], t < nterms.
// Block b computes the 64 x 128 output tile (row tile b / tiles_n, column tile b % tiles_n); thread
// (ty, tx) = (tid / 16, tid % 16) owns rows row0 + 4 ty + i (i < 4) and columns
// col0 + 64 q + 4 tx + e (q < 2, e < 4). Each output starts as float32(W) and takes, for each term
// in order and each k in order, acc = fma(B_t[r, k], A_t[k, c], acc): fused_lowrank.cpp's order.
// Chunks of kFusedKC values of k are staged in shared memory: Bs[kk][m] = B_t[row0 + m, k0 + kk],
// As[kk][n] = A_t[k0 + kk, col0 + n] (zero outside the matrix; k past the rank is never used).
// Finally *bad = 1 when an output is not storable in TO (NaN, Inf, overflow). VEC (cols % 4 == 0):
// the four columns of a group are loaded and stored as one vector (all in range or none).
template <DType TW, DType TO, bool VEC>
__global__ void __launch_bounds__(kFusedThreads)
    fused_lowrank_kernel(const void* __restrict__ w, void* __restrict__ out, std::int64_t rows, std::int64_t cols,
                         const float* __restrict__ bcat, const float* __restrict__ acat,
                         const std::int64_t* __restrict__ kstart, int nterms, float limit, unsigned* __restrict__ bad) {
  __shared__ __align__(16) float Bs[kFusedKC][kFusedBM + kFusedBPad];
  __shared__ __align__(16) float As[kFusedKC][kFusedBN];
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid & 15, ty = tid >> 4;
  const std::int64_t tiles_n = (cols + kFusedBN - 1) / kFusedBN;
  const std::int64_t tile = blockIdx.x;
  const std::int64_t row0 = (tile / tiles_n) * kFusedBM;
  const std::int64_t col0 = (tile % tiles_n) * kFusedBN;

  float acc[4][8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const std::int64_t r = row0 + ty * 4 + i;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const std::int64_t c = col0 + q * 64 + tx * 4;
      if constexpr (VEC) {
        float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (r < rows && c < cols) dev::load4_f32<TW>(w, r * cols + c, x);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][q * 4 + e] = x[e];
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          acc[i][q * 4 + e] = (r < rows && c + e < cols) ? dev::load_f32<TW>(w, r * cols + c + e) : 0.0f;
      }
    }
  }

  for (int t = 0; t < nterms; ++t) {
    const std::int64_t kb = kstart[t];
    const std::int64_t rank = kstart[t + 1] - kb;
    const float* __restrict__ B = bcat + rows * kb;
    const float* __restrict__ A = acat + kb * cols;
    for (std::int64_t k0 = 0; k0 < rank; k0 += kFusedKC) {
      const int kc = static_cast<int>(rank - k0 < kFusedKC ? rank - k0 : kFusedKC);
      __syncthreads();  // the previous chunk has been used by every thread
      for (int e = tid; e < kFusedBM * kFusedKC; e += kFusedThreads) {
        const int m = e / kFusedKC, kk = e % kFusedKC;
        const std::int64_t r = row0 + m;
        Bs[kk][m] = (kk < kc && r < rows) ? B[r * rank + k0 + kk] : 0.0f;
      }
      for (int e = tid; e < kFusedKC * kFusedBN; e += kFusedThreads) {
        const int kk = e / kFusedBN, n = e % kFusedBN;
        const std::int64_t c = col0 + n;
        As[kk][n] = (kk < kc && c < cols) ? A[(k0 + kk) * cols + c] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kFusedKC; ++kk) {
        if (kk >= kc) break;
        const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][ty * 4]);
        const float4 a0 = *reinterpret_cast<const float4*>(&As[kk][tx * 4]);
        const float4 a1 = *reinterpret_cast<const float4*>(&As[kk][64 + tx * 4]);
        const float bv[4] = {b.x, b.y, b.z, b.w};
        const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = __fmaf_rn(bv[i], av[j], acc[i][j]);
      }
    }
  }

  bool ok = true;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const std::int64_t r = row0 + ty * 4 + i;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const std::int64_t c = col0 + q * 64 + tx * 4;
      if constexpr (VEC) {
        if (r < rows && c < cols) {
          float x[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            x[e] = acc[i][q * 4 + e];
            ok &= dev::storable(x[e], limit);
          }
          dev::store4_f32<TO>(out, r * cols + c, x);
        }
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (r < rows && c + e < cols) {
            const float v = acc[i][q * 4 + e];
            ok &= dev::storable(v, limit);
            dev::store_f32<TO>(out, r * cols + c + e, v);
          }
        }
      }
    }
  }
  if (!ok) *bad = 1u;
}

// ---- tile path ----

// T[i] = fma(P1[i], P2[i], T[i]) for i < n: the LoHa stage T += (B1 A1) .* (B2 A2), its two
// products already in P1 and P2 (merge.cpp add_hadamard).
__global__ void hadamard_add_kernel(float* __restrict__ T, const float* __restrict__ P1, const float* __restrict__ P2,
                                    std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    T[i] = __fmaf_rn(P1[i], P2[i], T[i]);
}

// The LoKr stage on a piece: T (nr x cols, row-major) += rows [g0, g0 + nr) of kron(W1, W2), W1
// (a x b), W2 (c x d), b d = cols, g0 = the stage's row_offset + the piece's first row:
//   T(i, j) = fma(W1[(g0 + i) / c, j / d], W2[(g0 + i) % c, j % d], T(i, j))   (merge.cpp add_kron)
// Rows step by gridDim.y from blockIdx.y, columns by the x threads of the grid. cols < 2^31.
__global__ void kron_add_kernel(float* __restrict__ T, std::int64_t nr, std::int64_t cols, const float* __restrict__ W1,
                                const float* __restrict__ W2, std::int64_t b, std::int64_t c, std::int64_t d,
                                std::int64_t g0) {
  const unsigned dd = static_cast<unsigned>(d);
  const unsigned ncols = static_cast<unsigned>(cols);
  const unsigned stride = gridDim.x * blockDim.x;
  for (std::int64_t i = blockIdx.y; i < nr; i += gridDim.y) {
    const std::int64_t g = g0 + i;
    const float* __restrict__ w1 = W1 + (g / c) * b;
    const float* __restrict__ w2 = W2 + (g % c) * d;
    float* __restrict__ t = T + i * cols;
    for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < ncols; j += stride) {
      const unsigned jb = j / dd;
      t[j] = __fmaf_rn(w1[jb], w2[j - jb * dd], t[j]);
    }
  }
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in
// thread 0. Every thread of the block must call it.
__device__ double block_sum(double v) {
  __shared__ double warp_sums[32];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, off);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x >> 5) ? warp_sums[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, off);
  }
  return v;
}

// DoRA by rows for the first stage (merge.cpp apply_magnitude, where T = W + that stage's delta): row r
// of T (nr x cols, row-major, block r) is multiplied by s = float(double(mag[r]) / ||T[r, :]||_2), the
// norm summed in float64 (a zero norm gives Inf or NaN, as on the CPU).
__global__ void row_scale_kernel(float* __restrict__ T, std::int64_t cols, const float* __restrict__ mag) {
  __shared__ float scale;
  float* __restrict__ t = T + static_cast<std::int64_t>(blockIdx.x) * cols;
  double s = 0.0;
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const double v = t[j];
    s += v * v;  // exact square of a float32: an FMA changes nothing
  }
  s = block_sum(s);
  if (threadIdx.x == 0) scale = __double2float_rn(static_cast<double>(mag[blockIdx.x]) / sqrt(s));
  __syncthreads();
  const float f = scale;
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) t[j] = __fmul_rn(t[j], f);
}

// DoRA by rows for a stage after the first (merge.cpp scale_rows over own_tile): scale[r] =
// float(double(mag[r]) / ||N[r, :]||_2) for N (nr x cols) = W + that stage's own delta (PEFT's norm),
// found before the stages run; row_apply_kernel multiplies row r of T by it afterwards.
__global__ void row_norm_kernel(const float* __restrict__ N, std::int64_t cols, const float* __restrict__ mag,
                                float* __restrict__ scale) {
  const float* __restrict__ t = N + static_cast<std::int64_t>(blockIdx.x) * cols;
  double s = 0.0;
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const double v = t[j];
    s += v * v;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) scale[blockIdx.x] = __double2float_rn(static_cast<double>(mag[blockIdx.x]) / sqrt(s));
}

__global__ void row_apply_kernel(float* __restrict__ T, std::int64_t cols, const float* __restrict__ scale) {
  float* __restrict__ t = T + static_cast<std::int64_t>(blockIdx.x) * cols;
  const float f = scale[blockIdx.x];
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) t[j] = __fmul_rn(t[j], f);
}

// Column sums of squares, first step: partial[g * cols + j] = sum over the rows i of group g, i in
// [g nr / groups, (g + 1) nr / groups), of double(T[i, j])^2. Thread j of the grid's x, group
// blockIdx.y.
__global__ void colsq_partial_kernel(const float* __restrict__ T, std::int64_t nr, std::int64_t cols, int groups,
                                     double* __restrict__ partial) {
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  const std::int64_t g = blockIdx.y;
  const std::int64_t i0 = g * nr / groups, i1 = (g + 1) * nr / groups;
  double s = 0.0;
  for (std::int64_t i = i0; i < i1; ++i) {
    const double v = T[i * cols + j];
    s += v * v;
  }
  partial[g * cols + j] = s;
}

// Second step: colsq[j] = (accumulate ? colsq[j] : 0) + partial[0][j] + ... + partial[groups-1][j],
// in that order (deterministic: the same sums for any launch).
__global__ void colsq_reduce_kernel(const double* __restrict__ partial, int groups, std::int64_t cols,
                                    double* __restrict__ colsq, bool accumulate) {
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  double s = accumulate ? colsq[j] : 0.0;
  for (int g = 0; g < groups; ++g) s += partial[static_cast<std::int64_t>(g) * cols + j];
  colsq[j] = s;
}

// DoRA by columns: scale[j] = float(double(mag[j]) / sqrt(colsq[j])) (merge.cpp column_norm_passes).
__global__ void col_scale_kernel(const float* __restrict__ mag, const double* __restrict__ colsq, std::int64_t cols,
                                 float* __restrict__ scale) {
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < cols) scale[j] = __double2float_rn(static_cast<double>(mag[j]) / sqrt(colsq[j]));
}

// T[i, j] *= scale[j] for T nr x cols (row-major); rows by blockIdx.y (grid-stride), columns by x.
__global__ void col_apply_kernel(float* __restrict__ T, std::int64_t nr, std::int64_t cols,
                                 const float* __restrict__ scale) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = blockIdx.y; i < nr; i += gridDim.y) {
    float* __restrict__ t = T + i * cols;
    for (std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cols; j += stride)
      t[j] = __fmul_rn(t[j], scale[j]);
  }
}

// ================================================================ host side

constexpr std::size_t kAlign = 256;                               // offsets inside the staging buffers
constexpr std::int64_t kPieceElemsMax = std::int64_t{16} << 20;   // elements per piece, at most
constexpr std::int64_t kPieceElemsMin = std::int64_t{1} << 20;
constexpr std::int64_t kHadamardElems = std::int64_t{4} << 20;    // LoHa products: rows chunked to this
constexpr int kColumnGroups = 64;                                 // row groups of the column sums
constexpr std::size_t kBlasWorkspace = std::size_t{32} << 20;     // cuBLAS workspace per slot
constexpr std::size_t kKeepBytes = std::size_t{512} << 20;        // larger buffers are freed after a call

std::size_t align_up(std::size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
std::size_t f32_bytes(std::int64_t n) { return static_cast<std::size_t>(n) * sizeof(float); }
unsigned blocks_for(std::int64_t n, std::int64_t per_block = kThreads) {
  return static_cast<unsigned>(std::max<std::int64_t>(1, (n + per_block - 1) / per_block));
}
void check_launch(const std::string& what) { LORAFUSE_CUDA_CHECK(cudaGetLastError(), what); }

// What to do with a slot's result once its event has passed.
struct Pending {
  bool active = false;
  std::string what;                 // the job's name, for errors
  void* out = nullptr;              // pin_out[0, out_bytes) -> out
  std::size_t out_bytes = 0;
  bool* nonfinite = nullptr;        // set when the flag at pin_out + flag_off is nonzero
  std::size_t flag_off = 0;
  std::vector<float*> scale_dst;    // column_scale of each column-normalized stage (whole-matrix piece)
  std::size_t scales_off = 0;       // their values at pin_out + scales_off, cols floats each
  std::int64_t cols = 0;
};

struct Slot {
  Stream stream;
  Event done;
  PinnedMemory pin_in, pin_out;
  DeviceMemory dev_in;   // the piece's base weight rows, then its factors (the pinned layout)
  DeviceMemory tile;     // float32 T (tile path, W not F32)
  DeviceMemory dev_out;  // the rounded output (fused path, or tile path with a non-F32 output)
  DeviceMemory p1, p2;   // LoHa products
  DeviceMemory partial, colsq, scales;  // column norms of a whole-matrix piece
  DeviceMemory rowscales;  // row scales of the row-normalized DoRA stages after the first (own norms)
  DeviceMemory flag;     // the non-finite flag
  DeviceMemory blas;     // cuBLAS workspace of this slot's stream
  Pending pending;
};

struct Workspace {
  std::array<Slot, 2> slot;
  DeviceMemory shared_colsq, shared_scales;  // multi-pass column norms (every slot adds into them)
  Event chain;                               // orders the column-sum additions of a pass across slots

  std::size_t device_bytes() const {
    std::size_t b = shared_colsq.bytes() + shared_scales.bytes();
    for (const Slot& s : slot)
      b += s.dev_in.bytes() + s.tile.bytes() + s.dev_out.bytes() + s.p1.bytes() + s.p2.bytes() + s.partial.bytes() +
           s.colsq.bytes() + s.scales.bytes() + s.rowscales.bytes() + s.flag.bytes() + s.blas.bytes();
    return b;
  }
  // Frees the buffers a whole-matrix job grew past kKeepBytes (the others are kept for the next call).
  void trim() {
    const auto trim_device = [](DeviceMemory& m) {
      if (m.bytes() > kKeepBytes) m = DeviceMemory();
    };
    const auto trim_pinned = [](PinnedMemory& m) {
      if (m.bytes() > kKeepBytes) m = PinnedMemory();
    };
    for (Slot& s : slot) {
      trim_pinned(s.pin_in);
      trim_pinned(s.pin_out);
      for (DeviceMemory* m : {&s.dev_in, &s.tile, &s.dev_out, &s.partial, &s.colsq, &s.scales, &s.rowscales})
        trim_device(*m);
    }
    trim_device(shared_colsq);
    trim_device(shared_scales);
  }
};

// One workspace per device, created on first use and kept (like the Contexts) until the process
// ends; used under the device's Context mutex.
Workspace& workspace(int device) {
  struct Holder {
    std::mutex mutex;
    std::map<int, std::unique_ptr<Workspace>> map;
    ~Holder() {
      for (auto& e : map) static_cast<void>(e.second.release());  // left to the driver at exit
    }
  };
  static Holder holder;
  const std::lock_guard<std::mutex> lock(holder.mutex);
  auto it = holder.map.find(device);
  if (it == holder.map.end()) it = holder.map.emplace(device, std::make_unique<Workspace>()).first;
  return *it->second;
}

// The Context's cuBLAS handle bound to a slot's stream and workspace; the handle's stream (and with
// it the default workspace) and pointer mode are restored when the batch ends, errors included.
class BlasGuard {
 public:
  explicit BlasGuard(cublasHandle_t h) : h_(h) {
    LORAFUSE_CUBLAS_CHECK(cublasGetStream(h_, &stream_), "merge_batch: reading the cuBLAS stream");
    LORAFUSE_CUBLAS_CHECK(cublasGetPointerMode(h_, &mode_), "merge_batch: reading the cuBLAS pointer mode");
    LORAFUSE_CUBLAS_CHECK(cublasSetPointerMode(h_, CUBLAS_POINTER_MODE_HOST), "merge_batch: setting up cuBLAS");
  }
  ~BlasGuard() {
    cublasSetStream(h_, stream_);  // also puts the handle back on its default workspace
    cublasSetPointerMode(h_, mode_);
  }
  BlasGuard(const BlasGuard&) = delete;
  BlasGuard& operator=(const BlasGuard&) = delete;
  // Before each GEMM: the handle on this slot's stream and workspace (a no-op when it already is).
  void bind(Slot& s, const std::string& what) {
    if (bound_ == &s) return;
    bound_ = nullptr;
    s.blas.reserve(kBlasWorkspace, what + ": cuBLAS workspace");
    LORAFUSE_CUBLAS_CHECK(cublasSetStream(h_, s.stream.get()), what + ": binding cuBLAS to a stream");
    LORAFUSE_CUBLAS_CHECK(cublasSetWorkspace(h_, s.blas.get(), s.blas.bytes()), what + ": binding cuBLAS to a stream");
    bound_ = &s;
  }
  cublasHandle_t get() const noexcept { return h_; }

 private:
  cublasHandle_t h_;
  cudaStream_t stream_ = nullptr;
  const Slot* bound_ = nullptr;
  cublasPointerMode_t mode_ = CUBLAS_POINTER_MODE_HOST;
};

// Hands out the slots in turn, finishing (waiting for, then copying out) a slot's previous piece
// before it is reused. On the way out of an exception it waits for both streams so no copy is in
// flight into or out of the buffers when the next call reuses them.
class Pipeline {
 public:
  Pipeline(Workspace& ws, int threads) : ws_(ws), threads_(threads) {}
  ~Pipeline() {
    if (closed_) return;
    for (Slot& s : ws_.slot) {
      cudaStreamSynchronize(s.stream.get());
      s.pending = Pending{};
    }
    cudaGetLastError();
  }
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  Slot& next() {
    Slot& s = ws_.slot[next_];
    next_ ^= 1;
    finish(s);
    return s;
  }
  // Finishes both slots, the older piece first.
  void drain() {
    finish(ws_.slot[next_]);
    finish(ws_.slot[next_ ^ 1]);
  }
  void close() {
    drain();
    closed_ = true;
  }
  int threads() const noexcept { return threads_; }

 private:
  void finish(Slot& s) {
    if (!s.pending.active) return;
    s.done.synchronize(s.pending.what + ": waiting for the GPU");
    const Pending p = std::move(s.pending);
    s.pending = Pending{};
    const auto* pin = static_cast<const unsigned char*>(s.pin_out.get());
    if (p.out_bytes > 0) parallel_copy(p.out, pin, p.out_bytes, threads_);
    if (p.nonfinite != nullptr) {
      unsigned flag = 0;
      std::memcpy(&flag, pin + p.flag_off, sizeof flag);
      if (flag != 0) *p.nonfinite = true;
    }
    for (std::size_t k = 0; k < p.scale_dst.size(); ++k)
      std::memcpy(p.scale_dst[k], pin + p.scales_off + k * f32_bytes(p.cols), f32_bytes(p.cols));
  }

  Workspace& ws_;
  int threads_;
  int next_ = 0;
  bool closed_ = false;
};

// ---- planning ----

struct Budget {
  std::int64_t piece_elems = kPieceElemsMax;  // elements per row-block piece
  std::size_t whole_bytes = 0;                // device bytes a whole-matrix piece may take
};

Budget make_budget(const Workspace& ws) {
  std::size_t free_b = 0, total_b = 0;
  LORAFUSE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b), "merge_batch: reading the free GPU memory");
  const std::size_t avail = free_b + ws.device_bytes();
  Budget b;
  // Two slots of at most ~16 bytes per element each, within an eighth of what is there.
  b.piece_elems = std::clamp<std::int64_t>(static_cast<std::int64_t>(avail / 256), kPieceElemsMin, kPieceElemsMax);
  b.whole_bytes = avail / 2;
  return b;
}

struct Plan {
  bool fused = false;        // the fused low-rank kernel (no float32 tile)
  bool multipass = false;    // column norms over row blocks (the matrix does not fit at once)
  std::int64_t step = 0;     // rows per piece
  std::vector<int> col_index;  // per stage: its index among the column-normalized DoRA stages, or -1
  int ncol = 0;
  // DoRA stages after the first take their norms over W + their own delta (PEFT), not over the tile:
  std::vector<int> row_own;  // per stage: its index among such row-normalized stages, or -1
  int nrow_own = 0;
  bool col_own = false;      // a column-normalized one, normalized within a whole-matrix piece
  // Whether a piece first computes those norms (before the stages run on the tile).
  bool prepass() const { return nrow_own > 0 || col_own; }
};

bool fusable(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

Plan make_plan(const MergeJob& job, const Budget& budget) {
  Plan p;
  p.col_index.assign(job.stages.size(), -1);
  p.row_own.assign(job.stages.size(), -1);
  bool plain = true, col_after_first = false;
  std::int64_t total_rank = 0;
  for (std::size_t k = 0; k < job.stages.size(); ++k) {
    const MergeStage& st = job.stages[k];
    if (st.kind != StageKind::LowRank || st.magnitude != nullptr) plain = false;
    if (st.kind == StageKind::LowRank) total_rank += st.rank;
    if (st.magnitude != nullptr && st.column_norm) p.col_index[k] = p.ncol++;
    if (st.magnitude != nullptr && k > 0) {
      if (st.column_norm)
        col_after_first = true;
      else
        p.row_own[k] = p.nrow_own++;
    }
  }
  p.fused = plain && fusable(job.w_type) && fusable(job.out_type) && total_rank <= kFusedMaxRank;
  p.step = std::min(job.rows, std::max<std::int64_t>(1, budget.piece_elems / job.cols));
  if (p.ncol > 0) {
    // An F32 W is the tile itself, unless a prepass needs it again (then the tile is a copy).
    const bool f32_copy = p.nrow_own > 0 || col_after_first;
    const std::size_t per_elem = itemsize(job.w_type) + (job.w_type == DType::F32 && !f32_copy ? 0 : 4) +
                                 (job.out_type == DType::F32 ? 0 : itemsize(job.out_type));
    const double need = static_cast<double>(job.rows) * static_cast<double>(job.cols) * static_cast<double>(per_elem) +
                        static_cast<double>(job.cols) * (8.0 * (kColumnGroups + 1) + 4.0 * p.ncol);
    if (job.rows <= INT_MAX && need <= static_cast<double>(budget.whole_bytes))
      p.step = job.rows;
    else
      p.multipass = true;
  }
  p.col_own = col_after_first && !p.multipass;  // multi-pass: the column-sum passes take W + own delta
  return p;
}

// Where a piece's operands sit in the staging buffer (byte offsets; the same in pin_in and dev_in).
struct Operands {
  std::size_t B = 0, A = 0, B2 = 0, A2 = 0, W1 = 0, W2 = 0, mag = 0;
};

struct Layout {
  struct Copy {
    const void* src;
    std::size_t off, bytes;
  };
  std::vector<Copy> copies;         // host -> pinned
  std::vector<Operands> ops;        // per stage
  std::vector<std::int64_t> kstart; // fused: prefix sums of the stage ranks (copied from here)
  std::size_t bcat = 0, acat = 0, kstart_off = 0, total = 0;
};

// The staging layout of rows [r0, r0 + nr) of a job: the base weight rows at 0; then the operands
// cut by rows (B, B2 slices, row magnitudes), back to back in stage order, at `bcat`; then the
// whole operands (A, A2, W1, W2, column magnitudes), back to back in stage order, at `acat`; then
// (fused) the rank prefix sums. For a fused job the first group is exactly the B_t one after
// another (B_t at bcat + nr * kstart[t] floats) and the second the A_t (at acat + kstart[t] * cols).
Layout make_layout(const MergeJob& job, const Plan& plan, std::int64_t r0, std::int64_t nr) {
  Layout L;
  const std::int64_t cols = job.cols;
  std::size_t off = 0;
  const auto put = [&](const void* src, std::size_t bytes) {
    const std::size_t at = off;
    if (bytes > 0) L.copies.push_back({src, at, bytes});
    off += bytes;
    return at;
  };
  const std::size_t wsz = itemsize(job.w_type);
  put(static_cast<const unsigned char*>(job.w) + static_cast<std::size_t>(r0 * cols) * wsz,
      static_cast<std::size_t>(nr * cols) * wsz);
  off = align_up(off);
  L.ops.resize(job.stages.size());
  L.bcat = off;
  for (std::size_t k = 0; k < job.stages.size(); ++k) {
    const MergeStage& st = job.stages[k];
    Operands& o = L.ops[k];
    if (st.kind == StageKind::LowRank || st.kind == StageKind::Hadamard)
      o.B = put(st.B + r0 * st.rank, f32_bytes(nr * st.rank));
    if (st.kind == StageKind::Hadamard) o.B2 = put(st.B2 + r0 * st.rank2, f32_bytes(nr * st.rank2));
    if (st.magnitude != nullptr && !st.column_norm) o.mag = put(st.magnitude + r0, f32_bytes(nr));
  }
  off = align_up(off);
  L.acat = off;
  for (std::size_t k = 0; k < job.stages.size(); ++k) {
    const MergeStage& st = job.stages[k];
    Operands& o = L.ops[k];
    if (st.kind == StageKind::LowRank || st.kind == StageKind::Hadamard) o.A = put(st.A, f32_bytes(st.rank * cols));
    if (st.kind == StageKind::Hadamard) o.A2 = put(st.A2, f32_bytes(st.rank2 * cols));
    if (st.kind == StageKind::Kron) {
      o.W1 = put(st.W1, f32_bytes(st.a * st.b));
      o.W2 = put(st.W2, f32_bytes(st.c * st.d));
    }
    if (st.magnitude != nullptr && st.column_norm) o.mag = put(st.magnitude, f32_bytes(cols));
  }
  off = align_up(off);
  if (plan.fused) {
    L.kstart.assign(1, 0);
    for (const MergeStage& st : job.stages) L.kstart.push_back(L.kstart.back() + st.rank);
    L.kstart_off = put(L.kstart.data(), L.kstart.size() * sizeof(std::int64_t));
    off = align_up(off);
  }
  L.total = off;
  return L;
}

// ---- the work of one piece ----

template <DType TW, DType TO>
void launch_fused_typed(const void* w, void* out, std::int64_t nr, std::int64_t cols, const float* bcat,
                        const float* acat, const std::int64_t* kstart, int nterms, unsigned* flag, cudaStream_t st) {
  const std::int64_t tiles = ((nr + kFusedBM - 1) / kFusedBM) * ((cols + kFusedBN - 1) / kFusedBN);
  const float limit = overflow_threshold(TO);
  if (cols % 4 == 0)
    fused_lowrank_kernel<TW, TO, true><<<static_cast<unsigned>(tiles), kFusedThreads, 0, st>>>(
        w, out, nr, cols, bcat, acat, kstart, nterms, limit, flag);
  else
    fused_lowrank_kernel<TW, TO, false><<<static_cast<unsigned>(tiles), kFusedThreads, 0, st>>>(
        w, out, nr, cols, bcat, acat, kstart, nterms, limit, flag);
}

template <DType TW>
void launch_fused_out(DType to, const void* w, void* out, std::int64_t nr, std::int64_t cols, const float* bcat,
                      const float* acat, const std::int64_t* kstart, int nterms, unsigned* flag, cudaStream_t st) {
  switch (to) {
    case DType::F32: launch_fused_typed<TW, DType::F32>(w, out, nr, cols, bcat, acat, kstart, nterms, flag, st); break;
    case DType::BF16: launch_fused_typed<TW, DType::BF16>(w, out, nr, cols, bcat, acat, kstart, nterms, flag, st); break;
    case DType::F16: launch_fused_typed<TW, DType::F16>(w, out, nr, cols, bcat, acat, kstart, nterms, flag, st); break;
    default: break;  // not reached: make_plan checked the types
  }
}

void launch_fused(DType tw, DType to, const void* w, void* out, std::int64_t nr, std::int64_t cols, const float* bcat,
                  const float* acat, const std::int64_t* kstart, int nterms, unsigned* flag, cudaStream_t st) {
  switch (tw) {
    case DType::F32: launch_fused_out<DType::F32>(to, w, out, nr, cols, bcat, acat, kstart, nterms, flag, st); break;
    case DType::BF16: launch_fused_out<DType::BF16>(to, w, out, nr, cols, bcat, acat, kstart, nterms, flag, st); break;
    case DType::F16: launch_fused_out<DType::F16>(to, w, out, nr, cols, bcat, acat, kstart, nterms, flag, st); break;
    default: break;  // not reached
  }
}

// C (nr x cols, row-major) = B (nr x rank) A (rank x cols) + beta C, float32. Row-major matrices are
// the transposes of column-major ones: C^T (cols x nr, ld cols) = A^T (cols x rank, ld cols)
// B^T (rank x nr, ld rank) + beta C^T.
void gemm(cublasHandle_t h, const float* B, const float* A, float* C, std::int64_t nr, std::int64_t cols,
          std::int64_t rank, float beta, const std::string& what) {
  const float one = 1.0f;
  LORAFUSE_CUBLAS_CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(cols), static_cast<int>(nr),
                                    static_cast<int>(rank), &one, A, static_cast<int>(cols), B, static_cast<int>(rank),
                                    &beta, C, static_cast<int>(cols)),
                        what);
}

// Column sums of squares of T (nr x cols) in float64 into colsq (= or +=), deterministic. With
// `chain`, the addition into colsq waits for the previous piece's (on whichever stream) and is the
// one the next waits for.
void column_sums(Slot& s, const float* T, std::int64_t nr, std::int64_t cols, double* colsq, bool accumulate,
                 Event* chain, const std::string& name) {
  const cudaStream_t st = s.stream.get();
  const int groups = static_cast<int>(std::min<std::int64_t>(kColumnGroups, nr));
  s.partial.reserve(static_cast<std::size_t>(groups) * static_cast<std::size_t>(cols) * sizeof(double),
                    name + ": DoRA column sums");
  auto* partial = static_cast<double*>(s.partial.get());
  colsq_partial_kernel<<<dim3(blocks_for(cols), static_cast<unsigned>(groups)), kThreads, 0, st>>>(T, nr, cols, groups,
                                                                                                   partial);
  check_launch(name + ": DoRA column norms");
  if (chain != nullptr)
    LORAFUSE_CUDA_CHECK(cudaStreamWaitEvent(st, chain->get(), 0), name + ": ordering the DoRA column sums");
  colsq_reduce_kernel<<<blocks_for(cols), kThreads, 0, st>>>(partial, groups, cols, colsq, accumulate);
  check_launch(name + ": DoRA column norms");
  if (chain != nullptr) chain->record(st, name + ": ordering the DoRA column sums");
}

// T += (B1 A1) .* (B2 A2) over row chunks of at most kHadamardElems elements.
void add_hadamard(Slot& s, BlasGuard& blas, const MergeStage& sg, const float* B1, const float* A1, const float* B2,
                  const float* A2, float* T, std::int64_t nr, std::int64_t cols, const std::string& what) {
  const cudaStream_t st = s.stream.get();
  const std::int64_t hr = std::clamp<std::int64_t>(kHadamardElems / cols, 1, nr);
  s.p1.reserve(f32_bytes(hr * cols), what + ": LoHa products");
  s.p2.reserve(f32_bytes(hr * cols), what + ": LoHa products");
  auto* P1 = static_cast<float*>(s.p1.get());
  auto* P2 = static_cast<float*>(s.p2.get());
  if (sg.rank > 0 || sg.rank2 > 0) blas.bind(s, what);
  for (std::int64_t h0 = 0; h0 < nr; h0 += hr) {
    const std::int64_t m = std::min(hr, nr - h0);
    if (sg.rank > 0)
      gemm(blas.get(), B1 + h0 * sg.rank, A1, P1, m, cols, sg.rank, 0.0f, what);
    else
      LORAFUSE_CUDA_CHECK(cudaMemsetAsync(P1, 0, f32_bytes(m * cols), st), what);
    if (sg.rank2 > 0)
      gemm(blas.get(), B2 + h0 * sg.rank2, A2, P2, m, cols, sg.rank2, 0.0f, what);
    else
      LORAFUSE_CUDA_CHECK(cudaMemsetAsync(P2, 0, f32_bytes(m * cols), st), what);
    hadamard_add_kernel<<<elementwise_blocks(m * cols), kThreads, 0, st>>>(T + h0 * cols, P1, P2, m * cols);
    check_launch(what);
  }
}

// T += the delta of stage k (rows [r0, r0 + nr) of it).
void add_stage(Slot& s, BlasGuard& blas, const MergeStage& sg, const Operands& o, const unsigned char* din, float* T,
               std::int64_t r0, std::int64_t nr, std::int64_t cols, const std::string& what) {
  const auto fac = [&](std::size_t off) { return reinterpret_cast<const float*>(din + off); };
  switch (sg.kind) {
    case StageKind::LowRank:
      if (sg.rank > 0) {
        blas.bind(s, what);
        gemm(blas.get(), fac(o.B), fac(o.A), T, nr, cols, sg.rank, 1.0f, what + " (low-rank product)");
      }
      break;
    case StageKind::Hadamard:
      add_hadamard(s, blas, sg, fac(o.B), fac(o.A), fac(o.B2), fac(o.A2), T, nr, cols, what + " (LoHa)");
      break;
    case StageKind::Kron: {
      const dim3 grid(static_cast<unsigned>(std::min<std::int64_t>(blocks_for(cols), 1024)),
                      static_cast<unsigned>(std::min<std::int64_t>(nr, 65535)));
      kron_add_kernel<<<grid, kThreads, 0, s.stream.get()>>>(T, nr, cols, fac(o.W1), fac(o.W2), sg.b, sg.c, sg.d,
                                                             sg.row_offset + r0);
      check_launch(what + " (LoKr)");
      break;
    }
  }
}

// The norms of the DoRA stages after the first (plan.row_own, plan.col_own), each over W + that
// stage's own delta (merge.cpp own_tile): T is loaded with W and takes one stage at a time; the
// row scales go to s.rowscales, the column scales (whole-matrix piece) to s.scales.
void own_norms(Slot& s, BlasGuard& blas, const MergeJob& job, const Plan& plan, const Layout& L,
               const unsigned char* din, float* T, std::int64_t r0, std::int64_t nr) {
  const cudaStream_t st = s.stream.get();
  const std::int64_t cols = job.cols;
  const auto fac = [&](std::size_t off) { return reinterpret_cast<const float*>(din + off); };
  for (std::size_t k = 1; k < job.stages.size(); ++k) {
    const MergeStage& sg = job.stages[k];
    const bool row = plan.row_own[k] >= 0, col = plan.col_own && plan.col_index[k] >= 0;
    if (!row && !col) continue;
    const std::string what = job.name + ": stage " + std::to_string(k + 1) + " (DoRA norms of W + its own delta)";
    launch_to_f32(din, job.w_type, T, nr * cols, st, what);
    add_stage(s, blas, sg, L.ops[k], din, T, r0, nr, cols, what);
    if (row) {
      float* scale = static_cast<float*>(s.rowscales.get()) + plan.row_own[k] * nr;
      row_norm_kernel<<<static_cast<unsigned>(nr), kThreads, 0, st>>>(T, cols, fac(L.ops[k].mag), scale);
      check_launch(what);
      continue;
    }
    auto* colsq = static_cast<double*>(s.colsq.get());
    column_sums(s, T, nr, cols, colsq, false, nullptr, what);
    col_scale_kernel<<<blocks_for(cols), kThreads, 0, st>>>(fac(L.ops[k].mag), colsq, cols,
                                                            static_cast<float*>(s.scales.get()) +
                                                                plan.col_index[k] * cols);
    check_launch(what);
  }
}

// The tile path of a piece (see the top of the file). Returns the device buffer holding the rounded
// output (T itself for an F32 output), or nullptr for a column-sum pass (pass = the stage index: the
// squares of W + that stage's own delta, PEFT's norm, whatever the stages before it).
const void* run_tile(Slot& s, BlasGuard& blas, Workspace& ws, const MergeJob& job, const Plan& plan, const Layout& L,
                     unsigned char* din, std::int64_t r0, std::int64_t nr, int pass, unsigned* flag) {
  const std::string& name = job.name;
  const cudaStream_t st = s.stream.get();
  const std::int64_t cols = job.cols, n = nr * cols;
  const bool prepass = pass < 0 && plan.prepass();
  float* T;
  if (job.w_type == DType::F32 && !prepass) {
    T = reinterpret_cast<float*>(din);  // in place: the staged rows are not needed afterwards
  } else {
    s.tile.reserve(f32_bytes(n), name + ": float32 tile");
    T = static_cast<float*>(s.tile.get());
  }
  const auto fac = [&](std::size_t off) { return reinterpret_cast<const float*>(din + off); };
  if (pass >= 0) {  // a column-sum pass: add this piece's squares of W + stage `pass` alone, write nothing
    const std::string what = name + ": stage " + std::to_string(pass + 1);
    launch_to_f32(din, job.w_type, T, n, st, name + ": decoding the base weight");
    add_stage(s, blas, job.stages[static_cast<std::size_t>(pass)], L.ops[static_cast<std::size_t>(pass)], din, T, r0,
              nr, cols, what);
    column_sums(s, T, nr, cols, static_cast<double*>(ws.shared_colsq.get()), true, &ws.chain, what);
    return nullptr;
  }
  const bool inline_cols = plan.ncol > 0 && !plan.multipass;
  if (inline_cols) {
    s.colsq.reserve(static_cast<std::size_t>(cols) * sizeof(double), name + ": DoRA column norms");
    s.scales.reserve(f32_bytes(plan.ncol * cols), name + ": DoRA column norms");
  }
  if (plan.nrow_own > 0) s.rowscales.reserve(f32_bytes(plan.nrow_own * nr), name + ": DoRA row norms");
  if (prepass) own_norms(s, blas, job, plan, L, din, T, r0, nr);
  launch_to_f32(din, job.w_type, T, n, st, name + ": decoding the base weight");
  for (std::size_t k = 0; k < job.stages.size(); ++k) {
    const MergeStage& sg = job.stages[k];
    const Operands& o = L.ops[k];
    const std::string what = name + ": stage " + std::to_string(k + 1);
    add_stage(s, blas, sg, o, din, T, r0, nr, cols, what);
    if (sg.magnitude == nullptr) continue;
    if (!sg.column_norm) {
      if (k == 0) {  // T is W + this stage's delta: its own norms
        row_scale_kernel<<<static_cast<unsigned>(nr), kThreads, 0, st>>>(T, cols, fac(o.mag));
      } else {
        row_apply_kernel<<<static_cast<unsigned>(nr), kThreads, 0, st>>>(
            T, cols, static_cast<const float*>(s.rowscales.get()) + plan.row_own[k] * nr);
      }
      check_launch(what + " (DoRA row norms)");
      continue;
    }
    const std::int64_t ci = plan.col_index[k];
    float* scale;
    if (plan.multipass) {
      scale = static_cast<float*>(ws.shared_scales.get()) + ci * cols;
    } else {
      scale = static_cast<float*>(s.scales.get()) + ci * cols;
      if (k == 0) {  // T is W + this stage's delta: its own norms (later stages': own_norms)
        auto* colsq = static_cast<double*>(s.colsq.get());
        column_sums(s, T, nr, cols, colsq, false, nullptr, what);
        col_scale_kernel<<<blocks_for(cols), kThreads, 0, st>>>(fac(o.mag), colsq, cols, scale);
        check_launch(what + " (DoRA column norms)");
      }
    }
    const dim3 grid(static_cast<unsigned>(std::min<std::int64_t>(blocks_for(cols), 1024)),
                    static_cast<unsigned>(std::min<std::int64_t>(nr, 65535)));
    col_apply_kernel<<<grid, kThreads, 0, st>>>(T, nr, cols, scale);
    check_launch(what + " (DoRA column scaling)");
  }
  if (job.out_type == DType::F32) {
    launch_check_storable(T, DType::F32, n, flag, st, name + ": checking the result");
    return T;
  }
  s.dev_out.reserve(static_cast<std::size_t>(n) * itemsize(job.out_type), name + ": output on the GPU");
  launch_from_f32(T, job.out_type, s.dev_out.get(), n, flag, st, name + ": rounding the result");
  return s.dev_out.get();
}

// Rows [r0, r0 + nr) of a job through the next slot: stage the inputs, upload, compute, download.
// pass < 0: the output pass; pass = k: the column-sum pass of the column-normalized stage k.
void run_piece(Pipeline& pipe, BlasGuard& blas, Workspace& ws, MergeJob& job, const Plan& plan, std::int64_t r0,
               std::int64_t nr, int pass) {
  Slot& s = pipe.next();
  const std::string& name = job.name;
  const std::int64_t cols = job.cols, n = nr * cols;
  const cudaStream_t st = s.stream.get();
  const Layout L = make_layout(job, plan, r0, nr);
  s.pin_in.reserve(L.total, name + ": pinned staging buffer");
  s.dev_in.reserve(L.total, name + ": base weight and factors on the GPU");
  auto* pin = static_cast<unsigned char*>(s.pin_in.get());
  for (const Layout::Copy& c : L.copies) parallel_copy(pin + c.off, c.src, c.bytes, pipe.threads());
  auto* din = static_cast<unsigned char*>(s.dev_in.get());
  LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(din, pin, L.total, cudaMemcpyHostToDevice, st), name + ": copy to the GPU");

  const bool output = pass < 0;
  const std::size_t out_bytes = output ? static_cast<std::size_t>(n) * itemsize(job.out_type) : 0;
  const std::size_t flag_off = align_up(out_bytes);
  const std::size_t scales_off = flag_off + kAlign;
  const bool inline_cols = output && plan.ncol > 0 && !plan.multipass;
  const std::size_t scale_bytes = inline_cols ? f32_bytes(plan.ncol * cols) : 0;
  unsigned* flag = nullptr;
  if (output) {
    s.pin_out.reserve(scales_off + scale_bytes, name + ": pinned staging buffer");
    s.flag.reserve(kAlign, name + ": flag");
    flag = static_cast<unsigned*>(s.flag.get());
    LORAFUSE_CUDA_CHECK(cudaMemsetAsync(flag, 0, sizeof(unsigned), st), name + ": clearing the flag");
  }

  const void* result;
  if (plan.fused) {
    s.dev_out.reserve(out_bytes, name + ": output on the GPU");
    launch_fused(job.w_type, job.out_type, din, s.dev_out.get(), nr, cols, reinterpret_cast<const float*>(din + L.bcat),
                 reinterpret_cast<const float*>(din + L.acat), reinterpret_cast<const std::int64_t*>(din + L.kstart_off),
                 static_cast<int>(job.stages.size()), flag, st);
    check_launch(name + ": fused low-rank merge");
    result = s.dev_out.get();
  } else {
    result = run_tile(s, blas, ws, job, plan, L, din, r0, nr, pass, flag);
  }

  auto* pout = static_cast<unsigned char*>(s.pin_out.get());
  if (output) {
    LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(pout, result, out_bytes, cudaMemcpyDeviceToHost, st),
                        name + ": copy back from the GPU");
    LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(pout + flag_off, flag, sizeof(unsigned), cudaMemcpyDeviceToHost, st),
                        name + ": copy back from the GPU");
    if (inline_cols)
      LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(pout + scales_off, s.scales.get(), scale_bytes, cudaMemcpyDeviceToHost, st),
                          name + ": copy back from the GPU");
  }
  s.done.record(st, name + ": copy back from the GPU");

  Pending& p = s.pending;
  p.what = name;
  if (output) {
    const std::size_t osz = itemsize(job.out_type);
    p.out = static_cast<unsigned char*>(job.out) + static_cast<std::size_t>(r0 * cols) * osz;
    p.out_bytes = out_bytes;
    p.nonfinite = &job.nonfinite;
    p.flag_off = flag_off;
    p.scales_off = scales_off;
    p.cols = cols;
    if (inline_cols)
      for (std::size_t k = 0; k < job.stages.size(); ++k)
        if (plan.col_index[k] >= 0) p.scale_dst.push_back(job.stages[k].column_scale.data());
  }
  p.active = true;
}

// A job with column-normalized DoRA stages that does not fit on the GPU at once (merge.cpp
// column_norm_passes): per such stage, one pass over the row blocks sums the squares of every column
// of W + that stage's own delta (float64, in block order), then scale = magnitude / sqrt(sum) (on the
// host, into stage.column_scale, then to the GPU); a last pass writes the output.
void run_multipass(Pipeline& pipe, BlasGuard& blas, Workspace& ws, MergeJob& job, const Plan& plan) {
  const std::string& name = job.name;
  const std::int64_t cols = job.cols;
  pipe.drain();  // the shared column buffers are free
  ws.shared_colsq.reserve(static_cast<std::size_t>(cols) * sizeof(double), name + ": DoRA column norms");
  ws.shared_scales.reserve(f32_bytes(plan.ncol * cols), name + ": DoRA column norms");
  Slot& s0 = ws.slot[0];
  const cudaStream_t st0 = s0.stream.get();
  std::vector<double> colsq(static_cast<std::size_t>(cols));
  for (std::size_t k = 0; k < job.stages.size(); ++k) {
    if (plan.col_index[k] < 0) continue;
    LORAFUSE_CUDA_CHECK(cudaMemsetAsync(ws.shared_colsq.get(), 0, colsq.size() * sizeof(double), st0),
                        name + ": DoRA column norms");
    ws.chain.record(st0, name + ": DoRA column norms");
    for (std::int64_t r0 = 0; r0 < job.rows; r0 += plan.step)
      run_piece(pipe, blas, ws, job, plan, r0, std::min(plan.step, job.rows - r0), static_cast<int>(k));
    pipe.drain();
    LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(colsq.data(), ws.shared_colsq.get(), colsq.size() * sizeof(double),
                                        cudaMemcpyDeviceToHost, st0),
                        name + ": DoRA column norms");
    s0.stream.synchronize(name + ": DoRA column norms");
    MergeStage& sg = job.stages[k];
    for (std::size_t j = 0; j < colsq.size(); ++j)
      sg.column_scale[j] = static_cast<float>(sg.magnitude[j] / std::sqrt(colsq[j]));
    float* dst = static_cast<float*>(ws.shared_scales.get()) + plan.col_index[k] * cols;
    LORAFUSE_CUDA_CHECK(cudaMemcpyAsync(dst, sg.column_scale.data(), f32_bytes(cols), cudaMemcpyHostToDevice, st0),
                        name + ": DoRA column norms");
    s0.stream.synchronize(name + ": DoRA column norms");
  }
  for (std::int64_t r0 = 0; r0 < job.rows; r0 += plan.step)
    run_piece(pipe, blas, ws, job, plan, r0, std::min(plan.step, job.rows - r0), -1);
}

}  // namespace

void merge_batch(std::vector<MergeJob>& jobs, int threads) {
  // The CPU core's checks and words (merge.cpp merge_batch), then this backend's limits.
  for (MergeJob& job : jobs) {
    job.nonfinite = false;
    LORAFUSE_CHECK(job.rows >= 0 && job.cols >= 0 &&
                       (job.rows * job.cols == 0 || (job.w != nullptr && job.out != nullptr)),
                   ErrorKind::ShapeMismatch, job.name + ": bad shape or missing buffers");
    LORAFUSE_CHECK(writable(job.out_type), ErrorKind::Dtype,
                   job.name + ": cannot write output dtype " + dtype_name(job.out_type));
    bool fits = job.cols <= INT_MAX;
    for (const MergeStage& st : job.stages) fits = fits && st.rank <= INT_MAX && st.rank2 <= INT_MAX;
    if (!fits)
      throw Error(ErrorKind::Device, job.name + ": a weight of " + std::to_string(job.cols) +
                                         " columns or a rank above 2^31 - 1 is beyond the CUDA backend (use --device cpu)");
  }
  // column_scale as merge.cpp leaves it; a job without rows has only magnitude / sqrt(0) to give.
  bool work = false;
  for (MergeJob& job : jobs) {
    for (MergeStage& st : job.stages) {
      if (st.magnitude == nullptr || !st.column_norm) continue;
      st.column_scale.assign(static_cast<std::size_t>(job.cols), 0.0f);
      if (job.rows == 0)
        for (std::size_t j = 0; j < st.column_scale.size(); ++j)
          st.column_scale[j] = static_cast<float>(st.magnitude[j] / std::sqrt(0.0));
    }
    work = work || (job.rows > 0 && job.cols > 0);
  }
  if (!work) return;

  Context& ctx = Context::get();
  const std::lock_guard<std::mutex> lock(ctx.mutex());
  Workspace& ws = workspace(ctx.device());
  const Budget budget = make_budget(ws);
  BlasGuard blas(ctx.blas());
  Pipeline pipe(ws, threads);
  for (MergeJob& job : jobs) {
    if (job.rows == 0 || job.cols == 0) continue;
    const Plan plan = make_plan(job, budget);
    if (plan.multipass) {
      run_multipass(pipe, blas, ws, job, plan);
      continue;
    }
    for (std::int64_t r0 = 0; r0 < job.rows; r0 += plan.step)
      run_piece(pipe, blas, ws, job, plan, r0, std::min(plan.step, job.rows - r0), -1);
  }
  pipe.close();
  ws.trim();
}

}  // namespace lorafuse::cuda
