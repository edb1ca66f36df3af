#include "lorafuse/merge.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <vector>

#include "lorafuse/errors.hpp"
#include "lorafuse/fused_lowrank.hpp"
#include "lorafuse/parallel.hpp"

namespace lorafuse {
namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Rows per tile: a tile of about 256 KiB of float32 stays in L2 next to A.
std::int64_t tile_rows(std::int64_t cols) {
  const std::int64_t target = (256 * 1024 / 4) / std::max<std::int64_t>(cols, 1);
  return std::clamp<std::int64_t>(target, 4, 256);
}

// Per-thread buffers: the float32 tile, for Hadamard stages its two factor products, and the tile
// of W plus one DoRA stage's own delta (the norms of a DoRA stage that is not the first stage).
struct Scratch {
  std::vector<float> tile, p1, p2, own;
};

// tile += B[r0:r0+nr] @ A.
void add_lowrank(const MergeStage& st, std::int64_t r0, Eigen::Map<RowMat>& T) {
  if (st.rank == 0) return;
  Eigen::Map<const RowMat> B(st.B + r0 * st.rank, T.rows(), st.rank);
  Eigen::Map<const RowMat> A(st.A, st.rank, T.cols());
  T.noalias() += B * A;
}

// buf = B[r0:r0+nr] @ A, a tile-sized product (zero when the rank is zero).
Eigen::Map<RowMat> tile_product(const float* B, const float* A, std::int64_t rank, std::int64_t r0,
                                std::int64_t nr, std::int64_t cols, std::vector<float>& buf) {
  buf.resize(static_cast<std::size_t>(nr * cols));
  Eigen::Map<RowMat> P(buf.data(), nr, cols);
  if (rank == 0) {
    P.setZero();
  } else {
    Eigen::Map<const RowMat> Bm(B + r0 * rank, nr, rank);
    Eigen::Map<const RowMat> Am(A, rank, cols);
    P.noalias() = Bm * Am;
  }
  return P;
}

// tile += (B1 A1)[r0:r0+nr] * (B2 A2)[r0:r0+nr], elementwise.
void add_hadamard(const MergeStage& st, std::int64_t r0, Eigen::Map<RowMat>& T, Scratch& s) {
  const std::int64_t nr = T.rows(), cols = T.cols();
  const Eigen::Map<RowMat> P1 = tile_product(st.B, st.A, st.rank, r0, nr, cols, s.p1);
  const Eigen::Map<RowMat> P2 = tile_product(st.B2, st.A2, st.rank2, r0, nr, cols, s.p2);
  T.array() += P1.array() * P2.array();
}

// One row of a Kronecker product: out[jb * d + k] += w1[jb] * w2[k].
void kron_row(float* __restrict out, const float* __restrict w1, const float* __restrict w2, std::int64_t b,
              std::int64_t d) {
  if (d == 1) {
    const float s = w2[0];
    for (std::int64_t j = 0; j < b; ++j) out[j] += w1[j] * s;
    return;
  }
  for (std::int64_t jb = 0; jb < b; ++jb) {
    const float s = w1[jb];
    float* __restrict o = out + jb * d;
    for (std::int64_t k = 0; k < d; ++k) o[k] += s * w2[k];
  }
}

// tile row i += kron(W1, W2) row (r0 + row_offset + i).
void add_kron(const MergeStage& st, std::int64_t r0, Eigen::Map<RowMat>& T) {
  if (T.cols() == 0) return;
  for (std::int64_t i = 0; i < T.rows(); ++i) {
    const std::int64_t g = st.row_offset + r0 + i;
    kron_row(T.data() + i * T.cols(), st.W1 + (g / st.c) * st.b, st.W2 + (g % st.c) * st.d, st.b, st.d);
  }
}

void add_stage(const MergeStage& st, std::int64_t r0, Eigen::Map<RowMat>& T, Scratch& s) {
  switch (st.kind) {
    case StageKind::LowRank: add_lowrank(st, r0, T); break;
    case StageKind::Hadamard: add_hadamard(st, r0, T, s); break;
    case StageKind::Kron: add_kron(st, r0, T); break;
  }
}

// Rows [r0, r0 + nr) of the base weight as float32 into `buf`.
Eigen::Map<RowMat> base_tile(const MergeJob& job, std::int64_t r0, std::int64_t nr, std::vector<float>& buf) {
  const std::size_t n = static_cast<std::size_t>(nr * job.cols);
  buf.resize(n);
  const std::size_t at = static_cast<std::size_t>(r0 * job.cols) * itemsize(job.w_type);
  to_f32(static_cast<const unsigned char*>(job.w) + at, job.w_type, buf.data(), n);
  return Eigen::Map<RowMat>(buf.data(), nr, job.cols);
}

// Rows [r0, r0 + nr) of W + the delta of `st` alone, into s.own: what a DoRA stage normalizes. PEFT
// (DoraLinearVariant.merge, and its forward) takes each DoRA adapter's norm on the base weight plus
// that adapter's own delta, never on the other adapters merged before it.
Eigen::Map<RowMat> own_tile(const MergeJob& job, const MergeStage& st, std::int64_t r0, std::int64_t nr, Scratch& s) {
  Eigen::Map<RowMat> N = base_tile(job, r0, nr, s.own);
  add_stage(st, r0, N, s);
  return N;
}

// DoRA by rows: row i of T times magnitude[r0 + i] / ||row i of N||, N = W + the stage's own delta.
void scale_rows(const MergeStage& st, std::int64_t r0, Eigen::Map<RowMat>& T, const Eigen::Map<RowMat>& N) {
  for (std::int64_t i = 0; i < T.rows(); ++i) {
    const double norm = N.row(i).cast<double>().norm();
    T.row(i) *= static_cast<float>(static_cast<double>(st.magnitude[r0 + i]) / norm);
  }
}

// DoRA stage k after its delta is in the tile: each column times column_scale (found beforehand),
// or each row to the norm magnitude[row] over W + its own delta (the tile itself for the first
// stage, where the two are the same numbers).
void apply_magnitude(const MergeJob& job, std::size_t k, std::int64_t r0, Eigen::Map<RowMat>& T, Scratch& s) {
  const MergeStage& st = job.stages[k];
  if (st.column_norm) {
    Eigen::Map<const Eigen::RowVectorXf> scale(st.column_scale.data(), T.cols());
    T.array().rowwise() *= scale.array();
  } else if (k == 0) {
    scale_rows(st, r0, T, T);
  } else {
    const Eigen::Map<RowMat> N = own_tile(job, st, r0, T.rows(), s);
    scale_rows(st, r0, T, N);
  }
}

// Computes rows [r0, r0 + nr) of the job, every stage in order, and rounds them into the output.
// Returns whether any value is not storable.
bool run_block(const MergeJob& job, std::int64_t r0, std::int64_t nr, Scratch& s) {
  Eigen::Map<RowMat> T = base_tile(job, r0, nr, s.tile);
  for (std::size_t k = 0; k < job.stages.size(); ++k) {
    add_stage(job.stages[k], r0, T, s);
    if (job.stages[k].magnitude != nullptr) apply_magnitude(job, k, r0, T, s);
  }
  const std::size_t n = static_cast<std::size_t>(nr * job.cols);
  // Not finite, or finite but stored as Inf in the output type (F16 / BF16 overflow).
  const bool finite = (T.array().abs() < overflow_threshold(job.out_type)).all();
  auto* out = static_cast<unsigned char*>(job.out) + static_cast<std::size_t>(r0 * job.cols) * itemsize(job.out_type);
  from_f32(s.tile.data(), out, job.out_type, n);
  return !finite;
}

// The first pass of a column-normalized DoRA stage: adds the squares of each column of rows
// [r0, r0 + nr) of W + the stage's own delta into colsq.
void own_column_sums(const MergeJob& job, const MergeStage& st, std::int64_t r0, std::int64_t nr, Scratch& s,
                     double* colsq) {
  const Eigen::Map<RowMat> N = own_tile(job, st, r0, nr, s);
  for (std::int64_t i = 0; i < nr; ++i)
    for (std::int64_t j = 0; j < job.cols; ++j) colsq[j] += static_cast<double>(N(i, j)) * N(i, j);
}

// How many groups of row blocks the column sums are split into: a fixed number
// (not the thread count), so the sums are added in the same order for any thread
// count, bounded so the partial sums stay a few tens of MiB.
std::int64_t column_groups(std::int64_t nblocks, std::int64_t cols) {
  const std::int64_t by_memory = (std::int64_t{4} << 20) / std::max<std::int64_t>(cols, 1);
  return std::max<std::int64_t>(1, std::min<std::int64_t>({nblocks, 64, by_memory}));
}

// Fills column_scale = magnitude / ||column of W + the stage's own delta|| for every
// column-normalized stage of the job (each stage's norms independent of the other stages).
void column_norm_passes(MergeJob& job, std::int64_t step, int threads) {
  const std::int64_t nblocks = (job.rows + step - 1) / step;
  const std::int64_t groups = column_groups(nblocks, job.cols);
  const std::size_t cols = static_cast<std::size_t>(job.cols);
  for (std::size_t k = 0; k < job.stages.size(); ++k) {
    MergeStage& st = job.stages[k];
    if (st.magnitude == nullptr || !st.column_norm) continue;
    std::vector<std::vector<double>> colsq(static_cast<std::size_t>(groups), std::vector<double>(cols, 0.0));
    std::vector<Scratch> scratch(static_cast<std::size_t>(resolve_threads(threads)));
    parallel_for(groups, threads, [&](std::int64_t g, int tid) {
      for (std::int64_t b = g * nblocks / groups; b < (g + 1) * nblocks / groups; ++b) {
        const std::int64_t r0 = b * step;
        own_column_sums(job, st, r0, std::min(step, job.rows - r0), scratch[static_cast<std::size_t>(tid)],
                        colsq[static_cast<std::size_t>(g)].data());
      }
    });
    st.column_scale.assign(cols, 0.0f);
    for (std::size_t j = 0; j < cols; ++j) {
      double sum = 0.0;
      for (const auto& part : colsq) sum += part[j];
      st.column_scale[j] = static_cast<float>(st.magnitude[j] / std::sqrt(sum));
    }
  }
}

// The register-blocked path takes jobs of F32 / BF16 / F16 with only plain low-rank stages.
bool fused_eligible(const MergeJob& job) {
  if (!fused_supported(job.w_type, job.out_type)) return false;
  for (const MergeStage& st : job.stages)
    if (st.kind != StageKind::LowRank || st.magnitude != nullptr) return false;
  return true;
}

}  // namespace

