/// \file backend/cuda/cache_quantize.cuh
/// \brief Out-of-line members of KVCache<Policy, backend::Cuda> for KIVI (Quantize and
/// Compose<A, Quantize>): the block format and addressing, and the quantization of the whole
/// groups that aged out of the fp16 residual window (compress()).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "cache.cuh"

namespace kvpack {

template <class Policy>
cuda::KiviFormat KVCache<Policy, backend::Cuda>::kivi_format() const {
  if constexpr (kQuantized) {
    return cuda::KiviFormat::of(quant_knobs().bits, quant_knobs().group);
  } else {
    return cuda::KiviFormat{};
  }
}

template <class Policy>
cuda::KiviBlocks KVCache<Policy, backend::Cuda>::blocks_of(const DeviceHead& head) const {
  if constexpr (kQuantized) {
    return {head.k_blocks.data(), head.v_blocks.data(), head.quantized, kivi_format()};
  } else {
    return {};
  }
}

template <class Policy>
std::size_t KVCache<Policy, backend::Cuda>::kivi_key_block_bytes(int64_t quantized) const {
  if (quantized == 0) return 0;
  const cuda::KiviFormat f = kivi_format();
  return static_cast<std::size_t>(quantized / f.group) * shape_.head_dim * f.block_bytes;
}

template <class Policy>
std::size_t KVCache<Policy, backend::Cuda>::kivi_value_block_bytes(int64_t quantized) const {
  if (quantized == 0) return 0;
  const cuda::KiviFormat f = kivi_format();
  return static_cast<std::size_t>(quantized) * (shape_.head_dim / f.group) * f.block_bytes;
}

template <class Policy>
template <class P>
void KVCache<Policy, backend::Cuda>::quantize() {
  constexpr const char* where = "KVCache::compress";
  using T = storage_type;
  const int d = shape_.head_dim;
  const int device = context_->device();
  const cudaStream_t stream = context_->stream();
  const cuda::KiviFormat format = kivi_format();
  const int64_t group = format.group;
  const int64_t residual = quant_knobs().residual;

  // Per head that has whole groups beyond the residual: block buffers with room for them (the
  // old blocks copied over when they grow, geometrically as rows do) and an exact-size buffer
  // for the rows that stay fp16. Every allocation comes first, so a failure changes nothing.
  struct Quantized {
    std::size_t head;
    int64_t count;  // tokens that become blocks
    cuda::DeviceBuffer<uint8_t> k_blocks, v_blocks;
    cuda::DeviceBuffer<T> k, v;
  };
  std::vector<Quantized> work;
  for (std::size_t i = 0; i < heads_.size(); ++i) {
    const DeviceHead& head = heads_[i];
    const int64_t rows = head.rows();
    const int64_t count = rows > residual ? (rows - residual) / group * group : 0;
    if (count == 0) continue;
    Quantized q{i, count, {}, {}, {}, {}};
    const int64_t tokens = head.quantized + count;
    const std::size_t key_bytes = kivi_key_block_bytes(tokens);
    if (key_bytes > head.k_blocks.size()) {
      const int64_t held = head.k_blocks.size() / kivi_key_block_bytes(group) * group;
      const int64_t room = (cuda::grown_capacity(tokens, held) + group - 1) / group * group;
      q.k_blocks = cuda::DeviceBuffer<uint8_t>(kivi_key_block_bytes(room), device);
      q.v_blocks = cuda::DeviceBuffer<uint8_t>(kivi_value_block_bytes(room), device);
    }
    const std::size_t stay = static_cast<std::size_t>(rows - count) * d;
    q.k = cuda::DeviceBuffer<T>(stay, device);
    q.v = cuda::DeviceBuffer<T>(stay, device);
    work.push_back(std::move(q));
  }
  if (work.empty()) return;

  for (Quantized& q : work) {
    DeviceHead& head = heads_[q.head];
    uint8_t* k_blocks = q.k_blocks.empty() ? head.k_blocks.data() : q.k_blocks.data();
    uint8_t* v_blocks = q.v_blocks.empty() ? head.v_blocks.data() : q.v_blocks.data();
    if (!q.k_blocks.empty() && head.quantized > 0) {
      cuda::check_cuda(
          cudaMemcpyAsync(k_blocks, head.k_blocks.data(), kivi_key_block_bytes(head.quantized),
                          cudaMemcpyDeviceToDevice, stream),
          "KVCache::compress: copy of the key blocks on growth");
      cuda::check_cuda(
          cudaMemcpyAsync(v_blocks, head.v_blocks.data(), kivi_value_block_bytes(head.quantized),
                          cudaMemcpyDeviceToDevice, stream),
          "KVCache::compress: copy of the value blocks on growth");
    }
    // Blocks past `quantized` are not held yet: writing them in place changes nothing visible
    // until the commit below.
    cuda::launch_quantize_rows(format, head.k.data(), head.v.data(), q.count / group, d,
                               k_blocks + kivi_key_block_bytes(head.quantized),
                               v_blocks + kivi_value_block_bytes(head.quantized), stream);
    if (!q.k.empty()) {
      const std::size_t offset = static_cast<std::size_t>(q.count) * d;
      cuda::check_cuda(cudaMemcpyAsync(q.k.data(), head.k.data() + offset, q.k.bytes(),
                                       cudaMemcpyDeviceToDevice, stream),
                       "KVCache::compress: copy of the K residual");
      cuda::check_cuda(cudaMemcpyAsync(q.v.data(), head.v.data() + offset, q.v.bytes(),
                                       cudaMemcpyDeviceToDevice, stream),
                       "KVCache::compress: copy of the V residual");
    }
  }
  context_->synchronize(where);

  // Commit: nothing below can fail. The fp16 rows that became blocks are freed here.
  for (Quantized& q : work) {
    DeviceHead& head = heads_[q.head];
    if (!q.k_blocks.empty()) {
      head.k_blocks.swap(q.k_blocks);
      head.v_blocks.swap(q.v_blocks);
    }
    head.k.swap(q.k);
    head.v.swap(q.v);
    head.quantized += q.count;
  }
}

}  // namespace kvpack
