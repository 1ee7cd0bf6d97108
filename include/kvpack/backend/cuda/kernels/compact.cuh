/// \file backend/cuda/kernels/compact.cuh
/// \brief Compaction: gathers the kept rows of each head into new, exact-size buffers, so that
/// eviction returns the memory of evicted tokens to the device.
#pragma once

#include "common.cuh"
#include "kivi.cuh"

namespace kvpack {
namespace cuda {

/// One (layer, kv-head) to compact: old rows, kept indices (ascending), new buffers.
template <class T>
struct CompactJob {
  const T* k;  ///< rows of the tokens after blocks.quantized
  const T* v;
  const int32_t* positions;
  const int32_t* kept_index;  ///< `kept` ascending row indices into the old rows
  int64_t kept;
  T* new_k;
  T* new_v;
  int32_t* new_positions;
  const float* scores = nullptr;  ///< per-token scores kept across compress() calls, or null
  float* new_scores = nullptr;
  KiviBlocks blocks{};  ///< the head's first tokens in KIVI blocks: kept ones become rows
};

/// new_k[j] = k[kept_index[j]] (rows of head_dim), likewise v, positions and scores; a kept
/// token in KIVI blocks is decoded and stored as a row (rounded as the CPU's keep() rounds it).
/// Grid: x strides over kept * head_dim elements (coalesced within rows), y over jobs.
template <class T>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    gather_rows_kernel(const CompactJob<T>* __restrict__ jobs, int64_t job_count, int head_dim) {
  for (int64_t j = exec::block_y(); j < job_count; j += exec::grid_y()) {
    const CompactJob<T> job = jobs[j];
    const int64_t count = job.kept * head_dim;
    for (int64_t e =
             static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
         e < count; e += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
      const int64_t row = e / head_dim;
      const int64_t i = e % head_dim;
      const int64_t src = job.kept_index[row];
      if (src < job.blocks.quantized) {
        store_element(job.blocks.key(src, static_cast<int>(i), head_dim), job.new_k + e);
        store_element(job.blocks.value(src, static_cast<int>(i), head_dim), job.new_v + e);
      } else {
        const int64_t r = src - job.blocks.quantized;
        job.new_k[e] = job.k[r * head_dim + i];
        job.new_v[e] = job.v[r * head_dim + i];
      }
      if (i == 0) {
        job.new_positions[row] = job.positions[src];
        if (job.scores != nullptr) job.new_scores[row] = job.scores[src];
      }
    }
  }
}

/// Enqueues gather_rows_kernel; `longest` is the largest kept count of the jobs.
template <class T>
void launch_gather_rows(const CompactJob<T>* jobs, int64_t job_count, int64_t longest, int head_dim,
                        cudaStream_t stream) {
  if (job_count == 0 || longest == 0) return;
  const dim3 grid(grid_blocks(longest * head_dim, kElementwiseThreads, 4096),
                  grid_extent(job_count));
  exec::launch<kElementwiseThreads>(gather_rows_kernel<T>, grid, kElementwiseThreads, stream,
                                    "gather_rows_kernel", jobs, job_count, head_dim);
  check_launch("gather_rows_kernel");
}

}  // namespace cuda
}  // namespace kvpack
