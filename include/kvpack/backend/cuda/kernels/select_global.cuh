/// \file backend/cuda/kernels/select_global.cuh
/// \brief One global budget over every (layer, kv-head, token) selected on the device: the kept
/// sets of detail::select_global without a host round trip of the scores.
///
/// select_global keeps the protected tokens (sinks, recent window) of every head and, among all
/// other tokens, the `room` best, room = Σ targets − Σ protected; "best" is higher score, then
/// earlier in the concatenation of the heads. With the token's index in that concatenation
/// (SelectJob::offset + i) selection_key orders exactly so, and the keys are unique: the kept
/// candidates are those whose key is >= the room-th largest, found by an MSB-first radix select
/// whose histograms span the whole grid (8 passes, each a histogram kernel and a one-block digit
/// kernel). A head the threshold emptied keeps its best token, as on the CPU. Kept indices come
/// from kept_indices_kernel (select.cuh).
#pragma once

#include <climits>

#include "select.cuh"

namespace kvpack {
namespace cuda {

/// Device state of one global selection; zero it before launch_select_global.
struct GlobalSelectState {
  unsigned long long protected_tokens;
  unsigned long long prefix;     ///< digits of the threshold key fixed so far
  unsigned long long remaining;  ///< rank (from the top) of the threshold among keys on prefix
  int keep_all;                  ///< room >= candidates: every token is kept
  int keep_none;                 ///< room == 0: only protected tokens are kept
  uint32_t hist[kRadixBins];
};

/// Threads of the one-block kernels (a warp: the emulation and GPUs want whole warps).
constexpr int kSelectGlobalSmallThreads = 32;

/// Calls body(job, i) for every token i of every job. Grid: x strides over tokens, y over jobs.
template <class Body>
KVPACK_DEVICE void for_each_job_token(const SelectJob* jobs, int64_t job_count, Body body) {
  for (int64_t j = exec::block_y(); j < job_count; j += exec::grid_y()) {
    const SelectJob job = jobs[j];
    for (int64_t i =
             static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
         i < job.size; i += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
      body(job, i);
    }
  }
}

KVPACK_DEVICE bool job_protects(const SelectJob& job, int64_t i) {
  return is_protected_position(job.positions[i], job.protect_below, job.protect_above);
}

/// state.protected_tokens = protected tokens of all jobs.
template <int kThreads>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads)
    count_protected_kernel(const SelectJob* __restrict__ jobs, int64_t job_count,
                           GlobalSelectState* __restrict__ state) {
  unsigned long long local = 0;
  for_each_job_token(jobs, job_count, [&](const SelectJob& job, int64_t i) {
    local += job_protects(job, i) ? 1 : 0;
  });
  if (local != 0) exec::atomic_add(&state->protected_tokens, local);
}

/// room, keep_all / keep_none and the radix state, from the protected count. One block.
template <int kThreads>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads)
    global_room_kernel(GlobalSelectState* __restrict__ state, int64_t total, int64_t target_sum) {
  if (exec::thread_x() != 0) return;
  const int64_t protected_tokens = static_cast<int64_t>(state->protected_tokens);
  int64_t room = target_sum - protected_tokens;
  room = room < 0 ? 0 : room;
  state->keep_all = room >= total - protected_tokens ? 1 : 0;
  state->keep_none = room == 0 ? 1 : 0;
  state->prefix = 0;
  state->remaining = static_cast<unsigned long long>(room);
}

/// Adds, for each candidate whose key lies on the current prefix, one to state.hist[digit].
/// Each block counts in shared memory first, then adds its non-zero bins.
template <int kThreads>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads)
    global_histogram_kernel(const SelectJob* __restrict__ jobs, int64_t job_count,
                            GlobalSelectState* __restrict__ state, int pass) {
  KVPACK_SHARED_ARRAY(uint32_t, hist, kRadixBins);
  if (state->keep_all != 0 || state->keep_none != 0) return;  // uniform: the whole grid leaves
  const int tid = exec::thread_x();
  for (int b = tid; b < kRadixBins; b += exec::block_threads()) hist[b] = 0;
  exec::sync_block();
  const uint64_t mask = radix_prefix_mask(pass);
  const uint64_t prefix = state->prefix;
  for_each_job_token(jobs, job_count, [&](const SelectJob& job, int64_t i) {
    if (job_protects(job, i)) return;
    const uint64_t key = selection_key(job.scores[i], job.offset + i);
    if ((key & mask) == prefix) exec::atomic_add(&hist[radix_digit(key, pass)], 1u);
  });
  exec::sync_block();
  for (int b = tid; b < kRadixBins; b += exec::block_threads()) {
    if (hist[b] != 0) exec::atomic_add(&state->hist[b], hist[b]);
  }
}

/// Fixes the digit of pass `pass` from the global histogram and clears it. One block.
template <int kThreads>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads)
    global_digit_kernel(GlobalSelectState* __restrict__ state, int pass) {
  if (state->keep_all != 0 || state->keep_none != 0) return;
  if (exec::thread_x() == 0) {
    uint64_t remaining = state->remaining;
    const int digit = select_digit(state->hist, remaining);
    state->prefix |= static_cast<uint64_t>(digit) << radix_shift(pass);
    state->remaining = remaining;
  }
  exec::sync_block();
  for (int b = exec::thread_x(); b < kRadixBins; b += exec::block_threads()) state->hist[b] = 0;
}

