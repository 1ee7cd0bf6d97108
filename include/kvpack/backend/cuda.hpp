/// \file backend/cuda.hpp
/// \brief KVCache<Policy, backend::Cuda>: ragged device storage per (layer, kv-head), CUDA
/// kernels for append / scoring / selection / compaction / attention. Compile with nvcc.
///
/// Same API and same answers as KVCache<Policy, backend::Cpu> for BasicIdentity and the
/// score-based eviction policies (L2NormEvict): identical validation and error messages (the
/// checks of detail/validate.hpp run on the host before any device work, so a failed call
/// changes nothing), bit-identical fp16 storage, the kept set of detail/select.hpp, identical
/// bytes(), and attention within fp32 rounding of the CPU's.
///
/// Design notes
/// - Inputs are host views by default (copied to the device: one packed upload per call); pass
///   MemorySpace::kDevice to read device-resident views in place (the finite/range check then
///   runs on the device and reports the same element and message as the host check). Positions
///   are always host arrays. attend() writes the output view in the same memory space as q.
/// - Storage: per (layer, kv-head) device buffers of capacity rows (geometric growth on
///   append); eviction compacts into exact-size new buffers, so evicted rows free their memory.
///   bytes() counts held rows, positions and bookkeeping exactly as the CPU cache does (the
///   bookkeeping with the CPU's per-head / per-layer sizes, so both backends report the same
///   numbers for the same content); reserved_bytes() adds the growth slack, workspace_bytes()
///   is the reusable scratch of append / attend / compress.
/// - Selection: per-head budgets are selected on the device (radix select on a 64-bit key that
///   encodes select_top_k's order, see kernels/select.cuh). The global-threshold scope copies
///   the scores and positions to the host and reuses detail::select_global, so its ragged
///   result is the CPU's by construction; compaction then runs on the device for both scopes.
/// - Every public call completes before it returns (one stream synchronisation at its end), so
///   a CUDA fault is reported by the call that caused it. Calls on one cache are serialised.
#pragma once

#if !defined(__CUDACC__)
#error \
    "kvpack/backend/cuda.hpp needs nvcc: compile this translation unit as CUDA (.cu)." \
    " Host-only code can include kvpack/backend/cuda/context.hpp."
#endif

// Eigen (pulled in by the CPU backend) declares defaulted members __host__ __device__, which
// nvcc reports as warning 20012; the annotation is harmless, so it is silenced for these headers.
#pragma nv_diagnostic push
#pragma nv_diag_suppress 20012
#include "../cache.hpp"
#pragma nv_diagnostic pop

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

#include "../budget.hpp"
#include "../config.hpp"
#include "../detail/cache_front.hpp"
#include "../detail/select.hpp"
#include "../detail/validate.hpp"
#include "../error.hpp"
#include "../policy/identity.hpp"
#include "../policy/l2_norm_evict.hpp"
#include "../policy/policy_base.hpp"
#include "../shape.hpp"
#include "../span.hpp"
#include "../view.hpp"
#include "cuda/context.hpp"
#include "cuda/kernel_logic.hpp"
#include "cuda/kernels/append.cuh"
#include "cuda/kernels/attention.cuh"
#include "cuda/kernels/compact.cuh"
#include "cuda/kernels/score.cuh"
#include "cuda/kernels/select.cuh"

namespace kvpack {
namespace cuda {

/// Device storage of one (layer, kv-head): `capacity` rows allocated, `size` held.
template <class T>
struct DeviceHead {
  DeviceBuffer<T> k, v;             ///< capacity x head_dim, row-major
  DeviceBuffer<int32_t> positions;  ///< capacity, ascending over [0, size)
  int64_t size = 0;
  int64_t first_position = -1;  ///< positions[0] when size > 0 (kept on the host for checks)

  int64_t capacity() const { return static_cast<int64_t>(positions.size()); }
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

/// True for BasicIdentity<S> (SFINAE-friendly: false for types without storage_type).
template <class P, class = void>
struct is_identity_policy : std::false_type {};
template <class P>
struct is_identity_policy<P, std::void_t<typename P::storage_type>>
    : std::is_same<P, BasicIdentity<typename P::storage_type>> {};

/// True for eviction policies scored per token from K/V alone (static token_score), as opposed
/// to policies that score with observed queries.
template <class P, class = void>
struct is_token_score_policy : std::false_type {};
template <class P>
struct is_token_score_policy<P, std::void_t<typename P::storage_type>>
    : std::bool_constant<is_eviction_policy_v<P> &&
                         detail::has_token_score<P, typename P::storage_type>::value &&
                         P::score_source == ScoreSource::kKeyValue> {};

/// Policies the CUDA cache implements: BasicIdentity and eviction policies scored per token
/// from K/V (L2NormEvict); token_score must be a KVPACK_HOST_DEVICE function.
template <class P>
inline constexpr bool supports_policy_v =
    is_identity_policy<P>::value || is_token_score_policy<P>::value;

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

}  // namespace cuda

/// \brief CUDA implementation of KVCache (see the file comment for the design).
/// \tparam Policy BasicIdentity<Half|float> or a score-based eviction policy (L2NormEvict).
///
/// The cache runs on a caller-owned cuda::CudaContext (device + stream), or on one it creates
/// on the current device. Move-only. Calls on one cache are serialised (a mutex guards the
/// workspace), so const calls may come from several threads.
template <class Policy>
class KVCache<Policy, backend::Cuda> : public detail::CacheFront<Policy> {
  static_assert(cuda::supports_policy_v<Policy>,
                "no CUDA implementation of this Policy: backend::Cuda implements BasicIdentity "
                "and eviction policies scored per token from K/V (L2NormEvict: an "
                "EvictionPolicy with a KVPACK_HOST_DEVICE static token_score); use backend::Cpu "
                "for the others (query-scored eviction, LazyLayerDrop, Quantize, Compose)");

