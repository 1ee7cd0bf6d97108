/// \file policy/cross_layer_svd.hpp
/// \brief CrossLayerSVD (xKV, arXiv 2503.18893): one truncated SVD over the stacked pre-RoPE
/// keys (and, separately, values) of a group of adjacent layers.
#pragma once

#include <cstdint>

#include "policy_base.hpp"

namespace kvpack {

/// \brief Groups of `group_layers` consecutive layers share one token basis per side.
///
/// compress() stacks each group's pre-RoPE keys side by side (tokens × G·kv_heads·head_dim),
/// takes a rank-r_k truncated SVD X ≈ U Σ Vᵀ, and stores A = U (fp16, shared by the group) and
/// per (layer, head) B = (Σ Vᵀ) columns (fp32); values likewise at r_v. Keys are re-rotated at
/// their positions when read. Tokens appended later stay exact until the next compress(),
/// which refactors everything held. When `group_layers` does not divide the layer count, the
/// last group is smaller. Ranks: `rank_k`/`rank_v` when non-zero, else derived at compress time
/// from `target_ratio` (dense fp16 bytes ÷ bytes held) with r_k : r_v = 1 : 1.5 as in the paper.
struct CrossLayerSVD : PolicyBase {
  int group_layers = 4;
  int rank_k = 0;
  int rank_v = 0;
  double target_ratio = 4.0;

  CrossLayerSVD() = default;
  CrossLayerSVD(int group, int rk, int rv) : group_layers(group), rank_k(rk), rank_v(rv) {}
  static CrossLayerSVD with_ratio(int group, double ratio) {
    CrossLayerSVD p;
    p.group_layers = group;
    p.target_ratio = ratio;
    return p;
  }

  void validate(const ModelShape& shape) const {
    constexpr const char* where = "CrossLayerSVD";
    detail::require(group_layers >= 1 && group_layers <= shape.layers, where, "group_layers",
                    group_layers, detail::concat("in [1, ", shape.layers, "]"));
    const int64_t cols = static_cast<int64_t>(group_layers) * shape.kv_heads * shape.head_dim;
    detail::require(rank_k >= 0 && rank_k <= cols, where, "rank_k", rank_k,
                    detail::concat("in [0, ", cols, "] (0 = from target_ratio)"));
    detail::require(rank_v >= 0 && rank_v <= cols, where, "rank_v", rank_v,
                    detail::concat("in [0, ", cols, "] (0 = from target_ratio)"));
    detail::require((rank_k > 0) == (rank_v > 0), where, "rank_k/rank_v",
                    detail::concat(rank_k, "/", rank_v), "both set or both 0");
    detail::require(rank_k > 0 || (target_ratio > 1.0 && target_ratio < 1e6), where, "target_ratio",
                    target_ratio, "> 1 when ranks are derived from it");
  }
};

}  // namespace kvpack
