/// \file backend/cpu/cache_attend_low_rank.hpp
/// \brief Out-of-line members of KVCache<Policy, backend::Cpu> that read low-rank heads: one
/// attend() work item over the heads of a layer (they share a token basis, converted and
/// multiplied once), and the read-only view low_rank_factors().
#pragma once

#include <vector>

#include "cache.hpp"
#include "low_rank_attention.hpp"

namespace kvpack {

template <class Policy>
LowRankHeadFactors KVCache<Policy, backend::Cpu>::low_rank_factors(int layer, int head) const {
  static_assert(kLowRank,
                "low_rank_factors(): low-rank caches only (CrossLayerSVD, ChannelShrink)");
  this->check_head("KVCache::low_rank_factors", layer, head);
  return detail::factors_view(store(layer, head), shape_.head_dim);
}

template <class Policy>
template <class StateOf>
void KVCache<Policy, backend::Cpu>::attend_low_rank_item(int layer, const ActivationView& q,
                                                         Positions positions, int h0, int heads,
                                                         int64_t t0, int64_t tn, int64_t begin,
                                                         int64_t end, const StateOf& state_of,
                                                         std::vector<float>& scratch) const {
  const int d = shape_.head_dim;
  const int rows = static_cast<int>(tn * shape_.group_size());
  std::vector<std::vector<float>> qrows(heads);
  std::vector<std::vector<int64_t>> visible(heads);
  std::vector<cpu::LowRankQuery> query(heads);
  for (int i = 0; i < heads; ++i) {
    gather_query_rows(layer, q, positions, h0 + i, t0, tn, qrows[i], visible[i]);
    state_of(h0 + i).reset(rows, d);
    query[i] = {&store(layer, h0 + i), qrows[i].data(), visible[i].data(), &state_of(h0 + i)};
  }
  cpu::attend_low_rank_heads(query.data(), heads, d, rows, begin, end, scratch);
}

}  // namespace kvpack