 public:
  using backend_type = backend::Cuda;
  using typename detail::CacheFront<Policy>::storage_type;

 private:
  using Front = detail::CacheFront<Policy>;
  using Front::layers_;
  using Front::observed_;
  using Front::policy_;
  using Front::shape_;

 public:
  /// Validates the shape and the policy's knobs (as the CPU cache does; head_dim must also be
  /// 64 or 128), then creates a context on the current CUDA device.
  explicit KVCache(const ModelShape& shape, Policy policy = Policy{})
      : Front(shape, std::move(policy)) {
    validate_construction();
    int device = 0;
    cuda::check_cuda(cudaGetDevice(&device), "KVCache (CUDA): cudaGetDevice");
    owned_context_ = std::make_unique<cuda::CudaContext>(device);
    context_ = owned_context_.get();
    allocate_bookkeeping();
  }

  /// As above, on a caller-owned context that must outlive the cache.
  KVCache(const ModelShape& shape, Policy policy, cuda::CudaContext& context)
      : Front(shape, std::move(policy)), context_(&context) {
    validate_construction();
    allocate_bookkeeping();
  }

  KVCache(KVCache&&) noexcept = default;
  KVCache& operator=(KVCache&&) noexcept = default;
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  cuda::CudaContext& context() const { return *context_; }

  /// Appends a block of tokens to `layer`: k and v are tokens × kv_heads × head_dim (post-RoPE
  /// keys) in `space`, positions (host) strictly increasing and after the layer's last one.
  void append(int layer, const ActivationView& k, const ActivationView& v, Positions positions,
              MemorySpace space = MemorySpace::kHost) {
    constexpr const char* where = "KVCache::append";
    this->check_append(where, layer, k, v, positions);
    cuda::DeviceGuard guard(context_->device());
    std::lock_guard<std::mutex> lock(scratch_->mutex);
    check_space(where, "k", k.data(), space);
    check_space(where, "v", v.data(), space);
    check_values(where, "k", k, storage_limit(), space);
    check_values(where, "v", v, storage_limit(), space);
    append_unchecked(layer, k, v, positions, space);
  }

  /// Hands queries (tokens × q_heads × head_dim, post-RoPE) to policies that score with them.
  void observe(int layer, const ActivationView& q, Positions positions,
               MemorySpace space = MemorySpace::kHost) {
    constexpr const char* where = "KVCache::observe";
    cuda::DeviceGuard guard(context_->device());
    std::lock_guard<std::mutex> lock(scratch_->mutex);
    check_query(where, layer, q, positions, space);
    observed_ = true;
  }

  /// Applies the policy to everything held (see the CPU cache: repeated calls hold the budget).
  void compress() {
    this->check_compress();
    if constexpr (is_eviction_policy_v<Policy>) {
      cuda::DeviceGuard guard(context_->device());
      std::lock_guard<std::mutex> lock(scratch_->mutex);
      evict();
    }
  }

  /// Removes every token at a position > `last_position` from all layers (e.g. the repeat
  /// prompt of a scoring pass). Only tokens no compress() has evicted from can be rolled back.
  /// The rows' device memory stays reserved for the next appends (see reserved_bytes()).
  void truncate(int64_t last_position) {
    constexpr const char* where = "KVCache::truncate";
    cuda::DeviceGuard guard(context_->device());
    std::lock_guard<std::mutex> lock(scratch_->mutex);
    // Rows after last_position, per head: counted on a download of the positions of the layers
    // concerned (a head may hold a subset of the layer's positions after eviction).
    std::vector<std::vector<int32_t>> held(heads_.size());
    const cudaStream_t stream = context_->stream();
    for (int l = 0; l < shape_.layers; ++l) {
      if (layers_[l].last_position <= last_position) continue;
      for (int h = 0; h < shape_.kv_heads; ++h) {
        const DeviceHead& head = store(l, h);
        auto& p = held[static_cast<std::size_t>(l) * shape_.kv_heads + h];
        p.resize(static_cast<std::size_t>(head.size));
        if (head.size == 0) continue;
        cuda::check_cuda(
            cudaMemcpyAsync(p.data(), head.positions.data(), p.size() * sizeof(int32_t),
                            cudaMemcpyDeviceToHost, stream),
            "KVCache::truncate: download of the positions");
      }
    }
    context_->synchronize(where);
    const std::vector<int64_t> drop = this->plan_truncate(where, last_position, [&](int l, int h) {
      const auto& p = held[static_cast<std::size_t>(l) * shape_.kv_heads + h];
      return static_cast<int64_t>(p.end() - std::upper_bound(p.begin(), p.end(), last_position));
    });
    for (int l = 0; l < shape_.layers; ++l) {
      if (!this->truncates(l, last_position, drop)) continue;
      for (int h = 0; h < shape_.kv_heads; ++h) {
        DeviceHead& head = store(l, h);
        head.size -= drop[l];
        if (head.size == 0) head.first_position = -1;
      }
    }
    this->commit_truncate(last_position, drop);
  }

