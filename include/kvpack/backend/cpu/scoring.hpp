/// \file backend/cpu/scoring.hpp
/// \brief Softmax attention probabilities of observed queries over the keys of a ScoreWindow,
/// reduced per key (ReconstructionEvict's max, LazyLayerDrop's mass).
///
/// The keys of the window are converted to fp32 once per head and packed in panels of 16 keys
/// stored channel-major, so a register-blocked kernel broadcasts one query element against 16
/// keys (an outer-product GEMM at close to the FMA peak). A block of query rows is scored
/// against the whole window in one pass: its score strip (rows × window keys) holds the row's
/// scores, then its unnormalised probabilities, so every score is computed and exponentiated
/// once. Memory stays O(keys) per head: the packed keys and one strip of a bounded number of
/// rows per thread, never the queries × keys matrix.
#pragma once

#include "../../config.hpp"
// clang-format off
#include <Eigen/Core>
// clang-format on
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../detail/convert.hpp"
#include "../../detail/online_softmax.hpp"
#include "../../policy/score_window.hpp"
#include "attention.hpp"

namespace kvpack {
namespace cpu {

/// Keys per packed panel (two AVX2 registers of scores per query row).
constexpr int kScorePanel = 16;
/// Query rows scored together against each panel: the block's rows (≤ 12 KiB at d = 64) and
/// one panel (4 KiB) stay in L1 while the panel is reused by every row.
constexpr int kScoreRows = 48;

/// Index ranges [first, second) of `positions` (ascending) that fall inside `window`.
inline std::vector<std::pair<int64_t, int64_t>> window_ranges(const int32_t* positions, int64_t n,
                                                              const ScoreWindow& window) {
  auto index_of = [&](int64_t pos) {  // first index with position >= pos
    if (pos <= 0) return int64_t{0};
    if (pos > positions[n - 1]) return n;
    return static_cast<int64_t>(std::lower_bound(positions, positions + n, pos) - positions);
  };
  std::vector<std::pair<int64_t, int64_t>> ranges;
  if (n == 0) return ranges;
  const int64_t chunk_end = window.end == INT64_MAX ? n : index_of(window.end);
  // The three parts in index order (a tail may start before the chunk), overlaps merged.
  std::pair<int64_t, int64_t> parts[] = {
      {0, index_of(window.sink_end)},
      {index_of(window.begin), chunk_end},
      {window.tail_begin == INT64_MAX ? n : index_of(window.tail_begin), n}};
  std::sort(std::begin(parts), std::end(parts));
  for (const auto& [a, b] : parts) {
    if (a >= b) continue;
    if (!ranges.empty() && a <= ranges.back().second) {
      ranges.back().second = std::max(ranges.back().second, b);
    } else {
      ranges.push_back({a, b});
    }
  }
  return ranges;
}

/// \brief The keys of one head inside a window, as fp32 panels for the score kernel.
///
/// Window index j is the j-th key of the concatenated ranges (ascending head index). Panel p
/// holds window keys [16p, 16p + 16) channel-major: element (channel c, key i) at c · 16 + i;
/// the last panel is zero-padded.
class PackedKeys {
 public:
  /// Packs the keys of `head` (anything with load_keys, see DenseRows) inside `ranges`.
  template <class Rows>
  void pack(const Rows& head, int d, std::vector<std::pair<int64_t, int64_t>> ranges) {
    ranges_ = std::move(ranges);
    d_ = d;
    offsets_.clear();
    size_ = 0;
    for (const auto& r : ranges_) {
      offsets_.push_back(size_);
      size_ += r.second - r.first;
    }
    const int64_t panels = (size_ + kScorePanel - 1) / kScorePanel;
    panels_.assign(static_cast<std::size_t>(panels) * kScorePanel * d, 0.0f);
    std::vector<float> tile(static_cast<std::size_t>(kScorePanel) * d);
    int64_t j = 0;  // window index of the next key to pack
    for (const auto& r : ranges_) {
      for (int64_t t = r.first; t < r.second;) {
        // Keys of this range up to the end of the current panel, loaded as one block.
        const int64_t lane = j % kScorePanel;
        const int64_t n = std::min<int64_t>(kScorePanel - lane, r.second - t);
        head.load_keys(t, n, tile.data());
        float* panel = panels_.data() + (j / kScorePanel) * kScorePanel * d;
        for (int64_t i = 0; i < n; ++i) {
          for (int c = 0; c < d; ++c) panel[c * kScorePanel + lane + i] = tile[i * d + c];
        }
        t += n;
        j += n;
      }
    }
  }

