#include "eval_cache.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <type_traits>

namespace kvpack::eval {
namespace {

/// Forwards the forward pass's calls to a KVCache, with observe() switchable at run time.
template <class Cache>
class SwitchableAdapter : public llama::AttentionCache {
 public:
  explicit SwitchableAdapter(Cache& cache) : cache_(&cache) {}
  void rebind(Cache& cache) { cache_ = &cache; }
  void set_observe(bool on) { observe_ = on; }

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
  void observe(int layer, const float* q, const int64_t* positions, int64_t n) override {
    if (!observe_) return;
    const ModelShape& s = cache_->shape();
    cache_->observe(layer, ActivationView::nhd(q, n, s.q_heads, s.head_dim),
                    Positions(positions, static_cast<size_t>(n)));
  }

 private:
  Cache* cache_;
  bool observe_ = false;
};

template <class Policy>
class TypedEvalCache : public EvalCache {
 public:
  TypedEvalCache(const ModelShape& shape, const Policy& policy)
      : cache_(shape, policy), adapter_(cache_) {}
  TypedEvalCache(const TypedEvalCache& other) : cache_(other.cache_), adapter_(cache_) {}

  llama::AttentionCache& attention() override { return adapter_; }
  void set_observe(bool on) override { adapter_.set_observe(on); }
  void set_window(const ScoreWindow& window) override {
    if constexpr (std::is_same_v<Selection, ReconstructionEvict>) {
      selection().window = window;
    }
  }
  void compress() override { cache_.compress(); }
  void truncate(int64_t last_position) override { cache_.truncate(last_position); }
  std::size_t bytes() const override { return cache_.bytes(); }
  std::size_t dense_bytes() const override { return cache_.dense_bytes(); }
  std::unique_ptr<EvalCache> clone() const override {
    return std::make_unique<TypedEvalCache>(*this);
  }
  bool needs_repeat_pass() const override { return std::is_same_v<Selection, ReconstructionEvict>; }
  bool needs_last_queries() const override { return std::is_same_v<Selection, LazyLayerDrop>; }
  std::vector<double> observed_mass() const override {
    std::vector<double> m;
    if constexpr (std::is_same_v<Selection, LazyLayerDrop>) {
      for (int l = 0; l < cache_.shape().layers; ++l) m.push_back(cache_.observed_mass(l));
    }
    return m;
  }
  int layers() const override { return cache_.shape().layers; }
  DenseLayer materialize(int layer) const override { return cache_.materialize(layer); }
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
    if constexpr (std::is_same_v<Policy, ReconstructionEvict>) {
      return cache_.head_scores();
    } else {
      throw std::runtime_error("head_scores: only a kvzip cache scores heads");
    }
  }
  std::vector<bool> lazy_layers() const override {
    std::vector<bool> lazy;
    if constexpr (std::is_same_v<Selection, LazyLayerDrop>) {
      for (int l = 0; l < cache_.shape().layers; ++l) lazy.push_back(cache_.is_lazy(l));
    }
    return lazy;
  }

 private:
  using Selection = typename detail::PolicyStages<Policy>::selection;
  Selection& selection() { return detail::PolicyStages<Policy>::select_knobs(cache_.policy()); }

  void append_rows(int layer, const float* k, const float* v, const int64_t* positions,
                   int64_t n) override {
    adapter_.append(layer, k, v, positions, n);
  }

  KVCache<Policy> cache_;
  SwitchableAdapter<KVCache<Policy>> adapter_;
};

}  // namespace