  /// LazyLayerDrop's statistic on the CPU cache; no CUDA policy observes queries, so NaN.
  double observed_mass(int layer) const {
    detail::check_layer("KVCache::observed_mass", shape_, layer);
    return std::nan("");
  }

  /// Whether compress() marked `layer` lazy (LazyLayerDrop only): always false here.
  bool is_lazy(int layer) const {
    detail::check_layer("KVCache::is_lazy", shape_, layer);
    return false;
  }

  /// Attention of q (tokens × q_heads × head_dim, post-RoPE) over what `layer` holds: causal by
  /// position, GQA, scaled by 1/sqrt(head_dim), softmax in fp32. q and out live in `space`.
  void attend(int layer, const ActivationView& q, Positions positions, const OutputView& out,
              MemorySpace space = MemorySpace::kHost) const {
    constexpr const char* where = "KVCache::attend";
    cuda::DeviceGuard guard(context_->device());
    std::lock_guard<std::mutex> lock(scratch_->mutex);
    check_query(where, layer, q, positions, space);
    this->check_output(where, q, out);
    this->check_visible(where, layer, positions, [&](int h) {
      const auto& head = store(layer, h);
      return std::pair<int64_t, int64_t>(head.size, head.first_position);
    });
    check_space(where, "out", out.data(), space);
    attend_unchecked(layer, q, positions, out, space);
  }

  /// Dense fp32 K/V and positions of `layer`, one entry per kv head (the slow path; host).
  DenseLayer materialize(int layer) const {
    detail::check_layer("KVCache::materialize", shape_, layer);
    cuda::DeviceGuard guard(context_->device());
    std::lock_guard<std::mutex> lock(scratch_->mutex);
    const int d = shape_.head_dim;
    DenseLayer result;
    result.heads.resize(shape_.kv_heads);
    std::vector<std::vector<storage_type>> k(shape_.kv_heads), v(shape_.kv_heads);
    std::vector<std::vector<int32_t>> positions(shape_.kv_heads);
    const cudaStream_t stream = context_->stream();
    for (int h = 0; h < shape_.kv_heads; ++h) {
      const auto& head = store(layer, h);
      const std::size_t n = static_cast<std::size_t>(head.size);
      k[h].resize(n * d);
      v[h].resize(n * d);
      positions[h].resize(n);
      if (n == 0) continue;
      cuda::check_cuda(cudaMemcpyAsync(k[h].data(), head.k.data(), n * d * sizeof(storage_type),
                                       cudaMemcpyDeviceToHost, stream),
                       "KVCache::materialize: copy of K");
      cuda::check_cuda(cudaMemcpyAsync(v[h].data(), head.v.data(), n * d * sizeof(storage_type),
                                       cudaMemcpyDeviceToHost, stream),
                       "KVCache::materialize: copy of V");
      cuda::check_cuda(cudaMemcpyAsync(positions[h].data(), head.positions.data(),
                                       n * sizeof(int32_t), cudaMemcpyDeviceToHost, stream),
                       "KVCache::materialize: copy of positions");
    }
    context_->synchronize("KVCache::materialize");
    for (int h = 0; h < shape_.kv_heads; ++h) {
      DenseHead& dst = result.heads[h];
      dst.k.resize(k[h].size());
      dst.v.resize(v[h].size());
      const int64_t n = static_cast<int64_t>(positions[h].size());
      for (int64_t t = 0; t < n; ++t) {
        detail::load_row(k[h].data() + t * d, dst.k.data() + t * d, d);
        detail::load_row(v[h].data() + t * d, dst.v.data() + t * d, d);
      }
      dst.positions.assign(positions[h].begin(), positions[h].end());
    }
    return result;
  }

  /// Every byte held, counted as the CPU cache counts it: K/V rows and one position per held
  /// token, plus the per-head and per-layer bookkeeping (at the CPU's sizes).
  std::size_t bytes() const {
    std::size_t total = heads_.size() * sizeof(detail::HeadStore<storage_type>) +
                        layers_.size() * sizeof(detail::LayerState);
    for (const auto& head : heads_) total += static_cast<std::size_t>(head.size) * row_bytes();
    return total;
  }

  /// Device memory the storage occupies including growth slack (>= bytes() minus bookkeeping;
  /// equal to the held rows after compress() evicted from a head).
  std::size_t reserved_bytes() const {
    std::size_t total = 0;
    for (const auto& head : heads_) {
      total += head.k.bytes() + head.v.bytes() + head.positions.bytes();
    }
    return total;
  }

  /// Device scratch currently allocated for append / attend / compress (reused across calls,
  /// not part of bytes(); released by clear()).
  std::size_t workspace_bytes() const {
    return scratch_->device.bytes() + scratch_->invalid_index.bytes();
  }

  /// Tokens held by one (layer, kv-head).
  int64_t tokens(int layer, int head) const {
    this->check_head("KVCache::tokens", layer, head);
    return store(layer, head).size;
  }

  /// Drops every token and frees the device memory (storage and workspace); shape and policy
  /// stay.
  void clear() {
    cuda::DeviceGuard guard(context_->device());
    std::lock_guard<std::mutex> lock(scratch_->mutex);
    context_->synchronize("KVCache::clear");
    for (auto& head : heads_) head = cuda::DeviceHead<storage_type>{};
    scratch_->device.release();
    scratch_->invalid_index.release();
    this->clear_front();
  }

