#include "lorafuse/merge.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <vector>

#include "lorafuse/errors.hpp"
#include "lorafuse/parallel.hpp"

namespace lorafuse {
namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Rows per tile: a tile of about 256 KiB of float32 stays in L2 next to A.
std::int64_t tile_rows(std::int64_t cols) {
  const std::int64_t target = (256 * 1024 / 4) / std::max<std::int64_t>(cols, 1);
  return std::clamp<std::int64_t>(target, 4, 256);
}

bool run_block(const MergeJob& job, std::int64_t r0, std::int64_t nr, std::vector<float>& tile) {
  const std::int64_t cols = job.cols;
  const std::size_t n = static_cast<std::size_t>(nr * cols);
  tile.resize(n);
  const auto* w = static_cast<const unsigned char*>(job.w) + static_cast<std::size_t>(r0 * cols) * itemsize(job.w_type);
  to_f32(w, job.w_type, tile.data(), n);
  Eigen::Map<RowMat> T(tile.data(), nr, cols);
  for (const MergeStage& st : job.stages) {
    if (st.rank > 0) {
      Eigen::Map<const RowMat> B(st.B + r0 * st.rank, nr, st.rank);
      Eigen::Map<const RowMat> A(st.A, st.rank, cols);
      T.noalias() += B * A;
    }
    if (st.magnitude != nullptr) {
      for (std::int64_t i = 0; i < nr; ++i) {
        const double norm = T.row(i).cast<double>().norm();
        T.row(i) *= static_cast<float>(static_cast<double>(st.magnitude[r0 + i]) / norm);
      }
    }
  }
  const bool finite = T.allFinite();
  auto* out = static_cast<unsigned char*>(job.out) + static_cast<std::size_t>(r0 * cols) * itemsize(job.out_type);
  from_f32(tile.data(), out, job.out_type, n);
  return !finite;
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
    for (std::int64_t r0 = 0; r0 < job.rows; r0 += step)
      blocks.push_back({j, r0, std::min(step, job.rows - r0)});
  }
  const int t = resolve_threads(threads);
  std::vector<std::vector<float>> tiles(static_cast<std::size_t>(t));
  std::vector<unsigned char> nonfinite(blocks.size(), 0);  // one slot per block: no shared writes
  parallel_for(static_cast<std::int64_t>(blocks.size()), t, [&](std::int64_t b, int tid) {
    const Block& blk = blocks[static_cast<std::size_t>(b)];
    nonfinite[static_cast<std::size_t>(b)] =
        run_block(jobs[blk.job], blk.r0, blk.nr, tiles[static_cast<std::size_t>(tid)]);
  });
  for (std::size_t b = 0; b < blocks.size(); ++b)
    if (nonfinite[b]) jobs[blocks[b].job].nonfinite = true;
}

}  // namespace lorafuse
