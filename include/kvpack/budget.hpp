/// \file budget.hpp
/// \brief The one way budgets are stated across kvpack: a keep ratio or a fixed token count.
#pragma once

#include <cmath>
#include <cstdint>

#include "error.hpp"

namespace kvpack {

/// Whether a budget is met by every (layer, head) alone or by all of them together.
enum class BudgetScope {
  kPerHead,  ///< each (layer, kv-head) keeps the same share of its tokens
  kGlobal,   ///< one score threshold over all compressible (layer, head) pairs: ragged budgets
};

/// \brief How many tokens an eviction keeps, and which tokens are never evicted.
///
/// The target is relative to the tokens *appended* to a layer (the logical sequence), not to
/// what a head still holds, so calling compress() again during decoding holds the same budget.
/// Protected tokens (sinks at the start, a recent window at the end) count against the budget;
/// when protection alone exceeds it, protection wins. A head that holds tokens always keeps at
/// least one, even when a global threshold or a head-level choice would take them all.
///
/// Protection is on by default: kDefaultSinkTokens (4, the attention sinks of StreamingLLM, Xiao
/// et al. 2023) and kDefaultRecentTokens (32, SnapKV's observation window, Li et al. 2024), so a
/// compress() during decoding never evicts position 0 or the tokens just generated. Both hold on
/// any model (they are token counts, not layers). `with_protection(0, 0)` selects on scores
/// alone, as the papers' context-compression tables do.
///
/// Over a growing sequence: policies that score from K/V (L2NormEvict) score every token at
/// each compress(), so the budget covers the whole sequence and decode tokens compete with the
/// context. Policies that score from observed queries (ReconstructionEvict) apply the budget to
/// the tokens they have scored: tokens appended after the last observe() (a question, decode
/// tokens) are kept outside it until an observe() scores them. Counting them against it would
/// squeeze the scored context out as decoding goes on; the price is that such a cache grows by
/// the unscored tokens.
struct Budget {
  static constexpr int64_t kDefaultSinkTokens = 4;
  static constexpr int64_t kDefaultRecentTokens = 32;

  double keep_ratio = 0.5;  ///< fraction of appended tokens kept, in (0, 1]
  int64_t keep_tokens = 0;  ///< when > 0: a fixed token count per (layer, head); overrides ratio
  BudgetScope scope = BudgetScope::kPerHead;
  int64_t sink_tokens = kDefaultSinkTokens;      ///< first tokens of the sequence always kept
  int64_t recent_tokens = kDefaultRecentTokens;  ///< last tokens held always kept

  static Budget ratio(double keep, BudgetScope scope = BudgetScope::kPerHead) {
    Budget b;
    b.keep_ratio = keep;
    b.scope = scope;
    return b;
  }
  static Budget tokens(int64_t keep, BudgetScope scope = BudgetScope::kPerHead) {
    Budget b;
    b.keep_tokens = keep;
    b.scope = scope;
    return b;
  }

  /// This budget with `sinks` first and `recent` last tokens protected (0, 0: none).
  Budget with_protection(int64_t sinks, int64_t recent) const {
    Budget b = *this;
    b.sink_tokens = sinks;
    b.recent_tokens = recent;
    return b;
  }

  void validate(const char* where) const {
    detail::require(keep_tokens > 0 || (keep_ratio > 0.0 && keep_ratio <= 1.0), where, "keep_ratio",
                    keep_ratio, "a value in (0, 1]");
    detail::require(keep_tokens >= 0, where, "keep_tokens", keep_tokens, ">= 0 (0 = use ratio)");
    detail::require(sink_tokens >= 0, where, "sink_tokens", sink_tokens, ">= 0");
    detail::require(recent_tokens >= 0, where, "recent_tokens", recent_tokens, ">= 0");
  }

  /// Tokens to keep for a head of a layer that has seen `appended` tokens.
  int64_t target(int64_t appended) const {
    if (keep_tokens > 0) return keep_tokens < appended ? keep_tokens : appended;
    const auto k = static_cast<int64_t>(std::ceil(keep_ratio * static_cast<double>(appended)));
    return k < appended ? k : appended;
  }
};

}  // namespace kvpack
