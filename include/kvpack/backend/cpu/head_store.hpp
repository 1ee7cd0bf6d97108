/// \file backend/cpu/head_store.hpp
/// \brief Paged storage of one (layer, kv-head): its kept K/V rows in pages of a PagePool, their
/// positions, and the page table.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "../../config.hpp"
#include "../../detail/convert.hpp"
#include "../../detail/vector_bytes.hpp"
#include "../../page_pool.hpp"
#include "attention.hpp"
#include "page_sizes.hpp"
#include "store_for.hpp"

namespace kvpack {
namespace detail {

/// Rows are stored token-major in pages of 2^page_shift tokens (element type T): page i holds
/// tokens [i · page_tokens, (i + 1) · page_tokens), its keys (page_tokens × head_dim) then its
/// values; positions ascending. Pages come from `pool` and go back to it when rows are evicted,
/// rolled back or cleared, so another sequence of the same pool reuses them.
///
/// Every CPU head store (this dense one, QuantizedHeadStore, ...) offers the same members:
/// size(), positions, scores, append(), rows(), keep(), drop_back(), clear(), bytes(). The
/// container only talks to that interface.
template <class T>
struct HeadStore {
  std::shared_ptr<PagePool> pool;  ///< set by the cache before the first append
  int page_shift = 4;
  int head_dim = 0;
  std::vector<int32_t> page_ids;  ///< the page table: pool page id of each page, in token order
  std::vector<T*> pages;          ///< first element of each page (keys; values follow)
  std::vector<const T*> v_pages;  ///< first value element of each page
  std::vector<int32_t> positions;
  /// Per-token scores of policies that score with observed queries (empty otherwise);
  /// kUnscored marks tokens no query has seen yet.
  std::vector<float> scores;
  static constexpr float kUnscored = -1.0f;

  HeadStore() = default;
  HeadStore(HeadStore&&) noexcept = default;
  HeadStore& operator=(HeadStore&& other) noexcept {
    if (this != &other) {
      clear();
      pool = std::move(other.pool);
      page_shift = other.page_shift;
      head_dim = other.head_dim;
      page_ids = std::move(other.page_ids);
      pages = std::move(other.pages);
      v_pages = std::move(other.v_pages);
      positions = std::move(other.positions);
      scores = std::move(other.scores);
    }
    return *this;
  }
  /// A copy holds its own pages of the same pool (a fork of the sequence).
  HeadStore(const HeadStore& other)
      : pool(other.pool), page_shift(other.page_shift), head_dim(other.head_dim) {
    copy_from(other);
  }
  HeadStore& operator=(const HeadStore& other) {
    if (this != &other) {
      HeadStore copy(other);
      *this = std::move(copy);
    }
    return *this;
  }
  ~HeadStore() { release_pages(0); }

  /// Pages of `page_tokens` rows (a power of two) from `page_pool`, set before the first append.
  void set_pages(std::shared_ptr<PagePool> page_pool, int page_tokens, int d) {
    pool = std::move(page_pool);
    page_shift = 0;
    while ((1 << page_shift) < page_tokens) ++page_shift;
    head_dim = d;
  }

  int64_t size() const { return static_cast<int64_t>(positions.size()); }
  int64_t page_tokens() const { return int64_t{1} << page_shift; }
  /// Elements from a page's first key to its first value.
  std::size_t value_offset() const { return static_cast<std::size_t>(page_tokens()) * head_dim; }

  /// Bytes held once for several heads (none for rows): see LowRankHeadStore::shared_bytes.
  static std::size_t shared_bytes(const std::vector<HeadStore>&) { return 0; }
  static std::size_t shared_reserved_bytes(const std::vector<HeadStore>&) { return 0; }

  /// Takes the pages `tokens` rows need from the pool. Throws kvpack::error, having taken
  /// none, when the pool has no page left. KVCache::append reserves every head before it writes
  /// any, so an append the pool cannot hold changes nothing.
  void reserve(int64_t tokens) { reserve_pages(tokens); }
  /// Returns the pages past the held rows (after a reserve() whose append did not happen).
  void release_reserve() { release_pages(pages_for(size())); }

  /// Appends n fp32 rows of keys and values (n × head_dim each) at `pos`. Throws kvpack::error
  /// (nothing appended) when the pool has no page left.
  void append(const float* k_rows, const float* v_rows, Positions pos, int64_t n, int d) {
    append_strided(k_rows, d, v_rows, d, pos, n, d);
  }