void merge_batch(std::vector<MergeJob>& jobs, int threads) {
  struct Block {
    std::size_t job;
    std::int64_t r0, nr;
  };
  std::vector<Block> blocks;
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    MergeJob& job = jobs[j];
    job.nonfinite = false;
    LORAFUSE_CHECK(job.rows >= 0 && job.cols >= 0 &&
                       (job.rows * job.cols == 0 || (job.w != nullptr && job.out != nullptr)),
                   ErrorKind::ShapeMismatch, job.name + ": bad shape or missing buffers");
    LORAFUSE_CHECK(writable(job.out_type), ErrorKind::Dtype,
                   job.name + ": cannot write output dtype " + dtype_name(job.out_type));
    const std::int64_t step = tile_rows(job.cols);
    column_norm_passes(job, step, threads);
    for (std::int64_t r0 = 0; r0 < job.rows; r0 += step)
      blocks.push_back({j, r0, std::min(step, job.rows - r0)});
  }
  std::vector<FusedJob> fused(jobs.size());
  std::vector<unsigned char> use_fused(jobs.size(), 0);
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    const MergeJob& job = jobs[j];
    if (!fused_eligible(job)) continue;
    use_fused[j] = 1;
    fused[j] = FusedJob{job.w, job.w_type, job.out, job.out_type, job.cols, {}};
    for (const MergeStage& st : job.stages)
      if (st.rank > 0) fused[j].terms.push_back({st.B, st.A, st.rank});
  }
  const int t = resolve_threads(threads);
  std::vector<Scratch> scratch(static_cast<std::size_t>(t));
  std::vector<unsigned char> nonfinite(blocks.size(), 0);  // one slot per block: no shared writes
  parallel_for(static_cast<std::int64_t>(blocks.size()), t, [&](std::int64_t b, int tid) {
    const Block& blk = blocks[static_cast<std::size_t>(b)];
    if (use_fused[blk.job]) {
      nonfinite[static_cast<std::size_t>(b)] = fused_rows(fused[blk.job], blk.r0, blk.nr);
      return;
    }
    nonfinite[static_cast<std::size_t>(b)] =
        run_block(jobs[blk.job], blk.r0, blk.nr, scratch[static_cast<std::size_t>(tid)]);
  });
  for (std::size_t b = 0; b < blocks.size(); ++b)
    if (nonfinite[b]) jobs[blocks[b].job].nonfinite = true;
}

