/// \file backend/cpu/low_rank_head_store.hpp
/// \brief CPU head store of the low-rank policies (CrossLayerSVD, ChannelShrink): the older
/// tokens as rows of a shared basis A (tokens × r) times this head's factor B (r × head_dim),
/// the newest tokens exact. Keys are factored pre-RoPE and rotated when a tile is read.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "../../config.hpp"
#include "../../detail/convert.hpp"
#include "../../detail/vector_bytes.hpp"
#include "../../error.hpp"
#include "../../half.hpp"
#include "../../low_rank_factors.hpp"
#include "../../quant/quant_block.hpp"
#include "../../rope.hpp"
#include "low_rank_basis.hpp"

namespace kvpack {
namespace detail {

/// \brief RoPE over a run of positions: the cos/sin of consecutive positions come from one
/// rotation by the unit-step angle (angle addition in double), re-anchored on exact values every
/// kAnchor positions and at every jump. Rope::rotate evaluates cos and sin per pair and token,
/// which cost more than the rank-r GEMM that rebuilds a key tile; this gives the same rotation
/// to ~1e-15 (relative) in the angles and the same double-precision pair rotation.
class RopeRun {
 public:
  /// Positions between exact cos/sin evaluations: angle addition loses ~2 ε_double per step.
  static constexpr int64_t kAnchor = 256;

  explicit RopeRun(const Rope& rope)
      : style_(rope.config().style),
        d_(rope.head_dim()),
        rd_(rope.rotary_dim()),
        scale_(rope.attention_factor()),
        inv_freq_(rope.inv_freq()) {
    const int half = rd_ / 2;
    step_cos_.resize(half);
    step_sin_.resize(half);
    for (int i = 0; i < half; ++i) {
      step_cos_[i] = std::cos(inv_freq_[i]);
      step_sin_[i] = std::sin(inv_freq_[i]);
    }
  }

  int head_dim() const { return d_; }

  /// Rotates (inverse = false) or un-rotates rows x[t·d .. t·d + d) for t in [0, n), row t at
  /// position pos[t], in double like Rope::rotate (channels from rotary_dim on pass through).
  void apply(float* x, const int32_t* pos, int64_t n, bool inverse) const {
    const int half = rd_ / 2;
    const double sign = inverse ? -1.0 : 1.0;
    const double scale = inverse ? 1.0 / scale_ : scale_;
    for_each_angle(pos, n, [&](int64_t t, const double* c, const double* s) {
      float* row = x + t * d_;
      for (int i = 0; i < half; ++i) {
        int a, b;
        rope_pair(style_, i, rd_, a, b);
        rotate_pair(row[a], row[b], scale * c[i], scale * sign * s[i]);
      }
    });
  }

  /// fp32 cos and sin (times the attention factor) of every pair at positions pos[0, n):
  /// c[t·(rotary_dim/2) + i], s[t·(rotary_dim/2) + i].
  void angles(const int32_t* pos, int64_t n, float* c, float* s) const {
    const int half = rd_ / 2;
    for_each_angle(pos, n, [&](int64_t t, const double* cd, const double* sd) {
      for (int i = 0; i < half; ++i) {
        c[t * half + i] = static_cast<float>(scale_ * cd[i]);
        s[t * half + i] = static_cast<float>(scale_ * sd[i]);
      }
    });
  }

  /// Rotates n rows of d values (row t at x + t·stride) by angles() of their positions, in fp32:
  /// within ~2 ulp of apply(), for the attention tiles where keys come from an fp16 basis anyway.
  void rotate(float* x, int64_t n, int64_t stride, const float* c, const float* s) const {
    const int half = rd_ / 2;
    for (int64_t t = 0; t < n; ++t) {
      float* row = x + t * stride;
      const float* ct = c + t * half;
      const float* st = s + t * half;
      if (style_ == RopeStyle::kInterleaved) {
        for (int i = 0; i < half; ++i) {
          const float a = row[2 * i], b = row[2 * i + 1];
          row[2 * i] = a * ct[i] - b * st[i];
          row[2 * i + 1] = a * st[i] + b * ct[i];
        }
      } else {
        float* lo = row;
        float* hi = row + half;
        for (int i = 0; i < half; ++i) {
          const float a = lo[i], b = hi[i];
          lo[i] = a * ct[i] - b * st[i];
          hi[i] = a * st[i] + b * ct[i];
        }
      }
    }
  }

