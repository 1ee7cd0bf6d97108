/// \file backend/cpu/low_rank_attention.hpp
/// \brief Attention over the kv heads of one layer of a low-rank cache (CrossLayerSVD,
/// ChannelShrink) without a dense copy of their keys or values.
///
/// The heads of a layer share one token basis per side (A_k, A_v), so factored tokens go tile by
/// tile for all heads at once. Keys: one GEMM rebuilds the tile's pre-RoPE keys of every head from
/// the basis (A_tile · [B_k,1 | … | B_k,H], tile × r_k · r_k × H·d), RoPE rotates them with one
/// table of angles, and each head's query rows score its slice. RoPE depends on the position, so
/// q·RoPE(a·B) cannot move B onto the query side: rebuilding costs r_k·d multiply-adds per token
/// and head, where a dense fp16 key costs d. Values need no rebuild: Σ_t p_t·(a_t·B_v) =
/// (Σ_t p_t·a_t)·B_v, so the tiles accumulate P · A_tile in rank space (one GEMM for the rows of
/// all heads, r_v per token and row) and each head's B_v is applied once at the end. The exact
/// tail (decode tokens appended since compress) takes the dense fp16 kernels.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../../config.hpp"
#include "../../detail/convert.hpp"
#include "../../detail/online_softmax.hpp"
#include "attention.hpp"
#include "low_rank_head_store.hpp"

