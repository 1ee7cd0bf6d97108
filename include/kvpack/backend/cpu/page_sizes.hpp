/// \file backend/cpu/page_sizes.hpp
/// \brief Page sizes of the paged CPU formats (docs/page_formats.md): what one page of dense
/// rows, of KIVI blocks or of a low-rank basis holds, so the container can size a pool without
/// the format's store.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../../page_pool.hpp"

namespace kvpack {
namespace detail {

/// Bytes of one page of dense rows: keys then values, page_tokens × head_dim elements of T each,
/// rounded up to the pool's 64-byte alignment (docs/page_formats.md, "dense rows").
template <class T>
constexpr std::size_t dense_page_bytes(int page_tokens, int head_dim) {
  const std::size_t raw = 2 * static_cast<std::size_t>(page_tokens) * head_dim * sizeof(T);
  return (raw + PagePool::kAlignment - 1) / PagePool::kAlignment * PagePool::kAlignment;
}

/// Bytes of one KIVI block (QuantBlock<bits, group>): fp16 scale and min, then the codes.
constexpr std::size_t kivi_block_bytes(int bits, int group) {
  return 4 + static_cast<std::size_t>(group) * bits / 8;
}

/// Bytes of one KIVI page of `page_tokens` tokens (a multiple of `group`): the key blocks of its
/// page_tokens / group token groups (head_dim blocks each, one per channel), then the value
/// blocks of its tokens (head_dim / group blocks each); rounded up to the pool's 64-byte
/// alignment (docs/page_formats.md, "KIVI blocks").
constexpr std::size_t kivi_page_bytes(int page_tokens, int head_dim, int bits, int group) {
  const std::size_t block = kivi_block_bytes(bits, group);
  const std::size_t raw = 2 * static_cast<std::size_t>(page_tokens / group) * head_dim * block;
  return (raw + PagePool::kAlignment - 1) / PagePool::kAlignment * PagePool::kAlignment;
}

/// Tokens of a KIVI page for the cache's page_tokens: whole groups, so a page never splits one.
constexpr int kivi_page_tokens(int page_tokens, int group) {
  return page_tokens > group ? page_tokens : group;
}

/// Where something lives in a page list: page index (into the list) and byte offset in it.
struct PageOffset {
  int64_t page;
  std::size_t offset;
};

/// The key blocks of token group g (head_dim blocks, one per channel) in a list of KIVI pages of
/// `page_tokens` tokens: docs/page_formats.md, "KIVI blocks".
constexpr PageOffset kivi_key_group_at(int64_t g, int page_tokens, int group, int head_dim,
                                       int bits) {
  const int64_t per_page = page_tokens / group;
  return {g / per_page,
          static_cast<std::size_t>((g % per_page) * head_dim) * kivi_block_bytes(bits, group)};
}

/// The value blocks of token t (head_dim / group blocks, one per channel group).
constexpr PageOffset kivi_value_token_at(int64_t t, int page_tokens, int group, int head_dim,
                                         int bits) {
  const int64_t blocks =
      static_cast<int64_t>(page_tokens / group) * head_dim + (t % page_tokens) * (head_dim / group);
  return {t / page_tokens, static_cast<std::size_t>(blocks) * kivi_block_bytes(bits, group)};
}

/// Bytes of one page of a low-rank cache: a dense fp16 page of page_tokens tokens (so low-rank
/// and dense caches of the same page_tokens and head_dim share a pool), at least one KIVI block
/// of a quantized basis (bits 0: fp16 bases). docs/page_formats.md, "Low-rank bases in pages".
constexpr std::size_t low_rank_page_bytes(int page_tokens, int head_dim, int bits, int group) {
  const std::size_t dense = dense_page_bytes<uint16_t>(page_tokens, head_dim);
  const std::size_t block = bits == 0 ? 0 : kivi_block_bytes(bits, group);
  const std::size_t min =
      (block + PagePool::kAlignment - 1) / PagePool::kAlignment * PagePool::kAlignment;
  return dense > min ? dense : min;
}

/// A low-rank basis in pages: its KIVI blocks ([row group][column], block b = g · rank + c) run
/// through its first pages, page_bytes / block_bytes whole blocks per page; its fp16 rows
/// (element e = (t − quantized) · rank + column) through the pages after those, page_bytes / 2
/// elements per page. Rows may cross pages; blocks never do.
struct BasisPageLayout {
  std::size_t page_bytes;
  std::size_t block_bytes;  ///< 0 for an fp16 basis
  int64_t blocks;           ///< quantized / group · rank

  constexpr int64_t blocks_per_page() const {
    return block_bytes == 0 ? 0 : static_cast<int64_t>(page_bytes / block_bytes);
  }
  /// Pages holding blocks: those before the fp16 rows.
  constexpr int64_t block_pages() const {
    return blocks == 0 ? 0 : (blocks + blocks_per_page() - 1) / blocks_per_page();
  }
  constexpr int64_t halves_per_page() const { return static_cast<int64_t>(page_bytes / 2); }
  /// Pages of a basis whose fp16 rows hold `halves` elements.
  constexpr int64_t pages(int64_t halves) const {
    return block_pages() + (halves + halves_per_page() - 1) / halves_per_page();
  }
  constexpr PageOffset block_at(int64_t b) const {
    return {b / blocks_per_page(), static_cast<std::size_t>(b % blocks_per_page()) * block_bytes};
  }
  constexpr PageOffset half_at(int64_t e) const {
    return {block_pages() + e / halves_per_page(),
            static_cast<std::size_t>(e % halves_per_page()) * 2};
  }
};

}  // namespace detail
}  // namespace kvpack
