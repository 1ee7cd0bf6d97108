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

/// Enqueues quantize_keys_kernel over `groups` · G rows of `k_rows` and quantize_values_kernel
/// over as many rows of `v_rows` (both [groups · G][head_dim]). Throws kvpack::error when head_dim
/// is not a multiple of G or a launch fails.
template <int Bits, int G, class T>
void launch_quantize_rows(const T* k_rows, const T* v_rows, int64_t groups, int head_dim,
                          QuantBlock<Bits, G>* keys, QuantBlock<Bits, G>* values,
                          cudaStream_t stream) {
  if (head_dim % G != 0) {
    throw error(
        detail::concat("kvpack: head_dim ", head_dim, " is not a multiple of the KIVI group ", G));
  }
  if (groups <= 0) return;
  exec::launch<kElementwiseThreads>(
      quantize_keys_kernel<Bits, G, T>, grid_blocks(groups * head_dim, kElementwiseThreads),
      kElementwiseThreads, stream, "quantize_keys_kernel", k_rows, groups, head_dim, keys);
  check_launch("quantize_keys_kernel");
  exec::launch<kElementwiseThreads>(quantize_values_kernel<Bits, G, T>,
                                    grid_blocks(groups * G * (head_dim / G), kElementwiseThreads),
                                    kElementwiseThreads, stream, "quantize_values_kernel", v_rows,
                                    groups * G, head_dim, values);
  check_launch("quantize_values_kernel");
}

/// A KIVI block format chosen at run time (Quantize's bits and group): kernels that only read
/// blocks (attention) take it as a parameter, so one instantiation serves every format.
struct KiviFormat {
  int bits = 4;
  int group = 32;
  int block_bytes = 20;  ///< sizeof(QuantBlock<bits, group>)

  /// Throws kvpack::error for a pair QuantBlock does not implement (see dispatch_quant).
  static KiviFormat of(int bits, int group) {
    KiviFormat f{bits, group, 0};
    if (!dispatch_quant(bits, group, [&](auto b, auto g) {
          f.block_bytes =
              static_cast<int>(sizeof(QuantBlock<decltype(b)::value, decltype(g)::value>));
        })) {
      throw error(detail::concat("kvpack: no KIVI block format for bits ", bits, " and group ",
                                 group, " (bits 2, 4 or 8; group 16, 32, 64 or 128)"));
    }
    return f;
  }
};

/// launch_quantize_rows for a runtime format; the blocks are `format`'s QuantBlock, addressed as
/// bytes ([groups][head_dim] key blocks, [groups · G][head_dim / G] value blocks).
template <class T>
void launch_quantize_rows(const KiviFormat& format, const T* k_rows, const T* v_rows,
                          int64_t groups, int head_dim, uint8_t* keys, uint8_t* values,
                          cudaStream_t stream) {
  dispatch_quant(format.bits, format.group, [&](auto b, auto g) {
    using Block = QuantBlock<decltype(b)::value, decltype(g)::value>;
    launch_quantize_rows(k_rows, v_rows, groups, head_dim, reinterpret_cast<Block*>(keys),
                         reinterpret_cast<Block*>(values), stream);
  });
}

/// quantize_keys_kernel alone for a runtime format: blocks per column of `groups` · G rows of
/// `rows` [groups · G][width] (any width: a token basis's rank), as bytes [groups][width].
template <class T>
void launch_quantize_keys(const KiviFormat& format, const T* rows, int64_t groups, int width,
                          uint8_t* keys, cudaStream_t stream) {
  if (groups <= 0) return;
  dispatch_quant(format.bits, format.group, [&](auto b, auto g) {
    constexpr int B = decltype(b)::value, G = decltype(g)::value;
    exec::launch<kElementwiseThreads>(quantize_keys_kernel<B, G, T>,
                                      grid_blocks(groups * width, kElementwiseThreads),
                                      kElementwiseThreads, stream, "quantize_keys_kernel", rows,
                                      groups, width, reinterpret_cast<QuantBlock<B, G>*>(keys));
  });
  check_launch("quantize_keys_kernel");
}

/// The KIVI blocks of one head: its first `quantized` held tokens (none for row storage). The
/// one addressing of the blocks that scoring, compaction and attention read.
struct KiviBlocks {
  const uint8_t* keys = nullptr;    ///< [quantized / G][head_dim] blocks of format.block_bytes
  const uint8_t* values = nullptr;  ///< [quantized][head_dim / G] blocks
  int64_t quantized = 0;            ///< tokens in blocks (a multiple of G)
  KiviFormat format{};

  /// Channel c of the key of held token t < quantized: dequantize_ref's value.
  KVPACK_DEVICE float key(int64_t t, int c, int head_dim) const {
    return dequantize_packed(keys + ((t / format.group) * head_dim + c) * format.block_bytes,
                             format.bits, static_cast<int>(t % format.group));
  }
  /// Channel c of the value of held token t < quantized.
  KVPACK_DEVICE float value(int64_t t, int c, int head_dim) const {
    return dequantize_packed(
        values + (t * (head_dim / format.group) + c / format.group) * format.block_bytes,
        format.bits, c % format.group);
  }
};

/// One kv head in the KIVI layout above, as attention_kernel reads it (device pointers). The
/// block format is a runtime value: one attention instantiation per head_dim serves every
/// (bits, group), at the cost of a shift and a mask per code.
struct KiviAttentionHead {
  const uint8_t* k_blocks;   ///< [quantized / G][head_dim] blocks of format.block_bytes
  const uint8_t* v_blocks;   ///< [quantized][head_dim / G] blocks
  const Half* k_residual;    ///< [size - quantized][head_dim]
  const Half* v_residual;    ///< [size - quantized][head_dim]
  const int32_t* positions;  ///< [size], ascending
  int64_t size;              ///< tokens held
  int64_t quantized;         ///< tokens in blocks (a multiple of G)
  KiviFormat format;

  /// Rows [t0, t0 + n) as fp32 into the tiles (row stride `stride`), threads of the block
  /// striding over (row, channel): equal to dequantize_ref of each value.
  template <int D>
  KVPACK_DEVICE void load_tile(int64_t t0, int n, float* k_tile, float* v_tile, int stride, int tid,
                               int threads) const {
    const KiviBlocks blocks{k_blocks, v_blocks, quantized, format};
    fill_tile<D>(t0, n, k_tile, v_tile, stride, tid, threads,
                 [&](int64_t t, int c, float& k, float& v) {
                   if (t < quantized) {
                     k = blocks.key(t, c, D);
                     v = blocks.value(t, c, D);
                   } else {
                     k = to_float(k_residual[(t - quantized) * D + c]);
                     v = to_float(v_residual[(t - quantized) * D + c]);
                   }
                 });
  }
};

}  // namespace cuda
}  // namespace kvpack
