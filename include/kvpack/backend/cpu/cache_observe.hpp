/// \file backend/cpu/cache_observe.hpp
/// \brief Out-of-line member of KVCache<Policy, backend::Cpu>: observe(), the softmax
/// probabilities of observed queries reduced per key (max or sum) or per layer (mass).
#pragma once

#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include "cache.hpp"

namespace kvpack {

template <class Policy>
void KVCache<Policy, backend::Cpu>::observe_probabilities(int layer, const ActivationView& q,
                                                          Positions positions) {
  const int d = shape_.head_dim;
  const int g = shape_.group_size();
  const int heads = shape_.kv_heads;
  const int64_t tokens = q.tokens();
  // Work items: (kv head, block of query tokens). A block's rows share every packed key panel
  // while it is in L1; blocks give the parallelism (3 kv heads alone would idle cores).
  const int64_t block_tokens = std::max<int64_t>(1, cpu::kScoreRows / g);
  const int64_t blocks = (tokens + block_tokens - 1) / block_tokens;
  const int64_t items = heads * blocks;

  // The window's keys of each head, fp32 and packed once for all blocks.
  std::vector<cpu::PackedKeys> keys(heads);
  detail::parallel_for(executor(), heads, [&](int64_t h) {
    auto& head = store(layer, static_cast<int>(h));
    if constexpr (kQueryScores) {
      head.scores.resize(head.positions.size(), head.kUnscored);
      keys[h].pack(head.rows(d), d,
                   cpu::window_ranges(head.positions.data(), head.size(), selection().window));
    } else {
      keys[h].pack(head.rows(d), d,
                   cpu::window_ranges(head.positions.data(), head.size(), ScoreWindow::all()));
    }
  });

  std::vector<double> item_mass(kLazyLayers ? items : 0, 0.0);
  // Sums are not exact like maxima: each work item keeps its own partial sums, merged below in
  // item order, so the scores do not depend on the thread count or timing.
  std::vector<std::vector<float>> item_sums(kSumScores ? items : 0);
  // Folds window-key values `b` of head h into its stored scores with `combine`.
  auto merge_into_scores = [&](int h, const float* b, auto combine) {
    float* scores = store(layer, h).scores.data();
    for (std::size_t i = 0; i < keys[h].ranges().size(); ++i) {
      const auto& range = keys[h].ranges()[i];
      const float* bi = b + keys[h].offset(i);
      for (int64_t t = range.first; t < range.second; ++t) {
        scores[t] = combine(scores[t], bi[t - range.first]);
      }
    }
  };
  // One task per thread of the executor, taking work items in turn: a thread's scratch and its
  // maxima serve all its items.
  const int64_t workers = std::min<int64_t>(executor().concurrency(), items);
  std::atomic<int64_t> next_item{0};
  std::mutex merge;
  detail::parallel_for(executor(), workers, [&](int64_t) {
    // Per thread: the max probability of each window key over this thread's blocks (a max is
    // exact, so merging the threads in any order gives the same scores).
    std::vector<std::vector<float>> best(kQueryScores && !kSumScores ? heads : 0);
    cpu::ScoreStrip strip;
    std::vector<float> qrows;
    std::vector<int64_t> visible;
    for (int64_t item; (item = next_item.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int h = static_cast<int>(item / blocks);
      const int64_t t0 = (item % blocks) * block_tokens;
      const int64_t tn = std::min(block_tokens, tokens - t0);
      const int rows = static_cast<int>(tn * g);
      gather_query_rows(layer, q, positions, h, t0, tn, qrows, visible);
      cpu::score_strip(keys[h], qrows.data(), rows, visible.data(), strip);
      if constexpr (kSumScores) {
        item_sums[item].assign(keys[h].size(), Store::kUnscored);
        cpu::sum_probabilities(strip, rows, item_sums[item].data());
      } else if constexpr (kQueryScores) {
        if (best[h].empty()) best[h].assign(keys[h].size(), Store::kUnscored);
        cpu::max_probabilities(strip, rows, best[h].data());
      } else {
        const auto& held = store(layer, h).positions;
        const int64_t first = layers_[layer].first_position;
        double mass = 0.0;
        for (int r = 0; r < rows; ++r) {
          const int64_t query_position = positions[t0 + r / g];
          const float* p = strip.row(r);
          double row_mass = 0.0;
          for (int64_t j = 0; j < strip.limit[r]; ++j) {  // window "all": index j is key j
            if (selection().in_kept_set(held[j], first, query_position)) row_mass += p[j];
          }
          mass += row_mass * strip.inv_sum[r];
        }
        item_mass[item] = mass;
      }
    }
    if constexpr (kQueryScores && !kSumScores) {
      std::lock_guard<std::mutex> lock(merge);
      for (int h = 0; h < heads; ++h) {
        if (best[h].empty()) continue;
        merge_into_scores(h, best[h].data(), [](float s, float b) { return std::max(s, b); });
      }
    }
  });
  if constexpr (kSumScores) {
    for (int64_t item = 0; item < items; ++item) {
      merge_into_scores(static_cast<int>(item / blocks), item_sums[item].data(),
                        [](float s, float b) {
                          if (b == Store::kUnscored) return s;  // no row of this item saw the key
                          return (s == Store::kUnscored ? 0.0f : s) + b;
                        });
    }
  }
  if constexpr (kLazyLayers) {
    LayerObservation& o = observations_[layer];
    for (double m : item_mass) o.mass += m;
    o.rows += tokens * shape_.q_heads;
  }
}

}  // namespace kvpack
