/// \file backend/cuda/cache_batch.cuh
/// \brief KVCacheBatch<Policy, backend::Cuda>: sequences by id on one CUDA context; attend() of a
/// batch in one attention launch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../../cache_batch.hpp"
#include "../../config.hpp"
#include "../../detail/batch_entries.hpp"
#include "../../error.hpp"
#include "cache.cuh"

namespace kvpack {

/// \brief CUDA KVCacheBatch. Every sequence is a full KVCache<Policy, backend::Cuda> on the
/// batch's context (append, observe, compress, truncate on sequence(id)); attend() runs the rows
/// of every entry in one attention launch (its grid rows: every entry's kv heads) and one merge
/// of the key splits per entry. The CUDA storage is not paged yet: sequences hold their own
/// device buffers (no shared pool), and fork() copies a sequence's buffers.
/// Not thread-safe for concurrent add/remove or for attend() beside a call that changes a
/// sequence; calls run in order on the context's stream.
template <class Policy>
class KVCacheBatch<Policy, backend::Cuda>
    : public detail::BatchEntries<KVCache<Policy, backend::Cuda>> {
  using Entries = detail::BatchEntries<KVCache<Policy, backend::Cuda>>;
  using Entries::entries_;
  using Entries::entry;
  using Entries::prototype_;
  using typename Entries::Entry;

 public:
  using cache_type = KVCache<Policy, backend::Cuda>;

  /// Validates as KVCache does, on a context of the current device the batch owns.
  explicit KVCacheBatch(const ModelShape& shape, Policy policy = Policy{})
      : Entries(std::in_place, shape, std::move(policy)) {}
  /// As above, on a caller-owned context (e.g. the engine's stream) that outlives the batch.
  KVCacheBatch(const ModelShape& shape, Policy policy, cuda::CudaContext& context)
      : Entries(std::in_place, shape, std::move(policy), context) {}

  /// Adds an empty sequence; throws kvpack::error if `id` is already held.
  cache_type& add(int64_t id) { return add(id, prototype_.policy()); }

  /// Adds an empty sequence with its own policy knobs (e.g. a per-request budget). Throws
  /// kvpack::error if `id` is already held or a knob is invalid; nothing is added then.
  cache_type& add(int64_t id, Policy policy) {
    this->require_new(id, "KVCacheBatch::add");
    auto cache = std::make_unique<cache_type>(prototype_.shape(), std::move(policy), context());
    return this->insert(id, std::move(cache));
  }

  /// Adds sequence `id` as a device copy of `source` (e.g. parallel sampling from one prompt):
  /// its own buffers (token bases too), bit-identical contents, on the batch's stream. Throws
  /// kvpack::error if `source` is not held, `id` is, or device memory runs out (nothing added).
  cache_type& fork(int64_t source, int64_t id) {
    const cache_type& from = this->sequence(source);
    this->require_new(id, "KVCacheBatch::fork");
    return this->insert(id, std::unique_ptr<cache_type>(new cache_type(from, context())));
  }

  /// \brief Attention of every entry of `batch` over what its sequence holds at `layer`, q and
  /// out of every entry in `space`: one attention launch over every entry's kv heads (the same
  /// kernel and arithmetic as `sequence(id).attend(layer, q, positions, out, space)`, the key
  /// splits chosen for the whole launch, so outputs equal those calls' up to the summation
  /// order of the splits), then one merge per entry into its `out`. Entries may name the same
  /// sequence. Every entry is checked first (as attend() checks it); a kvpack::error names the
  /// entry and nothing is written; at most 65,535 / kv_heads entries (one grid row per entry's
  /// kv head). kDevice: returns without waiting for the device but for the
  /// checks of device queries and device positions (CudaContext::device_value_checks()); kHost
  /// waits for the outputs.
  void attend(int layer, const std::vector<BatchQuery>& batch,
              MemorySpace space = MemorySpace::kHost) const;

  /// Σ bytes() of the sequences plus the batch's own table.
  std::size_t bytes() const {
    std::size_t total = entries_.size() * (sizeof(Entry) + sizeof(cache_type));
    for (const auto& e : entries_) total += e.cache->bytes();
    return total;
  }

  /// Device and page-locked scratch: the batch's (attend()) and its sequences'.
  std::size_t workspace_bytes() const {
    std::size_t total = scratch_->device.bytes() + scratch_->host.bytes();
    for (const auto& e : entries_) total += e.cache->workspace_bytes();
    return total;
  }

  const ModelShape& shape() const { return prototype_.shape(); }
  cuda::CudaContext& context() const { return prototype_.context(); }

 private:
  using Head = typename cache_type::AttentionHeadType;
  struct Scratch {
    std::mutex mutex;
    cuda::DeviceBuffer<unsigned char> device;
    cuda::PinnedStaging host;
  };

  std::unique_ptr<Scratch> scratch_ = std::make_unique<Scratch>();
};

template <class Policy>
void KVCacheBatch<Policy, backend::Cuda>::attend(int layer, const std::vector<BatchQuery>& batch,
                                                 MemorySpace space) const {
  constexpr const char* where = "KVCacheBatch::attend";
  const ModelShape& s = shape();
  const int d = s.head_dim, kv_heads = s.kv_heads, q_heads = s.q_heads;
  cuda::DeviceGuard guard(context().device());
  std::lock_guard<std::mutex> lock(scratch_->mutex);
  const int64_t n = static_cast<int64_t>(batch.size());
  detail::require(n * kv_heads <= 65535, where, "entries", n, "<= 65535 / kv_heads (one launch)");
  std::vector<const cache_type*> caches(n);
  int64_t tokens = 0, most_tokens = 0, longest = 0;
  for (int64_t i = 0; i < n; ++i) {
    const std::string at = detail::concat(where, " entry ", i);
    caches[i] = entry(batch[i].sequence, at.c_str()).cache.get();
    caches[i]->check_attend(at.c_str(), layer, batch[i].q, batch[i].positions, batch[i].out, space);
    tokens += batch[i].q.tokens();
    most_tokens = std::max(most_tokens, batch[i].q.tokens());
    for (int h = 0; h < kv_heads; ++h) longest = std::max(longest, caches[i]->tokens(layer, h));
  }
  if (n == 0) return;
  const int64_t rows = tokens * q_heads;
  const int64_t row_blocks =
      (most_tokens * s.group_size() + cuda::kAttentionRows - 1) / cuda::kAttentionRows;
  const int64_t splits =
      cuda::attention_splits(row_blocks * n * kv_heads, longest, context().sm_count());
  const bool host = space == MemorySpace::kHost;

  // Workspace: uploaded [each entry's queries (QueryUpload) | head table | sequence table], then
  // [each entry's q fp32 | partial acc | partial max | partial sum | outputs (host)].
  std::vector<cuda::QueryUpload> queries;
  queries.reserve(n);
  cuda::WorkspaceLayout layout;
  for (int64_t i = 0; i < n; ++i) {
    queries.emplace_back(batch[i].q, q_heads, d, host);
    queries.back().add_upload(layout);
  }
  const std::size_t at_heads = layout.add<Head>(n * kv_heads);
  const std::size_t at_sequences = layout.add<cuda::AttentionSequence>(n);
  const std::size_t upload_bytes = layout.bytes();
  for (auto& query : queries) query.add_device(layout);
  const std::size_t at_acc = layout.add<float>(splits * rows * d);
  const std::size_t at_max = layout.add<float>(splits * rows);
  const std::size_t at_sum = layout.add<float>(splits * rows);
  const std::size_t at_out = layout.add<float>(host ? rows * d : 0);
  unsigned char* ws = cuda::grown_workspace(scratch_->device, layout.bytes(), context(),
                                            "KVCacheBatch: workspace growth");
  unsigned char* stage = scratch_->host.acquire(upload_bytes);

  auto* head_table = reinterpret_cast<Head*>(stage + at_heads);
  auto* sequences = reinterpret_cast<cuda::AttentionSequence*>(stage + at_sequences);
  int64_t first_row = 0;
  for (int64_t i = 0; i < n; ++i) {
    queries[i].stage(batch[i].positions, stage, ws);
    for (int h = 0; h < kv_heads; ++h) {
      head_table[i * kv_heads + h] = caches[i]->attention_head(layer, h);
    }
    sequences[i] = {queries[i].q(ws), queries[i].positions(ws), batch[i].q.tokens(), first_row};
    first_row += batch[i].q.tokens() * q_heads;
  }
  scratch_->host.upload(ws, upload_bytes, context().stream(), "KVCacheBatch::attend: upload");
  for (const auto& query : queries) query.convert(ws, context().stream());

  cuda::AttentionParams params{};
  params.tokens = tokens;
  params.q_heads = q_heads;
  params.group = s.group_size();
  params.scale = 1.0f / std::sqrt(static_cast<float>(d));
  params.splits = splits;
  params.partial_acc = reinterpret_cast<float*>(ws + at_acc);
  params.partial_max = reinterpret_cast<float*>(ws + at_max);
  params.partial_sum = reinterpret_cast<float*>(ws + at_sum);
  params.sequences = reinterpret_cast<const cuda::AttentionSequence*>(ws + at_sequences);
  params.kv_heads = kv_heads;
  auto* packed = reinterpret_cast<float*>(ws + at_out);
  cuda::dispatch_head_dim(d, [&](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    cuda::launch_attention_kernel<D>(reinterpret_cast<const Head*>(ws + at_heads), n * kv_heads,
                                     params, most_tokens, context().stream());
    int64_t row = 0;
    for (int64_t i = 0; i < n; ++i) {
      const OutputView& out = batch[i].out;
      const int64_t entry_rows = out.tokens() * q_heads;
      if (host) {
        cuda::launch_merge_splits<D>(params, row, entry_rows, packed + row * d,
                                     int64_t{q_heads} * d, d, context().stream());
      } else {  // OutputView exposes rows: the element strides from row addresses
        cuda::launch_merge_splits<D>(params, row, entry_rows, out.row(0, 0),
                                     out.row(1, 0) - out.row(0, 0), out.row(0, 1) - out.row(0, 0),
                                     context().stream());
      }
      row += entry_rows;
    }
  });
  if (!host) return;  // device outputs: ready in stream order
  int64_t row = 0;    // the first download waits for the launch; the others find their rows ready
  for (int64_t i = 0; i < n; ++i) {
    caches[i]->download_output(packed + row * d, batch[i].out, where);
    row += batch[i].out.tokens() * q_heads;
  }
}

}  // namespace kvpack
