/// \file backend/cpu/quantized_head_store.hpp
/// \brief CPU head store of the Quantize policy: KIVI blocks for old tokens, an fp16 tail for
/// the newest ones. Same interface as HeadStore, so the container and eviction reuse it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../../config.hpp"
#include "../../detail/convert.hpp"
#include "../../detail/vector_bytes.hpp"
#include "../../half.hpp"
#include "../../quant/quant_block.hpp"
#include "quantize.hpp"

namespace kvpack {
namespace detail {

/// Tokens [0, quantized) live in blocks, tokens [quantized, size) in the fp16 tail.
/// Key blocks: one per channel per group of `group` tokens, ordered [token group][channel].
/// Value blocks: one per group of `group` channels per token, ordered [token][channel group].
struct QuantizedHeadStore {
  int bits = 4;
  int group = 32;
  std::vector<uint8_t> key_blocks, value_blocks;
  std::vector<Half> tail_k, tail_v;
  std::vector<int32_t> positions;
  std::vector<float> scores;
  int64_t quantized = 0;
  static constexpr float kUnscored = -1.0f;

  std::size_t block_bytes() const { return 4 + static_cast<std::size_t>(group) * bits / 8; }
  int64_t size() const { return static_cast<int64_t>(positions.size()); }

  /// Bytes held once for several heads (none for KIVI rows).
  static std::size_t shared_bytes(const std::vector<QuantizedHeadStore>&) { return 0; }
  static std::size_t shared_reserved_bytes(const std::vector<QuantizedHeadStore>&) { return 0; }

  /// Bytes held: blocks, the fp16 tail, positions and scores.
  std::size_t bytes() const {
    return held_bytes(key_blocks, value_blocks, tail_k, tail_v, positions, scores);
  }
  /// Heap allocated for them, growth slack included.
  std::size_t reserved_bytes() const {
    return allocated_bytes(key_blocks, value_blocks, tail_k, tail_v, positions, scores);
  }
  /// Releases the growth slack.
  void shrink_to_fit() { shrink_all(key_blocks, value_blocks, tail_k, tail_v, positions, scores); }

  void append(const float* k_rows, const float* v_rows, Positions pos, int64_t n, int head_dim) {
    append_rows(tail_k, tail_v, positions, k_rows, v_rows, pos, n, head_dim);
    if (!scores.empty()) scores.resize(positions.size(), kUnscored);
  }

  /// Tile loader: decodes blocks (whole groups at a time when aligned) and reads the tail.
  struct Rows {
    const QuantizedHeadStore* store;
    const int32_t* positions;
    int64_t size;
    int head_dim;

    void load_keys(int64_t begin, int64_t n, float* out) const { load(begin, n, out, true); }
    void load_values(int64_t begin, int64_t n, float* out) const { load(begin, n, out, false); }

   private:
    void load(int64_t begin, int64_t n, float* out, bool keys) const {
      const QuantizedHeadStore& s = *store;
      const int d = head_dim;
      const int64_t end = begin + n;
      const int64_t qend = end < s.quantized ? end : s.quantized;
      if (begin < qend) {
        dispatch_quant(s.bits, s.group, [&](auto b, auto g) {
          constexpr int B = decltype(b)::value, G = decltype(g)::value;
          using Block = QuantBlock<B, G>;
          const auto* kb = reinterpret_cast<const Block*>(s.key_blocks.data());
          const auto* vb = reinterpret_cast<const Block*>(s.value_blocks.data());
          if (keys) {
            dequantize_channel_rows_ref(kb, d, begin, qend, out);
            return;
          }
          for (int64_t t = begin; t < qend; ++t) {
            float* row = out + (t - begin) * d;
            for (int c = 0; c < d / G; ++c)
              dequantize_block_ref(vb[t * (d / G) + c], row + c * G, 1);
          }
        });
      }
      const std::vector<Half>& tail = keys ? s.tail_k : s.tail_v;
      for (int64_t t = begin > s.quantized ? begin : s.quantized; t < end; ++t) {
        load_row(tail.data() + (t - s.quantized) * d, out + (t - begin) * d, d);
      }
    }
  };

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
  /// Appends (zeroed) blocks for `count` more tokens.
  void reserve_blocks(int64_t count, int head_dim) {
    const std::size_t bb = block_bytes();
    key_blocks.resize(key_blocks.size() + (count / group) * head_dim * bb);
    value_blocks.resize(value_blocks.size() + count * (head_dim / group) * bb);
  }
  /// Quantizes tail groups [g0, g1) (group g holds tail tokens [g · group, (g + 1) · group))
  /// into the reserved blocks. The group's fp16 rows are widened into a small fp32 buffer (no
  /// copy of the whole tail), then quantized by the CPU kernels (bit for bit the reference).
  void quantize_groups(int64_t g0, int64_t g1, int head_dim) {
    const int d = head_dim;
    dispatch_quant(bits, group, [&](auto b, auto g) {
      constexpr int B = decltype(b)::value, G = decltype(g)::value;
      using Block = QuantBlock<B, G>;
      auto* kb = reinterpret_cast<Block*>(key_blocks.data()) + (quantized / G) * d;
      auto* vb = reinterpret_cast<Block*>(value_blocks.data()) + quantized * (d / G);
      std::vector<float> k(static_cast<std::size_t>(G) * d), v(static_cast<std::size_t>(G) * d);
      for (int64_t grp = g0; grp < g1; ++grp) {
        load_row(tail_k.data() + grp * G * d, k.data(), G * d);
        load_row(tail_v.data() + grp * G * d, v.data(), G * d);
        cpu::quantize_key_group<B, G>(k.data(), d, kb + grp * d);
        cpu::quantize_value_rows<B, G>(v.data(), G, d, vb + grp * G * (d / G));
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
    const std::size_t bb = block_bytes();
    if (kept < quantized) {
      quantized = kept / group * group;
      key_blocks.resize(static_cast<std::size_t>(quantized / group) * head_dim * bb);
      value_blocks.resize(static_cast<std::size_t>(quantized) * (head_dim / group) * bb);
      key_blocks.shrink_to_fit();
      value_blocks.shrink_to_fit();
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
    std::vector<uint8_t>().swap(key_blocks);
    std::vector<uint8_t>().swap(value_blocks);
    std::vector<Half>().swap(tail_k);
    std::vector<Half>().swap(tail_v);
    std::vector<int32_t>().swap(positions);
    std::vector<float>().swap(scores);
    quantized = 0;
  }
};

}  // namespace detail
}  // namespace kvpack
