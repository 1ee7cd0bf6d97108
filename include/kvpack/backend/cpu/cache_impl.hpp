/// \file backend/cpu/cache_impl.hpp
/// \brief Out-of-line members of KVCache<Policy, backend::Cpu>: attention and eviction.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cache.hpp"
#include "low_rank_attention.hpp"

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
  // Low-rank heads of a layer share their token basis: one work item covers every kv head of a
  // (query block, key split), so a basis tile is converted and multiplied once for all heads.
  // Factored keys cost a rank-r rebuild per token: shorter key splits.
  const int item_heads = kLowRank ? shape_.kv_heads : 1;
  const int64_t head_groups = shape_.kv_heads / item_heads;
  const int64_t split_tokens = kLowRank ? 512 : 2048;
  const int64_t splits =
      blocks * head_groups >= 4 ? 1 : std::clamp<int64_t>(longest / split_tokens, 1, 8);
  const int64_t items = head_groups * blocks * splits;
  // Partial states per (kv head, block, split), whichever heads an item covers.
  std::vector<cpu::PartialState> partial(static_cast<std::size_t>(shape_.kv_heads) * blocks *
                                         splits);

#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic)
#endif
  for (int64_t item = 0; item < items; ++item) {
    const int h0 = static_cast<int>(item / (blocks * splits)) * item_heads;
    const int64_t block = (item / splits) % blocks;
    const int64_t split = item % splits;
    const int64_t t0 = block * block_tokens;
    const int64_t tn = std::min(block_tokens, tokens - t0);
    const int rows = static_cast<int>(tn * g);
    int64_t size = 0;  // the longest head of the item (a layer's heads hold the same tokens)
    for (int i = 0; i < item_heads; ++i) size = std::max(size, store(layer, h0 + i).size());
    const int64_t span = (size + splits - 1) / splits;
    const int64_t begin = split * span, end = std::min(size, (split + 1) * span);
    std::vector<float> scratch;
    auto state = [&](int h) -> cpu::PartialState& {
      return partial[(static_cast<int64_t>(h) * blocks + block) * splits + split];
    };
    if constexpr (kLowRank) {
      std::vector<std::vector<float>> qrows(item_heads);
      std::vector<std::vector<int64_t>> visible(item_heads);
      std::vector<cpu::LowRankQuery> query(item_heads);
      for (int i = 0; i < item_heads; ++i) {
        gather_query_rows(layer, q, positions, h0 + i, t0, tn, qrows[i], visible[i]);
        state(h0 + i).reset(rows, d);
        query[i] = {&store(layer, h0 + i), qrows[i].data(), visible[i].data(), &state(h0 + i)};
      }
      cpu::attend_low_rank_heads(query.data(), item_heads, d, rows, begin, end, scratch);
    } else {
      std::vector<float> qrows;
      std::vector<int64_t> visible;
      gather_query_rows(layer, q, positions, h0, t0, tn, qrows, visible);
      state(h0).reset(rows, d);
      cpu::attend_rows(store(layer, h0).rows(d), d, qrows.data(), rows, visible.data(), begin, end,
                       state(h0), scratch);
    }
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
  const int heads = shape_.kv_heads;
  const int64_t tokens = q.tokens();
  // Work items: (kv head, block of query tokens). A block's rows share every packed key panel
  // while it is in L1; blocks give the parallelism (3 kv heads alone would idle cores).
  const int64_t block_tokens = std::max<int64_t>(1, cpu::kScoreRows / g);
  const int64_t blocks = (tokens + block_tokens - 1) / block_tokens;
  const int64_t items = heads * blocks;

  // The window's keys of each head, fp32 and packed once for all blocks.
  std::vector<cpu::PackedKeys> keys(heads);
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic)
#endif
  for (int h = 0; h < heads; ++h) {
    auto& head = store(layer, h);
    if constexpr (kQueryScores) {
      head.scores.resize(head.positions.size(), head.kUnscored);
      keys[h].pack(head.rows(d), d,
                   cpu::window_ranges(head.positions.data(), head.size(), selection().window));
    } else {
      keys[h].pack(head.rows(d), d,
                   cpu::window_ranges(head.positions.data(), head.size(), ScoreWindow::all()));
    }
  }

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
#if defined(_OPENMP)
#pragma omp parallel
#endif
  {
    // Per thread: the max probability of each window key over this thread's blocks (a max is
    // exact, so merging the threads in any order gives the same scores).
    std::vector<std::vector<float>> best(kQueryScores && !kSumScores ? heads : 0);
    cpu::ScoreStrip strip;
    std::vector<float> qrows;
    std::vector<int64_t> visible;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic) nowait
