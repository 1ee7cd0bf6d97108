/// \file backend/cuda/kernels/hidden_scores.cuh
/// \brief KVzap's scoring on the device (observe_hidden()): the scorer's GEMM of the hidden
/// states runs in cuBLAS (backend/cuda/linalg.hpp); these kernels add the per-head bias and store
/// each token's score, Policy::stored_score(log-score), where its kv head holds it.
/// Source: Jegou et al., "KVzap" (arXiv 2601.07891).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace kvpack {
namespace cuda {

/// One kv head of the observed layer: its held positions (ascending) and scores.
struct HiddenScoreHead {
  const int32_t* positions;  ///< [size]
  float* scores;             ///< [size]
  int64_t size;
};

/// log_scores[t][h] += bias[h] over [tokens][kv_heads]. Grid: x strides over the elements.
/// (A template, as every kernel here: a header's kernel must not be defined once per TU.)
template <class T>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    add_head_bias_kernel(T* __restrict__ log_scores, const T* __restrict__ bias, int64_t tokens,
                         int kv_heads) {
  const int64_t count = tokens * kv_heads;
  for (int64_t e = static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
       e < count; e += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
    log_scores[e] += bias[e % kv_heads];
  }
}

/// For token t (position positions[t]) and kv head h (grid y): when the head holds that
/// position, its score becomes Policy::stored_score(log_scores[t][h]); a position the head no
/// longer holds (evicted there) is skipped, as on the CPU. Grid: x strides over tokens.
template <class Policy>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    store_hidden_scores_kernel(const HiddenScoreHead* __restrict__ heads,
                               const float* __restrict__ log_scores,
                               const int32_t* __restrict__ positions, int64_t tokens,
                               int kv_heads) {
  const int h = static_cast<int>(exec::block_y());
  const HiddenScoreHead head = heads[h];
  for (int64_t t = static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
       t < tokens; t += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
    // Lower bound of the position among the head's held positions.
    const int32_t position = positions[t];
    int64_t lo = 0, hi = head.size;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (head.positions[mid] < position) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    if (lo < head.size && head.positions[lo] == position) {
      head.scores[lo] = Policy::stored_score(log_scores[t * kv_heads + h]);
    }
  }
}

inline void launch_add_head_bias(float* log_scores, const float* bias, int64_t tokens, int kv_heads,
                                 cudaStream_t stream) {
  exec::launch<kElementwiseThreads>(
      add_head_bias_kernel<float>, grid_blocks(tokens * kv_heads, kElementwiseThreads),
      kElementwiseThreads, stream, "add_head_bias_kernel", log_scores, bias, tokens, kv_heads);
  check_launch("add_head_bias_kernel");
}

template <class Policy>
void launch_store_hidden_scores(const HiddenScoreHead* heads, const float* log_scores,
                                const int32_t* positions, int64_t tokens, int kv_heads,
                                cudaStream_t stream) {
  const dim3 grid(grid_blocks(tokens, kElementwiseThreads, 4096), static_cast<unsigned>(kv_heads));
  exec::launch<kElementwiseThreads>(store_hidden_scores_kernel<Policy>, grid, kElementwiseThreads,
                                    stream, "store_hidden_scores_kernel", heads, log_scores,
                                    positions, tokens, kv_heads);
  check_launch("store_hidden_scores_kernel");
}

}  // namespace cuda
}  // namespace kvpack
