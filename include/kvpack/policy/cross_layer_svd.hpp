/// \file policy/cross_layer_svd.hpp
/// \brief CrossLayerSVD (xKV, arXiv 2503.18893): one truncated SVD over the stacked pre-RoPE
/// keys (and, separately, values) of a group of adjacent layers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "../linalg/truncated_svd.hpp"
#include "policy_base.hpp"

namespace kvpack {

/// \brief Groups of `group_layers` consecutive layers share one token basis per side.
///
/// compress() stacks each group's pre-RoPE keys side by side (tokens × G·kv_heads·head_dim),
/// takes a rank-r_k truncated SVD X ≈ U Σ Vᵀ (kvpack::truncated_svd, route `svd_route`), and
/// stores A = U (fp16, shared by the group) and per (layer, head) B = (Σ Vᵀ) columns (fp32);
/// values likewise at r_v. Keys are re-rotated at their positions when read. Tokens appended
/// later stay exact until the next compress(), which refactors everything held.
///
/// Groups: [0, G), [G, 2G), …; when `group_layers` does not divide the layer count, the last
/// group is smaller (e.g. 30 layers at G = 4: seven groups of 4, one of 2), as in the paper's
/// code. Ranks:
///  - `rank_k`/`rank_v` > 0: the same ranks for every group, so they must fit every group's
///    columns, the smaller last group's included (validate() refuses them otherwise), and
///    compress() refuses a group holding fewer tokens than the rank (a rank-r factorisation of
///    fewer than r rows would take more memory than the rows themselves);
///  - both 0: derived per group at compress time from `target_ratio` (dense fp16 bytes ÷ bytes
///    held, see ranks_for_ratio) with r_k : r_v = 1 : 1.5 as in the paper, clamped to
///    [1, min(tokens, columns)].
/// Negative ranks, or one rank set without the other, are refused.
struct CrossLayerSVD : LowRankPolicy {
  static constexpr const char* name = "CrossLayerSVD";
  int group_layers = 4;
  int rank_k = 0;
  int rank_v = 0;
  double target_ratio = 4.0;
  /// How the SVD runs (kAuto: Gram or randomized by shape, see choose_svd_route).
  SvdRoute svd_route = SvdRoute::kAuto;

  CrossLayerSVD() = default;
  CrossLayerSVD(int group, int rk, int rv) : group_layers(group), rank_k(rk), rank_v(rv) {}
  static CrossLayerSVD with_ratio(int group, double ratio) {
    CrossLayerSVD p;
    p.group_layers = group;
    p.target_ratio = ratio;
    return p;
  }

  /// \brief Ranks (r_k, r_v) that hold a group of `layers` layers × `kv_heads` × `head_dim` at
  /// `tokens` tokens in dense/`ratio` bytes: basis values of `basis_bytes` each (fp16: 2; a
  /// quantized basis, Compose<CrossLayerSVD, Quantize>: Quantize::bytes_per_value()), fp32 factors
  /// (4·layers·kv_heads·head_dim bytes per rank) and int32 positions (4·layers·kv_heads·T), with
  /// r_k : r_v = 1 : 1.5. Not clamped: a result below 1 means the ratio is out of reach.
  static std::pair<int, int> ranks_for_ratio(int64_t tokens, int layers, int kv_heads, int head_dim,
                                             double ratio, double basis_bytes = 2.0) {
    const double t = static_cast<double>(tokens);
    const double lh = static_cast<double>(layers) * kv_heads;
    const double dense = 2.0 * 2.0 * lh * head_dim * t;
    const double total = (dense / ratio - 4.0 * lh * t) / (basis_bytes * t + 4.0 * lh * head_dim);
    return {static_cast<int>(std::lround(0.4 * total)), static_cast<int>(std::lround(0.6 * total))};
  }

