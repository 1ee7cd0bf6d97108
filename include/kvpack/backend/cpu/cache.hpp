/// \file backend/cpu/cache.hpp
/// \brief KVCache<Policy, backend::Cpu>: ragged host storage, Eigen attention, policy dispatch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../budget.hpp"
#include "../../cache.hpp"
#include "../../config.hpp"
#include "../../detail/cache_front.hpp"
#include "../../detail/select.hpp"
#include "../../detail/validate.hpp"
#include "../../error.hpp"
#include "../../executor.hpp"
#include "../../low_rank_factors.hpp"
#include "../../page_pool.hpp"
#include "../../policy/compose.hpp"
#include "../../policy/head_level_evict.hpp"
#include "../../policy/lazy_layer_drop.hpp"
#include "../../policy/policy_base.hpp"
#include "../../rope.hpp"
#include "../../shape.hpp"
#include "../../span.hpp"
#include "../../view.hpp"
#include "append_heads.hpp"
#include "attention.hpp"
#include "head_store.hpp"
#include "scoring.hpp"
#include "store_for.hpp"

namespace kvpack {

/// \brief CPU implementation of KVCache. Not thread-safe for concurrent mutation; attend() may
/// run concurrently with other const calls. Its parallel loops (heads, key splits, scoring
/// blocks, factorization jobs) run on its Executor (executor.hpp; default_executor() unless
/// set_executor() gave another).
template <class Policy>
class KVCache<Policy, backend::Cpu> : public detail::CacheFront<Policy> {
 public:
  using backend_type = backend::Cpu;
  using typename detail::CacheFront<Policy>::storage_type;

 private:
  // What compress() runs: a selection stage (eviction, lazy layers, low-rank factoring or
  // nothing), then quantization of what is kept when the policy (or the second stage of a
  // Compose) is Quantize: of the rows for selection policies, of the token bases for low rank.
  using Stages = detail::PolicyStages<Policy>;
  using Selection = typename Stages::selection;
  static constexpr bool kEvicts = is_eviction_policy_v<Selection>;
  static constexpr ScoreSource kSource = Selection::score_source;
  static constexpr bool kLazyLayers = kSource == ScoreSource::kLayerMass;
  static constexpr bool kQueryScores = kSource == ScoreSource::kObservedQueries;
  static constexpr bool kHiddenScores = kSource == ScoreSource::kHiddenStates;
  // Per-token scores kept in the stores, set by observe() or observe_hidden().
  static constexpr bool kStoredScores = kQueryScores || kHiddenScores;
  static constexpr bool kHeadLevel = kSource == ScoreSource::kHeadScores;
  static constexpr bool kPositionScores = kSource == ScoreSource::kPosition;
  static constexpr bool kSumScores = detail::sums_query_scores<Selection>();
  static constexpr bool kQuantized = Stages::quantized;
  static constexpr bool kLowRank = Selection::storage_format == StorageFormat::kLowRankFactors;
  static constexpr bool kQuantizedRows = kQuantized && !kLowRank;
  // Dense rows in pages of a PagePool (head_store.hpp).
  static constexpr bool kDenseRows = !kQuantized && !kLowRank;
  // Dense rows (head_store.hpp), KIVI blocks (kivi_rows.hpp) or low-rank factors (low_rank.hpp).
  using Store =
      typename detail::CpuStore<Selection::storage_format, kQuantized, storage_type>::type;
  KVPACK_CACHE_FRONT_MEMBERS(Policy);

 public:
  /// Whether this policy's storage lives in pages of a PagePool: dense rows (Identity and the
  /// eviction policies), KIVI blocks (Quantize, compositions with it; their fp16 residual
  /// tail is per-head vectors) and low-rank token bases (CrossLayerSVD, ChannelShrink; their
  /// factors B and exact tail are per-head vectors). Every CPU format is paged.
  static constexpr bool paged = true;

