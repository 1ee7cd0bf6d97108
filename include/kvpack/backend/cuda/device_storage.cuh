/// \file backend/cuda/device_storage.cuh
/// \brief Device storage of the CUDA cache: per-head buffers, the workspace layout, the policies
/// the backend implements, and packing of host views for upload.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../budget.hpp"
#include "../../config.hpp"
#include "../../detail/cache_front.hpp"
#include "../../detail/select.hpp"
#include "../../detail/validate.hpp"
#include "../../error.hpp"
#include "../../policy/compose.hpp"
#include "../../policy/identity.hpp"
#include "../../policy/l2_norm_evict.hpp"
#include "../../policy/policy_base.hpp"
#include "../../policy/quantize.hpp"
#include "../../shape.hpp"
#include "../../span.hpp"
#include "../../view.hpp"
#include "context.hpp"
#include "kernel_logic.hpp"
#include "kernels/append.cuh"
#include "kernels/attention.cuh"
#include "kernels/compact.cuh"
#include "kernels/score.cuh"
#include "kernels/select.cuh"

namespace kvpack {

namespace cuda {

/// A token basis A [tokens][rank] on the device, shared by the heads of a layer (ChannelShrink)
/// or of a group of layers (CrossLayerSVD), as detail::LowRankBasis on the CPU: rows
/// [0, quantized) in KIVI blocks per column (Compose<…, Quantize>: kernels/kivi.cuh's key
/// layout with head_dim = rank), the rest fp16 rows.
struct DeviceLowRankBasis {
  DeviceBuffer<uint8_t> blocks;  ///< [quantized / G][rank] blocks of format.block_bytes
  DeviceBuffer<Half> rows;       ///< [tokens − quantized][rank]
  int64_t tokens = 0;
  int64_t quantized = 0;
  int rank = 0;
  KiviFormat format{};
};

/// A device copy of `src` on `device`, enqueued on `stream` (the allocation itself is
/// synchronous).
template <class T>
DeviceBuffer<T> copy_on_device(const DeviceBuffer<T>& src, int device, cudaStream_t stream) {
  DeviceBuffer<T> copy(src.size(), device);
  if (!src.empty()) {
    check_cuda(
        cudaMemcpyAsync(copy.data(), src.data(), src.bytes(), cudaMemcpyDeviceToDevice, stream),
        "copy_on_device: cudaMemcpyAsync");
  }
  return copy;
}

/// Device storage of one (layer, kv-head). Tokens [0, quantized) are KIVI blocks (Quantize
/// only; kernels/kivi.cuh layout), tokens [0, factored) rows of the token bases times the
/// head's factors (low-rank policies only), the rest rows of T; positions cover all.
template <class T>
struct DeviceHead {
  DeviceBuffer<T> k, v;             ///< [row capacity][head_dim]: token first_row() + r in row r
  DeviceBuffer<int32_t> positions;  ///< [capacity], ascending over [0, size)
  DeviceBuffer<uint8_t> k_blocks;   ///< KIVI key blocks [quantized / G][head_dim] (+ capacity)
  DeviceBuffer<uint8_t> v_blocks;   ///< KIVI value blocks [quantized][head_dim / G] (+ capacity)
  DeviceBuffer<float> scores;       ///< query-scored policies: [capacity], as positions
  /// Low-rank policies: the token bases (keys pre-RoPE) and this head's factors B_k, B_v
  /// [rank][head_dim] of tokens [0, factored).
  std::shared_ptr<const DeviceLowRankBasis> key_basis, value_basis;
  DeviceBuffer<float> key_factor, value_factor;
  int64_t size = 0;
  int64_t quantized = 0;        ///< tokens held as blocks (a multiple of the KIVI group)
  int64_t factored = 0;         ///< tokens held as factors (low-rank policies)
  int64_t first_position = -1;  ///< positions[0] when size > 0 (kept on the host for checks)

  int64_t capacity() const { return static_cast<int64_t>(positions.size()); }
  /// Tokens before the first row of k / v.
  int64_t first_row() const { return quantized + factored; }
  int64_t rows() const { return size - first_row(); }
  int64_t row_capacity(int head_dim) const { return static_cast<int64_t>(k.size()) / head_dim; }
};

/// Offsets of sub-arrays carved from one workspace allocation (256-byte aligned).
class WorkspaceLayout {
 public:
  template <class T>
  std::size_t add(std::size_t count) {
    offset_ = (offset_ + 255) / 256 * 256;
    const std::size_t at = offset_;
    offset_ += count * sizeof(T);
    return at;
  }
  std::size_t bytes() const { return offset_; }

