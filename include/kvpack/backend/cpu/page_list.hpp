/// \file backend/cpu/page_list.hpp
/// \brief The page table of one (layer, kv head) of a paged format: pool page ids and their
/// addresses, in token order, taken from and returned to a PagePool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "../../config.hpp"
#include "../../detail/vector_bytes.hpp"
#include "../../page_pool.hpp"

namespace kvpack {
namespace detail {

/// Pages of one head: `ids[i]` is the pool's id of page i, `data[i]` its first byte. A copy
/// holds its own pages of the same pool with the same bytes (a fork of the sequence); the
/// destructor returns every page.
struct PageList {
  std::shared_ptr<PagePool> pool;
  std::vector<int32_t> ids;
  std::vector<std::byte*> data;

  PageList() = default;
  PageList(PageList&&) noexcept = default;
  PageList& operator=(PageList&& other) noexcept {
    if (this != &other) {
      release_from(0);
      pool = std::move(other.pool);
      ids = std::move(other.ids);
      data = std::move(other.data);
    }
    return *this;
  }
  PageList(const PageList& other) : pool(other.pool) {
    resize(other.size());
    for (std::size_t i = 0; i < data.size(); ++i) {
      std::memcpy(data[i], other.data[i], pool->page_bytes());
    }
  }
  PageList& operator=(const PageList& other) {
    if (this != &other) {
      PageList copy(other);
      *this = std::move(copy);
    }
    return *this;
  }
  ~PageList() { release_from(0); }

  int64_t size() const { return static_cast<int64_t>(ids.size()); }
  std::size_t page_bytes() const { return pool ? pool->page_bytes() : 0; }

  /// Grows to `pages` pages (never shrinks). Throws kvpack::error when the pool runs out, having
  /// returned the pages this call took: the list is as it was.
  void resize(int64_t pages) {
    if (pages <= size()) return;
    const int64_t had = size();
    // Room first, so no push_back below throws after the pool handed out a page.
    reserve_geometric(static_cast<std::size_t>(pages), ids, data);
    try {
      while (size() < pages) {
        const PagePool::Page page = pool->allocate();
        ids.push_back(page.id);
        data.push_back(page.data);
      }
    } catch (...) {
      release_from(had);
      throw;
    }
  }

  /// Returns pages [first, size()) to the pool.
  void release_from(int64_t first) {
    while (size() > first) {
      pool->release(ids.back());
      ids.pop_back();
      data.pop_back();
    }
  }

  /// Pages held (whole pages) and the table (an id and an address per page).
  std::size_t bytes() const { return data.size() * page_bytes() + held_bytes(ids, data); }
  std::size_t reserved_bytes() const {
    return data.size() * page_bytes() + allocated_bytes(ids, data);
  }
  void shrink_to_fit() { shrink_all(ids, data); }
};

}  // namespace detail
}  // namespace kvpack
