/// \file backend/cpu/low_rank_basis.hpp
/// \brief The token basis A [tokens][rank] of a low-rank cache (CrossLayerSVD, ChannelShrink), in
/// pages of the cache's PagePool, and the range rule its values are stored by.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "../../config.hpp"
#include "../../detail/convert.hpp"
#include "../../error.hpp"
#include "../../half.hpp"
#include "../../page_pool.hpp"
#include "../../quant/quant_block.hpp"
#include "page_list.hpp"
#include "page_sizes.hpp"
#include "quantize.hpp"

namespace kvpack {
namespace detail {

/// \brief Token basis shared by every head of one layer (ChannelShrink) or of a group of
/// layers (CrossLayerSVD). Immutable once built; counted once by the container. Its pages go back
/// to the pool when the last head holding it lets go (a recompress, a clear, the cache's end).
///
/// fp16 rows like the dense cache, or (Compose<…, Quantize>) KIVI blocks: one per basis column
/// over each whole group of `group` rows, as KIVI stores keys. Per column, because the columns
/// differ in scale (SVD directions ordered by singular value, PCA latents by variance) while a
/// column varies smoothly over tokens; a row block would let the first column set every step.
/// The last tokens % group rows stay fp16. Page layout: BasisPageLayout (page_sizes.hpp).
struct LowRankBasis {
  int64_t tokens = 0;
  int rank = 0;
  int bits = 0;  ///< 0: every row fp16; 2, 4 or 8: whole groups of rows quantized
  int group = 32;
  PageList pages;  ///< the blocks' pages, then the fp16 rows' pages

  LowRankBasis() = default;
  LowRankBasis(LowRankBasis&&) noexcept = default;
  LowRankBasis& operator=(LowRankBasis&&) noexcept = default;
  // Bases are shared (shared_ptr<const LowRankBasis>), never copied: a copy would take pages.
  LowRankBasis(const LowRankBasis&) = delete;
  LowRankBasis& operator=(const LowRankBasis&) = delete;

  int64_t quantized_rows() const { return bits == 0 ? 0 : tokens / group * group; }
  BasisPageLayout layout() const {
    return {pages.page_bytes(), bits == 0 ? 0 : kivi_block_bytes(bits, group),
            quantized_rows() / group * rank};
  }
  /// Whole pages and the page table.
  std::size_t bytes() const { return pages.bytes(); }
  std::size_t reserved_bytes() const { return pages.reserved_bytes(); }

  /// Holds `a` (n × r, row-major fp32) in pages of `pool`: fp16 when bits_ is 0, else quantized
  /// as above. Throws kvpack::error when the pool runs out, the basis unchanged.
  void assign(const float* a, int64_t n, int r, int bits_, int group_,
              std::shared_ptr<PagePool> pool) {
    LowRankBasis fresh = with_pages(n, r, bits_, group_, std::move(pool));
    const int64_t q = fresh.quantized_rows();
    if (q > 0) {
      const bool known = dispatch_quant(bits_, group_, [&](auto b, auto g) {
        constexpr int B = decltype(b)::value, G = decltype(g)::value;
        std::vector<QuantBlock<B, G>> row_group(static_cast<std::size_t>(r));
        for (int64_t grp = 0; grp < q / G; ++grp) {
          cpu::quantize_key_group<B, G>(a + grp * G * r, r, row_group.data());
          for (int c = 0; c < r; ++c) {
            std::memcpy(fresh.block(grp * r + c), &row_group[c], sizeof(QuantBlock<B, G>));
          }
        }
      });
      if (!known) {  // the policies validate their knobs first: a guard, not a path
        throw error(concat("LowRankBasis: bits = ", bits_, ", group = ", group_,
                           ", expected 2, 4 or 8 bits and a group of 16, 32, 64 or 128"));
      }
    }
    fresh.for_each_half_run(
        0, (n - q) * r, [&](Half* run, int64_t e, int64_t m) { store_row(a + q * r + e, run, m); });
    *this = std::move(fresh);
  }

  /// assign() of stored values: `blocks` [quantized / group][rank] and fp16 `rows`
  /// [tokens − quantized][rank], as gather() gives them (a saved cache).
  void assign_stored(int64_t n, int r, int bits_, int group_, const std::vector<uint8_t>& blocks,
                     const std::vector<Half>& rows, std::shared_ptr<PagePool> pool) {
    LowRankBasis fresh = with_pages(n, r, bits_, group_, std::move(pool));
    const BasisPageLayout at = fresh.layout();
    for (int64_t i = 0; i < at.blocks; ++i) {
      std::memcpy(fresh.block(i), blocks.data() + i * at.block_bytes, at.block_bytes);
    }
    fresh.for_each_half_run(0, static_cast<int64_t>(rows.size()),
                            [&](Half* run, int64_t e, int64_t m) {
                              std::memcpy(run, rows.data() + e, sizeof(Half) * m);
                            });
    *this = std::move(fresh);
  }

  /// The blocks and fp16 rows as two contiguous arrays (what assign_stored() takes).
  void gather(std::vector<uint8_t>& blocks, std::vector<Half>& rows) const {
    const BasisPageLayout at = layout();
    blocks.resize(static_cast<std::size_t>(at.blocks) * at.block_bytes);
    for (int64_t i = 0; i < at.blocks; ++i) {
      std::memcpy(blocks.data() + i * at.block_bytes, block(i), at.block_bytes);
    }
    rows.resize(static_cast<std::size_t>(tokens - quantized_rows()) * rank);
    for_each_half_run(0, static_cast<int64_t>(rows.size()),
                      [&](const Half* run, int64_t e, int64_t m) {
                        std::memcpy(rows.data() + e, run, sizeof(Half) * m);
                      });
  }

