/// \file backend/cpu/quantized_head_store.hpp
/// \brief CPU head store of the Quantize policy: KIVI blocks for old tokens in pages of a
/// PagePool, an fp16 tail for the newest ones. Same interface as HeadStore, so the container and
/// eviction reuse it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../../config.hpp"
#include "../../detail/convert.hpp"
#include "../../detail/vector_bytes.hpp"
#include "../../half.hpp"
#include "../../page_pool.hpp"
#include "../../quant/quant_block.hpp"
#include "page_list.hpp"
#include "page_sizes.hpp"
#include "quantize.hpp"

namespace kvpack {
namespace detail {

/// Tile loader of a KIVI head: decodes blocks (whole groups at a time when aligned) and reads the
/// fp16 residual. Store: QuantizedHeadStore, or a view of caller-owned pages (KiviPageView) -
/// bits, group, quantized, key_group(g), value_token(t), tail_keys(), tail_values().
template <class Store>
struct KiviRows {
  const Store* store;
  const int32_t* positions;
  int64_t size;
  int head_dim;

  void load_keys(int64_t begin, int64_t n, float* out) const { load(begin, n, out, true); }
  void load_values(int64_t begin, int64_t n, float* out) const { load(begin, n, out, false); }

 private:
  void load(int64_t begin, int64_t n, float* out, bool keys) const {
    const Store& s = *store;
    const int d = head_dim;
    const int64_t end = begin + n;
    const int64_t qend = end < s.quantized ? end : s.quantized;
    if (begin < qend) {
      dispatch_quant(s.bits, s.group, [&](auto b, auto g) {
        constexpr int B = decltype(b)::value, G = decltype(g)::value;
        using Block = QuantBlock<B, G>;
        if (keys) {
          for (int64_t t = begin; t < qend;) {  // group by group: pages hold whole groups
            const int64_t g = t / G, stop = std::min(qend, (g + 1) * G);
            const auto* kb = reinterpret_cast<const Block*>(s.key_group(g));
            dequantize_channel_rows_ref(kb, d, t - g * G, stop - g * G, out + (t - begin) * d);
            t = stop;
          }
          return;
        }
        for (int64_t t = begin; t < qend; ++t) {
          float* row = out + (t - begin) * d;
          const auto* vb = reinterpret_cast<const Block*>(s.value_token(t));
          for (int c = 0; c < d / G; ++c) dequantize_block_ref(vb[c], row + c * G, 1);
        }
      });
    }
    const Half* tail = keys ? s.tail_keys() : s.tail_values();
    for (int64_t t = begin > s.quantized ? begin : s.quantized; t < end; ++t) {
      load_row(tail + (t - s.quantized) * d, out + (t - begin) * d, d);
    }
  }
};

}  // namespace detail

namespace cpu {
template <class Rows>
struct RowsAttention;
/// attend_rows() over KIVI rows: defined with its kernels in quantized_attention.hpp, declared
/// here with the format so that a translation unit without those kernels cannot attend KIVI rows
/// through the generic path (an incomplete type, a compile error) and differ from one with them.
template <class Store>
struct RowsAttention<detail::KiviRows<Store>>;
}  // namespace cpu

namespace detail {

/// Tokens [0, quantized) live in blocks, tokens [quantized, size) in the fp16 tail.
/// Blocks sit in pages of `page_tokens` tokens (see kivi_page_bytes): key blocks one per channel
/// per group of `group` tokens, ordered [group][channel]; value blocks one per group of `group`
/// channels per token, ordered [token][channel group]. The tail (at most residual + group
/// tokens) is per-head vectors.
struct QuantizedHeadStore {
  int bits = 4;
  int group = 32;
  bool int8_query = false;  ///< Quantize::int8_query: how decode attention scores the keys
  int page_tokens = 32;     ///< a multiple of group (kivi_page_tokens)
  int head_dim = 0;
  PageList pages;  ///< the pool is set by the cache before the first quantize
  std::vector<Half> tail_k, tail_v;
  std::vector<int32_t> positions;
  std::vector<float> scores;
  int64_t quantized = 0;
  static constexpr float kUnscored = -1.0f;

  /// Pages from `pool` for the cache's page_tokens (kivi_page_tokens); bits and group set first.
  void set_pages(std::shared_ptr<PagePool> pool, int cache_page_tokens, int d) {
    pages.pool = std::move(pool);
    page_tokens = kivi_page_tokens(cache_page_tokens, group);
    head_dim = d;
  }

  std::size_t block_bytes() const { return kivi_block_bytes(bits, group); }
  int64_t size() const { return static_cast<int64_t>(positions.size()); }

