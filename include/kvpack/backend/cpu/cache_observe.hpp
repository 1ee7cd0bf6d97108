/// \file backend/cpu/cache_observe.hpp
/// \brief Out-of-line members of KVCache<Policy, backend::Cpu>: observe(), the softmax
/// probabilities of observed queries reduced per key (max or sum) or per layer (mass), and
/// attend_observe(), which computes the attention from the same scores.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <vector>

#include "../../policy/kvzap.hpp"
#include "../../policy/output_factors.hpp"
#include "cache.hpp"
#include "value_weights.hpp"

namespace kvpack {

template <class Policy>
void KVCache<Policy, backend::Cpu>::attend_observe(int layer, const ActivationView& q,
                                                   Positions positions, const OutputView& out,
                                                   Span<const float> query_weights) {
  // Every check of both calls first, so a refusal writes nothing (not even `out`).
  constexpr const char* where = "KVCache::attend_observe";
  checked_plan(where, layer, q, positions, out);
  this->check_observe_weights(where, q, query_weights);
  if constexpr (kQueryScores && kDenseRows) {
    observe_probabilities(layer, q, positions, query_weights, &out);
    observed_ = true;
  } else {
    attend(layer, q, positions, out);
    observe(layer, q, positions, query_weights);
  }
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::observe_probabilities(int layer, const ActivationView& q,
                                                          Positions positions,
                                                          Span<const float> query_weights,
                                                          const OutputView* out) {
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const int d = shape_.head_dim;
  const int g = shape_.group_size();
  const int heads = shape_.kv_heads;
  const int64_t tokens = q.tokens();
  // Work items: (kv head, block of query tokens). A block's rows share every packed key panel
  // while it is in L1; blocks give the parallelism (3 kv heads alone would idle cores).
  const int64_t block_tokens = std::max<int64_t>(1, cpu::kScoreRows / g);
  const int64_t blocks = (tokens + block_tokens - 1) / block_tokens;
  const int64_t items = heads * blocks;

  // The window's keys of each head, fp32 and packed once for all blocks; with output factors
  // (KVzip+), each window key's value weight per query head of the group. With `out`
  // (attend_observe), every held key is packed: the attention's strip holds each score once,
  // and the window's strip is cut from it.
  std::vector<cpu::PackedKeys> keys(heads);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> window(heads);
  std::vector<int64_t> window_size(heads, 0);
  const OutputFactors* factors = nullptr;
  bool displacement = false;
  if constexpr (kQueryScores) {
    factors = selection().value_weights();
    displacement = selection().value_weighting() == ValueWeighting::kDisplacement;
  }
  // Per head: the norms ‖R·v_j‖ of kNorm, or kDisplacement's u_j = R·v_j of each window key
  // and query head of the group.
  std::vector<std::vector<float>> value_rows(factors != nullptr ? heads : 0);
  std::vector<std::vector<float>> value_weights(factors != nullptr ? heads : 0);
  detail::parallel_for(executor(), heads, [&](int64_t h) {
    auto& head = store(layer, static_cast<int>(h));
    const auto all = cpu::window_ranges(head.positions.data(), head.size(), ScoreWindow::all());
    if constexpr (kQueryScores) {
      head.scores.resize(head.positions.size(), head.kUnscored);
      window[h] = cpu::window_ranges(head.positions.data(), head.size(), selection().window);
    } else {
      window[h] = all;
    }
    for (const auto& range : window[h]) window_size[h] += range.second - range.first;
    keys[h].pack(head.rows(d), d, out != nullptr ? all : window[h]);
    if (factors != nullptr) {
      const float* r = factors->head(layer, static_cast<int>(h) * g);
      if (displacement) {
        cpu::value_output_rows(head.rows(d), d, window[h], window_size[h], r, g, value_rows[h]);
      } else {
        cpu::value_output_norms(head.rows(d), d, window[h], window_size[h], r, g, value_weights[h]);
      }
    }
  });

  std::vector<double> item_mass(kLazyLayers ? items : 0, 0.0);
  // Sums are not exact like maxima: each work item keeps its own partial sums, merged below in
  // item order, so the scores do not depend on the thread count or timing.
  std::vector<std::vector<float>> item_sums(kSumScores ? items : 0);
  // Folds window-key values `b` of head h into its stored scores with `combine`.
  auto merge_into_scores = [&](int h, const float* b, auto combine) {
    float* scores = store(layer, h).scores.data();
    for (const auto& range : window[h]) {
      for (int64_t t = range.first; t < range.second; ++t) scores[t] = combine(scores[t], *b++);
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
    cpu::ScoreStrip strip, all;  // the window's probabilities; attend_observe: every key's
    std::vector<float> qrows;
    std::vector<int64_t> visible;
    RowMatrix attended;
    std::vector<float> value_tile;
    std::vector<float> scratch_p, scratch_w;  // displacement_weight_strip
    for (int64_t item; (item = next_item.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int h = static_cast<int>(item / blocks);
      const int64_t t0 = (item % blocks) * block_tokens;
      const int64_t tn = std::min(block_tokens, tokens - t0);
      const int rows = static_cast<int>(tn * g);
      gather_query_rows(layer, q, positions, h, t0, tn, qrows, visible);
      if (out != nullptr) {
        cpu::score_rows(keys[h], qrows.data(), rows, visible.data(), all);
        cpu::window_strip(all, rows, window[h], strip);
        cpu::softmax_strip(all, rows);
        // The attention: P · V over the keys each row sees (zeros past a row's limit), values
        // converted a tile at a time (no fp32 copy of the head), scaled by 1 / sum.
        const int64_t widest = *std::max_element(all.limit.begin(), all.limit.end());
        for (int r = 0; r < rows; ++r) {
          std::fill(all.values.data() + r * all.stride + all.limit[r],
                    all.values.data() + r * all.stride + widest, 0.0f);
        }
        attended.setZero(rows, d);
        constexpr int64_t kValueTile = 256;
        const auto held = store(layer, h).rows(d);
        for (int64_t j0 = 0; j0 < widest; j0 += kValueTile) {
          const int64_t n = std::min(kValueTile, widest - j0);
          value_tile.resize(static_cast<std::size_t>(n) * d);
          held.load_values(j0, n, value_tile.data());
          attended.noalias() +=
              Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>>(
                  all.values.data() + j0, rows, n, Eigen::OuterStride<>(all.stride)) *
              Eigen::Map<const RowMatrix>(value_tile.data(), n, d);
        }
        for (int r = 0; r < rows; ++r) {
          attended.row(r) *= all.inv_sum[r];
          out->store(t0 + r / g, static_cast<int64_t>(h) * g + r % g, attended.row(r).data());
        }
      } else {
        cpu::score_strip(keys[h], qrows.data(), rows, visible.data(), strip);
      }
      if (displacement) {  // from the plain probabilities: before the query weights
        cpu::displacement_weight_strip(strip, rows, g, value_rows[h].data(), window_size[h], d,
                                       scratch_p, scratch_w);
      }
      if (!query_weights.empty() || (factors != nullptr && !displacement)) {
        cpu::weight_strip(strip, rows, g, query_weights.empty() ? nullptr : &query_weights[t0],
                          factors != nullptr && !displacement ? value_weights[h].data() : nullptr,
                          window_size[h]);
      }
      if constexpr (kSumScores) {
        item_sums[item].assign(window_size[h], Store::kUnscored);
        cpu::sum_probabilities(strip, rows, item_sums[item].data());
      } else if constexpr (kQueryScores) {
        if (best[h].empty()) best[h].assign(window_size[h], Store::kUnscored);
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

template <class Policy>
void KVCache<Policy, backend::Cpu>::observe_hidden(int layer, const ActivationView& x,
                                                   Positions positions) {
  static_assert(kHiddenScores, "observe_hidden() needs a policy scored by hidden states (KVzap)");
  constexpr const char* where = "KVCache::observe_hidden";
  const HiddenScorer& scorer = selection().hidden_scorer();
  this->check_hidden_shape(where, layer, x, positions, scorer.hidden);
  detail::check_values(where, "x", x, std::numeric_limits<float>::max());
  // Every log-score first (one GEMM over x: read in place when it is fp32, else converted),
  // then the stores.
  const int64_t n = x.tokens();
  const int heads = shape_.kv_heads;
  const float* rows = x.f32_row(0, 0);
  int64_t stride = n > 1 && rows != nullptr ? x.f32_row(1, 0) - rows : scorer.hidden;
  std::vector<float> converted;
  if (rows == nullptr) {
    converted.resize(static_cast<std::size_t>(n) * scorer.hidden);
    for (int64_t t = 0; t < n; ++t) x.load(t, 0, converted.data() + t * scorer.hidden);
    rows = converted.data();
  }
  std::vector<float> log_scores(static_cast<std::size_t>(n) * heads);
  scorer.score(layer, rows, n, stride, log_scores.data());
  for (std::size_t i = 0; i < log_scores.size(); ++i) {
    if (!std::isfinite(log_scores[i])) this->refuse_non_finite_log_score(where, i, positions);
  }
  for (int h = 0; h < heads; ++h) {
    Store& head = store(layer, h);
    head.scores.resize(head.positions.size(), Store::kUnscored);
    for (int64_t t = 0; t < n; ++t) {
      const auto it = std::lower_bound(head.positions.begin(), head.positions.end(), positions[t]);
      if (it == head.positions.end() || *it != positions[t]) continue;  // evicted from this head
      head.scores[it - head.positions.begin()] =
          Selection::stored_score(log_scores[static_cast<std::size_t>(t) * heads + h]);
    }
  }
  observed_ = true;
}

template <class Policy>
HeadScores KVCache<Policy, backend::Cpu>::head_scores() const {
  static_assert(kQueryScores, "head_scores() needs a policy scored by observe() queries");
  constexpr const char* where = "KVCache::head_scores";
  detail::require(observed_, where, "observe()", "never called",
                  "a repeat pass handed to observe() first");
  HeadScores out;
  out.layers = shape_.layers;
  out.kv_heads = shape_.kv_heads;
  out.score.assign(heads_.size(), 0.0f);
  for (int l = 0; l < shape_.layers; ++l) {
    out.sample_tokens = std::max(out.sample_tokens, layers_[l].appended);
    const int64_t first_unprotected = layers_[l].first_position + selection().budget.sink_tokens;
    for (int h = 0; h < shape_.kv_heads; ++h) {
      bool any = false;
      const Store& head = store(l, h);
      float& best = out.score[static_cast<std::size_t>(l) * shape_.kv_heads + h];
      for (std::size_t t = 0; t < head.scores.size(); ++t) {
        const float s = head.scores[t];
        if (s == Store::kUnscored || head.positions[t] < first_unprotected) continue;
        best = std::max(best, s);
        any = true;
      }
      detail::require(any, where, "scored tokens of layer/head", detail::concat(l, "/", h),
                      "at least one (observe() queries over the held tokens)");
    }
  }
  return out;
}

template <class Policy>
std::vector<float> KVCache<Policy, backend::Cpu>::token_scores(int layer, int head) const {
  static_assert(kStoredScores,
                "token_scores() needs a policy that scores tokens (observe() or observe_hidden())");
  this->check_head("KVCache::token_scores", layer, head);
  const Store& s = store(layer, head);
  std::vector<float> out(static_cast<std::size_t>(s.size()), std::nanf(""));
  for (std::size_t t = 0; t < s.scores.size() && t < out.size(); ++t) {
    if (s.scores[t] != Store::kUnscored) out[t] = s.scores[t];
  }
  return out;
}

}  // namespace kvpack
