/// \file backend/cuda/cache.cuh
/// \brief KVCache<Policy, backend::Cuda>: the class (public API and state); its out-of-line
/// members are in cache_append.cuh, cache_attend.cuh and cache_evict.cuh.
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
// Eigen (pulled in by the CPU backend) declares defaulted members __host__ __device__, which
// nvcc reports as warning 20012; the annotation is harmless, so it is silenced for these headers.
#if defined(__CUDACC__)
#pragma nv_diagnostic push
#pragma nv_diag_suppress 20012
#endif
#include "../../cache.hpp"
#if defined(__CUDACC__)
#pragma nv_diagnostic pop
#endif
#include "../../config.hpp"
#include "../../detail/cache_front.hpp"
#include "../../detail/select.hpp"
#include "../../detail/validate.hpp"
#include "../../error.hpp"
#include "../../policy/head_level_evict.hpp"
#include "../../policy/identity.hpp"
#include "../../policy/kvzap.hpp"
#include "../../policy/l2_norm_evict.hpp"
#include "../../policy/lazy_layer_drop.hpp"
#include "../../policy/policy_base.hpp"
#include "../../policy/quantize.hpp"
#include "../../policy/reconstruction_evict.hpp"
#include "../../policy/streaming_llm.hpp"
#include "../../shape.hpp"
#include "../../span.hpp"
#include "../../view.hpp"
#include "../cpu/low_rank_head_store.hpp"
#include "../cpu/quantized_head_store.hpp"
#include "context.hpp"
#include "device_storage.cuh"
#include "kernel_logic.hpp"
#include "kernels/append.cuh"
#include "kernels/attention.cuh"
#include "kernels/compact.cuh"
#include "kernels/hidden_scores.cuh"
#include "kernels/kivi.cuh"
#include "kernels/low_rank_attention.cuh"
#include "kernels/observe.cuh"
#include "kernels/score.cuh"
#include "kernels/select.cuh"
#include "kernels/select_global.cuh"
#include "kernels/stored_scores.cuh"
#include "linalg.hpp"

namespace kvpack {

/// \brief CUDA implementation of KVCache (see the file comment for the design).
/// \tparam Policy any policy the CPU backend takes (rows, KIVI, every eviction score source,
/// lazy layers, low-rank; Compose<A, Quantize>): cuda::supports_policy_v checks it.
///
/// The cache runs on a caller-owned cuda::CudaContext (device + stream), or on one it creates
/// on the current device. Move-only. Calls on one cache are serialised (a mutex guards the
/// workspace), so const calls may come from several threads.
template <class Policy>
class KVCache<Policy, backend::Cuda> : public detail::CacheFront<Policy> {
  static_assert(
      cuda::supports_policy_v<Policy>,
      "no CUDA implementation of this Policy: backend::Cuda implements BasicIdentity, Quantize, "
      "and alone or in Compose<A, Quantize> HeadLevelEvict, ReconstructionEvict, SnapKV, KVzap, "
      "LazyLayerDrop, evictions scored per token from K/V (L2NormEvict: a KVPACK_HOST_DEVICE "
      "static token_score) or position (StreamingLLM), CrossLayerSVD and ChannelShrink");

 public:
  using backend_type = backend::Cuda;
  using typename detail::CacheFront<Policy>::storage_type;

 private:
  KVPACK_CACHE_FRONT_MEMBERS(Policy);
  // compress(): a selection stage (eviction, lazy layers or none), then KIVI (Quantize, Compose).
  using Stages = detail::PolicyStages<Policy>;
  using Selection = typename Stages::selection;
  /// The selection stage scores tokens by observed queries (one device score per held token).
  static constexpr bool kQueryScores = cuda::is_query_scored_policy<Selection>::value;
  /// The selection stage scores tokens from hidden states (KVzap: observe_hidden()).
  static constexpr bool kHiddenScores = cuda::is_hidden_scored_policy<Selection>::value;
  /// One device score per held token (query- or hidden-state-scored eviction).
  static constexpr bool kStoredScores = kQueryScores || kHiddenScores;
  /// The selection stage trims lazy layers (one attention-mass statistic per layer, on the host).
  static constexpr bool kLazyLayers = cuda::is_lazy_layer_policy<Selection>::value;
  /// compress() selects tokens and compacts (eviction policies and lazy layers).
  static constexpr bool kEvicts = is_eviction_policy_v<Selection> || kLazyLayers;
  /// compress() factors rows into token bases and per-head factors (xKV, CSKV; KIVI bases too).
  static constexpr bool kLowRank = cuda::is_low_rank_policy<Policy>::value;
  /// Kept rows age into KIVI blocks (Quantize, Compose<A, Quantize> of a row selection A).
  static constexpr bool kQuantized = Stages::quantized && !kLowRank;