#endif
    for (int64_t item = 0; item < items; ++item) {
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
#if defined(_OPENMP)
#pragma omp critical(kvpack_observe_merge)
#endif
      for (int h = 0; h < heads; ++h) {
        if (best[h].empty()) continue;
        merge_into_scores(h, best[h].data(), [](float s, float b) { return std::max(s, b); });
      }
    }
  }
  if constexpr (kSumScores) {
    for (int64_t item = 0; item < items; ++item) {
      merge_into_scores(static_cast<int>(item / blocks), item_sums[item].data(), [](float s, float b) {
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
void KVCache<Policy, backend::Cpu>::quantize() {
  const int d = shape_.head_dim;
  const int64_t residual = Stages::quant_knobs(policy_)->residual;
  const int64_t heads = static_cast<int64_t>(heads_.size());
  // Work items: (head, run of groups), so a layer's few heads still fill every thread.
  constexpr int64_t kGroupsPerItem = 8;
  std::vector<int64_t> counts(heads), first_item(heads + 1, 0);
  for (int64_t i = 0; i < heads; ++i) {
    counts[i] = heads_[i].quantizable(residual);
    if (counts[i] > 0) heads_[i].reserve_blocks(counts[i], d);
    const int64_t groups = counts[i] / heads_[i].group;
    first_item[i + 1] = first_item[i] + (groups + kGroupsPerItem - 1) / kGroupsPerItem;
  }
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic)
#endif
  for (int64_t item = 0; item < first_item[heads]; ++item) {
    const int64_t i =
        std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin() - 1;
    const int64_t g0 = (item - first_item[i]) * kGroupsPerItem;
    const int64_t groups = counts[i] / heads_[i].group;
    heads_[i].quantize_groups(g0, std::min(groups, g0 + kGroupsPerItem), d);
  }
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic)
#endif
  for (int64_t i = 0; i < heads; ++i) {
    if (counts[i] > 0) heads_[i].commit_quantized(counts[i], d);
  }
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::trim_lazy_layers() {
  const int d = shape_.head_dim;
  for (int l = 0; l < shape_.layers; ++l) {
    LayerObservation& o = observations_[l];
    if (o.lazy < 0 && o.rows > 0)
      o.lazy = o.mass / static_cast<double>(o.rows) > selection().threshold;
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
  for (int l = knobs.skip_layers; l < shape_.layers; ++l) {
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
  std::vector<std::vector<float>> scores(n_targets);
  std::vector<detail::SelectionHead> selection(n_targets);
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic)
#endif
  for (int64_t i = 0; i < n_targets; ++i) {
    const auto& head = store(targets[i].layer, targets[i].head);
    const detail::LayerState& state = layers_[targets[i].layer];
    scores[i].resize(head.size());
    int64_t unscored = 0;  // tokens the policy has no score for yet
    if constexpr (kHeadLevel) {
      // No token scores (resize() zeroed them): the head's target below decides.
    } else if constexpr (kQueryScores) {
      // Tokens no observed query saw (appended after scoring: the question, decode tokens) rank
      // above everything and are kept outside the budget, which applies to the scored tokens.
      // Counting them against it would squeeze the scored context out as decoding goes on.
      float* s = scores[i].data();
      for (int64_t t = 0; t < head.size(); ++t) {
        s[t] = t < static_cast<int64_t>(head.scores.size()) ? head.scores[t] : head.kUnscored;
      }
      knobs.finalize_scores(s, head.size());  // e.g. SnapKV's pooling
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
                    kHeadLevel ? (whole[i] ? head.size() : 0)
                               : budget.target(state.appended - unscored) + unscored,
                    state.first_position + budget.sink_tokens,
                    state.last_position - budget.recent_tokens};
  }
  std::vector<std::vector<int64_t>> kept;
  if (budget.scope == BudgetScope::kGlobal && !kHeadLevel) {
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

#include <exception>
#include <memory>
#include <tuple>
#include <utility>

#include "../../linalg/truncated_svd.hpp"

namespace kvpack {

template <class Policy>
std::vector<float> KVCache<Policy, backend::Cpu>::pre_rope_rows(int layer, int head, int64_t tokens,
                                                                bool keys) const {
  // The first `tokens` rows of one head in fp32; keys pre-RoPE (factored rows are held pre-RoPE,
  // exact rows are un-rotated: an exact inverse up to fp32 rounding).
  const int d = shape_.head_dim;
  const auto rows_of = store(layer, head).rows(d);
  std::vector<float> rows(static_cast<std::size_t>(tokens) * d);
  if (keys) {
    rows_of.load_pre_rope_keys(0, tokens, rows.data());
  } else {
    rows_of.load_values(0, tokens, rows.data());
  }
  return rows;
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::factorize() {
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  constexpr const char* where = "KVCache::compress";
  const int d = shape_.head_dim, heads = shape_.kv_heads;
  // One job per (layers [l0, l1), side): its stacked pre-RoPE matrix becomes a shared basis and
  // one factor per (layer, head). Every job runs before anything held changes, so a refused rank,
  // heads holding different tokens or a failure inside the SVD leave the cache as it was.
  struct Job {
    int l0, l1;
    bool keys;
    int rank;
    int64_t tokens;
    std::vector<detail::LowRankFactor> factors;  // (layer − l0) · heads + head
  };
  std::vector<Job> jobs;
  auto require_same_tokens = [&](int l0, int l1, const char* what) {
    const auto& ref = store(l0, 0).positions;
    for (int l = l0; l < l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        if (store(l, h).positions != ref) {
          throw error(detail::concat(where, ": ", what, " needs every head",
                                     l1 - l0 > 1 ? " and layer" : "",
                                     " it factors together to hold the same tokens; layer ", l,
                                     " head ", h, " differs from layer ", l0, " head 0"));
        }
      }
    }
  };
  // Compose<…, Quantize>: the bases are quantized, and ranks derived from a target ratio pay
  // for basis values at the quantized cost (the quantizer's share of the budget is fixed).
  const Quantize* quant = Stages::quant_knobs(policy_);
  const int basis_bits = quant ? quant->bits : 0;
  const int basis_group = quant ? quant->group : 32;
  if constexpr (kCrossLayer) {
    const CrossLayerSVD& p = selection();
    for (int l0 = 0; l0 < shape_.layers; l0 += p.group_layers) {
      const int l1 = std::min(shape_.layers, l0 + p.group_layers);
      require_same_tokens(l0, l1, "CrossLayerSVD");
      const int64_t tokens = store(l0, 0).size();
      if (tokens == 0) continue;
      const int64_t cols = static_cast<int64_t>(l1 - l0) * heads * d;
      const int64_t cap = std::min(tokens, cols);
      int rk = p.rank_k, rv = p.rank_v;
      if (rk > 0) {
        for (const auto& [name, rank] :
             {std::pair<const char*, int>{"rank_k", rk}, {"rank_v", rv}}) {
          if (rank > cap) {
            throw error(detail::concat(
                where, ": CrossLayerSVD ", name, " = ", rank, ", expected at most min(tokens, ",
                "columns) = ", cap, " for layers [", l0, ", ", l1, "), which hold ", tokens,
                " tokens x ", cols, " columns (compress once at least ", rank,
                " tokens are held, or derive the ranks from target_ratio)"));
          }
        }
      } else {
        std::tie(rk, rv) = CrossLayerSVD::ranks_for_ratio(tokens, l1 - l0, heads, d, p.target_ratio,
                                                          quant ? quant->bytes_per_value() : 2.0);
        rk = static_cast<int>(std::clamp<int64_t>(rk, 1, cap));
        rv = static_cast<int>(std::clamp<int64_t>(rv, 1, cap));
      }
      jobs.push_back({l0, l1, true, rk, tokens, {}});
      jobs.push_back({l0, l1, false, rv, tokens, {}});
    }
  } else {
    const ChannelShrink& p = selection();
    for (int l = 0; l < shape_.layers; ++l) {
      // Tokens factored by an earlier compress() stay factored even if `window` grew since.
      const int64_t tokens = std::max(store(l, 0).size() - p.window, store(l, 0).factored);
      if (tokens <= 0) continue;
      require_same_tokens(l, l + 1, "ChannelShrink");
      jobs.push_back({l, l + 1, true, p.projections->rank_k[l], tokens, {}});
      jobs.push_back({l, l + 1, false, p.projections->rank_v[l], tokens, {}});
    }
  }

  auto run = [&](Job& job) {
    const int64_t cols = static_cast<int64_t>(job.l1 - job.l0) * heads * d;
    RowMat x(job.tokens, cols);
    for (int l = job.l0; l < job.l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        const auto rows = pre_rope_rows(l, h, job.tokens, job.keys);
        x.middleCols((static_cast<int64_t>(l - job.l0) * heads + h) * d, d) =
            Eigen::Map<const RowMat>(rows.data(), job.tokens, d);
      }
    }
    auto basis = std::make_shared<detail::LowRankBasis>();
    // Holds A (tokens × rank) and, from `bt` (cols × rank, rows are channels), B of each
    // (layer, head): rank × d. Columns of A beyond the storage range are scaled down by a power
    // of two and the matching rows of B (fp32) up by it, so A·B is unchanged.
    auto add_factors = [&](RowMat& a, const auto& bt) {
      const Eigen::VectorXf scale = detail::fit_basis_range(a.data(), job.tokens, job.rank, where);
      basis->assign(a.data(), job.tokens, job.rank, basis_bits, basis_group);
      for (int64_t c0 = 0; c0 < cols; c0 += d) {
        detail::LowRankFactor f{basis, std::vector<float>(static_cast<std::size_t>(job.rank) * d)};
        Eigen::Map<RowMat>(f.b.data(), job.rank, d) =
            (bt.middleRows(c0, d) * scale.asDiagonal()).transpose();
        job.factors.push_back(std::move(f));
      }
    };
    if constexpr (kCrossLayer) {
      // X ≈ U Σ Vᵀ: A = U shared by the group, B of (layer, head) = Σ V[columns of that head]ᵀ.
      SvdOptions options;
      options.route = selection().svd_route;
      options.rank = job.rank;
      const SvdFactors f =
          truncated_svd(Eigen::Map<const RowMajorMatrixXf>(x.data(), x.rows(), cols), options);
      RowMat a = f.U;
      add_factors(a, Eigen::MatrixXf(f.V * f.S.asDiagonal()));
    } else {
      // Latents Z = X P (tokens × rank) shared by the layer's heads, B of a head = P[its rows]ᵀ.
      const ChannelProjections& proj = *selection().projections;
      const Eigen::Map<const RowMat> projection((job.keys ? proj.pk : proj.pv)[job.l0].data(), cols,
                                                job.rank);
      RowMat latents = x * projection;
      add_factors(latents, projection);
    }
  };
  // Jobs are independent: two threads factor two groups at once (the SVD's double-precision
  // Gram matrix and tridiagonalisation are single-threaded; Eigen's GEMMs see the parallel
  // region and stay on their thread). Exceptions cannot leave an OpenMP region: keep the first.
  std::vector<std::exception_ptr> failures(jobs.size());
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic) if (n_jobs > 1)
#endif
  for (int64_t i = 0; i < n_jobs; ++i) {
    try {
      run(jobs[i]);
    } catch (...) {
      failures[i] = std::current_exception();
    }
  }
  for (const auto& failure : failures) {
    if (failure) std::rethrow_exception(failure);
  }

  // Commit: jobs come in (keys, values) pairs of the same layers and tokens.
  for (std::size_t i = 0; i + 1 < jobs.size(); i += 2) {
    Job& k = jobs[i];
    Job& v = jobs[i + 1];
    for (int l = k.l0; l < k.l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        const std::size_t f = static_cast<std::size_t>(l - k.l0) * heads + h;
        store(l, h).set_factors(std::move(k.factors[f]), std::move(v.factors[f]), k.tokens, d);
      }
    }
  }
  collect_bases();
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::collect_bases() {
  // Bases held: each shared basis once, whichever heads still point to it.
  std::vector<std::shared_ptr<const detail::LowRankBasis>> bases;
  for (const auto& head : heads_) {
    for (const auto* side : {&head.key, &head.value}) {
      if (side->basis && std::find(bases.begin(), bases.end(), side->basis) == bases.end()) {
        bases.push_back(side->basis);
      }
    }
  }
  bases_ = std::move(bases);
}

}  // namespace kvpack