namespace {

std::string weight_shape(const MergeJob& job) { return shape_str(job.rows, job.cols); }

// rows * cols of a Kronecker product, or -1 when it does not fit in 64 bits.
std::int64_t checked_product(std::int64_t x, std::int64_t y) {
  std::int64_t r = 0;
  return __builtin_mul_overflow(x, y, &r) ? -1 : r;
}

}  // namespace

MergeJob make_merge_job(const std::string& name, const TensorView& w, DType w_type, const TensorView& out,
                        DType out_type) {
  check_raw(w, w_type, name + ": base weight");
  check_raw(out, out_type, name + ": output");
  LORAFUSE_CHECK(out.writeable, ErrorKind::Value, name + ": output buffer is read-only");
  LORAFUSE_CHECK(w.ndim() == 2 && out.ndim() == 2 && w.dim(0) == out.dim(0) && w.dim(1) == out.dim(1),
                 ErrorKind::ShapeMismatch,
                 name + ": base weight " + w.shape_str() + " and output " + out.shape_str() + " must be equal 2-D shapes");
  LORAFUSE_CHECK(writable(out_type), ErrorKind::Dtype, name + ": cannot write output dtype " + dtype_name(out_type));
  MergeJob job;
  job.name = name;
  job.w = w.data;
  job.w_type = w_type;
  job.out = const_cast<void*>(out.data);
  job.out_type = out_type;
  job.rows = w.dim(0);
  job.cols = w.dim(1);
  return job;
}