  /// Key blocks of quantized token group g: head_dim blocks, one per channel.
  const uint8_t* key_group(int64_t g) const {
    const PageOffset at = kivi_key_group_at(g, page_tokens, group, head_dim, bits);
    return page(at.page) + at.offset;
  }
  /// Value blocks of quantized token t: head_dim / group blocks, one per channel group.
  const uint8_t* value_token(int64_t t) const {
    const PageOffset at = kivi_value_token_at(t, page_tokens, group, head_dim, bits);
    return page(at.page) + at.offset;
  }
  /// The fp16 residual: [size() − quantized][head_dim] keys, then values.
  const Half* tail_keys() const { return tail_k.data(); }
  const Half* tail_values() const { return tail_v.data(); }

  /// Bytes held once for several heads (none for KIVI rows).
  static std::size_t shared_bytes(const std::vector<QuantizedHeadStore>&) { return 0; }
  static std::size_t shared_reserved_bytes(const std::vector<QuantizedHeadStore>&) { return 0; }

  /// Bytes held: whole pages and the page table, the fp16 tail, positions and scores.
  std::size_t bytes() const {
    return pages.bytes() + held_bytes(tail_k, tail_v, positions, scores);
  }
  /// Heap allocated for them, growth slack included.
  std::size_t reserved_bytes() const {
    return pages.reserved_bytes() + allocated_bytes(tail_k, tail_v, positions, scores);
  }
  /// Releases the growth slack.
  void shrink_to_fit() {
    pages.shrink_to_fit();
    shrink_all(tail_k, tail_v, positions, scores);
  }

  void append(const float* k_rows, const float* v_rows, Positions pos, int64_t n, int head_dim) {
    append_rows(tail_k, tail_v, positions, k_rows, v_rows, pos, n, head_dim);
    if (!scores.empty()) scores.resize(positions.size(), kUnscored);
  }

  using Rows = KiviRows<QuantizedHeadStore>;
  Rows rows(int head_dim) const { return {this, positions.data(), size(), head_dim}; }

  /// Quantizes whole groups of the tail, leaving at least `residual` newest tokens in fp16.
  void quantize(int64_t residual, int head_dim) {
    const int64_t count = quantizable(residual);
    if (count == 0) return;
    reserve_blocks(count, head_dim);
    quantize_groups(0, count / group, head_dim);
    commit_quantized(count, head_dim);
  }

  // quantize() in three steps, so a caller can spread step 2 over threads (groups are
  // independent): how many tail tokens to quantize, room for their blocks, the groups, and
  // dropping them from the tail.

  /// Tail tokens quantize(residual) turns into blocks: whole groups, ≥ residual left in fp16.
  int64_t quantizable(int64_t residual) const {
    const int64_t tail = size() - quantized;
    return tail > residual ? (tail - residual) / group * group : 0;
  }
  /// Pages the head holds after keep() of `kept` tokens (kept < 0: no keep()) and then
  /// quantize(residual): keep() hands back every page and returns the kept rows to the tail.
  int64_t pages_after(int64_t kept, int64_t residual) const {
    const int64_t q = kept < 0          ? quantized + quantizable(residual)
                      : kept > residual ? (kept - residual) / group * group
                                        : 0;
    return pages_for(q);
  }
  /// Takes the pages `count` more quantized tokens need. Throws kvpack::error, having taken
  /// none, when the pool has no page left.
  void reserve_blocks(int64_t count, int) { pages.resize(pages_for(quantized + count)); }
  /// Returns the pages past the quantized tokens (after a reserve_blocks() not carried out).
  void release_reserve() { pages.release_from(pages_for(quantized)); }
  /// Quantizes tail groups [g0, g1) (group g holds tail tokens [g · group, (g + 1) · group))
  /// into the reserved blocks: the CPU kernels read the fp16 rows in place (bit for bit the
  /// reference of the rows widened to fp32; widening them into a buffer first was a third of
  /// the work).
  void quantize_groups(int64_t g0, int64_t g1, int head_dim) {
    const int d = head_dim;
    dispatch_quant(bits, group, [&](auto b, auto g) {
      constexpr int B = decltype(b)::value, G = decltype(g)::value;
      using Block = QuantBlock<B, G>;
      for (int64_t grp = g0; grp < g1; ++grp) {
        const int64_t first = quantized + grp * G;  // the group's first token
        const Half* k = tail_k.data() + grp * G * d;
        const Half* v = tail_v.data() + grp * G * d;
        // A group's value blocks are contiguous: its tokens share a page.
        cpu::quantize_key_group<B, G>(k, d, mutable_blocks<Block>(key_group(first / G)));
        cpu::quantize_value_rows<B, G>(v, G, d, mutable_blocks<Block>(value_token(first)));
      }
    });
  }
  /// Drops the first `count` tail tokens, now held by blocks.
  void commit_quantized(int64_t count, int head_dim) {
    tail_k.erase(tail_k.begin(), tail_k.begin() + count * head_dim);
    tail_v.erase(tail_v.begin(), tail_v.begin() + count * head_dim);
    tail_k.shrink_to_fit();
    tail_v.shrink_to_fit();
    quantized += count;
  }

