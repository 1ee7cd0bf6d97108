/// \file backend/cuda/cache_attend.cuh
/// \brief Out-of-line member of KVCache<Policy, backend::Cuda>: decode and prefill attention.
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
void KVCache<Policy, backend::Cuda>::check_attend(const char* where, int layer,
                                                  const ActivationView& q, Positions positions,
                                                  const OutputView& out, MemorySpace space) const {
  std::vector<int64_t> copy;
  const Positions checked = check_query(where, layer, q, positions, space, copy);
  this->check_output(where, q, out);
  if (!checked.empty()) {  // unchecked device positions: a row seeing no key gets zeros
    this->check_visible(where, layer, checked, [&](int h) {
      const auto& head = store(layer, h);
      return std::pair<int64_t, int64_t>(head.size, head.first_position);
    });
  }
  detail::require(out.dtype() == DType::kF32, where, "out dtype", dtype_name(out.dtype()),
                  "f32 (the CUDA backend writes fp32 outputs)");
  check_space(where, "out", out.data(), space);
}

template <class Policy>
void KVCache<Policy, backend::Cuda>::download_output(const float* rows, const OutputView& out,
                                                     const char* where) const {
  const int64_t tokens = out.tokens();
  const int q_heads = shape_.q_heads;
  const int d = shape_.head_dim;
  std::vector<float> result(static_cast<std::size_t>(tokens) * q_heads * d);
  cuda::check_cuda(cudaMemcpyAsync(result.data(), rows, result.size() * sizeof(float),
                                   cudaMemcpyDeviceToHost, context_->stream()),
                   detail::concat(where, ": download of the output").c_str());
  context_->synchronize(where);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int h = 0; h < q_heads; ++h) {
      std::memcpy(out.row(t, h), result.data() + (t * q_heads + h) * d, d * sizeof(float));
    }
  }
}

template <class Policy>
auto KVCache<Policy, backend::Cuda>::attention_head(int layer, int h) const -> AttentionHeadType {
  if constexpr (kLowRank) {
    return low_rank_head(layer, h, rope_);
  } else {
    const DeviceHead& head = store(layer, h);
    if constexpr (kQuantized) {
      return {head.k_blocks.data(), head.v_blocks.data(),  head.k.data(),
              head.v.data(),        head.positions.data(), head.size,
              head.quantized,       kivi_format()};
    } else {
      return {head.k.data(), head.v.data(), head.positions.data(), head.size};
    }
  }
}

template <class Policy>
void KVCache<Policy, backend::Cuda>::attend_unchecked(int layer, const ActivationView& q,
                                                      Positions positions, const OutputView& out,
                                                      MemorySpace space) const {
  constexpr const char* where = "KVCache::attend";
  const int d = shape_.head_dim;
  const int kv_heads = shape_.kv_heads;
  const int q_heads = shape_.q_heads;
  const int group = shape_.group_size();
  const int64_t tokens = q.tokens();
  const int64_t rows = tokens * q_heads;
  const cudaStream_t stream = context_->stream();
  const bool host = space == MemorySpace::kHost;

  int64_t longest = 0;
  for (int h = 0; h < kv_heads; ++h) longest = std::max(longest, store(layer, h).size);
  const int64_t splits =
      cuda::attention_launch_splits(tokens, group, kv_heads, longest, context_->sm_count());

  // Workspace: uploaded [queries (QueryUpload) | head table], then [q fp32 | partial acc |
  // partial max | partial sum | out (host output)].
  cuda::QueryUpload queries(q, q_heads, d, host);
  cuda::WorkspaceLayout layout;
  queries.add_upload(layout);
  using Head = AttentionHeadType;
  const std::size_t at_heads = layout.add<Head>(kv_heads);
  const std::size_t upload_bytes = layout.bytes();
  queries.add_device(layout);
  const std::size_t at_acc = layout.add<float>(splits * rows * d);
  const std::size_t at_max = layout.add<float>(splits * rows);
  const std::size_t at_sum = layout.add<float>(splits * rows);
  const std::size_t at_out = layout.add<float>(host ? rows * d : 0);
  unsigned char* ws = workspace(layout.bytes());
  unsigned char* stage = staging(upload_bytes);

  queries.stage(positions, stage, ws);
  auto* head_table = reinterpret_cast<Head*>(stage + at_heads);
  for (int h = 0; h < kv_heads; ++h) head_table[h] = attention_head(layer, h);
  upload_staging(ws, upload_bytes, where);

  queries.convert(ws, stream);
  cuda::AttentionParams params{};
  params.q = queries.q(ws);
  params.q_positions = queries.positions(ws);
  params.tokens = tokens;
  params.q_heads = q_heads;
  params.group = group;
  params.scale = 1.0f / std::sqrt(static_cast<float>(d));
  params.splits = splits;
  params.partial_acc = reinterpret_cast<float*>(ws + at_acc);
  params.partial_max = reinterpret_cast<float*>(ws + at_max);
  params.partial_sum = reinterpret_cast<float*>(ws + at_sum);
  // OutputView exposes rows, not strides: recover the element strides from row addresses.
  float* out_device =
      host ? reinterpret_cast<float*>(ws + at_out) : static_cast<float*>(out.data());
  const int64_t out_token_stride =
      host ? static_cast<int64_t>(q_heads) * d : out.row(1, 0) - out.row(0, 0);
  const int64_t out_head_stride = host ? d : out.row(0, 1) - out.row(0, 0);
  const auto* heads = reinterpret_cast<const Head*>(ws + at_heads);
  cuda::dispatch_head_dim(d, [&](auto head_dim) {
    cuda::launch_attention_heads<decltype(head_dim)::value>(
        heads, kv_heads, params, out_device, out_token_stride, out_head_stride, stream);
  });

  // Device output: ready in stream order. Nothing here needs the device to finish: the
  // workspace is next written by work later on the same stream, the staging area after its
  // upload's event (PinnedStaging).
  if (host) download_output(out_device, out, where);
}

}  // namespace kvpack
