/// \file backend/cuda/cache_transfer.cuh
/// \brief Out-of-line members of KVCache<Policy, backend::Cuda>: the per-call device workspace,
/// the host staging area uploaded in one copy, and downloads (each call enqueues on the cache's
/// stream and waits for the device only where the host needs a result).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
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