  /// The selection stage's knobs (the policy itself, or Compose's first stage).
  const Selection& selection() const { return Stages::select_knobs(policy_); }
  /// KIVI's knobs (quantizing policies only).
  const Quantize& quant_knobs() const { return *Stages::quant_knobs(policy_); }

 public:
  /// Validates the shape and the policy's knobs (as the CPU cache does; head_dim must also be
  /// 64 or 128), then creates a context on the current device.
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
  /// Waits for the device at its end when the context's device_value_checks() is on (the
  /// default) or when a head's storage grew; otherwise the rows land in stream order.
  void append(int layer, const ActivationView& k, const ActivationView& v, Positions positions,
              MemorySpace space = MemorySpace::kHost) {
    constexpr const char* where = "KVCache::append";
    this->check_append(where, layer, k, v, positions);
    cuda::DeviceGuard guard(context_->device());
    std::lock_guard<std::mutex> lock(scratch_->mutex);
    check_space(where, "k", k.data(), space);
    check_space(where, "v", v.data(), space);
    check_values(where, "k", k, this->storage_limit(), space);
    check_values(where, "v", v, this->storage_limit(), space);
    append_unchecked(layer, k, v, positions, space);
  }

  /// Hands queries (tokens × q_heads × head_dim, post-RoPE) to policies that score with them:
  /// ReconstructionEvict and SnapKV fold the softmax probability each held key of `layer`
  /// receives (inside the policy's ScoreWindow; over the rows and the GQA group, the max for
  /// KVzip, the sum for SnapKV) into the key's score; KVzip+ (output factors set) weighs each
  /// probability by ‖W_o,h · v‖ of its key (or its output's displacement, the policy's
  /// ValueWeighting) and by `query_weights` [tokens] (1 / ‖x_t‖; host memory; empty: 1).
  /// LazyLayerDrop adds the attention mass the rows put on its kept set (sinks + recent window)
  /// to the layer's statistic. Query scores stay on the device: the call returns without waiting
  /// for host q, and for device q while the context's device_value_checks() are off (on: it
  /// waits once for the check of q, and once for the copy of device positions); LazyLayerDrop
  /// waits for its masses. Throws kvpack::error,
  /// nothing changed, for a bad layer, view or position, non-finite queries, or weights of the
  /// wrong count, not finite and > 0, or given to a policy not scored by queries.
  void observe(int layer, const ActivationView& q, Positions positions,
               Span<const float> query_weights = {}, MemorySpace space = MemorySpace::kHost) {
    constexpr const char* where = "KVCache::observe";
    cuda::DeviceGuard guard(context_->device());
    std::lock_guard<std::mutex> lock(scratch_->mutex);
    std::vector<int64_t> copy;
    check_query(where, layer, q, positions, space, copy);
    this->check_observe_weights(where, q, query_weights);
    if constexpr (kQueryScores || kLazyLayers)
      observe_queries(layer, q, positions, query_weights, space);
    observed_ = true;
  }

  /// attend() and observe() of the same queries, in `space`. For query scores over every key
  /// (the policy's window ScoreWindow::all()) one attention pass serves both: observe()'s pass 1
  /// writes `out`; otherwise the two calls. Throws what either refuses, before anything is
  /// written.
  void attend_observe(int layer, const ActivationView& q, Positions positions,
                      const OutputView& out, Span<const float> query_weights = {},
                      MemorySpace space = MemorySpace::kHost);

  /// observe() without query weights, with `q` in `space`.
  void observe(int layer, const ActivationView& q, Positions positions, MemorySpace space) {
    observe(layer, q, positions, {}, space);
  }