 private:
  std::size_t offset_ = 0;
};

/// True for policies that keep every row as appended (BasicIdentity): no score, row storage,
/// nothing quantized (SFINAE-friendly: false for types without the traits).
template <class P, class = void>
struct is_keep_all_policy : std::false_type {};
template <class P>
struct is_keep_all_policy<P, std::void_t<typename P::storage_type>>
    : std::bool_constant<P::score_source == ScoreSource::kNone &&
                         P::storage_format == StorageFormat::kRows &&
                         !detail::PolicyStages<P>::quantized> {};

/// True for eviction policies scored per token from K/V alone (static token_score), as opposed
/// to policies that score with observed queries.
template <class P, class = void>
struct is_token_score_policy : std::false_type {};
template <class P>
struct is_token_score_policy<P, std::void_t<typename P::storage_type>>
    : std::bool_constant<is_eviction_policy_v<P> &&
                         detail::has_token_score<P, typename P::storage_type>::value &&
                         P::score_source == ScoreSource::kKeyValue> {};

/// Eviction policies scored by position alone (StreamingLLM): position_score(position, last).
template <class P>
struct is_position_score_policy
    : std::bool_constant<is_eviction_policy_v<P> && P::score_source == ScoreSource::kPosition> {};

/// Eviction by head (HeadLevelEvict): a head keeps all its tokens or only the protected ones,
/// decided on the host from HeadScores; no token is scored.
template <class P>
struct is_head_level_policy
    : std::bool_constant<is_eviction_policy_v<P> && P::score_source == ScoreSource::kHeadScores> {};

/// Eviction scored by observed queries, reduced by their maximum (ReconstructionEvict, KVzip)
/// or their sum (SnapKV): observe() keeps one score per held token on the device.
template <class P>
struct is_query_scored_policy
    : std::bool_constant<is_eviction_policy_v<P> &&
                         P::score_source == ScoreSource::kObservedQueries> {};

/// Eviction scored from hidden states by a learned scorer (KVzap): observe_hidden() keeps one
/// score per held token on the device.
template <class P>
struct is_hidden_scored_policy
    : std::bool_constant<is_eviction_policy_v<P> && P::score_source == ScoreSource::kHiddenStates> {
};

/// SimLayerKV's lazy layers (LazyLayerDrop) on fp16 rows: observe() measures each layer's
/// attention mass on the policy's kept set; compress() trims lazy layers to it.
template <class P, class = void>
struct is_lazy_layer_policy : std::false_type {};
template <class P>
struct is_lazy_layer_policy<P, std::void_t<typename P::storage_type>>
    : std::bool_constant<
          std::is_base_of_v<PolicyBase, P> && P::score_source == ScoreSource::kLayerMass &&
          P::storage_format == StorageFormat::kRows && !detail::PolicyStages<P>::quantized> {};

/// Low-rank policies (CrossLayerSVD, ChannelShrink; alone, or with KIVI bases as
/// Compose<…, Quantize>): compress() factors on the device by the policy's `factorization`
/// trait (kTruncatedSvd: Gram matrix and eigenvectors, cuBLAS and cuSOLVER; kProjection: one
/// GEMM with the policy's projection).
template <class P, class = void>
struct is_low_rank_policy : std::false_type {};
template <class P>
struct is_low_rank_policy<P, std::void_t<typename P::storage_type>>
    : std::bool_constant<detail::PolicyStages<P>::selection::storage_format ==
                         StorageFormat::kLowRankFactors> {};

/// Selection stages the CUDA cache implements: eviction scored per token from K/V (L2NormEvict)
/// or by position (StreamingLLM) - the scoring hook must be a KVPACK_HOST_DEVICE function - by
/// the probabilities of observed queries (ReconstructionEvict, KVzip and KVzip+; SnapKV), by a
/// hidden-state scorer (KVzap), eviction by head (HeadLevelEvict) and lazy layers
/// (LazyLayerDrop).
template <class P>
inline constexpr bool supports_selection_v =
    is_token_score_policy<P>::value || is_position_score_policy<P>::value ||
    is_head_level_policy<P>::value || is_query_scored_policy<P>::value ||
    is_hidden_scored_policy<P>::value || is_lazy_layer_policy<P>::value;

/// A selection stage that keeps every row (BasicIdentity, or Quantize as its own selection):
/// no scores, row storage. Said by the hooks, not by naming a policy.
template <class S>
inline constexpr bool keeps_every_row_v =
    S::score_source == ScoreSource::kNone&& S::storage_format == StorageFormat::kRows;

/// Policies the CUDA cache implements: a supported selection stage, or one that keeps every row,
/// alone or followed by Quantize (BasicIdentity, Quantize, Compose<A, Quantize>).
template <class P, class S = typename detail::PolicyStages<P>::selection>
inline constexpr bool supports_policy_v =
    supports_selection_v<S> || keeps_every_row_v<S> || is_low_rank_policy<P>::value;

/// Bytes of one element of `dtype`.
inline std::size_t dtype_bytes(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

/// Copies the rows of a host view into `dst`, packed token-major (t, h, i) in its own dtype,
/// and returns the matching view of `device_data` (where `dst` will be uploaded).
inline ActivationView pack_view(const ActivationView& x, unsigned char* dst,
                                const void* device_data) {
  const std::size_t es = dtype_bytes(x.dtype());
  const auto* src = static_cast<const unsigned char*>(x.data());
  const std::size_t row_bytes = static_cast<std::size_t>(x.head_dim()) * es;
  for (int64_t t = 0; t < x.tokens(); ++t) {
    for (int64_t h = 0; h < x.heads(); ++h) {
      const int64_t offset = t * x.token_stride() + h * x.head_stride();
      std::memcpy(dst + static_cast<std::size_t>(t * x.heads() + h) * row_bytes,
                  src + offset * static_cast<int64_t>(es), row_bytes);
    }
  }
  const int64_t heads = x.heads(), d = x.head_dim();
  switch (x.dtype()) {
    case DType::kF32:
      return ActivationView::nhd(static_cast<const float*>(device_data), x.tokens(), heads, d);
    case DType::kF16:
      return ActivationView::nhd(static_cast<const Half*>(device_data), x.tokens(), heads, d);
    default:
      return ActivationView::nhd(static_cast<const BFloat16*>(device_data), x.tokens(), heads, d);
  }
}

/// The queries of an attend() or observe() call on the device: their positions (int32) and
/// their rows as fp32 [tokens][q_heads][head_dim]. add_upload() places in the caller's workspace
/// layout what is uploaded (positions, the conversion's per-head targets, packed host rows),
/// add_device() the fp32 rows; stage() fills the staging area, convert() enqueues the conversion
/// once the staging area is uploaded (and, for device positions, their narrowing to int32).
class QueryUpload {
 public:
  QueryUpload(const ActivationView& q, int q_heads, int head_dim, bool host)
      : q_(q), q_heads_(q_heads), head_dim_(head_dim), host_(host) {}

  void add_upload(WorkspaceLayout& layout) {
    const int64_t rows = q_.tokens() * q_heads_;
    at_positions_ = layout.add<int32_t>(q_.tokens());
    at_targets_ = layout.add<float*>(q_heads_);
    at_rows_ = layout.add<unsigned char>(host_ ? rows * head_dim_ * dtype_bytes(q_.dtype()) : 0);
  }
  void add_device(WorkspaceLayout& layout) {
    at_fp32_ = layout.add<float>(q_.tokens() * q_heads_ * head_dim_);
  }

  /// Fills positions, targets and (host input) the packed rows into `stage`, whose upload lands
  /// at the workspace `ws`.
  void stage(Positions positions, unsigned char* stage, unsigned char* ws) {
    device_positions_ = positions.on_device() ? positions : Positions();
    auto* p = reinterpret_cast<int32_t*>(stage + at_positions_);
    for (int64_t t = 0; t < q_.tokens() && !positions.on_device(); ++t) {
      p[t] = static_cast<int32_t>(positions[t]);
    }
    auto* targets = reinterpret_cast<float**>(stage + at_targets_);
    for (int h = 0; h < q_heads_; ++h) targets[h] = q(ws) + static_cast<int64_t>(h) * head_dim_;
    device_view_ = host_ ? pack_view(q_, stage + at_rows_, ws + at_rows_) : q_;
  }

  /// Enqueues the conversion of the (uploaded) rows to fp32.
  void convert(unsigned char* ws, cudaStream_t stream) const {
    launch_convert_rows(device_view_, reinterpret_cast<float* const*>(ws + at_targets_),
                        static_cast<int64_t>(q_heads_) * head_dim_, stream);
    if (device_positions_.on_device()) {
      launch_narrow_positions(device_positions_, reinterpret_cast<int32_t*>(ws + at_positions_),
                              stream);
    }
  }

  float* q(unsigned char* ws) const { return reinterpret_cast<float*>(ws + at_fp32_); }
  const int32_t* positions(unsigned char* ws) const {
    return reinterpret_cast<const int32_t*>(ws + at_positions_);
  }

 private:
  ActivationView q_;
  ActivationView device_view_ = q_;
  Positions device_positions_;  ///< the caller's positions when they are in device memory
  int q_heads_, head_dim_;
  bool host_;
  std::size_t at_positions_ = 0, at_targets_ = 0, at_rows_ = 0, at_fp32_ = 0;
};

}  // namespace cuda

}  // namespace kvpack
