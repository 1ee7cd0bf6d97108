/// \file backend/cuda/kernels/observe.cuh
/// \brief Query scoring (observe()): the softmax probability each held key receives from each
/// observed query row, reduced over the rows and the query heads of its GQA group (the max for
/// KVzip, the sum for SnapKV), inside a ScoreWindow (KVzip's chunk-local softmax); and the
/// attention mass each row puts on a policy's kept set (SimLayerKV's lazy layers).
///
/// Two passes per observe() call: the softmax statistics (max and sum of exp) of every (query
/// token, query head) over its visible window keys, then one thread per key that recomputes its
/// logits against every row and folds the reduced probability into the head's scores (KVzip+'s
/// displacement weight adds a pass between them: each row's attention output through W_o). The
/// logits are computed twice (the fused single-pass form, as a by-product of an attention kernel,
/// is left for later); the arithmetic matches the CPU's in fp32 up to the summation order. Sources:
/// Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (arXiv
/// 2505.23416); Li et al., "SnapKV" (arXiv 2404.14469); Zhang et al., "SimLayerKV" (arXiv
/// 2410.13846).
#pragma once

#include <cmath>
#include <cstdint>

#include "../../../policy/policy_base.hpp"
#include "../../../policy/score_window.hpp"
#include "common.cuh"
#include "kivi.cuh"

namespace kvpack {
namespace cuda {

template <int D, class T>
KVPACK_DEVICE float observe_logit(const float* q, const T* k, float scale) {
  float dot = 0.0f;
  for (int c = 0; c < D; ++c) dot += q[c] * to_float(k[c]);
  return dot * scale;
}

/// One (kv head) of the observed layer: its stored tokens (KIVI blocks, then rows), positions
/// and scores.
template <class T>
struct ObserveHead {
  const T* k;                ///< [size - blocks.quantized][head_dim]: the tokens after the blocks
  const T* v;                ///< [size - blocks.quantized][head_dim] (KVzip+'s value weights)
  const int32_t* positions;  ///< [size], ascending
  float* scores;             ///< [size]: kUnscoredScore until a row sees the key
  int64_t size;
  KiviBlocks blocks{};  ///< the head's first tokens in KIVI blocks (Compose<A, Quantize>)

