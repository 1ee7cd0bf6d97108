#pragma once
// TypedEvalCache<Policy>: the EvalCache of one KVCache<Policy>, and the adapter the forward pass
// calls. Policy-specific calls dispatch on the policy's traits (score source, stages), never on
// a concrete policy type.

#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "eval_cache.hpp"

namespace kvpack::eval {

/// Forwards the forward pass's calls to a KVCache, with observe() switchable at run time.
template <class Cache>
class SwitchableAdapter : public llama::AttentionCache {
 public:
  explicit SwitchableAdapter(Cache& cache) : cache_(&cache) {}
  void rebind(Cache& cache) { cache_ = &cache; }
  void set_observe(bool on) { observe_ = on; }
  /// Query weights 1 / ‖x_t‖ to observe(): on, off, or (-1) exactly when the policy has output
  /// factors (KVzip+). The ablation rows set them apart.
  void set_query_weights(int mode) { query_weights_ = mode; }
  int query_weights() const { return query_weights_; }

  void append(int layer, const float* k, const float* v, const int64_t* positions,
              int64_t n) override {
    const ModelShape& s = cache_->shape();
    cache_->append(layer, ActivationView::nhd(k, n, s.kv_heads, s.head_dim),
                   ActivationView::nhd(v, n, s.kv_heads, s.head_dim),
                   Positions(positions, static_cast<size_t>(n)));
  }
  void attend(int layer, const float* q, const int64_t* positions, int64_t n, float* out) override {
    const ModelShape& s = cache_->shape();
    cache_->attend(layer, ActivationView::nhd(q, n, s.q_heads, s.head_dim),
                   Positions(positions, static_cast<size_t>(n)),
                   OutputView::nhd(out, n, s.q_heads, s.head_dim));
  }
  void observe(int layer, const float* q, const int64_t* positions, int64_t n,
               const float* query_weights) override {
    if (!observe_) return;
    const ModelShape& s = cache_->shape();
    cache_->observe(layer, ActivationView::nhd(q, n, s.q_heads, s.head_dim),
                    Positions(positions, static_cast<size_t>(n)), weights(query_weights, n));
  }
  void attend_observe(int layer, const float* q, const int64_t* positions, int64_t n, float* out,
                      const float* query_weights) override {
    if (!observe_) return attend(layer, q, positions, n, out);
    const ModelShape& s = cache_->shape();
    cache_->attend_observe(layer, ActivationView::nhd(q, n, s.q_heads, s.head_dim),
                           Positions(positions, static_cast<size_t>(n)),
                           OutputView::nhd(out, n, s.q_heads, s.head_dim),
                           weights(query_weights, n));
  }
  void observe_hidden(int layer, const float* x, const int64_t* positions, int64_t n,
                      int hidden) override {
    if (capture_) {
      if (captured_.size() <= static_cast<std::size_t>(layer)) captured_.resize(layer + 1);
      captured_[layer].insert(captured_[layer].end(), x, x + n * hidden);
    }
    if constexpr (Selection::score_source == ScoreSource::kHiddenStates) {
      cache_->observe_hidden(layer, ActivationView::nhd(x, n, 1, hidden),
                             Positions(positions, static_cast<size_t>(n)));
    }
  }
  void set_capture(bool on) { capture_ = on; }
  const std::vector<float>& captured(int layer) const {
    static const std::vector<float> none;
    return static_cast<std::size_t>(layer) < captured_.size() ? captured_[layer] : none;
  }

 private:
  using Selection = typename detail::PolicyStages<typename Cache::policy_type>::selection;
  const Selection& selection() const {
    return detail::PolicyStages<typename Cache::policy_type>::select_knobs(cache_->policy());
  }
  /// KVzip+ weighs each query token by 1 / ‖x_t‖; plain probabilities for every other policy.
  Span<const float> weights(const float* query_weights, int64_t n) const {
    if constexpr (Selection::score_source == ScoreSource::kObservedQueries) {
      const bool on =
          query_weights_ < 0 ? selection().value_weights() != nullptr : query_weights_ == 1;
      if (on) return {query_weights, std::size_t(n)};
    }
    return {};
  }

  Cache* cache_;
  bool observe_ = false;
  bool capture_ = false;
  int query_weights_ = -1;
  std::vector<std::vector<float>> captured_;  // per layer: tokens × hidden
};

/// One sequence of a KVCacheBatch<Policy>. A new cache starts a batch (its own page pool); a
/// sibling (another context of the same row) and a clone (a question's fork of its context) are
/// sequences of the same batch, so a row's caches share one pool as an engine's requests do.
/// Destroying the cache removes its sequence.
template <class Policy>
class TypedEvalCache : public EvalCache {
 public:
  TypedEvalCache(const ModelShape& shape, const Policy& policy)
      : batch_(std::make_shared<Batch>(shape, policy)),
        id_(batch_->next_id++),
        cache_(&batch_->sequences.add(id_)),
        adapter_(*cache_) {}
  /// A new empty sequence of `home`'s batch with `policy`'s knobs.
  TypedEvalCache(const TypedEvalCache& home, const Policy& policy)
      : batch_(home.batch_),
        id_(batch_->next_id++),
        cache_(&batch_->sequences.add(id_, policy)),
        adapter_(*cache_) {}
  /// A fork of `other` (bit-identical contents, its own pages of the same pool).
  TypedEvalCache(const TypedEvalCache& other)
      : batch_(other.batch_),
        id_(batch_->next_id++),
        cache_(&batch_->sequences.fork(other.id_, id_)),
        adapter_(*cache_) {
    adapter_.set_query_weights(other.adapter_.query_weights());
  }
  TypedEvalCache& operator=(const TypedEvalCache&) = delete;
  ~TypedEvalCache() override { batch_->sequences.remove(id_); }

