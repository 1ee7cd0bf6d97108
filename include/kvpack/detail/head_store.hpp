/// \file detail/head_store.hpp
/// \brief Ragged storage of one (layer, kv-head): its kept K/V rows and their positions.
#pragma once

#ifndef KVPACK_INTERNAL_INCLUDE_OK
#error "kvpack/detail/ headers are internal; include <kvpack/kvpack.hpp> instead"
#endif

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvpack {
namespace detail {

/// Rows are stored token-major (n × head_dim) in element type T, positions ascending.
template <class T>
struct HeadStore {
  std::vector<T> k, v;
  std::vector<int32_t> positions;

  int64_t size() const { return static_cast<int64_t>(positions.size()); }

  /// Bytes held: K and V rows plus one position per token.
  std::size_t bytes() const {
    return (k.size() + v.size()) * sizeof(T) + positions.size() * sizeof(int32_t);
  }

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
  }

  void clear() {
    std::vector<T>().swap(k);
    std::vector<T>().swap(v);
    std::vector<int32_t>().swap(positions);
  }
};

}  // namespace detail
}  // namespace kvpack