  /// Bytes of one page of this cache's format for `page_tokens`: dense rows 2 × page_tokens ×
  /// head_dim elements; KIVI the blocks of max(page_tokens, group) tokens; low-rank bases a dense
  /// fp16 page, at least one KIVI block of a quantized basis (docs/page_formats.md); rounded up
  /// to 64.
  static std::size_t page_bytes(const ModelShape& shape, const Policy& policy, int page_tokens) {
    if constexpr (kDenseRows) {
      return detail::dense_page_bytes<storage_type>(page_tokens, shape.head_dim);
    } else if constexpr (kQuantizedRows) {
      const auto* q = Stages::quant_knobs(policy);
      return detail::kivi_page_bytes(detail::kivi_page_tokens(page_tokens, q->group),
                                     shape.head_dim, q->bits, q->group);
    } else {
      const auto* q = Stages::quant_knobs(policy);
      return detail::low_rank_page_bytes(page_tokens, shape.head_dim, q ? q->bits : 0,
                                         q ? q->group : 32);
    }
  }

  /// Validates the shape, the policy's knobs and the page options; throws
  /// kvpack::error on a bad value. `pages.pool` shares one page pool between caches (e.g. the
  /// sequences of an engine's batch); without one the cache makes a private pool.
  explicit KVCache(const ModelShape& shape, Policy policy = Policy{}, PageOptions pages = {})
      : Front(shape, std::move(policy)) {
    heads_.resize(static_cast<std::size_t>(shape_.layers) * shape_.kv_heads);
    if constexpr (kQuantizedRows) {
      for (auto& head : heads_) {
        head.bits = Stages::quant_knobs(policy_)->bits;
        head.group = Stages::quant_knobs(policy_)->group;
        head.int8_query = Stages::quant_knobs(policy_)->int8_query;
      }
    }
    {  // the page pool (every format is paged)
      constexpr const char* where = "KVCache";
      page_tokens_ = pages.page_tokens;
      detail::require(
          page_tokens_ >= 1 && page_tokens_ <= 4096 && (page_tokens_ & (page_tokens_ - 1)) == 0,
          where, "page_tokens", page_tokens_, "a power of two in [1, 4096]");
      const std::size_t need = page_bytes(shape_, policy_, page_tokens_);
      if (pages.pool) {
        detail::require(
            pages.pool->page_bytes() >= need, where, "pool page_bytes", pages.pool->page_bytes(),
            detail::concat(">= ", need, " (one page of this format: page_tokens ", page_tokens_,
                           ", head_dim ", shape_.head_dim, "; docs/page_formats.md)"));
        pool_ = std::move(pages.pool);
      } else {
        pool_ = std::make_shared<PagePool>(need, 64);  // chunks double up to 64 pages
        private_pool_ = true;
      }
      for (auto& head : heads_) head.set_pages(pool_, page_tokens_, shape_.head_dim);
    }
    if constexpr (kLowRank) {
      auto rope = std::make_shared<const Rope>(shape_.rope, shape_.head_dim);
      for (auto& head : heads_) head.rope = rope;
    }
    if constexpr (kLazyLayers) observations_.resize(shape_.layers);
  }

  /// Appends a block of tokens to `layer`: k and v are tokens × kv_heads × head_dim (post-RoPE
  /// keys), positions strictly increasing and after the layer's last position.
  void append(int layer, const ActivationView& k, const ActivationView& v, Positions positions) {
    constexpr const char* where = "KVCache::append";
    this->check_append(where, layer, k, v, positions);
    detail::append_heads<kDenseRows>(
        shape_.kv_heads, shape_.head_dim, k, v, positions,
        this->storage_limit(), [&](int h) -> auto& { return store(layer, h); },
        [&] { this->check_append_values(where, k, v); });
    this->record_append(layer, positions, k.tokens());
  }

