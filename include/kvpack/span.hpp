/// \file span.hpp
/// \brief A minimal contiguous read-only view (C++17 has no std::span).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvpack {

/// \brief Pointer + length view over contiguous elements, constructible from std::vector.
/// \tparam T element type (usually `const int64_t` for positions).
template <class T>
class Span {
 public:
  constexpr Span() = default;
  constexpr Span(T* data, std::size_t size) : data_(data), size_(size) {}
  template <class U, class A>
  Span(const std::vector<U, A>& v) : data_(v.data()), size_(v.size()) {}  // NOLINT: implicit
  template <class U, class A>
  Span(std::vector<U, A>& v) : data_(v.data()), size_(v.size()) {}  // NOLINT: implicit

  constexpr T* data() const { return data_; }
  constexpr std::size_t size() const { return size_; }
  constexpr bool empty() const { return size_ == 0; }
  constexpr T& operator[](std::size_t i) const { return data_[i]; }
  constexpr T* begin() const { return data_; }
  constexpr T* end() const { return data_ + size_; }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

using Positions = Span<const int64_t>;

}  // namespace kvpack
