/// \file policy/lazy_layer_drop.hpp
/// \brief LazyLayerDrop (SimLayerKV, arXiv 2410.13846): trim the cache of "lazy" layers.
///
/// A layer whose last prompt queries put most of their attention on the first tokens and a
/// recent window does not use the rest of its cache. observe() measures that attention mass per
/// layer (averaged over heads and observed queries); at the first compress() after it, layers
/// above the threshold are marked lazy — once per input — and keep only the initial and recent
/// tokens, now and at every later compress() as the sequence grows.
#pragma once

#include <cstdint>

#include "policy_base.hpp"

namespace kvpack {

/// \brief SimLayerKV's lazy-layer test and trim.
///
/// Knobs (paper): threshold 0.9 for Llama-3 (0.65 Llama-2, 0.8 Mistral, 0.85 Qwen);
/// sink_tokens 4 (the paper's "initial tokens"), recent_tokens 1024. The threshold is
/// model-specific: measure the mass distribution of your model (KVCache::observed_mass) before
/// choosing it.
struct LazyLayerDrop : PolicyBase {
  static constexpr const char* name = "LazyLayerDrop";
  static constexpr bool needs_observe = true;
  static constexpr ScoreSource score_source = ScoreSource::kLayerMass;
  double threshold = 0.9;
  int64_t sink_tokens = 4;
  int64_t recent_tokens = 1024;

  LazyLayerDrop() = default;
  LazyLayerDrop(double threshold_, int64_t sinks, int64_t recent)
      : threshold(threshold_), sink_tokens(sinks), recent_tokens(recent) {}

  void validate(const ModelShape&) const {
    detail::require(threshold >= 0.0 && threshold <= 1.0, "LazyLayerDrop", "threshold", threshold,
                    "a value in [0, 1]");
    detail::require(sink_tokens >= 0, "LazyLayerDrop", "sink_tokens", sink_tokens, ">= 0");
    detail::require(recent_tokens >= 1, "LazyLayerDrop", "recent_tokens", recent_tokens, ">= 1");
  }

  /// Whether a key at `pos` is in the kept set for a query at `query_pos` of a sequence whose
  /// first position is `first`.
  KVPACK_HOST_DEVICE bool in_kept_set(int64_t pos, int64_t first, int64_t query_pos) const {
    return pos < first + sink_tokens || pos > query_pos - recent_tokens;
  }
};

}  // namespace kvpack