  /// Keys in the window.
  int64_t size() const { return size_; }
  int head_dim() const { return d_; }
  /// Window keys whose head index is below `index` (those a causal row with visible = index
  /// sees).
  int64_t count_before(int64_t index) const {
    int64_t count = 0;
    for (const auto& r : ranges_)
      count += std::clamp<int64_t>(index - r.first, 0, r.second - r.first);
    return count;
  }
  const std::vector<std::pair<int64_t, int64_t>>& ranges() const { return ranges_; }
  /// Window index of the first key of ranges()[i].
  int64_t offset(std::size_t i) const { return offsets_[i]; }
  const float* panel(int64_t p) const { return panels_.data() + p * kScorePanel * d_; }

 private:
  std::vector<std::pair<int64_t, int64_t>> ranges_;
  std::vector<int64_t> offsets_;
  std::vector<float> panels_;
  int64_t size_ = 0;
  int d_ = 0;
};

/// \brief Softmax probabilities of a block of query rows over a window. Row r sees window keys
/// [0, limit[r]); its probability of key j is row(r)[j] · inv_sum[r] (values hold
/// exp(score − row max) after softmax_strip(), the raw scores before it, as score_rows() leaves
/// them). Rows with limit 0 see no key.
struct ScoreStrip {
  std::vector<float> values;
  std::vector<float> inv_sum;
  std::vector<int64_t> limit;
  int64_t stride = 0;

