/// \file backend/cpu/store_io.hpp
/// \brief The saved form of each CPU head store (rows, KIVI blocks, low-rank factors), written
/// and read field by field, and the structural checks a read store must pass before a cache
/// takes it: sizes that agree with head_dim and the token count, ascending positions inside the
/// layer's range, finite fp16/fp32 values and block scales. Used by KVCache::save / load.
///
/// Every store is: u64 token count, then its vectors (u64 element count + raw little-endian
/// elements, see CheckedFileWriter::put_vector) in the order of the write_store overload.
#pragma once

// clang-format off
#include "../../config.hpp"  // first: detail/ headers check the macro it defines
// clang-format on

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../../detail/checked_file.hpp"
#include "../../error.hpp"
#include "../../half.hpp"
#include "head_store.hpp"

namespace kvpack {
namespace detail {

/// What a read store must agree with: its layer's positions, head_dim, and the cache's KIVI
/// knobs (bits 0: none).
struct StoreLimits {
  int head_dim = 0;
  int64_t first_position = -1, last_position = -1;
  int bits = 0, group = 0;
  std::string where;  ///< "<file>: layer L kv head H"
};

[[noreturn]] inline void bad_store(const StoreLimits& lim, const std::string& what) {
  throw error(lim.where + ": " + what);
}

inline bool finite_half(Half h) { return (h.bits & 0x7C00u) != 0x7C00u; }

template <class T>
void require_finite(const std::vector<T>& v, const StoreLimits& lim, const char* what) {
  for (std::size_t i = 0; i < v.size(); ++i) {
    bool ok;
    if constexpr (std::is_same_v<T, Half>) {
      ok = finite_half(v[i]);
    } else {
      ok = std::isfinite(to_float(v[i]));
    }
    if (!ok) bad_store(lim, concat(what, " value ", i, " is not finite"));
  }
}

inline void require_size(std::size_t got, std::size_t want, const StoreLimits& lim,
                         const char* what) {
  if (got != want) bad_store(lim, concat(what, " holds ", got, " values, expected ", want));
}

/// Positions strictly ascending inside the layer's [first, last]; scores empty or one per token.
inline void check_positions_scores(const std::vector<int32_t>& positions,
                                   const std::vector<float>& scores, const StoreLimits& lim) {
  for (std::size_t i = 0; i < positions.size(); ++i) {
    const int64_t p = positions[i];
    if (p < lim.first_position || p > lim.last_position || (i > 0 && p <= positions[i - 1])) {
      bad_store(lim, concat("position ", i, " = ", p, ", expected ascending positions in [",
                            lim.first_position, ", ", lim.last_position, "]"));
    }
  }
  if (!scores.empty()) require_size(scores.size(), positions.size(), lim, "scores");
  require_finite(scores, lim, "scores");
}

/// Every block of `blocks` (block_bytes each) starts with a finite fp16 scale and minimum.
inline void check_blocks(const std::vector<uint8_t>& blocks, std::size_t block_bytes,
                         const StoreLimits& lim, const char* what) {
  for (std::size_t at = 0; at + 4 <= blocks.size(); at += block_bytes) {
    Half scale, min;
    std::memcpy(&scale.bits, blocks.data() + at, 2);
    std::memcpy(&min.bits, blocks.data() + at + 2, 2);
    if (!finite_half(scale) || !finite_half(min) || to_float(scale) < 0.0f) {
      bad_store(lim, concat(what, " block ", at / block_bytes,
                            " has a non-finite or negative scale, or a non-finite minimum"));
    }
  }
}

/// What every store ends with: K and V rows (dense rows, or the exact fp16 tail of the other
/// formats), positions and scores.
template <class T>
void write_rows(CheckedFileWriter& w, const std::vector<T>& k, const std::vector<T>& v,
                const std::vector<int32_t>& positions, const std::vector<float>& scores) {
  w.put_vector(k);
  w.put_vector(v);
  w.put_vector(positions);
  w.put_vector(scores);
}

/// Reads what write_rows wrote for `n` tokens of which `rows_tokens` are rows, and checks it.
template <class T>
void read_rows(CheckedFileReader& r, std::vector<T>& k, std::vector<T>& v,
               std::vector<int32_t>& positions, std::vector<float>& scores, uint64_t rows_tokens,
               uint64_t n, const StoreLimits& lim) {
  const std::size_t rows = static_cast<std::size_t>(rows_tokens) * lim.head_dim;
  k = r.get_vector<T>(rows, "k rows");
  v = r.get_vector<T>(rows, "v rows");
  positions = r.get_vector<int32_t>(n, "positions");
  scores = r.get_vector<float>(n, "scores");
  require_size(k.size(), rows, lim, "k rows");
  require_size(v.size(), rows, lim, "v rows");
  require_size(positions.size(), n, lim, "positions");
  require_finite(k, lim, "k rows");
  require_finite(v, lim, "v rows");
  check_positions_scores(positions, scores, lim);
}

// --- Dense rows ---------------------------------------------------------------------------------

// Pages are written as rows (token-major, no page padding): the file does not depend on the
// page size, and a cache with another page size loads it.
template <class T>
void write_store(CheckedFileWriter& w, const HeadStore<T>& s) {
  w.put_u64(static_cast<uint64_t>(s.size()));
  std::vector<T> k, v;
  s.gather_rows(k, v);
  write_rows(w, k, v, s.positions, s.scores);
}

template <class T>
void read_store(CheckedFileReader& r, HeadStore<T>& s, const StoreLimits& lim) {
  const uint64_t n = r.get_u64();
  std::vector<T> k, v;
  std::vector<int32_t> positions;
  std::vector<float> scores;
  read_rows(r, k, v, positions, scores, n, n, lim);
  s.assign_rows(k, v, std::move(positions), std::move(scores));
}

// --- Formats without shared state (rows, KIVI) -------------------------------------------------

/// Shared state of formats that have none; the low-rank format overloads these.
struct NoSharedState {};

template <class Store>
NoSharedState write_shared(CheckedFileWriter&, const std::vector<Store>&) {
  return {};
}
template <class Store>
NoSharedState read_shared(CheckedFileReader&, const std::vector<Store>&, const StoreLimits&) {
  return {};
}
template <class Store>
void write_store(CheckedFileWriter& w, const Store& s, NoSharedState) {
  write_store(w, s);
}
template <class Store>
void read_store(CheckedFileReader& r, Store& s, const StoreLimits& lim, NoSharedState) {
  read_store(r, s, lim);
}

}  // namespace detail
}  // namespace kvpack
