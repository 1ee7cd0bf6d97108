/// \file backend/cpu/low_rank_attention.hpp
/// \brief Attention over one head of a low-rank cache (CrossLayerSVD, ChannelShrink) without a
/// dense copy of its keys or values.
///
/// Factored tokens go tile by tile. Keys: one GEMM rebuilds the tile's pre-RoPE keys from the
/// token basis (A_tile · B_k, tile × r_k · r_k × d), RoPE rotates them at their positions, and the
/// query rows score them. RoPE depends on the position, so q·RoPE(a·B) cannot move B onto the
/// query side; rebuilding a tile costs r_k·d multiply-adds per token, where a dense fp16 key costs
/// d. Values need no rebuild: Σ_t p_t·(a_t·B_v) = (Σ_t p_t·a_t)·B_v, so the tiles accumulate
/// P · A_tile in rank space (r_v per token and row) and B_v is applied once at the end. The exact
/// tail (decode tokens appended since compress) takes the dense fp16 kernels.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../../config.hpp"
#include "../../detail/convert.hpp"
#include "../../detail/low_rank_head_store.hpp"
#include "../../detail/online_softmax.hpp"
#include "attention.hpp"

namespace kvpack {
namespace cpu {

/// Factored tokens per tile: the tile's fp32 basis rows (tile × r ≤ 256 × 384 floats) and keys
/// stay in L2; a longer tile amortises the packing of B_k inside the GEMM.
constexpr int64_t kLowRankTile = 256;

/// \brief cpu::attend_rows for a low-rank head: `rows` query rows q (row-major rows × d, scaled by
/// 1/sqrt(d)) over keys [begin, end); row r sees keys with index < visible[r]. Accumulates into
/// `state` (online softmax), so key splits can be merged afterwards.
inline void attend_low_rank_rows(const detail::LowRankHeadStore& head, int d, const float* q,
                                 int rows, const int64_t* visible, int64_t begin, int64_t end,
                                 PartialState& state, std::vector<float>& scratch) {
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  int64_t row_visible_max = 0;
  for (int r = 0; r < rows; ++r) row_visible_max = std::max(row_visible_max, visible[r]);
  end = std::min(end, row_visible_max);
  if (begin >= end) return;

  const int64_t factored_end = std::min(end, head.factored);
  if (begin < factored_end) {
    const int rk = head.key.basis->rank, rv = head.value.basis->rank;
    const int64_t tile = kLowRankTile;
    scratch.resize(static_cast<std::size_t>(tile) * (rk + d + rv + rows) +
                   static_cast<std::size_t>(rows) * rv);
    float* ak = scratch.data();      // tile × r_k basis rows (fp32)
    float* kt = ak + tile * rk;      // tile × d keys
    float* av = kt + tile * d;       // tile × r_v basis rows
    float* s = av + tile * rv;       // rows × tile scores, then probabilities
    float* acc_v = s + tile * rows;  // rows × r_v: Σ p_t a_t, rescaled with the running max
    std::fill(acc_v, acc_v + static_cast<std::size_t>(rows) * rv, 0.0f);
    const Eigen::Map<const RowMat> bk(head.key.b.data(), rk, d);
    const Eigen::Map<const RowMat> qm(q, rows, d);
    Eigen::Map<RowMat> accm(acc_v, rows, rv);
    const detail::RopeRun rope(*head.rope);
    for (int64_t t0 = begin; t0 < factored_end; t0 += tile) {
      const int64_t tn = std::min(tile, factored_end - t0);
      detail::load_row(head.key.basis->rows.data() + t0 * rk, ak, tn * rk);
      Eigen::Map<RowMat>(kt, tn, d).noalias() = Eigen::Map<const RowMat>(ak, tn, rk) * bk;
      rope.apply(kt, head.positions.data() + t0, tn, false);
      Eigen::Map<RowMat> sm(s, rows, tn);
      sm.noalias() = qm * Eigen::Map<const RowMat>(kt, tn, d).transpose();
      for (int r = 0; r < rows; ++r) {
        const int64_t vis = std::clamp<int64_t>(visible[r] - t0, 0, tn);
        const float old_max = state.max[r];
        detail::softmax_tile_row(s + r * tn, vis, tn, state.max[r], state.sum[r],
                                 state.acc.data() + static_cast<std::size_t>(r) * d, d);
        // The same factor softmax_tile_row applied to the d-space accumulator.
        const float rescale = detail::softmax_rescale(old_max, state.max[r]);
        if (vis > 0 && rescale != 1.0f) accm.row(r) *= rescale;
      }
      detail::load_row(head.value.basis->rows.data() + t0 * rv, av, tn * rv);
      accm.noalias() += sm * Eigen::Map<const RowMat>(av, tn, rv);
    }
    Eigen::Map<RowMat>(state.acc.data(), rows, d).noalias() +=
        accm * Eigen::Map<const RowMat>(head.value.b.data(), rv, d);
  }

  const int64_t tail_begin = std::max(begin, head.factored);
  if (tail_begin < end) {
    const cpu::DenseRows<Half> tail{head.tail_k.data(), head.tail_v.data(),
                                    head.positions.data() + head.factored,
                                    head.size() - head.factored, d};
    std::vector<int64_t> tail_visible(rows);
    for (int r = 0; r < rows; ++r)
      tail_visible[r] = std::max<int64_t>(0, visible[r] - head.factored);
    attend_rows(tail, d, q, rows, tail_visible.data(), tail_begin - head.factored,
                end - head.factored, state, scratch);
  }
}

}  // namespace cpu
}  // namespace kvpack
