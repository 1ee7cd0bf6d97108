/// \file view.hpp
/// \brief Strided views of per-token, per-head activations (K, V, Q, attention output).
///
/// A view is [tokens × heads × head_dim] with element strides for tokens and heads, so both the
/// token-major "NHD" layout and the heads-first "HND" layout (and padded variants) are accepted
/// without a copy. The head_dim axis must be contiguous (stride 1).
#pragma once

#include <cmath>
#include <cstdint>

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
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::kF32;
}
template <>
constexpr DType dtype_of<Half>() {
  return DType::kF16;
}
template <>
constexpr DType dtype_of<BFloat16>() {
  return DType::kBF16;
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

/// \brief Writable fp32 view for attention outputs; same layout rules as ActivationView.
class OutputView {
 public:
  OutputView() = default;
  OutputView(float* data, int64_t tokens, int64_t heads, int64_t head_dim, int64_t token_stride,
             int64_t head_stride)
      : data_(data),
        tokens_(tokens),
        heads_(heads),
        head_dim_(head_dim),
        token_stride_(token_stride),
        head_stride_(head_stride) {}

  static OutputView nhd(float* data, int64_t tokens, int64_t heads, int64_t head_dim) {
    return OutputView(data, tokens, heads, head_dim, heads * head_dim, head_dim);
  }
  static OutputView hnd(float* data, int64_t tokens, int64_t heads, int64_t head_dim) {
    return OutputView(data, tokens, heads, head_dim, head_dim, tokens * head_dim);
  }

  float* row(int64_t t, int64_t h) const { return data_ + t * token_stride_ + h * head_stride_; }
  float* data() const { return data_; }
  int64_t tokens() const { return tokens_; }
  int64_t heads() const { return heads_; }
  int64_t head_dim() const { return head_dim_; }

 private:
  float* data_ = nullptr;
  int64_t tokens_ = 0, heads_ = 0, head_dim_ = 0, token_stride_ = 0, head_stride_ = 0;
};

}  // namespace kvpack
