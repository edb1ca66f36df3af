// Element-wise merging of task tensors with the semantics of PEFT's
// peft/utils/merge_utils.py (task arithmetic, magnitude pruning, TIES, DARE):
//
//   prune each tensor t_i:  magnitude: keep the k = int(density * numel) entries of
//                           largest |t_i| (ties at the threshold: lowest index first);
//                           random: keep each entry with probability density, from a
//                           counter-based stream keyed by (seed, name, i, element),
//                           and with rescale divide the kept entries by density;
//                           density >= 1: no pruning (and no rescale).
//   merge sum:   sum_i w_i p_i
//   merge ties:  majority sign from the pruned, unweighted p_i ("total": sign of
//                sum_i p_i, "frequency": sign of sum_i sign(p_i); 0 counts as +),
//                result = sum_i w_i p_i [sign(p_i) = majority] / max(1, count).
//
// Pruned values are float32 (as PEFT's pruned tensors are); weighting, sums and the
// division run in float64 and each result is rounded once to float32. Every value
// depends only on the inputs, never on the thread count.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "lorafuse/tensor.hpp"

namespace lorafuse {

enum class PruneMethod { None, Magnitude, Random };
enum class MergeMethod { Sum, Ties };
enum class MajoritySign { Total, Frequency };

// Parse "none" | "magnitude" | "random", "sum" | "ties", "total" | "frequency";
// Error(Value) for anything else.
PruneMethod prune_method_from_name(const std::string& name);
MergeMethod merge_method_from_name(const std::string& name);
MajoritySign majority_sign_from_name(const std::string& name);

struct TaskMergeOptions {
  PruneMethod prune = PruneMethod::None;
  double density = 1.0;  // >= 0
  bool rescale = false;  // random pruning only
  MergeMethod merge = MergeMethod::Sum;
  MajoritySign majority = MajoritySign::Total;
  std::uint64_t seed = 0;
};

struct TaskMergeItem {
  std::string name;
  std::vector<const float*> tensors;  // n >= 1 tensors of numel float32 each
  std::vector<double> weights;        // n weights
  std::int64_t numel = 0;
  float* out = nullptr;               // numel float32, written
};

// Error(Value) unless density is finite and >= 0 (and, for random pruning with rescale, > 0).
void check_task_merge_options(const TaskMergeOptions& opt);

// A checked item from the caller's arrays (the entry point a binding calls): n >= 1 float32
// C-contiguous tensors of one shape and n finite weights, else Error naming the module, the
// tensor and the shapes. Sets name, tensors, weights and numel; the caller allocates `out`
// (numel float32, the shape of tensors[0]) and points the item at it.
TaskMergeItem make_task_merge_item(const std::string& name, const std::vector<TensorView>& tensors,
                                   const std::vector<double>& weights);

// Raises Error(Value) for bad options, Error(NonFinite) naming the item when an
// input tensor or a result holds NaN or Inf.
void task_merge_batch(std::vector<TaskMergeItem>& items, const TaskMergeOptions& opt, int threads);

}  // namespace lorafuse
