/// \file backend/cuda/kernels/score.cuh
/// \brief Per-token eviction scores through the policy's KVPACK_HOST_DEVICE scoring hook -
/// token_score(key, value, head_dim) (L2NormEvict: -||k||^2) or position_score(position, last)
/// (StreamingLLM: -(last - position)) - for many (layer, head) segments in one launch.
#pragma once

#include "../../../policy/policy_base.hpp"
#include "common.cuh"
#include "kivi.cuh"

namespace kvpack {
namespace cuda {

/// One (layer, kv-head) to score: its stored rows and positions, and where its scores go.
template <class T>
struct ScoreJob {
  const T* k;                ///< [size - blocks.quantized][head_dim]: tokens after the blocks
  const T* v;                ///< [size - blocks.quantized][head_dim]
  const int32_t* positions;  ///< [size]
  int64_t last_position;     ///< newest position appended to the layer
  int64_t size;              ///< rows held
  int64_t offset;            ///< first score of this head in the concatenated score array
  KiviBlocks blocks;         ///< the head's first tokens in KIVI blocks (Compose<A, Quantize>)
};

/// Largest head_dim the CUDA kernels are compiled for (a decoded row's register array).
constexpr int kMaxHeadDim = 128;

/// scores[job.offset + t] = Policy::token_score(k_t, v_t, head_dim), or for position-scored
/// policies Policy::position_score(positions[t], last_position): the CPU backend calls the same
/// function on the same stored rows (tokens in KIVI blocks decoded to fp32 first, as the CPU
/// decodes them). Grid: x strides over tokens, y over jobs.
template <class Policy, class T>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    score_tokens_kernel(const ScoreJob<T>* __restrict__ jobs, int64_t job_count, int head_dim,
                        float* __restrict__ scores) {
  for (int64_t j = exec::block_y(); j < job_count; j += exec::grid_y()) {
    const ScoreJob<T> job = jobs[j];
    for (int64_t t =
             static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
         t < job.size; t += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
      if constexpr (Policy::score_source == ScoreSource::kPosition) {
        scores[job.offset + t] = Policy::position_score(job.positions[t], job.last_position);
      } else if (t < job.blocks.quantized) {
        float k[kMaxHeadDim], v[kMaxHeadDim];
        for (int c = 0; c < head_dim; ++c) {
          k[c] = job.blocks.key(t, c, head_dim);
          v[c] = job.blocks.value(t, c, head_dim);
        }
        scores[job.offset + t] = Policy::token_score(k, v, head_dim);
      } else {
        const int64_t row = t - job.blocks.quantized;
        scores[job.offset + t] =
            Policy::token_score(job.k + row * head_dim, job.v + row * head_dim, head_dim);
      }
    }
  }
}

/// Enqueues score_tokens_kernel over `job_count` jobs whose longest holds `longest` rows.
template <class Policy, class T>
void launch_score_tokens(const ScoreJob<T>* jobs, int64_t job_count, int64_t longest, int head_dim,
                         float* scores, cudaStream_t stream) {
  const dim3 grid(grid_blocks(longest, kElementwiseThreads, 1024), grid_extent(job_count));
  exec::launch<kElementwiseThreads>(score_tokens_kernel<Policy, T>, grid, kElementwiseThreads,
                                    stream, "score_tokens_kernel", jobs, job_count, head_dim,
                                    scores);
  check_launch("score_tokens_kernel");
}

}  // namespace cuda
}  // namespace kvpack