void EvalCache::copy_prefix_from(const EvalCache& source, int64_t end_position) {
  std::vector<float> k, v;
  std::vector<int64_t> positions;
  for (int l = 0; l < source.layers(); ++l) {
    const DenseLayer layer = source.materialize(l);
    const auto& pos = layer.heads.at(0).positions;
    const int64_t heads = static_cast<int64_t>(layer.heads.size());
    const int64_t d =
        static_cast<int64_t>(layer.heads[0].k.size() / std::max<std::size_t>(1, pos.size()));
    const int64_t n = std::lower_bound(pos.begin(), pos.end(), end_position) - pos.begin();
    k.resize(n * heads * d);
    v.resize(n * heads * d);
    for (int64_t h = 0; h < heads; ++h) {
      if (layer.heads[h].positions != pos) {
        throw std::runtime_error("copy_prefix_from: the source heads hold different tokens");
      }
      for (int64_t t = 0; t < n; ++t) {
        std::copy_n(layer.heads[h].k.data() + t * d, d, k.data() + (t * heads + h) * d);
        std::copy_n(layer.heads[h].v.data() + t * d, d, v.data() + (t * heads + h) * d);
      }
    }
    positions.assign(pos.begin(), pos.begin() + n);
    if (n > 0) append_rows(l, k.data(), v.data(), positions.data(), n);
  }
}

namespace {

Budget eviction_budget(const PolicySpec& spec, BudgetScope scope, int64_t default_sinks) {
  Budget b = Budget::ratio(spec.keep, scope);
  b.sink_tokens = spec.sinks >= 0 ? spec.sinks : default_sinks;
  return b;
}

/// Builds the selection stage named `base` and hands it to `make(policy)`.
template <class Make>
std::unique_ptr<EvalCache> with_selection(const std::string& base, const PolicySpec& spec,
                                          Make&& make) {
  if (base == "l2") {
    // Reference: layers 0-1 whole. Sinks protected like the other evictors.
    return make(L2NormEvict(eviction_budget(spec, BudgetScope::kPerHead, 4), 2));
  }
  if (base == "kvzip" || base == "kvzip-uniform") {
    return make(ReconstructionEvict(
        eviction_budget(spec, base == "kvzip" ? BudgetScope::kGlobal : BudgetScope::kPerHead, 4)));
  }
  if (base == "kvzip-head") {
    if (!spec.head_scores) throw std::runtime_error("kvzip-head needs head scores");
    return make(HeadLevelEvict(spec.head_scores, eviction_budget(spec, BudgetScope::kGlobal, 4)));
  }
  if (base == "lazy") {
    return make(LazyLayerDrop(spec.threshold, spec.sinks >= 0 ? spec.sinks : 4, spec.lazy_recent));
  }
  throw std::runtime_error("unknown policy '" + base + "'; known: " + known_policy_names());
}

}  // namespace

std::string known_policy_names() {
  return "full, full-f32, quant, l2, kvzip, kvzip-uniform, kvzip-head, lazy, xkv, cskv, and "
         "l2+quant, kvzip+quant, kvzip-uniform+quant, kvzip-head+quant, lazy+quant, xkv+quant, "
         "cskv+quant";
}

std::pair<int, int> cskv_ranks(const ModelShape& shape, double ratio, int64_t tokens,
                               double latent_bytes) {
  // Per layer at T tokens: dense 2 * c * 2 * T bytes; held (r_k + r_v) latents of
  // `latent_bytes` each per token (fp16: 2; cskv+quant: Quantize::bytes_per_value()), the
  // fp32 projections bytes() counts (c x (r_k + r_v) floats) and an int32 position per token and
  // kv head. r_k : r_v = 1 : 3.
  const int c = shape.kv_heads * shape.head_dim;
  const double t = static_cast<double>(tokens);
  const double total =
      (4.0 * c * t / ratio - 4.0 * shape.kv_heads * t) / (latent_bytes * t + 4.0 * c);
  const int rk = std::clamp(static_cast<int>(std::lround(0.25 * total)), 1, c);
  const int rv = std::clamp(static_cast<int>(std::lround(0.75 * total)), 1, c);
  return {rk, rv};
}

