#include "lorafuse/taskmerge.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "lorafuse/errors.hpp"
#include "lorafuse/parallel.hpp"
#include "lorafuse/rng.hpp"
#include "finite.hpp"

namespace lorafuse {
namespace {

constexpr std::uint64_t kPruneDomain = 0x7072756e65000001ull;  // separates the prune masks from other streams
constexpr std::int64_t kChunk = std::int64_t{1} << 15;          // elements per merge block

// Which entries of one tensor survive magnitude pruning: |t_j| > thr, or |t_j| == thr
// and j <= cut (exactly k entries in all).
struct MagnitudeKeep {
  bool none = false;  // k == 0
  bool all = false;   // k >= numel
  float thr = 0.0f;
  std::int64_t cut = -1;
};

MagnitudeKeep magnitude_keep(const float* t, std::int64_t numel, double density, std::vector<float>& scratch) {
  MagnitudeKeep keep;
  // k = int(density * numel), as Python computes it (double product, truncation).
  const double kd = density * static_cast<double>(numel);
  const std::int64_t k = kd >= static_cast<double>(numel) ? numel : static_cast<std::int64_t>(kd);
  if (k <= 0) {
    keep.none = true;
    return keep;
  }
  if (k >= numel) {
    keep.all = true;
    return keep;
  }
  scratch.resize(static_cast<std::size_t>(numel));
  for (std::int64_t j = 0; j < numel; ++j) scratch[static_cast<std::size_t>(j)] = std::abs(t[j]);
  const auto nth = scratch.begin() + (numel - k);
  std::nth_element(scratch.begin(), nth, scratch.end());
  keep.thr = *nth;  // the k-th largest magnitude
  std::int64_t greater = 0;
  for (std::int64_t j = 0; j < numel; ++j) greater += std::abs(t[j]) > keep.thr;
  std::int64_t equal_left = k - greater;  // >= 1: entries equal to thr still to keep
  for (std::int64_t j = 0; j < numel; ++j) {
    if (std::abs(t[j]) == keep.thr && --equal_left == 0) {
      keep.cut = j;
      break;
    }
  }
  return keep;
}

using detail::all_finite;

std::string fmt_double(double d) {
  std::ostringstream s;
  s << d;
  return s.str();
}

struct Scratch {
  std::vector<float> pruned;  // n x chunk
  std::vector<double> a, b;   // chunk each
  std::vector<std::int32_t> count;  // chunk
  std::vector<float> mags;    // magnitude selection
};

}  // namespace

PruneMethod prune_method_from_name(const std::string& name) {
  if (name == "none") return PruneMethod::None;
  if (name == "magnitude") return PruneMethod::Magnitude;
  if (name == "random") return PruneMethod::Random;
  throw Error(ErrorKind::Value, "unknown prune method '" + name + "' (expected 'none', 'magnitude' or 'random')");
}

MergeMethod merge_method_from_name(const std::string& name) {
  if (name == "sum") return MergeMethod::Sum;
  if (name == "ties") return MergeMethod::Ties;
  throw Error(ErrorKind::Value, "unknown merge method '" + name + "' (expected 'sum' or 'ties')");
}

MajoritySign majority_sign_from_name(const std::string& name) {
  if (name == "total") return MajoritySign::Total;
  if (name == "frequency") return MajoritySign::Frequency;
  throw Error(ErrorKind::Value, "unknown majority sign method '" + name + "' (expected 'total' or 'frequency')");
}

void check_task_merge_options(const TaskMergeOptions& opt) {
  LORAFUSE_CHECK(opt.density >= 0.0 && std::isfinite(opt.density), ErrorKind::Value,
                 "task_merge: density must be >= 0 (a finite number), got " + fmt_double(opt.density));
  const bool pruning = opt.prune != PruneMethod::None && opt.density < 1.0;
  LORAFUSE_CHECK(!(pruning && opt.prune == PruneMethod::Random && opt.rescale && opt.density == 0.0), ErrorKind::Value,
                 "task_merge: random pruning with density 0 and rescale divides by zero (PEFT would return NaN)");
}

TaskMergeItem make_task_merge_item(const std::string& name, const std::vector<TensorView>& tensors,
                                   const std::vector<double>& weights) {
  LORAFUSE_CHECK(!tensors.empty(), ErrorKind::Value, name + ": task_merge needs at least one tensor");
  LORAFUSE_CHECK(weights.size() == tensors.size(), ErrorKind::ShapeMismatch,
                 name + ": " + std::to_string(weights.size()) + " weights for " + std::to_string(tensors.size()) +
                     " tensors");
  TaskMergeItem item;
  item.name = name;
  for (std::size_t j = 0; j < tensors.size(); ++j) {
    const TensorView& t = tensors[j];
    check_f32(t, name + ": task tensor " + std::to_string(j));
    LORAFUSE_CHECK(t.shape == tensors[0].shape, ErrorKind::ShapeMismatch,
                   name + ": task tensor " + std::to_string(j) + " has shape " + t.shape_str() + ", task tensor 0 has " +
                       tensors[0].shape_str());
    LORAFUSE_CHECK(std::isfinite(weights[j]), ErrorKind::Value,
                   name + ": weight " + std::to_string(j) + " must be finite, got " + fmt_double(weights[j]));
    item.tensors.push_back(t.f32_data());
    item.weights.push_back(weights[j]);
  }
  item.numel = tensors[0].numel();
  return item;
}

void task_merge_batch(std::vector<TaskMergeItem>& items, const TaskMergeOptions& opt, int threads) {
  check_task_merge_options(opt);
  const bool pruning = opt.prune != PruneMethod::None && opt.density < 1.0;
  const bool rescale = pruning && opt.prune == PruneMethod::Random && opt.rescale;
  for (const TaskMergeItem& it : items) {
    LORAFUSE_CHECK(it.numel >= 0 && (it.numel == 0 || it.out != nullptr), ErrorKind::Value,
                   it.name + ": bad size or missing output buffer");
    LORAFUSE_CHECK(!it.tensors.empty(), ErrorKind::Value, it.name + ": task_merge needs at least one tensor");
    LORAFUSE_CHECK(it.weights.size() == it.tensors.size(), ErrorKind::ShapeMismatch,
                   it.name + ": " + std::to_string(it.weights.size()) + " weights for " +
                       std::to_string(it.tensors.size()) + " tensors");
  }
  const int nthreads = resolve_threads(threads);
  std::vector<Scratch> scratch(static_cast<std::size_t>(nthreads));

  // Pass 1, per tensor: finiteness, and the magnitude threshold when pruning by magnitude.
  struct TensorRef {
    std::size_t item, index;
  };
  std::vector<TensorRef> refs;
  std::vector<std::size_t> first_ref(items.size());
  for (std::size_t i = 0; i < items.size(); ++i) {
    first_ref[i] = refs.size();
    for (std::size_t t = 0; t < items[i].tensors.size(); ++t) refs.push_back({i, t});
  }
  std::vector<MagnitudeKeep> keeps(refs.size());
  std::vector<unsigned char> bad(refs.size(), 0);
  parallel_for(static_cast<std::int64_t>(refs.size()), nthreads, [&](std::int64_t r, int tid) {
    const TensorRef& ref = refs[static_cast<std::size_t>(r)];
    const TaskMergeItem& it = items[ref.item];
    const float* t = it.tensors[ref.index];
    if (!all_finite(t, it.numel)) {
      bad[static_cast<std::size_t>(r)] = 1;
      return;
    }
    if (pruning && opt.prune == PruneMethod::Magnitude)
      keeps[static_cast<std::size_t>(r)] =
          magnitude_keep(t, it.numel, opt.density, scratch[static_cast<std::size_t>(tid)].mags);
  });
  for (std::size_t r = 0; r < refs.size(); ++r)
    if (bad[r])
      throw Error(ErrorKind::NonFinite, items[refs[r].item].name + ": task tensor " + std::to_string(refs[r].index) +
                                            " holds NaN or Inf");

  std::vector<std::uint64_t> keys(refs.size(), 0);
  if (pruning && opt.prune == PruneMethod::Random) {
    const std::uint64_t seed_key = derive_key(derive_key(0, opt.seed), kPruneDomain);
    for (std::size_t r = 0; r < refs.size(); ++r)
      keys[r] = derive_key(derive_key(seed_key, name_hash(items[refs[r].item].name)), refs[r].index);
  }

  // Pass 2, per block of elements of one item: prune into float32, then merge in float64.
  struct Block {
    std::size_t item;
    std::int64_t lo, len;
  };
  std::vector<Block> blocks;
  for (std::size_t i = 0; i < items.size(); ++i)
    for (std::int64_t lo = 0; lo < items[i].numel; lo += kChunk)
      blocks.push_back({i, lo, std::min(kChunk, items[i].numel - lo)});
  std::vector<unsigned char> nonfinite(blocks.size(), 0);
  parallel_for(static_cast<std::int64_t>(blocks.size()), nthreads, [&](std::int64_t b, int tid) {
    const Block& blk = blocks[static_cast<std::size_t>(b)];
    const TaskMergeItem& it = items[blk.item];
    Scratch& s = scratch[static_cast<std::size_t>(tid)];
    const std::size_t n = it.tensors.size(), len = static_cast<std::size_t>(blk.len);
    s.pruned.resize(n * len);
    for (std::size_t t = 0; t < n; ++t) {
      const float* src = it.tensors[t] + blk.lo;
      float* dst = s.pruned.data() + t * len;
      const std::size_t ref = first_ref[blk.item] + t;
      if (!pruning) {
        std::copy(src, src + len, dst);
      } else if (opt.prune == PruneMethod::Magnitude) {
        const MagnitudeKeep& mk = keeps[ref];
        for (std::size_t j = 0; j < len; ++j) {
          const float a = std::abs(src[j]);
          const bool keep = mk.all || (!mk.none && (a > mk.thr || (a == mk.thr && blk.lo + static_cast<std::int64_t>(j) <= mk.cut)));
          dst[j] = keep ? src[j] : 0.0f;
        }
      } else {
        const std::uint64_t key = keys[ref];
        for (std::size_t j = 0; j < len; ++j) {
          const bool keep = uniform01(counter_bits(key, static_cast<std::uint64_t>(blk.lo) + j)) < opt.density;
          dst[j] = !keep ? 0.0f : rescale ? static_cast<float>(static_cast<double>(src[j]) / opt.density) : src[j];
        }
      }
    }
    float* out = it.out + blk.lo;
    s.a.assign(len, 0.0);
    if (opt.merge == MergeMethod::Sum) {
      for (std::size_t t = 0; t < n; ++t) {
        const float* p = s.pruned.data() + t * len;
        const double w = it.weights[t];
        for (std::size_t j = 0; j < len; ++j) s.a[j] += w * static_cast<double>(p[j]);
      }
      for (std::size_t j = 0; j < len; ++j) out[j] = static_cast<float>(s.a[j]);
    } else {
      // s.a: the sign statistic, then the majority sign (+1 / -1); s.b: the agreeing sum; count alongside.
      for (std::size_t t = 0; t < n; ++t) {
        const float* p = s.pruned.data() + t * len;
        if (opt.majority == MajoritySign::Total) {
          for (std::size_t j = 0; j < len; ++j) s.a[j] += static_cast<double>(p[j]);
        } else {
          for (std::size_t j = 0; j < len; ++j) s.a[j] += static_cast<double>((p[j] > 0.0f) - (p[j] < 0.0f));
        }
      }
      for (std::size_t j = 0; j < len; ++j) s.a[j] = s.a[j] >= 0.0 ? 1.0 : -1.0;
      s.b.assign(len, 0.0);
      s.count.assign(len, 0);
      for (std::size_t t = 0; t < n; ++t) {
        const float* p = s.pruned.data() + t * len;
        const double w = it.weights[t];
        for (std::size_t j = 0; j < len; ++j) {
          const double v = static_cast<double>(p[j]);
          const bool agree = v * s.a[j] > 0.0;  // same sign as the majority (never for 0)
          s.b[j] += agree ? w * v : 0.0;
          s.count[j] += agree;
        }
      }
      for (std::size_t j = 0; j < len; ++j)
        out[j] = static_cast<float>(s.b[j] / static_cast<double>(std::max(1, s.count[j])));
    }
    nonfinite[static_cast<std::size_t>(b)] = !all_finite(out, blk.len);
  });
  for (std::size_t b = 0; b < blocks.size(); ++b)
    if (nonfinite[b]) throw Error(ErrorKind::NonFinite, items[blocks[b].item].name + ": merged result overflows float32");
}

}  // namespace lorafuse