  /// Low-rank hook (LowRankPolicy): per group and side, one job over every held token. Throws
  /// kvpack::error when a fixed rank exceeds min(tokens, columns) of a group.
  std::vector<LowRankJob> plan(const ModelShape& shape, const std::vector<LowRankLayer>& held,
                               double basis_bytes, const char* where) const {
    std::vector<LowRankJob> jobs;
    for (int l0 = 0; l0 < shape.layers; l0 += group_layers) {
      const int l1 = std::min(shape.layers, l0 + group_layers);
      const int64_t tokens = held[l0].tokens;
      if (tokens == 0) continue;
      const int64_t cols = static_cast<int64_t>(l1 - l0) * shape.kv_heads * shape.head_dim;
      const int64_t cap = std::min(tokens, cols);
      int rk = rank_k, rv = rank_v;
      if (rk > 0) {
        for (const auto& [knob, rank] :
             {std::pair<const char*, int>{"rank_k", rk}, {"rank_v", rv}}) {
          if (rank > cap) {
            throw error(detail::concat(
                where, ": CrossLayerSVD ", knob, " = ", rank, ", expected at most min(tokens, ",
                "columns) = ", cap, " for layers [", l0, ", ", l1, "), which hold ", tokens,
                " tokens x ", cols, " columns (compress once at least ", rank,
                " tokens are held, or derive the ranks from target_ratio)"));
          }
        }
      } else {
        std::tie(rk, rv) = ranks_for_ratio(tokens, l1 - l0, shape.kv_heads, shape.head_dim,
                                           target_ratio, basis_bytes);
        rk = static_cast<int>(std::clamp<int64_t>(rk, 1, cap));
        rv = static_cast<int>(std::clamp<int64_t>(rv, 1, cap));
      }
      jobs.push_back({l0, l1, true, rk, tokens});
      jobs.push_back({l0, l1, false, rv, tokens});
    }
    return jobs;
  }

  /// Low-rank hook: X ≈ U Σ Vᵀ; A = U is shared by the group, Bt = V Σ (a head's factor B is
  /// Σ V[its columns]ᵀ). A template only so that a unit that never compresses with this policy
  /// does not instantiate the SVD (~19 s of every translation unit's compile otherwise).
  template <int = 0>
  void factor(const LowRankJob& job, const RowMajorMatrixXf& x, RowMajorMatrixXf& a,
              Eigen::MatrixXf& bt) const {
    SvdOptions options;
    options.route = svd_route;
    options.rank = job.rank;
    SvdFactors f =
        truncated_svd(Eigen::Map<const RowMajorMatrixXf>(x.data(), x.rows(), x.cols()), options);
    a = f.U;
    bt = f.V * f.S.asDiagonal();
  }

  /// Layers of the smallest group (the last one when group_layers does not divide `layers`).
  int smallest_group(int layers) const {
    const int rest = layers % group_layers;
    return rest == 0 ? group_layers : rest;
  }

  void validate(const ModelShape& shape) const {
    constexpr const char* where = "CrossLayerSVD";
    detail::require(group_layers >= 1 && group_layers <= shape.layers, where, "group_layers",
                    group_layers, detail::concat("in [1, ", shape.layers, "]"));
    const int small = smallest_group(shape.layers);
    const int64_t cols = static_cast<int64_t>(small) * shape.kv_heads * shape.head_dim;
    const std::string range =
        small == group_layers
            ? detail::concat("in [0, ", cols, "] (0 = from target_ratio; a group has ", small,
                             " x ", shape.kv_heads, " x ", shape.head_dim, " columns)")
            : detail::concat("in [0, ", cols, "] (0 = from target_ratio; the last group has only ",
                             small, " x ", shape.kv_heads, " x ", shape.head_dim,
                             " columns: group_layers = ", group_layers, " does not divide the ",
                             shape.layers, " layers)");
    detail::require(rank_k >= 0 && rank_k <= cols, where, "rank_k", rank_k, range);
    detail::require(rank_v >= 0 && rank_v <= cols, where, "rank_v", rank_v, range);
    detail::require((rank_k > 0) == (rank_v > 0), where, "rank_k/rank_v",
                    detail::concat(rank_k, "/", rank_v), "both set or both 0");
    detail::require(rank_k > 0 || (target_ratio > 1.0 && target_ratio < 1e6), where, "target_ratio",
                    target_ratio, "> 1 when ranks are derived from it");
    const int route = static_cast<int>(svd_route);
    detail::require(route >= 0 && route <= static_cast<int>(SvdRoute::kRandomized), where,
                    "svd_route", route, "one of SvdRoute::kAuto, kBdc, kGram, kRandomized");
  }
};

}  // namespace kvpack
