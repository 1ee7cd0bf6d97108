/// \file backend/cpu/cache_quantize.hpp
/// \brief Out-of-line member of KVCache<Policy, backend::Cpu>: KIVI quantization of what aged out
/// of the residual window, spread over (head, run of groups) work items.
#pragma once

#include <algorithm>
#include <vector>

#include "cache.hpp"
#include "quantized_head_store.hpp"

namespace kvpack {

template <class Policy>
void KVCache<Policy, backend::Cpu>::quantize() {
  const int d = shape_.head_dim;
  const int64_t residual = Stages::quant_knobs(policy_)->residual;
  const int64_t heads = static_cast<int64_t>(heads_.size());
  // Work items: (head, run of groups), so a layer's few heads still fill every thread.
  constexpr int64_t kGroupsPerItem = 8;
  std::vector<int64_t> counts(heads), first_item(heads + 1, 0);
  for (int64_t i = 0; i < heads; ++i) {
    counts[i] = heads_[i].quantizable(residual);
    const int64_t groups = counts[i] / heads_[i].group;
    first_item[i + 1] = first_item[i] + (groups + kGroupsPerItem - 1) / kGroupsPerItem;
  }
  // Pages for every head before any block is written: when the pool runs out, the pages taken
  // go back and the error propagates with the cache as it was.
  for (int64_t i = 0; i < heads; ++i) {
    try {
      if (counts[i] > 0) heads_[i].reserve_blocks(counts[i], d);
    } catch (...) {
      for (int64_t j = 0; j < i; ++j) heads_[j].release_reserve();
      throw;
    }
  }
  detail::parallel_for(executor(), first_item[heads], [&](int64_t item) {
    const int64_t i =
        std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin() - 1;
    const int64_t g0 = (item - first_item[i]) * kGroupsPerItem;
    const int64_t groups = counts[i] / heads_[i].group;
    heads_[i].quantize_groups(g0, std::min(groups, g0 + kGroupsPerItem), d);
  });
  detail::parallel_for(executor(), heads, [&](int64_t i) {
    if (counts[i] > 0) heads_[i].commit_quantized(counts[i], d);
  });
}

}  // namespace kvpack
