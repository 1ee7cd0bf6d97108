/// \file detail/select.hpp
/// \brief Budgeted token selection: per-head top-k and one global threshold over many heads.
///
/// Backend independent: it sees scores and positions only, and returns the kept indices of
/// each head in ascending order (so stored positions stay sorted).
#pragma once

#ifndef KVPACK_INTERNAL_INCLUDE_OK
#error "kvpack/detail/ headers are internal; include <kvpack/kvpack.hpp> instead"
#endif

#include <algorithm>
#include <cstdint>
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

/// Per-head top-k: protected tokens plus the best-scoring others up to the target.
inline std::vector<int64_t> select_top_k(const SelectionHead& h) {
  std::vector<int64_t> kept, candidates;
  for (int64_t i = 0; i < h.size; ++i) (is_protected(h, i) ? kept : candidates).push_back(i);
  const int64_t room = std::max<int64_t>(0, h.target - static_cast<int64_t>(kept.size()));
  if (room < static_cast<int64_t>(candidates.size())) {
    // Ties broken by index so the result is deterministic and identical across backends.
    auto better = [&](int64_t a, int64_t b) {
      return h.scores[a] > h.scores[b] || (h.scores[a] == h.scores[b] && a < b);
    };
    std::nth_element(candidates.begin(), candidates.begin() + room, candidates.end(), better);
    candidates.resize(room);
  }
  kept.insert(kept.end(), candidates.begin(), candidates.end());
  std::sort(kept.begin(), kept.end());
  return kept;
}

/// One threshold over all heads: the total kept equals the sum of the targets, but each head
/// keeps as many tokens as score above the threshold (ragged budgets).
inline std::vector<std::vector<int64_t>> select_global(const std::vector<SelectionHead>& heads) {
  struct Candidate {
    float score;
    int32_t head;
    int64_t index;
  };
  std::vector<std::vector<int64_t>> kept(heads.size());
  std::vector<Candidate> candidates;
  int64_t room = 0;
  for (std::size_t h = 0; h < heads.size(); ++h) {
    const SelectionHead& head = heads[h];
    room += head.target;
    for (int64_t i = 0; i < head.size; ++i) {
      if (is_protected(head, i)) {
        kept[h].push_back(i);
        --room;
      } else {
        candidates.push_back({head.scores[i], static_cast<int32_t>(h), i});
      }
    }
  }
  room = std::max<int64_t>(0, room);
  if (room < static_cast<int64_t>(candidates.size())) {
    auto better = [](const Candidate& a, const Candidate& b) {
      if (a.score != b.score) return a.score > b.score;
      return a.head != b.head ? a.head < b.head : a.index < b.index;
    };
    std::nth_element(candidates.begin(), candidates.begin() + room, candidates.end(), better);
    candidates.resize(room);
  }
  for (const Candidate& c : candidates) kept[c.head].push_back(c.index);
  for (auto& k : kept) std::sort(k.begin(), k.end());
  return kept;
}

}  // namespace detail
}  // namespace kvpack
