/// \file backend/cuda/cache_checks.cuh
/// \brief Out-of-line members of KVCache<Policy, backend::Cuda>: the checks of queries and their
/// positions (host or device) and of device-resident views (memory space of a pointer, finite
/// values in range, found by a kernel).
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cache.cuh"

namespace kvpack {

template <class Policy>
Positions KVCache<Policy, backend::Cuda>::check_query(const char* where, int layer,
                                                      const ActivationView& q, Positions positions,
                                                      MemorySpace space,
                                                      std::vector<int64_t>& copy) const {
  Positions checked = positions;
  if (positions.on_device()) {
    detail::check_layer(where, shape_, layer);
    detail::check_view(where, "q", q, shape_.q_heads, shape_.head_dim);
    detail::require(static_cast<int64_t>(positions.size()) == q.tokens(), where, "positions.size()",
                    positions.size(),
                    [&] { return detail::concat(q.tokens(), " (one per query token)"); });
    detail::require(positions.data() != nullptr, where, "positions", "null", "a device array");
    check_space(where, "positions", positions.data(), MemorySpace::kDevice);
    checked = Positions();
    if (context_->device_value_checks()) {
      // The host checks read a copy (int32 positions widened).
      if (positions.is_int64()) {
        download(static_cast<const int64_t*>(positions.data()),
                 static_cast<int64_t>(positions.size()), copy, where);
        context_->synchronize(where);
      } else {
        std::vector<int32_t> narrow;
        download(static_cast<const int32_t*>(positions.data()),
                 static_cast<int64_t>(positions.size()), narrow, where);
        context_->synchronize(where);
        copy.assign(narrow.begin(), narrow.end());
      }
      checked = Positions(copy);
    }
  }
  if (!checked.empty() || !positions.on_device()) {
    this->check_query_shape(where, layer, q, checked);
  } else {
    detail::require(layers_[layer].appended > 0, where, "layer", "empty",
                    "a layer with appended tokens");
  }
  check_space(where, "q", q.data(), space);
  check_values(where, "q", q, std::numeric_limits<float>::max(), space);
  return checked;
}

template <class Policy>
void KVCache<Policy, backend::Cuda>::check_space(const char* where, const char* name,
                                                 const void* data, MemorySpace space) const {
  if (data == nullptr) return;
  cudaPointerAttributes attributes{};
  cudaMemoryType type = cudaMemoryTypeUnregistered;
  if (cudaPointerGetAttributes(&attributes, data) == cudaSuccess) {
    type = attributes.type;
  } else {
    cudaGetLastError();  // older drivers report plain host memory as an error: clear it
  }
  if (space == MemorySpace::kHost && type == cudaMemoryTypeDevice) {
    detail::throw_arg(where, name, "a device pointer",
                      "host memory (pass MemorySpace::kDevice for device views)");
  }
  if (space == MemorySpace::kDevice) {
    if (type != cudaMemoryTypeDevice && type != cudaMemoryTypeManaged) {
      detail::throw_arg(where, name, "a host pointer",
                        "device memory (pass MemorySpace::kHost for host views)");
    }
    if (type == cudaMemoryTypeDevice && attributes.device != context_->device()) {
      detail::throw_arg(where, name, detail::concat("memory of device ", attributes.device),
                        detail::concat("memory of the context's device ", context_->device()));
    }
  }
}

template <class Policy>
unsigned long long KVCache<Policy, backend::Cuda>::first_invalid(const char* where,
                                                                 const ActivationView& x,
                                                                 float limit) const {
  if (scratch_->invalid_index.empty()) {
    scratch_->invalid_index = cuda::DeviceBuffer<unsigned long long>(1, context_->device());
  }
  const cudaStream_t stream = context_->stream();
  unsigned long long* first = scratch_->invalid_index.data();
  cuda::check_cuda(cudaMemsetAsync(first, 0xFF, sizeof(unsigned long long), stream),
                   detail::concat(where, ": value check").c_str());
  cuda::launch_find_first_invalid(x, limit, first, stream);
  unsigned long long found = ULLONG_MAX;
  cuda::check_cuda(cudaMemcpyAsync(&found, first, sizeof(found), cudaMemcpyDeviceToHost, stream),
                   detail::concat(where, ": value check").c_str());
  context_->synchronize(detail::concat(where, ": value check").c_str());
  return found;
}

template <class Policy>
void KVCache<Policy, backend::Cuda>::check_values(const char* where, const char* name,
                                                  const ActivationView& x, float limit,
                                                  MemorySpace space) const {
  if (space == MemorySpace::kHost) {
    detail::check_values(where, name, x, limit);
    return;
  }
  if (!context_->device_value_checks()) return;  // the engine vouches for its device tensors
  const unsigned long long found = first_invalid(where, x, limit);
  if (found == ULLONG_MAX) return;
  const int64_t e = static_cast<int64_t>(found);
  const int64_t i = e % x.head_dim();
  const int64_t h = (e / x.head_dim()) % x.heads();
  const int64_t t = e / (x.head_dim() * x.heads());
  const int64_t offset = t * x.token_stride() + h * x.head_stride() + i;
  const std::size_t es = cuda::dtype_bytes(x.dtype());
  unsigned char raw[4] = {0, 0, 0, 0};
  cuda::check_cuda(cudaMemcpy(raw, static_cast<const unsigned char*>(x.data()) + offset * es, es,
                              cudaMemcpyDeviceToHost),
                   detail::concat(where, ": value check").c_str());
  float value = 0.0f;
  if (x.dtype() == DType::kF32) {
    std::memcpy(&value, raw, 4);
  } else if (x.dtype() == DType::kF16) {
    Half half;
    std::memcpy(&half, raw, 2);
    value = to_float(half);
  } else {
    BFloat16 bf;
    std::memcpy(&bf, raw, 2);
    value = to_float(bf);
  }
  throw error(detail::concat(where, ": ", name, "[token ", t, ", head ", h, ", channel ", i,
                             "] = ", value, ", expected a finite value with |x| <= ", limit));
}

}  // namespace kvpack