  /// Rows [begin, begin + n) in fp32 (row-major × rank).
  void load(int64_t begin, int64_t n, float* out) const {
    const BasisPageLayout at = layout();
    const int64_t q = quantized_rows();
    const int64_t qend = std::min(begin + n, q);
    if (begin < qend) {
      (void)dispatch_quant(bits, group, [&](auto b, auto g) {  // bits checked by assign()
        constexpr int B = decltype(b)::value, G = decltype(g)::value;
        for (int64_t t = begin; t < qend;) {
          float* row = out + (t - begin) * rank;
          const int64_t first = t / G * rank;  // block of column 0 in t's row group
          auto blk = [&](int c) -> const QuantBlock<B, G>& {
            const PageOffset p = at.block_at(first + c);
            return *reinterpret_cast<const QuantBlock<B, G>*>(pages.data[p.page] + p.offset);
          };
          if (t % G == 0 && t + G <= qend) {
            for (int c = 0; c < rank; ++c) dequantize_block_ref(blk(c), row + c, rank);
            t += G;
          } else {
            for (int c = 0; c < rank; ++c) row[c] = dequantize_ref(blk(c), static_cast<int>(t % G));
            ++t;
          }
        }
      });
    }
    const int64_t fbegin = std::max(begin, q);
    if (fbegin < begin + n) {
      float* dst = out + (fbegin - begin) * rank;
      const int64_t e0 = (fbegin - q) * rank;
      for_each_half_run(
          e0, (begin + n - fbegin) * rank,
          [&](const Half* run, int64_t e, int64_t m) { load_row(run, dst + (e - e0), m); });
    }
  }

  /// First byte of block i (row group i / rank, column i % rank).
  const uint8_t* block(int64_t i) const {
    const PageOffset at = layout().block_at(i);
    return reinterpret_cast<const uint8_t*>(pages.data[at.page]) + at.offset;
  }

 private:
  /// A basis of n × r values with its pages taken from `pool` (contents unwritten). Throws
  /// kvpack::error when the pool runs out, having taken none.
  static LowRankBasis with_pages(int64_t n, int r, int bits, int group,
                                 std::shared_ptr<PagePool> pool) {
    LowRankBasis fresh;
    fresh.tokens = n;
    fresh.rank = r;
    fresh.bits = bits;
    fresh.group = group;
    fresh.pages.pool = std::move(pool);
    fresh.pages.resize(fresh.layout().pages((n - fresh.quantized_rows()) * r));
    fresh.pages.shrink_to_fit();  // immutable once written: an exact page table
    return fresh;
  }

  uint8_t* block(int64_t i) { return const_cast<uint8_t*>(std::as_const(*this).block(i)); }

  /// Calls f(run, e, m) for the fp16 elements [e0, e0 + count) in runs within one page: `run`
  /// holds elements [e, e + m) (writable when the basis is, while it is built).
  template <class F>
  void for_each_half_run(int64_t e0, int64_t count, F&& f) const {
    const BasisPageLayout at = layout();
    for (int64_t e = e0; e < e0 + count;) {
      const PageOffset p = at.half_at(e);
      const int64_t m = std::min(at.halves_per_page() - e % at.halves_per_page(), e0 + count - e);
      f(reinterpret_cast<const Half*>(pages.data[p.page] + p.offset), e, m);
      e += m;
    }
  }
  template <class F>
  void for_each_half_run(int64_t e0, int64_t count, F&& f) {
    std::as_const(*this).for_each_half_run(
        e0, count, [&](const Half* run, int64_t e, int64_t m) { f(const_cast<Half*>(run), e, m); });
  }
};

/// Largest magnitude a basis value is stored at. fp16 rows hold up to 65504; KIVI blocks of a
/// basis column store its minimum and its step (max − min) / (2^bits − 1) in fp16 as well, so
/// 2^15 keeps both in range with room for their directed rounding.
inline constexpr float kBasisLimit = 32768.0f;

/// The power of two a basis column whose largest magnitude is `peak` is divided by to fit
/// kBasisLimit (1 when it fits; see fit_basis_range). Throws kvpack::error, naming `where` and
/// the column, when `peak` is not finite. Every backend stores its bases by this rule.
inline float basis_column_scale(float peak, int column, const char* where) {
  if (!std::isfinite(peak)) {
    throw error(concat(where, ": low-rank basis column ", column,
                       " is not finite (inputs too large for fp32 products), expected finite "
                       "latents; scale the activations down"));
  }
  if (peak <= kBasisLimit) return 1.0f;
  return std::ldexp(1.0f, std::ilogb(peak / kBasisLimit) + 1);  // peak / scale <= limit
}

/// Range policy of a token basis (n × r, row-major fp32): scales each column whose largest
/// magnitude exceeds kBasisLimit by a power of two 2^-e so that it fits, and returns 2^e per
/// column (1 for the others); the caller multiplies the matching factor rows by it, which keeps
/// A·B. Powers of two are exact in fp32 and fp16, so a column already in range is untouched and
/// a scaled one keeps its relative precision. Latents of large activations (CSKV: values of
/// magnitude 8,200 over 128 channels project to ≈ 93,000) would otherwise be stored as inf.
/// Throws kvpack::error, naming `where`, when a value is not finite.
inline Eigen::VectorXf fit_basis_range(float* a, int64_t n, int r, const char* where) {
  Eigen::Map<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> m(a, n, r);
  Eigen::VectorXf scale = Eigen::VectorXf::Ones(r);
  for (int j = 0; j < r; ++j) {
    scale[j] = basis_column_scale(n == 0 ? 0.0f : m.col(j).cwiseAbs().maxCoeff(), j, where);
    if (scale[j] != 1.0f) m.col(j) /= scale[j];
  }
  return scale;
}

}  // namespace detail
}  // namespace kvpack
