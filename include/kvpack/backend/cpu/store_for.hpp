/// \file backend/cpu/store_for.hpp
/// \brief CpuStore: which CPU head store holds a policy's storage format. One specialization per
/// format, each in the header of its store (CUTLASS-style dispatch): a translation unit pays only
/// for the formats it includes, and a policy whose format is not included fails to compile with a
/// message naming the header.
#pragma once

#include "../../policy/policy_base.hpp"

namespace kvpack {
namespace detail {

template <StorageFormat Format, bool Quantized>
inline constexpr bool kStoreFormatIncluded = false;

/// \tparam Format the selection stage's StorageFormat; \tparam Quantized whether a Quantize
/// stage follows it (KIVI blocks for rows, a quantized basis for low-rank factors); \tparam T
/// storage_type of the rows (Half or float).
template <StorageFormat Format, bool Quantized, class T>
struct CpuStore {
  static_assert(kStoreFormatIncluded<Format, Quantized>,
                "the CPU store of this policy's format is not included: include "
                "<kvpack/backend/cpu/kivi_rows.hpp> (Quantize, Compose<..., Quantize>), "
                "<kvpack/backend/cpu/low_rank.hpp> (CrossLayerSVD, ChannelShrink), "
                "or <kvpack/kvpack.hpp> for every format");
};

}  // namespace detail
}  // namespace kvpack