  /// \brief Scores tokens from their hidden states (KVzap): x is tokens × 1 × hidden (the
  /// scorer's hidden size; each token's attention input) in `space`, positions (host) those of
  /// tokens `layer` holds. The scorer's GEMM runs in cuBLAS (its weights are copied to the device
  /// once, see workspace_bytes()); each kv head that holds a token stores
  /// Policy::stored_score(log-score) for it, as the CPU cache does. Throws kvpack::error, nothing
  /// changed, for a bad layer, view, position or non-finite value, or a non-finite (overflowed)
  /// log-score.
  template <class P = Policy, class = std::enable_if_t<cuda::is_hidden_scored_policy<
                                  typename detail::PolicyStages<P>::selection>::value>>
  void observe_hidden(int layer, const ActivationView& x, Positions positions,
                      MemorySpace space = MemorySpace::kHost) {
    constexpr const char* where = "KVCache::observe_hidden";
    cuda::DeviceGuard guard(context_->device());
    std::lock_guard<std::mutex> lock(scratch_->mutex);
    this->check_hidden_shape(where, layer, x, positions, selection().hidden_scorer().hidden);
    check_space(where, "x", x.data(), space);
    check_values(where, "x", x, std::numeric_limits<float>::max(), space);
    observe_hidden_unchecked(layer, x, positions, space);
    observed_ = true;
  }

  /// The score of every token (layer, head) holds, in held order (ascending position): the
  /// reduced probability observe() gave it (before any pooling) or the stored score of
  /// observe_hidden() (KVzap), NaN for a token not scored yet (as the CPU cache). Policies that
  /// store scores only. Throws kvpack::error for a bad layer or head.
  template <class P = Policy, class S = typename detail::PolicyStages<P>::selection,
            class = std::enable_if_t<cuda::is_query_scored_policy<S>::value ||
                                     cuda::is_hidden_scored_policy<S>::value>>
  std::vector<float> token_scores(int layer, int head) const {
    constexpr const char* where = "KVCache::token_scores";
    this->check_head(where, layer, head);
    cuda::DeviceGuard guard(context_->device());
    std::lock_guard<std::mutex> lock(scratch_->mutex);
    std::vector<float> scores;
    download(store(layer, head).scores.data(), store(layer, head).size, scores, where);
    context_->synchronize(where);
    for (float& x : scores) {
      if (x == cuda::kUnscoredScore) x = std::numeric_limits<float>::quiet_NaN();
    }
    return scores;
  }

  /// Applies the policy to everything held (see the CPU cache: repeated calls hold the budget;
  /// Quantize turns the whole groups that left the residual window into KIVI blocks).
  void compress() {
    this->check_compress();
    if constexpr (kEvicts || kQuantized || kLowRank) {
      cuda::DeviceGuard guard(context_->device());
      std::lock_guard<std::mutex> lock(scratch_->mutex);
      if constexpr (kEvicts) evict();
      if constexpr (kQuantized) quantize();
      if constexpr (kLowRank) factorize();
    }
  }

  /// Removes every token at a position > `last_position` from all layers (e.g. the repeat
  /// prompt of a scoring pass). Only tokens no compress() has evicted from can be rolled back;
  /// under Quantize only whole KIVI groups or residual rows (as on the CPU). The device memory
  /// stays reserved for the next appends (see reserved_bytes()). Throws kvpack::error, nothing
  /// changed, otherwise.
  void truncate(int64_t last_position);

  /// Mean attention mass that observed queries put on the initial + recent tokens of `layer`
  /// (LazyLayerDrop's statistic, as the CPU cache's); NaN when nothing was observed.
  double observed_mass(int layer) const {
    detail::check_layer("KVCache::observed_mass", shape_, layer);
    return observations_.empty() ? std::nan("") : observations_[layer].mean();
  }

  /// Whether compress() marked `layer` lazy (LazyLayerDrop); false before the decision.
  bool is_lazy(int layer) const {
    detail::check_layer("KVCache::is_lazy", shape_, layer);
    return !observations_.empty() && observations_[layer].lazy == 1;
  }

  /// Attention of q (tokens × q_heads × head_dim, post-RoPE) over what `layer` holds: causal by
  /// position, GQA, scaled by 1/sqrt(head_dim), softmax in fp32. q and out live in `space`.
  /// kDevice: returns without waiting for the device (output ready in stream order), but for
  /// the checks of q (and of device positions) when CudaContext::device_value_checks() is on
  /// (the default).
  void attend(int layer, const ActivationView& q, Positions positions, const OutputView& out,
              MemorySpace space = MemorySpace::kHost) const {
    cuda::DeviceGuard guard(context_->device());
    std::lock_guard<std::mutex> lock(scratch_->mutex);
    check_attend("KVCache::attend", layer, q, positions, out, space);
    attend_unchecked(layer, q, positions, out, space);
  }

