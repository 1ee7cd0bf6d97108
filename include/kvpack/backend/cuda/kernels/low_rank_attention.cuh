/// \file backend/cuda/kernels/low_rank_attention.cuh
/// \brief Attention over low-rank factors (CrossLayerSVD, ChannelShrink): the head type that
/// attention_kernel reads, rebuilding each key / value tile in shared memory from the token basis
/// the heads of a layer share and the head's own factor, with RoPE applied in place.
///
/// The layout is the CPU's (detail::LowRankHeadStore): the first `factored` tokens of a head are
/// rows of a basis A [tokens][rank] (fp16 rows, or KIVI blocks per basis column over whole groups
/// of rows under Compose<…, Quantize>) times the head's factor B [rank][head_dim]; keys are
/// factored before RoPE, so a rebuilt key is rotated at its position; the newest tokens are exact
/// fp16 rows (the tail). One tile rebuild serves every query row of the block (the GQA group and
/// its prefill tokens), so a key costs rank · head_dim multiply-adds once per kv head and tile;
/// RoPE's angles are formed in double as detail::Rope does.
/// Sources: Chang et al., "xKV: Cross-Layer SVD for KV-Cache Compression" (arXiv 2503.18893);
/// Wang et al., "CSKV: Training-Efficient Channel Shrinking for KV Cache" (arXiv 2409.10593).
#pragma once

#include <cmath>
#include <cstdint>

#include "../../../rope.hpp"
#include "../../../shape.hpp"
#include "common.cuh"
#include "kivi.cuh"

namespace kvpack {
namespace cuda {

/// A token basis A [tokens][rank] as detail::LowRankBasis holds it (device pointers): rows
/// [0, blocks.quantized) in KIVI blocks ([row group][column], the key-block addressing with
/// head_dim = rank; blocks.values unused), the rest fp16 rows.
struct LowRankBasisView {
  KiviBlocks blocks{};
  const Half* rows = nullptr;  ///< [tokens - blocks.quantized][rank]
  int rank = 0;

  /// A[t][j], decoded as LowRankBasis::load decodes it.
  KVPACK_DEVICE float at(int64_t t, int j) const {
    if (t < blocks.quantized) return blocks.key(t, j, rank);
    return to_float(rows[(t - blocks.quantized) * rank + j]);
  }
};

/// RoPE of rebuilt keys (device copy of detail::Rope's tables).
struct RopeParams {
  const double* inv_freq = nullptr;  ///< [rotary_dim / 2], radians per position
  int rotary_dim = 0;                ///< channels [0, rotary_dim) rotate, the rest pass through
  RopeStyle style = RopeStyle::kHalfSplit;
  double attention_factor = 1.0;  ///< YaRN's attention factor (1 otherwise)
};

/// One kv head of a low-rank layer, as attention_kernel reads it (see the file comment).
struct LowRankAttentionHead {
  LowRankBasisView key_basis, value_basis;  ///< the layer's bases, rows [0, factored)
  const float* key_factor;                  ///< B_k [key_basis.rank][head_dim], this head's
  const float* value_factor;                ///< B_v [value_basis.rank][head_dim]
  const Half* tail_k;                       ///< [size - factored][head_dim], post-RoPE
  const Half* tail_v;                       ///< [size - factored][head_dim]
  const int32_t* positions;                 ///< [size], ascending
  int64_t size;                             ///< tokens held
  int64_t factored;                         ///< tokens in the bases
  RopeParams rope;

  /// Rows [t0, t0 + n) as fp32 into the tiles (row stride `stride`): factored keys A_t · B_k
  /// rotated at their positions, factored values A_t · B_v, tail rows widened. Every thread of
  /// the block calls it (it has a barrier between the rebuild and the rotation).
  template <int D>
  KVPACK_DEVICE void load_tile(int64_t t0, int n, float* k_tile, float* v_tile, int stride, int tid,
                               int threads) const {
    fill_tile<D>(t0, n, k_tile, v_tile, stride, tid, threads,
                 [&](int64_t t, int c, float& k, float& v) {
                   if (t < factored) {
                     for (int j = 0; j < key_basis.rank; ++j) {
                       k += key_basis.at(t, j) * key_factor[j * D + c];
                     }
                     for (int j = 0; j < value_basis.rank; ++j) {
                       v += value_basis.at(t, j) * value_factor[j * D + c];
                     }
                   } else {
                     k = to_float(tail_k[(t - factored) * D + c]);
                     v = to_float(tail_v[(t - factored) * D + c]);
                   }
                 });
    if (t0 >= factored) return;  // uniform over the block: no rebuilt key in this tile
    exec::sync_block();          // a pair's two channels were written by different threads
    const int half = rope.rotary_dim / 2;
    for (int idx = tid; idx < n * half; idx += threads) {
      const int r = idx / half;
      const int i = idx % half;
      const int64_t t = t0 + r;
      if (t >= factored) continue;
      int a = 0, b = 0;
      detail::rope_pair(rope.style, i, rope.rotary_dim, a, b);
      const double angle = static_cast<double>(positions[t]) * rope.inv_freq[i];
      detail::rotate_pair(k_tile[r * stride + a], k_tile[r * stride + b],
                          rope.attention_factor * cos(angle), rope.attention_factor * sin(angle));
    }
  }
};

}  // namespace cuda
}  // namespace kvpack
