/// \file backend/cuda/cache_evict.cuh
/// \brief Out-of-line member of KVCache<Policy, backend::Cuda>: eviction (scores, selection per
/// head or by one global threshold, both on the device, compaction), and SimLayerKV's trimming
/// of lazy layers by the same selection.
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
template <class P>
void KVCache<Policy, backend::Cuda>::evict() {
  constexpr const char* where = "KVCache::compress";
  using T = storage_type;
  const int d = shape_.head_dim;
  const int device = context_->device();
  const cudaStream_t stream = context_->stream();
  // The eviction knobs. Lazy layers (LazyLayerDrop) have no budget: each head of a lazy layer
  // keeps only its kept set (the policy's sinks and recent window, the protected tokens of a
  // target of 0), decided once per layer from the observed mass as on the CPU.
  Budget budget;
  int first_layer = 0;
  int64_t min_tokens = 0;
  // A score threshold (KVzap) replaces the budget's count; each head keeps what passes it.
  float threshold = std::numeric_limits<float>::quiet_NaN();
  if constexpr (kLazyLayers) {
    budget.sink_tokens = selection().sink_tokens;
    budget.recent_tokens = selection().recent_tokens;
    for (detail::LayerObservation& o : observations_) o.decide(selection().threshold);
  } else {
    budget = selection().budget;
    first_layer = detail::first_layer(selection(), shape_.layers);
    min_tokens = selection().min_tokens;
    threshold = selection().score_threshold();
  }
  const bool by_threshold = !std::isnan(threshold);
  struct Target {
    int layer, head;
    int64_t offset;  // of its tokens in the concatenated score / flag / index arrays
  };
  std::vector<Target> targets;
  int64_t total = 0, longest = 0;
  for (int l = first_layer; l < shape_.layers; ++l) {
    const detail::LayerState& state = layers_[l];
    if (state.appended == 0 || state.appended < min_tokens) continue;
    if constexpr (kLazyLayers) {
      if (observations_[l].lazy != 1) continue;
    }
    for (int h = 0; h < shape_.kv_heads; ++h) {
      targets.push_back({l, h, total});
      total += store(l, h).size;
      longest = std::max(longest, store(l, h).size);
    }
  }
  const int64_t n_targets = static_cast<int64_t>(targets.size());
  if (n_targets == 0) return;
  // HeadLevelEvict: a head keeps every token or only the protected ones (chosen on the host from
  // the policy's head scores, as the CPU cache does); a lazy layer's heads keep the protected
  // ones.
  constexpr bool kAllOrProtected = cuda::is_head_level_policy<Selection>::value || kLazyLayers;
  std::vector<char> whole(n_targets, 0);
  if constexpr (cuda::is_head_level_policy<Selection>::value) {
    std::vector<int> ids;
    for (const Target& t : targets) ids.push_back(t.layer * shape_.kv_heads + t.head);
    whole = selection().heads_kept(ids);
  }

  cuda::WorkspaceLayout layout;
  const std::size_t at_score_jobs = layout.add<cuda::ScoreJob<T>>(n_targets);
  const std::size_t at_select_jobs = layout.add<cuda::SelectJob>(n_targets);
  const std::size_t at_stored_jobs =
      layout.add<cuda::StoredScoreJob>(kStoredScores ? n_targets : 0);
  const std::size_t upload_bytes = layout.bytes();
  const std::size_t at_counts = layout.add<cuda::StoredScoreCounts>(kStoredScores ? n_targets : 0);
  const std::size_t at_scores = layout.add<float>(total);
  const std::size_t at_flags = layout.add<uint8_t>(total);
  const std::size_t at_kept_index = layout.add<int32_t>(total);
  const std::size_t at_results = layout.add<cuda::SelectResult>(n_targets);
  const std::size_t at_compact_jobs = layout.add<cuda::CompactJob<T>>(n_targets);
  const std::size_t at_global_state = layout.add<cuda::GlobalSelectState>(1);
  unsigned char* ws = workspace(layout.bytes());
  unsigned char* stage = staging(upload_bytes);
  auto* scores = reinterpret_cast<float*>(ws + at_scores);
  auto* kept_index = reinterpret_cast<int32_t*>(ws + at_kept_index);

  auto* score_jobs = reinterpret_cast<cuda::ScoreJob<T>*>(stage + at_score_jobs);
  auto* select_jobs = reinterpret_cast<cuda::SelectJob*>(stage + at_select_jobs);
  auto* stored_jobs = reinterpret_cast<cuda::StoredScoreJob*>(stage + at_stored_jobs);
  for (int64_t i = 0; i < n_targets; ++i) {
    const DeviceHead& head = store(targets[i].layer, targets[i].head);
    const detail::LayerState& state = layers_[targets[i].layer];
    score_jobs[i] = {head.k.data(), head.v.data(),     head.positions.data(), state.last_position,
                     head.size,     targets[i].offset, blocks_of(head)};
    select_jobs[i] = {scores + targets[i].offset,
                      head.positions.data(),
                      head.size,
                      kAllOrProtected ? (whole[i] ? head.size : 0) : budget.target(state.appended),
                      state.first_position + budget.sink_tokens,
                      state.last_position - budget.recent_tokens,
                      targets[i].offset};
    if constexpr (kStoredScores) {
      const cuda::SelectJob& job = select_jobs[i];
      stored_jobs[i] = {head.scores.data(), head.positions.data(), head.size,
                        targets[i].offset,  job.protect_below,     job.protect_above};
    }
  }
  upload_staging(ws, upload_bytes, where);
  if constexpr (kAllOrProtected) {
    // Equal scores: a head's target alone decides (all or only the protected tokens).
    cuda::check_cuda(
        cudaMemsetAsync(scores, 0, static_cast<std::size_t>(total) * sizeof(float), stream),
        "KVCache::compress: clearing the scores");
  } else if constexpr (kStoredScores) {
    // The scores observe() / observe_hidden() left; tokens no observation scored rank first and
    // are kept outside the budget, which applies to the scored tokens (as on the CPU); with a
    // score threshold (KVzap) each head keeps its protected tokens and every one at or above it.
    // The per-head counts come back before the targets are set.
    auto* device_counts = reinterpret_cast<cuda::StoredScoreCounts*>(ws + at_counts);
    cuda::check_cuda(
        cudaMemsetAsync(device_counts, 0, n_targets * sizeof(cuda::StoredScoreCounts), stream),
        "KVCache::compress: clearing the score counts");
    cuda::launch_gather_stored_scores(
        reinterpret_cast<const cuda::StoredScoreJob*>(ws + at_stored_jobs), n_targets, longest,
        selection().score_pool_width() / 2, threshold, scores, device_counts, stream);
    std::vector<cuda::StoredScoreCounts> counts;
    download(device_counts, n_targets, counts, where);
    context_->synchronize(where);
    for (int64_t i = 0; i < n_targets; ++i) {
      const int64_t appended = layers_[targets[i].layer].appended;
      const int unscored = counts[i].unscored;
      select_jobs[i].target =
          by_threshold ? counts[i].at_least : budget.target(appended - unscored) + unscored;
    }
    cuda::check_cuda(
        cudaMemcpyAsync(ws + at_select_jobs, select_jobs, n_targets * sizeof(cuda::SelectJob),
                        cudaMemcpyHostToDevice, stream),
        "KVCache::compress: upload of the selection targets");
  } else {
    cuda::launch_score_tokens<Selection, T>(
        reinterpret_cast<const cuda::ScoreJob<T>*>(ws + at_score_jobs), n_targets, longest, d,
        scores, stream);
  }

  std::vector<int64_t> kept(n_targets), first_position(n_targets);
  auto* results = reinterpret_cast<cuda::SelectResult*>(ws + at_results);
  const auto* device_select_jobs = reinterpret_cast<const cuda::SelectJob*>(ws + at_select_jobs);
  auto* flags = reinterpret_cast<uint8_t*>(ws + at_flags);
  if (budget.scope == BudgetScope::kPerHead || kAllOrProtected || by_threshold) {
    cuda::launch_select_top_k(device_select_jobs, n_targets, flags, results, kept_index, stream);
  } else {
    // One threshold over every (layer, head, token), selected on the device: only the per-head
    // counts come back to the host.
    auto* state = reinterpret_cast<cuda::GlobalSelectState*>(ws + at_global_state);
    cuda::check_cuda(cudaMemsetAsync(state, 0, sizeof(cuda::GlobalSelectState), stream),
                     "KVCache::compress: clearing the selection state");
    int64_t target_sum = 0;
    for (int64_t i = 0; i < n_targets; ++i) target_sum += select_jobs[i].target;
    cuda::launch_select_global(device_select_jobs, n_targets, total, longest, target_sum, flags,
                               results, kept_index, state, stream);
  }
  std::vector<cuda::SelectResult> host_results(n_targets);
  cuda::check_cuda(
      cudaMemcpyAsync(host_results.data(), results, n_targets * sizeof(cuda::SelectResult),
                      cudaMemcpyDeviceToHost, stream),
      "KVCache::compress: download of the selection");
  context_->synchronize(where);
  for (int64_t i = 0; i < n_targets; ++i) {
    kept[i] = host_results[i].kept;
    first_position[i] = host_results[i].first_position;
  }

  // Compaction into exact-size buffers for every head that lost tokens (as the CPU, heads that
  // keep everything are left alone). Allocations come first: an allocation failure changes
  // nothing.
  struct Compacted {
    int64_t target;
    DeviceHead buffers;
  };
  std::vector<Compacted> compacted;
  std::vector<cuda::CompactJob<T>> jobs;
  int64_t most_kept = 0;
  for (int64_t i = 0; i < n_targets; ++i) {
    const DeviceHead& head = store(targets[i].layer, targets[i].head);
    if (kept[i] >= head.size) continue;
    Compacted c{i, DeviceHead{}};
    const std::size_t rows = static_cast<std::size_t>(kept[i]);
    c.buffers.k = cuda::DeviceBuffer<T>(rows * d, device);
    c.buffers.v = cuda::DeviceBuffer<T>(rows * d, device);
    c.buffers.positions = cuda::DeviceBuffer<int32_t>(rows, device);
    if constexpr (kStoredScores) c.buffers.scores = cuda::DeviceBuffer<float>(rows, device);
    c.buffers.size = kept[i];
    c.buffers.first_position = first_position[i];
    if (kept[i] > 0) {
      jobs.push_back({head.k.data(), head.v.data(), head.positions.data(),
                      kept_index + targets[i].offset, kept[i], c.buffers.k.data(),
                      c.buffers.v.data(), c.buffers.positions.data(), head.scores.data(),
                      c.buffers.scores.data(), blocks_of(head)});
      most_kept = std::max(most_kept, kept[i]);
    }
    compacted.push_back(std::move(c));
  }
  if (compacted.empty()) {
    context_->synchronize(where);
    return;
  }
  if (!jobs.empty()) {
    auto* device_jobs = reinterpret_cast<cuda::CompactJob<T>*>(ws + at_compact_jobs);
    cuda::check_cuda(cudaMemcpyAsync(device_jobs, jobs.data(), jobs.size() * sizeof(jobs[0]),
                                     cudaMemcpyHostToDevice, stream),
                     "KVCache::compress: upload of the compaction jobs");
    cuda::launch_gather_rows(device_jobs, static_cast<int64_t>(jobs.size()), most_kept, d, stream);
  }
  context_->synchronize(where);

  // Commit: the old buffers are freed here, so evicted rows return to the device.
  for (Compacted& c : compacted) {
    store(targets[c.target].layer, targets[c.target].head) = std::move(c.buffers);
  }
}

}  // namespace kvpack
