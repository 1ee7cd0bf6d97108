/// \file detail/batch_entries.hpp
/// \brief The sequences of a KVCacheBatch by id (either backend): lookup, insertion, removal.
#pragma once

// clang-format off
#include "internal.hpp"  // first, before anything defines the macro it checks
// clang-format on

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>  // std::in_place, std::move
#include <vector>

#include "../error.hpp"

namespace kvpack {
namespace detail {

/// Caches of type Cache by id, ascending; the public members are KVCacheBatch's.
template <class Cache>
class BatchEntries {
 public:
  /// Removes sequence `id` (its storage is freed, pages go back to their pool). Throws
  /// kvpack::error if not held.
  void remove(int64_t id) {
    const auto at = find(id);
    require(at != entries_.end() && at->id == id, "KVCacheBatch::remove", "id", id,
            "an id in the batch");
    entries_.erase(at);
  }

  bool contains(int64_t id) const {
    const auto at = find(id);
    return at != entries_.end() && at->id == id;
  }

  /// The cache of sequence `id`; throws kvpack::error if not held. References stay valid until
  /// the sequence is removed.
  Cache& sequence(int64_t id) { return *entry(id, "KVCacheBatch::sequence").cache; }
  const Cache& sequence(int64_t id) const { return *entry(id, "KVCacheBatch::sequence").cache; }

  /// Ids held, ascending.
  std::vector<int64_t> ids() const {
    std::vector<int64_t> out;
    out.reserve(entries_.size());
    for (const auto& e : entries_) out.push_back(e.id);
    return out;
  }
  std::size_t size() const { return entries_.size(); }

 protected:
  struct Entry {
    int64_t id;
    std::unique_ptr<Cache> cache;
  };

  /// Constructs the prototype from `args` (a Cache's constructor arguments).
  template <class... Args>
  explicit BatchEntries(std::in_place_t, Args&&... args)
      : prototype_(std::forward<Args>(args)...) {}

  /// Throws kvpack::error (from `where`) if `id` is held.
  void require_new(int64_t id, const char* where) const {
    require(!contains(id), where, "id", id, "an id not in the batch");
  }
  /// Inserts `cache` as sequence `id` (not held: require_new first).
  Cache& insert(int64_t id, std::unique_ptr<Cache> cache) {
    return *entries_.insert(find(id), Entry{id, std::move(cache)})->cache;
  }
  const Entry& entry(int64_t id, const char* where) const {
    const auto at = find(id);
    require(at != entries_.end() && at->id == id, where, "sequence", id, "an id in the batch");
    return *at;
  }

  /// The batch's shape and policy and what its sequences share (the CPU's page pool, the CUDA
  /// context); never appended to. Declared before the sequences, so they are destroyed first.
  Cache prototype_;
  std::vector<Entry> entries_;  // ascending id

 private:
  typename std::vector<Entry>::const_iterator find(int64_t id) const {
    return std::lower_bound(entries_.begin(), entries_.end(), id,
                            [](const Entry& e, int64_t v) { return e.id < v; });
  }
  typename std::vector<Entry>::iterator find(int64_t id) {
    return std::lower_bound(entries_.begin(), entries_.end(), id,
                            [](const Entry& e, int64_t v) { return e.id < v; });
  }
};

}  // namespace detail
}  // namespace kvpack
