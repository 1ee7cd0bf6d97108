/// \file span.hpp
/// \brief A minimal contiguous read-only view (C++17 has no std::span) and Positions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
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

/// \brief Token positions, read in place from the caller's array: int64 or int32 elements
/// (engines keep either), contiguous. Converting constructors from pointer + count and from
/// std::vector; any other element type is a compile error naming the accepted ones.
/// Positions::device() views an array in GPU memory: the CUDA cache's attend(), observe(),
/// attend_observe() and KVCacheBatch::attend() read it there; every other call refuses it.
class Positions {
 public:
  constexpr Positions() = default;
  template <class T>
  Positions(const T* data, std::size_t size) : data_(data), size_(size), wide_(sizeof(T) == 8) {
    static_assert(
        std::is_integral_v<T> && std::is_signed_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
        "kvpack::Positions holds int32_t or int64_t positions");
  }
  template <class T, class A>
  Positions(const std::vector<T, A>& v) : Positions(v.data(), v.size()) {}  // NOLINT: implicit
  Positions(Span<const int64_t> s) : Positions(s.data(), s.size()) {}       // NOLINT: implicit

  /// `size` positions in the memory of the CUDA cache's device, read there in stream order (keep
  /// them unchanged until the call's work has run); the host reads only a copy, while the
  /// context's device value checks are on.
  template <class T>
  static Positions device(const T* data, std::size_t size) {
    Positions p(data, size);
    p.device_ = true;
    return p;
  }

  /// Position i as int64 (whatever the element type); host positions only.
  constexpr int64_t operator[](std::size_t i) const {
    return wide_ ? static_cast<const int64_t*>(data_)[i]
                 : static_cast<int64_t>(static_cast<const int32_t*>(data_)[i]);
  }
  constexpr std::size_t size() const { return size_; }
  constexpr bool empty() const { return size_ == 0; }
  /// The caller's array and whether its elements are int64 (else int32).
  constexpr const void* data() const { return data_; }
  constexpr bool is_int64() const { return wide_; }
  /// Whether the array is in device memory (Positions::device).
  constexpr bool on_device() const { return device_; }

 private:
  const void* data_ = nullptr;
  std::size_t size_ = 0;
  bool wide_ = true;
  bool device_ = false;
};

}  // namespace kvpack
