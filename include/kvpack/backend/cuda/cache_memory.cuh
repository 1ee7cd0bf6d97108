/// \file backend/cuda/cache_memory.cuh
/// \brief Out-of-line members of KVCache<Policy, backend::Cuda>: its bookkeeping's allocation,
/// what it holds (bytes(), reserved_bytes(), workspace_bytes()) and clear().
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <mutex>
#include <vector>

#include "cache.cuh"

namespace kvpack {

template <class Policy>
void KVCache<Policy, backend::Cuda>::validate_construction() const {
  detail::require(cuda::supported_head_dim(shape_.head_dim), "KVCache (CUDA)", "head_dim",
                  shape_.head_dim, "64 or 128 (the head dims the CUDA kernels are compiled for)");
  detail::require(shape_.kv_heads <= 65535, "KVCache (CUDA)", "kv_heads", shape_.kv_heads,
                  "<= 65535 (one grid row per kv head)");
}

template <class Policy>
void KVCache<Policy, backend::Cuda>::allocate_bookkeeping() {
  heads_.resize(static_cast<std::size_t>(shape_.layers) * shape_.kv_heads);
  if constexpr (kLazyLayers) observations_.resize(shape_.layers);
  scratch_ = std::make_unique<Scratch>();
  if constexpr (kLowRank) {
    const Rope rope(shape_.rope, shape_.head_dim);
    rope_inv_freq_ = cuda::DeviceBuffer<double>(rope.inv_freq().size(), context_->device());
    cuda::check_cuda(cudaMemcpy(rope_inv_freq_.data(), rope.inv_freq().data(),
                                rope_inv_freq_.bytes(), cudaMemcpyHostToDevice),
                     "KVCache (CUDA): upload of the RoPE frequencies");
    rope_ = {rope_inv_freq_.data(), rope.rotary_dim(), shape_.rope.style, rope.attention_factor()};
  }
}

template <class Policy>
std::size_t KVCache<Policy, backend::Cuda>::bytes() const {
  std::size_t total = heads_.size() * sizeof(HostStore) +
                      layers_.size() * sizeof(detail::LayerState) +
                      observations_.size() * sizeof(detail::LayerObservation);
  const std::size_t row = 2 * static_cast<std::size_t>(shape_.head_dim) * sizeof(storage_type);
  for (const auto& head : heads_) {
    total += static_cast<std::size_t>(head.rows()) * row +
             static_cast<std::size_t>(head.size) * (sizeof(int32_t) + score_bytes()) +
             kivi_key_block_bytes(head.quantized) + kivi_value_block_bytes(head.quantized) +
             head.key_factor.bytes() + head.value_factor.bytes();
  }
  for (const cuda::DeviceLowRankBasis* basis : distinct_bases()) {
    total += basis->blocks.bytes() + basis->rows.bytes() + sizeof(cuda::DeviceLowRankBasis);
  }
  return total;
}

template <class Policy>
std::size_t KVCache<Policy, backend::Cuda>::reserved_bytes() const {
  std::size_t total = 0;
  for (const auto& head : heads_) {
    total += head.k.bytes() + head.v.bytes() + head.positions.bytes() + head.k_blocks.bytes() +
             head.v_blocks.bytes() + head.scores.bytes() + head.key_factor.bytes() +
             head.value_factor.bytes();
  }
  for (const cuda::DeviceLowRankBasis* basis : distinct_bases()) {
    total += basis->blocks.bytes() + basis->rows.bytes();
  }
  return total;
}

template <class Policy>
std::vector<const cuda::DeviceLowRankBasis*> KVCache<Policy, backend::Cuda>::distinct_bases()
    const {
  std::vector<const cuda::DeviceLowRankBasis*> bases;
  for (const auto& head : heads_) {
    for (const cuda::DeviceLowRankBasis* basis : {head.key_basis.get(), head.value_basis.get()}) {
      if (basis != nullptr && std::find(bases.begin(), bases.end(), basis) == bases.end()) {
        bases.push_back(basis);
      }
    }
  }
  return bases;
}

template <class Policy>
std::size_t KVCache<Policy, backend::Cuda>::workspace_bytes() const {
  return scratch_->device.bytes() + scratch_->invalid_index.bytes() + scratch_->host.bytes() +
         scratch_->scorer_weight.bytes() + scratch_->scorer_bias.bytes() + rope_inv_freq_.bytes();
}

template <class Policy>
void KVCache<Policy, backend::Cuda>::clear() {
  cuda::DeviceGuard guard(context_->device());
  std::lock_guard<std::mutex> lock(scratch_->mutex);
  context_->synchronize("KVCache::clear");
  for (auto& head : heads_) head = cuda::DeviceHead<storage_type>{};
  for (auto& o : observations_) o = detail::LayerObservation{};
  scratch_->device.release();
  scratch_->invalid_index.release();
  scratch_->scorer_weight.release();
  scratch_->scorer_bias.release();
  scratch_->scorer.reset();
  scratch_->host.release();
  this->clear_front();
}

}  // namespace kvpack