  /// Scaled logit q · k_i of held token i (a key in blocks decoded as the CPU decodes it).
  template <int D>
  KVPACK_DEVICE float logit(const float* q, int64_t i, float scale) const {
    if (i >= blocks.quantized) return observe_logit<D>(q, k + (i - blocks.quantized) * D, scale);
    float dot = 0.0f;
    for (int c = 0; c < D; ++c) dot += q[c] * blocks.key(i, c, D);
    return dot * scale;
  }
  /// Channel c of the value of held token i.
  template <int D>
  KVPACK_DEVICE float value(int64_t i, int c) const {
    return i < blocks.quantized ? blocks.value(i, c, D)
                                : to_float(v[(i - blocks.quantized) * D + c]);
  }
};

/// The score of a token no observed query has seen (as the CPU stores' kUnscored).
constexpr float kUnscoredScore = -1.0f;

/// What both passes read: fp32 queries [tokens][q_heads][head_dim], their positions, the window.
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
  /// KVzip+ with ValueWeighting::kDisplacement, else null: u_i = R · v_i of each held key per
  /// query head of its group [kv_heads][group][value_stride][head_dim] (value_weights_kernel with
  /// kOutputs), and w_r = R · o_r of each row [tokens][q_heads][head_dim], o_r the row's attention
  /// output over its window keys (observe_outputs_kernel); R the query head's output factor.
  const float* value_outputs;
  float* row_outputs;
};

/// The kept set of a policy that measures no attention mass (KVzip, SnapKV): empty.
struct NoKeptSet {
  KVPACK_HOST_DEVICE bool in_kept_set(int64_t, int64_t, int64_t) const { return false; }
};

/// Pass 1: one warp per (query token, query head); lanes stride over the head's keys. With
/// p.row_mass, also the softmax mass of the keys `kept.in_kept_set(position, first, query
/// position)` selects (Policy: LazyLayerDrop). Grid: x over tokens · q_heads rows (grid-stride),
/// one warp per block.
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

/// Between the passes for ValueWeighting::kDisplacement: w_r = Σ_i p_ri · u_i over the row's
/// visible window keys (p.row_outputs), p_ri the softmax probability of pass 1's statistics. One
/// warp per row as in pass 1: each lane computes one key's probability of a 32-key tile, which is
/// broadcast by shuffle while the lanes accumulate D / 32 channels each (coalesced reads of u).
template <int D, class T>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(32)
    observe_outputs_kernel(const ObserveHead<T>* __restrict__ heads, ObserveParams p) {
  static_assert(D % 32 == 0, "observe_outputs_kernel: head_dim a multiple of the warp");
  constexpr int kPerLane = D / 32;
  const int lane = static_cast<int>(exec::thread_x());
  for (int64_t row = exec::block_x(); row < p.tokens * p.q_heads; row += exec::grid_x()) {
    const int64_t t = row / p.q_heads;
    const int qh = static_cast<int>(row % p.q_heads);
    const ObserveHead<T> head = heads[qh / p.group];
    const float* q = p.q + row * D;
    const float* u = p.value_outputs + static_cast<int64_t>(qh) * p.value_stride * D;
    const int64_t position = p.q_positions[t];
    const float row_max = p.row_max[row], row_sum = p.row_sum[row];
    float acc[kPerLane] = {};
    for (int64_t base = 0; row_sum > 0.0f && base < head.size; base += 32) {
      const int64_t i = base + lane;
      float prob = 0.0f;
      if (i < head.size) {
        const int64_t key_position = head.positions[i];
        if (key_position <= position && p.window.contains(key_position)) {
          prob = expf(head.template logit<D>(q, i, p.scale) - row_max) / row_sum;
        }
      }
      const int count = static_cast<int>(head.size - base < 32 ? head.size - base : 32);
      for (int k = 0; k < count; ++k) {
        const float pk = exec::shfl(prob, k);
        if (pk == 0.0f) continue;  // the same for every lane
        const float* uk = u + (base + k) * D;
        for (int c = 0; c < kPerLane; ++c) acc[c] += pk * uk[lane + 32 * c];
      }
    }
    for (int c = 0; c < kPerLane; ++c) p.row_outputs[row * D + lane + 32 * c] = acc[c];
  }
}

/// Pass 2: one thread per key of one kv head (grid y): the probabilities every row of the group
/// gives it, reduced (kSum: summed in row order, else the max) and folded into its score (an
/// unscored key's sum starts at 0). Keys outside the window or seen by no row keep their score.
template <int D, class T, bool kSum>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    observe_reduce_kernel(const ObserveHead<T>* __restrict__ heads, ObserveParams p) {
  const int h = static_cast<int>(exec::block_y());
  const ObserveHead<T> head = heads[h];
  for (int64_t i = static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
       i < head.size; i += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
    const int64_t key_position = head.positions[i];
    if (!p.window.contains(key_position)) continue;
    bool seen = false;
    float reduced = kSum ? 0.0f : kUnscoredScore;
    for (int64_t t = 0; t < p.tokens; ++t) {
      if (key_position > p.q_positions[t]) continue;
      seen = true;
      for (int j = 0; j < p.group; ++j) {
        const int64_t row = t * p.q_heads + h * p.group + j;
        const float s = head.template logit<D>(p.q + row * D, i, p.scale);
        float prob = expf(s - p.row_max[row]) / p.row_sum[row];
        // The displacement weight from the plain probability, before the query weight.
        if (p.value_outputs != nullptr)
          prob *= displacement_weight<D>(p, row, h * p.group + j, i, prob);
        if (p.query_weights != nullptr) prob *= p.query_weights[t];
        if (p.value_weights != nullptr) {
          prob *= p.value_weights[(static_cast<int64_t>(h) * p.group + j) * p.value_stride + i];
        }
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

/// Enqueues pass 1 alone (the row statistics; with p.row_mass, the mass on `kept`'s keys).
template <int D, class T, class KeptSet>
void launch_observe_stats(const ObserveHead<T>* heads, const ObserveParams& p, const KeptSet& kept,
                          cudaStream_t stream) {
  if (p.tokens == 0) return;
  exec::launch<32>(observe_stats_kernel<D, T, KeptSet>, grid_blocks(p.tokens * p.q_heads, 1, 65535),
                   32, stream, "observe_stats_kernel", heads, p, kept);
  check_launch("observe_stats_kernel");
}

/// Enqueues both passes over `kv_heads` heads (device table); longest: the largest head size.
/// With p.row_outputs (ValueWeighting::kDisplacement), the rows' outputs between them.
template <int D, class T, bool kSum>
void launch_observe(const ObserveHead<T>* heads, int kv_heads, int64_t longest,
                    const ObserveParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || longest == 0) return;
  launch_observe_stats<D, T>(heads, p, NoKeptSet{}, stream);
  if (p.row_outputs != nullptr) {
    exec::launch<32>(observe_outputs_kernel<D, T>, grid_blocks(p.tokens * p.q_heads, 1, 65535), 32,
                     stream, "observe_outputs_kernel", heads, p);
    check_launch("observe_outputs_kernel");
  }
  const dim3 grid(grid_blocks(longest, kElementwiseThreads, 4096), static_cast<unsigned>(kv_heads));
  exec::launch<kElementwiseThreads>(observe_reduce_kernel<D, T, kSum>, grid, kElementwiseThreads,
                                    stream, "observe_reduce_kernel", heads, p);
  check_launch("observe_reduce_kernel");
}

/// One (layer, kv head) whose stored scores enter a compress().
struct StoredScoreJob {
  const float* scores;       ///< [size]
  const int32_t* positions;  ///< [size]
  int64_t size;
  int64_t offset;  ///< first score of this head in the concatenated score array
  int64_t protect_below, protect_above;  ///< the protected positions (is_protected_position)
};

/// Per-job counts of gather_stored_scores_kernel (zeroed by the caller).
struct StoredScoreCounts {
  int unscored;  ///< tokens no observation has scored
  int at_least;  ///< protected tokens and tokens scoring >= the threshold (when one is given)
};

/// out[offset + t] = the stored score of token t after the policy's max pooling over
/// `pool_radius` held neighbours on either side (detail::max_pooled_score; SnapKV), or +inf for a
/// token no observation has scored (kept outside the budget, as on the CPU). counts[j] gets the
/// unscored tokens and, when `threshold` is not NaN (KVzap's score_threshold), the tokens a
/// threshold keeps. Grid: x strides over tokens, y over jobs.
template <class Job>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    gather_stored_scores_kernel(const Job* __restrict__ jobs, int64_t job_count,
                                int64_t pool_radius, float threshold, float* __restrict__ out,
                                StoredScoreCounts* __restrict__ counts) {
  for (int64_t j = exec::block_y(); j < job_count; j += exec::grid_y()) {
    const Job job = jobs[j];
    int unscored = 0, at_least = 0;
    for (int64_t t =
             static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
         t < job.size; t += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
      const float score = job.scores[t];
      const bool seen = score != kUnscoredScore;
      const float value =
          seen ? detail::max_pooled_score(job.scores, job.size, t, pool_radius) : INFINITY;
      out[job.offset + t] = value;
      unscored += !seen;
      at_least += is_protected_position(job.positions[t], job.protect_below, job.protect_above) ||
                  value >= threshold;  // false for every value when threshold is NaN
    }
    if (unscored > 0) exec::atomic_add(&counts[j].unscored, unscored);
    if (at_least > 0) exec::atomic_add(&counts[j].at_least, at_least);
  }
}

/// Enqueues gather_stored_scores_kernel over `job_count` jobs whose longest holds `longest`.
inline void launch_gather_stored_scores(const StoredScoreJob* jobs, int64_t job_count,
                                        int64_t longest, int64_t pool_radius, float threshold,
                                        float* out, StoredScoreCounts* counts,
                                        cudaStream_t stream) {
  const dim3 grid(grid_blocks(longest, kElementwiseThreads, 1024), grid_extent(job_count));
  exec::launch<kElementwiseThreads>(gather_stored_scores_kernel<StoredScoreJob>, grid,
                                    kElementwiseThreads, stream, "gather_stored_scores_kernel",
                                    jobs, job_count, pool_radius, threshold, out, counts);
  check_launch("gather_stored_scores_kernel");
}

/// x[i] = value for i < n (the unscored marks of newly appended tokens).
template <class T>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    fill_kernel(T* __restrict__ x, int64_t n, T value) {
  for (int64_t i = static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
       i < n; i += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
    x[i] = value;
  }
}

template <class T>
void launch_fill(T* x, int64_t n, T value, cudaStream_t stream) {
  if (n <= 0) return;
  exec::launch<kElementwiseThreads>(fill_kernel<T>, grid_blocks(n, kElementwiseThreads),
                                    kElementwiseThreads, stream, "fill_kernel", x, n, value);
  check_launch("fill_kernel");
}

}  // namespace cuda
}  // namespace kvpack