 private:
  using DeviceHead = cuda::DeviceHead<storage_type>;

  /// Reusable scratch: one device allocation carved per call, a host staging area for the one
  /// packed upload per call, and the mutex that serialises calls on this cache.
  struct Scratch {
    std::mutex mutex;
    cuda::DeviceBuffer<unsigned char> device;
    cuda::DeviceBuffer<unsigned long long> invalid_index;
    std::vector<unsigned char> host;
  };

  static constexpr float storage_limit() {
    return std::is_same_v<storage_type, Half> ? 65504.0f : std::numeric_limits<float>::max();
  }

  std::size_t row_bytes() const {
    return 2 * static_cast<std::size_t>(shape_.head_dim) * sizeof(storage_type) + sizeof(int32_t);
  }

  /// What the CUDA kernels add to the front end's checks (shape and knobs are validated there).
  void validate_construction() {
    detail::require(cuda::supported_head_dim(shape_.head_dim), "KVCache (CUDA)", "head_dim",
                    shape_.head_dim, "64 or 128 (the head dims the CUDA kernels are compiled for)");
    detail::require(shape_.kv_heads <= 65535, "KVCache (CUDA)", "kv_heads", shape_.kv_heads,
                    "<= 65535 (one grid row per kv head)");
  }

  void allocate_bookkeeping() {
    heads_.resize(static_cast<std::size_t>(shape_.layers) * shape_.kv_heads);
    scratch_ = std::make_unique<Scratch>();
  }

  DeviceHead& store(int layer, int head) {
    return heads_[static_cast<std::size_t>(layer) * shape_.kv_heads + head];
  }
  const DeviceHead& store(int layer, int head) const {
    return heads_[static_cast<std::size_t>(layer) * shape_.kv_heads + head];
  }

  /// Device workspace of at least `bytes` (grown geometrically; nothing may still be reading
  /// the old one: every public call ends with a stream synchronisation).
  unsigned char* workspace(std::size_t bytes) const {
    if (scratch_->device.size() < bytes) {
      scratch_->device.release();
      scratch_->device = cuda::DeviceBuffer<unsigned char>(
          std::max(bytes, scratch_->device.size() * 2), context_->device());
    }
    return scratch_->device.data();
  }

  /// Host staging area of `bytes`, zero-initialised.
  unsigned char* staging(std::size_t bytes) const {
    scratch_->host.assign(bytes, 0);
    return scratch_->host.data();
  }

  /// One host-to-device copy of the staging area to the start of the workspace.
  void upload_staging(unsigned char* device_base, std::size_t bytes, const char* where) const {
    if (bytes == 0) return;
    cuda::check_cuda(cudaMemcpyAsync(device_base, scratch_->host.data(), bytes,
                                     cudaMemcpyHostToDevice, context_->stream()),
                     detail::concat(where, ": upload").c_str());
  }

  /// The pointer of view `name` must lie in `space` (host memory that the CPU can read, or
  /// memory of this context's device).
  void check_space(const char* where, const char* name, const void* data, MemorySpace space) const {
    if (data == nullptr) return;
    cudaPointerAttributes attributes{};
    cudaMemoryType type = cudaMemoryTypeUnregistered;
    if (cudaPointerGetAttributes(&attributes, data) == cudaSuccess) {
      type = attributes.type;
    } else {
      cudaGetLastError();  // older drivers report plain host memory as an error: clear it
    }
    if (space == MemorySpace::kHost && type == cudaMemoryTypeDevice) {
      detail::throw_arg(where, name, "a device pointer",
                        "host memory (pass MemorySpace::kDevice for device views)");
    }
    if (space == MemorySpace::kDevice) {
      if (type != cudaMemoryTypeDevice && type != cudaMemoryTypeManaged) {
        detail::throw_arg(where, name, "a host pointer",
                          "device memory (pass MemorySpace::kHost for host views)");
      }
      if (type == cudaMemoryTypeDevice && attributes.device != context_->device()) {
        detail::throw_arg(where, name, detail::concat("memory of device ", attributes.device),
                          detail::concat("memory of the context's device ", context_->device()));
      }
    }
  }

