/// \file backend/cuda/kernels/attention.cuh
/// \brief Decode / prefill attention over the stored rows: GQA, causal by position, online
/// softmax in fp32, split-K over long caches.
///
/// Block = (16 query rows of one kv head, one key split). The rows r = t * group + j are the
/// query heads of the kv head's GQA group for consecutive query tokens, so each K/V tile loaded
/// into shared memory serves every row of the group (and several tokens in prefill). Keys are
/// visited in tiles of 32: lane j scores key j for one row, the warp reduces max / sum, and each
/// lane accumulates head_dim / 32 output channels. Each block writes an unnormalised partial
/// state (max, denominator, accumulator) per row; merge_splits_kernel combines the splits with
/// detail::softmax_merge and normalises. A key filter (ScoreWindow: KVzip's chunk-local window)
/// restricts the softmax to the keys it contains: observe() runs this kernel for its row
/// statistics and outputs (kernels/observe.cuh).
#pragma once

#include "../../../config.hpp"  // before detail/: it admits internal headers
#include "../../../detail/online_softmax.hpp"
#include "common.cuh"

namespace kvpack {
namespace cuda {

/// One kv head of the layer attended: stored rows and ascending positions (device).
/// attention_kernel reads a head through two members, which another storage format provides in
/// its own head type (KiviAttentionHead in kivi.cuh): `positions`, `size`, and load_tile.
template <class T>
struct AttentionHead {
  const T* k;                ///< [size][head_dim]
  const T* v;                ///< [size][head_dim]
  const int32_t* positions;  ///< [size], ascending
  int64_t size;

