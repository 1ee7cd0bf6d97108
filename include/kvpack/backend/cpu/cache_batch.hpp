/// \file backend/cpu/cache_batch.hpp
/// \brief KVCacheBatch<Policy, backend::Cpu>: sequences by id in one page pool; batched attend.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../../cache_batch.hpp"
#include "../../config.hpp"
#include "../../detail/batch_entries.hpp"
#include "../../error.hpp"
#include "../../executor.hpp"
#include "../../page_pool.hpp"
#include "cache.hpp"

namespace kvpack {

/// \brief CPU KVCacheBatch. Every sequence is a full KVCache (append, observe, compress,
/// truncate, save/load on sequence(id)); their dense rows come from one PagePool, so pages an
/// eviction or a remove() frees are reused by the other sequences. Not thread-safe for
/// concurrent add/fork/remove; different sequences may be appended or compressed from different
/// threads (the pool is locked), and attend() may run concurrently with other const calls.
template <class Policy>
class KVCacheBatch<Policy, backend::Cpu>
    : public detail::BatchEntries<KVCache<Policy, backend::Cpu>> {
  using Entries = detail::BatchEntries<KVCache<Policy, backend::Cpu>>;
  using Entries::entries_;
  using Entries::entry;
  using Entries::prototype_;
  using typename Entries::Entry;

 public:
  using cache_type = KVCache<Policy, backend::Cpu>;
  using Entries::sequence;

  /// Validates as KVCache does. Without `pages.pool` the batch makes its pool (pages allocated
  /// 64 at a time); with one, the pool may be in caller memory and shared further.
  explicit KVCacheBatch(const ModelShape& shape, Policy policy = Policy{}, PageOptions pages = {})
      : Entries(std::in_place, shape, policy, make_pages(shape, policy, pages)), pages_(pages) {
    pages_.pool = prototype_.page_pool();
  }

  /// Adds an empty sequence; throws kvpack::error if `id` is already held.
  cache_type& add(int64_t id) { return add(id, prototype_.policy()); }

  /// Adds an empty sequence with its own policy knobs (e.g. a per-request budget). Throws
  /// kvpack::error if `id` is already held, a knob is invalid, or the policy's pages would not
  /// fit the batch's pool (KVCache::page_bytes larger than the pool's; e.g. other KIVI bits);
  /// nothing is added then.
  cache_type& add(int64_t id, Policy policy) {
    this->require_new(id, "KVCacheBatch::add");
    auto cache = std::make_unique<cache_type>(prototype_.shape(), std::move(policy), pages_);
    cache->set_executor(executor_);
    return this->insert(id, std::move(cache));
  }

  /// Adds sequence `id` as a copy of `source` (e.g. parallel sampling from one prompt): its own
  /// pages of the same pool, bit-identical contents. Throws kvpack::error if `source` is not held,
  /// `id` is, or the pool runs out of pages (nothing added then).
  cache_type& fork(int64_t source, int64_t id) {
    const cache_type& from = sequence(source);
    this->require_new(id, "KVCacheBatch::fork");
    return this->insert(id, std::make_unique<cache_type>(from));
  }

  /// \brief Attention of every entry of `batch` over what its sequence holds at `layer`, in one
  /// parallel loop over (entry, kv head, query block, key split): the same work items and
  /// arithmetic as `sequence(id).attend(layer, q, positions, out)` per entry, so the outputs are
  /// bit-identical to those calls. Entries may name the same sequence. Every entry is checked
  /// first (as attend() checks); a kvpack::error names the entry and nothing is written.
  void attend(int layer, const std::vector<BatchQuery>& batch) const {
    constexpr const char* where = "KVCacheBatch::attend";
    std::vector<const cache_type*> caches(batch.size());
    std::vector<typename cache_type::AttendPlan> plans(batch.size());
    std::vector<int64_t> first_item(batch.size() + 1, 0);
    for (std::size_t i = 0; i < batch.size(); ++i) {
      const std::string at = detail::concat(where, " entry ", i);
      caches[i] = entry(batch[i].sequence, at.c_str()).cache.get();
      plans[i] =
          caches[i]->checked_plan(at.c_str(), layer, batch[i].q, batch[i].positions, batch[i].out);
      first_item[i + 1] = first_item[i] + plans[i].items;
    }
    detail::parallel_for(executor(), first_item.back(), [&](int64_t item) {
      const std::size_t i =
          std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin() - 1;
      caches[i]->run_attend_item(plans[i], layer, batch[i].q, batch[i].positions,
                                 item - first_item[i]);
    });
    detail::parallel_for(executor(), static_cast<int64_t>(batch.size()),
                         [&](int64_t i) { caches[i]->finish_attend(plans[i], batch[i].out); });
  }

  /// Σ bytes() of the sequences (their pages, page tables, positions, bookkeeping) plus the
  /// batch's own table. Pages are counted where they are held, once: the token bases that forks
  /// of a low-rank sequence share with it are counted once for the batch.
  std::size_t bytes() const {
    std::size_t total = entries_.size() * (sizeof(Entry) + sizeof(cache_type));
    for (const auto& e : entries_) total += e.cache->bytes();
    return total - shared_overcount(false);
  }

  /// What the batch occupies: the sequences' reserved_bytes() (pages held and vector capacity),
  /// the pool's free pages and bookkeeping, and the batch's table. Equals the allocator's count up
  /// to the pool object and its shared_ptr control block.
  std::size_t reserved_bytes() const {
    std::size_t total = entries_.capacity() * sizeof(Entry) + entries_.size() * sizeof(cache_type);
    for (const auto& e : entries_) total += e.cache->reserved_bytes();
    const auto& pool = prototype_.page_pool();
    if (pool) total += pool->reserved_bytes() - pool->bytes_in_use();
    return total + prototype_.reserved_bytes() - shared_overcount(true);
  }

  /// The pool the sequences' pages come from.
  const std::shared_ptr<PagePool>& page_pool() const { return prototype_.page_pool(); }
  const ModelShape& shape() const { return prototype_.shape(); }

  /// Runs attend() and every sequence's parallel loops on `executor` (not owned), or on
  /// default_executor() when null.
  void set_executor(Executor* executor) {
    executor_ = executor;
    for (auto& e : entries_) e.cache->set_executor(executor);
  }
  Executor& executor() const { return executor_ != nullptr ? *executor_ : default_executor(); }

 private:
  /// What Σ over the sequences counts more than once: the token bases forks of a low-rank
  /// sequence share (each sequence's bytes() counts every basis its heads point to).
  std::size_t shared_overcount(bool reserved) const {
    if constexpr (cache_type::kLowRank) {
      using Store = typename cache_type::Store;
      std::vector<const std::vector<Store>*> all;
      std::size_t each = 0;
      for (const auto& e : entries_) {
        all.push_back(&e.cache->heads_);
        each += reserved ? Store::shared_reserved_bytes(e.cache->heads_)
                         : Store::shared_bytes(e.cache->heads_);
      }
      return each - (reserved ? Store::shared_reserved_bytes(all) : Store::shared_bytes(all));
    } else {
      static_cast<void>(reserved);
      return 0;
    }
  }

  static PageOptions make_pages(const ModelShape& shape, const Policy& policy, PageOptions pages) {
    if (!pages.pool && pages.page_tokens > 0) {
      // A batch pool's chunks double up to 64 pages (one allocation per 64 pages, not per page).
      // A bad page_tokens is left for KVCache to refuse with its message.
      shape.validate();
      policy.validate(shape);
      pages.pool = std::make_shared<PagePool>(
          cache_type::page_bytes(shape, policy, std::min(pages.page_tokens, 4096)), 64);
    }
    return pages;
  }

  PageOptions pages_;
  Executor* executor_ = nullptr;
};

}  // namespace kvpack
