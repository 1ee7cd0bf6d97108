/// \file backend/cuda/kernels/kivi.cuh
/// \brief KIVI on the device: block quantization of keys (per channel over G tokens) and values
/// (per token over G channels) bit for bit equal to quantize_block_ref, and the tile loader that
/// lets attention_kernel read KIVI blocks plus an fp16 residual directly (dequantized in shared
/// memory: global memory traffic is the compressed bytes).
///
/// Layout (one kv head; the CPU's QuantizedHeadStore without its pages):
///   key blocks   [quantized / G][head_dim]        block (t / G, c) = channel c of token group
///   value blocks [quantized][head_dim / G]        block (t, j) = channels [j G, (j + 1) G) of t
///   residual     [size - quantized][head_dim]     fp16 rows of the newest tokens
/// Source: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (2024).
#pragma once

#include "../../../quant/quant_block.hpp"
#include "attention.cuh"

namespace kvpack {
namespace cuda {

/// keys[g][c] = quantize_block_ref of channel c over tokens [g G, (g + 1) G) of `rows`.
/// rows: [groups * G][head_dim] of T (fp32 / fp16 / bf16), finite and within the fp16 range
/// (the cache checks this on append). Grid-stride over groups * head_dim blocks.
template <int Bits, int G, class T>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    quantize_keys_kernel(const T* __restrict__ rows, int64_t groups, int head_dim,
                         QuantBlock<Bits, G>* __restrict__ keys) {
  const int64_t blocks = groups * head_dim;
  for (int64_t b = static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
       b < blocks; b += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
    const int64_t g = b / head_dim;
    const int c = static_cast<int>(b % head_dim);
    float x[G];  // adjacent threads read adjacent channels of one row: coalesced
#pragma unroll
    for (int i = 0; i < G; ++i) x[i] = to_float(rows[(g * G + i) * head_dim + c]);
    quantize_block_ref<Bits, G>(x, 1, keys[b]);
  }
}

/// values[t][j] = quantize_block_ref of channels [j G, (j + 1) G) of row t.
/// rows: [tokens][head_dim]; head_dim a multiple of G. Grid-stride over tokens * head_dim / G.
template <int Bits, int G, class T>
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kElementwiseThreads)
    quantize_values_kernel(const T* __restrict__ rows, int64_t tokens, int head_dim,
                           QuantBlock<Bits, G>* __restrict__ values) {
  const int per_token = head_dim / G;
  const int64_t blocks = tokens * per_token;
  for (int64_t b = static_cast<int64_t>(exec::block_x()) * exec::block_threads() + exec::thread_x();
       b < blocks; b += static_cast<int64_t>(exec::grid_x()) * exec::block_threads()) {
    const T* src = rows + (b / per_token) * head_dim + (b % per_token) * G;
    float x[G];
#pragma unroll
    for (int i = 0; i < G; ++i) x[i] = to_float(src[i]);
    quantize_block_ref<Bits, G>(x, 1, values[b]);
  }
}

/// Enqueues quantize_keys_kernel (groups · G rows) and quantize_values_kernel (the same rows).
/// Throws kvpack::error when head_dim is not a multiple of G or a launch fails.
template <int Bits, int G, class T>
void launch_quantize_rows(const T* rows, int64_t groups, int head_dim, QuantBlock<Bits, G>* keys,
                          QuantBlock<Bits, G>* values, cudaStream_t stream) {
  if (head_dim % G != 0) {
    throw error(
        detail::concat("kvpack: head_dim ", head_dim, " is not a multiple of the KIVI group ", G));
  }
  if (groups <= 0) return;
  exec::launch<kElementwiseThreads>(
      quantize_keys_kernel<Bits, G, T>, grid_blocks(groups * head_dim, kElementwiseThreads),
      kElementwiseThreads, stream, "quantize_keys_kernel", rows, groups, head_dim, keys);
  check_launch("quantize_keys_kernel");
  exec::launch<kElementwiseThreads>(quantize_values_kernel<Bits, G, T>,
                                    grid_blocks(groups * G * (head_dim / G), kElementwiseThreads),
                                    kElementwiseThreads, stream, "quantize_values_kernel", rows,
                                    groups * G, head_dim, values);
  check_launch("quantize_values_kernel");
}

/// One kv head in the KIVI layout above, as attention_kernel reads it (device pointers).
template <int Bits, int G>
struct KiviAttentionHead {
  using Block = QuantBlock<Bits, G>;
  const Block* k_blocks;     ///< [quantized / G][head_dim]
  const Block* v_blocks;     ///< [quantized][head_dim / G]
  const Half* k_residual;    ///< [size - quantized][head_dim]
  const Half* v_residual;    ///< [size - quantized][head_dim]
  const int32_t* positions;  ///< [size], ascending
  int64_t size;              ///< tokens held
  int64_t quantized;         ///< tokens in blocks (a multiple of G)

  /// Rows [t0, t0 + n) as fp32 into the tiles (row stride `stride`), threads of the block
  /// striding over (row, channel): equal to dequantize_ref of each value.
  template <int D>
  KVPACK_DEVICE void load_tile(int64_t t0, int n, float* k_tile, float* v_tile, int stride, int tid,
                               int threads) const {
    for (int idx = tid; idx < n * D; idx += threads) {
      const int r = idx / D;
      const int c = idx % D;
      const int64_t t = t0 + r;
      float k = 0.0f, v = 0.0f;
      if (t < quantized) {
        k = dequantize_ref(k_blocks[(t / G) * D + c], static_cast<int>(t % G));
        v = dequantize_ref(v_blocks[t * (D / G) + c / G], c % G);
      } else {
        k = to_float(k_residual[(t - quantized) * D + c]);
        v = to_float(v_residual[(t - quantized) * D + c]);
      }
      k_tile[r * stride + c] = k;
      v_tile[r * stride + c] = v;
    }
  }
};

}  // namespace cuda
}  // namespace kvpack
