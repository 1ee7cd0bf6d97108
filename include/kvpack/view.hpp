/// \file view.hpp
/// \brief Strided views of per-token, per-head activations (K, V, Q, attention output).
///
/// A view is [tokens × heads × head_dim] with element strides for tokens and heads, so both the
/// token-major "NHD" layout and the heads-first "HND" layout (and padded variants) are accepted
/// without a copy. The head_dim axis must be contiguous (stride 1).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "config.hpp"
#include "detail/convert.hpp"
#include "error.hpp"
#include "half.hpp"

namespace kvpack {

/// Element type of a view.
enum class DType { kF32, kF16, kBF16 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    default:
      return "bf16";
  }
}

namespace detail {

template <class T>
inline constexpr bool kUnsupportedElement = false;

/// The DType of an element type: float, kvpack::Half, kvpack::BFloat16, uint16_t (fp16 bits, as
/// engines hold fp16 in 16-bit integers) and, where the compiler has it, _Float16. Any other
/// type fails to compile here (not at link time).
template <class T>
struct DTypeOf {
  static_assert(kUnsupportedElement<T>,
                "kvpack views hold float, kvpack::Half, kvpack::BFloat16, uint16_t (fp16 bits) or "
                "_Float16 elements; for bf16 bits in uint16_t pass DType::kBF16 explicitly");
};
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kF32;
};
template <>
struct DTypeOf<Half> {
  static constexpr DType value = DType::kF16;
};
template <>
struct DTypeOf<BFloat16> {
  static constexpr DType value = DType::kBF16;
};
template <>
struct DTypeOf<uint16_t> {
  static constexpr DType value = DType::kF16;
};
#if defined(__FLT16_MANT_DIG__) && !defined(__CUDACC__)
template <>
struct DTypeOf<_Float16> {
  static constexpr DType value = DType::kF16;
};
#endif

template <class T>
constexpr DType dtype_of() {
  return DTypeOf<std::remove_cv_t<T>>::value;
}

}  // namespace detail

/// \brief Read-only view of activations (keys, values or queries) in fp32, fp16 or bf16.
class ActivationView {
 public:
  ActivationView() = default;
  /// \param token_stride, head_stride element strides; the head_dim axis is contiguous.
  template <class T>
  ActivationView(const T* data, int64_t tokens, int64_t heads, int64_t head_dim,
                 int64_t token_stride, int64_t head_stride)
      : data_(data),
        dtype_(detail::dtype_of<T>()),
        tokens_(tokens),
        heads_(heads),
        head_dim_(head_dim),
        token_stride_(token_stride),
        head_stride_(head_stride) {}

  /// A raw buffer of `dtype` elements (e.g. bf16 bits held in uint16_t); strides as above.
  ActivationView(const void* data, DType dtype, int64_t tokens, int64_t heads, int64_t head_dim,
                 int64_t token_stride, int64_t head_stride)
      : data_(data),
        dtype_(dtype),
        tokens_(tokens),
        heads_(heads),
        head_dim_(head_dim),
        token_stride_(token_stride),
        head_stride_(head_stride) {}

  /// Token-major contiguous layout: element (t, h, i) at ((t * heads) + h) * head_dim + i.
  template <class T>
  static ActivationView nhd(const T* data, int64_t tokens, int64_t heads, int64_t head_dim) {
    return ActivationView(data, tokens, heads, head_dim, heads * head_dim, head_dim);
  }
  /// Heads-first contiguous layout: element (t, h, i) at ((h * tokens) + t) * head_dim + i.
  template <class T>
  static ActivationView hnd(const T* data, int64_t tokens, int64_t heads, int64_t head_dim) {
    return ActivationView(data, tokens, heads, head_dim, head_dim, tokens * head_dim);
  }

