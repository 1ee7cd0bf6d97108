/// \file backend/cuda/kernels/select.cuh
/// \brief Per-head budgeted selection on the device: the kept set of detail::select_top_k.
///
/// One block per (layer, kv-head). Protected tokens (sinks, recent window) are kept; among the
/// others, the `room` best are kept, where "best" is the order of detail::select_top_k (higher
/// score, then lower index). That order is one unique 64-bit key per token (selection_key), so
/// the kept candidates are exactly those whose key is >= the room-th largest key, found by an
/// MSB-first radix select (8 passes of 8 bits, shared-memory histograms). A second kernel turns
/// the keep flags into ascending kept indices with a block-wide exclusive scan.
#pragma once

#include <climits>

#include "block_scan.cuh"
#include "common.cuh"

namespace kvpack {
namespace cuda {

/// One (layer, kv-head) to select from.
struct SelectJob {
  const float* scores;       ///< per held token (device)
  const int32_t* positions;  ///< per held token, ascending (device)
  int64_t size;              ///< tokens held
  int64_t target;            ///< Budget::target of the layer's appended count
  int64_t protect_below;     ///< positions < this are sinks
  int64_t protect_above;     ///< positions > this are recent
  int64_t offset;            ///< first entry of this head in the flag / index arrays
};

/// What a head keeps: the count and the position of its first kept token (-1 when none).
struct SelectResult {
  int64_t kept;
  int64_t first_position;
};

constexpr int kSelectThreads = 256;

/// flags[offset + i] = 1 when token i of the job is kept. Block: kThreads threads, one job.
template <int kThreads>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads)
    select_top_k_kernel(const SelectJob* __restrict__ jobs, uint8_t* __restrict__ flags,
                        SelectResult* __restrict__ results) {
  KVPACK_SHARED_ARRAY(uint32_t, hist, kRadixBins);
  KVPACK_SHARED(unsigned long long, protected_count);
  KVPACK_SHARED(unsigned long long, first_kept);
  KVPACK_SHARED(unsigned long long, shared_prefix);
  KVPACK_SHARED(unsigned long long, shared_remaining);
  const SelectJob job = jobs[exec::block_x()];
  const int tid = exec::thread_x();
  if (tid == 0) {
    protected_count = 0;
    first_kept = ULLONG_MAX;
  }
  exec::sync_block();

  unsigned long long local = 0;
  for (int64_t i = tid; i < job.size; i += kThreads) {
    if (is_protected_position(job.positions[i], job.protect_below, job.protect_above)) ++local;
  }
  if (local != 0) exec::atomic_add(&protected_count, local);
  exec::sync_block();

  const int64_t protected_tokens = static_cast<int64_t>(protected_count);
  const int64_t kept = kept_count(protected_tokens, job.size, job.target);
  const int64_t room = kept - protected_tokens;  // candidates kept
  const int64_t candidates = job.size - protected_tokens;
  const bool keep_all = room >= candidates;
  const bool keep_none = room == 0;

  // Radix select of the room-th largest candidate key (uniform control flow in the block).
  uint64_t threshold = 0;
  if (!keep_all && !keep_none) {
    uint64_t prefix = 0;
    uint64_t remaining = static_cast<uint64_t>(room);
    for (int pass = 0; pass < kRadixPasses; ++pass) {
      for (int b = tid; b < kRadixBins; b += kThreads) hist[b] = 0;
      exec::sync_block();
      const uint64_t mask = radix_prefix_mask(pass);
      for (int64_t i = tid; i < job.size; i += kThreads) {
        if (is_protected_position(job.positions[i], job.protect_below, job.protect_above)) {
          continue;
        }
        const uint64_t key = selection_key(job.scores[i], i);
        if ((key & mask) == prefix) exec::atomic_add(&hist[radix_digit(key, pass)], 1u);
      }
      exec::sync_block();
      if (tid == 0) {
        uint64_t rank = remaining;
        const int digit = select_digit(hist, rank);
        shared_prefix = prefix | (static_cast<uint64_t>(digit) << radix_shift(pass));
        shared_remaining = rank;
      }
      exec::sync_block();  // also: nobody rewrites hist before thread 0 has read it
      prefix = shared_prefix;
      remaining = shared_remaining;
    }
    threshold = prefix;
  }

  unsigned long long first = ULLONG_MAX;
  for (int64_t i = tid; i < job.size; i += kThreads) {
    bool keep = is_protected_position(job.positions[i], job.protect_below, job.protect_above);
    if (!keep && !keep_none) keep = keep_all || selection_key(job.scores[i], i) >= threshold;
    flags[job.offset + i] = keep ? 1 : 0;
    if (keep && static_cast<unsigned long long>(i) < first) first = i;
  }
  if (first != ULLONG_MAX) exec::atomic_min(&first_kept, first);
  exec::sync_block();
  if (tid == 0) {
    results[exec::block_x()].kept = kept;
    results[exec::block_x()].first_position =
        first_kept == ULLONG_MAX ? -1 : static_cast<int64_t>(job.positions[first_kept]);
  }
}

/// kept_index[offset + j] = index of the j-th kept token of the job (ascending), from the flags
/// of select_top_k_kernel. Block: kThreads threads, one job; chunks of kThreads tokens are
/// scanned in order and offset by the running total.
template <int kThreads>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads)
    kept_indices_kernel(const SelectJob* __restrict__ jobs, const uint8_t* __restrict__ flags,
                        int32_t* __restrict__ kept_index) {
  KVPACK_SHARED(BlockScanStorage<kThreads>, scan_storage);
  const SelectJob job = jobs[exec::block_x()];
  int64_t base = 0;
  for (int64_t chunk = 0; chunk < job.size; chunk += kThreads) {
    const int64_t i = chunk + exec::thread_x();
    const int flag = i < job.size ? flags[job.offset + i] : 0;
    int offset = 0, total = 0;
    block_exclusive_sum<kThreads>(flag, offset, total, scan_storage);
    if (flag != 0) kept_index[job.offset + base + offset] = static_cast<int32_t>(i);
    base += total;
    exec::sync_block();  // scan_storage is reused by the next chunk
  }
}

/// Enqueues kept_indices_kernel: one block per job, from the keep flags.
inline void launch_kept_indices(const SelectJob* jobs, int64_t job_count, const uint8_t* flags,
                                int32_t* kept_index, cudaStream_t stream) {
  exec::launch<kSelectThreads>(kept_indices_kernel<kSelectThreads>,
                               static_cast<unsigned>(job_count), kSelectThreads, stream,
                               "kept_indices_kernel", jobs, flags, kept_index);
  check_launch("kept_indices_kernel");
}

/// Enqueues the selection and the index kernels for `job_count` jobs.
inline void launch_select_top_k(const SelectJob* jobs, int64_t job_count, uint8_t* flags,
                                SelectResult* results, int32_t* kept_index, cudaStream_t stream) {
  if (job_count == 0) return;
  const unsigned grid = static_cast<unsigned>(job_count);
  exec::launch<kSelectThreads>(select_top_k_kernel<kSelectThreads>, grid, kSelectThreads, stream,
                               "select_top_k_kernel", jobs, flags, results);
  check_launch("select_top_k_kernel");
  launch_kept_indices(jobs, job_count, flags, kept_index, stream);
}

}  // namespace cuda
}  // namespace kvpack