  /// Rows [t0, t0 + n) widened to fp32 into the tiles (row stride `stride` floats); the block's
  /// `threads` threads stride over 16-byte vectors.
  template <int D>
  KVPACK_DEVICE void load_tile(int64_t t0, int n, float* k_tile, float* v_tile, int stride, int tid,
                               int threads) const {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    static_assert(D % kVec == 0, "rows are loaded in 16-byte vectors");
    constexpr int kRowVectors = D / kVec;
    for (int idx = tid; idx < n * kRowVectors; idx += threads) {
      const int r = idx / kRowVectors;
      const int c = idx % kRowVectors;
      const int64_t offset = (t0 + r) * D + c * kVec;
      load_vector16(k + offset, k_tile + r * stride + c * kVec);
      load_vector16(v + offset, v_tile + r * stride + c * kVec);
    }
  }
};

/// The key filter of plain attention: every visible key.
struct AllKeys {
  KVPACK_HOST_DEVICE bool contains(int64_t) const { return true; }
};

/// Whether attention_kernel must read each key's position for `Filter` (ScoreWindow, or any type
/// with `contains(position)`): all but AllKeys.
template <class Filter>
struct FiltersKeys {
  static constexpr bool value = true;
};
template <>
struct FiltersKeys<AllKeys> {
  static constexpr bool value = false;
};

/// Key splits of an attention launch over `tokens` query tokens (GQA group `group`) of
/// `kv_heads` heads holding at most `longest` keys: attention_splits of its row blocks.
inline int64_t attention_launch_splits(int64_t tokens, int group, int kv_heads, int64_t longest,
                                       int sm_count) {
  const int64_t row_blocks = (tokens * group + kAttentionRows - 1) / kAttentionRows;
  return attention_splits(row_blocks * kv_heads, longest, sm_count);
}

/// The query rows of one sequence of a batched launch (KVCacheBatch<Policy, backend::Cuda>):
/// its heads are kv heads [sequence · kv_heads, (sequence + 1) · kv_heads) of the launch.
struct AttentionSequence {
  const float* q;              ///< tokens x q_heads x head_dim, fp32, contiguous, unscaled
  const int32_t* q_positions;  ///< tokens
  int64_t tokens;
  int64_t first_row;  ///< of its rows (token * q_heads + q_head) in the partial states
};

/// Arguments of attention_kernel shared by all blocks.
struct AttentionParams {
  const float* q;              ///< tokens x q_heads x head_dim, fp32, contiguous, unscaled
  const int32_t* q_positions;  ///< tokens
  int64_t tokens;              ///< batched: of all sequences (the partial states' rows / q_heads)
  int q_heads;
  int group;    ///< q_heads / kv_heads
  float scale;  ///< 1 / sqrt(head_dim)
  int64_t splits;
  float* partial_acc;  ///< [split][token * q_heads + q_head][head_dim]
  float* partial_max;  ///< [split][token * q_heads + q_head]
  float* partial_sum;  ///< [split][token * q_heads + q_head]
  /// Batched launch: [sequences], the grid's kv heads being kv_heads per sequence; null: one
  /// sequence (q, q_positions, tokens above).
  const AttentionSequence* sequences;
  int kv_heads;
};

/// The sequence of kv head `h` of a launch and that head's index within it.
KVPACK_DEVICE AttentionSequence launch_sequence(const AttentionParams& p, int& h) {
  if (p.sequences == nullptr) return AttentionSequence{p.q, p.q_positions, p.tokens, 0};
  const AttentionSequence s = p.sequences[h / p.kv_heads];
  h %= p.kv_heads;
  return s;
}

/// Grid: (ceil(tokens * group / kAttentionRows), kv_heads, splits); block: kAttentionThreads.
/// Static shared memory: 2 * 32 * (D + 1) + 16 * D + 4 * 32 floats + 18 int64
/// (40.9 KiB for D = 128, under the 48 KiB static limit). Keys whose position `filter` does not
/// contain get no probability (a row none of whose keys it contains keeps max −inf, sum 0).
template <class Head, int D, class Filter = AllKeys>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kAttentionThreads)
    attention_kernel(const Head* __restrict__ heads, AttentionParams p, Filter filter) {
  static_assert(D % 32 == 0, "head_dim must be a multiple of the warp size");
  constexpr int kStride = D + 1;  // odd row stride: lane j reading row j hits bank (j + i) % 32
  constexpr int kLaneChannels = D / 32;

  KVPACK_SHARED_ARRAY(float, k_tile, kAttentionTile* kStride);
  KVPACK_SHARED_ARRAY(float, v_tile, kAttentionTile* kStride);
  KVPACK_SHARED_ARRAY(float, q_rows, kAttentionRows* D);
  KVPACK_SHARED_ARRAY(float, probabilities, kAttentionWarps* kAttentionTile);
  KVPACK_SHARED_ARRAY(int64_t, visible, kAttentionRows);
  KVPACK_SHARED_ARRAY(int64_t, key_range, 2);

  const int tid = exec::thread_x();
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const Head head = heads[exec::block_y()];
  int h = exec::block_y();
  const AttentionSequence seq = launch_sequence(p, h);  // h: the kv head within its sequence
  const int64_t split = exec::block_z();
  const int64_t rows_total = seq.tokens * p.group;
  const int64_t row0 = static_cast<int64_t>(exec::block_x()) * kAttentionRows;
  // A batched launch sizes the grid for its longest sequence: blocks past a shorter one's rows
  // have nothing to do (uniform over the block, before any barrier).
  if (row0 >= rows_total) return;

  // Query rows, pre-scaled by 1/sqrt(d) as in the CPU path; rows past the end are zero.
  for (int e = tid; e < kAttentionRows * D; e += kAttentionThreads) {
    const int r = e / D;
    const int i = e % D;
    const int64_t row = row0 + r;
    float x = 0.0f;
    if (row < rows_total) {
      int64_t t = 0;
      int q_head = 0;
      attention_row(row, p.group, h, t, q_head);
      x = seq.q[(t * p.q_heads + q_head) * D + i] * p.scale;
    }
    q_rows[e] = x;
  }
  if (tid < kAttentionRows) {
    const int64_t row = row0 + tid;
    visible[tid] = row < rows_total
                       ? visible_keys(head.positions, head.size, seq.q_positions[row / p.group])
                       : 0;
  }
  exec::sync_block();
  if (tid == 0) {
    int64_t most_visible = 0;
    for (int r = 0; r < kAttentionRows; ++r) {
      most_visible = visible[r] > most_visible ? visible[r] : most_visible;
    }
    int64_t begin = 0, end = 0;
    split_range(head.size, p.splits, split, begin, end);
    key_range[0] = begin;
    key_range[1] = end < most_visible ? end : most_visible;
  }
  exec::sync_block();
  const int64_t begin = key_range[0];
  const int64_t end = key_range[1];

  float row_max[kAttentionRowsPerWarp];
  float row_sum[kAttentionRowsPerWarp];
  float acc[kAttentionRowsPerWarp][kLaneChannels];
#pragma unroll
  for (int rr = 0; rr < kAttentionRowsPerWarp; ++rr) {
    row_max[rr] = detail::neg_inf();
    row_sum[rr] = 0.0f;
#pragma unroll
    for (int c = 0; c < kLaneChannels; ++c) acc[rr][c] = 0.0f;
  }

  for (int64_t t0 = begin; t0 < end; t0 += kAttentionTile) {
    const int tn = static_cast<int>(end - t0 < kAttentionTile ? end - t0 : kAttentionTile);
    exec::sync_block();  // every warp is done with the previous tile
    head.template load_tile<D>(t0, tn, k_tile, v_tile, kStride, tid, kAttentionThreads);
    exec::sync_block();

#pragma unroll
    for (int rr = 0; rr < kAttentionRowsPerWarp; ++rr) {
      const int r = warp * kAttentionRowsPerWarp + rr;
      // Both conditions are uniform across the warp, so the shuffles below see all lanes.
      if (row0 + r >= rows_total) continue;
      const int64_t ahead = visible[r] - t0;
      const int n_visible = static_cast<int>(ahead < 0 ? 0 : (ahead < tn ? ahead : tn));
      if (n_visible == 0) continue;

      bool admitted = lane < n_visible;
      if (FiltersKeys<Filter>::value && admitted)
        admitted = filter.contains(head.positions[t0 + lane]);
      float score = detail::neg_inf();
      if (admitted) {
        const float* q = q_rows + r * D;
        const float* k = k_tile + lane * kStride;
        float dot = 0.0f;
#pragma unroll 16
        for (int i = 0; i < D; ++i) dot += q[i] * k[i];
        score = dot;
      }
      const float tile_max = warp_max(score);
      const float rescale = softmax_advance(row_max[rr], row_sum[rr], tile_max);
      const float prob = admitted ? expf(score - row_max[rr]) : 0.0f;
      row_sum[rr] += warp_sum(prob);
#pragma unroll
      for (int c = 0; c < kLaneChannels; ++c) acc[rr][c] *= rescale;
      probabilities[warp * kAttentionTile + lane] = prob;
      exec::sync_warp();
      for (int j = 0; j < n_visible; ++j) {
        const float pj = probabilities[warp * kAttentionTile + j];
        const float* v = v_tile + j * kStride;
#pragma unroll
        for (int c = 0; c < kLaneChannels; ++c) acc[rr][c] += pj * v[lane + 32 * c];
      }
      exec::sync_warp();  // the next row overwrites this warp's probabilities
    }
  }

  const int64_t rows_all = p.tokens * p.q_heads;
#pragma unroll
  for (int rr = 0; rr < kAttentionRowsPerWarp; ++rr) {
    const int64_t row = row0 + warp * kAttentionRowsPerWarp + rr;
    if (row >= rows_total) continue;
    int64_t t = 0;
    int q_head = 0;
    attention_row(row, p.group, h, t, q_head);
    const int64_t slot = split * rows_all + seq.first_row + t * p.q_heads + q_head;
#pragma unroll
    for (int c = 0; c < kLaneChannels; ++c) p.partial_acc[slot * D + lane + 32 * c] = acc[rr][c];
    if (lane == 0) {
      p.partial_max[slot] = row_max[rr];
      p.partial_sum[slot] = row_sum[rr];
    }
  }
}

/// out(t, q_head, i) = merged accumulator / merged denominator over the splits of row
/// t * q_heads + q_head (split s of a row at s · split_rows rows after it: the launch's rows, of
/// which a batched launch merges one sequence's at a time). Block: one row, D threads (one
/// channel each); grid strides over rows.
/// attend(): every row has at least one visible key (the cache checks it), so the denominator is
/// > 0; a row a key filter left without keys gets zeros (a NaN query still gives NaN). row_max /
/// row_sum, when not null, [tokens * q_heads]: the merged max (of logits scaled by 1/sqrt(d)) and
/// denominator.
template <int D>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(D)
    merge_splits_kernel(const float* __restrict__ partial_acc,
                        const float* __restrict__ partial_max,
                        const float* __restrict__ partial_sum, int64_t rows, int64_t split_rows,
                        int64_t splits, int q_heads, float* __restrict__ out,
                        int64_t out_token_stride, int64_t out_head_stride,
                        float* __restrict__ row_max, float* __restrict__ row_sum) {
  const int i = exec::thread_x();
  for (int64_t row = exec::block_x(); row < rows; row += exec::grid_x()) {
    float m = partial_max[row];
    float l = partial_sum[row];
    float a = partial_acc[row * D + i];
    for (int64_t s = 1; s < splits; ++s) {
      const int64_t slot = s * split_rows + row;
      detail::softmax_merge(m, l, &a, partial_max[slot], partial_sum[slot],
                            partial_acc + slot * D + i, 1);
    }
    const int64_t t = row / q_heads;
    const int64_t q_head = row % q_heads;
    out[t * out_token_stride + q_head * out_head_stride + i] = l == 0.0f ? 0.0f : a * (1.0f / l);
    if (i == 0 && row_max != nullptr) {
      row_max[row] = m;
      row_sum[row] = l;
    }
  }
}

/// Enqueues merge_splits_kernel<D> over rows [first_row, first_row + rows) of launch `p`'s
/// partial states into `out` (row first_row lands at out's token 0) and, when not null, row_max /
/// row_sum [rows].
template <int D>
void launch_merge_splits(const AttentionParams& p, int64_t first_row, int64_t rows, float* out,
                         int64_t out_token_stride, int64_t out_head_stride, cudaStream_t stream,
                         float* row_max = nullptr, float* row_sum = nullptr) {
  if (rows == 0) return;
  exec::launch<D>(merge_splits_kernel<D>, grid_blocks(rows, 1, 1 << 20), D, stream,
                  "merge_splits_kernel", p.partial_acc + first_row * D, p.partial_max + first_row,
                  p.partial_sum + first_row, rows, p.tokens * p.q_heads, p.splits, p.q_heads, out,
                  out_token_stride, out_head_stride, row_max, row_sum);
  check_launch("merge_splits_kernel");
}

/// Enqueues attention_kernel<Head, D> alone over `heads` kv heads (a batched launch: every
/// sequence's, p.sequences set) whose longest sequence has `tokens` query tokens.
template <int D, class Head, class Filter = AllKeys>
void launch_attention_kernel(const Head* heads, int64_t kv_heads, const AttentionParams& p,
                             int64_t tokens, cudaStream_t stream, Filter filter = {}) {
  const int64_t row_blocks = (tokens * p.group + kAttentionRows - 1) / kAttentionRows;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(kv_heads),
                  static_cast<unsigned>(p.splits));
  exec::launch<kAttentionThreads>(attention_kernel<Head, D, Filter>, grid, kAttentionThreads,
                                  stream, "attention_kernel", heads, p, filter);
  check_launch("attention_kernel");
}

