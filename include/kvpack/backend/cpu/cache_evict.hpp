/// \file backend/cpu/cache_evict.hpp
/// \brief Out-of-line members of KVCache<Policy, backend::Cpu>: eviction by the policy's scores and
/// budget, and SimLayerKV's trimming of lazy layers.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cache.hpp"

namespace kvpack {

template <class Policy>
void KVCache<Policy, backend::Cpu>::trim_lazy_layers() {
  const int d = shape_.head_dim;
  for (int l = 0; l < shape_.layers; ++l) {
    LayerObservation& o = observations_[l];
    o.decide(selection().threshold);
    if (o.lazy != 1) continue;
    const detail::LayerState& state = layers_[l];
    for (int h = 0; h < shape_.kv_heads; ++h) {
      auto& head = store(l, h);
      std::vector<int64_t> kept;
      for (int64_t t = 0; t < head.size(); ++t) {
        if (selection().in_kept_set(head.positions[t], state.first_position, state.last_position)) {
          kept.push_back(t);
        }
      }
      if (static_cast<int64_t>(kept.size()) < head.size()) head.keep(kept, d);
    }
  }
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::evict() {
  const int d = shape_.head_dim;
  const Selection& knobs = selection();
  const Budget& budget = knobs.budget;
  struct Target {
    int layer, head;
  };
  std::vector<Target> targets;
  for (int l = detail::first_layer(knobs, shape_.layers); l < shape_.layers; ++l) {
    const detail::LayerState& state = layers_[l];
    if (state.appended == 0 || state.appended < knobs.min_tokens) continue;
    for (int h = 0; h < shape_.kv_heads; ++h) targets.push_back({l, h});
  }
  const int64_t n_targets = static_cast<int64_t>(targets.size());
  // HeadLevelEvict: a head keeps every token or only the protected ones.
  std::vector<char> whole;
  if constexpr (kHeadLevel) {
    std::vector<int> ids;
    for (const Target& t : targets) ids.push_back(t.layer * shape_.kv_heads + t.head);
    whole = knobs.heads_kept(ids);
  }
  // A score threshold (KVzap) replaces the budget's count; each head then keeps what passes it.
  const float threshold = knobs.score_threshold();
  const bool by_threshold = !std::isnan(threshold);
  std::vector<std::vector<float>> scores(n_targets);
  std::vector<detail::SelectionHead> selection(n_targets);
  detail::parallel_for(executor(), n_targets, [&](int64_t i) {
    const auto& head = store(targets[i].layer, targets[i].head);
    const detail::LayerState& state = layers_[targets[i].layer];
    scores[i].resize(head.size());
    int64_t unscored = 0;  // tokens the policy has no score for yet
    if constexpr (kHeadLevel) {
      // No token scores (resize() zeroed them): the head's target below decides.
    } else if constexpr (kStoredScores) {
      // Tokens no observed query saw (appended after scoring: the question, decode tokens) rank
      // above everything and are kept outside the budget, which applies to the scored tokens.
      // Counting them against it would squeeze the scored context out as decoding goes on.
      float* s = scores[i].data();
      for (int64_t t = 0; t < head.size(); ++t) {
        s[t] = t < static_cast<int64_t>(head.scores.size()) ? head.scores[t] : head.kUnscored;
      }
      const int64_t radius = knobs.score_pool_width() / 2;  // SnapKV's pooling
      if (radius > 0) {
        const std::vector<float> raw(s, s + head.size());
        for (int64_t t = 0; t < head.size(); ++t) {
          s[t] = detail::max_pooled_score(raw.data(), head.size(), t, radius);
        }
      }
      for (int64_t t = 0; t < head.size(); ++t) {
        const bool scored =
            t < static_cast<int64_t>(head.scores.size()) && head.scores[t] != head.kUnscored;
        if (!scored) s[t] = std::numeric_limits<float>::infinity();
        unscored += !scored;
      }
    } else if constexpr (kPositionScores) {
      for (int64_t t = 0; t < head.size(); ++t) {
        scores[i][t] = Selection::position_score(head.positions[t], state.last_position);
      }
    } else {
      // Score fp32 rows decoded tile by tile, whatever the store's format (values only for a
      // policy whose score reads them: decoding them was half of L2's scoring time).
      constexpr bool kValues = detail::token_score_reads_values<Selection>::value;
      const auto rows_of = head.rows(d);
      std::vector<float> kt(cpu::kAttentionTile * d), vt(kValues ? cpu::kAttentionTile * d : 0);
      for (int64_t t0 = 0; t0 < head.size(); t0 += cpu::kAttentionTile) {
        const int64_t tn = std::min(cpu::kAttentionTile, head.size() - t0);
        rows_of.load_keys(t0, tn, kt.data());
        if constexpr (kValues) rows_of.load_values(t0, tn, vt.data());
        for (int64_t t = 0; t < tn; ++t) {
          const float* value = kValues ? vt.data() + t * d : nullptr;
          scores[i][t0 + t] = Selection::token_score(kt.data() + t * d, value, d);
        }
      }
    }
    selection[i] = {scores[i].data(),
                    head.positions.data(),
                    head.size(),
                    kHeadLevel ? (whole[i] ? head.size() : 0)
                               : budget.target(state.appended - unscored) + unscored,
                    state.first_position + budget.sink_tokens,
                    state.last_position - budget.recent_tokens};
    if (by_threshold) {  // keep the protected tokens and every other one at or above it
      int64_t target = 0;
      for (int64_t t = 0; t < head.size(); ++t) {
        target += detail::is_protected(selection[i], t) || scores[i][t] >= threshold;
      }
      selection[i].target = target;
    }
  });
  std::vector<std::vector<int64_t>> kept;
  if (budget.scope == BudgetScope::kGlobal && !kHeadLevel && !by_threshold) {
    kept = detail::select_global(selection);
  } else {
    kept.resize(n_targets);
    for (int64_t i = 0; i < n_targets; ++i) kept[i] = detail::select_top_k(selection[i]);
  }
  if constexpr (kQuantizedRows) {
    // Compose<Evict, Quantize>: keep() hands back a head's pages, then quantize() takes pages for
    // what it kept. Both must fit the pool before anything is evicted, so a pool that would run
    // out refuses compress() with the cache as it was.
    std::vector<int64_t> kept_tokens(heads_.size(), -1);
    for (int64_t i = 0; i < n_targets; ++i) {
      const auto& head = store(targets[i].layer, targets[i].head);
      if (static_cast<int64_t>(kept[i].size()) < head.size()) {
        kept_tokens[static_cast<std::size_t>(targets[i].layer) * shape_.kv_heads +
                    targets[i].head] = static_cast<int64_t>(kept[i].size());
      }
    }
    const int64_t residual = Stages::quant_knobs(policy_)->residual;
    int64_t more = 0;
    for (std::size_t j = 0; j < heads_.size(); ++j) {
      more += heads_[j].pages_after(kept_tokens[j], residual) - heads_[j].pages.size();
    }
    const auto available = static_cast<int64_t>(pool_->available_pages());
    detail::require(
        more <= available, "KVCache::compress", "pages the pool can hand out", available, [&] {
          return detail::concat(">= ", more, " (quantizing what the eviction keeps needs them)");
        });
  }
  detail::parallel_for(executor(), n_targets, [&](int64_t i) {
    auto& head = store(targets[i].layer, targets[i].head);
    if (static_cast<int64_t>(kept[i].size()) < head.size()) head.keep(kept[i], d);
  });
}

}  // namespace kvpack
