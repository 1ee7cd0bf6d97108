/// \file backend/cpu/append_heads.hpp
/// \brief KVCache::append's storage step: a validated block of K/V rows handed to the head
/// stores of one layer, head by head.
#pragma once

#include <cstdint>
#include <vector>

#include "../../config.hpp"
#include "../../error.hpp"
#include "../../span.hpp"
#include "../../view.hpp"

namespace kvpack {
namespace detail {

/// \brief Appends k and v (tokens × kv_heads × head_dim views whose shapes and positions are
/// validated) at `positions` to store_at(h) for h < kv_heads. `check_values()` validates the
/// elements (throws kvpack::error at the first one that is not finite or exceeds `limit`).
///
/// Paged stores (`kPaged`: dense rows) take their pages for every head before writing any, so a
/// pool that runs out refuses the whole append (throws kvpack::error, nothing changed), and read
/// fp32 views in place (no staging copy: rows go from the caller's buffer straight into the
/// pages). When the pool has those pages free and the page tables room for them, the element check
/// rides on the conversion (the input is read once, not twice); a bad element then hands the pages
/// back and check_values() reports it, so the error and the unchanged cache are those of a check
/// made first. Other stores (and a pool or page table that must grow) are checked first and get
/// fp32 rows staged per head.
template <bool kPaged, class StoreAt, class CheckValues>
void append_heads(int kv_heads, int head_dim, const ActivationView& k, const ActivationView& v,
                  Positions positions, float limit, StoreAt&& store_at,
                  CheckValues&& check_values) {
  const int d = head_dim;
  const int64_t n = k.tokens();
  bool fused = false;
  if constexpr (kPaged) {
    // Fused only when neither the pool nor a page table grows: a refused append must leave
    // reserved_bytes() and the pool as they were.
    int64_t pages = 0;
    bool room = k.dtype() == DType::kF32 && v.dtype() == DType::kF32;
    for (int h = 0; h < kv_heads && room; ++h) {
      pages += store_at(h).pages_to_reserve(n);
      room = store_at(h).page_table_has_room(n);
    }
    fused = room && pages <= static_cast<int64_t>(store_at(0).pool->free_pages());
  }
  if (!fused) check_values();
  if constexpr (kPaged) {
    try {
      for (int h = 0; h < kv_heads; ++h) store_at(h).reserve(store_at(h).size() + n);
    } catch (...) {
      for (int h = 0; h < kv_heads; ++h) store_at(h).release_reserve();
      throw;
    }
    if (k.dtype() == DType::kF32 && v.dtype() == DType::kF32) {
      bool ok = true;
      for (int h = 0; h < kv_heads && ok; ++h) {
        ok = store_at(h).write_rows(k.f32_row(0, h), k.token_stride(), v.f32_row(0, h),
                                    v.token_stride(), n, d, limit);
      }
      if (!ok) {
        for (int h = 0; h < kv_heads; ++h) store_at(h).release_reserve();
        check_values();  // throws at the first bad element
        throw error("KVCache::append: an element is not finite or beyond the storage range");
      }
      for (int h = 0; h < kv_heads; ++h) store_at(h).commit_rows(positions, n);
      return;
    }
  }
  std::vector<float> k_rows(n * d), v_rows(n * d);
  for (int h = 0; h < kv_heads; ++h) {
    for (int64_t t = 0; t < n; ++t) {
      k.load(t, h, k_rows.data() + t * d);
      v.load(t, h, v_rows.data() + t * d);
    }
    store_at(h).append(k_rows.data(), v_rows.data(), positions, n, d);
  }
}

}  // namespace detail
}  // namespace kvpack
