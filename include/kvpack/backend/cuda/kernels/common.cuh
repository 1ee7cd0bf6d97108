/// \file backend/cuda/kernels/common.cuh
/// \brief Launch-geometry helpers and warp primitives shared by the kvpack kernels (nvcc, or the
/// emulated grid of a host build with KVPACK_CUDA_EMULATION: see exec.cuh).
#pragma once

#include <cstdint>
#include <cstring>

#include "../../../config.hpp"
#include "../../../half.hpp"
#include "../context.hpp"
#include "../kernel_logic.hpp"
#include "exec.cuh"

namespace kvpack {
namespace cuda {

/// Threads per block of the elementwise kernels (append, score, gather).
constexpr int kElementwiseThreads = 256;

/// Blocks for `work` items at `threads` per block, capped: the kernels use grid-stride loops,
/// so the cap bounds the grid without losing items.
inline unsigned grid_blocks(int64_t work, int threads, int64_t cap = 65535) {
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

/// Grid y / z extent for `count` items (the kernels stride over y by gridDim.y).
inline unsigned grid_extent(int64_t count, int64_t cap = 65535) {
  if (count < 1) return 1;
  return static_cast<unsigned>(count < cap ? count : cap);
}

KVPACK_DEVICE float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = exec::shfl_xor(x, offset);
    x = other > x ? other : x;
  }
  return x;
}

KVPACK_DEVICE float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += exec::shfl_xor(x, offset);
  return x;
}

/// Loads 16 bytes (8 Half or 4 float) of a stored row and widens them to fp32. `src` must be
/// 16-byte aligned: rows of head_dim 64/128 elements starting at a cudaMalloc base are.
template <class T>
KVPACK_DEVICE void load_vector16(const T* src, float* dst) {
  constexpr int kCount = 16 / static_cast<int>(sizeof(T));
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  T values[kCount];
  memcpy(values, &raw, sizeof(raw));
#pragma unroll
  for (int u = 0; u < kCount; ++u) dst[u] = to_float(values[u]);
}

/// Fills rows [0, n) of an attention tile pair (row stride `stride` floats) with held tokens
/// t0 + r: element(t, c, k, v) sets channel c of token t's key and value. The block's `threads`
/// threads stride over (row, channel), for head types whose tokens are decoded per element.
template <int D, class Element>
KVPACK_DEVICE void fill_tile(int64_t t0, int n, float* k_tile, float* v_tile, int stride, int tid,
                             int threads, const Element& element) {
  for (int idx = tid; idx < n * D; idx += threads) {
    const int r = idx / D;
    const int c = idx % D;
    float k = 0.0f, v = 0.0f;
    element(t0 + r, c, k, v);
    k_tile[r * stride + c] = k;
    v_tile[r * stride + c] = v;
  }
}

}  // namespace cuda
}  // namespace kvpack
