/// \file backend/cuda/cache_append.cuh
/// \brief Out-of-line member of KVCache<Policy, backend::Cuda>: append (upload, range check,
/// growth, the append kernel).
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cache.cuh"

namespace kvpack {

template <class Policy>
void KVCache<Policy, backend::Cuda>::append_unchecked(int layer, const ActivationView& k,
                                                      const ActivationView& v, Positions positions,
                                                      MemorySpace space) {
  constexpr const char* where = "KVCache::append";
  using T = storage_type;
  const int d = shape_.head_dim;
  const int heads = shape_.kv_heads;
  const int64_t n = k.tokens();
  const int device = context_->device();
  const cudaStream_t stream = context_->stream();
  const bool host = space == MemorySpace::kHost;

  // Workspace: [positions | K targets | V targets | position targets | K rows | V rows]; the
  // rows only for host inputs. All of it is uploaded in one copy.
  cuda::WorkspaceLayout layout;
  const std::size_t at_positions = layout.add<int32_t>(n);
  const std::size_t at_k_targets = layout.add<T*>(heads);
  const std::size_t at_v_targets = layout.add<T*>(heads);
  const std::size_t at_p_targets = layout.add<int32_t*>(heads);
  const std::size_t k_bytes = host ? n * heads * d * cuda::dtype_bytes(k.dtype()) : 0;
  const std::size_t v_bytes = host ? n * heads * d * cuda::dtype_bytes(v.dtype()) : 0;
  const std::size_t at_k_rows = layout.add<unsigned char>(k_bytes);
  const std::size_t at_v_rows = layout.add<unsigned char>(v_bytes);
  unsigned char* ws = workspace(layout.bytes());
  unsigned char* stage = staging(layout.bytes());

  // Heads that must grow get new buffers now (nothing changes if an allocation fails). Rows and
  // positions grow apart: under KIVI the rows are only the fp16 residual.
  struct Grown {
    int head;
    DeviceHead buffers;
  };
  std::vector<Grown> grown;
  for (int h = 0; h < heads; ++h) {
    const DeviceHead& head = store(layer, h);
    const int64_t row_capacity = head.row_capacity(d);
    if (head.size + n <= head.capacity() && head.rows() + n <= row_capacity) continue;
    const int64_t rows = cuda::grown_capacity(head.rows() + n, row_capacity);
    const int64_t capacity = cuda::grown_capacity(head.size + n, head.capacity());
    Grown g{h, DeviceHead{}};
    g.buffers.k = cuda::DeviceBuffer<T>(static_cast<std::size_t>(rows) * d, device);
    g.buffers.v = cuda::DeviceBuffer<T>(static_cast<std::size_t>(rows) * d, device);
    g.buffers.positions = cuda::DeviceBuffer<int32_t>(static_cast<std::size_t>(capacity), device);
    if constexpr (kStoredScores) {
      g.buffers.scores = cuda::DeviceBuffer<float>(static_cast<std::size_t>(capacity), device);
    }
    grown.push_back(std::move(g));
  }
  auto destination = [&](int h) -> DeviceHead& {
    for (Grown& g : grown) {
      if (g.head == h) return g.buffers;
    }
    return store(layer, h);
  };

  auto* stage_positions = reinterpret_cast<int32_t*>(stage + at_positions);
  for (int64_t t = 0; t < n; ++t) stage_positions[t] = static_cast<int32_t>(positions[t]);
  auto* k_targets = reinterpret_cast<T**>(stage + at_k_targets);
  auto* v_targets = reinterpret_cast<T**>(stage + at_v_targets);
  auto* p_targets = reinterpret_cast<int32_t**>(stage + at_p_targets);
  for (int h = 0; h < heads; ++h) {
    DeviceHead& dst = destination(h);
    const DeviceHead& held = store(layer, h);
    k_targets[h] = dst.k.data() + held.rows() * d;
    v_targets[h] = dst.v.data() + held.rows() * d;
    p_targets[h] = dst.positions.data() + held.size;
  }
  const ActivationView k_device = host ? cuda::pack_view(k, stage + at_k_rows, ws + at_k_rows) : k;
  const ActivationView v_device = host ? cuda::pack_view(v, stage + at_v_rows, ws + at_v_rows) : v;
  upload_staging(ws, layout.bytes(), where);

  for (Grown& g : grown) {
    const DeviceHead& old = store(layer, g.head);
    if (old.size == 0) continue;
    const std::size_t rows = static_cast<std::size_t>(old.rows());
    if (rows > 0) {
      cuda::check_cuda(cudaMemcpyAsync(g.buffers.k.data(), old.k.data(), rows * d * sizeof(T),
                                       cudaMemcpyDeviceToDevice, stream),
                       "KVCache::append: copy of K on growth");
      cuda::check_cuda(cudaMemcpyAsync(g.buffers.v.data(), old.v.data(), rows * d * sizeof(T),
                                       cudaMemcpyDeviceToDevice, stream),
                       "KVCache::append: copy of V on growth");
    }
    cuda::check_cuda(cudaMemcpyAsync(g.buffers.positions.data(), old.positions.data(),
                                     static_cast<std::size_t>(old.size) * sizeof(int32_t),
                                     cudaMemcpyDeviceToDevice, stream),
                     "KVCache::append: copy of positions on growth");
    if constexpr (kStoredScores) {
      cuda::check_cuda(cudaMemcpyAsync(g.buffers.scores.data(), old.scores.data(),
                                       static_cast<std::size_t>(old.size) * sizeof(float),
                                       cudaMemcpyDeviceToDevice, stream),
                       "KVCache::append: copy of scores on growth");
    }
  }
  cuda::launch_convert_rows(k_device, reinterpret_cast<T* const*>(ws + at_k_targets), d, stream);
  cuda::launch_convert_rows(v_device, reinterpret_cast<T* const*>(ws + at_v_targets), d, stream);
  cuda::launch_scatter_positions(reinterpret_cast<const int32_t*>(ws + at_positions), n, heads,
                                 reinterpret_cast<int32_t* const*>(ws + at_p_targets), stream);
  if constexpr (kStoredScores) {  // no observed query has seen the new tokens yet
    for (int h = 0; h < heads; ++h) {
      cuda::launch_fill(destination(h).scores.data() + store(layer, h).size, n,
                        cuda::kUnscoredScore, stream);
    }
  }
  // The commit below reads nothing from the device, and the staged inputs are guarded by their
  // upload's event: only a growth (the old buffers are freed, maybe still being copied) or the
  // engine's wish to see a fault at the call that caused it (device value checks on, the
  // default) waits for the device here.
  if (!grown.empty() || context_->device_value_checks()) context_->synchronize(where);

  // Commit: nothing below can fail.
  for (Grown& g : grown) {
    DeviceHead& head = store(layer, g.head);
    head.k.swap(g.buffers.k);
    head.v.swap(g.buffers.v);
    head.positions.swap(g.buffers.positions);
    head.scores.swap(g.buffers.scores);
  }
  for (int h = 0; h < heads; ++h) {
    DeviceHead& head = store(layer, h);
    if (head.size == 0) head.first_position = positions[0];
    head.size += n;
  }
  this->record_append(layer, positions, n);
}

}  // namespace kvpack