  /// append() of rows k + t · k_stride, v + t · v_stride (t < n; strides in floats): an NHD
  /// activation's rows of one head, converted straight into the pages without a staging copy.
  void append_strided(const float* k, int64_t k_stride, const float* v, int64_t v_stride,
                      Positions pos, int64_t n, int d) {
    reserve_pages(size() + n);  // the only step that can fail
    write_rows(k, k_stride, v, v_stride, n, d, std::numeric_limits<float>::infinity());
    commit_rows(pos, n);
  }

  /// Pages reserve(size() + n) would take from the pool.
  int64_t pages_to_reserve(int64_t n) const {
    return std::max<int64_t>(0, pages_for(size() + n) - static_cast<int64_t>(pages.size()));
  }
  /// Whether the page table holds those pages without growing (reserved_bytes() unchanged).
  bool page_table_has_room(int64_t n) const {
    return pages_to_reserve(n) <= static_cast<int64_t>(page_ids.capacity() - page_ids.size()) &&
           pages_to_reserve(n) <= static_cast<int64_t>(pages.capacity() - pages.size()) &&
           pages_to_reserve(n) <= static_cast<int64_t>(v_pages.capacity() - v_pages.size());
  }

  /// Writes the rows of append_strided() after the held ones, into pages reserve() took, without
  /// holding them (commit_rows() does). Returns false when an element is not finite or |x| >
  /// `limit`: the check rides on the conversion, so the input is read once; what was written
  /// past size() is then discarded (release_reserve()) and nothing held changed.
  bool write_rows(const float* k, int64_t k_stride, const float* v, int64_t v_stride, int64_t n,
                  int d, float limit) {
    const int64_t old = size();
    const bool packed = k_stride == d && v_stride == d;
    bool ok = true;
    for (int64_t t = old; t < old + n && ok;) {
      // Rows up to the end of t's page are contiguous in the page.
      const int64_t m = std::min(page_tokens() - (t & (page_tokens() - 1)), old + n - t);
      if (packed) {
        const bool k_ok = store_row_checked(k + (t - old) * d, key_row(t), m * d, limit);
        ok = store_row_checked(v + (t - old) * d, value_row(t), m * d, limit) && k_ok;
      } else {
        for (int64_t i = t; i < t + m; ++i) {
          const bool k_ok = store_row_checked(k + (i - old) * k_stride, key_row(i), d, limit);
          ok = store_row_checked(v + (i - old) * v_stride, value_row(i), d, limit) && k_ok && ok;
        }
      }
      t += m;
    }
    return ok;
  }

  /// Holds the n rows write_rows() wrote, at positions pos[0, n).
  void commit_rows(Positions pos, int64_t n) {
    reserve_geometric(static_cast<std::size_t>(size() + n), positions);
    for (int64_t t = 0; t < n; ++t) positions.push_back(static_cast<int32_t>(pos[t]));
    if (!scores.empty()) scores.resize(positions.size(), kUnscored);
  }

  /// Replaces the contents with n stored rows (k and v: n × head_dim elements of T, as
  /// gather_rows() gives them), their positions and scores (loading a saved cache). Throws
  /// kvpack::error, nothing changed, when the pool has no page left.
  void assign_rows(const std::vector<T>& k, const std::vector<T>& v, std::vector<int32_t> pos,
                   std::vector<float> token_scores) {
    const int64_t n = static_cast<int64_t>(pos.size());
    HeadStore fresh;
    fresh.pool = pool;
    fresh.page_shift = page_shift;
    fresh.head_dim = head_dim;
    fresh.reserve_pages(n);
    for (int64_t t = 0; t < n; ++t) {
      std::memcpy(fresh.key_row(t), k.data() + t * head_dim, sizeof(T) * head_dim);
      std::memcpy(fresh.value_row(t), v.data() + t * head_dim, sizeof(T) * head_dim);
    }
    fresh.positions = std::move(pos);
    fresh.scores = std::move(token_scores);
    *this = std::move(fresh);
  }

  /// The stored keys and values, n × head_dim each, token-major (what save() writes).
  void gather_rows(std::vector<T>& k, std::vector<T>& v) const {
    k.resize(static_cast<std::size_t>(size()) * head_dim);
    v.resize(k.size());
    for (int64_t t = 0; t < size(); ++t) {
      const T* kr = pages[t >> page_shift] + (t & (page_tokens() - 1)) * head_dim;
      std::memcpy(k.data() + t * head_dim, kr, sizeof(T) * head_dim);
      std::memcpy(v.data() + t * head_dim, kr + value_offset(), sizeof(T) * head_dim);
    }
  }

  T* key_row(int64_t t) { return pages[t >> page_shift] + (t & (page_tokens() - 1)) * head_dim; }
  T* value_row(int64_t t) { return key_row(t) + value_offset(); }

