/// \file backend/cpu/quantized_store_io.hpp
/// \brief The saved form of a KIVI head store (see store_io.hpp): u64 tokens, u64 quantized
/// tokens, key blocks, value blocks, the fp16 tail K and V, positions, scores.
#pragma once

#include <cstdint>
#include <vector>

#include "quantized_head_store.hpp"
#include "store_io.hpp"

namespace kvpack {
namespace detail {

inline void write_store(CheckedFileWriter& w, const QuantizedHeadStore& s) {
  w.put_u64(static_cast<uint64_t>(s.size()));
  w.put_u64(static_cast<uint64_t>(s.quantized));
  std::vector<uint8_t> key_blocks, value_blocks;  // file order: not the page order
  s.gather_blocks(key_blocks, value_blocks);
  w.put_vector(key_blocks);
  w.put_vector(value_blocks);
  write_rows(w, s.tail_k, s.tail_v, s.positions, s.scores);
}

/// `s` must carry the cache's bits and group already (the constructor sets them).
inline void read_store(CheckedFileReader& r, QuantizedHeadStore& s, const StoreLimits& lim) {
  const uint64_t n = r.get_u64(), quantized = r.get_u64();
  const int d = lim.head_dim;
  if (quantized > n || quantized % s.group != 0) {
    bad_store(lim, concat("quantized tokens = ", quantized, ", expected a multiple of the group (",
                          s.group, ") and at most the tokens (", n, ")"));
  }
  const std::size_t bb = s.block_bytes();
  const std::size_t key_bytes = static_cast<std::size_t>(quantized / s.group) * d * bb;
  const std::size_t value_bytes = static_cast<std::size_t>(quantized) * (d / s.group) * bb;
  const auto key_blocks = r.get_vector<uint8_t>(key_bytes, "key blocks");
  const auto value_blocks = r.get_vector<uint8_t>(value_bytes, "value blocks");
  require_size(key_blocks.size(), key_bytes, lim, "key blocks (bytes)");
  require_size(value_blocks.size(), value_bytes, lim, "value blocks (bytes)");
  check_blocks(key_blocks, bb, lim, "key");
  check_blocks(value_blocks, bb, lim, "value");
  read_rows(r, s.tail_k, s.tail_v, s.positions, s.scores, n - quantized, n, lim);
  s.assign_blocks(static_cast<int64_t>(quantized), key_blocks, value_blocks);
}

}  // namespace detail
}  // namespace kvpack