  /// detail::check_values for a view in `space`: on the host directly; on the device by a
  /// kernel that finds the element the host check would report first, with the same message.
  void check_values(const char* where, const char* name, const ActivationView& x, float limit,
                    MemorySpace space) const {
    if (space == MemorySpace::kHost) {
      detail::check_values(where, name, x, limit);
      return;
    }
    if (scratch_->invalid_index.empty()) {
      scratch_->invalid_index = cuda::DeviceBuffer<unsigned long long>(1, context_->device());
    }
    const cudaStream_t stream = context_->stream();
    unsigned long long* first = scratch_->invalid_index.data();
    cuda::check_cuda(cudaMemsetAsync(first, 0xFF, sizeof(unsigned long long), stream),
                     detail::concat(where, ": value check").c_str());
    cuda::launch_find_first_invalid(x, limit, first, stream);
    unsigned long long found = ULLONG_MAX;
    cuda::check_cuda(cudaMemcpyAsync(&found, first, sizeof(found), cudaMemcpyDeviceToHost, stream),
                     detail::concat(where, ": value check").c_str());
    context_->synchronize(detail::concat(where, ": value check").c_str());
    if (found == ULLONG_MAX) return;
    const int64_t e = static_cast<int64_t>(found);
    const int64_t i = e % x.head_dim();
    const int64_t h = (e / x.head_dim()) % x.heads();
    const int64_t t = e / (x.head_dim() * x.heads());
    const int64_t offset = t * x.token_stride() + h * x.head_stride() + i;
    const std::size_t es = cuda::dtype_bytes(x.dtype());
    unsigned char raw[4] = {0, 0, 0, 0};
    cuda::check_cuda(cudaMemcpy(raw, static_cast<const unsigned char*>(x.data()) + offset * es, es,
                                cudaMemcpyDeviceToHost),
                     detail::concat(where, ": value check").c_str());
    float value = 0.0f;
    if (x.dtype() == DType::kF32) {
      std::memcpy(&value, raw, 4);
    } else if (x.dtype() == DType::kF16) {
      Half half;
      std::memcpy(&half, raw, 2);
      value = to_float(half);
    } else {
      BFloat16 bf;
      std::memcpy(&bf, raw, 2);
      value = to_float(bf);
    }
    throw error(detail::concat(where, ": ", name, "[token ", t, ", head ", h, ", channel ", i,
                               "] = ", value, ", expected a finite value with |x| <= ", limit));
  }

  void check_query(const char* where, int layer, const ActivationView& q, Positions positions,
                   MemorySpace space) const {
    this->check_query_shape(where, layer, q, positions);
    check_space(where, "q", q.data(), space);
    check_values(where, "q", q, std::numeric_limits<float>::max(), space);
  }

  void append_unchecked(int layer, const ActivationView& k, const ActivationView& v,
                        Positions positions, MemorySpace space);
  void attend_unchecked(int layer, const ActivationView& q, Positions positions,
                        const OutputView& out, MemorySpace space) const;
  // A member template, so that explicit instantiation of a non-eviction cache does not
  // instantiate it.
  template <class P = Policy>
  void evict();

