/// \file detail/low_rank_head_store.hpp
/// \brief CPU head store of the low-rank policies (CrossLayerSVD, ChannelShrink): the older
/// tokens as rows of a shared basis A (tokens × r) times this head's factor B (r × head_dim),
/// the newest tokens exact. Keys are factored pre-RoPE and rotated when a tile is read.
#pragma once

#ifndef KVPACK_INTERNAL_INCLUDE_OK
#error "kvpack/detail/ headers are internal; include <kvpack/kvpack.hpp> instead"
#endif

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "../half.hpp"
#include "../rope.hpp"
#include "convert.hpp"

namespace kvpack {
namespace detail {

/// \brief Token basis shared by every head of one layer (ChannelShrink) or of a group of
/// layers (CrossLayerSVD). Immutable once built; counted once by the container.
struct LowRankBasis {
  int64_t tokens = 0;
  int rank = 0;
  std::vector<Half> rows;  ///< tokens × rank, row-major, fp16 like the dense cache
  std::size_t bytes() const { return rows.size() * sizeof(Half); }
};

/// One side (keys or values) of a head: basis A (shared) and factor B (r × d, this head's).
struct LowRankFactor {
  std::shared_ptr<const LowRankBasis> basis;
  std::vector<float> b;  ///< rank × head_dim, row-major
  std::size_t bytes() const { return b.size() * sizeof(float); }
};

/// Tokens [0, factored) come from the factors, [factored, size) from the fp16 tail.
struct LowRankHeadStore {
  LowRankFactor key, value;
  int64_t factored = 0;
  std::vector<Half> tail_k, tail_v;
  std::vector<int32_t> positions;
  std::vector<float> scores;  // unused by low-rank policies; kept for the store interface
  std::shared_ptr<const Rope> rope;
  static constexpr float kUnscored = -1.0f;

  int64_t size() const { return static_cast<int64_t>(positions.size()); }

  /// The head's own bytes: factors B, the exact tail and positions (bases: see LowRankBasis).
  std::size_t bytes() const {
    return key.bytes() + value.bytes() + (tail_k.size() + tail_v.size()) * sizeof(Half) +
           positions.size() * sizeof(int32_t);
  }

  void append(const float* k_rows, const float* v_rows, const int64_t* pos, int64_t n,
              int head_dim) {
    const std::size_t old = tail_k.size();
    tail_k.resize(old + n * head_dim);
    tail_v.resize(old + n * head_dim);
    store_row(k_rows, tail_k.data() + old, n * head_dim);
    store_row(v_rows, tail_v.data() + old, n * head_dim);
    for (int64_t t = 0; t < n; ++t) positions.push_back(static_cast<int32_t>(pos[t]));
  }

  /// Tile loader: A[t0:t0+n] · B (one small GEMM per tile), RoPE for keys, then the tail.
  struct Rows {
    const LowRankHeadStore* store;
    const int32_t* positions;
    int64_t size;
    int head_dim;

    void load_keys(int64_t begin, int64_t n, float* out) const {
      load(store->key, store->tail_k, begin, n, out);
      if (store->rope) {
        const int64_t fend = begin + n < store->factored ? begin + n : store->factored;
        for (int64_t t = begin; t < fend; ++t)
          store->rope->rotate(out + (t - begin) * head_dim, positions[t]);
      }
    }
    void load_values(int64_t begin, int64_t n, float* out) const {
      load(store->value, store->tail_v, begin, n, out);
    }

   private:
    void load(const LowRankFactor& f, const std::vector<Half>& tail, int64_t begin, int64_t n,
              float* out) const {
      using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
      const int d = head_dim;
      const int64_t end = begin + n;
      const int64_t fend = end < store->factored ? end : store->factored;
      if (begin < fend) {
        const int r = f.basis->rank;
        RowMat a(fend - begin, r);
        load_row(f.basis->rows.data() + begin * r, a.data(), (fend - begin) * r);
        Eigen::Map<RowMat>(out, fend - begin, d).noalias() =
            a * Eigen::Map<const RowMat>(f.b.data(), r, d);
      }
      for (int64_t t = begin > store->factored ? begin : store->factored; t < end; ++t) {
        load_row(tail.data() + (t - store->factored) * d, out + (t - begin) * d, d);
      }
    }
  };

  Rows rows(int head_dim) const { return {this, positions.data(), size(), head_dim}; }

  /// Replaces the factored part and the first `tokens` tail rows by new factors covering the
  /// first `tokens` tokens held.
  void set_factors(LowRankFactor k, LowRankFactor v, int64_t tokens, int head_dim) {
    const int64_t drop = tokens - factored;  // tail rows now covered by the factors
    tail_k.erase(tail_k.begin(), tail_k.begin() + drop * head_dim);
    tail_v.erase(tail_v.begin(), tail_v.begin() + drop * head_dim);
    tail_k.shrink_to_fit();
    tail_v.shrink_to_fit();
    key = std::move(k);
    value = std::move(v);
    factored = tokens;
  }

  /// Keeps rows `kept`: decodes them into the exact tail (factors are per sequence, so an
  /// eviction after factoring cannot keep them).
  void keep(const std::vector<int64_t>& kept, int head_dim) {
    const int d = head_dim;
    std::vector<float> k(kept.size() * d), v(kept.size() * d);
    std::vector<int32_t> np(kept.size());
    const Rows r = rows(d);
    for (std::size_t j = 0; j < kept.size(); ++j) {
      r.load_keys(kept[j], 1, k.data() + j * d);
      r.load_values(kept[j], 1, v.data() + j * d);
      np[j] = positions[kept[j]];
    }
    const auto keep_rope = rope;
    clear();
    rope = keep_rope;
    tail_k.resize(k.size());
    tail_v.resize(v.size());
    store_row(k.data(), tail_k.data(), static_cast<int64_t>(k.size()));
    store_row(v.data(), tail_v.data(), static_cast<int64_t>(v.size()));
    positions.swap(np);
  }

  void drop_back(int64_t count, int head_dim) {
    if (count <= size() - factored) {
      const std::size_t n = static_cast<std::size_t>(size() - factored - count) * head_dim;
      tail_k.resize(n);
      tail_v.resize(n);
      positions.resize(size() - count);
      return;
    }
    std::vector<int64_t> kept(size() - count);
    for (std::size_t i = 0; i < kept.size(); ++i) kept[i] = static_cast<int64_t>(i);
    keep(kept, head_dim);
  }

  void clear() {
    key = {};
    value = {};
    factored = 0;
    std::vector<Half>().swap(tail_k);
    std::vector<Half>().swap(tail_v);
    std::vector<int32_t>().swap(positions);
    std::vector<float>().swap(scores);
  }
};

}  // namespace detail
}  // namespace kvpack
