#pragma once
// What the forward pass stores K/V in and attends through. The model talks to a small abstract
// interface so that the bulk of it is compiled once; KvCacheAdapter plugs any kvpack::KVCache in.

#include <cstdint>
#include <kvpack/kvpack.hpp>
#include <vector>

namespace kvpack::llama {

/// Per-layer K/V storage and attention, called by LlamaModel for each layer of each chunk in the
/// order append -> attend -> observe. All buffers are token-major contiguous ("NHD"): k and v are
/// n × kv_heads × head_dim (post-RoPE keys), q and out n × q_heads × head_dim. Positions are
/// absolute and strictly increasing.
class AttentionCache {
 public:
  virtual ~AttentionCache() = default;
  /// Stores the chunk's keys and values.
  virtual void append(int layer, const float* k, const float* v, const int64_t* positions,
                      int64_t n) = 0;
  /// Causal attention of the chunk's queries over everything held (this chunk included).
  virtual void attend(int layer, const float* q, const int64_t* positions, int64_t n,
                      float* out) = 0;
  /// Hands the chunk's queries to scoring policies; a no-op unless overridden. query_weights
  /// [n]: 1 / ‖x_t‖ of each token's attention input (KVzip+ weighs its probabilities by them).
  virtual void observe(int /*layer*/, const float* /*q*/, const int64_t* /*positions*/,
                       int64_t /*n*/, const float* /*query_weights*/) {}
  /// attend() then observe() of the same queries; caches that score with them override it to do
  /// both in one pass (KVCache::attend_observe: each score computed once).
  virtual void attend_observe(int layer, const float* q, const int64_t* positions, int64_t n,
                              float* out, const float* query_weights) {
    attend(layer, q, positions, n, out);
    observe(layer, q, positions, n, query_weights);
  }
  /// Hands the chunk's attention inputs x (n × hidden, the RMS-normed hidden states the Q/K/V
  /// projections read) to hidden-state scorers (KVzap), right after append(); a no-op unless
  /// overridden.
  virtual void observe_hidden(int /*layer*/, const float* /*x*/, const int64_t* /*positions*/,
                              int64_t /*n*/, int /*hidden*/) {}
};

/// \brief Adapts a kvpack::KVCache<Policy, Backend> (held by reference) to AttentionCache.
/// \tparam Cache any KVCache instantiation.
template <class Cache>
class KvCacheAdapter : public AttentionCache {
 public:
  /// \param observe_queries forward queries to Cache::observe (policies that score with them
  ///                        need it; it costs a validation pass otherwise).
  explicit KvCacheAdapter(Cache& cache, bool observe_queries = true)
      : cache_(cache), observe_queries_(observe_queries) {}

  void append(int layer, const float* k, const float* v, const int64_t* positions,
              int64_t n) override {
    const ModelShape& s = cache_.shape();
    cache_.append(layer, ActivationView::nhd(k, n, s.kv_heads, s.head_dim),
                  ActivationView::nhd(v, n, s.kv_heads, s.head_dim),
                  Positions(positions, static_cast<size_t>(n)));
  }

  void attend(int layer, const float* q, const int64_t* positions, int64_t n, float* out) override {
    const ModelShape& s = cache_.shape();
    cache_.attend(layer, ActivationView::nhd(q, n, s.q_heads, s.head_dim),
                  Positions(positions, static_cast<size_t>(n)),
                  OutputView::nhd(out, n, s.q_heads, s.head_dim));
  }

  void observe(int layer, const float* q, const int64_t* positions, int64_t n,
               const float* /*query_weights*/) override {
    if (!observe_queries_) return;
    const ModelShape& s = cache_.shape();
    cache_.observe(layer, ActivationView::nhd(q, n, s.q_heads, s.head_dim),
                   Positions(positions, static_cast<size_t>(n)));
  }

  /// Plain probabilities, as observe() here (kvpack-eval's adapter passes KVzip+'s weights).
  void attend_observe(int layer, const float* q, const int64_t* positions, int64_t n, float* out,
                      const float* /*query_weights*/) override {
    if (!observe_queries_) return attend(layer, q, positions, n, out);
    const ModelShape& s = cache_.shape();
    cache_.attend_observe(layer, ActivationView::nhd(q, n, s.q_heads, s.head_dim),
                          Positions(positions, static_cast<size_t>(n)),
                          OutputView::nhd(out, n, s.q_heads, s.head_dim));
  }

  /// Hands the attention inputs to policies scored by hidden states (KVzap); a no-op for others.
  void observe_hidden(int layer, const float* x, const int64_t* positions, int64_t n,
                      int hidden) override {
    using Selection = typename detail::PolicyStages<typename Cache::policy_type>::selection;
    if constexpr (Selection::score_source == ScoreSource::kHiddenStates) {
      cache_.observe_hidden(layer, ActivationView::nhd(x, n, 1, hidden),
                            Positions(positions, static_cast<size_t>(n)));
    }
  }

  Cache& cache() { return cache_; }

 private:
  Cache& cache_;
  bool observe_queries_;
};

/// \brief Plain fp32 cache with textbook attention (softmax in double): the oracle the kvpack
/// caches are tested against. Keeps everything; no compression.
class DenseAttentionCache : public AttentionCache {
 public:
  DenseAttentionCache(int layers, int q_heads, int kv_heads, int head_dim);

  void append(int layer, const float* k, const float* v, const int64_t* positions,
              int64_t n) override;
  void attend(int layer, const float* q, const int64_t* positions, int64_t n, float* out) override;

  int64_t tokens(int layer) const;
  void clear();

 private:
  struct Layer {
    std::vector<float> k, v;  // tokens × kv_heads × head_dim
    std::vector<int64_t> positions;
  };
  int q_heads_, kv_heads_, head_dim_;
  std::vector<Layer> layers_;
};

}  // namespace kvpack::llama