/// flags[job.offset + i] = 1 for the tokens kept by the global threshold (before the rule that
/// a head never empties).
template <int kThreads>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads)
    global_flags_kernel(const SelectJob* __restrict__ jobs, int64_t job_count,
                        const GlobalSelectState* __restrict__ state, uint8_t* __restrict__ flags) {
  const bool keep_all = state->keep_all != 0, keep_none = state->keep_none != 0;
  const uint64_t threshold = state->prefix;
  for_each_job_token(jobs, job_count, [&](const SelectJob& job, int64_t i) {
    bool keep = job_protects(job, i);
    if (!keep && !keep_none) {
      keep = keep_all || selection_key(job.scores[i], job.offset + i) >= threshold;
    }
    flags[job.offset + i] = keep ? 1 : 0;
  });
}

/// Per job: kept count and first kept position; a job left without a token keeps its best one
/// (highest score, then lowest index, as std::max_element on the CPU). Block: one job.
template <int kThreads>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads)
    global_results_kernel(const SelectJob* __restrict__ jobs, uint8_t* __restrict__ flags,
                          SelectResult* __restrict__ results) {
  KVPACK_SHARED(unsigned long long, kept);
  KVPACK_SHARED(unsigned long long, first_kept);
  KVPACK_SHARED(unsigned long long, best_inverted);  // min of ~key = max key
  const SelectJob job = jobs[exec::block_x()];
  const int tid = exec::thread_x();
  if (tid == 0) {
    kept = 0;
    first_kept = ULLONG_MAX;
    best_inverted = ULLONG_MAX;
  }
  exec::sync_block();
  unsigned long long count = 0, first = ULLONG_MAX, best = ULLONG_MAX;
  for (int64_t i = tid; i < job.size; i += kThreads) {
    if (flags[job.offset + i] != 0) {
      ++count;
      first = static_cast<unsigned long long>(i) < first ? i : first;
    }
    const unsigned long long inverted = ~selection_key(job.scores[i], i);
    best = inverted < best ? inverted : best;
  }
  if (count != 0) exec::atomic_add(&kept, count);
  if (first != ULLONG_MAX) exec::atomic_min(&first_kept, first);
  if (best != ULLONG_MAX) exec::atomic_min(&best_inverted, best);
  exec::sync_block();
  if (tid == 0) {
    unsigned long long n = kept, f = first_kept;
    if (n == 0 && job.size > 0) {  // the threshold took every token: keep the best
      f = 0xFFFFFFFFull - (~best_inverted & 0xFFFFFFFFull);
      flags[job.offset + static_cast<int64_t>(f)] = 1;
      n = 1;
    }
    results[exec::block_x()].kept = static_cast<int64_t>(n);
    results[exec::block_x()].first_position =
        n == 0 ? -1 : static_cast<int64_t>(job.positions[static_cast<int64_t>(f)]);
  }
}

/// Enqueues the global selection of `job_count` jobs holding `total` tokens (the longest
/// `longest`) whose targets sum to `target_sum`: flags, per-job results and kept indices as
/// launch_select_top_k gives them. `state` (device) must be zeroed.
inline void launch_select_global(const SelectJob* jobs, int64_t job_count, int64_t total,
                                 int64_t longest, int64_t target_sum, uint8_t* flags,
                                 SelectResult* results, int32_t* kept_index,
                                 GlobalSelectState* state, cudaStream_t stream) {
  if (job_count == 0) return;
  const dim3 grid(grid_blocks(longest, kElementwiseThreads, 1024), grid_extent(job_count));
  exec::launch<kElementwiseThreads>(count_protected_kernel<kElementwiseThreads>, grid,
                                    kElementwiseThreads, stream, "count_protected_kernel", jobs,
                                    job_count, state);
  check_launch("count_protected_kernel");
  exec::launch<kSelectGlobalSmallThreads>(global_room_kernel<kSelectGlobalSmallThreads>, 1,
                                          kSelectGlobalSmallThreads, stream, "global_room_kernel",
                                          state, total, target_sum);
  check_launch("global_room_kernel");
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    exec::launch<kElementwiseThreads>(global_histogram_kernel<kElementwiseThreads>, grid,
                                      kElementwiseThreads, stream, "global_histogram_kernel", jobs,
                                      job_count, state, pass);
    check_launch("global_histogram_kernel");
    exec::launch<kSelectGlobalSmallThreads>(global_digit_kernel<kSelectGlobalSmallThreads>, 1,
                                            kSelectGlobalSmallThreads, stream,
                                            "global_digit_kernel", state, pass);
    check_launch("global_digit_kernel");
  }
  exec::launch<kElementwiseThreads>(global_flags_kernel<kElementwiseThreads>, grid,
                                    kElementwiseThreads, stream, "global_flags_kernel", jobs,
                                    job_count, state, flags);
  check_launch("global_flags_kernel");
  const unsigned blocks = static_cast<unsigned>(job_count);
  exec::launch<kSelectThreads>(global_results_kernel<kSelectThreads>, blocks, kSelectThreads,
                               stream, "global_results_kernel", jobs, flags, results);
  check_launch("global_results_kernel");
  launch_kept_indices(jobs, job_count, flags, kept_index, stream);
}

}  // namespace cuda
}  // namespace kvpack
