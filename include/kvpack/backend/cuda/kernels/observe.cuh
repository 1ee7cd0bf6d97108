/// \file backend/cuda/kernels/observe.cuh
/// \brief Query scoring (observe()): the softmax probability each held key receives from each
/// observed query row, reduced over the rows and the query heads of its GQA group (the max for
/// KVzip, the sum for SnapKV), inside a ScoreWindow (KVzip's chunk-local softmax); and the
/// attention mass each row puts on a policy's kept set (SimLayerKV's lazy layers).
///
/// Two passes per observe() call, flash-style over key tiles. Pass 1 is attention_kernel
/// (kernels/attention.cuh) restricted to the window's keys: 16 rows of a GQA group share each
/// K/V tile in shared memory, split-K over long heads, and its merge leaves each row's softmax
/// max and denominator (and its attention output, which KVzip+'s displacement weight needs).
/// Pass 2 gives each thread one key of a 64-key tile in shared memory and runs it against the
/// rows staged 8 at a time: the probability every row of the group gives the key, reduced and
/// folded into its score. Both passes compute each logit with the same fp32 arithmetic (queries
/// scaled by 1/sqrt(d) first, channels summed in order), so pass 2's probabilities are
/// normalised by exactly the logits pass 1 saw; the CPU's differ by summation order. SimLayerKV's
/// mass keeps a warp-per-row pass of its own (its kept set depends on the query position).
/// Sources: Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"
/// (arXiv 2505.23416); Li et al., "SnapKV" (arXiv 2404.14469); Zhang et al., "SimLayerKV" (arXiv
/// 2410.13846).
#pragma once

#include <cmath>
#include <cstdint>

#include "../../../policy/policy_base.hpp"
#include "../../../policy/score_window.hpp"
#include "attention.cuh"
#include "common.cuh"
#include "kivi.cuh"
#include "stored_scores.cuh"

namespace kvpack {
namespace cuda {

/// One (kv head) of the observed layer: its stored tokens (KIVI blocks, then rows), positions
/// and scores. attention_kernel reads it through `positions`, `size` and load_tile.
template <class T>
struct ObserveHead {
  const T* k;                ///< [size - blocks.quantized][head_dim]: the tokens after the blocks
  const T* v;                ///< [size - blocks.quantized][head_dim]
  const int32_t* positions;  ///< [size], ascending
  float* scores;             ///< [size]: kUnscoredScore until a row sees the key
  int64_t size;
  KiviBlocks blocks{};  ///< the head's first tokens in KIVI blocks (Compose<A, Quantize>)