 private:
  /// Calls f(t, cos, sin) with the rotary_dim/2 angles of position pos[t], for t in [0, n).
  template <class F>
  void for_each_angle(const int32_t* pos, int64_t n, F&& f) const {
    const int half = rd_ / 2;
    std::vector<double> c(half), s(half);
    for (int64_t t = 0; t < n; ++t) {
      if (t % kAnchor == 0 || pos[t] != pos[t - 1] + 1) {
        for (int i = 0; i < half; ++i) {
          const double angle = static_cast<double>(pos[t]) * inv_freq_[i];
          c[i] = std::cos(angle);
          s[i] = std::sin(angle);
        }
      } else {
        for (int i = 0; i < half; ++i) {
          const double ci = c[i] * step_cos_[i] - s[i] * step_sin_[i];
          s[i] = s[i] * step_cos_[i] + c[i] * step_sin_[i];
          c[i] = ci;
        }
      }
      f(t, c.data(), s.data());
    }
  }

  RopeStyle style_;
  int d_, rd_;
  double scale_;  // YaRN's attention factor (1 otherwise)
  std::vector<double> inv_freq_, step_cos_, step_sin_;
};

/// One side (keys or values) of a head: basis A (shared) and factor B (r × d, this head's).
struct LowRankFactor {
  std::shared_ptr<const LowRankBasis> basis;
  std::vector<float> b;  ///< rank × head_dim, row-major
  std::size_t bytes() const { return held_bytes(b); }
  std::size_t reserved_bytes() const { return allocated_bytes(b); }
};

/// Tokens [0, factored) come from the factors, [factored, size) from the fp16 tail.
struct LowRankHeadStore {
  LowRankFactor key, value;
  int64_t factored = 0;
  std::vector<Half> tail_k, tail_v;
  std::vector<int32_t> positions;
  std::vector<float> scores;  // unused by low-rank policies; kept for the store interface
  std::shared_ptr<const Rope> rope;
  std::shared_ptr<PagePool> pool;  ///< where compress() puts the bases (the cache's pool)
  static constexpr float kUnscored = -1.0f;

  /// The pool the bases' pages come from, set by the cache before the first compress().
  void set_pages(std::shared_ptr<PagePool> page_pool, int, int) { pool = std::move(page_pool); }

  int64_t size() const { return static_cast<int64_t>(positions.size()); }

  /// Every token basis some head of `heads` points to, counted once with its bookkeeping
  /// (bases are shared by the heads, and by the layers of an xKV group).
  static std::size_t shared_bytes(const std::vector<LowRankHeadStore>& heads) {
    return shared_bytes(std::vector<const std::vector<LowRankHeadStore>*>{&heads});
  }
  /// shared_bytes with each basis's allocated heap.
  static std::size_t shared_reserved_bytes(const std::vector<LowRankHeadStore>& heads) {
    return shared_reserved_bytes(std::vector<const std::vector<LowRankHeadStore>*>{&heads});
  }
  /// The same over the heads of several caches: the sequences of a batch, whose forks share
  /// their source's bases.
  static std::size_t shared_bytes(const std::vector<const std::vector<LowRankHeadStore>*>& caches) {
    return sum_bases(caches, [](const LowRankBasis& b) { return b.bytes(); });
  }
  static std::size_t shared_reserved_bytes(
      const std::vector<const std::vector<LowRankHeadStore>*>& caches) {
    return sum_bases(caches, [](const LowRankBasis& b) { return b.reserved_bytes(); });
  }

  /// The head's own bytes: factors B, the exact tail and positions (bases: see LowRankBasis).
  std::size_t bytes() const {
    return key.bytes() + value.bytes() + held_bytes(tail_k, tail_v, positions);
  }
  /// Heap allocated for them, growth slack included.
  std::size_t reserved_bytes() const {
    return key.reserved_bytes() + value.reserved_bytes() +
           allocated_bytes(tail_k, tail_v, positions, scores);
  }
  /// Releases the growth slack of the tail (factors are allocated at their size).
  void shrink_to_fit() { shrink_all(tail_k, tail_v, positions, scores); }

  void append(const float* k_rows, const float* v_rows, Positions pos, int64_t n, int head_dim) {
    append_rows(tail_k, tail_v, positions, k_rows, v_rows, pos, n, head_dim);
  }

  /// Tile loader: A[t0:t0+n] · B (one small GEMM per tile), RoPE for keys, then the tail.
  struct Rows {
    const LowRankHeadStore* store;
    const int32_t* positions;
    int64_t size;
    int head_dim;

