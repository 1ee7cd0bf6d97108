/// \file page_pool.hpp
/// \brief PagePool: fixed-size pages of KV memory shared by the sequences of an engine, either
/// allocated by kvpack (grown a chunk at a time) or carved from memory the caller provides.
/// Page layouts are in docs/page_formats.md.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "config.hpp"
#include "error.hpp"
#include "half.hpp"

namespace kvpack {

/// \brief A pool of fixed-size pages (vLLM's block pool, FlashInfer's paged KV memory).
///
/// Pages are numbered 0, 1, ... (the id an engine's page table holds) and 64-byte aligned.
/// allocate() and release() are O(1) and thread-safe (one mutex): sequences of one pool may be
/// filled from different threads. A released page goes back to the pool and is the next one
/// handed out (LIFO, so recently touched memory is reused first).
///
/// Owned mode (`PagePool(page_bytes, pages_per_chunk, max_pages)`): memory comes from operator
/// new a chunk at a time, chunks doubling from one page up to `pages_per_chunk` (and never past
/// max_pages), so a small pool stays small and a large one holds runs of contiguous pages (pages
/// allocated one by one measured up to 20 % slower decode attention at 32 K tokens: scattered
/// pages); release_unused() returns chunks whose pages are all free. Caller mode (`PagePool(memory,
/// bytes, page_bytes)`): the pages are the caller's region, which must outlive the pool; nothing is
/// allocated for pages and nothing is freed.
class PagePool {
 public:
  /// Alignment of every page (a cache line; also what AVX-512 loads prefer).
  static constexpr std::size_t kAlignment = 64;

  /// A page handed out: its id and its first byte.
  struct Page {
    int32_t id;
    std::byte* data;
  };

  /// Owned pool whose chunks double from one page up to `pages_per_chunk` pages. Throws
  /// kvpack::error when page_bytes is 0 or not a multiple of 64, or pages_per_chunk is 0.
  /// max_pages 0: no limit.
  explicit PagePool(std::size_t page_bytes, std::size_t pages_per_chunk = 64,
                    std::size_t max_pages = 0)
      : page_bytes_(page_bytes), pages_per_chunk_(pages_per_chunk), max_pages_(max_pages) {
    check_page_bytes(page_bytes);
    detail::require(pages_per_chunk > 0, "PagePool", "pages_per_chunk", pages_per_chunk, "> 0");
  }

  /// Pool over caller memory [memory, memory + bytes): floor(bytes / page_bytes) pages. Throws
  /// kvpack::error when memory is null or not 64-byte aligned, page_bytes is not a positive
  /// multiple of 64, or the region holds no page.
  PagePool(void* memory, std::size_t bytes, std::size_t page_bytes)
      : page_bytes_(page_bytes), caller_memory_(true) {
    check_page_bytes(page_bytes);
    detail::require(memory != nullptr && reinterpret_cast<std::uintptr_t>(memory) % kAlignment == 0,
                    "PagePool", "memory", memory, "a non-null, 64-byte aligned region");
    detail::require(bytes / page_bytes > 0 && bytes / page_bytes <= kMaxPages, "PagePool", "bytes",
                    bytes, detail::concat("room for 1 to ", kMaxPages, " pages of ", page_bytes));
    pages_per_chunk_ = max_pages_ = bytes / page_bytes;
    chunks_.push_back(static_cast<std::byte*>(memory));
    chunk_live_.push_back(0);
    chunk_first_.push_back(0);
    chunk_pages_.push_back(max_pages_);
    used_.assign(max_pages_, 0);
    free_.reserve(max_pages_);
    for (std::size_t i = max_pages_; i-- > 0;) free_.push_back(static_cast<int32_t>(i));
  }

  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  ~PagePool() {
    if (caller_memory_) return;
    for (std::byte* c : chunks_) ::operator delete(c, std::align_val_t(kAlignment));
  }

