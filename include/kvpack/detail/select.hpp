/// \file detail/select.hpp
/// \brief Budgeted token selection: per-head top-k and one global threshold over many heads.
///
/// Backend independent: it sees scores and positions only, and returns the kept indices of
/// each head in ascending order (so stored positions stay sorted).
///
/// Contract: a head that holds tokens keeps at least one (its best-scoring, lowest index on
/// ties), whatever the budget, so decode attention always has a key to attend to. A global
/// threshold or a head-level choice may otherwise leave a head with nothing; the extra token
/// is counted by bytes() like any other.
#pragma once

// clang-format off
#include "internal.hpp"  // first, before anything defines the macro it checks
// clang-format on

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "../budget.hpp"

namespace kvpack {
namespace detail {

/// One compressible head as selection sees it.
struct SelectionHead {
  const float* scores;       ///< per held token, higher = keep
  const int32_t* positions;  ///< per held token, ascending
  int64_t size;              ///< tokens held
  int64_t target;            ///< tokens to keep (Budget::target of the layer's appended count)
  int64_t protect_below;     ///< positions < this are sinks
  int64_t protect_above;     ///< positions > this are in the recent window
};

inline bool is_protected(const SelectionHead& h, int64_t i) {
  return h.positions[i] < h.protect_below || h.positions[i] > h.protect_above;
}

/// The `room`-th highest of `scores` (1 <= room <= scores.size()), and how many of the `room`
/// highest are strictly above it; reorders `scores`.
struct Threshold {
  float score;
  int64_t above;
};
inline Threshold select_threshold(std::vector<float>& scores, int64_t room) {
  const auto nth = scores.begin() + (room - 1);
  std::nth_element(scores.begin(), nth, scores.end(), std::greater<float>());
  const float score = *nth;
  int64_t above = 0;
  for (auto it = scores.begin(); it != nth; ++it) above += *it > score;
  return {score, above};
}

/// Per-head top-k: protected tokens plus the best-scoring others up to the target.
///
/// Ties are broken by index (higher score first, then lower index), so the result is
/// deterministic and identical across backends. The kept set is found through the score
/// threshold: everything above it, then the lowest-index tokens at it; one pass in index order
/// emits them already sorted.
inline std::vector<int64_t> select_top_k(const SelectionHead& h) {
  std::vector<float> candidates;
  candidates.reserve(static_cast<std::size_t>(h.size));
  int64_t n_protected = 0;
  for (int64_t i = 0; i < h.size; ++i) {
    if (is_protected(h, i)) {
      ++n_protected;
    } else {
      candidates.push_back(h.scores[i]);
    }
  }
  // A head never empties: with nothing protected, at least its best token stays.
  const int64_t floor = n_protected == 0 && h.size > 0 ? 1 : 0;
  const int64_t room = std::max<int64_t>(floor, h.target - n_protected);
  std::vector<int64_t> kept;
  if (room >= static_cast<int64_t>(candidates.size())) {  // everything stays
    kept.resize(static_cast<std::size_t>(h.size));
    for (int64_t i = 0; i < h.size; ++i) kept[i] = i;
    return kept;
  }
  kept.reserve(static_cast<std::size_t>(n_protected + room));
  if (room == 0) {
    for (int64_t i = 0; i < h.size; ++i) {
      if (is_protected(h, i)) kept.push_back(i);
    }
    return kept;
  }
  const Threshold t = select_threshold(candidates, room);
  int64_t ties = room - t.above;  // tokens at the threshold that fit, lowest index first
  for (int64_t i = 0; i < h.size; ++i) {
    const float s = h.scores[i];
    if (is_protected(h, i) || s > t.score || (s == t.score && ties-- > 0)) kept.push_back(i);
  }
  return kept;
}

/// One threshold over all heads: the total kept equals the sum of the targets, but each head
/// keeps as many tokens as score above the threshold (ragged budgets). Ties are broken by head,
/// then by index, as in select_top_k.
inline std::vector<std::vector<int64_t>> select_global(const std::vector<SelectionHead>& heads) {
  std::vector<std::vector<int64_t>> kept(heads.size());
  std::size_t total = 0;
  for (const SelectionHead& head : heads) total += static_cast<std::size_t>(head.size);
  std::vector<float> candidates;
  candidates.reserve(total);
  int64_t room = 0;
  for (const SelectionHead& head : heads) {
    room += head.target;
    for (int64_t i = 0; i < head.size; ++i) {
      if (is_protected(head, i)) {
        --room;
      } else {
        candidates.push_back(head.scores[i]);
      }
    }
  }
  room = std::max<int64_t>(0, room);
  const bool keep_all = room >= static_cast<int64_t>(candidates.size());
  Threshold t{0.0f, 0};
  if (!keep_all && room > 0) t = select_threshold(candidates, room);
  int64_t ties = room - t.above;
  for (std::size_t h = 0; h < heads.size(); ++h) {
    const SelectionHead& head = heads[h];
    for (int64_t i = 0; i < head.size; ++i) {
      const float s = head.scores[i];
      const bool keep = is_protected(head, i) || keep_all ||
                        (room > 0 && (s > t.score || (s == t.score && ties-- > 0)));
      if (keep) kept[h].push_back(i);
    }
    if (kept[h].empty() && head.size > 0) {  // the threshold took every token of this head
      kept[h].push_back(std::max_element(head.scores, head.scores + head.size) - head.scores);
    }
  }
  return kept;
}

}  // namespace detail
}  // namespace kvpack