    /// Post-RoPE keys [begin, begin + n): factored rows rebuilt and rotated, tail rows as held.
    void load_keys(int64_t begin, int64_t n, float* out) const {
      load(store->key, store->tail_k, begin, n, out);
      const int64_t fend = begin + n < store->factored ? begin + n : store->factored;
      if (store->rope && begin < fend) {
        RopeRun(*store->rope).apply(out, positions + begin, fend - begin, false);
      }
    }
    /// Pre-RoPE keys [begin, begin + n): factored rows as rebuilt (they are pre-RoPE), tail
    /// rows un-rotated. What a refactorisation reads: no rotation there and back.
    void load_pre_rope_keys(int64_t begin, int64_t n, float* out) const {
      load(store->key, store->tail_k, begin, n, out);
      const int64_t tbegin = begin > store->factored ? begin : store->factored;
      if (store->rope && tbegin < begin + n) {
        RopeRun(*store->rope)
            .apply(out + (tbegin - begin) * head_dim, positions + tbegin, begin + n - tbegin, true);
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
        f.basis->load(begin, fend - begin, a.data());
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

  /// Keeps rows `kept` (ascending): decodes them into the exact tail (factors are per sequence,
  /// so an eviction after factoring cannot keep them).
  void keep(const std::vector<int64_t>& kept, int head_dim) {
    const int d = head_dim;
    const int64_t n = size();
    std::vector<float> all_k(static_cast<std::size_t>(n) * d), all_v(all_k.size());
    const Rows r = rows(d);
    r.load_keys(0, n, all_k.data());
    r.load_values(0, n, all_v.data());
    std::vector<float> k(kept.size() * d), v(kept.size() * d);
    std::vector<int32_t> np(kept.size());
    for (std::size_t j = 0; j < kept.size(); ++j) {
      std::copy_n(all_k.data() + kept[j] * d, d, k.data() + j * d);
      std::copy_n(all_v.data() + kept[j] * d, d, v.data() + j * d);
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

  /// Any rollback is clean: factored tokens are rows of the basis (see drop_back).
  int64_t drop_back_split(int64_t) const { return 0; }

  /// Drops the last `count` tokens. Into the factored part, `factored` shrinks and the basis
  /// and factors stay as they are (the basis is shared and immutable; its unused rows stay
  /// counted until the next compress() refactors), so what is kept is bit-identical and the
  /// cache no larger.
  void drop_back(int64_t count, int head_dim) {
    const int64_t kept = size() - count;
    factored = std::min(factored, kept);
    const std::size_t n = static_cast<std::size_t>(kept - factored) * head_dim;
    tail_k.resize(n);
    tail_v.resize(n);
    tail_k.shrink_to_fit();
    tail_v.shrink_to_fit();
    positions.resize(kept);
    if (factored == 0) {
      key = {};
      value = {};
    }
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

 private:
  /// Σ bytes_of(basis) over the distinct bases the heads point to, each with its bookkeeping.
  template <class BytesOf>
  static std::size_t sum_bases(const std::vector<const std::vector<LowRankHeadStore>*>& caches,
                               BytesOf bytes_of) {
    std::vector<const LowRankBasis*> seen;
    std::size_t total = 0;
    for (const auto* heads : caches) {
      for (const auto& head : *heads) {
        for (const LowRankBasis* basis : {head.key.basis.get(), head.value.basis.get()}) {
          if (basis == nullptr || std::find(seen.begin(), seen.end(), basis) != seen.end()) {
            continue;
          }
          seen.push_back(basis);
          total += bytes_of(*basis) + sizeof(LowRankBasis);
        }
      }
    }
    return total;
  }
};

/// The read-only view KVCache::low_rank_factors returns for `s` (see low_rank_factors.hpp).
inline LowRankHeadFactors factors_view(const LowRankHeadStore& s, int head_dim) {
  auto basis = [](const LowRankFactor& f) {
    LowRankBasisData b;
    if (f.basis == nullptr) return b;  // nothing factored yet
    b.tokens = f.basis->tokens;
    b.rank = f.basis->rank;
    b.bits = f.basis->bits;
    b.group = f.basis->group;
    b.quantized = f.basis->quantized_rows();
    const BasisPageLayout layout = f.basis->layout();
    b.page_bytes = layout.page_bytes;
    b.block_pages = layout.block_pages();
    b.pages = f.basis->pages.size();
    b.page_ids = f.basis->pages.ids.data();
    return b;
  };
  LowRankHeadFactors out;
  out.head_dim = head_dim;
  out.tokens = s.size();
  out.factored = s.factored;
  out.key_basis = basis(s.key);
  out.value_basis = basis(s.value);
  out.key_factor = s.key.b.data();
  out.value_factor = s.value.b.data();
  out.tail_k = s.tail_k.data();
  out.tail_v = s.tail_v.data();
  out.positions = s.positions.data();
  out.rope = s.rope.get();
  return out;
}

}  // namespace detail
}  // namespace kvpack