  /// Tile loader over the held rows (see cpu::PagedRows).
  cpu::PagedRows<T> rows(int d) const {
    return {pages.data(), v_pages.data(), page_shift, d, positions.data(), size(), d};
  }

  /// Bytes held: whole pages (the last one's unused rows included), the page table (ids and
  /// addresses), one position per token, and scores when a policy keeps them.
  std::size_t bytes() const {
    return pages.size() * page_bytes() + held_bytes(page_ids, pages, v_pages, positions, scores);
  }
  /// The same with each vector's allocated capacity (growth slack included).
  std::size_t reserved_bytes() const {
    return pages.size() * page_bytes() +
           allocated_bytes(page_ids, pages, v_pages, positions, scores);
  }
  /// Releases the growth slack of the vectors (pages are never partly held).
  void shrink_to_fit() { shrink_all(page_ids, pages, v_pages, positions, scores); }

  /// Keeps rows `kept` (ascending indices) and returns the pages no longer needed to the pool.
  /// Rows are moved forward in place (kept[j] >= j), so no second copy of the head is made; the
  /// vectors are reallocated at exact size, so bytes() and the allocator agree.
  void keep(const std::vector<int64_t>& kept, int d) {
    for (std::size_t j = 0; j < kept.size(); ++j) {
      const int64_t src = kept[j], dst = static_cast<int64_t>(j);
      if (src != dst) {
        std::memcpy(key_row(dst), key_row(src), sizeof(T) * d);
        std::memcpy(value_row(dst), value_row(src), sizeof(T) * d);
      }
      positions[j] = positions[src];
      if (!scores.empty()) scores[j] = scores[src];
    }
    positions.resize(kept.size());
    if (!scores.empty()) scores.resize(kept.size());
    release_pages(pages_for(size()));
    shrink_to_fit();
  }

  /// Rows: any rollback is clean (see QuantizedHeadStore::drop_back_split).
  int64_t drop_back_split(int64_t) const { return 0; }

  /// Drops the last `count` rows (used to roll back tokens that were never part of the
  /// sequence, such as a scoring pass's repeat prompt).
  void drop_back(int64_t count, int) {
    const std::size_t n = static_cast<std::size_t>(size() - count);
    positions.resize(n);
    if (scores.size() > n) scores.resize(n);
    release_pages(pages_for(static_cast<int64_t>(n)));
    shrink_to_fit();
  }

  void clear() {
    release_pages(0);
    std::vector<int32_t>().swap(page_ids);
    std::vector<T*>().swap(pages);
    std::vector<const T*>().swap(v_pages);
    std::vector<int32_t>().swap(positions);
    std::vector<float>().swap(scores);
  }

 private:
  std::size_t page_bytes() const { return pool ? pool->page_bytes() : 0; }
  int64_t pages_for(int64_t tokens) const { return (tokens + page_tokens() - 1) >> page_shift; }

  /// Pages for `tokens` rows; on failure the pages taken here go back and the error propagates.
  void reserve_pages(int64_t tokens) {
    const int64_t want = pages_for(tokens);
    if (want <= static_cast<int64_t>(pages.size())) return;
    const std::size_t had = pages.size();
    // Room first, so no push_back below throws after the pool handed out a page.
    reserve_geometric(static_cast<std::size_t>(want), page_ids, pages, v_pages);
    try {
      while (static_cast<int64_t>(pages.size()) < want) {
        const PagePool::Page page = pool->allocate();
        page_ids.push_back(page.id);
        pages.push_back(reinterpret_cast<T*>(page.data));
        v_pages.push_back(pages.back() + value_offset());
      }
    } catch (...) {
      release_pages(static_cast<int64_t>(had));
      throw;
    }
  }

  /// Returns pages [first, end) to the pool.
  void release_pages(int64_t first) {
    while (static_cast<int64_t>(pages.size()) > first) {
      pool->release(page_ids.back());
      page_ids.pop_back();
      pages.pop_back();
      v_pages.pop_back();
    }
  }

  void copy_from(const HeadStore& other) {
    reserve_pages(other.size());
    const std::size_t page_elems = 2 * value_offset();
    for (std::size_t i = 0; i < pages.size(); ++i) {
      std::memcpy(pages[i], other.pages[i], sizeof(T) * page_elems);
    }
    positions = other.positions;
    scores = other.scores;
  }
};

/// Dense rows (no Quantize stage).
template <class T>
struct CpuStore<StorageFormat::kRows, false, T> {
  using type = HeadStore<T>;
};

}  // namespace detail
}  // namespace kvpack
