/// \file backend/cuda/cache_observe.cuh
/// \brief Out-of-line member of KVCache<Policy, backend::Cuda>: observe() of query-scored
/// eviction (ReconstructionEvict, SnapKV: the max or summed probability of each held key) and of
/// lazy layers (LazyLayerDrop: the layer's attention mass on its kept set), kernels/observe.cuh.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cache.cuh"

namespace kvpack {

template <class Policy>
template <class P>
void KVCache<Policy, backend::Cuda>::observe_queries(int layer, const ActivationView& q,
                                                     Positions positions, MemorySpace space) {
  constexpr const char* where = "KVCache::observe";
  using T = storage_type;
  const int d = shape_.head_dim;
  const int kv_heads = shape_.kv_heads;
  const int q_heads = shape_.q_heads;
  const int64_t tokens = q.tokens();
  const int64_t rows = tokens * q_heads;
  const cudaStream_t stream = context_->stream();
  const bool host = space == MemorySpace::kHost;
  int64_t longest = 0;
  for (int h = 0; h < kv_heads; ++h) longest = std::max(longest, store(layer, h).size);

  // Workspace: uploaded [queries (QueryUpload) | head table], then [q fp32 | row max | row sum |
  // row mass (lazy layers)].
  cuda::QueryUpload queries(q, q_heads, d, host);
  cuda::WorkspaceLayout layout;
  queries.add_upload(layout);
  const std::size_t at_heads = layout.add<cuda::ObserveHead<T>>(kv_heads);
  const std::size_t upload_bytes = layout.bytes();
  queries.add_device(layout);
  const std::size_t at_max = layout.add<float>(rows);
  const std::size_t at_sum = layout.add<float>(rows);
  const std::size_t at_mass = layout.add<float>(kLazyLayers ? rows : 0);
  unsigned char* ws = workspace(layout.bytes());
  unsigned char* stage = staging(upload_bytes);

  queries.stage(positions, stage, ws);
  auto* head_table = reinterpret_cast<cuda::ObserveHead<T>*>(stage + at_heads);
  for (int h = 0; h < kv_heads; ++h) {
    DeviceHead& head = store(layer, h);
    head_table[h] = {head.k.data(), head.positions.data(), head.scores.data(), head.size};
  }
  upload_staging(ws, upload_bytes, where);
  queries.convert(ws, stream);

  cuda::ObserveParams params{};
  params.q = queries.q(ws);
  params.q_positions = queries.positions(ws);
  params.tokens = tokens;
  params.q_heads = q_heads;
  params.group = shape_.group_size();
  params.scale = 1.0f / std::sqrt(static_cast<float>(d));
  if constexpr (kQueryScores) params.window = policy_.window;  // lazy layers: every key
  params.row_max = reinterpret_cast<float*>(ws + at_max);
  params.row_sum = reinterpret_cast<float*>(ws + at_sum);
  params.row_mass = kLazyLayers ? reinterpret_cast<float*>(ws + at_mass) : nullptr;
  params.first_position = layers_[layer].first_position;
  const auto* heads = reinterpret_cast<const cuda::ObserveHead<T>*>(ws + at_heads);
  cuda::dispatch_head_dim(d, [&](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    if constexpr (kLazyLayers) {
      cuda::launch_observe_stats<D, T>(heads, params, policy_, stream);
    } else {
      cuda::launch_observe<D, T, detail::sums_query_scores<Policy>()>(heads, kv_heads, longest,
                                                                      params, stream);
    }
  });
  if constexpr (kLazyLayers) {
    // Each row's mass comes back and is summed in double, in row order (as the CPU sums it).
    std::vector<float> mass;
    download(params.row_mass, rows, mass, where);
    context_->synchronize(where);
    double total = 0.0;
    for (float m : mass) total += m;
    observations_[layer].mass += total;
    observations_[layer].rows += rows;
  } else {
    context_->synchronize(where);
  }
}

}  // namespace kvpack
