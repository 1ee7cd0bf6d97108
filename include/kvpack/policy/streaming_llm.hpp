/// \file policy/streaming_llm.hpp
/// \brief StreamingLLM (Xiao et al., arXiv 2309.17453): keep the first tokens ("attention
/// sinks") and a window of the most recent ones; evict everything in between.
#pragma once

#include <cstdint>

#include "../config.hpp"
#include "policy_base.hpp"

namespace kvpack {

/// \brief Sinks + recent window: per (layer, kv head), the `budget.sink_tokens` first tokens of
/// the sequence and the newest tokens up to the budget's target.
///
/// Knobs (paper): 4 sinks; the window is whatever the budget leaves after them (keep ratio or
/// a fixed token count, as kvpress's StreamingLLMPress). Scores need neither keys nor queries:
/// a token's score is minus its distance to the newest position, so the budget keeps the
/// newest; distances are exact in fp32 up to 2^24 tokens back.
struct StreamingLLM : EvictionPolicy {
  static constexpr const char* name = "StreamingLLM";
  static constexpr ScoreSource score_source = ScoreSource::kPosition;

  StreamingLLM() = default;  // 4 sinks: the Budget default
  explicit StreamingLLM(Budget b) { budget = b; }

  /// Score of a token at `position` in a sequence whose newest position is `last`.
  KVPACK_HOST_DEVICE static float position_score(int64_t position, int64_t last) {
    return -static_cast<float>(last - position);
  }
};

}  // namespace kvpack
