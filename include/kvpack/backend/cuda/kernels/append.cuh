/// \file backend/cuda/kernels/append.cuh
/// \brief Append-side kernels: strided fp32/fp16/bf16 rows -> per-head storage rows, positions,
/// and the finite/range check of device-resident inputs.
#pragma once

#include <climits>

#include "../../../span.hpp"
#include "../../../view.hpp"
#include "common.cuh"

namespace kvpack {
namespace cuda {

/// Converts a strided block [tokens x heads x head_dim] of Tin into rows of Tout: row (t, h)
/// goes to dst[h] + t * dst_row_stride. Grid: x strides over tokens * head_dim, y over heads.
template <class Tin, class Tout>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    convert_rows_kernel(const Tin* __restrict__ src, int64_t tokens, int heads, int head_dim,
                        int64_t token_stride, int64_t head_stride, Tout* const* __restrict__ dst,
                        int64_t dst_row_stride) {
  const int64_t count = tokens * head_dim;
  for (int h = exec::block_y(); h < heads; h += exec::grid_y()) {
    Tout* const out = dst[h];
    for (int64_t e =
             static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
         e < count; e += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
      const int64_t t = e / head_dim;
      const int64_t i = e % head_dim;
      store_element(to_float(src[strided_offset(t, h, i, token_stride, head_stride)]),
                    out + t * dst_row_stride + i);
    }
  }
}

/// Copies the block's positions to every head: dst[h][t] = positions[t].
template <class Position>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    scatter_positions_kernel(const Position* __restrict__ positions, int64_t tokens, int heads,
                             Position* const* __restrict__ dst) {
  for (int h = exec::block_y(); h < heads; h += exec::grid_y()) {
    for (int64_t t =
             static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
         t < tokens; t += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
      dst[h][t] = positions[t];
    }
  }
}

/// dst[t] = positions[t] as int32: an engine's device positions (int32 or int64) for attend() and
/// observe(), checked on the host first unless the context's device value checks are off.
template <class Position>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    narrow_positions_kernel(const Position* __restrict__ positions, int64_t tokens,
                            int32_t* __restrict__ dst) {
  for (int64_t t = static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
       t < tokens; t += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
    dst[t] = static_cast<int32_t>(positions[t]);
  }
}

/// Lowest linear index (t * heads + h) * head_dim + i of an element that fails
/// value_in_range(x, limit) — the element detail::check_values reports first. `first` must hold
/// ULLONG_MAX before the launch.
template <class Tin>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    find_first_invalid_kernel(const Tin* __restrict__ src, int64_t tokens, int heads, int head_dim,
                              int64_t token_stride, int64_t head_stride, float limit,
                              unsigned long long* first) {
  const int64_t count = tokens * heads * head_dim;
  unsigned long long found = ULLONG_MAX;
  for (int64_t e = static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
       e < count; e += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
    const int64_t i = e % head_dim;
    const int64_t h = (e / head_dim) % heads;
    const int64_t t = e / (static_cast<int64_t>(head_dim) * heads);
    if (!value_in_range(to_float(src[strided_offset(t, h, i, token_stride, head_stride)]), limit)) {
      found = static_cast<unsigned long long>(e);
      break;  // later elements of this thread have larger indices
    }
  }
  if (found != ULLONG_MAX) exec::atomic_min(first, found);
}

/// Enqueues convert_rows_kernel for the dtype of `src` (a view of device memory).
template <class Tout>
void launch_convert_rows(const ActivationView& src, Tout* const* dst, int64_t dst_row_stride,
                         cudaStream_t stream) {
  const dim3 grid(grid_blocks(src.tokens() * src.head_dim(), kElementwiseThreads),
                  grid_extent(src.heads()));
  const int heads = static_cast<int>(src.heads());
  const int head_dim = static_cast<int>(src.head_dim());
  switch (src.dtype()) {
    case DType::kF32:
      exec::launch<kElementwiseThreads>(
          convert_rows_kernel<float, Tout>, grid, kElementwiseThreads, stream,
          "convert_rows_kernel", static_cast<const float*>(src.data()), src.tokens(), heads,
          head_dim, src.token_stride(), src.head_stride(), dst, dst_row_stride);
      break;
    case DType::kF16:
      exec::launch<kElementwiseThreads>(
          convert_rows_kernel<Half, Tout>, grid, kElementwiseThreads, stream, "convert_rows_kernel",
          static_cast<const Half*>(src.data()), src.tokens(), heads, head_dim, src.token_stride(),
          src.head_stride(), dst, dst_row_stride);
      break;
    case DType::kBF16:
      exec::launch<kElementwiseThreads>(
          convert_rows_kernel<BFloat16, Tout>, grid, kElementwiseThreads, stream,
          "convert_rows_kernel", static_cast<const BFloat16*>(src.data()), src.tokens(), heads,
          head_dim, src.token_stride(), src.head_stride(), dst, dst_row_stride);
      break;
  }
  check_launch("convert_rows_kernel");
}

/// Enqueues scatter_positions_kernel.
inline void launch_scatter_positions(const int32_t* positions, int64_t tokens, int heads,
                                     int32_t* const* dst, cudaStream_t stream) {
  const dim3 grid(grid_blocks(tokens, kElementwiseThreads), grid_extent(heads));
  exec::launch<kElementwiseThreads>(scatter_positions_kernel<int32_t>, grid, kElementwiseThreads,
                                    stream, "scatter_positions_kernel", positions, tokens, heads,
                                    dst);
  check_launch("scatter_positions_kernel");
}

/// Enqueues narrow_positions_kernel for the element type of `positions` (device memory).
inline void launch_narrow_positions(const Positions& positions, int32_t* dst, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(positions.size());
  if (n == 0) return;
  const unsigned grid = grid_blocks(n, kElementwiseThreads);
  if (positions.is_int64()) {
    exec::launch<kElementwiseThreads>(narrow_positions_kernel<int64_t>, grid, kElementwiseThreads,
                                      stream, "narrow_positions_kernel",
                                      static_cast<const int64_t*>(positions.data()), n, dst);
  } else {
    exec::launch<kElementwiseThreads>(narrow_positions_kernel<int32_t>, grid, kElementwiseThreads,
                                      stream, "narrow_positions_kernel",
                                      static_cast<const int32_t*>(positions.data()), n, dst);
  }
  check_launch("narrow_positions_kernel");
}

/// Enqueues find_first_invalid_kernel for the dtype of `src` (a view of device memory).
inline void launch_find_first_invalid(const ActivationView& src, float limit,
                                      unsigned long long* first, cudaStream_t stream) {
  const unsigned grid =
      grid_blocks(src.tokens() * src.heads() * src.head_dim(), kElementwiseThreads, 4096);
  const int heads = static_cast<int>(src.heads());
  const int head_dim = static_cast<int>(src.head_dim());
  switch (src.dtype()) {
    case DType::kF32:
      exec::launch<kElementwiseThreads>(
          find_first_invalid_kernel<float>, grid, kElementwiseThreads, stream,
          "find_first_invalid_kernel", static_cast<const float*>(src.data()), src.tokens(), heads,
          head_dim, src.token_stride(), src.head_stride(), limit, first);
      break;
    case DType::kF16:
      exec::launch<kElementwiseThreads>(
          find_first_invalid_kernel<Half>, grid, kElementwiseThreads, stream,
          "find_first_invalid_kernel", static_cast<const Half*>(src.data()), src.tokens(), heads,
          head_dim, src.token_stride(), src.head_stride(), limit, first);
      break;
    case DType::kBF16:
      exec::launch<kElementwiseThreads>(
          find_first_invalid_kernel<BFloat16>, grid, kElementwiseThreads, stream,
          "find_first_invalid_kernel", static_cast<const BFloat16*>(src.data()), src.tokens(),
          heads, head_dim, src.token_stride(), src.head_stride(), limit, first);
      break;
  }
  check_launch("find_first_invalid_kernel");
}

}  // namespace cuda
}  // namespace kvpack