  std::unique_ptr<cuda::CudaContext> owned_context_;  // set when the cache made its own context
  cuda::CudaContext* context_ = nullptr;
  std::vector<DeviceHead> heads_;  // layer-major: [layer][kv_head]
  std::unique_ptr<Scratch> scratch_;
};

// ------------------------------------------------------------------------------------------------

template <class Policy>
void KVCache<Policy, backend::Cuda>::append_unchecked(int layer, const ActivationView& k,
                                                      const ActivationView& v, Positions positions,
                                                      MemorySpace space) {
  constexpr const char* where = "KVCache::append";
  using T = storage_type;
  const int d = shape_.head_dim;
  const int heads = shape_.kv_heads;
  const int64_t n = k.tokens();
  const int device = context_->device();
  const cudaStream_t stream = context_->stream();
  const bool host = space == MemorySpace::kHost;

  // Workspace: [positions | K targets | V targets | position targets | K rows | V rows]; the
  // rows only for host inputs. All of it is uploaded in one copy.
  cuda::WorkspaceLayout layout;
  const std::size_t at_positions = layout.add<int32_t>(n);
  const std::size_t at_k_targets = layout.add<T*>(heads);
  const std::size_t at_v_targets = layout.add<T*>(heads);
  const std::size_t at_p_targets = layout.add<int32_t*>(heads);
  const std::size_t k_bytes = host ? n * heads * d * cuda::dtype_bytes(k.dtype()) : 0;
  const std::size_t v_bytes = host ? n * heads * d * cuda::dtype_bytes(v.dtype()) : 0;
  const std::size_t at_k_rows = layout.add<unsigned char>(k_bytes);
  const std::size_t at_v_rows = layout.add<unsigned char>(v_bytes);
  unsigned char* ws = workspace(layout.bytes());
  unsigned char* stage = staging(layout.bytes());

  // Heads that must grow get new buffers now (nothing changes if an allocation fails).
  struct Grown {
    int head;
    DeviceHead buffers;
  };
  std::vector<Grown> grown;
  for (int h = 0; h < heads; ++h) {
    const DeviceHead& head = store(layer, h);
    if (head.size + n <= head.capacity()) continue;
    const int64_t capacity = cuda::grown_capacity(head.size + n, head.capacity());
    Grown g{h, DeviceHead{}};
    g.buffers.k = cuda::DeviceBuffer<T>(static_cast<std::size_t>(capacity) * d, device);
    g.buffers.v = cuda::DeviceBuffer<T>(static_cast<std::size_t>(capacity) * d, device);
    g.buffers.positions = cuda::DeviceBuffer<int32_t>(static_cast<std::size_t>(capacity), device);
    grown.push_back(std::move(g));
  }
  auto destination = [&](int h) -> DeviceHead& {
    for (Grown& g : grown) {
      if (g.head == h) return g.buffers;
    }
    return store(layer, h);
  };

  auto* stage_positions = reinterpret_cast<int32_t*>(stage + at_positions);
  for (int64_t t = 0; t < n; ++t) stage_positions[t] = static_cast<int32_t>(positions[t]);
  auto* k_targets = reinterpret_cast<T**>(stage + at_k_targets);
  auto* v_targets = reinterpret_cast<T**>(stage + at_v_targets);
  auto* p_targets = reinterpret_cast<int32_t**>(stage + at_p_targets);
  for (int h = 0; h < heads; ++h) {
    DeviceHead& dst = destination(h);
    const int64_t held = store(layer, h).size;
    k_targets[h] = dst.k.data() + held * d;
    v_targets[h] = dst.v.data() + held * d;
    p_targets[h] = dst.positions.data() + held;
  }
  const ActivationView k_device = host ? cuda::pack_view(k, stage + at_k_rows, ws + at_k_rows) : k;
  const ActivationView v_device = host ? cuda::pack_view(v, stage + at_v_rows, ws + at_v_rows) : v;
  upload_staging(ws, layout.bytes(), where);

  for (Grown& g : grown) {
    const DeviceHead& old = store(layer, g.head);
    if (old.size == 0) continue;
    const std::size_t rows = static_cast<std::size_t>(old.size);
    cuda::check_cuda(cudaMemcpyAsync(g.buffers.k.data(), old.k.data(), rows * d * sizeof(T),
                                     cudaMemcpyDeviceToDevice, stream),
                     "KVCache::append: copy of K on growth");
    cuda::check_cuda(cudaMemcpyAsync(g.buffers.v.data(), old.v.data(), rows * d * sizeof(T),
                                     cudaMemcpyDeviceToDevice, stream),
                     "KVCache::append: copy of V on growth");
    cuda::check_cuda(cudaMemcpyAsync(g.buffers.positions.data(), old.positions.data(),
                                     rows * sizeof(int32_t), cudaMemcpyDeviceToDevice, stream),
                     "KVCache::append: copy of positions on growth");
  }
  cuda::launch_convert_rows(k_device, reinterpret_cast<T* const*>(ws + at_k_targets), d, stream);
  cuda::launch_convert_rows(v_device, reinterpret_cast<T* const*>(ws + at_v_targets), d, stream);
  cuda::launch_scatter_positions(reinterpret_cast<const int32_t*>(ws + at_positions), n, heads,
                                 reinterpret_cast<int32_t* const*>(ws + at_p_targets), stream);
  context_->synchronize(where);

  // Commit: nothing below can fail.
  for (Grown& g : grown) {
    DeviceHead& head = store(layer, g.head);
    head.k.swap(g.buffers.k);
    head.v.swap(g.buffers.v);
    head.positions.swap(g.buffers.positions);
  }
  for (int h = 0; h < heads; ++h) {
    DeviceHead& head = store(layer, h);
    if (head.size == 0) head.first_position = positions[0];
    head.size += n;
  }
  this->record_append(layer, positions, n);
}

template <class Policy>
void KVCache<Policy, backend::Cuda>::attend_unchecked(int layer, const ActivationView& q,
                                                      Positions positions, const OutputView& out,
                                                      MemorySpace space) const {
  constexpr const char* where = "KVCache::attend";
  using T = storage_type;
  const int d = shape_.head_dim;
  const int kv_heads = shape_.kv_heads;
  const int q_heads = shape_.q_heads;
  const int group = shape_.group_size();
  const int64_t tokens = q.tokens();
  const int64_t rows = tokens * q_heads;
  const cudaStream_t stream = context_->stream();
  const bool host = space == MemorySpace::kHost;

  int64_t longest = 0;
  for (int h = 0; h < kv_heads; ++h) longest = std::max(longest, store(layer, h).size);
  const int64_t row_blocks = (tokens * group + cuda::kAttentionRows - 1) / cuda::kAttentionRows;
  const int64_t splits =
      cuda::attention_splits(row_blocks * kv_heads, longest, context_->sm_count());

  // Workspace: uploaded [q positions | head table | q targets | q rows (host input)], then
  // [q fp32 | partial acc | partial max | partial sum | out (host output)].
  cuda::WorkspaceLayout layout;
  const std::size_t at_positions = layout.add<int32_t>(tokens);
  const std::size_t at_heads = layout.add<cuda::AttentionHead<T>>(kv_heads);
  const std::size_t at_q_targets = layout.add<float*>(q_heads);
  const std::size_t q_bytes = host ? rows * d * cuda::dtype_bytes(q.dtype()) : 0;
  const std::size_t at_q_rows = layout.add<unsigned char>(q_bytes);
  const std::size_t upload_bytes = layout.bytes();
  const std::size_t at_q = layout.add<float>(rows * d);
  const std::size_t at_acc = layout.add<float>(splits * rows * d);
  const std::size_t at_max = layout.add<float>(splits * rows);
  const std::size_t at_sum = layout.add<float>(splits * rows);
  const std::size_t at_out = layout.add<float>(host ? rows * d : 0);
  unsigned char* ws = workspace(layout.bytes());
  unsigned char* stage = staging(upload_bytes);

  auto* stage_positions = reinterpret_cast<int32_t*>(stage + at_positions);
  for (int64_t t = 0; t < tokens; ++t) stage_positions[t] = static_cast<int32_t>(positions[t]);
  auto* head_table = reinterpret_cast<cuda::AttentionHead<T>*>(stage + at_heads);
  for (int h = 0; h < kv_heads; ++h) {
    const DeviceHead& head = store(layer, h);
    head_table[h] = {head.k.data(), head.v.data(), head.positions.data(), head.size};
  }
  auto* q_fp32 = reinterpret_cast<float*>(ws + at_q);
  auto* q_targets = reinterpret_cast<float**>(stage + at_q_targets);
  for (int h = 0; h < q_heads; ++h) q_targets[h] = q_fp32 + static_cast<int64_t>(h) * d;
  const ActivationView q_device = host ? cuda::pack_view(q, stage + at_q_rows, ws + at_q_rows) : q;
  upload_staging(ws, upload_bytes, where);

  cuda::launch_convert_rows(q_device, reinterpret_cast<float* const*>(ws + at_q_targets),
                            static_cast<int64_t>(q_heads) * d, stream);
  cuda::AttentionParams params{};
  params.q = q_fp32;
  params.q_positions = reinterpret_cast<const int32_t*>(ws + at_positions);
  params.tokens = tokens;
  params.q_heads = q_heads;
  params.group = group;
  params.scale = 1.0f / std::sqrt(static_cast<float>(d));
  params.splits = splits;
  params.partial_acc = reinterpret_cast<float*>(ws + at_acc);
  params.partial_max = reinterpret_cast<float*>(ws + at_max);
  params.partial_sum = reinterpret_cast<float*>(ws + at_sum);
  // OutputView exposes rows, not strides: recover the element strides from row addresses.
  float* out_device = host ? reinterpret_cast<float*>(ws + at_out) : out.data();
  const int64_t out_token_stride =
      host ? static_cast<int64_t>(q_heads) * d : out.row(1, 0) - out.row(0, 0);
  const int64_t out_head_stride = host ? d : out.row(0, 1) - out.row(0, 0);
  const auto* heads = reinterpret_cast<const cuda::AttentionHead<T>*>(ws + at_heads);
  cuda::dispatch_head_dim(d, [&](auto head_dim) {
    cuda::launch_attention<T, decltype(head_dim)::value>(heads, kv_heads, params, out_device,
                                                         out_token_stride, out_head_stride, stream);
  });

  if (!host) {
    context_->synchronize(where);
    return;
  }
  std::vector<float> result(static_cast<std::size_t>(rows) * d);
  cuda::check_cuda(cudaMemcpyAsync(result.data(), out_device, result.size() * sizeof(float),
                                   cudaMemcpyDeviceToHost, stream),
                   "KVCache::attend: download of the output");
  context_->synchronize(where);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int h = 0; h < q_heads; ++h) {
      std::memcpy(out.row(t, h), result.data() + (t * q_heads + h) * d, d * sizeof(float));
    }
  }
}

