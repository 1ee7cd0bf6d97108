/// \file backend/cpu/cache_impl.hpp
/// \brief Out-of-line members of KVCache<Policy, backend::Cpu>: attention and eviction.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cache.hpp"

namespace kvpack {

template <class Policy>
void KVCache<Policy, backend::Cpu>::attend_unchecked(int layer, const ActivationView& q,
                                                     Positions positions,
                                                     const OutputView& out) const {
  const int d = shape_.head_dim;
  const int g = shape_.group_size();
  const int64_t tokens = q.tokens();
  // Work items: (kv head, block of query tokens, split of the keys). Query blocks bound the
  // rows a tile is reused by; key splits give decode (few rows) parallelism over long caches.
  const int64_t block_tokens = std::max<int64_t>(1, 64 / g);
  const int64_t blocks = (tokens + block_tokens - 1) / block_tokens;
  int64_t longest = 0;
  for (int h = 0; h < shape_.kv_heads; ++h) longest = std::max(longest, store(layer, h).size());
  const int64_t splits =
      blocks * shape_.kv_heads >= 4 ? 1 : std::clamp<int64_t>(longest / 2048, 1, 8);
  const int64_t items = shape_.kv_heads * blocks * splits;
  std::vector<cpu::PartialState> partial(items);

#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic)
#endif
  for (int64_t item = 0; item < items; ++item) {
    const int h = static_cast<int>(item / (blocks * splits));
    const int64_t block = (item / splits) % blocks;
    const int64_t split = item % splits;
    const auto& head = store(layer, h);
    const auto rows_of = head.rows(d);
    const int64_t t0 = block * block_tokens;
    const int64_t tn = std::min(block_tokens, tokens - t0);
    const int rows = static_cast<int>(tn * g);
    std::vector<float> qrows, scratch;
    std::vector<int64_t> visible;
    gather_query_rows(layer, q, positions, h, t0, tn, qrows, visible);
    const int64_t span = (head.size() + splits - 1) / splits;
    partial[item].reset(rows, d);
    cpu::attend_rows(rows_of, d, qrows.data(), rows, visible.data(), split * span,
                     std::min(head.size(), (split + 1) * span), partial[item], scratch);
  }

  // Merge the key splits of each (head, block) and normalise.
  for (int h = 0; h < shape_.kv_heads; ++h) {
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t first = (static_cast<int64_t>(h) * blocks + block) * splits;
      cpu::PartialState& acc = partial[first];
      const int rows = static_cast<int>(acc.max.size());
      for (int64_t s = 1; s < splits; ++s) {
        const cpu::PartialState& other = partial[first + s];
        for (int r = 0; r < rows; ++r) {
          detail::softmax_merge(acc.max[r], acc.sum[r], acc.acc.data() + r * d, other.max[r],
                                other.sum[r], other.acc.data() + r * d, d);
        }
      }
      for (int r = 0; r < rows; ++r) {
        const int64_t t = block * block_tokens + r / g;
        float* dst = out.row(t, static_cast<int64_t>(h) * g + r % g);
        const float inv = 1.0f / acc.sum[r];
        for (int i = 0; i < d; ++i) dst[i] = acc.acc[r * d + i] * inv;
      }
    }
  }
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::gather_query_rows(int layer, const ActivationView& q,
                                                      Positions positions, int head, int64_t t0,
                                                      int64_t tn, std::vector<float>& rows,
                                                      std::vector<int64_t>& visible) const {
  // Rows of the GQA group of kv head `head` for query tokens [t0, t0 + tn), scaled by
  // 1/sqrt(d), and how many held keys each row may see (causal by position).
  const int d = shape_.head_dim;
  const int g = shape_.group_size();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const auto& held = store(layer, head).positions;
  rows.resize(static_cast<std::size_t>(tn) * g * d);
  visible.resize(static_cast<std::size_t>(tn) * g);
  for (int64_t t = 0; t < tn; ++t) {
    const int64_t vis =
        std::upper_bound(held.begin(), held.end(), positions[t0 + t]) - held.begin();
    for (int j = 0; j < g; ++j) {
      const int64_t r = t * g + j;
      q.load(t0 + t, static_cast<int64_t>(head) * g + j, rows.data() + r * d);
      for (int i = 0; i < d; ++i) rows[r * d + i] *= scale;
      visible[r] = vis;
    }
  }
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::observe_probabilities(int layer, const ActivationView& q,
                                                          Positions positions) {
  const int d = shape_.head_dim;
  const int g = shape_.group_size();
  const int64_t tokens = q.tokens();
  const int64_t block_tokens = std::max<int64_t>(1, 256 / g);
  std::vector<double> head_mass(shape_.kv_heads, 0.0);
  // One kv head per work item: the per-key reduction (a max) then needs no synchronisation.
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic)
#endif
  for (int h = 0; h < shape_.kv_heads; ++h) {
    auto& head = store(layer, h);
    const auto rows_of = head.rows(d);
    std::vector<float> qrows;
    std::vector<int64_t> visible;
    if constexpr (kQueryScores) {
      head.scores.resize(head.positions.size(), head.kUnscored);
    }
    const auto ranges = [&] {
      if constexpr (kQueryScores) {
        return cpu::window_ranges(head.positions.data(), head.size(), selection().window);
      } else {
        return cpu::window_ranges(head.positions.data(), head.size(), ScoreWindow::all());
      }
    }();
    for (int64_t t0 = 0; t0 < tokens; t0 += block_tokens) {
      const int64_t tn = std::min(block_tokens, tokens - t0);
      gather_query_rows(layer, q, positions, h, t0, tn, qrows, visible);
      if constexpr (kQueryScores) {
        float* scores = head.scores.data();
        cpu::for_each_probability(rows_of, d, qrows.data(), static_cast<int>(tn * g),
                                  visible.data(), ranges, [&](int, int64_t key, float p) {
                                    if (p > scores[key]) scores[key] = p;
                                  });
      } else {
        const int64_t first = layers_[layer].first_position;
        double mass = 0.0;
        cpu::for_each_probability(
            rows_of, d, qrows.data(), static_cast<int>(tn * g), visible.data(), ranges,
            [&](int r, int64_t key, float p) {
              if (selection().in_kept_set(head.positions[key], first, positions[t0 + r / g])) {
                mass += p;
              }
            });
        head_mass[h] += mass;
      }
    }
  }
  if constexpr (kLazyLayers) {
    LayerObservation& o = observations_[layer];
    for (double m : head_mass) o.mass += m;
    o.rows += tokens * shape_.q_heads;
  }
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::trim_lazy_layers() {
  const int d = shape_.head_dim;
  for (int l = 0; l < shape_.layers; ++l) {
    LayerObservation& o = observations_[l];
    if (o.lazy < 0 && o.rows > 0) o.lazy = o.mass / static_cast<double>(o.rows) > selection().threshold;
    if (o.lazy != 1) continue;
    const detail::LayerState& state = layers_[l];
    for (int h = 0; h < shape_.kv_heads; ++h) {
      auto& head = store(l, h);
      std::vector<int64_t> kept;
      for (int64_t t = 0; t < head.size(); ++t) {
        if (selection().in_kept_set(head.positions[t], state.first_position,
                                    state.last_position)) {
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
  for (int l = knobs.skip_layers; l < shape_.layers; ++l) {
    const detail::LayerState& state = layers_[l];
    if (state.appended == 0 || state.appended < knobs.min_tokens) continue;
    for (int h = 0; h < shape_.kv_heads; ++h) targets.push_back({l, h});
  }
  const int64_t n_targets = static_cast<int64_t>(targets.size());
  std::vector<std::vector<float>> scores(n_targets);
  std::vector<detail::SelectionHead> selection(n_targets);
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic)
#endif
  for (int64_t i = 0; i < n_targets; ++i) {
    const auto& head = store(targets[i].layer, targets[i].head);
    const detail::LayerState& state = layers_[targets[i].layer];
    scores[i].resize(head.size());
    if constexpr (kQueryScores) {
      // Tokens no observed query saw (appended after scoring) rank above everything.
      for (int64_t t = 0; t < head.size(); ++t) {
        const bool scored =
            t < static_cast<int64_t>(head.scores.size()) && head.scores[t] != head.kUnscored;
        scores[i][t] = scored ? head.scores[t] : std::numeric_limits<float>::infinity();
      }
    } else {
      // Score fp32 rows decoded tile by tile, whatever the store's format.
      const auto rows_of = head.rows(d);
      std::vector<float> kt(cpu::kAttentionTile * d), vt(cpu::kAttentionTile * d);
      for (int64_t t0 = 0; t0 < head.size(); t0 += cpu::kAttentionTile) {
        const int64_t tn = std::min(cpu::kAttentionTile, head.size() - t0);
        rows_of.load_keys(t0, tn, kt.data());
        rows_of.load_values(t0, tn, vt.data());
        for (int64_t t = 0; t < tn; ++t) {
          scores[i][t0 + t] = Selection::token_score(kt.data() + t * d, vt.data() + t * d, d);
        }
      }
    }
    selection[i] = {scores[i].data(),
                    head.positions.data(),
                    head.size(),
                    budget.target(state.appended),
                    state.first_position + budget.sink_tokens,
                    state.last_position - budget.recent_tokens};
  }
  std::vector<std::vector<int64_t>> kept;
  if (budget.scope == BudgetScope::kGlobal) {
    kept = detail::select_global(selection);
  } else {
    kept.resize(n_targets);
    for (int64_t i = 0; i < n_targets; ++i) kept[i] = detail::select_top_k(selection[i]);
  }
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic)
#endif
  for (int64_t i = 0; i < n_targets; ++i) {
    auto& head = store(targets[i].layer, targets[i].head);
    if (static_cast<int64_t>(kept[i].size()) < head.size()) head.keep(kept[i], d);
  }
}

}  // namespace kvpack