  llama::AttentionCache& attention() override { return adapter_; }
  void set_observe(bool on) override { adapter_.set_observe(on); }
  void set_query_weights(bool on) override { adapter_.set_query_weights(on ? 1 : 0); }
  void set_window(const ScoreWindow& window) override {
    if constexpr (std::is_base_of_v<QueryScoredEviction, Selection>) selection().window = window;
  }
  void compress() override { cache_->compress(); }
  void truncate(int64_t last_position) override { cache_->truncate(last_position); }
  std::size_t bytes() const override { return cache_->bytes(); }
  std::size_t dense_bytes() const override { return cache_->dense_bytes(); }
  std::unique_ptr<EvalCache> clone() const override {
    return std::make_unique<TypedEvalCache>(*this);
  }
  std::vector<double> observed_mass() const override {
    std::vector<double> m;
    if constexpr (kLayerMass) {
      for (int l = 0; l < cache_->shape().layers; ++l) m.push_back(cache_->observed_mass(l));
    }
    return m;
  }
  int layers() const override { return cache_->shape().layers; }
  DenseLayer materialize(int layer) const override { return cache_->materialize(layer); }
  void set_budget(double keep, BudgetScope scope) override {
    if constexpr (std::is_base_of_v<EvictionPolicy, Selection>) {
      Budget& b = selection().budget;
      b.keep_ratio = keep;
      b.keep_tokens = 0;
      b.scope = scope;
      b.validate("set_budget");
    } else {
      throw std::runtime_error("set_budget: this policy has no eviction budget");
    }
  }
  HeadScores head_scores() const override {
    if constexpr (std::is_base_of_v<QueryScoredEviction, Policy>) {
      return cache_->head_scores();
    } else {
      throw std::runtime_error("head_scores: only a cache scored by observed queries has them");
    }
  }
  void set_capture_hidden(bool on) override { adapter_.set_capture(on); }
  const std::vector<float>& captured_hidden(int layer) const override {
    return adapter_.captured(layer);
  }
  std::vector<float> token_scores(int layer, int head) const override {
    if constexpr (kStoredScores) {
      return cache_->token_scores(layer, head);
    } else {
      throw std::runtime_error("token_scores: this policy does not score tokens");
    }
  }
  std::vector<bool> lazy_layers() const override {
    std::vector<bool> lazy;
    if constexpr (kLayerMass) {
      for (int l = 0; l < cache_->shape().layers; ++l) lazy.push_back(cache_->is_lazy(l));
    }
    return lazy;
  }

 private:
  using Selection = typename detail::PolicyStages<Policy>::selection;
  static constexpr bool kLayerMass = Selection::score_source == ScoreSource::kLayerMass;
  static constexpr bool kStoredScores = Selection::score_source == ScoreSource::kObservedQueries ||
                                        Selection::score_source == ScoreSource::kHiddenStates;
  Selection& selection() { return detail::PolicyStages<Policy>::select_knobs(cache_->policy()); }

  void append_rows(int layer, const float* k, const float* v, const int64_t* positions,
                   int64_t n) override {
    adapter_.append(layer, k, v, positions, n);
  }
  void observe_hidden_rows(int layer, const float* x, const int64_t* positions, int64_t n,
                           int hidden) override {
    if constexpr (Selection::score_source == ScoreSource::kHiddenStates) {
      adapter_.observe_hidden(layer, x, positions, n, hidden);
    }
  }

  struct Batch {
    Batch(const ModelShape& shape, const Policy& policy) : sequences(shape, policy) {}
    KVCacheBatch<Policy> sequences;
    int64_t next_id = 0;
  };
  std::shared_ptr<Batch> batch_;
  int64_t id_;
  KVCache<Policy>* cache_;  // batch_->sequences.sequence(id_)
  SwitchableAdapter<KVCache<Policy>> adapter_;
};

/// The EvalCache of a KVCache<Policy> built from `policy`: a new sequence of `home`'s batch when
/// `home` is a cache of the same policy type (its pages must fit home's pool), else the first
/// sequence of a new batch.
template <class Policy>
std::unique_ptr<EvalCache> make_typed_cache(const ModelShape& shape, const Policy& policy,
                                            const EvalCache* home) {
  if (const auto* same = dynamic_cast<const TypedEvalCache<Policy>*>(home)) {
    return std::make_unique<TypedEvalCache<Policy>>(*same, policy);
  }
  return std::make_unique<TypedEvalCache<Policy>>(shape, policy);
}

}  // namespace kvpack::eval