void check_policy_name(const std::string& written) {
  // A trailing bit width on a quant name ("quant4", "l2+quant2") is checked by the caller.
  std::string name = written;
  const auto q = name.find("quant");
  if (q != std::string::npos && q + 5 < name.size() &&
      name.find_first_not_of("0123456789", q + 5) == std::string::npos) {
    name.resize(q + 5);
  }
  static const char* known[] = {"full",
                                "full-f32",
                                "quant",
                                "l2",
                                "kvzip",
                                "kvzip-uniform",
                                "lazy",
                                "l2+quant",
                                "kvzip+quant",
                                "kvzip-uniform+quant",
                                "lazy+quant",
                                "xkv",
                                "cskv",
                                "xkv+quant",
                                "cskv+quant",
                                "kvzip-head",
                                "kvzip-head+quant"};
  for (const char* k : known) {
    if (name == k) return;
  }
  throw std::runtime_error("unknown policy '" + written + "'; known: " + known_policy_names());
}

std::string PolicySpec::label() const {
  std::ostringstream os;
  os << name;
  const bool quant = name == "quant" || name.find("+quant") != std::string::npos;
  if (quant) os << bits;
  if (name.rfind("l2", 0) == 0 || name.rfind("kvzip", 0) == 0) {
    if (keep_from_ratio) {
      os << " x" << ratio;
    } else {
      os << " keep=" << keep;
    }
  }
  if (name.rfind("lazy", 0) == 0) os << " thr=" << threshold << " w=" << lazy_recent;
  if (name.rfind("xkv", 0) == 0) os << " G=" << xkv_group << " x" << ratio;
  if (name.rfind("cskv", 0) == 0) os << " x" << ratio;
  return os.str();
}

std::unique_ptr<EvalCache> make_cache(const PolicySpec& spec, const ModelShape& shape) {
  check_policy_name(spec.name);
  const Quantize quant(spec.bits, spec.group, spec.residual);
  if (spec.name == "full") return std::make_unique<TypedEvalCache<Identity>>(shape, Identity{});
  if (spec.name == "full-f32") {
    return std::make_unique<TypedEvalCache<IdentityF32>>(shape, IdentityF32{});
  }
  if (spec.name == "quant") return std::make_unique<TypedEvalCache<Quantize>>(shape, quant);
  if (spec.name == "xkv") {
    return std::make_unique<TypedEvalCache<CrossLayerSVD>>(
        shape, CrossLayerSVD::with_ratio(spec.xkv_group, spec.ratio));
  }
  if (spec.name == "cskv") {
    if (!spec.projections) throw std::runtime_error("cskv needs calibrated projections");
    return std::make_unique<TypedEvalCache<ChannelShrink>>(
        shape, ChannelShrink(spec.projections, spec.cskv_window));
  }
  if (spec.name == "xkv+quant") {
    using P = Compose<CrossLayerSVD, Quantize>;
    return std::make_unique<TypedEvalCache<P>>(
        shape, P(CrossLayerSVD::with_ratio(spec.xkv_group, spec.ratio), quant));
  }
  if (spec.name == "cskv+quant") {
    if (!spec.projections) throw std::runtime_error("cskv+quant needs calibrated projections");
    using P = Compose<ChannelShrink, Quantize>;
    return std::make_unique<TypedEvalCache<P>>(
        shape, P(ChannelShrink(spec.projections, spec.cskv_window), quant));
  }
  const auto plus = spec.name.find("+quant");
  if (plus != std::string::npos) {
    return with_selection(spec.name.substr(0, plus), spec, [&](auto first) {
      using P = Compose<decltype(first), Quantize>;
      return std::unique_ptr<EvalCache>(
          std::make_unique<TypedEvalCache<P>>(shape, P(first, quant)));
    });
  }
  return with_selection(spec.name, spec, [&](auto policy) {
    return std::unique_ptr<EvalCache>(
        std::make_unique<TypedEvalCache<decltype(policy)>>(shape, policy));
  });
}

}  // namespace kvpack::eval
