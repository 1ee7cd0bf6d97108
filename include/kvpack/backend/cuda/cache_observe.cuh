/// \file backend/cuda/cache_observe.cuh
/// \brief Out-of-line member of KVCache<Policy, backend::Cuda>: observe() of query-scored
/// eviction (ReconstructionEvict), the max probability of each held key (kernels/observe.cuh).
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
void KVCache<Policy, backend::Cuda>::observe_scores(int layer, const ActivationView& q,
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

  // Workspace: uploaded [q positions | head table | q targets | q rows (host input)], then
  // [q fp32 | row max | row sum].
  cuda::WorkspaceLayout layout;
  const std::size_t at_positions = layout.add<int32_t>(tokens);
  const std::size_t at_heads = layout.add<cuda::ObserveHead<T>>(kv_heads);
  const std::size_t at_q_targets = layout.add<float*>(q_heads);
  const std::size_t at_q_rows =
      layout.add<unsigned char>(host ? rows * d * cuda::dtype_bytes(q.dtype()) : 0);
  const std::size_t upload_bytes = layout.bytes();
  const std::size_t at_q = layout.add<float>(rows * d);
  const std::size_t at_max = layout.add<float>(rows);
  const std::size_t at_sum = layout.add<float>(rows);
  unsigned char* ws = workspace(layout.bytes());
  unsigned char* stage = staging(upload_bytes);

  auto* stage_positions = reinterpret_cast<int32_t*>(stage + at_positions);
  for (int64_t t = 0; t < tokens; ++t) stage_positions[t] = static_cast<int32_t>(positions[t]);
  auto* head_table = reinterpret_cast<cuda::ObserveHead<T>*>(stage + at_heads);
  for (int h = 0; h < kv_heads; ++h) {
    DeviceHead& head = store(layer, h);
    head_table[h] = {head.k.data(), head.positions.data(), head.scores.data(), head.size};
  }
  auto* q_fp32 = reinterpret_cast<float*>(ws + at_q);
  auto* q_targets = reinterpret_cast<float**>(stage + at_q_targets);
  for (int h = 0; h < q_heads; ++h) q_targets[h] = q_fp32 + static_cast<int64_t>(h) * d;
  const ActivationView q_device = host ? cuda::pack_view(q, stage + at_q_rows, ws + at_q_rows) : q;
  upload_staging(ws, upload_bytes, where);
  cuda::launch_convert_rows(q_device, reinterpret_cast<float* const*>(ws + at_q_targets),
                            static_cast<int64_t>(q_heads) * d, stream);

  cuda::ObserveParams params{};
  params.q = q_fp32;
  params.q_positions = reinterpret_cast<const int32_t*>(ws + at_positions);
  params.tokens = tokens;
  params.q_heads = q_heads;
  params.group = shape_.group_size();
  params.scale = 1.0f / std::sqrt(static_cast<float>(d));
  params.window = policy_.window;
  params.row_max = reinterpret_cast<float*>(ws + at_max);
  params.row_sum = reinterpret_cast<float*>(ws + at_sum);
  const auto* heads = reinterpret_cast<const cuda::ObserveHead<T>*>(ws + at_heads);
  cuda::dispatch_head_dim(d, [&](auto head_dim) {
    cuda::launch_observe<decltype(head_dim)::value, T>(heads, kv_heads, longest, params, stream);
  });
  context_->synchronize(where);
}

}  // namespace kvpack
