/// \file backend/cpu/head_store.hpp
/// \brief Ragged storage of one (layer, kv-head): its kept K/V rows and their positions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../../config.hpp"
#include "../../detail/convert.hpp"
#include "../../detail/vector_bytes.hpp"
#include "attention.hpp"
#include "store_for.hpp"

namespace kvpack {
namespace detail {

/// Rows are stored token-major (n × head_dim) in element type T, positions ascending.
///
/// Every CPU head store (this dense one, QuantizedHeadStore, ...) offers the same members:
/// size(), positions, scores, append(), rows(), keep(), drop_back(), clear(), bytes(). The
/// container only talks to that interface.
template <class T>
struct HeadStore {
  std::vector<T> k, v;
  std::vector<int32_t> positions;
  /// Per-token scores of policies that score with observed queries (empty otherwise);
  /// kUnscored marks tokens no query has seen yet.
  std::vector<float> scores;
  static constexpr float kUnscored = -1.0f;

  int64_t size() const { return static_cast<int64_t>(positions.size()); }

  /// Bytes held once for several heads (none for rows): see LowRankHeadStore::shared_bytes.
  static std::size_t shared_bytes(const std::vector<HeadStore>&) { return 0; }
  static std::size_t shared_reserved_bytes(const std::vector<HeadStore>&) { return 0; }

  /// Appends n fp32 rows of keys and values (n × head_dim each) at `pos`.
  void append(const float* k_rows, const float* v_rows, Positions pos, int64_t n, int head_dim) {
    append_rows(k, v, positions, k_rows, v_rows, pos, n, head_dim);
    if (!scores.empty()) scores.resize(positions.size(), kUnscored);
  }

  /// Tile loader over the held rows (see cpu::DenseRows).
  cpu::DenseRows<T> rows(int head_dim) const {
    return {k.data(), v.data(), positions.data(), size(), head_dim};
  }

  /// Bytes held: K and V rows, one position per token, and scores when a policy keeps them.
  std::size_t bytes() const { return held_bytes(k, v, positions, scores); }
  /// Heap allocated for them, growth slack included.
  std::size_t reserved_bytes() const { return allocated_bytes(k, v, positions, scores); }
  /// Releases the growth slack.
  void shrink_to_fit() { shrink_all(k, v, positions, scores); }

  /// Keeps rows `kept` (ascending indices) and releases the memory of the others: the new
  /// buffers are allocated at exact size, so bytes() and the allocator agree.
  void keep(const std::vector<int64_t>& kept, int head_dim) {
    std::vector<T> nk(kept.size() * head_dim), nv(kept.size() * head_dim);
    std::vector<int32_t> np(kept.size());
    for (std::size_t j = 0; j < kept.size(); ++j) {
      const int64_t src = kept[j] * head_dim;
      for (int i = 0; i < head_dim; ++i) {
        nk[j * head_dim + i] = k[src + i];
        nv[j * head_dim + i] = v[src + i];
      }
      np[j] = positions[kept[j]];
    }
    k.swap(nk);
    v.swap(nv);
    positions.swap(np);
    if (!scores.empty()) {
      std::vector<float> ns(kept.size());
      for (std::size_t j = 0; j < kept.size(); ++j) ns[j] = scores[kept[j]];
      scores.swap(ns);
    }
  }

  /// Rows: any rollback is clean (see QuantizedHeadStore::drop_back_split).
  int64_t drop_back_split(int64_t) const { return 0; }

  /// Drops the last `count` rows (used to roll back tokens that were never part of the
  /// sequence, such as a scoring pass's repeat prompt).
  void drop_back(int64_t count, int head_dim) {
    const std::size_t n = static_cast<std::size_t>(size() - count);
    k.resize(n * head_dim);
    v.resize(n * head_dim);
    positions.resize(n);
    if (scores.size() > n) scores.resize(n);
    shrink_to_fit();
  }

  void clear() {
    std::vector<T>().swap(k);
    std::vector<T>().swap(v);
    std::vector<int32_t>().swap(positions);
    std::vector<float>().swap(scores);
  }
};

/// Dense rows (no Quantize stage).
template <class T>
struct CpuStore<StorageFormat::kRows, false, T> {
  using type = HeadStore<T>;
};

}  // namespace detail
}  // namespace kvpack
