/// \file backend/cpu/cache_attend.hpp
/// \brief Out-of-line members of KVCache<Policy, backend::Cpu>: decode and prefill attention over
/// what a layer holds: work items, key splits and their merge (the low-rank item is in
/// cache_attend_low_rank.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "cache.hpp"

namespace kvpack {

template <class Policy>
typename KVCache<Policy, backend::Cpu>::AttendPlan KVCache<Policy, backend::Cpu>::plan_attend(
    int layer, int64_t tokens) const {
  const int g = shape_.group_size();
  AttendPlan plan;
  plan.tokens = tokens;
  // Work items: (kv head, block of query tokens, split of the keys). Query blocks bound the
  // rows a tile is reused by; key splits give decode (few rows) parallelism over long caches.
  plan.block_tokens = std::max<int64_t>(1, 64 / g);
  plan.blocks = (tokens + plan.block_tokens - 1) / plan.block_tokens;
  int64_t longest = 0;
  for (int h = 0; h < shape_.kv_heads; ++h) longest = std::max(longest, store(layer, h).size());
  // Low-rank heads of a layer share their token basis: one work item covers every kv head of a
  // (query block, key split), so a basis tile is converted and multiplied once for all heads.
  // Factored keys cost a rank-r rebuild per token: shorter key splits.
  plan.item_heads = kLowRank ? shape_.kv_heads : 1;
  const int64_t head_groups = shape_.kv_heads / plan.item_heads;
  const int64_t split_tokens = kLowRank ? 512 : 2048;
  plan.splits =
      plan.blocks * head_groups >= 4 ? 1 : std::clamp<int64_t>(longest / split_tokens, 1, 8);
  plan.items = head_groups * plan.blocks * plan.splits;
  // Partial states per (kv head, block, split), whichever heads an item covers.
  plan.partial.resize(static_cast<std::size_t>(shape_.kv_heads) * plan.blocks * plan.splits);
  return plan;
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::run_attend_item(AttendPlan& plan, int layer,
                                                    const ActivationView& q, Positions positions,
                                                    int64_t item) const {
  const int d = shape_.head_dim;
  const int g = shape_.group_size();
  const int64_t blocks = plan.blocks, splits = plan.splits;
  const int h0 = static_cast<int>(item / (blocks * splits)) * plan.item_heads;
  const int64_t block = (item / splits) % blocks;
  const int64_t split = item % splits;
  const int64_t t0 = block * plan.block_tokens;
  const int64_t tn = std::min(plan.block_tokens, plan.tokens - t0);
  const int rows = static_cast<int>(tn * g);
  int64_t size = 0;  // the longest head of the item (a layer's heads hold the same tokens)
  for (int i = 0; i < plan.item_heads; ++i) size = std::max(size, store(layer, h0 + i).size());
  const int64_t span = (size + splits - 1) / splits;
  const int64_t begin = split * span, end = std::min(size, (split + 1) * span);
  std::vector<float> scratch;
  auto state = [&](int h) -> cpu::PartialState& {
    return plan.partial[(static_cast<int64_t>(h) * blocks + block) * splits + split];
  };
  if constexpr (kLowRank) {
    attend_low_rank_item(layer, q, positions, h0, plan.item_heads, t0, tn, begin, end, state,
                         scratch);
  } else {
    std::vector<float> qrows;
    std::vector<int64_t> visible;
    gather_query_rows(layer, q, positions, h0, t0, tn, qrows, visible);
    state(h0).reset(rows, d);
    cpu::attend_rows(store(layer, h0).rows(d), d, qrows.data(), rows, visible.data(), begin, end,
                     state(h0), scratch);
  }
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::finish_attend(AttendPlan& plan, const OutputView& out) const {
  // Merge the key splits of each (head, block) and normalise.
  const int d = shape_.head_dim;
  const int g = shape_.group_size();
  std::vector<float> row(d);
  for (int h = 0; h < shape_.kv_heads; ++h) {
    for (int64_t block = 0; block < plan.blocks; ++block) {
      const int64_t first = (static_cast<int64_t>(h) * plan.blocks + block) * plan.splits;
      cpu::PartialState& acc = plan.partial[first];
      const int rows = static_cast<int>(acc.max.size());
      for (int64_t s = 1; s < plan.splits; ++s) {
        const cpu::PartialState& other = plan.partial[first + s];
        for (int r = 0; r < rows; ++r) {
          detail::softmax_merge(acc.max[r], acc.sum[r], acc.acc.data() + r * d, other.max[r],
                                other.sum[r], other.acc.data() + r * d, d);
        }
      }
      for (int r = 0; r < rows; ++r) {
        const int64_t t = block * plan.block_tokens + r / g;
        const float inv = 1.0f / acc.sum[r];
        for (int i = 0; i < d; ++i) row[i] = acc.acc[r * d + i] * inv;
        out.store(t, static_cast<int64_t>(h) * g + r % g, row.data());
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

}  // namespace kvpack