  /// Dense fp32 K/V and positions of `layer`, one entry per kv head (the slow path; host).
  /// KIVI blocks are decoded by dequantize_ref's rule, bit for bit the CPU cache's values.
  DenseLayer materialize(int layer) const;

  /// Every byte held, counted as the CPU cache counts it: K/V rows, KIVI blocks (exactly: the
  /// CUDA cache has no pages yet, so no page rounding), low-rank factors and token bases (each
  /// basis once) and one position per held token, plus the per-head and per-layer bookkeeping
  /// (at the CPU's sizes).
  std::size_t bytes() const;

  /// Device memory the storage occupies including growth slack (>= bytes() minus bookkeeping;
  /// equal to the held rows after compress() evicted from a head).
  std::size_t reserved_bytes() const;

  /// Scratch currently allocated for append / attend / compress (device, and the page-locked
  /// host staging; reused across calls, not part of bytes(); released by clear()), KVzap's
  /// device copy of its scorer (the policy's weights: the CPU cache does not count it either)
  /// and the low-rank policies' RoPE frequencies.
  std::size_t workspace_bytes() const;

  /// Tokens held by one (layer, kv head).
  int64_t tokens(int layer, int head) const {
    this->check_head("KVCache::tokens", layer, head);
    return store(layer, head).size;
  }

  /// Drops every token and frees the device memory (storage and workspace); shape and policy
  /// stay.
  void clear();

 private:
  template <class, class>
  friend class KVCacheBatch;  // attend() of a batch builds one launch from its sequences' heads
  using DeviceHead = cuda::DeviceHead<storage_type>;
  /// The head type attention_kernel reads for this storage, and (layer, head) as one
  /// (cache_attend.cuh).
  using AttentionHeadType = std::conditional_t<
      kQuantized, cuda::KiviAttentionHead,
      std::conditional_t<kLowRank, cuda::LowRankAttentionHead, cuda::AttentionHead<storage_type>>>;
  AttentionHeadType attention_head(int layer, int head) const;

  /// Reusable scratch: one device allocation carved per call, a host staging area for the one
  /// packed upload per call, and the mutex that serialises calls on this cache.
  struct Scratch {
    std::mutex mutex;
    cuda::DeviceBuffer<unsigned char> device;
    cuda::DeviceBuffer<unsigned long long> invalid_index;
    /// KVzap: the scorer's weights [layers][hidden][kv_heads] and biases [layers][kv_heads] on
    /// the device, and the scorer they were copied from (a new scorer is copied again).
    cuda::DeviceBuffer<float> scorer_weight, scorer_bias;
    std::shared_ptr<const HiddenScorer> scorer;
    cuda::PinnedStaging host;
  };

  /// The CPU cache's head store for this policy: bytes() counts its bookkeeping at that size.
  using HostStore = std::conditional_t<
      kQuantized, detail::QuantizedHeadStore,
      std::conditional_t<kLowRank, detail::LowRankHeadStore, detail::HeadStore<storage_type>>>;

  /// Quantize's block format (bits 4, group 32 for policies that do not quantize: unused).
  cuda::KiviFormat kivi_format() const;
  /// The KIVI blocks of `head` (none for policies that do not quantize).
  cuda::KiviBlocks blocks_of(const DeviceHead& head) const;
  /// Bytes of the per-token score query-scored policies keep (0 for the others).
  static constexpr std::size_t score_bytes() { return kStoredScores ? sizeof(float) : 0; }
  /// Tokens per KIVI group (1 for policies that do not quantize: no group to split).
  int group_size() const {
    if constexpr (kQuantized) return quant_knobs().group;
    return 1;
  }
  /// Bytes of the key / value blocks of `quantized` tokens (a multiple of the group).
  std::size_t kivi_key_block_bytes(int64_t quantized) const;
  std::size_t kivi_value_block_bytes(int64_t quantized) const;

  /// Enqueues a copy of `count` elements of device memory into `dst` (resized; the caller
  /// synchronises before reading it).
  template <class E>
  void download(const E* src, int64_t count, std::vector<E>& dst, const char* where) const;

  /// What the CUDA kernels add to the front end's checks (shape and knobs are validated there;
  /// cache_memory.cuh).
  void validate_construction() const;
  /// A device copy of `other` on `context`, for KVCacheBatch::fork (cache_transfer.cuh).
  KVCache(const KVCache& other, cuda::CudaContext& context);

  /// The heads, the lazy-layer statistics, the scratch and the low-rank policies' RoPE
  /// frequencies on the device (cache_memory.cuh).
  void allocate_bookkeeping();

