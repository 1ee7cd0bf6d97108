/// \file backend/cuda/cache_transfer.cuh
/// \brief Out-of-line members of KVCache<Policy, backend::Cuda>: the per-call device workspace,
/// the host staging area uploaded in one copy, and downloads (each call enqueues on the cache's
/// stream and waits for the device only where the host needs a result).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "cache.cuh"

namespace kvpack {

template <class Policy>
template <class E>
void KVCache<Policy, backend::Cuda>::download(const E* src, int64_t count, std::vector<E>& dst,
                                              const char* where) const {
  dst.resize(static_cast<std::size_t>(count));
  if (count == 0) return;
  cuda::check_cuda(cudaMemcpyAsync(dst.data(), src, dst.size() * sizeof(E), cudaMemcpyDeviceToHost,
                                   context_->stream()),
                   detail::concat(where, ": download").c_str());
}

template <class Policy>
KVCache<Policy, backend::Cuda>::KVCache(const KVCache& other, cuda::CudaContext& context)
    : Front(other), context_(&context) {
  constexpr const char* where = "KVCacheBatch::fork";
  allocate_bookkeeping();
  observations_ = other.observations_;
  const int device = context_->device();
  const cudaStream_t stream = context_->stream();
  other.context_->synchronize(where);  // what other's stream still writes, then the copies
  auto copy = [&](const auto& buffer) { return cuda::copy_on_device(buffer, device, stream); };
  // Token bases shared by several heads stay shared (one copy each).
  std::map<const cuda::DeviceLowRankBasis*, std::shared_ptr<const cuda::DeviceLowRankBasis>> bases;
  auto copy_basis = [&](const std::shared_ptr<const cuda::DeviceLowRankBasis>& basis) {
    if (!basis) return basis;
    auto& slot = bases[basis.get()];
    if (!slot) {
      auto fresh = std::make_shared<cuda::DeviceLowRankBasis>();
      fresh->blocks = copy(basis->blocks);
      fresh->rows = copy(basis->rows);
      fresh->tokens = basis->tokens;
      fresh->quantized = basis->quantized;
      fresh->rank = basis->rank;
      fresh->format = basis->format;
      slot = std::move(fresh);
    }
    return slot;
  };
  for (std::size_t i = 0; i < heads_.size(); ++i) {
    const DeviceHead& from = other.heads_[i];
    DeviceHead& to = heads_[i];
    to.k = copy(from.k);
    to.v = copy(from.v);
    to.positions = copy(from.positions);
    to.k_blocks = copy(from.k_blocks);
    to.v_blocks = copy(from.v_blocks);
    to.scores = copy(from.scores);
    to.key_factor = copy(from.key_factor);
    to.value_factor = copy(from.value_factor);
    to.key_basis = copy_basis(from.key_basis);
    to.value_basis = copy_basis(from.value_basis);
    to.size = from.size;
    to.quantized = from.quantized;
    to.factored = from.factored;
    to.first_position = from.first_position;
  }
  context_->synchronize(where);  // a failed copy is reported here, not by a later call
}

template <class Policy>
unsigned char* KVCache<Policy, backend::Cuda>::workspace(std::size_t bytes) const {
  return cuda::grown_workspace(scratch_->device, bytes, *context_, "KVCache: workspace growth");
}

template <class Policy>
unsigned char* KVCache<Policy, backend::Cuda>::staging(std::size_t bytes) const {
  return scratch_->host.acquire(bytes);
}

template <class Policy>
void KVCache<Policy, backend::Cuda>::upload_staging(unsigned char* device_base, std::size_t bytes,
                                                    const char* where) const {
  scratch_->host.upload(device_base, bytes, context_->stream(),
                        detail::concat(where, ": upload").c_str());
}

}  // namespace kvpack