  /// Hands queries (tokens × q_heads × head_dim, post-RoPE) to policies that score with them.
  /// `query_weights` ([tokens], optional; query-scored policies only) multiplies each query
  /// token's probabilities before they are reduced: KVzip+ passes 1 / ‖x_t‖ of the layer's
  /// attention input (ReconstructionEvict::output_factors). Throws kvpack::error, changing nothing,
  /// for a bad layer, view or position, non-finite queries, or weights of the wrong count or not
  /// finite and > 0.
  void observe(int layer, const ActivationView& q, Positions positions,
               Span<const float> query_weights = {}) {
    constexpr const char* where = "KVCache::observe";
    check_query(where, layer, q, positions);
    this->check_observe_weights(where, q, query_weights);
    if constexpr (kQueryScores || kLazyLayers) {
      observe_probabilities(layer, q, positions, query_weights);
    }
    observed_ = true;
  }

  /// attend() and observe() of the same queries in one pass (a KVzip repeat pass): for dense
  /// rows scored by queries (ReconstructionEvict, SnapKV) each score is computed once and serves
  /// the attention (softmax over every visible key) and the scores (softmax over the policy's
  /// window), which equal observe()'s bit for bit; other caches run the two calls. Same
  /// arguments and outputs as the two calls; throws kvpack::error for what either refuses,
  /// before anything (`out` included) is written. cache_observe.hpp.
  void attend_observe(int layer, const ActivationView& q, Positions positions,
                      const OutputView& out, Span<const float> query_weights = {});

  /// \brief Scores tokens from their hidden states (KVzap: ScoreSource::kHiddenStates). x is
  /// tokens × 1 × hidden: one "head" whose head_dim is the scorer's hidden size, each token's
  /// attention input (the RMS-normed hidden state); positions are those of tokens `layer` holds,
  /// e.g. the block just appended (prefill chunk or decode token). A token a head no longer holds
  /// is skipped there. Throws kvpack::error, changing nothing, for a bad layer, view, position
  /// or non-finite value, or a log-score that overflowed (inf or NaN).
  void observe_hidden(int layer, const ActivationView& x, Positions positions);

  /// Applies the policy to everything held. May be called again later (e.g. every N decode
  /// tokens); budgets are relative to the appended sequence, so repeated calls hold them.
  void compress() {
    this->check_compress();
    if constexpr (kEvicts) {
      static_assert(
          kSource != ScoreSource::kKeyValue || detail::has_token_score<Selection, float>::value,
          "eviction Policy with ScoreSource::kKeyValue lacks static "
          "token_score(const T* key, const T* value, int head_dim)");
      evict();
    } else if constexpr (kLazyLayers) {
      trim_lazy_layers();
    }
    if constexpr (kLowRank) factorize();
    if constexpr (kQuantizedRows) quantize();
  }

  /// Removes every token at a position > `last_position` from all layers, e.g. the repeat
  /// prompt of a scoring pass or rejected speculative tokens. What stays is bit-identical and
  /// bytes() does not grow. Refused (kvpack::error, nothing changed) when compress() evicted
  /// some of the tokens after the position from some heads only, or when the cut falls inside
  /// a quantized KIVI group (its blocks span the whole group): roll back to a group end then.
  void truncate(int64_t last_position) {
    constexpr const char* where = "KVCache::truncate";
    const auto after = [&](int l, int h) {
      const auto& p = store(l, h).positions;
      return static_cast<int64_t>(p.end() - std::upper_bound(p.begin(), p.end(), last_position));
    };
    const std::vector<int64_t> drop = this->plan_truncate(where, last_position, after);
    for (int l = 0; l < shape_.layers; ++l) {
      for (int h = 0; h < shape_.kv_heads && drop[l] > 0; ++h) {
        const auto& p = store(l, h).positions;
        this->refuse_group_split(where, last_position, l, h, store(l, h).drop_back_split(drop[l]),
                                 p.data(), static_cast<int64_t>(p.size()), drop[l]);
      }
    }
    for (int l = 0; l < shape_.layers; ++l) {
      if (!this->truncates(l, last_position, drop)) continue;
      for (int h = 0; h < shape_.kv_heads; ++h) store(l, h).drop_back(drop[l], shape_.head_dim);
    }
    this->commit_truncate(last_position, drop);
  }

