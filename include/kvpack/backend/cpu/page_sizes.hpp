/// \file backend/cpu/page_sizes.hpp
/// \brief Page sizes of the paged CPU formats (docs/page_formats.md): what one page of dense
/// rows or of KIVI blocks holds, so the container can size a pool without the format's store.
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

}  // namespace detail
}  // namespace kvpack
