/// \file backend/cpu/low_rank_store_io.hpp
/// \brief The saved form of low-rank head stores (see store_io.hpp). Token bases are shared by
/// heads (and by the layers of an xKV group), so a cache's distinct bases are written once,
/// before the heads: u64 count, then per basis i64 tokens, u32 rank, u32 bits, u32 group, its
/// KIVI blocks and fp16 rows. A head is: u64 tokens, u64 factored tokens, per side (keys, values)
/// i64 basis index (-1: none) and the fp32 factor B (rank × head_dim), then the fp16 tail K and
/// V, positions and scores.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "low_rank_head_store.hpp"
#include "store_io.hpp"

namespace kvpack {
namespace detail {

/// The distinct bases of a cache, in the order they were written or read.
struct LowRankBases {
  std::vector<std::shared_ptr<const LowRankBasis>> bases;
  int64_t index_of(const LowRankBasis* b) const {
    for (std::size_t i = 0; i < bases.size(); ++i) {
      if (bases[i].get() == b) return static_cast<int64_t>(i);
    }
    return -1;
  }
};

inline LowRankBases write_shared(CheckedFileWriter& w, const std::vector<LowRankHeadStore>& heads) {
  LowRankBases table;
  for (const auto& head : heads) {
    for (const auto* side : {&head.key, &head.value}) {
      if (side->basis && table.index_of(side->basis.get()) < 0) table.bases.push_back(side->basis);
    }
  }
  w.put_u64(table.bases.size());
  for (const auto& b : table.bases) {
    w.put_u64(static_cast<uint64_t>(b->tokens));
    w.put_u32(static_cast<uint32_t>(b->rank));
    w.put_u32(static_cast<uint32_t>(b->bits));
    w.put_u32(static_cast<uint32_t>(b->group));
    std::vector<uint8_t> blocks;  // the file keeps the unpaged order (BasisPageLayout)
    std::vector<Half> rows;
    b->gather(blocks, rows);
    w.put_vector(blocks);
    w.put_vector(rows);
  }
  return table;
}

/// Reads the bases into pages of the heads' pool (the cache's; the caller drops them on failure).
inline LowRankBases read_shared(CheckedFileReader& r, const std::vector<LowRankHeadStore>& heads,
                                const StoreLimits& lim) {
  LowRankBases table;
  const uint64_t count = r.get_u64();
  // Two bases per head at most (keys and values); a count past the file's size fails below.
  for (uint64_t i = 0; i < count; ++i) {
    StoreLimits at = lim;
    at.where = concat(lim.where, " basis ", i);
    auto b = std::make_shared<LowRankBasis>();
    const uint64_t tokens = r.get_u64();
    const uint32_t rank = r.get_u32(), bits = r.get_u32(), group = r.get_u32();
    if (tokens == 0 || tokens > (uint64_t{1} << 31) || rank == 0 || rank > 4096) {
      bad_store(at, concat("tokens = ", tokens, ", rank = ", rank,
                           ", expected tokens in [1, 2^31] and rank in [1, 4096]"));
    }
    if (!(bits == 0 ||
          (static_cast<int>(bits) == lim.bits && static_cast<int>(group) == lim.group))) {
      bad_store(at,
                concat("bits = ", bits, ", group = ", group, ", expected 0 or the cache's KIVI ",
                       "bits ", lim.bits, " and group ", lim.group));
    }
    const int b_group = bits == 0 ? b->group : static_cast<int>(group);
    const int64_t q = bits == 0 ? 0 : static_cast<int64_t>(tokens) / b_group * b_group;
    const std::size_t bb = bits == 0 ? 0 : 4 + static_cast<std::size_t>(group) * bits / 8;
    const std::size_t block_bytes = bits == 0 ? 0 : static_cast<std::size_t>(q / group) * rank * bb;
    const std::size_t row_count = static_cast<std::size_t>(tokens - q) * rank;
    const std::vector<uint8_t> blocks = r.get_vector<uint8_t>(block_bytes, "basis blocks");
    const std::vector<Half> rows = r.get_vector<Half>(row_count, "basis rows");
    require_size(blocks.size(), block_bytes, at, "basis blocks (bytes)");
    require_size(rows.size(), row_count, at, "basis rows");
    if (bb > 0) check_blocks(blocks, bb, at, "basis");
    require_finite(rows, at, "basis rows");
    b->assign_stored(static_cast<int64_t>(tokens), static_cast<int>(rank), static_cast<int>(bits),
                     b_group, blocks, rows, heads.front().pool);
    table.bases.push_back(std::move(b));
  }
  return table;
}

inline void write_store(CheckedFileWriter& w, const LowRankHeadStore& s, const LowRankBases& t) {
  w.put_u64(static_cast<uint64_t>(s.size()));
  w.put_u64(static_cast<uint64_t>(s.factored));
  for (const auto* side : {&s.key, &s.value}) {
    w.put_u64(static_cast<uint64_t>(t.index_of(side->basis.get())));  // -1 as 2^64 - 1
    w.put_vector(side->b);
  }
  write_rows(w, s.tail_k, s.tail_v, s.positions, s.scores);
}

/// `s` keeps its RoPE table (the cache's); everything else comes from the file.
inline void read_store(CheckedFileReader& r, LowRankHeadStore& s, const StoreLimits& lim,
                       const LowRankBases& t) {
  const uint64_t n = r.get_u64(), factored = r.get_u64();
  const int d = lim.head_dim;
  if (factored > n) {
    bad_store(lim,
              concat("factored tokens = ", factored, ", expected at most the tokens (", n, ")"));
  }
  s.factored = static_cast<int64_t>(factored);
  for (auto* side : {&s.key, &s.value}) {
    const uint64_t index = r.get_u64();
    const bool none = index == ~uint64_t{0};
    if (none != (factored == 0) || (!none && index >= t.bases.size())) {
      bad_store(lim, concat("basis index ", static_cast<int64_t>(index), ", expected ",
                            factored == 0 ? std::string("none (-1)")
                                          : concat("one of the ", t.bases.size(), " bases")));
    }
    side->basis = none ? nullptr : t.bases[index];
    const std::size_t b_size = none ? 0 : static_cast<std::size_t>(side->basis->rank) * d;
    // At least: truncate() into the factored part keeps the basis's rows past `factored`.
    if (!none && side->basis->tokens < static_cast<int64_t>(factored)) {
      bad_store(lim, concat("its basis holds ", side->basis->tokens, " tokens, expected at least ",
                            factored));
    }
    side->b = r.get_vector<float>(b_size, "factor B");
    require_size(side->b.size(), b_size, lim, "factor B");
    require_finite(side->b, lim, "factor B");
  }
  read_rows(r, s.tail_k, s.tail_v, s.positions, s.scores, n - factored, n, lim);
}

}  // namespace detail
}  // namespace kvpack
