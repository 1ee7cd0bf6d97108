/// \file backend/cuda/kernels/block_scan.cuh
/// \brief Block-wide exclusive prefix sum over the execution layer (warp shuffles + one shared
/// array of warp totals), so the kernels need no CUB and run on the emulated grid too.
#pragma once

#include "common.cuh"

namespace kvpack {
namespace cuda {

/// Shared storage of block_exclusive_sum<kThreads>: one total per warp.
template <int kThreads>
struct BlockScanStorage {
  static_assert(kThreads % exec::kWarpSize == 0 && kThreads <= 1024,
                "block_exclusive_sum needs whole warps and at most 1024 threads");
  int warp_totals[kThreads / exec::kWarpSize];
};

/// offset = sum of `value` over the threads before this one (thread_x order), total = the sum
/// over the block. Every thread of the block must call it; `storage` is block-shared and may be
/// reused after the next exec::sync_block().
template <int kThreads>
KVPACK_DEVICE void block_exclusive_sum(int value, int& offset, int& total,
                                       BlockScanStorage<kThreads>& storage) {
  constexpr int kWarps = kThreads / exec::kWarpSize;
  const int tid = static_cast<int>(exec::thread_x());
  const int lane = tid % exec::kWarpSize;
  const int warp = tid / exec::kWarpSize;
  int inclusive = value;  // Hillis-Steele scan within the warp
  for (int d = 1; d < exec::kWarpSize; d <<= 1) {
    const int before = exec::shfl(inclusive, lane >= d ? lane - d : lane);
    if (lane >= d) inclusive += before;
  }
  if (lane == exec::kWarpSize - 1) storage.warp_totals[warp] = inclusive;
  exec::sync_block();
  int warp_offset = 0;
  total = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) warp_offset += storage.warp_totals[w];
    total += storage.warp_totals[w];
  }
  offset = warp_offset + inclusive - value;
}

}  // namespace cuda
}  // namespace kvpack