  /// Hands out a free page (contents unspecified). Throws kvpack::error when the pool is at
  /// max_pages (owned) or its region is used up (caller memory); the pool is unchanged then.
  Page allocate() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.empty()) grow();
    const int32_t id = free_.back();
    free_.pop_back();
    ++chunk_live_[chunk_of(id)];
    used_[id] = 1;
    ++in_use_;
    return {id, address(id)};
  }

  /// Returns page `id` to the pool. Throws kvpack::error for an id the pool did not hand out
  /// (or already got back).
  void release(int32_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    detail::require(id >= 0 && static_cast<std::size_t>(id) < used_.size() && used_[id] == 1,
                    "PagePool::release", "page", id, "a page this pool handed out");
    const std::size_t chunk = chunk_of(id);
    free_.push_back(id);  // capacity for every page was reserved when its chunk came
    used_[id] = 0;
    --chunk_live_[chunk];
    --in_use_;
  }

  /// First byte of page `id` (a page handed out by allocate()).
  std::byte* data(int32_t id) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return address(id);
  }

  /// Frees the chunks of an owned pool whose pages are all free; returns the bytes freed.
  std::size_t release_unused() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (caller_memory_) return 0;
    std::size_t freed = 0;
    for (std::size_t c = 0; c < chunks_.size(); ++c) {
      if (chunks_[c] == nullptr || chunk_live_[c] != 0) continue;
      ::operator delete(chunks_[c], std::align_val_t(kAlignment));
      chunks_[c] = nullptr;
      freed += chunk_pages_[c] * page_bytes_;
    }
    if (freed == 0) return 0;
    while (!chunks_.empty() && chunks_.back() == nullptr) {
      chunks_.pop_back();
      chunk_live_.pop_back();
      chunk_first_.pop_back();
      chunk_pages_.pop_back();
    }
    chunks_.shrink_to_fit();
    chunk_live_.shrink_to_fit();
    chunk_first_.shrink_to_fit();
    chunk_pages_.shrink_to_fit();
    used_.resize(table_pages());
    used_.shrink_to_fit();
    // The free list keeps room for every page of the table, so that release() never allocates.
    std::vector<int32_t> kept;
    kept.reserve(used_.size());
    for (int32_t id : free_) {
      if (static_cast<std::size_t>(id) < used_.size() && chunks_[chunk_of(id)] != nullptr) {
        kept.push_back(id);
      }
    }
    free_.swap(kept);
    return freed;
  }

  std::size_t page_bytes() const { return page_bytes_; }
  /// Whether the pages live in caller memory.
  bool caller_memory() const { return caller_memory_; }
  /// Pages handed out and not released.
  std::size_t pages_in_use() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return in_use_;
  }
  /// Pages the pool can hand out without allocating (owned) or at all (caller memory).
  std::size_t free_pages() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return free_.size();
  }
  /// Pages allocate() can still hand out: the free ones (caller memory), or as many as the pool
  /// may grow to (max_pages, else its page-table limit) less those in use (owned).
  std::size_t available_pages() const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (caller_memory_) return free_.size();
    const std::size_t cap = max_pages_ != 0 ? std::min(max_pages_, kMaxPages) : kMaxPages;
    return cap > in_use_ ? cap - in_use_ : 0;
  }
  /// pages_in_use() × page_bytes().
  std::size_t bytes_in_use() const { return pages_in_use() * page_bytes_; }
  /// The page memory the pool manages (owned chunks, or the caller's region in whole pages) plus
  /// its own bookkeeping (chunk table, free list): what it occupies, exactly.
  std::size_t reserved_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::size_t pages = 0;
    for (std::size_t c = 0; c < chunks_.size(); ++c) pages += chunks_[c] ? chunk_pages_[c] : 0;
    return pages * page_bytes_ + chunks_.capacity() * sizeof(std::byte*) +
           (chunk_live_.capacity() + chunk_first_.capacity() + chunk_pages_.capacity()) *
               sizeof(std::size_t) +
           free_.capacity() * sizeof(int32_t) + used_.capacity();
  }

 private:
  static constexpr std::size_t kMaxPages = std::size_t{1} << 31;

  static void check_page_bytes(std::size_t page_bytes) {
    detail::require(page_bytes > 0 && page_bytes % kAlignment == 0, "PagePool", "page_bytes",
                    page_bytes, "a positive multiple of 64");
  }

  // Chunk c holds pages [chunk_first_[c], chunk_first_[c] + chunk_pages_[c]): a slot keeps its
  // ids when its chunk is freed and allocated again.
  std::size_t chunk_of(int32_t id) const {
    const auto at =
        std::upper_bound(chunk_first_.begin(), chunk_first_.end(), static_cast<std::size_t>(id));
    return static_cast<std::size_t>(at - chunk_first_.begin()) - 1;
  }
  std::size_t table_pages() const {
    return chunks_.empty() ? 0 : chunk_first_.back() + chunk_pages_.back();
  }

  std::byte* address(int32_t id) const {
    const std::size_t c = chunk_of(id);
    return chunks_[c] + (static_cast<std::size_t>(id) - chunk_first_[c]) * page_bytes_;
  }

  // Adds one chunk (owned pools): into the first freed slot of the chunk table, else at its end
  // with twice the pages of the chunk before it, at most pages_per_chunk, and no more than
  // max_pages leaves room for.
  void grow() {
    std::size_t slot = 0;
    while (slot < chunks_.size() && chunks_[slot] != nullptr) ++slot;
    std::size_t pages = slot < chunks_.size() ? chunk_pages_[slot]
                        : chunks_.empty()     ? 1
                                              : std::min(2 * chunk_pages_.back(), pages_per_chunk_);
    if (slot == chunks_.size() && max_pages_ != 0 && table_pages() < max_pages_) {
      pages = std::min(pages, max_pages_ - table_pages());
    }
    const std::size_t total = table_pages() + (slot == chunks_.size() ? pages : 0);
    if (caller_memory_ || (max_pages_ != 0 && in_use_ + pages > max_pages_) || total > kMaxPages) {
      throw error(detail::concat("PagePool::allocate: all ", in_use_, " pages of ", page_bytes_,
                                 " bytes are in use",
                                 caller_memory_ ? " (caller memory)" : " (max_pages)",
                                 ", expected a free page: release pages or give the pool more"));
    }
    // Reserve first so that nothing below throws once the chunk is allocated.
    if (slot == chunks_.size()) {
      chunks_.reserve(slot + 1);
      chunk_live_.reserve(slot + 1);
      chunk_first_.reserve(slot + 1);
      chunk_pages_.reserve(slot + 1);
    }
    // Room for every page of the pool in the free list, so that release() never allocates.
    free_.reserve(std::max(total, free_.size() + pages));
    used_.reserve(total);
    auto* chunk =
        static_cast<std::byte*>(::operator new(pages* page_bytes_, std::align_val_t(kAlignment)));
    if (slot == chunks_.size()) {
      chunk_first_.push_back(table_pages());
      chunk_pages_.push_back(pages);
      chunks_.push_back(chunk);
      chunk_live_.push_back(0);
      used_.resize(total, 0);
    } else {
      chunks_[slot] = chunk;
    }
    for (std::size_t i = pages; i-- > 0;) {
      free_.push_back(static_cast<int32_t>(chunk_first_[slot] + i));
    }
  }

  std::size_t page_bytes_ = 0, pages_per_chunk_ = 0, max_pages_ = 0;
  bool caller_memory_ = false;
  std::vector<std::byte*> chunks_;                      // null: a freed chunk slot
  std::vector<std::size_t> chunk_live_;                 // pages in use per chunk
  std::vector<std::size_t> chunk_first_, chunk_pages_;  // first page id and pages per chunk
  std::vector<int32_t> free_;                           // LIFO
  std::vector<uint8_t> used_;                           // per page: handed out
  std::size_t in_use_ = 0;
  mutable std::mutex mutex_;
};

