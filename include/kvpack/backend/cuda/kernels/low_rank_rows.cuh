/// \file backend/cuda/kernels/low_rank_rows.cuh
/// \brief Kernels of the CUDA low-rank cache's compress() and materialize(): a head's rows
/// rebuilt from its factors and tail (keys pre- or post-RoPE), the column peaks of a token
/// basis, and the basis (fp16) and factors stored at the range detail::basis_column_scale gives.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "../context.hpp"
#include "../kernel_logic.hpp"
#include "common.cuh"
#include "exec.cuh"
#include "kivi.cuh"
#include "low_rank_attention.cuh"

namespace kvpack {
namespace cuda {

/// Threads per block of the low-rank row kernels.
constexpr int kLowRankRowsThreads = 128;

/// Rows [0, n) of `head` in fp32: key t to out_k[t · stride + c], value t to out_v[...] (either
/// may be null). Factored keys come rotated as head.rope says (rotary_dim 0: pre-RoPE, as the
/// basis holds them); tail keys (t >= head.factored) are un-rotated by `unrotate` when its
/// rotary_dim is > 0 (exactly detail::RopeRun::apply's inverse: angles in double, pairs divided
/// by the attention factor). Grid: x over tiles of kAttentionTile rows.
template <int D>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kLowRankRowsThreads)
    low_rank_rows_kernel(LowRankAttentionHead head, int64_t n, RopeParams unrotate, float* out_k,
                         float* out_v, int64_t stride) {
  constexpr int kStride = D + 1;
  KVPACK_SHARED_ARRAY(float, k_tile, kAttentionTile* kStride);
  KVPACK_SHARED_ARRAY(float, v_tile, kAttentionTile* kStride);
  const int tid = static_cast<int>(exec::thread_x());
  const int threads = static_cast<int>(exec::block_threads());
  for (int64_t t0 = static_cast<int64_t>(exec::block_x()) * kAttentionTile; t0 < n;
       t0 += static_cast<int64_t>(exec::grid_x()) * kAttentionTile) {
    const int rows = static_cast<int>(n - t0 < kAttentionTile ? n - t0 : kAttentionTile);
    head.load_tile<D>(t0, rows, k_tile, v_tile, kStride, tid, threads);
    exec::sync_block();
    const int half = unrotate.rotary_dim / 2;
    for (int idx = tid; idx < rows * half; idx += threads) {
      const int r = idx / half;
      const int i = idx % half;
      const int64_t t = t0 + r;
      if (t < head.factored) continue;
      int a = 0, b = 0;
      detail::rope_pair(unrotate.style, i, unrotate.rotary_dim, a, b);
      const double angle = static_cast<double>(head.positions[t]) * unrotate.inv_freq[i];
      const double f = unrotate.attention_factor;
      detail::rotate_pair(k_tile[r * kStride + a], k_tile[r * kStride + b], cos(angle) / f,
                          -sin(angle) / f);
    }
    exec::sync_block();
    for (int idx = tid; idx < rows * D; idx += threads) {
      const int r = idx / D;
      const int c = idx % D;
      if (out_k != nullptr) out_k[(t0 + r) * stride + c] = k_tile[r * kStride + c];
      if (out_v != nullptr) out_v[(t0 + r) * stride + c] = v_tile[r * kStride + c];
    }
    exec::sync_block();  // the next tile overwrites the shared tiles
  }
}

// The kernels below are templates, as every kvpack kernel is: a __global__ function defined in
// a header must not be emitted by every unit that includes it.

/// peaks[j] = max over t < tokens of |a[t · rank + j]|, +inf when any of them is not finite.
/// Grid: x over columns (one block per column).
template <int = 0>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kLowRankRowsThreads)
    column_peaks_kernel(const float* a, int64_t tokens, int rank, float* peaks) {
  KVPACK_SHARED_ARRAY(float, partial, kLowRankRowsThreads);
  const int tid = static_cast<int>(exec::thread_x());
  for (int j = static_cast<int>(exec::block_x()); j < rank; j += static_cast<int>(exec::grid_x())) {
    float peak = 0.0f;
    for (int64_t t = tid; t < tokens; t += kLowRankRowsThreads) {
      const float x = fabsf(a[t * rank + j]);
      peak = value_in_range(x, FLT_MAX) ? (x > peak ? x : peak) : HUGE_VALF;  // NaN: +inf
    }
    partial[tid] = peak;
    exec::sync_block();
    for (int width = kLowRankRowsThreads / 2; width > 0; width /= 2) {
      if (tid < width && partial[tid + width] > partial[tid]) partial[tid] = partial[tid + width];
      exec::sync_block();
    }
    if (tid == 0) peaks[j] = partial[0];
    exec::sync_block();
  }
}

