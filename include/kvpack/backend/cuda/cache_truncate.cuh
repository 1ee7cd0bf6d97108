/// \file backend/cuda/cache_truncate.cuh
/// \brief Out-of-line member of KVCache<Policy, backend::Cuda>: truncate(), the rollback of the
/// newest tokens.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cache.cuh"

namespace kvpack {

template <class Policy>
void KVCache<Policy, backend::Cuda>::truncate(int64_t last_position) {
  constexpr const char* where = "KVCache::truncate";
  cuda::DeviceGuard guard(context_->device());
  std::lock_guard<std::mutex> lock(scratch_->mutex);
  // Rows after last_position, per head: counted on a download of the positions of the layers
  // concerned (a head may hold a subset of the layer's positions after eviction).
  std::vector<std::vector<int32_t>> held(heads_.size());
  const cudaStream_t stream = context_->stream();
  for (int l = 0; l < shape_.layers; ++l) {
    if (layers_[l].last_position <= last_position) continue;
    for (int h = 0; h < shape_.kv_heads; ++h) {
      const DeviceHead& head = store(l, h);
      auto& p = held[static_cast<std::size_t>(l) * shape_.kv_heads + h];
      p.resize(static_cast<std::size_t>(head.size));
      if (head.size == 0) continue;
      cuda::check_cuda(cudaMemcpyAsync(p.data(), head.positions.data(), p.size() * sizeof(int32_t),
                                       cudaMemcpyDeviceToHost, stream),
                       "KVCache::truncate: download of the positions");
    }
  }
  context_->synchronize(where);
  const std::vector<int64_t> drop = this->plan_truncate(where, last_position, [&](int l, int h) {
    const auto& p = held[static_cast<std::size_t>(l) * shape_.kv_heads + h];
    return static_cast<int64_t>(p.end() - std::upper_bound(p.begin(), p.end(), last_position));
  });
  for (int l = 0; l < shape_.layers; ++l) {
    for (int h = 0; h < shape_.kv_heads && drop[l] > 0; ++h) {
      const DeviceHead& head = store(l, h);
      const int64_t kept = head.size - drop[l];
      const int64_t split = kept < head.quantized ? kept % group_size() : 0;
      const auto& p = held[static_cast<std::size_t>(l) * shape_.kv_heads + h];
      this->refuse_group_split(where, last_position, l, h, split, p.data(), head.size, drop[l]);
    }
  }
  for (int l = 0; l < shape_.layers; ++l) {
    if (!this->truncates(l, last_position, drop)) continue;
    for (int h = 0; h < shape_.kv_heads; ++h) {
      DeviceHead& head = store(l, h);
      head.size -= drop[l];
      head.quantized = std::min(head.quantized, head.size);  // whole groups (checked above)
      // Into the factored part: the bases and factors stay as they are (shared, immutable;
      // counted until the next compress() refactors), as on the CPU.
      head.factored = std::min(head.factored, head.size);
      if (head.factored == 0) {
        head.key_basis.reset();
        head.value_basis.reset();
        head.key_factor = {};
        head.value_factor = {};
      }
      if (head.size == 0) head.first_position = -1;
    }
  }
  this->commit_truncate(last_position, drop);
}

}  // namespace kvpack