  /// Mean attention mass that observed queries put on the initial + recent tokens of `layer`
  /// (LazyLayerDrop's statistic); NaN when nothing was observed.
  double observed_mass(int layer) const {
    detail::check_layer("KVCache::observed_mass", shape_, layer);
    return observations_.empty() ? std::nan("") : observations_[layer].mean();
  }

  /// \brief KVzip head scores of what observe() has scored so far (ReconstructionEvict): per
  /// (layer, kv head), the largest score any held token after the protected sinks received.
  /// Sinks are left out because nearly every head parks attention on them (attention sinks):
  /// on SmolLM2 they put every head of layers 12-29 at ≥ 0.91 (8 layers ≥ 0.99). Call after a
  /// repeat pass over a sample, before compress(); save the result and reuse it with
  /// HeadLevelEvict.
  HeadScores head_scores() const;

  /// \brief The score of every token (layer, head) holds, in held order (ascending position):
  /// what observe() gave it (KVzip: max probability; KVzip+: its weighted form; SnapKV: summed
  /// probability, before pooling) or observe_hidden() (KVzap: exp of the predicted log-score),
  /// NaN for a token not scored yet. What compress() ranks; a learned scorer's training targets.
  /// Throws kvpack::error for a bad layer or head.
  std::vector<float> token_scores(int layer, int head) const;

  /// Whether compress() marked `layer` lazy (LazyLayerDrop); false before the decision.
  bool is_lazy(int layer) const {
    detail::check_layer("KVCache::is_lazy", shape_, layer);
    return !observations_.empty() && observations_[layer].lazy == 1;
  }

  /// Attention of query tokens q (tokens × q_heads × head_dim, post-RoPE) over what `layer`
  /// holds, causal by position, GQA, scaled by 1/sqrt(head_dim), softmax in fp32. Writes
  /// tokens × q_heads × head_dim into `out`.
  void attend(int layer, const ActivationView& q, Positions positions,
              const OutputView& out) const {
    AttendPlan plan = checked_plan("KVCache::attend", layer, q, positions, out);
    detail::parallel_for(executor(), plan.items,
                         [&](int64_t item) { run_attend_item(plan, layer, q, positions, item); });
    finish_attend(plan, out);
  }

  /// Dense fp32 K/V and positions of `layer`, one entry per kv head (the slow path).
  DenseLayer materialize(int layer) const {
    detail::check_layer("KVCache::materialize", shape_, layer);
    const int d = shape_.head_dim;
    DenseLayer result;
    result.heads.resize(shape_.kv_heads);
    for (int h = 0; h < shape_.kv_heads; ++h) {
      const auto& head = store(layer, h);
      DenseHead& dst = result.heads[h];
      dst.k.resize(head.size() * d);
      dst.v.resize(head.size() * d);
      head.rows(d).load_keys(0, head.size(), dst.k.data());
      head.rows(d).load_values(0, head.size(), dst.v.data());
      dst.positions.assign(head.positions.begin(), head.positions.end());
    }
    return result;
  }

  /// Every byte held: K/V rows (or blocks, or factors and each shared basis once), positions,
  /// and the per-head / per-layer bookkeeping. Compression ratios come from it.
  std::size_t bytes() const {
    std::size_t total = heads_.size() * sizeof(Store) +
                        layers_.size() * sizeof(detail::LayerState) +
                        observations_.size() * sizeof(LayerObservation);
    for (const auto& head : heads_) total += head.bytes();
    return total + Store::shared_bytes(heads_);
  }

