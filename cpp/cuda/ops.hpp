// The CUDA backend's operations: the CPU core's entry points (lorafuse/merge.hpp, svd.hpp,
// extract.hpp, lowrank.hpp, dtype.hpp) on one GPU. Every function takes the same checked jobs the
// CPU core takes (built by its make_*_job / make_*_stage entry points, so the checks are the same
// code), reads its inputs from host memory, writes its outputs to host memory and returns when they
// are there. The results follow the CPU core's conventions (svd.hpp: singular values descending,
// signs, split, zero padding; merge.hpp: one rounding to the output type, the non-finite flag).
//
// Where the work runs:
//   - dtype conversion, the fused merge (low-rank, LoHa, LoKr stages and DoRA norms, float32
//     accumulation, one rounding) and the factored norms: on the GPU.
//   - the randomized range finder (cpp/src/range_finder.hpp) keeps its float64 QR and small SVD on
//     the host and takes every product with the operator (dense, factor lists, the difference of two
//     checkpoints) on the GPU: "the GPU implements only the products" (DESIGN.md section 8).
//   - the exact factored path: QR of the factors through cuSOLVER, the R x R core's SVD on the host.
// `threads` is the host threads the host-side parts may use (0: all).
//
// Errors: Error(Device) for any CUDA failure (out of memory names the bytes); the input checks and
// the non-finite errors are those of the CPU core, raised with the same messages.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "lorafuse/dtype.hpp"
#include "lorafuse/extract.hpp"
#include "lorafuse/lowrank.hpp"
#include "lorafuse/merge.hpp"
#include "lorafuse/svd.hpp"
#include "lorafuse/tensor.hpp"

namespace lorafuse::cuda {

// How many CUDA devices the driver reports; 0 (never an error) when there is no driver or device.
int device_count() noexcept;
// "" when device 0 can be used, else why not (no driver, no device, a driver too old for this build).
std::string unavailable_reason();
// "NVIDIA H200 (sm_90, 139 GiB)" for device `device`.
std::string device_description(int device);

// raw (n elements of `dt`) -> float32, on the GPU. Non-finite values pass through (the CPU core's
// convert_to_f32 semantics); F8 E4M3 / E5M2 decoded like dtype.cpp.
void to_float32(const void* raw, DType dt, float* out, std::int64_t n);
// float32 -> F32 / F16 / BF16, round to nearest even, on the GPU (dtype.cpp's convert_from_f32).
void from_float32(const float* x, DType dt, void* out, std::int64_t n);

// merge.hpp's merge_batch on the GPU: each job's base weight is copied in (through pinned
// buffers, two jobs in flight so copy-in, compute and copy-out overlap), converted to float32,
// every stage added in order (DoRA norms in float64, over W + that stage's own delta), rounded
// once to out_type and copied out; job.nonfinite is set as the CPU sets it.
void merge_batch(std::vector<MergeJob>& jobs, int threads);

// lowrank.hpp's batches: ||B A||_F^2 and <B1 A1, B2 A2>_F from the factors (Gram matrices on the
// GPU, summed in float64).
void factored_frobenius_sq_batch(const std::vector<FactorPairView>& pairs, double* out, int threads);
void factored_inner_batch(const std::vector<FactorInnerView>& items, double* out, int threads);

// svd.hpp's batches (jobs built by make_factored_job / make_factored_list_job / make_dense_job,
// `exact` set by the caller for factored jobs as on the CPU).
void factored_svd_batch(std::vector<SvdJob>& jobs, SvdSplit split, const RandomizedSvdOptions& opt, int threads);
void dense_svd_batch(std::vector<SvdJob>& jobs, SvdSplit split, const RandomizedSvdOptions& opt, int threads);

// extract.hpp's batch: D = W_ft - W_base formed tile by tile on the GPU (never on the host).
void extract_svd_batch(std::vector<ExtractJob>& jobs, const ExtractOptions& opt, int threads);

}  // namespace lorafuse::cuda