  /// Channel c of the key of held token i (a key in blocks decoded as the CPU decodes it).
  template <int D>
  KVPACK_DEVICE float key(int64_t i, int c) const {
    return i < blocks.quantized ? blocks.key(i, c, D) : to_float(k[(i - blocks.quantized) * D + c]);
  }
  /// Channel c of the value of held token i.
  template <int D>
  KVPACK_DEVICE float value(int64_t i, int c) const {
    return i < blocks.quantized ? blocks.value(i, c, D)
                                : to_float(v[(i - blocks.quantized) * D + c]);
  }
  /// Scaled logit q · k_i of held token i.
  template <int D>
  KVPACK_DEVICE float logit(const float* q, int64_t i, float scale) const {
    float dot = 0.0f;
    for (int c = 0; c < D; ++c) dot += q[c] * key<D>(i, c);
    return dot * scale;
  }
  /// attention_kernel's tile loader: tokens [t0, t0 + n) in fp32 (rows as AttentionHead loads
  /// them, tokens in blocks decoded per element).
  template <int D>
  KVPACK_DEVICE void load_tile(int64_t t0, int n, float* k_tile, float* v_tile, int stride, int tid,
                               int threads) const {
    const int64_t quantized = blocks.quantized;
    if (t0 >= quantized) {
      const AttentionHead<T> rows{k, v, positions + quantized, size - quantized};
      rows.template load_tile<D>(t0 - quantized, n, k_tile, v_tile, stride, tid, threads);
      return;
    }
    fill_tile<D>(t0, n, k_tile, v_tile, stride, tid, threads,
                 [&](int64_t t, int c, float& key_value, float& value_value) {
                   key_value = key<D>(t, c);
                   value_value = value<D>(t, c);
                 });
  }
};

/// What the passes read and write: fp32 queries [tokens][q_heads][head_dim] (unscaled), their
/// positions, the window; per row (token t, query head qh: row t · q_heads + qh) its statistics.
struct ObserveParams {
  const float* q;
  const int32_t* q_positions;
  int64_t tokens;
  int q_heads;
  int group;
  float scale;  ///< 1 / sqrt(head_dim)
  ScoreWindow window;
  float* row_max;  ///< [tokens][q_heads]: softmax max over the row's visible window keys
  float* row_sum;  ///< [tokens][q_heads]: sum of exp(logit − max); 0 when it sees none
  /// Pass 1 (attention_kernel): key splits, their partial states ([splits][tokens · q_heads]
  /// [head_dim], [splits][tokens · q_heads] twice) and each row's attention output over its
  /// visible window keys [tokens][q_heads][head_dim] (zeros for a row that sees none)
  int64_t splits;
  float* partial_acc;
  float* partial_max;
  float* partial_sum;
  float* attended;
  int64_t attended_token_stride, attended_head_stride;  ///< elements (q_heads · D and D, or
                                                        ///< attend_observe's output view's)
  /// [tokens][q_heads] or null: the probability mass the row puts on the policy's kept set
  /// (LazyLayerDrop::in_kept_set; SimLayerKV's lazy-layer statistic)
  float* row_mass;
  int64_t first_position;  ///< of the observed layer (the kept set's sinks start there)
  /// KVzip+: [tokens] weight of each query token's probabilities (1 / ‖x_t‖), or null (1)
  const float* query_weights;
  /// KVzip+: [kv_heads][group][value_stride] weight of each held key per query head of its
  /// group (‖W_o,h · v‖, value_weights_kernel), or null (1)
  const float* value_weights;
  int64_t value_stride;
  /// KVzip+ with ValueWeighting::kDisplacement, else null: the layer's output factors R
  /// [q_heads][head_dim][head_dim] (OutputFactors::head, row-major), u_i = R · v_i of each held
  /// key per query head of its group [kv_heads][group][value_stride][head_dim]
  /// (value_weights_kernel with kOutputs) and w_r = R · o_r of each row [tokens][q_heads]
  /// [head_dim], o_r its attended output (observe_row_outputs_kernel)
  const float* output_factors;
  const float* value_outputs;
  float* row_outputs;
};

/// LazyLayerDrop's pass: one warp per (query token, query head); lanes stride over the head's
/// keys for the row's softmax statistics and, with p.row_mass, the softmax mass of the keys
/// `kept.in_kept_set(position, first, query position)` selects (Policy: LazyLayerDrop). Grid: x
/// over tokens · q_heads rows (grid-stride), one warp per block.
template <int D, class T, class KeptSet>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(32)
    observe_stats_kernel(const ObserveHead<T>* __restrict__ heads, ObserveParams p, KeptSet kept) {
  const int lane = static_cast<int>(exec::thread_x());
  for (int64_t row = exec::block_x(); row < p.tokens * p.q_heads; row += exec::grid_x()) {
    const int64_t t = row / p.q_heads;
    const int qh = static_cast<int>(row % p.q_heads);
    const ObserveHead<T> head = heads[qh / p.group];
    const float* q = p.q + row * D;
    const int64_t position = p.q_positions[t];
    float m = -INFINITY, l = 0.0f, in_kept = 0.0f;  // in_kept: the kept keys' part of l
    for (int64_t i = lane; i < head.size; i += 32) {
      const int64_t key_position = head.positions[i];
      if (key_position > position || !p.window.contains(key_position)) continue;
      const float s = head.template logit<D>(q, i, p.scale);
      const bool is_kept = kept.in_kept_set(key_position, p.first_position, position);
      if (s > m) {
        const float rescale = expf(m - s);
        l = l * rescale + 1.0f;
        in_kept = in_kept * rescale + (is_kept ? 1.0f : 0.0f);
        m = s;
      } else {
        const float e = expf(s - m);
        l += e;
        in_kept += is_kept ? e : 0.0f;
      }
    }
    // Merge the lanes' (max, sum) pairs.
    const float row_max = warp_max(m);
    const float to_row = m == -INFINITY ? 0.0f : expf(m - row_max);
    const float row_sum = warp_sum(l * to_row);
    const float row_kept = p.row_mass != nullptr ? warp_sum(in_kept * to_row) : 0.0f;
    if (lane == 0) {
      p.row_max[row] = row_max;
      p.row_sum[row] = row_sum;
      if (p.row_mass != nullptr) p.row_mass[row] = row_sum > 0.0f ? row_kept / row_sum : 0.0f;
    }
  }
}

/// ValueWeighting::kDisplacement (KVzip+): what evicting key i moves row `row`'s output (query
/// head qh), per unit of its probability `prob`: ‖w_r − u_i‖ / (1 − prob), or ‖u_i‖ where
/// 1 − prob rounds below 1e-6 (a key holding all the row's attention; the CPU's
/// cpu::displacement_weight_strip, whose comment derives it). The distance is summed from the
/// differences themselves, as on the CPU (‖w‖² + ‖u‖² − 2 w·u would lose the digits a key
/// holding most of the attention needs).
template <int D>
KVPACK_DEVICE float displacement_weight(const ObserveParams& p, int64_t row, int qh, int64_t i,
                                        float prob) {
  const float* u = p.value_outputs + (static_cast<int64_t>(qh) * p.value_stride + i) * D;
  const float* w = p.row_outputs + row * D;
  const float rest = 1.0f - prob;
  float sq = 0.0f;
  if (rest < 1e-6f) {
    for (int c = 0; c < D; ++c) sq += u[c] * u[c];
    return sqrtf(sq);
  }
  for (int c = 0; c < D; ++c) {
    const float diff = w[c] - u[c];
    sq += diff * diff;
  }
  return sqrtf(sq) / rest;
}

/// ValueWeighting::kDisplacement, between the passes: w_r = R · o_r of each row (R its query
/// head's output factor, o_r its attention output over its window keys from pass 1), so that
/// w_r = Σ_i p_ri · u_i as on the CPU. Block: D threads, one output channel each; grid strides
/// over rows.
template <int D>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(D) observe_row_outputs_kernel(ObserveParams p) {
  KVPACK_SHARED_ARRAY(float, attended, D);
  const int o = static_cast<int>(exec::thread_x());
  for (int64_t row = exec::block_x(); row < p.tokens * p.q_heads; row += exec::grid_x()) {
    exec::sync_block();  // every thread is done with the previous row
    attended[o] = p.attended[(row / p.q_heads) * p.attended_token_stride +
                             (row % p.q_heads) * p.attended_head_stride + o];
    exec::sync_block();
    const float* r = p.output_factors + (row % p.q_heads) * D * D + static_cast<int64_t>(o) * D;
    float acc = 0.0f;
    for (int c = 0; c < D; ++c) acc += r[c] * attended[c];
    p.row_outputs[row * D + o] = acc;
  }
}

/// Keys per block of pass 2 (one per thread) and query rows staged in shared memory at a time.
constexpr int kObserveKeys = 64;
constexpr int kObserveRows = 8;

/// Pass 2: a block per 64-key tile of kv head h (grid y; x strides over tiles), a thread per key:
/// the probability every row of the group (r = t · group + j, in that order) gives the key,
/// reduced (kSum: summed in row order, else the max) and folded into its score (an unscored key's
/// sum starts at 0). Keys outside the window or seen by no row keep their score. Static shared
/// memory: 64 · (D + 1) + 8 · D floats (36.3 KiB for D = 128).
template <int D, class T, bool kSum>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kObserveKeys)
    observe_reduce_kernel(const ObserveHead<T>* __restrict__ heads, ObserveParams p) {
  constexpr int kStride =
      D + 1;  // odd: thread j reading its key's channel c hits bank (j + c) % 32
  KVPACK_SHARED_ARRAY(float, k_tile, kObserveKeys* kStride);
  KVPACK_SHARED_ARRAY(float, q_rows, kObserveRows* D);
  const int tid = static_cast<int>(exec::thread_x());
  const int h = static_cast<int>(exec::block_y());
  const ObserveHead<T> head = heads[h];
  const int64_t rows_total = p.tokens * p.group;
  for (int64_t t0 = static_cast<int64_t>(exec::block_x()) * kObserveKeys; t0 < head.size;
       t0 += static_cast<int64_t>(exec::grid_x()) * kObserveKeys) {
    const int n = static_cast<int>(head.size - t0 < kObserveKeys ? head.size - t0 : kObserveKeys);
    exec::sync_block();  // every thread is done with the previous tile
    for (int e = tid; e < n * D; e += kObserveKeys) {
      k_tile[(e / D) * kStride + e % D] = head.template key<D>(t0 + e / D, e % D);
    }
    const int64_t i = t0 + tid;
    const int64_t key_position = tid < n ? head.positions[i] : 0;
    const bool in_window = tid < n && p.window.contains(key_position);
    bool seen = false;
    float reduced = kSum ? 0.0f : kUnscoredScore;
    for (int64_t r0 = 0; r0 < rows_total; r0 += kObserveRows) {
      const int rn =
          static_cast<int>(rows_total - r0 < kObserveRows ? rows_total - r0 : kObserveRows);
      exec::sync_block();  // the key tile is stored; every thread is done with the previous rows
      for (int e = tid; e < rn * D; e += kObserveKeys) {
        int64_t t = 0;
        int qh = 0;
        attention_row(r0 + e / D, p.group, h, t, qh);
        q_rows[e] = p.q[(t * p.q_heads + qh) * D + e % D] * p.scale;  // as attention_kernel
      }
      exec::sync_block();
      for (int rr = 0; in_window && rr < rn; ++rr) {
        int64_t t = 0;
        int qh = 0;
        attention_row(r0 + rr, p.group, h, t, qh);
        if (key_position > p.q_positions[t]) continue;
        seen = true;
        const int64_t row = t * p.q_heads + qh;
        float dot = 0.0f;
        for (int c = 0; c < D; ++c) dot += q_rows[rr * D + c] * k_tile[tid * kStride + c];
        float prob = expf(dot - p.row_max[row]) / p.row_sum[row];
        // The displacement weight from the plain probability, before the query weight.
        if (p.value_outputs != nullptr) prob *= displacement_weight<D>(p, row, qh, i, prob);
        if (p.query_weights != nullptr) prob *= p.query_weights[t];
        if (p.value_weights != nullptr) prob *= p.value_weights[qh * p.value_stride + i];
        if (kSum) {
          reduced += prob;
        } else {
          reduced = prob > reduced ? prob : reduced;
        }
      }
    }
    if (!seen) continue;
    const float stored = head.scores[i];
    if (kSum) {
      head.scores[i] = (stored == kUnscoredScore ? 0.0f : stored) + reduced;
    } else if (reduced > stored) {
      head.scores[i] = reduced;
    }
  }
}

/// KVzip+'s value weights: out[(h · group + j) · stride + i] = ‖R_(h · group + j) · v_i‖ for
/// held key i of kv head h (grid y) and query head j of its group, where R [D][D] (row-major,
/// `factors` + query head · D²) is the query head's OutputFactors factor of the layer; with
/// kOutputs (ValueWeighting::kDisplacement) the vector itself, out[((h · group + j) · stride +
/// i) · D + o] = (R · v_i)_o. One thread per key; the D² products are not tiled (the CPU runs
/// one small GEMM per head).
template <int D, class T, bool kOutputs>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    value_weights_kernel(const ObserveHead<T>* __restrict__ heads,
                         const float* __restrict__ factors, int group, int64_t stride,
                         float* __restrict__ out) {
  const int h = static_cast<int>(exec::block_y());
  const ObserveHead<T> head = heads[h];
  for (int64_t i = static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
       i < head.size; i += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
    float v[D];
    for (int c = 0; c < D; ++c) v[c] = head.template value<D>(i, c);
    for (int j = 0; j < group; ++j) {
      const float* r = factors + (static_cast<int64_t>(h) * group + j) * D * D;
      const int64_t at = (static_cast<int64_t>(h) * group + j) * stride + i;
      float sq = 0.0f;
      for (int o = 0; o < D; ++o) {
        float acc = 0.0f;
        for (int c = 0; c < D; ++c) acc += r[o * D + c] * v[c];
        if (kOutputs) out[at * D + o] = acc;
        sq += acc * acc;
      }
      if (!kOutputs) out[at] = sqrtf(sq);
    }
  }
}

template <int D, class T, bool kOutputs>
void launch_value_weights(const ObserveHead<T>* heads, int kv_heads, int64_t longest,
                          const float* factors, int group, float* out, cudaStream_t stream) {
  if (longest == 0) return;
  const dim3 grid(grid_blocks(longest, kElementwiseThreads, 4096), static_cast<unsigned>(kv_heads));
  exec::launch<kElementwiseThreads>(value_weights_kernel<D, T, kOutputs>, grid, kElementwiseThreads,
                                    stream, "value_weights_kernel", heads, factors, group, longest,
                                    out);
  check_launch("value_weights_kernel");
}

/// Enqueues LazyLayerDrop's pass (the row statistics; with p.row_mass, the mass on `kept`'s
/// keys).
template <int D, class T, class KeptSet>
void launch_observe_stats(const ObserveHead<T>* heads, const ObserveParams& p, const KeptSet& kept,
                          cudaStream_t stream) {
  if (p.tokens == 0) return;
  exec::launch<32>(observe_stats_kernel<D, T, KeptSet>, grid_blocks(p.tokens * p.q_heads, 1, 65535),
                   32, stream, "observe_stats_kernel", heads, p, kept);
  check_launch("observe_stats_kernel");
}

/// Enqueues both passes over `kv_heads` heads (device table); longest: the largest head size.
/// With p.row_outputs (ValueWeighting::kDisplacement), the rows' w_r between them (the keys' u_i
/// are the caller's: launch_value_weights with kOutputs).
template <int D, class T, bool kSum>
void launch_observe(const ObserveHead<T>* heads, int kv_heads, int64_t longest,
                    const ObserveParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || longest == 0) return;
  AttentionParams attention{};
  attention.q = p.q;
  attention.q_positions = p.q_positions;
  attention.tokens = p.tokens;
  attention.q_heads = p.q_heads;
  attention.group = p.group;
  attention.scale = p.scale;
  attention.splits = p.splits;
  attention.partial_acc = p.partial_acc;
  attention.partial_max = p.partial_max;
  attention.partial_sum = p.partial_sum;
  launch_attention_heads<D>(heads, kv_heads, attention, p.attended, p.attended_token_stride,
                            p.attended_head_stride, stream, p.window, p.row_max, p.row_sum);
  if (p.row_outputs != nullptr) {
    exec::launch<D>(observe_row_outputs_kernel<D>, grid_blocks(p.tokens * p.q_heads, 1, 65535), D,
                    stream, "observe_row_outputs_kernel", p);
    check_launch("observe_row_outputs_kernel");
  }
  const dim3 grid(grid_blocks(longest, kObserveKeys, 4096), static_cast<unsigned>(kv_heads));
  exec::launch<kObserveKeys>(observe_reduce_kernel<D, T, kSum>, grid, kObserveKeys, stream,
                             "observe_reduce_kernel", heads, p);
  check_launch("observe_reduce_kernel");
}

}  // namespace cuda
}  // namespace kvpack
