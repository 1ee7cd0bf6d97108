/// \file backend/cpu/low_rank.hpp
/// \brief The low-rank storage format on the CPU (CrossLayerSVD, ChannelShrink and their
/// Compose<..., Quantize>): its head store, attention on factors, and the container's factorize
/// step (which runs the policy's plan() and factor() hooks). Included by <kvpack/kvpack.hpp>.
#pragma once

#include "low_rank_attention.hpp"
#include "low_rank_head_store.hpp"
#include "low_rank_store_io.hpp"
#include "store_for.hpp"

namespace kvpack {
namespace detail {

template <>
inline constexpr bool kStoreFormatIncluded<StorageFormat::kLowRankFactors, false> = true;
template <>
inline constexpr bool kStoreFormatIncluded<StorageFormat::kLowRankFactors, true> = true;

/// Token bases shared by heads (fp16, or KIVI blocks when quantized) times per-head factors.
template <bool Quantized, class T>
struct CpuStore<StorageFormat::kLowRankFactors, Quantized, T> {
  using type = LowRankHeadStore;
};

}  // namespace detail
}  // namespace kvpack

#include "cache.hpp"
#include "cache_attend_low_rank.hpp"
#include "cache_factorize.hpp"
