/// \file policy/snapkv.hpp
/// \brief SnapKV (Li et al., arXiv 2404.14469): score each cached key by the attention the
/// prompt's last queries (the observation window) give it, pooled over neighbouring tokens.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../error.hpp"
#include "policy_base.hpp"

namespace kvpack {

/// \brief SnapKV scoring + per-head top-k eviction.
///
/// The engine hands the queries of the last `observation_window` prompt tokens (tokens ×
/// q_heads × head_dim, post-RoPE) to observe() at the end of prefill. A key's score is the sum
/// over those queries and over the query heads of its GQA group of its softmax probability
/// (softmax over every key the query sees), then max-pooled over `pool_kernel` neighbouring
/// held tokens so that kept tokens come with their context. Each (layer, kv head) keeps its
/// best tokens up to the budget, plus the observation window itself (budget.recent_tokens).
/// Knobs (paper): window 32, pooling kernel 7 (max), top-k per head. The paper protects no
/// sinks; the Budget default keeps 4 (`budget.sink_tokens = 0` for the paper's choice).
struct SnapKV : QueryScoredEviction {
  static constexpr const char* name = "SnapKV";
  static constexpr QueryReduction query_reduction = QueryReduction::kSum;
  int64_t observation_window = 32;  ///< prompt queries observed; their tokens are always kept
  int pool_kernel = 7;              ///< odd width of the max pooling over held tokens (1: none)

  SnapKV() { budget.recent_tokens = observation_window; }
  explicit SnapKV(Budget b, int64_t window = 32, int kernel = 7)
      : observation_window(window), pool_kernel(kernel) {
    budget = b;
    budget.recent_tokens = std::max(budget.recent_tokens, window);
  }

  void validate(const ModelShape& shape) const {
    EvictionPolicy::validate(shape);
    detail::require(observation_window >= 1, "SnapKV", "observation_window", observation_window,
                    ">= 1");
    detail::require(pool_kernel >= 1 && pool_kernel % 2 == 1, "SnapKV", "pool_kernel", pool_kernel,
                    "an odd width >= 1");
  }

  /// Max pooling over pool_kernel neighbouring held tokens (detail::max_pooled_score).
  int score_pool_width() const { return pool_kernel; }
};

}  // namespace kvpack