  /// \brief The heap the stored data occupies: bytes() with each buffer's allocated capacity
  /// instead of its size, so >= bytes(). Appends grow buffers geometrically (amortised O(1)), so
  /// after decode appends reserved_bytes() may exceed bytes() by up to the rows appended since
  /// the last compress(), which (like evictions and truncate) reallocates at exact size;
  /// shrink_to_fit() releases the slack. Not counted by either: the policy object (e.g.
  /// projections, head scores), the shared RoPE table of low-rank caches, and the executor.
  std::size_t reserved_bytes() const {
    std::size_t total = heads_.capacity() * sizeof(Store) +
                        layers_.capacity() * sizeof(detail::LayerState) +
                        observations_.capacity() * sizeof(LayerObservation);
    for (const auto& head : heads_) total += head.reserved_bytes();
    // A private page pool is the cache's too: its free pages and its bookkeeping.
    if (private_pool_) total += pool_->reserved_bytes() - pool_->bytes_in_use();
    return total + Store::shared_reserved_bytes(heads_);
  }

  /// Releases the growth slack of every buffer: reserved_bytes() becomes bytes(). Contents, and
  /// everything attend() returns, stay bit-identical.
  void shrink_to_fit() {
    for (auto& head : heads_) head.shrink_to_fit();
    if (private_pool_) pool_->release_unused();
  }

  /// The page pool the cache's pages come from. Copies of a cache share it.
  const std::shared_ptr<PagePool>& page_pool() const { return pool_; }

  /// Read-only view of the pages of one (layer, kv head) of a dense rows cache (DenseHeadPages).
  using HeadPages = DenseHeadPages;
  HeadPages pages(int layer, int head) const {
    static_assert(kDenseRows, "pages(): dense rows caches only (KIVI caches: kivi_pages())");
    this->check_head("KVCache::pages", layer, head);
    const Store& s = store(layer, head);
    return {static_cast<int>(s.page_tokens()), shape_.head_dim, s.size(), s.page_ids.data(),
            s.positions.data()};
  }
  /// Read-only view of the KIVI pages and residual of one (layer, kv head) (KiviHeadPages).
  KiviHeadPages kivi_pages(int layer, int head) const {
    static_assert(kQuantizedRows,
                  "kivi_pages(): KIVI caches only (Quantize, Compose<.., Quantize>)");
    this->check_head("KVCache::kivi_pages", layer, head);
    const Store& s = store(layer, head);
    return {
        s.page_tokens, shape_.head_dim,    s.bits,          s.group,         s.size(),
        s.quantized,   s.pages.ids.data(), s.tail_k.data(), s.tail_v.data(), s.positions.data()};
  }

  /// Read-only view of the bases, factors and fp16 tail of one (layer, kv head) of a low-rank
  /// cache (LowRankHeadFactors; docs/page_formats.md, "Low-rank factors"). Throws kvpack::error
  /// for a bad layer or head.
  LowRankHeadFactors low_rank_factors(int layer, int head) const;  // cache_attend_low_rank.hpp

  /// Tokens held by one (layer, kv-head).
  int64_t tokens(int layer, int head) const {
    this->check_head("KVCache::tokens", layer, head);
    return store(layer, head).size();
  }

  /// \brief Writes the whole state (every held value, positions, scores, per-layer sequence state,
  /// LazyLayerDrop statistics, low-rank bases and factors) to `path`: one versioned, checksummed
  /// file (layout: backend/cpu/cache_io.hpp). Throws kvpack::error when the file cannot be
  /// written.
  void save(const std::string& path) const;
  /// \brief Replaces this cache's state with the one saved at `path` by a cache of the same
  /// policy type (name, storage format, element type, KIVI bits and group) and shape (RoPE
  /// included); afterwards bytes(), materialize() and attend() are bit-identical to the saved
  /// cache's and later calls behave as they would have there. The policy's knobs stay this
  /// cache's. Throws kvpack::error, changing nothing, for a file that cannot be read, is
  /// truncated or corrupted (checksum), foreign (magic), of another version, shape or policy,
  /// or whose contents are inconsistent (sizes, positions, non-finite values).
  void load(const std::string& path);

