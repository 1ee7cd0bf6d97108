/// \file backend/cuda/cache_materialize.cuh
/// \brief Out-of-line member of KVCache<Policy, backend::Cuda>: materialize(), the held K/V of a
/// layer as dense fp32 on the host.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cache.cuh"
#include "kernels/low_rank_rows.cuh"

namespace kvpack {

template <class Policy>
DenseLayer KVCache<Policy, backend::Cuda>::materialize(int layer) const {
  constexpr const char* where = "KVCache::materialize";
  detail::check_layer(where, shape_, layer);
  cuda::DeviceGuard guard(context_->device());
  std::lock_guard<std::mutex> lock(scratch_->mutex);
  const int d = shape_.head_dim;
  if constexpr (kLowRank) return materialize_low_rank(layer);
  struct Download {
    std::vector<storage_type> k, v;
    std::vector<uint8_t> k_blocks, v_blocks;
    std::vector<int32_t> positions;
  };
  std::vector<Download> got(shape_.kv_heads);
  for (int h = 0; h < shape_.kv_heads; ++h) {
    const DeviceHead& head = store(layer, h);
    Download& g = got[h];
    download(head.k.data(), head.rows() * d, g.k, where);
    download(head.v.data(), head.rows() * d, g.v, where);
    download(head.positions.data(), head.size, g.positions, where);
    download(head.k_blocks.data(), kivi_key_block_bytes(head.quantized), g.k_blocks, where);
    download(head.v_blocks.data(), kivi_value_block_bytes(head.quantized), g.v_blocks, where);
  }
  context_->synchronize(where);
  DenseLayer result;
  result.heads.resize(shape_.kv_heads);
  for (int h = 0; h < shape_.kv_heads; ++h) {
    const Download& g = got[h];
    const int64_t quantized = store(layer, h).quantized;
    DenseHead& dst = result.heads[h];
    dst.positions.assign(g.positions.begin(), g.positions.end());
    dst.k.resize(g.positions.size() * d);
    dst.v.resize(g.positions.size() * d);
    if (quantized > 0) {
      const cuda::KiviFormat f = kivi_format();
      for (int64_t t = 0; t < quantized; ++t) {
        for (int c = 0; c < d; ++c) {
          dst.k[t * d + c] =
              dequantize_packed(g.k_blocks.data() + ((t / f.group) * d + c) * f.block_bytes, f.bits,
                                static_cast<int>(t % f.group));
          dst.v[t * d + c] = dequantize_packed(
              g.v_blocks.data() + (t * (d / f.group) + c / f.group) * f.block_bytes, f.bits,
              c % f.group);
        }
      }
    }
    const int64_t rows = static_cast<int64_t>(g.k.size()) / d;
    detail::load_row(g.k.data(), dst.k.data() + quantized * d, rows * d);
    detail::load_row(g.v.data(), dst.v.data() + quantized * d, rows * d);
  }
  return result;
}

template <class Policy>
DenseLayer KVCache<Policy, backend::Cuda>::materialize_low_rank(int layer) const {
  // Keys rebuilt and rotated (the tail as held), values rebuilt: attention's tile loader, run
  // by low_rank_rows_kernel into fp32 rows on the device.
  constexpr const char* where = "KVCache::materialize";
  const int d = shape_.head_dim;
  struct Download {
    cuda::DeviceBuffer<float> k, v;
    std::vector<float> host_k, host_v;
    std::vector<int32_t> positions;
  };
  std::vector<Download> got(shape_.kv_heads);
  for (int h = 0; h < shape_.kv_heads; ++h) {
    const DeviceHead& head = store(layer, h);
    Download& g = got[h];
    const std::size_t n = static_cast<std::size_t>(head.size) * d;
    g.k = cuda::DeviceBuffer<float>(n, context_->device());
    g.v = cuda::DeviceBuffer<float>(n, context_->device());
    cuda::launch_low_rank_rows(d, low_rank_head(layer, h, rope_), head.size, cuda::RopeParams{},
                               g.k.data(), g.v.data(), d, context_->stream());
    download(g.k.data(), head.size * d, g.host_k, where);
    download(g.v.data(), head.size * d, g.host_v, where);
    download(head.positions.data(), head.size, g.positions, where);
  }
  context_->synchronize(where);
  DenseLayer result;
  result.heads.resize(shape_.kv_heads);
  for (int h = 0; h < shape_.kv_heads; ++h) {
    DenseHead& dst = result.heads[h];
    dst.k = std::move(got[h].host_k);
    dst.v = std::move(got[h].host_v);
    dst.positions.assign(got[h].positions.begin(), got[h].positions.end());
  }
  return result;
}

}  // namespace kvpack
