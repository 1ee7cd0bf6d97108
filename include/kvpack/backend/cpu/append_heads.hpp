/// \file backend/cpu/append_heads.hpp
/// \brief KVCache::append's storage step: a validated block of K/V rows handed to the head
/// stores of one layer, head by head.
#pragma once

#include <cstdint>
#include <vector>

#include "../../config.hpp"
#include "../../span.hpp"
#include "../../view.hpp"

namespace kvpack {
namespace detail {

/// \brief Appends k and v (tokens × kv_heads × head_dim views, already validated) at `positions`
/// to store_at(h) for h < kv_heads. Paged stores (`kPaged`: dense rows) take their pages for
/// every head before writing any, so a pool that runs out refuses the whole append (throws
/// kvpack::error, nothing changed), and read fp32 views in place (no staging copy: rows go from
/// the caller's buffer straight into the pages). Other stores get fp32 rows staged per head.
template <bool kPaged, class StoreAt>
void append_heads(int kv_heads, int head_dim, const ActivationView& k, const ActivationView& v,
                  Positions positions, StoreAt&& store_at) {
  const int d = head_dim;
  const int64_t n = k.tokens();
  if constexpr (kPaged) {
    try {
      for (int h = 0; h < kv_heads; ++h) store_at(h).reserve(store_at(h).size() + n);
    } catch (...) {
      for (int h = 0; h < kv_heads; ++h) store_at(h).release_reserve();
      throw;
    }
    if (k.dtype() == DType::kF32 && v.dtype() == DType::kF32) {
      for (int h = 0; h < kv_heads; ++h) {
        store_at(h).append_strided(k.f32_row(0, h), k.token_stride(), v.f32_row(0, h),
                                   v.token_stride(), positions, n, d);
      }
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