  /// Runs this cache's parallel loops on `executor` (not owned: it must outlive the cache's
  /// calls), or on default_executor() when null. Copies of the cache share it.
  void set_executor(Executor* executor) { executor_ = executor; }
  /// The executor this cache's parallel loops run on.
  Executor& executor() const { return executor_ != nullptr ? *executor_ : default_executor(); }

  /// Drops every token and frees the memory; the shape and policy stay.
  void clear() {
    for (auto& head : heads_) head.clear();
    for (auto& o : observations_) o = LayerObservation{};
    this->clear_front();
  }

 private:
  using LayerObservation = detail::LayerObservation;

  Store& store(int layer, int head) {
    return heads_[static_cast<std::size_t>(layer) * shape_.kv_heads + head];
  }
  const Store& store(int layer, int head) const {
    return heads_[static_cast<std::size_t>(layer) * shape_.kv_heads + head];
  }

  void check_query(const char* where, int layer, const ActivationView& q,
                   Positions positions) const {
    this->check_query_shape(where, layer, q, positions);
    detail::check_values(where, "q", q, std::numeric_limits<float>::max());
  }

  // attend() in three steps, so that KVCacheBatch runs the work items of many sequences in one
  // parallel loop with exactly the per-sequence arithmetic.
  struct AttendPlan {
    int64_t tokens = 0, block_tokens = 1, blocks = 0, splits = 1, items = 0;
    int item_heads = 1;
    std::vector<cpu::PartialState> partial;  // [kv head][block][split]
  };
  AttendPlan plan_attend(int layer, int64_t tokens) const;
  void run_attend_item(AttendPlan& plan, int layer, const ActivationView& q, Positions positions,
                       int64_t item) const;
  void finish_attend(AttendPlan& plan, const OutputView& out) const;
  /// Checks of attend(), then the plan (KVCacheBatch).
  AttendPlan checked_plan(const char* where, int layer, const ActivationView& q,
                          Positions positions, const OutputView& out) const {
    check_query(where, layer, q, positions);
    this->check_output(where, q, out);
    this->check_visible(where, layer, positions, [&](int h) {
      const auto& head = store(layer, h);
      return std::pair<int64_t, int64_t>(head.size(), head.size() ? head.positions[0] : -1);
    });
    return plan_attend(layer, q.tokens());
  }
  template <class P, class B>
  friend class KVCacheBatch;
  const Selection& selection() const { return Stages::select_knobs(policy_); }

  void gather_query_rows(int layer, const ActivationView& q, Positions positions, int head,
                         int64_t t0, int64_t tn, std::vector<float>& rows,
                         std::vector<int64_t>& visible) const;
  void evict();
  void quantize();   // kivi_rows.hpp
  void factorize();  // low_rank.hpp
  /// One attend() work item over low-rank heads [h0, h0 + heads): query block [t0, t0 + tn),
  /// keys [begin, end); state_of(h) is head h's partial softmax state. low_rank.hpp.
  template <class StateOf>
  void attend_low_rank_item(int layer, const ActivationView& q, Positions positions, int h0,
                            int heads, int64_t t0, int64_t tn, int64_t begin, int64_t end,
                            const StateOf& state_of, std::vector<float>& scratch) const;
  std::vector<float> pre_rope_rows(int layer, int head, int64_t tokens, bool keys) const;
  void observe_probabilities(int layer, const ActivationView& q, Positions positions,
                             Span<const float> query_weights, const OutputView* out = nullptr);
  void trim_lazy_layers();

  std::vector<Store> heads_;                    // layer-major: [layer][kv_head]
  std::shared_ptr<PagePool> pool_;              // where every page of the cache comes from
  int page_tokens_ = 0;                         // PageOptions::page_tokens
  bool private_pool_ = false;                   // made by this cache (not shared by the caller)
  std::vector<LayerObservation> observations_;  // LazyLayerDrop only
  Executor* executor_ = nullptr;                // null: default_executor()
};

}  // namespace kvpack

#include "cache_impl.hpp"