  const void* data() const { return data_; }
  DType dtype() const { return dtype_; }
  int64_t tokens() const { return tokens_; }
  int64_t heads() const { return heads_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t token_stride() const { return token_stride_; }
  int64_t head_stride() const { return head_stride_; }

  /// Converts row (t, h) to fp32 into dst[0 .. head_dim).
  void load(int64_t t, int64_t h, float* dst) const {
    const int64_t offset = t * token_stride_ + h * head_stride_;
    switch (dtype_) {
      case DType::kF32:
        detail::load_row(static_cast<const float*>(data_) + offset, dst, head_dim_);
        break;
      case DType::kF16:
        detail::load_row(static_cast<const Half*>(data_) + offset, dst, head_dim_);
        break;
      case DType::kBF16:
        detail::load_row(static_cast<const BFloat16*>(data_) + offset, dst, head_dim_);
        break;
    }
  }

  /// Row (t, h) in place when the view holds fp32 (no conversion needed), else null.
  const float* f32_row(int64_t t, int64_t h) const {
    if (dtype_ != DType::kF32) return nullptr;
    return static_cast<const float*>(data_) + t * token_stride_ + h * head_stride_;
  }

  /// True when every element is finite (NaN/Inf scan; one pass over the data).
  bool all_finite() const {
    float row[1024];
    for (int64_t t = 0; t < tokens_; ++t) {
      for (int64_t h = 0; h < heads_; ++h) {
        load(t, h, row);
        float acc = 0.0f;
        for (int64_t i = 0; i < head_dim_; ++i) acc += row[i] * 0.0f;  // NaN iff any non-finite
        if (acc != 0.0f) return false;
      }
    }
    return true;
  }

 private:
  const void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  int64_t tokens_ = 0, heads_ = 0, head_dim_ = 0, token_stride_ = 0, head_stride_ = 0;
};

/// \brief Writable view for attention outputs, fp32 or fp16 (kvpack::Half, uint16_t bits,
/// _Float16); same layout rules as ActivationView. The CPU backend writes either; the CUDA
/// backend writes fp32 (an fp16 view is refused there with a kvpack::error).
class OutputView {
 public:
  OutputView() = default;
  template <class T>
  OutputView(T* data, int64_t tokens, int64_t heads, int64_t head_dim, int64_t token_stride,
             int64_t head_stride)
      : data_(data),
        dtype_(detail::dtype_of<T>()),
        tokens_(tokens),
        heads_(heads),
        head_dim_(head_dim),
        token_stride_(token_stride),
        head_stride_(head_stride) {
    static_assert(detail::dtype_of<T>() != DType::kBF16, "attention output is fp32 or fp16");
  }

  template <class T>
  static OutputView nhd(T* data, int64_t tokens, int64_t heads, int64_t head_dim) {
    return OutputView(data, tokens, heads, head_dim, heads * head_dim, head_dim);
  }
  template <class T>
  static OutputView hnd(T* data, int64_t tokens, int64_t heads, int64_t head_dim) {
    return OutputView(data, tokens, heads, head_dim, head_dim, tokens * head_dim);
  }

  /// Row (t, h) of an fp32 view (dtype() == DType::kF32).
  float* row(int64_t t, int64_t h) const {
    return static_cast<float*>(data_) + t * token_stride_ + h * head_stride_;
  }
  /// Writes head_dim fp32 values into row (t, h), converted to the view's element type.
  void store(int64_t t, int64_t h, const float* src) const {
    const int64_t offset = t * token_stride_ + h * head_stride_;
    if (dtype_ == DType::kF32) {
      float* dst = static_cast<float*>(data_) + offset;
      for (int64_t i = 0; i < head_dim_; ++i) dst[i] = src[i];
    } else {
      detail::store_row(src, static_cast<Half*>(data_) + offset, head_dim_);
    }
  }
  void* data() const { return data_; }
  DType dtype() const { return dtype_; }
  int64_t tokens() const { return tokens_; }
  int64_t heads() const { return heads_; }
  int64_t head_dim() const { return head_dim_; }

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  int64_t tokens_ = 0, heads_ = 0, head_dim_ = 0, token_stride_ = 0, head_stride_ = 0;
};

}  // namespace kvpack