template <class Policy>
template <class P>
void KVCache<Policy, backend::Cuda>::evict() {
  constexpr const char* where = "KVCache::compress";
  using T = storage_type;
  const int d = shape_.head_dim;
  const int device = context_->device();
  const cudaStream_t stream = context_->stream();
  const Budget& budget = policy_.budget;
  struct Target {
    int layer, head;
    int64_t offset;  // of its tokens in the concatenated score / flag / index arrays
  };
  std::vector<Target> targets;
  int64_t total = 0, longest = 0;
  for (int l = policy_.skip_layers; l < shape_.layers; ++l) {
    const detail::LayerState& state = layers_[l];
    if (state.appended == 0 || state.appended < policy_.min_tokens) continue;
    for (int h = 0; h < shape_.kv_heads; ++h) {
      targets.push_back({l, h, total});
      total += store(l, h).size;
      longest = std::max(longest, store(l, h).size);
    }
  }
  const int64_t n_targets = static_cast<int64_t>(targets.size());
  if (n_targets == 0) return;

  cuda::WorkspaceLayout layout;
  const std::size_t at_score_jobs = layout.add<cuda::ScoreJob<T>>(n_targets);
  const std::size_t at_select_jobs = layout.add<cuda::SelectJob>(n_targets);
  const std::size_t upload_bytes = layout.bytes();
  const std::size_t at_scores = layout.add<float>(total);
  const std::size_t at_flags = layout.add<uint8_t>(total);
  const std::size_t at_kept_index = layout.add<int32_t>(total);
  const std::size_t at_results = layout.add<cuda::SelectResult>(n_targets);
  const std::size_t at_compact_jobs = layout.add<cuda::CompactJob<T>>(n_targets);
  unsigned char* ws = workspace(layout.bytes());
  unsigned char* stage = staging(upload_bytes);
  auto* scores = reinterpret_cast<float*>(ws + at_scores);
  auto* kept_index = reinterpret_cast<int32_t*>(ws + at_kept_index);

  auto* score_jobs = reinterpret_cast<cuda::ScoreJob<T>*>(stage + at_score_jobs);
  auto* select_jobs = reinterpret_cast<cuda::SelectJob*>(stage + at_select_jobs);
  for (int64_t i = 0; i < n_targets; ++i) {
    const DeviceHead& head = store(targets[i].layer, targets[i].head);
    const detail::LayerState& state = layers_[targets[i].layer];
    score_jobs[i] = {head.k.data(), head.v.data(), head.size, targets[i].offset};
    select_jobs[i] = {scores + targets[i].offset,
                      head.positions.data(),
                      head.size,
                      budget.target(state.appended),
                      state.first_position + budget.sink_tokens,
                      state.last_position - budget.recent_tokens,
                      targets[i].offset};
  }
  upload_staging(ws, upload_bytes, where);
  cuda::launch_score_tokens<Policy, T>(
      reinterpret_cast<const cuda::ScoreJob<T>*>(ws + at_score_jobs), n_targets, longest, d, scores,
      stream);

  std::vector<int64_t> kept(n_targets), first_position(n_targets);
  if (budget.scope == BudgetScope::kPerHead) {
    auto* results = reinterpret_cast<cuda::SelectResult*>(ws + at_results);
    cuda::launch_select_top_k(reinterpret_cast<const cuda::SelectJob*>(ws + at_select_jobs),
                              n_targets, reinterpret_cast<uint8_t*>(ws + at_flags), results,
                              kept_index, stream);
    std::vector<cuda::SelectResult> host_results(n_targets);
    cuda::check_cuda(
        cudaMemcpyAsync(host_results.data(), results, n_targets * sizeof(cuda::SelectResult),
                        cudaMemcpyDeviceToHost, stream),
        "KVCache::compress: download of the selection");
    context_->synchronize(where);
    for (int64_t i = 0; i < n_targets; ++i) {
      kept[i] = host_results[i].kept;
      first_position[i] = host_results[i].first_position;
    }
  } else {
    // Global threshold: one ordering over every (layer, head, token), done by the CPU's
    // select_global on downloaded scores and positions, so the ragged budgets match exactly.
    std::vector<float> host_scores(total);
    std::vector<int32_t> host_positions(total);
    if (total > 0) {
      cuda::check_cuda(cudaMemcpyAsync(host_scores.data(), scores, total * sizeof(float),
                                       cudaMemcpyDeviceToHost, stream),
                       "KVCache::compress: download of the scores");
    }
    for (int64_t i = 0; i < n_targets; ++i) {
      const DeviceHead& head = store(targets[i].layer, targets[i].head);
      if (head.size == 0) continue;
      cuda::check_cuda(
          cudaMemcpyAsync(host_positions.data() + targets[i].offset, head.positions.data(),
                          head.size * sizeof(int32_t), cudaMemcpyDeviceToHost, stream),
          "KVCache::compress: download of the positions");
    }
    context_->synchronize(where);
    std::vector<detail::SelectionHead> selection(n_targets);
    for (int64_t i = 0; i < n_targets; ++i) {
      const cuda::SelectJob& job = select_jobs[i];
      selection[i] = {host_scores.data() + targets[i].offset,
                      host_positions.data() + targets[i].offset,
                      job.size,
                      job.target,
                      job.protect_below,
                      job.protect_above};
    }
    const std::vector<std::vector<int64_t>> kept_lists = detail::select_global(selection);
    std::vector<int32_t> host_index(total);
    for (int64_t i = 0; i < n_targets; ++i) {
      const std::vector<int64_t>& list = kept_lists[i];
      kept[i] = static_cast<int64_t>(list.size());
      first_position[i] = list.empty() ? -1 : host_positions[targets[i].offset + list[0]];
      for (std::size_t j = 0; j < list.size(); ++j) {
        host_index[targets[i].offset + j] = static_cast<int32_t>(list[j]);
      }
    }
    if (total > 0) {
      cuda::check_cuda(cudaMemcpyAsync(kept_index, host_index.data(), total * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, stream),
                       "KVCache::compress: upload of the kept indices");
    }
  }

  // Compaction into exact-size buffers for every head that lost tokens (as the CPU, heads that
  // keep everything are left alone). Allocations come first: an allocation failure changes
  // nothing.
  struct Compacted {
    int64_t target;
    DeviceHead buffers;
  };
  std::vector<Compacted> compacted;
  std::vector<cuda::CompactJob<T>> jobs;
  int64_t most_kept = 0;
  for (int64_t i = 0; i < n_targets; ++i) {
    const DeviceHead& head = store(targets[i].layer, targets[i].head);
    if (kept[i] >= head.size) continue;
    Compacted c{i, DeviceHead{}};
    const std::size_t rows = static_cast<std::size_t>(kept[i]);
    c.buffers.k = cuda::DeviceBuffer<T>(rows * d, device);
    c.buffers.v = cuda::DeviceBuffer<T>(rows * d, device);
    c.buffers.positions = cuda::DeviceBuffer<int32_t>(rows, device);
    c.buffers.size = kept[i];
    c.buffers.first_position = first_position[i];
    if (kept[i] > 0) {
      jobs.push_back({head.k.data(), head.v.data(), head.positions.data(),
                      kept_index + targets[i].offset, kept[i], c.buffers.k.data(),
                      c.buffers.v.data(), c.buffers.positions.data()});
      most_kept = std::max(most_kept, kept[i]);
    }
    compacted.push_back(std::move(c));
  }
  if (compacted.empty()) {
    context_->synchronize(where);
    return;
  }
  if (!jobs.empty()) {
    auto* device_jobs = reinterpret_cast<cuda::CompactJob<T>*>(ws + at_compact_jobs);
    cuda::check_cuda(cudaMemcpyAsync(device_jobs, jobs.data(), jobs.size() * sizeof(jobs[0]),
                                     cudaMemcpyHostToDevice, stream),
                     "KVCache::compress: upload of the compaction jobs");
    cuda::launch_gather_rows(device_jobs, static_cast<int64_t>(jobs.size()), most_kept, d, stream);
  }
  context_->synchronize(where);

  // Commit: the old buffers are freed here, so evicted rows return to the device.
  for (Compacted& c : compacted) {
    store(targets[c.target].layer, targets[c.target].head) = std::move(c.buffers);
  }
}

}  // namespace kvpack