  /// Keeps rows `kept` (ascending). Kept rows return to the fp16 tail (decoded), to be
  /// re-quantized by the next quantize(): eviction after quantization rounds twice, so
  /// compositions evict before they quantize.
  void keep(const std::vector<int64_t>& kept, int head_dim) {
    const int d = head_dim;
    const Rows r = rows(d);
    std::vector<float> k(kept.size() * d), v(kept.size() * d);
    std::vector<int32_t> np(kept.size());
    for (std::size_t j = 0; j < kept.size(); ++j) {
      r.load_keys(kept[j], 1, k.data() + j * d);
      r.load_values(kept[j], 1, v.data() + j * d);
      np[j] = positions[kept[j]];
    }
    std::vector<float> ns;
    if (!scores.empty()) {
      for (int64_t i : kept) ns.push_back(scores[i]);
    }
    clear();
    tail_k.resize(kept.size() * d);
    tail_v.resize(kept.size() * d);
    store_row(k.data(), tail_k.data(), static_cast<int64_t>(k.size()));
    store_row(v.data(), tail_v.data(), static_cast<int64_t>(v.size()));
    positions.swap(np);
    scores.swap(ns);
  }

  /// Tokens a rollback of `count` would leave inside a quantized group, or 0 when it drops
  /// whole groups or tail rows only. A group's key blocks span all its tokens: cutting one would
  /// re-quantize (changing what is kept) or widen it to fp16 (growing the cache), so truncate
  /// refuses such a cut instead.
  int64_t drop_back_split(int64_t count) const {
    const int64_t kept = size() - count;
    return kept < quantized ? kept % group : 0;
  }

  /// Drops the last `count` tokens: tail rows, then whole groups of blocks (see
  /// drop_back_split: a cut inside a group is the caller's to refuse). What stays is untouched.
  void drop_back(int64_t count, int head_dim) {
    const int64_t kept = size() - count;
    if (kept < quantized) {
      quantized = kept / group * group;
      pages.release_from(pages_for(quantized));
      pages.shrink_to_fit();
    }
    const std::size_t n = static_cast<std::size_t>(kept - quantized) * head_dim;
    tail_k.resize(n);
    tail_v.resize(n);
    tail_k.shrink_to_fit();
    tail_v.shrink_to_fit();
    positions.resize(kept);
    if (static_cast<int64_t>(scores.size()) > kept) scores.resize(kept);
  }

  void clear() {
    pages.release_from(0);
    pages.shrink_to_fit();
    std::vector<Half>().swap(tail_k);
    std::vector<Half>().swap(tail_v);
    std::vector<int32_t>().swap(positions);
    std::vector<float>().swap(scores);
    quantized = 0;
  }

  /// The blocks of `quantized` tokens (quantized a multiple of group) from the file order of
  /// write_store: key blocks [group][channel], then value blocks [token][channel group]. Throws
  /// kvpack::error, nothing changed, when the pool has no page left.
  void assign_blocks(int64_t tokens, const std::vector<uint8_t>& key_blocks,
                     const std::vector<uint8_t>& value_blocks) {
    PageList fresh;
    fresh.pool = pages.pool;
    fresh.resize(pages_for(tokens));
    pages = std::move(fresh);
    quantized = tokens;
    const std::size_t kg = static_cast<std::size_t>(head_dim) * block_bytes();
    const std::size_t vt = static_cast<std::size_t>(head_dim / group) * block_bytes();
    for (int64_t g = 0; g < tokens / group; ++g) {
      std::memcpy(mutable_blocks<uint8_t>(key_group(g)), key_blocks.data() + g * kg, kg);
    }
    for (int64_t t = 0; t < tokens; ++t) {
      std::memcpy(mutable_blocks<uint8_t>(value_token(t)), value_blocks.data() + t * vt, vt);
    }
  }
  /// The blocks in the file order of assign_blocks.
  void gather_blocks(std::vector<uint8_t>& key_blocks, std::vector<uint8_t>& value_blocks) const {
    const std::size_t kg = static_cast<std::size_t>(head_dim) * block_bytes();
    const std::size_t vt = static_cast<std::size_t>(head_dim / group) * block_bytes();
    key_blocks.resize(static_cast<std::size_t>(quantized / group) * kg);
    value_blocks.resize(static_cast<std::size_t>(quantized) * vt);
    for (int64_t g = 0; g < quantized / group; ++g) {
      std::memcpy(key_blocks.data() + g * kg, key_group(g), kg);
    }
    for (int64_t t = 0; t < quantized; ++t) {
      std::memcpy(value_blocks.data() + t * vt, value_token(t), vt);
    }
  }

 private:
  const uint8_t* page(int64_t i) const { return reinterpret_cast<const uint8_t*>(pages.data[i]); }
  int64_t pages_for(int64_t tokens) const { return (tokens + page_tokens - 1) / page_tokens; }
  /// Blocks of a page this store holds (the const accessors above give their address).
  template <class Block>
  Block* mutable_blocks(const uint8_t* p) {
    return reinterpret_cast<Block*>(const_cast<uint8_t*>(p));
  }
};

}  // namespace detail
}  // namespace kvpack
