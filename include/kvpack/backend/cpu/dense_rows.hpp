/// \file backend/cpu/dense_rows.hpp
/// \brief The row sources of dense fp16/fp32 K/V that attention and scoring read: contiguous
/// rows (DenseRows) and rows in pages (PagedRows, docs/page_formats.md).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../../config.hpp"
#include "../../detail/convert.hpp"
#include "../../half.hpp"

namespace kvpack {
namespace cpu {

/// \brief One head's dense stored keys/values (row-major size × d, element type T) and ascending
/// positions. Attention and scoring read rows through load_keys / load_values, so other row
/// formats (quantized, low-rank) can provide the same two calls. Dense row sources (this one and
/// PagedRows) also give the decode kernels each token's key(t) and value(t) row.
template <class T>
struct DenseRows {
  const T* k;
  const T* v;
  const int32_t* positions;
  int64_t size;
  int d;

  const T* key(int64_t t) const { return k + t * d; }
  const T* value(int64_t t) const { return v + t * d; }

  /// Keys [t0, t0 + n) as fp32 into dst (n × d).
  void load_keys(int64_t t0, int64_t n, float* dst) const {
    detail::load_row(k + t0 * d, dst, n * d);
  }
  /// Values [t0, t0 + n) as fp32 into dst (n × d).
  void load_values(int64_t t0, int64_t n, float* dst) const {
    detail::load_row(v + t0 * d, dst, n * d);
  }
};

/// Former name of DenseRows.
template <class T>
using HeadRows = DenseRows<T>;

/// \brief One head's dense keys/values in pages of 2^page_shift tokens (docs/page_formats.md):
/// token t is row (t mod page_tokens) of page t / page_tokens; rows of a page are `row_stride`
/// elements apart (head_dim for kvpack's own pages and HND pages, kv_heads × head_dim for NHD
/// pages), keys from k_pages[i], values from v_pages[i]. Positions ascending, size tokens.
template <class T>
struct PagedRows {
  const T* const* k_pages;
  const T* const* v_pages;
  int page_shift;
  int64_t row_stride;
  const int32_t* positions;
  int64_t size;
  int d;

  int64_t page_tokens() const { return int64_t{1} << page_shift; }
  int64_t offset(int64_t t) const { return (t & (page_tokens() - 1)) * row_stride; }
  const T* key(int64_t t) const { return k_pages[t >> page_shift] + offset(t); }
  const T* value(int64_t t) const { return v_pages[t >> page_shift] + offset(t); }
  int64_t run(int64_t t) const { return page_tokens() - (t & (page_tokens() - 1)); }

  void load_keys(int64_t t0, int64_t n, float* dst) const { load(t0, n, dst, k_pages); }
  void load_values(int64_t t0, int64_t n, float* dst) const { load(t0, n, dst, v_pages); }

 private:
  void load(int64_t t0, int64_t n, float* dst, const T* const* pages) const {
    for (int64_t t = t0; t < t0 + n;) {
      const int64_t m = std::min(run(t), t0 + n - t);
      const T* src = pages[t >> page_shift] + offset(t);
      if (row_stride == d) {
        detail::load_row(src, dst, m * d);
      } else {
        for (int64_t i = 0; i < m; ++i) detail::load_row(src + i * row_stride, dst + i * d, d);
      }
      dst += m * d;
      t += m;
    }
  }
};

/// Whether a row source stores dense fp16/fp32 rows the decode kernels read directly
/// (DenseRows, PagedRows).
template <class Rows>
struct is_dense_rows : std::false_type {};
template <class T>
struct is_dense_rows<DenseRows<T>> : std::true_type {
  using element_type = T;
};
template <class T>
struct is_dense_rows<PagedRows<T>> : std::true_type {
  using element_type = T;
};

}  // namespace cpu
}  // namespace kvpack
