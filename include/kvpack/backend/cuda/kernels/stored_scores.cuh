/// \file backend/cuda/kernels/stored_scores.cuh
/// \brief The device scores of the policies that store one per held token (KVzip, SnapKV: set by
/// observe(), kernels/observe.cuh; KVzap: by observe_hidden(), kernels/hidden_scores.cuh): the
/// unscored mark of new tokens, and their gathering into one array for compress()'s selection
/// (SnapKV's max pooling, KVzap's threshold counts).
#pragma once

#include <cmath>
#include <cstdint>

#include "../../../policy/policy_base.hpp"
#include "common.cuh"

namespace kvpack {
namespace cuda {

/// The score of a token no observed query has seen (as the CPU stores' kUnscored).
constexpr float kUnscoredScore = -1.0f;

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