/// Enqueues attention_kernel<Head, D> and merge_splits_kernel<D>; `out` (device) receives
/// tokens x q_heads x D with the given element strides. Head: AttentionHead<T> (dense rows) or
/// another format's head type with the same members (KiviAttentionHead). With a key filter
/// (observe()), the softmax covers the keys it contains, and row_max / row_sum (device,
/// [tokens * q_heads], or null) receive each row's merged statistics.
template <int D, class Head, class Filter = AllKeys>
void launch_attention_heads(const Head* heads, int kv_heads, const AttentionParams& p, float* out,
                            int64_t out_token_stride, int64_t out_head_stride, cudaStream_t stream,
                            Filter filter = {}, float* row_max = nullptr,
                            float* row_sum = nullptr) {
  launch_attention_kernel<D>(heads, kv_heads, p, p.tokens, stream, filter);
  const int64_t rows = p.tokens * p.q_heads;
  launch_merge_splits<D>(p, 0, rows, out, out_token_stride, out_head_stride, stream, row_max,
                         row_sum);
}

/// launch_attention_heads over dense rows of T.
template <class T, int D>
void launch_attention(const AttentionHead<T>* heads, int kv_heads, const AttentionParams& p,
                      float* out, int64_t out_token_stride, int64_t out_head_stride,
                      cudaStream_t stream) {
  launch_attention_heads<D>(heads, kv_heads, p, out, out_token_stride, out_head_stride, stream);
}

}  // namespace cuda
}  // namespace kvpack
