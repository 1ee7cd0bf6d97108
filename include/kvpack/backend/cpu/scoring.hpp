/// \file backend/cpu/scoring.hpp
/// \brief Softmax attention probabilities of observed queries, reduced per key without ever
/// holding the queries × keys matrix: two streaming passes over key tiles (max/denominator,
/// then normalised probabilities handed to a reducer). Memory stays O(keys) per head.
#pragma once

#include "../../config.hpp"
// clang-format off
#include <Eigen/Core>
// clang-format on
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "../../detail/convert.hpp"
#include "../../detail/online_softmax.hpp"
#include "../../policy/score_window.hpp"
#include "attention.hpp"

namespace kvpack {
namespace cpu {

/// Index ranges [first, second) of `positions` (ascending) that fall inside `window`.
inline std::vector<std::pair<int64_t, int64_t>> window_ranges(const int32_t* positions, int64_t n,
                                                              const ScoreWindow& window) {
  auto index_of = [&](int64_t pos) {  // first index with position >= pos
    if (pos <= 0) return int64_t{0};
    if (pos > positions[n - 1]) return n;
    return static_cast<int64_t>(std::lower_bound(positions, positions + n, pos) - positions);
  };
  std::vector<std::pair<int64_t, int64_t>> ranges;
  auto add = [&](int64_t a, int64_t b) {
    if (a >= b) return;
    if (!ranges.empty() && a <= ranges.back().second) {
      ranges.back().second = std::max(ranges.back().second, b);
    } else {
      ranges.push_back({a, b});
    }
  };
  if (n == 0) return ranges;
  const int64_t chunk_end = window.end == INT64_MAX ? n : index_of(window.end + 1);
  add(0, index_of(window.sink_end));
  add(index_of(window.begin), chunk_end);
  add(window.tail_begin == INT64_MAX ? n : index_of(window.tail_begin), n);
  return ranges;
}

/// Softmax probabilities of `rows` query rows (row-major rows × d, pre-scaled by 1/sqrt(d))
/// over the keys of `head` inside `ranges`, causal (row r sees indices < visible[r]).
/// Calls reduce(row, key_index, probability) for every visible key in the ranges.
template <class Rows, class Reduce>
void for_each_probability(const Rows& head, int d, const float* q, int rows, const int64_t* visible,
                          const std::vector<std::pair<int64_t, int64_t>>& ranges, Reduce&& reduce) {
  using ConstVec = Eigen::Map<const Eigen::VectorXf>;
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::vector<float> max(rows, detail::neg_inf()), sum(rows, 0.0f), kt(kAttentionTile * d),
      s(static_cast<std::size_t>(rows) * kAttentionTile);
  auto scores_of_tile = [&](int64_t t0, int64_t tn) {
    head.load_keys(t0, tn, kt.data());
    if (rows >= kGemmRows) {
      Eigen::Map<RowMat>(s.data(), rows, tn).noalias() =
          Eigen::Map<const RowMat>(q, rows, d) *
          Eigen::Map<const RowMat>(kt.data(), tn, d).transpose();
      return;
    }
    for (int r = 0; r < rows; ++r) {
      ConstVec qr(q + r * d, d);
      for (int64_t i = 0; i < tn; ++i) s[r * tn + i] = qr.dot(ConstVec(kt.data() + i * d, d));
    }
  };
  auto visible_in_tile = [&](int r, int64_t t0, int64_t tn) {
    return std::clamp<int64_t>(visible[r] - t0, 0, tn);
  };
  for (int pass = 0; pass < 2; ++pass) {
    for (const auto& range : ranges) {
      for (int64_t t0 = range.first; t0 < range.second; t0 += kAttentionTile) {
        const int64_t tn = std::min(kAttentionTile, range.second - t0);
        scores_of_tile(t0, tn);
        for (int r = 0; r < rows; ++r) {
          const float* sr = s.data() + r * tn;
          const int64_t vis = visible_in_tile(r, t0, tn);
          if (pass == 0) {
            float tile_max = detail::neg_inf();
            for (int64_t i = 0; i < vis; ++i) tile_max = std::max(tile_max, sr[i]);
            if (vis == 0) continue;
            const float new_max = std::max(max[r], tile_max);
            float acc = sum[r] * detail::softmax_rescale(max[r], new_max);
            for (int64_t i = 0; i < vis; ++i) acc += std::exp(sr[i] - new_max);
            sum[r] = acc;
            max[r] = new_max;
          } else {
            const float inv = 1.0f / sum[r];
            for (int64_t i = 0; i < vis; ++i) reduce(r, t0 + i, std::exp(sr[i] - max[r]) * inv);
          }
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace kvpack