namespace kvpack {
namespace cpu {

/// Factored tokens per tile: the tile's fp32 basis rows (tile × r ≤ 256 × 384 floats) and keys
/// of every head stay in L2; a longer tile amortises the packing of B_k inside the GEMM.
constexpr int64_t kLowRankTile = 256;

/// \brief One kv head's part in attend_low_rank_heads(): its store, its query rows (row-major
/// rows × d, scaled by 1/sqrt(d)), how many keys each row sees, and its partial softmax state.
struct LowRankQuery {
  const detail::LowRankHeadStore* head;
  const float* q;
  const int64_t* visible;
  PartialState* state;
};

/// \brief Attends `rows` query rows of each of `count` kv heads over keys [begin, end) of that
/// head; row r of head h sees keys with index < heads[h].visible[r]. Accumulates into each head's
/// state (online softmax), so key splits can be merged afterwards. Heads that share their bases
/// (what compress() builds for the heads of a layer) go together; others one at a time.
inline void attend_low_rank_heads(const LowRankQuery* heads, int count, int d, int rows,
                                  int64_t begin, int64_t end, std::vector<float>& scratch) {
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Strided = Eigen::Map<const RowMat, 0, Eigen::OuterStride<>>;
  const detail::LowRankHeadStore& first = *heads[0].head;
  for (int h = 1; h < count; ++h) {
    const detail::LowRankHeadStore& other = *heads[h].head;
    if (other.key.basis != first.key.basis || other.value.basis != first.value.basis ||
        other.factored != first.factored || other.size() != first.size()) {
      for (int g = 0; g < count; ++g)
        attend_low_rank_heads(heads + g, 1, d, rows, begin, end, scratch);
      return;
    }
  }
  int64_t row_visible_max = 0;
  for (int h = 0; h < count; ++h) {
    for (int r = 0; r < rows; ++r) row_visible_max = std::max(row_visible_max, heads[h].visible[r]);
  }
  end = std::min(end, row_visible_max);
  if (begin >= end) return;

  const int64_t factored_end = std::min(end, first.factored);
  if (begin < factored_end) {
    const int rk = first.key.basis->rank, rv = first.value.basis->rank;
    const int64_t tile = kLowRankTile, hd = static_cast<int64_t>(count) * d, half = d / 2;
    const int64_t all_rows = static_cast<int64_t>(count) * rows;
    // Per-thread buffer, kept between calls: a fresh one per call was zero-filled every time.
    thread_local std::vector<float> buffer;
    const std::size_t need =
        static_cast<std::size_t>(tile * (rk + hd + rv + all_rows + d) + all_rows * rv + rk * hd);
    if (buffer.size() < need) buffer.resize(need);
    float* ak = buffer.data();        // tile × r_k basis rows (fp32)
    float* kt = ak + tile * rk;       // tile × (H·d) keys of every head
    float* av = kt + tile * hd;       // tile × r_v basis rows
    float* s = av + tile * rv;        // (H·rows) × tile scores, then probabilities
    float* cs = s + tile * all_rows;  // tile × d/2 cos, then tile × d/2 sin
    float* acc_v = cs + tile * d;     // (H·rows) × r_v: Σ p_t a_t, rescaled with the running max
    float* bk = acc_v + all_rows * rv;  // r_k × (H·d): every head's B_k side by side
    std::fill(acc_v, acc_v + all_rows * rv, 0.0f);
    Eigen::Map<RowMat> bkm(bk, rk, hd);
    for (int h = 0; h < count; ++h) {
      bkm.middleCols(static_cast<int64_t>(h) * d, d) =
          Eigen::Map<const RowMat>(heads[h].head->key.b.data(), rk, d);
    }
    Eigen::Map<RowMat> accm(acc_v, all_rows, rv);
    const detail::RopeRun rope(*first.rope);
    const int32_t* positions = first.positions.data();
    for (int64_t t0 = begin; t0 < factored_end; t0 += tile) {
      const int64_t tn = std::min(tile, factored_end - t0);
      first.key.basis->load(t0, tn, ak);
      Eigen::Map<RowMat>(kt, tn, hd).noalias() = Eigen::Map<const RowMat>(ak, tn, rk) * bkm;
      rope.angles(positions + t0, tn, cs, cs + tn * half);
      for (int h = 0; h < count; ++h) {
        rope.rotate(kt + static_cast<int64_t>(h) * d, tn, hd, cs, cs + tn * half);
      }
      for (int h = 0; h < count; ++h) {
        const LowRankQuery& hq = heads[h];
        float* sh = s + static_cast<int64_t>(h) * rows * tn;
        Eigen::Map<RowMat>(sh, rows, tn).noalias() =
            Eigen::Map<const RowMat>(hq.q, rows, d) *
            Strided(kt + static_cast<int64_t>(h) * d, tn, d, Eigen::OuterStride<>(hd)).transpose();
        for (int r = 0; r < rows; ++r) {
          const int64_t vis = std::clamp<int64_t>(hq.visible[r] - t0, 0, tn);
          const float old_max = hq.state->max[r];
          detail::softmax_tile_row(sh + r * tn, vis, tn, hq.state->max[r], hq.state->sum[r],
                                   hq.state->acc.data() + static_cast<std::size_t>(r) * d, d);
          // The same factor softmax_tile_row applied to the d-space accumulator.
          const float rescale = detail::softmax_rescale(old_max, hq.state->max[r]);
          if (vis > 0 && rescale != 1.0f) accm.row(static_cast<int64_t>(h) * rows + r) *= rescale;
        }
      }
      first.value.basis->load(t0, tn, av);
      accm.noalias() +=
          Eigen::Map<const RowMat>(s, all_rows, tn) * Eigen::Map<const RowMat>(av, tn, rv);
    }
    for (int h = 0; h < count; ++h) {
      Eigen::Map<RowMat>(heads[h].state->acc.data(), rows, d).noalias() +=
          accm.middleRows(static_cast<int64_t>(h) * rows, rows) *
          Eigen::Map<const RowMat>(heads[h].head->value.b.data(), rv, d);
    }
  }

  const int64_t tail_begin = std::max(begin, first.factored);
  if (tail_begin < end) {
    std::vector<int64_t> tail_visible(rows);
    for (int h = 0; h < count; ++h) {
      const detail::LowRankHeadStore& head = *heads[h].head;
      const cpu::DenseRows<Half> tail{head.tail_k.data(), head.tail_v.data(),
                                      head.positions.data() + head.factored,
                                      head.size() - head.factored, d};
      for (int r = 0; r < rows; ++r) {
        tail_visible[r] = std::max<int64_t>(0, heads[h].visible[r] - head.factored);
      }
      attend_rows(tail, d, heads[h].q, rows, tail_visible.data(), tail_begin - head.factored,
                  end - head.factored, *heads[h].state, scratch);
    }
  }
}

}  // namespace cpu
}  // namespace kvpack
