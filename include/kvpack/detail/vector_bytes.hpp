/// \file detail/vector_bytes.hpp
/// \brief Bytes of std::vectors: what they hold (size) and what they have allocated (capacity).
/// bytes() and reserved_bytes() of every CPU store are these two over the same members.
#pragma once

// clang-format off
#include "internal.hpp"  // first, before anything defines the macro it checks
// clang-format on

#include <cstddef>

namespace kvpack {
namespace detail {

/// Σ size() · sizeof(element) over the vectors.
template <class... Vectors>
std::size_t held_bytes(const Vectors&... v) {
  return (std::size_t{0} + ... + (v.size() * sizeof(typename Vectors::value_type)));
}

/// Σ capacity() · sizeof(element) over the vectors: the heap they occupy.
template <class... Vectors>
std::size_t allocated_bytes(const Vectors&... v) {
  return (std::size_t{0} + ... + (v.capacity() * sizeof(typename Vectors::value_type)));
}

/// Makes room for `count` elements in each vector, growing capacity geometrically (at least
/// doubling) as push_back would: reserve(count) alone allocates exactly, so calling it before
/// every small append (one decode token) would copy the whole vector each time.
template <class... Vectors>
void reserve_geometric(std::size_t count, Vectors&... v) {
  ((v.capacity() < count ? v.reserve(count > 2 * v.capacity() ? count : 2 * v.capacity()) : void()),
   ...);
}

/// Releases the growth slack of every vector (capacity becomes size).
template <class... Vectors>
void shrink_all(Vectors&... v) {
  (v.shrink_to_fit(), ...);
}

}  // namespace detail
}  // namespace kvpack