  const float* row(int r) const { return values.data() + r * stride; }
  float probability(int r, int64_t j) const { return row(r)[j] * inv_sum[r]; }
};

}  // namespace cpu

namespace detail {

#if defined(KVPACK_X86_DISPATCH)
/// Scores of R query rows (q, row stride d) against one panel: s[r · lds + i] = q_r · key_i.
/// 2R accumulators + 2 keys + 1 broadcast ≤ 15 ymm for R ≤ 6. D > 0 fixes head_dim at compile
/// time (the query offsets become immediates, which frees the registers that held them).
template <int R, int D>
KVPACK_TARGET_AVX2 inline void avx2_panel_scores(const float* q, int head_dim, const float* panel,
                                                 float* s, int64_t lds) {
  const int d = D > 0 ? D : head_dim;
  __m256 a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  for (int c = 0; c < d; ++c) {
    const __m256 k0 = _mm256_loadu_ps(panel + c * cpu::kScorePanel);
    const __m256 k1 = _mm256_loadu_ps(panel + c * cpu::kScorePanel + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(q + r * d + c);
      a[r][0] = _mm256_fmadd_ps(b, k0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(b, k1, a[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(s + r * lds, a[r][0]);
    _mm256_storeu_ps(s + r * lds + 8, a[r][1]);
  }
}

/// max_scaled on AVX2 for [0, 8 · floor(n / 8)); returns that bound.
KVPACK_TARGET_AVX2 inline int64_t avx2_max_scaled(float* best, const float* x, int64_t n,
                                                  float scale) {
  int64_t i = 0;
  const __m256 sv = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) {
    const __m256 p = _mm256_mul_ps(_mm256_loadu_ps(x + i), sv);
    _mm256_storeu_ps(best + i, _mm256_max_ps(_mm256_loadu_ps(best + i), p));
  }
  return i;
}

/// sum_scaled on AVX2 for [0, 8 · floor(n / 8)); returns that bound.
KVPACK_TARGET_AVX2 inline int64_t avx2_sum_scaled(float* best, const float* x, int64_t n,
                                                  float scale) {
  int64_t i = 0;
  const __m256 sv = _mm256_set1_ps(scale);
  const __m256 zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 b = _mm256_max_ps(_mm256_loadu_ps(best + i), zero);
    _mm256_storeu_ps(best + i, _mm256_fmadd_ps(_mm256_loadu_ps(x + i), sv, b));
  }
  return i;
}

/// group_scores on AVX2 for `rows` ≤ 6; D > 0 fixes head_dim (see avx2_panel_scores).
template <int D>
KVPACK_TARGET_AVX2 inline void avx2_group_scores(const float* q, int d, int rows,
                                                 const float* panel, float* sp, int64_t lds) {
  switch (rows) {
    case 6:
      return avx2_panel_scores<6, D>(q, d, panel, sp, lds);
    case 5:
      return avx2_panel_scores<5, D>(q, d, panel, sp, lds);
    case 4:
      return avx2_panel_scores<4, D>(q, d, panel, sp, lds);
    case 3:
      return avx2_panel_scores<3, D>(q, d, panel, sp, lds);
    case 2:
      return avx2_panel_scores<2, D>(q, d, panel, sp, lds);
    default:
      return avx2_panel_scores<1, D>(q, d, panel, sp, lds);
  }
}
#endif  // KVPACK_X86_DISPATCH

/// Scores of up to 6 rows against panel p of `keys` into s (row stride lds).
inline void group_scores(const cpu::PackedKeys& keys, const float* q, int rows, int64_t p, float* s,
                         int64_t lds) {
  const int d = keys.head_dim();
  float* sp = s + p * cpu::kScorePanel;
  const float* panel = keys.panel(p);
#if defined(KVPACK_X86_DISPATCH)
  if (cpu_isa() >= Isa::kAvx2) {  // head_dim 64 and 128 get kernels with the dimension fixed
    if (d == 64) return avx2_group_scores<64>(q, d, rows, panel, sp, lds);
    if (d == 128) return avx2_group_scores<128>(q, d, rows, panel, sp, lds);
    return avx2_group_scores<0>(q, d, rows, panel, sp, lds);
  }
#endif
  for (int r = 0; r < rows; ++r) {
    float x[cpu::kScorePanel] = {};
    for (int c = 0; c < d; ++c) {
      const float qc = q[r * d + c];
      for (int i = 0; i < cpu::kScorePanel; ++i) x[i] += qc * panel[c * cpu::kScorePanel + i];
    }
    for (int i = 0; i < cpu::kScorePanel; ++i) sp[r * lds + i] = x[i];
  }
}

/// best[i] = max(best[i], x[i] · scale) for i in [0, n).
inline void max_scaled(float* best, const float* x, int64_t n, float scale) {
  int64_t i = 0;
#if defined(KVPACK_X86_DISPATCH)
  if (cpu_isa() >= Isa::kAvx2) i = avx2_max_scaled(best, x, n, scale);
#endif
  for (; i < n; ++i) best[i] = std::max(best[i], x[i] * scale);
}

/// best[i] = max(best[i], 0) + x[i] · scale: running sums of probabilities, where a negative
/// value marks a key no row has seen yet (it starts the sum at 0).
inline void sum_scaled(float* best, const float* x, int64_t n, float scale) {
  int64_t i = 0;
#if defined(KVPACK_X86_DISPATCH)
  if (cpu_isa() >= Isa::kAvx2) i = avx2_sum_scaled(best, x, n, scale);
#endif
  for (; i < n; ++i) best[i] = std::fma(x[i], scale, std::max(best[i], 0.0f));
}

}  // namespace detail

namespace cpu {

/// Scores of `rows` query rows q (row-major rows × d, pre-scaled by 1/sqrt(d)) against the
/// window keys `keys`, causal: row r sees the keys whose head index is below visible[r]. Fills
/// strip.limit, strip.stride and strip.values with the raw scores (softmax_strip() turns them
/// into probabilities). Each score is computed once, panel-major: each panel is read into L1 once
/// and used by every row of the block.
inline void score_rows(const PackedKeys& keys, const float* q, int rows, const int64_t* visible,
                       ScoreStrip& strip) {
  const int d = keys.head_dim();
  strip.limit.resize(rows);
  int64_t widest = 0;
  for (int r = 0; r < rows; ++r) {
    strip.limit[r] = keys.count_before(visible[r]);
    widest = std::max(widest, strip.limit[r]);
  }
  strip.stride = (widest + kScorePanel - 1) / kScorePanel * kScorePanel;
  strip.values.resize(static_cast<std::size_t>(rows) * strip.stride);
  strip.inv_sum.assign(rows, 0.0f);
  const int64_t panels = strip.stride / kScorePanel;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t j0 = p * kScorePanel;
    for (int r0 = 0; r0 < rows; r0 += 6) {
      const int n = std::min(6, rows - r0);
      const int64_t group_limit = *std::max_element(&strip.limit[r0], &strip.limit[r0] + n);
      if (group_limit <= j0) continue;  // causal: no row of the group sees this panel
      detail::group_scores(keys, q + static_cast<std::size_t>(r0) * d, n, p,
                           strip.values.data() + r0 * strip.stride, strip.stride);
    }
  }
}

/// Raw scores of a strip to softmax probabilities in place: each row's max, then exp(score −
/// max) and 1 / sum over its limit, while the strip is still in cache (a max folded into the
/// score kernel cost more than this extra pass).
inline void softmax_strip(ScoreStrip& strip, int rows) {
  for (int r = 0; r < rows; ++r) {
    if (strip.limit[r] == 0) continue;
    const float max = detail::row_max(strip.values.data() + r * strip.stride, strip.limit[r]);
    const float sum =
        detail::exp_shifted(strip.values.data() + r * strip.stride, strip.limit[r], max);
    strip.inv_sum[r] = 1.0f / sum;
  }
}

/// Softmax probabilities of `rows` query rows q (row-major rows × d, pre-scaled by 1/sqrt(d))
/// over the window keys `keys`, causal (see score_rows).
inline void score_strip(const PackedKeys& keys, const float* q, int rows, const int64_t* visible,
                        ScoreStrip& strip) {
  score_rows(keys, q, rows, visible, strip);
  softmax_strip(strip, rows);
}

/// The strip of a window from the raw scores of every held key (`all`, from score_rows over
/// keys packed with the whole head as their one range): row r of `window` holds the scores of
/// the keys in `ranges` (ascending head indices, concatenated: the window index of PackedKeys)
/// that it sees, then softmax_strip. Equal, bit for bit, to score_strip over the window's own
/// packed keys: each score is the same dot product, and the max and sums run in the same order.
inline void window_strip(const ScoreStrip& all, int rows,
                         const std::vector<std::pair<int64_t, int64_t>>& ranges,
                         ScoreStrip& window) {
  int64_t size = 0;
  for (const auto& range : ranges) size += range.second - range.first;
  window.limit.assign(rows, 0);
  window.stride = (size + kScorePanel - 1) / kScorePanel * kScorePanel;
  window.values.resize(static_cast<std::size_t>(rows) * window.stride);
  window.inv_sum.assign(rows, 0.0f);
  for (int r = 0; r < rows; ++r) {
    float* dst = window.values.data() + r * window.stride;
    for (const auto& range : ranges) {
      const int64_t end = std::min(range.second, all.limit[r]);
      if (end <= range.first) break;  // ranges ascend: none further is visible
      std::copy(all.row(r) + range.first, all.row(r) + end, dst + window.limit[r]);
      window.limit[r] += end - range.first;
    }
  }
  softmax_strip(window, rows);
}

/// Folds the probabilities of every row into out[j] for each window key j with
/// fold(out + j0, probabilities + j0, n, 1 / row sum), rows in order (so a sum is deterministic).
/// Column blocks keep `out` in L1 while every row visits it; keys no row sees keep their value.
template <class Fold>
inline void fold_probabilities(const ScoreStrip& strip, int rows, float* out, Fold fold) {
  constexpr int64_t kBlock = 2048;
  for (int64_t j0 = 0; j0 < strip.stride; j0 += kBlock) {
    for (int r = 0; r < rows; ++r) {
      const int64_t n = std::min(strip.limit[r], j0 + kBlock) - j0;
      if (n > 0) fold(out + j0, strip.row(r) + j0, n, strip.inv_sum[r]);
    }
  }
}

/// best[j] = max(best[j], max over rows of the probability of window key j) (KVzip).
inline void max_probabilities(const ScoreStrip& strip, int rows, float* best) {
  // A lambda, not the function's address: its type fixes the call, so it inlines.
  fold_probabilities(strip, rows, best, [](float* o, const float* p, int64_t n, float scale) {
    detail::max_scaled(o, p, n, scale);
  });
}

/// sums[j] += the probabilities of window key j over the rows (SnapKV); a negative sums[j]
/// (unscored) starts at 0.
inline void sum_probabilities(const ScoreStrip& strip, int rows, float* sums) {
  fold_probabilities(strip, rows, sums, [](float* o, const float* p, int64_t n, float scale) {
    detail::sum_scaled(o, p, n, scale);
  });
}

/// Softmax probabilities of `rows` query rows (row-major rows × d, pre-scaled by 1/sqrt(d))
/// over the keys of `head` inside `ranges`, causal (row r sees indices < visible[r]).
/// Calls reduce(row, key_index, probability) for every visible key in the ranges.
template <class Rows, class Reduce>
void for_each_probability(const Rows& head, int d, const float* q, int rows, const int64_t* visible,
                          const std::vector<std::pair<int64_t, int64_t>>& ranges, Reduce&& reduce) {
  PackedKeys keys;
  keys.pack(head, d, ranges);
  ScoreStrip strip;
  for (int r0 = 0; r0 < rows; r0 += kScoreRows) {
    const int n = std::min(kScoreRows, rows - r0);
    score_strip(keys, q + static_cast<std::size_t>(r0) * d, n, visible + r0, strip);
    for (int r = 0; r < n; ++r) {
      const float* p = strip.row(r);
      for (std::size_t i = 0; i < keys.ranges().size(); ++i) {
        const auto& range = keys.ranges()[i];
        const int64_t base = keys.offset(i);
        const int64_t end = std::min(range.second - range.first, strip.limit[r] - base);
        for (int64_t t = 0; t < end; ++t) {
          reduce(r0 + r, range.first + t, p[base + t] * strip.inv_sum[r]);
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace kvpack