MergeStage make_lowrank_stage(const MergeJob& job, const TensorView& B, const TensorView& A) {
  check_f32(B, job.name + ": B");
  check_f32(A, job.name + ": A");
  LORAFUSE_CHECK(B.ndim() == 2 && A.ndim() == 2 && B.dim(0) == job.rows && A.dim(1) == job.cols && B.dim(1) == A.dim(0),
                 ErrorKind::ShapeMismatch,
                 job.name + ": factors B " + B.shape_str() + " and A " + A.shape_str() + " do not fit the base weight " +
                     weight_shape(job));
  MergeStage stage;
  stage.kind = StageKind::LowRank;
  stage.B = B.f32_data();
  stage.A = A.f32_data();
  stage.rank = A.dim(0);
  return stage;
}

MergeStage make_hadamard_stage(const MergeJob& job, const TensorView& B1, const TensorView& A1, const TensorView& B2,
                               const TensorView& A2) {
  check_f32_matrix(B1, job.name + ": LoHa B1");
  check_f32_matrix(A1, job.name + ": LoHa A1");
  check_f32_matrix(B2, job.name + ": LoHa B2");
  check_f32_matrix(A2, job.name + ": LoHa A2");
  LORAFUSE_CHECK(B1.dim(0) == job.rows && B2.dim(0) == job.rows && A1.dim(1) == job.cols && A2.dim(1) == job.cols &&
                     B1.dim(1) == A1.dim(0) && B2.dim(1) == A2.dim(0),
                 ErrorKind::ShapeMismatch,
                 job.name + ": LoHa factors B1 " + B1.shape_str() + ", A1 " + A1.shape_str() + ", B2 " + B2.shape_str() +
                     ", A2 " + A2.shape_str() + " do not fit the base weight " + weight_shape(job));
  MergeStage stage;
  stage.kind = StageKind::Hadamard;
  stage.B = B1.f32_data();
  stage.A = A1.f32_data();
  stage.rank = A1.dim(0);
  stage.B2 = B2.f32_data();
  stage.A2 = A2.f32_data();
  stage.rank2 = A2.dim(0);
  return stage;
}

MergeStage make_kron_stage(const MergeJob& job, const TensorView& W1, const TensorView& W2, bool has_offset,
                           std::int64_t row_offset) {
  check_f32_matrix(W1, job.name + ": LoKr W1");
  check_f32_matrix(W2, job.name + ": LoKr W2");
  const std::int64_t offset = has_offset ? row_offset : 0;
  const std::int64_t krows = checked_product(W1.dim(0), W2.dim(0));
  const std::int64_t kcols = checked_product(W1.dim(1), W2.dim(1));
  const bool rows_fit = has_offset ? offset >= 0 && krows >= 0 && offset <= krows && job.rows <= krows - offset
                                   : krows == job.rows;
  LORAFUSE_CHECK(rows_fit && kcols == job.cols, ErrorKind::ShapeMismatch,
                 job.name + ": LoKr factors W1 " + W1.shape_str() + " and W2 " + W2.shape_str() +
                     (has_offset ? " at row offset " + std::to_string(offset) : std::string()) +
                     " do not fit the base weight " + weight_shape(job) +
                     " (kron(W1, W2) has W1 rows * W2 rows by W1 cols * W2 cols)");
  MergeStage stage;
  stage.kind = StageKind::Kron;
  stage.W1 = W1.f32_data();
  stage.W2 = W2.f32_data();
  stage.a = W1.dim(0);
  stage.b = W1.dim(1);
  stage.c = W2.dim(0);
  stage.d = W2.dim(1);
  stage.row_offset = offset;
  return stage;
}

void set_magnitude(MergeStage& stage, const MergeJob& job, const TensorView& magnitude, bool column_norm) {
  check_f32(magnitude, job.name + ": DoRA magnitude");
  LORAFUSE_CHECK(magnitude.ndim() == 1 && magnitude.dim(0) == (column_norm ? job.cols : job.rows),
                 ErrorKind::ShapeMismatch,
                 job.name + ": DoRA magnitude " + magnitude.shape_str() + " does not fit the base weight " +
                     weight_shape(job));
  stage.column_norm = column_norm;
  stage.magnitude = magnitude.f32_data();
}

}  // namespace lorafuse
