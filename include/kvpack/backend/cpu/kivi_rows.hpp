/// \file backend/cpu/kivi_rows.hpp
/// \brief The KIVI storage format on the CPU (Quantize, Compose<..., Quantize> over rows): its
/// head store, its attention kernels, and the container's quantize step. Included by
/// <kvpack/kvpack.hpp>; a translation unit without quantizing policies need not include it.
#pragma once

#include "quantized_attention.hpp"
#include "quantized_head_store.hpp"
#include "quantized_store_io.hpp"
#include "store_for.hpp"

namespace kvpack {
namespace detail {

template <>
inline constexpr bool kStoreFormatIncluded<StorageFormat::kRows, true> = true;

/// Rows quantized into KIVI blocks after a residual window of fp16 rows.
template <class T>
struct CpuStore<StorageFormat::kRows, true, T> {
  using type = QuantizedHeadStore;
};

}  // namespace detail
}  // namespace kvpack

#include "cache.hpp"
#include "cache_quantize.hpp"
