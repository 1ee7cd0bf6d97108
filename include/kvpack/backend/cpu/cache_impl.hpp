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

#include <Eigen/SVD>

namespace kvpack {

template <class Policy>
std::vector<float> KVCache<Policy, backend::Cpu>::pre_rope_rows(int layer, int head, int64_t tokens,
                                                                bool keys) const {
  // The first `tokens` rows of one head in fp32; keys un-rotated to pre-RoPE (exact inverse).
  const int d = shape_.head_dim;
  const auto& h = store(layer, head);
  std::vector<float> rows(static_cast<std::size_t>(tokens) * d);
  if (keys) {
    h.rows(d).load_keys(0, tokens, rows.data());
    const Rope rope(shape_.rope, d);
    for (int64_t t = 0; t < tokens; ++t) rope.unrotate(rows.data() + t * d, h.positions[t]);
  } else {
    h.rows(d).load_values(0, tokens, rows.data());
  }
  return rows;
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::factorize() {
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const int d = shape_.head_dim, heads = shape_.kv_heads;
  std::vector<std::shared_ptr<const detail::LowRankBasis>> bases;
  auto make_basis = [&](const RowMat& a) {
    auto basis = std::make_shared<detail::LowRankBasis>();
    basis->tokens = a.rows();
    basis->rank = static_cast<int>(a.cols());
    basis->rows.resize(a.size());
    detail::store_row(a.data(), basis->rows.data(), a.size());
    bases.push_back(basis);
    return std::shared_ptr<const detail::LowRankBasis>(basis);
  };
  // Factors of one side for layers [l0, l1): the stacked pre-RoPE matrix, its truncated SVD,
  // A = U (shared), B = Σ Vᵀ sliced per (layer, head).
  auto factor_group = [&](int l0, int l1, int64_t tokens, int rank, bool keys) {
    const int64_t cols = static_cast<int64_t>(l1 - l0) * heads * d;
    RowMat x(tokens, cols);
    for (int l = l0; l < l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        const auto rows = pre_rope_rows(l, h, tokens, keys);
        x.middleCols((static_cast<int64_t>(l - l0) * heads + h) * d, d) =
            Eigen::Map<const RowMat>(rows.data(), tokens, d);
      }
    }
    Eigen::BDCSVD<Eigen::MatrixXf> svd(x, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const RowMat a = svd.matrixU().leftCols(rank);
    auto basis = make_basis(a);
    std::vector<detail::LowRankFactor> factors;
    for (int l = l0; l < l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        detail::LowRankFactor f{basis, std::vector<float>(static_cast<std::size_t>(rank) * d)};
        const int64_t c0 = (static_cast<int64_t>(l - l0) * heads + h) * d;
        for (int j = 0; j < rank; ++j) {
          for (int i = 0; i < d; ++i) {
            f.b[j * d + i] = svd.singularValues()(j) * svd.matrixV()(c0 + i, j);
          }
        }
        factors.push_back(std::move(f));
      }
    }
    return factors;
  };

  if constexpr (kCrossLayer) {
    const CrossLayerSVD& p = policy_;
    for (int l0 = 0; l0 < shape_.layers; l0 += p.group_layers) {
      const int l1 = std::min(shape_.layers, l0 + p.group_layers);
      const auto& ref = store(l0, 0).positions;
      for (int l = l0; l < l1; ++l) {
        for (int h = 0; h < heads; ++h) {
          if (store(l, h).positions != ref) {
            throw error(
                detail::concat("KVCache::compress: CrossLayerSVD needs every layer and "
                               "head of a group to hold the same tokens; layer ",
                               l, " head ", h, " differs from layer ", l0));
          }
        }
      }
      const int64_t tokens = static_cast<int64_t>(ref.size());
      if (tokens == 0) continue;
      const int g = l1 - l0;
      const int64_t cols = static_cast<int64_t>(g) * heads * d;
      int rk = p.rank_k, rv = p.rank_v;
      if (rk == 0) {
        // Solve dense / ratio = (r_k + r_v)(2 T + 4 g H d) + 4 g H T for r_k + r_v.
        const double dense = 2.0 * g * heads * d * tokens * 2.0;
        const double total = (dense / p.target_ratio - 4.0 * g * heads * tokens) /
                             (2.0 * tokens + 4.0 * g * heads * d);
        rk = static_cast<int>(std::lround(0.4 * total));
        rv = static_cast<int>(std::lround(0.6 * total));
      }
      const int cap = static_cast<int>(std::min<int64_t>(tokens, cols));
      rk = std::clamp(rk, 1, cap);
      rv = std::clamp(rv, 1, cap);
      auto kf = factor_group(l0, l1, tokens, rk, true);
      auto vf = factor_group(l0, l1, tokens, rv, false);
      for (int l = l0; l < l1; ++l) {
        for (int h = 0; h < heads; ++h) {
          const std::size_t i = static_cast<std::size_t>(l - l0) * heads + h;
          store(l, h).set_factors(std::move(kf[i]), std::move(vf[i]), tokens, d);
        }
      }
    }
  } else {
    const ChannelShrink& p = policy_;
    const ChannelProjections& proj = *p.projections;
    for (int l = 0; l < shape_.layers; ++l) {
      const int64_t tokens = store(l, 0).size() - p.window;
      if (tokens <= 0) continue;
      for (bool keys : {true, false}) {
        const int rank = keys ? proj.rank_k[l] : proj.rank_v[l];
        const Eigen::Map<const RowMat> projection((keys ? proj.pk : proj.pv)[l].data(),
                                                  proj.channels(), rank);
        RowMat x(tokens, proj.channels());
        for (int h = 0; h < heads; ++h) {
          const auto rows = pre_rope_rows(l, h, tokens, keys);
          x.middleCols(static_cast<int64_t>(h) * d, d) =
              Eigen::Map<const RowMat>(rows.data(), tokens, d);
        }
        const RowMat latents = x * projection;
        auto basis = make_basis(latents);
        for (int h = 0; h < heads; ++h) {
          detail::LowRankFactor f{basis, std::vector<float>(static_cast<std::size_t>(rank) * d)};
          Eigen::Map<RowMat>(f.b.data(), rank, d) =
              projection.middleRows(static_cast<int64_t>(h) * d, d).transpose();
          auto& head = store(l, h);
          if (keys) {
            head.key = std::move(f);
          } else {
            head.set_factors(std::move(head.key), std::move(f), tokens, d);
          }
        }
      }
    }
  }
  bases_ = std::move(bases);
}

}  // namespace kvpack
