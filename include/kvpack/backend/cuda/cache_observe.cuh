/// \file backend/cuda/cache_observe.cuh
/// \brief Out-of-line members of KVCache<Policy, backend::Cuda>: attend_observe() (one pass
/// when the window covers every key, else the two calls), observe() of query-scored eviction
/// (ReconstructionEvict, SnapKV: the max or summed probability of each held key) and of lazy layers
/// (LazyLayerDrop: the layer's attention mass on its kept set), kernels/observe.cuh;
/// observe_hidden() of KVzap (the scorer's GEMM, kernels/hidden_scores.cuh).
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../../policy/output_factors.hpp"
#include "cache.cuh"

namespace kvpack {

template <class Policy>
void KVCache<Policy, backend::Cuda>::attend_observe(int layer, const ActivationView& q,
                                                    Positions positions, const OutputView& out,
                                                    Span<const float> query_weights,
                                                    MemorySpace space) {
  // Every check of both calls first: a refusal must leave `out` as it was.
  constexpr const char* where = "KVCache::attend_observe";
  this->check_observe_weights(where, q, query_weights);
  if constexpr (kQueryScores) {
    if (selection().window.is_all()) {
      // observe()'s pass 1 is the attention over every visible key: it writes `out`.
      cuda::DeviceGuard guard(context_->device());
      std::lock_guard<std::mutex> lock(scratch_->mutex);
      check_attend(where, layer, q, positions, out, space);
      observe_queries(layer, q, positions, query_weights, space, &out);
      observed_ = true;
      return;
    }
  }
  attend(layer, q, positions, out, space);
  observe(layer, q, positions, query_weights, space);
}

template <class Policy>
template <class P>
void KVCache<Policy, backend::Cuda>::observe_queries(int layer, const ActivationView& q,
                                                     Positions positions,
                                                     Span<const float> query_weights,
                                                     MemorySpace space, const OutputView* out) {
  const char* where = out != nullptr ? "KVCache::attend_observe" : "KVCache::observe";
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
  // KVzip+: the layer's output factors [q_heads][d][d] (uploaded with the call) and each held
  // key's value weight per query head.
  // ValueWeighting::kDisplacement: each key's R · v per query head and each row's R · o instead
  // of the norms.
  const OutputFactors* factors = nullptr;
  bool displacement = false;
  if constexpr (kQueryScores) {
    factors = selection().value_weights();
    displacement =
        factors != nullptr && selection().value_weighting() == ValueWeighting::kDisplacement;
  }
  const std::size_t factor_count =
      factors != nullptr ? static_cast<std::size_t>(q_heads) * d * d : 0;

  // Query scores: pass 1 is an attention launch over the window's keys (kernels/observe.cuh).
  const int64_t splits = kLazyLayers
                             ? 0
                             : cuda::attention_launch_splits(tokens, shape_.group_size(), kv_heads,
                                                             longest, context_->sm_count());

  // Workspace: uploaded [queries (QueryUpload) | head table | query weights | factors], then
  // [q fp32 | row max | row sum | row mass (lazy layers) | pass 1's partials and outputs (query
  // scores) | value weights or outputs (KVzip+) | row outputs (displacement)].
  cuda::QueryUpload queries(q, q_heads, d, host);
  cuda::WorkspaceLayout layout;
  queries.add_upload(layout);
  const std::size_t at_heads = layout.add<cuda::ObserveHead<T>>(kv_heads);
  const std::size_t at_query_weights = layout.add<float>(query_weights.size());
  const std::size_t at_factors = layout.add<float>(factor_count);
  const std::size_t upload_bytes = layout.bytes();
  queries.add_device(layout);
  const std::size_t at_max = layout.add<float>(rows);
  const std::size_t at_sum = layout.add<float>(rows);
  const std::size_t at_mass = layout.add<float>(kLazyLayers ? rows : 0);
  const std::size_t at_partial_acc = layout.add<float>(splits * rows * d);
  const std::size_t at_partial_max = layout.add<float>(splits * rows);
  const std::size_t at_partial_sum = layout.add<float>(splits * rows);
  // Pass 1's outputs: attend_observe()'s device `out` itself, else rows of the workspace.
  const bool out_in_place = out != nullptr && !host;
  const std::size_t at_attended = layout.add<float>(kLazyLayers || out_in_place ? 0 : rows * d);
  const std::size_t at_value_weights = layout.add<float>(
      factors != nullptr ? static_cast<int64_t>(q_heads) * longest * (displacement ? d : 1) : 0);
  const std::size_t at_row_outputs = layout.add<float>(displacement ? rows * d : 0);
  unsigned char* ws = workspace(layout.bytes());
  unsigned char* stage = staging(upload_bytes);

  queries.stage(positions, stage, ws);
  auto* head_table = reinterpret_cast<cuda::ObserveHead<T>*>(stage + at_heads);
  for (int h = 0; h < kv_heads; ++h) {
    DeviceHead& head = store(layer, h);
    head_table[h] = {head.k.data(),      head.v.data(), head.positions.data(),
                     head.scores.data(), head.size,     blocks_of(head)};
  }
  std::copy(query_weights.begin(), query_weights.end(),
            reinterpret_cast<float*>(stage + at_query_weights));
  if (factors != nullptr) {
    std::copy(factors->head(layer, 0), factors->head(layer, 0) + factor_count,
              reinterpret_cast<float*>(stage + at_factors));
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
  if constexpr (kQueryScores) params.window = selection().window;  // lazy layers: every key
  params.row_max = reinterpret_cast<float*>(ws + at_max);
  params.row_sum = reinterpret_cast<float*>(ws + at_sum);
  params.splits = splits;
  params.partial_acc = reinterpret_cast<float*>(ws + at_partial_acc);
  params.partial_max = reinterpret_cast<float*>(ws + at_partial_max);
  params.partial_sum = reinterpret_cast<float*>(ws + at_partial_sum);
  params.attended = reinterpret_cast<float*>(ws + at_attended);
  params.attended_token_stride = static_cast<int64_t>(q_heads) * d;
  params.attended_head_stride = d;
  if (out_in_place) {  // OutputView exposes rows: the element strides from row addresses
    params.attended = out->row(0, 0);
    params.attended_token_stride = out->row(1, 0) - out->row(0, 0);
    params.attended_head_stride = out->row(0, 1) - out->row(0, 0);
  }
  params.row_mass = kLazyLayers ? reinterpret_cast<float*>(ws + at_mass) : nullptr;
  params.first_position = layers_[layer].first_position;
  params.query_weights =
      query_weights.empty() ? nullptr : reinterpret_cast<const float*>(ws + at_query_weights);
  auto* value_weights = reinterpret_cast<float*>(ws + at_value_weights);
  const auto* factor_rows = reinterpret_cast<const float*>(ws + at_factors);
  params.output_factors = displacement ? factor_rows : nullptr;
  params.value_weights = factors != nullptr && !displacement ? value_weights : nullptr;
  params.value_outputs = displacement ? value_weights : nullptr;
  params.row_outputs = displacement ? reinterpret_cast<float*>(ws + at_row_outputs) : nullptr;
  params.value_stride = longest;
  const auto* heads = reinterpret_cast<const cuda::ObserveHead<T>*>(ws + at_heads);
  cuda::dispatch_head_dim(d, [&](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    if constexpr (kLazyLayers) {
      cuda::launch_observe_stats<D, T>(heads, params, selection(), stream);
    } else {
      if (displacement) {
        cuda::launch_value_weights<D, T, true>(heads, kv_heads, longest, factor_rows, params.group,
                                               value_weights, stream);
      } else if (factors != nullptr) {
        cuda::launch_value_weights<D, T, false>(heads, kv_heads, longest, factor_rows, params.group,
                                                value_weights, stream);
      }
      cuda::launch_observe<D, T, detail::sums_query_scores<Selection>()>(heads, kv_heads, longest,
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
  }
  if (out != nullptr && host) download_output(params.attended, *out, where);
  // Query scores: nothing here needs the device to finish (the scores stay on it and are next
  // read in stream order; the workspace is next written by later work on the same stream, the
  // staging area after its upload's event), so the call returns with its kernels enqueued.
}

template <class Policy>
template <class P>
void KVCache<Policy, backend::Cuda>::observe_hidden_unchecked(int layer, const ActivationView& x,
                                                              Positions positions,
                                                              MemorySpace space) {
  constexpr const char* where = "KVCache::observe_hidden";
  const HiddenScorer& scorer = selection().hidden_scorer();
  const int kv_heads = shape_.kv_heads;
  const int hidden = scorer.hidden;
  const int64_t tokens = x.tokens();
  const cudaStream_t stream = context_->stream();
  detail::require(tokens <= INT_MAX, where, "x tokens", tokens, "<= INT_MAX (one GEMM)");
  if (scratch_->scorer != selection().scorer) {
    // The scorer's weights on the device, copied once per scorer (allocations first, so a
    // failure keeps the previous copy).
    cuda::DeviceBuffer<float> weight(scorer.weight.size(), context_->device());
    cuda::DeviceBuffer<float> bias(scorer.bias.size(), context_->device());
    cuda::check_cuda(cudaMemcpyAsync(weight.data(), scorer.weight.data(), weight.bytes(),
                                     cudaMemcpyHostToDevice, stream),
                     "KVCache::observe_hidden: upload of the scorer");
    cuda::check_cuda(cudaMemcpyAsync(bias.data(), scorer.bias.data(), bias.bytes(),
                                     cudaMemcpyHostToDevice, stream),
                     "KVCache::observe_hidden: upload of the scorer");
    scratch_->scorer_weight = std::move(weight);
    scratch_->scorer_bias = std::move(bias);
    scratch_->scorer = selection().scorer;
  }

  // Workspace: uploaded [x (QueryUpload) | head table], then [x fp32 | log-scores].
  cuda::QueryUpload rows(x, 1, hidden, space == MemorySpace::kHost);
  cuda::WorkspaceLayout layout;
  rows.add_upload(layout);
  const std::size_t at_heads = layout.add<cuda::HiddenScoreHead>(kv_heads);
  const std::size_t upload_bytes = layout.bytes();
  rows.add_device(layout);
  const std::size_t at_scores = layout.add<float>(tokens * kv_heads);
  unsigned char* ws = workspace(layout.bytes());
  unsigned char* stage = staging(upload_bytes);
  rows.stage(positions, stage, ws);
  auto* head_table = reinterpret_cast<cuda::HiddenScoreHead*>(stage + at_heads);
  for (int h = 0; h < kv_heads; ++h) {
    DeviceHead& head = store(layer, h);
    head_table[h] = {head.positions.data(), head.scores.data(), head.size};
  }
  upload_staging(ws, upload_bytes, where);
  rows.convert(ws, stream);

  // log-scores [tokens][kv_heads] = x [tokens][hidden] · W [hidden][kv_heads] + b (cuBLAS).
  auto* log_scores = reinterpret_cast<float*>(ws + at_scores);
  const std::size_t layer_weights = static_cast<std::size_t>(hidden) * kv_heads;
  cuda::gemm(*context_, false, false, static_cast<int>(tokens), kv_heads, hidden, 1.0f, rows.q(ws),
             hidden, scratch_->scorer_weight.data() + layer * layer_weights, kv_heads, 0.0f,
             log_scores, kv_heads);
  cuda::launch_add_head_bias(
      log_scores, scratch_->scorer_bias.data() + static_cast<std::size_t>(layer) * kv_heads, tokens,
      kv_heads, stream);
  // An overflowed dot product (inf, or NaN where inf - inf met) is refused before any score is
  // stored, as on the CPU: a finite limit catches both whatever cuBLAS's summation order.
  const unsigned long long bad_at =
      first_invalid(where, ActivationView::nhd(log_scores, tokens, kv_heads, 1),
                    std::numeric_limits<float>::max());
  if (bad_at != ULLONG_MAX)
    this->refuse_non_finite_log_score(where, static_cast<int64_t>(bad_at), positions);
  cuda::launch_store_hidden_scores<Selection>(
      reinterpret_cast<const cuda::HiddenScoreHead*>(ws + at_heads), log_scores, rows.positions(ws),
      tokens, kv_heads, stream);
  context_->synchronize(where);
}

}  // namespace kvpack
