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

// Computes rows [r0, r0 + nr) of the job through stage `upto` (exclusive) into `tile`.
// With upto == stages.size() the tile is rounded into the output; otherwise the
// delta of stage `upto` is added and the squares of each column are accumulated
// into `colsq` (the first pass of a column-normalized DoRA stage).
bool run_block(const MergeJob& job, std::int64_t r0, std::int64_t nr, std::size_t upto, std::vector<float>& tile,
               double* colsq) {
  const std::int64_t cols = job.cols;
  const std::size_t n = static_cast<std::size_t>(nr * cols);
  tile.resize(n);
  const auto* w = static_cast<const unsigned char*>(job.w) + static_cast<std::size_t>(r0 * cols) * itemsize(job.w_type);
  to_f32(w, job.w_type, tile.data(), n);
  Eigen::Map<RowMat> T(tile.data(), nr, cols);
  const std::size_t last = std::min(upto + 1, job.stages.size());
  for (std::size_t s = 0; s < last; ++s) {
    const MergeStage& st = job.stages[s];
    if (st.rank > 0) {
      Eigen::Map<const RowMat> B(st.B + r0 * st.rank, nr, st.rank);
      Eigen::Map<const RowMat> A(st.A, st.rank, cols);
      T.noalias() += B * A;
    }
    if (s == upto) {  // first pass of a column-normalized stage: sum the squares, write nothing
      for (std::int64_t i = 0; i < nr; ++i)
        for (std::int64_t j = 0; j < cols; ++j) colsq[j] += static_cast<double>(T(i, j)) * T(i, j);
      return false;
    }
    if (st.magnitude == nullptr) continue;
    if (st.column_norm) {
      Eigen::Map<const Eigen::RowVectorXf> scale(st.column_scale.data(), cols);
      T.array().rowwise() *= scale.array();
    } else {
      for (std::int64_t i = 0; i < nr; ++i) {
        const double norm = T.row(i).cast<double>().norm();
        T.row(i) *= static_cast<float>(static_cast<double>(st.magnitude[r0 + i]) / norm);
      }
    }
  }
  // Not finite, or finite but stored as Inf in the output type (F16 / BF16 overflow).
  const bool finite = (T.array().abs() < overflow_threshold(job.out_type)).all();
  auto* out = static_cast<unsigned char*>(job.out) + static_cast<std::size_t>(r0 * cols) * itemsize(job.out_type);
  from_f32(tile.data(), out, job.out_type, n);
  return !finite;
}

// Fills column_scale = magnitude / ||column|| for every column-normalized stage of
// the job, in stage order (a later stage's norms see the earlier stages' scaling).
void column_norm_passes(MergeJob& job, std::int64_t step, int threads) {
  for (std::size_t s = 0; s < job.stages.size(); ++s) {
    MergeStage& st = job.stages[s];
    if (st.magnitude == nullptr || !st.column_norm) continue;
    const std::int64_t nblocks = (job.rows + step - 1) / step;
    const int t = resolve_threads(threads);
    std::vector<std::vector<double>> colsq(static_cast<std::size_t>(t), std::vector<double>(job.cols, 0.0));
    std::vector<std::vector<float>> tiles(static_cast<std::size_t>(t));
    parallel_for(nblocks, t, [&](std::int64_t b, int tid) {
      const std::int64_t r0 = b * step;
      run_block(job, r0, std::min(step, job.rows - r0), s, tiles[static_cast<std::size_t>(tid)],
                colsq[static_cast<std::size_t>(tid)].data());
    });
    st.column_scale.assign(static_cast<std::size_t>(job.cols), 0.0f);
    for (std::int64_t j = 0; j < job.cols; ++j) {
      double sum = 0.0;
      for (const auto& part : colsq) sum += part[static_cast<std::size_t>(j)];
      st.column_scale[static_cast<std::size_t>(j)] = static_cast<float>(st.magnitude[j] / std::sqrt(sum));
    }
  }
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
    if (!writable(job.out_type))
      throw Error(ErrorKind::Dtype, job.name + ": cannot write output dtype " + dtype_name(job.out_type));
    const std::int64_t step = tile_rows(job.cols);
    column_norm_passes(job, step, threads);
    for (std::int64_t r0 = 0; r0 < job.rows; r0 += step)
      blocks.push_back({j, r0, std::min(step, job.rows - r0)});
  }
  // Jobs without DoRA take the register-blocked fast path.
  std::vector<FusedJob> fused(jobs.size());
  std::vector<unsigned char> use_fused(jobs.size(), 0);
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    const MergeJob& job = jobs[j];
    bool ok = fused_supported(job.w_type, job.out_type);
    for (const MergeStage& st : job.stages) ok = ok && st.magnitude == nullptr;
    if (!ok) continue;
    use_fused[j] = 1;
    fused[j] = FusedJob{job.w, job.w_type, job.out, job.out_type, job.cols, {}};
    for (const MergeStage& st : job.stages)
      if (st.rank > 0) fused[j].terms.push_back({st.B, st.A, st.rank});
  }
  const int t = resolve_threads(threads);
  std::vector<std::vector<float>> tiles(static_cast<std::size_t>(t));
  std::vector<unsigned char> nonfinite(blocks.size(), 0);  // one slot per block: no shared writes
  parallel_for(static_cast<std::int64_t>(blocks.size()), t, [&](std::int64_t b, int tid) {
    const Block& blk = blocks[static_cast<std::size_t>(b)];
    if (use_fused[blk.job]) {
      nonfinite[static_cast<std::size_t>(b)] = fused_rows(fused[blk.job], blk.r0, blk.nr);
      return;
    }
    nonfinite[static_cast<std::size_t>(b)] =
        run_block(jobs[blk.job], blk.r0, blk.nr, jobs[blk.job].stages.size(), tiles[static_cast<std::size_t>(tid)],
                  nullptr);
  });
  for (std::size_t b = 0; b < blocks.size(); ++b)
    if (nonfinite[b]) jobs[blocks[b].job].nonfinite = true;
}

}  // namespace lorafuse