/// The token basis at its storage range, in place: a[t · rank + j] /= scale[j] (scale: powers
/// of two, so the division is exact).
template <int = 0>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    scale_columns_kernel(float* a, int64_t tokens, int rank, const float* scale) {
  const int64_t count = tokens * rank;
  for (int64_t e = static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
       e < count; e += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
    a[e] /= scale[e % rank];
  }
}

/// fp16 rows of the basis: rows[e] = fp16(a[e]) for e < count.
template <int = 0>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    store_basis_kernel(const float* a, int64_t count, Half* rows) {
  for (int64_t e = static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
       e < count; e += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
    store_element(a[e], rows + e);
  }
}

/// One head's factor B [rank][head_dim]: factor[j · head_dim + c] =
/// src[j · row_stride + (col0 + c) · col_stride] · scale[j] — the head's channels of a basis
/// [rank][cols] (row_stride cols, col_stride 1) or of a projection [cols][rank] (1, rank).
template <int = 0>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    store_factor_kernel(const float* src, int64_t row_stride, int64_t col_stride, int64_t col0,
                        int rank, int head_dim, const float* scale, float* factor) {
  const int64_t count = static_cast<int64_t>(rank) * head_dim;
  for (int64_t e = static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
       e < count; e += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
    const int64_t j = e / head_dim;
    const int64_t c = e % head_dim;
    factor[e] = src[j * row_stride + (col0 + c) * col_stride] * scale[j];
  }
}

/// Enqueues low_rank_rows_kernel for `n` rows of `head` (head_dim `d`: 64 or 128).
inline void launch_low_rank_rows(int d, const LowRankAttentionHead& head, int64_t n,
                                 const RopeParams& unrotate, float* out_k, float* out_v,
                                 int64_t stride, cudaStream_t stream) {
  if (n <= 0) return;
  const unsigned grid = grid_blocks(n, kAttentionTile);
  dispatch_head_dim(d, [&](auto head_dim) {
    exec::launch<kLowRankRowsThreads>(low_rank_rows_kernel<decltype(head_dim)::value>, grid,
                                      kLowRankRowsThreads, stream, "low_rank_rows_kernel", head, n,
                                      unrotate, out_k, out_v, stride);
  });
  check_launch("low_rank_rows_kernel");
}

/// Enqueues column_peaks_kernel.
inline void launch_column_peaks(const float* a, int64_t tokens, int rank, float* peaks,
                                cudaStream_t stream) {
  exec::launch<kLowRankRowsThreads>(column_peaks_kernel<>, grid_extent(rank), kLowRankRowsThreads,
                                    stream, "column_peaks_kernel", a, tokens, rank, peaks);
  check_launch("column_peaks_kernel");
}

/// Enqueues scale_columns_kernel.
inline void launch_scale_columns(float* a, int64_t tokens, int rank, const float* scale,
                                 cudaStream_t stream) {
  exec::launch<kElementwiseThreads>(
      scale_columns_kernel<>, grid_blocks(tokens * rank, kElementwiseThreads), kElementwiseThreads,
      stream, "scale_columns_kernel", a, tokens, rank, scale);
  check_launch("scale_columns_kernel");
}

/// Enqueues store_basis_kernel over `count` values.
inline void launch_store_basis(const float* a, int64_t count, Half* rows, cudaStream_t stream) {
  if (count <= 0) return;
  exec::launch<kElementwiseThreads>(store_basis_kernel<>, grid_blocks(count, kElementwiseThreads),
                                    kElementwiseThreads, stream, "store_basis_kernel", a, count,
                                    rows);
  check_launch("store_basis_kernel");
}

/// Enqueues store_factor_kernel.
inline void launch_store_factor(const float* src, int64_t row_stride, int64_t col_stride,
                                int64_t col0, int rank, int head_dim, const float* scale,
                                float* factor, cudaStream_t stream) {
  exec::launch<kElementwiseThreads>(
      store_factor_kernel<>,
      grid_blocks(static_cast<int64_t>(rank) * head_dim, kElementwiseThreads), kElementwiseThreads,
      stream, "store_factor_kernel", src, row_stride, col_stride, col0, rank, head_dim, scale,
      factor);
  check_launch("store_factor_kernel");
}

}  // namespace cuda
}  // namespace kvpack