  DeviceHead& store(int layer, int head) {
    return heads_[static_cast<std::size_t>(layer) * shape_.kv_heads + head];
  }
  const DeviceHead& store(int layer, int head) const {
    return heads_[static_cast<std::size_t>(layer) * shape_.kv_heads + head];
  }

  /// Device workspace of at least `bytes` (grown geometrically, after a stream synchronisation:
  /// a device-output attend may still be reading the old one).
  unsigned char* workspace(std::size_t bytes) const;
  /// Host staging area of `bytes`, zero-initialised (page-locked; waits for the last upload).
  unsigned char* staging(std::size_t bytes) const;
  /// One host-to-device copy of the staging area to the start of the workspace.
  void upload_staging(unsigned char* device_base, std::size_t bytes, const char* where) const;

  /// The pointer of view `name` must lie in `space` (host memory that the CPU can read, or
  /// memory of this context's device).
  void check_space(const char* where, const char* name, const void* data, MemorySpace space) const;
  /// The lowest element index (t, h, i) of device view `x` whose |value| is not <= limit (NaN
  /// included), or ULLONG_MAX; synchronises.
  unsigned long long first_invalid(const char* where, const ActivationView& x, float limit) const;
  /// detail::check_values for a view in `space`: on the host directly; on the device by a
  /// kernel that finds the element the host check would report first, with the same message.
  void check_values(const char* where, const char* name, const ActivationView& x, float limit,
                    MemorySpace space) const;

  /// attend() / observe()'s checks of q and its positions (cache_checks.cuh). Returns the
  /// positions the host may read for further checks: `positions`, their copy in `copy` when they
  /// are in device memory and the context's device value checks are on (one wait), or an empty
  /// view when those checks are off (device positions then go unchecked).
  Positions check_query(const char* where, int layer, const ActivationView& q, Positions positions,
                        MemorySpace space, std::vector<int64_t>& copy) const;

  void append_unchecked(int layer, const ActivationView& k, const ActivationView& v,
                        Positions positions, MemorySpace space);
  /// attend()'s checks of its arguments (cache_attend.cuh).
  void check_attend(const char* where, int layer, const ActivationView& q, Positions positions,
                    const OutputView& out, MemorySpace space) const;
  void attend_unchecked(int layer, const ActivationView& q, Positions positions,
                        const OutputView& out, MemorySpace space) const;
  /// Copies device rows [tokens][q_heads][head_dim] into host view `out` (waits for them).
  void download_output(const float* rows, const OutputView& out, const char* where) const;
  // Member templates, so that explicit instantiation of a cache whose policy does not evict
  // (quantize, score by queries) does not instantiate them.
  template <class P = Policy>
  void evict();
  template <class P = Policy>
  void quantize();
  template <class P = Policy>
  void observe_queries(int layer, const ActivationView& q, Positions positions,
                       Span<const float> query_weights, MemorySpace space,
                       const OutputView* out = nullptr);
  template <class P = Policy>
  void observe_hidden_unchecked(int layer, const ActivationView& x, Positions positions,
                                MemorySpace space);
  /// The token bases the heads point to, each once (shared by a layer's or a group's heads).
  std::vector<const cuda::DeviceLowRankBasis*> distinct_bases() const;
  /// materialize() of a low-rank layer (cache_materialize.cuh).
  DenseLayer materialize_low_rank(int layer) const;
  /// Low-rank policies: runs the policy's jobs on the device (cache_factorize.cuh).
  template <class P = Policy>
  void factorize();
  /// The attention / row-kernel view of (layer, head) under a low-rank policy; `rope` is how
  /// factored keys come out (rope_: post-RoPE; rotary_dim 0: pre-RoPE, as the basis holds them).
  cuda::LowRankAttentionHead low_rank_head(int layer, int head, const cuda::RopeParams& rope) const;

  std::unique_ptr<cuda::CudaContext> owned_context_;  // set when the cache made its own context
  cuda::CudaContext* context_ = nullptr;
  std::vector<DeviceHead> heads_;                       // layer-major: [layer][kv_head]
  std::vector<detail::LayerObservation> observations_;  // [layer], LazyLayerDrop only
  std::unique_ptr<Scratch> scratch_;
  cuda::DeviceBuffer<double> rope_inv_freq_;  // low-rank policies: RoPE's inv_freq on the device
  cuda::RopeParams rope_{};                   // ... and the rotation of rebuilt keys
};

}  // namespace kvpack