/// \brief How a cache stores dense rows (Identity and the eviction policies) in pages: each
/// (layer, kv head) has its own page list, so heads of different lengths (non-uniform budgets)
/// hold only the pages they fill. KIVI blocks are paged too (pages of max(page_tokens, group)
/// tokens), and so are the token bases of low-rank caches (pages of a dense fp16 page's size).
struct PageOptions {
  /// Tokens per page: a power of two in [1, 4096] (vLLM's default block size is 16).
  int page_tokens = 16;
  /// The pool the pages come from, shared with other caches (sequences); its page_bytes must be
  /// at least KVCache::page_bytes() (dense rows: 2 × page_tokens × head_dim × sizeof(element),
  /// rounded up to 64). Null: the cache makes a private pool (chunks doubling up to 64 pages);
  /// shrink_to_fit() frees its chunks that hold no page in use.
  std::shared_ptr<PagePool> pool;
};

/// \brief Read-only view of the pages of one (layer, kv head) of a dense rows cache
/// (KVCache::pages; docs/page_formats.md, "dense rows"): token t is row t mod page_tokens of page
/// page_ids[t / page_tokens] of the cache's page_pool(), keys first, then values at byte offset
/// page_tokens × head_dim × sizeof(element). Valid until the next call that changes the cache.
struct DenseHeadPages {
  int page_tokens;
  int head_dim;
  int64_t tokens;
  const int32_t* page_ids;   ///< [ceil(tokens / page_tokens)]
  const int32_t* positions;  ///< [tokens], ascending
};

/// \brief Read-only view of one (layer, kv head) of a KIVI cache (KVCache::kivi_pages;
/// docs/page_formats.md, "KIVI blocks"): tokens [0, quantized) as blocks in pages
/// page_ids[t / page_tokens] of the cache's page_pool(), tokens [quantized, tokens) as fp16
/// residual rows. Valid until the next call that changes the cache.
struct KiviHeadPages {
  int page_tokens;  ///< tokens per KIVI page: max(PageOptions::page_tokens, group)
  int head_dim;
  int bits;   ///< 2, 4 or 8
  int group;  ///< tokens per key block, channels per value block
  int64_t tokens;
  int64_t quantized;         ///< tokens held in blocks: a multiple of group
  const int32_t* page_ids;   ///< [ceil(quantized / page_tokens)]
  const Half* residual_k;    ///< [tokens − quantized][head_dim]
  const Half* residual_v;    ///< [tokens − quantized][head_dim]
  const int32_t* positions;  ///< [tokens], ascending
};

}  // namespace kvpack
