// libFuzzer target: the public KVCache API driven by fuzzed shapes, policies, knobs, positions
// and values. Bytes are read as a program: a shape and a policy, then operations (append,
// observe, compress, attend, truncate, materialize, a knob change). Findings: a crash or a
// sanitizer report, an exception other than kvpack::error, a refused call that changed what the
// cache holds, or a non-finite attention output from finite inputs.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <kvpack/kvpack.hpp>
#include <limits>
#include <memory>
#include <vector>

namespace {

/// Reads the input as a stream of small integers; zeros once it runs out.
class Bytes {
 public:
  Bytes(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return at_ >= size_; }
  uint8_t u8() { return at_ < size_ ? data_[at_++] : 0; }
  uint32_t u32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v = v << 8 | u8();
    return v;
  }
  /// A value in [lo, hi].
  int range(int lo, int hi) { return lo + u8() % (hi - lo + 1); }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t at_ = 0;
};

/// Seeded, roughly Gaussian values (Irwin-Hall sum of four uniforms, unit variance). Cheap on
/// purpose: std::normal_distribution<float> computes a long-double log per value, which took a
/// third of this target's time under ASan.
class Noise {
 public:
  explicit Noise(uint32_t seed) : state_(seed) {}
  float operator()(float sigma) {
    float sum = 0.0f;
    for (int i = 0; i < 4; ++i) sum += static_cast<float>(next() >> 40) * 0x1p-24f;
    return (sum - 2.0f) * 1.7320508f * sigma;  // Var(sum) = 4/12
  }

 private:
  uint64_t next() {  // splitmix64
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t state_;
};

/// A block of activations: seeded Gaussian values of a fuzzed scale, with an optional special
/// value (NaN, ±inf, beyond fp16, subnormal) at a fuzzed index.
std::vector<float> activations(Bytes& in, std::size_t n) {
  Noise noise(in.u32());
  const float scales[] = {1.0f, 0.01f, 30.0f, 3000.0f, 60000.0f};
  const float sigma = scales[in.u8() % 5];
  std::vector<float> x(n);
  for (auto& v : x) v = noise(sigma);
  const uint8_t special = in.u8();
  if (n > 0 && special < 40) {
    const float values[] = {std::nanf(""), INFINITY, -INFINITY, 70000.0f, 1e-40f, 0.0f};
    x[in.u32() % n] = values[special % 6];
  }
  return x;
}

bool all_finite(const std::vector<float>& x) {
  for (float v : x) {
    if (!std::isfinite(v)) return false;
  }
  return true;
}

/// What a refused call must leave as it was.
template <class Cache>
std::vector<int64_t> state(const Cache& cache) {
  std::vector<int64_t> s{static_cast<int64_t>(cache.bytes()),
                         static_cast<int64_t>(cache.dense_bytes())};
  for (int l = 0; l < cache.shape().layers; ++l) {
    s.push_back(cache.appended(l));
    for (int h = 0; h < cache.shape().kv_heads; ++h) s.push_back(cache.tokens(l, h));
  }
  return s;
}

/// Runs `call`; a kvpack::error must leave `cache` unchanged, anything else escapes (a finding).
template <class Cache, class F>
bool attempt(Cache& cache, F&& call) {
  const auto before = state(cache);
  try {
    call();
    return true;
  } catch (const kvpack::error&) {
    if (state(cache) != before) std::abort();  // a failed call changed the cache
    return false;
  }
}

template <class Policy>
void drive(const kvpack::ModelShape& shape, const Policy& policy, Bytes& in) {
  std::unique_ptr<kvpack::KVCache<Policy>> made;
  try {
    made = std::make_unique<kvpack::KVCache<Policy>>(shape, policy);
  } catch (const kvpack::error&) {
    return;  // a refused shape or knob
  }
  auto& cache = *made;
  const int kv = shape.kv_heads, q_heads = shape.q_heads, d = shape.head_dim;
  std::vector<int64_t> next(shape.layers, 0);  // next position per layer
  for (int op = 0; op < 32 && !in.empty(); ++op) {
    const int layer = in.range(0, shape.layers);  // == layers: an invalid layer
    const int safe_layer = layer < shape.layers ? layer : 0;
    switch (in.u8() % 8) {
      case 0:
      case 1: {  // append a block (prefill chunk or decode token)
        const int64_t n = in.range(0, 24);
        const auto k = activations(in, static_cast<std::size_t>(n) * kv * d);
        const auto v = activations(in, static_cast<std::size_t>(n) * kv * d);
        std::vector<int64_t> pos(static_cast<std::size_t>(n));
        const int gap = in.u8() < 30 ? in.range(-3, 40) : 0;  // sometimes out of order / gapped
        for (int64_t t = 0; t < n; ++t) pos[t] = next[safe_layer] + gap + t;
        const bool appended = attempt(cache, [&] {
          cache.append(layer, kvpack::ActivationView::nhd(k.data(), n, kv, d),
                       kvpack::ActivationView::nhd(v.data(), n, kv, d), pos);
        });
        if (appended && n > 0) next[layer] = pos.back() + 1;
        break;
      }
      case 2: {  // observe queries (KVzip+: with query weights) or hidden states (KVzap)
        const int64_t n = in.range(1, 12);
        std::vector<int64_t> pos(static_cast<std::size_t>(n));
        for (int64_t t = 0; t < n; ++t) pos[t] = next[safe_layer] - n + t;
        if constexpr (Policy::score_source == kvpack::ScoreSource::kHiddenStates) {
          const int hidden = policy.scorer ? policy.scorer->hidden : 1;
          const auto x = activations(in, static_cast<std::size_t>(n) * hidden);
          attempt(cache, [&] {
            cache.observe_hidden(layer, kvpack::ActivationView::nhd(x.data(), n, 1, hidden), pos);
          });
        } else {
          const auto q = activations(in, static_cast<std::size_t>(n) * q_heads * d);
          std::vector<float> weights;
          if (in.u8() < 100) {  // sometimes weights, sometimes bad ones
            for (int64_t t = 0; t < n + (in.u8() < 10 ? 1 : 0); ++t) {
              weights.push_back(in.u8() < 8 ? -1.0f : 0.25f + in.u8() / 64.0f);
            }
          }
          attempt(cache, [&] {
            cache.observe(layer, kvpack::ActivationView::nhd(q.data(), n, q_heads, d), pos,
                          weights);
          });
        }
        break;
      }
      case 3:
        attempt(cache, [&] { cache.compress(); });
        break;
      case 4: {  // attend one or a few queries
        const int64_t n = in.range(1, 3);
        const auto q = activations(in, static_cast<std::size_t>(n) * q_heads * d);
        std::vector<int64_t> pos(static_cast<std::size_t>(n));
        for (int64_t t = 0; t < n; ++t) pos[t] = next[safe_layer] - 1 - in.range(0, 3);
        std::vector<float> out(q.size());
        const auto before = state(cache);
        try {
          cache.attend(layer, kvpack::ActivationView::nhd(q.data(), n, q_heads, d), pos,
                       kvpack::OutputView::nhd(out.data(), n, q_heads, d));
          if (all_finite(q) && !all_finite(out)) std::abort();  // finite in, non-finite out
        } catch (const kvpack::error&) {
        }
        if (state(cache) != before) std::abort();  // attend is const
        break;
      }
      case 5: {  // roll back
        const int64_t last = next[safe_layer] - 1 - in.range(0, 50);
        if (attempt(cache, [&] { cache.truncate(last); })) {
          for (int l = 0; l < shape.layers; ++l) {
            next[l] = std::min<int64_t>(next[l], std::max<int64_t>(last + 1, 0));
            if (cache.appended(l) == 0) next[l] = 0;
          }
        }
        break;
      }
      case 6:  // materialize: what is held is finite
        attempt(cache, [&] {
          for (const auto& head : cache.materialize(layer).heads) {
            if (!all_finite(head.k) || !all_finite(head.v)) std::abort();
          }
        });
        break;
      default:
        attempt(cache, [&] { cache.clear(); });
        std::fill(next.begin(), next.end(), 0);
        break;
    }
  }
}

kvpack::Budget budget(Bytes& in) {
  kvpack::Budget b;
  const double keeps[] = {0.05, 0.25, 0.5, 1.0, 0.0, 1.5};  // the last two are invalid
  b.keep_ratio = keeps[in.u8() % 6];
  b.keep_tokens = in.u8() < 40 ? in.range(-1, 50) : 0;
  b.scope = in.u8() & 1 ? kvpack::BudgetScope::kGlobal : kvpack::BudgetScope::kPerHead;
  b.sink_tokens = in.range(0, 8);
  b.recent_tokens = in.range(0, 16);
  return b;
}

/// Projections with orthonormal columns (unit vectors of fuzzed channels' block), or, rarely,
/// of a wrong size (validate() must refuse them). Cheap: no calibration per input.
std::shared_ptr<const kvpack::ChannelProjections> projections(const kvpack::ModelShape& shape,
                                                              Bytes& in) {
  auto p = std::make_shared<kvpack::ChannelProjections>();
  p->layers = shape.layers;
  p->kv_heads = shape.kv_heads;
  p->head_dim = shape.head_dim;
  const int c = std::max(1, p->channels());
  for (int l = 0; l < shape.layers; ++l) {
    for (bool keys : {true, false}) {
      const int rank = in.range(1, 16);
      const int offset = in.range(0, 255);
      std::vector<float> m(static_cast<std::size_t>(c) * rank, 0.0f);
      for (int j = 0; j < rank && j < c; ++j)
        m[static_cast<std::size_t>((j + offset) % c) * rank + j] = 1.0f;
      if (in.u8() < 8) m.pop_back();  // a hand-built projection of the wrong size
      (keys ? p->rank_k : p->rank_v).push_back(rank);
      (keys ? p->pk : p->pv).push_back(std::move(m));
    }
  }
  return p;
}

/// KVzip+'s output factors from a random W_o of a fuzzed scale (huge ones must be refused), or
/// null when set_layer refused it.
std::shared_ptr<const kvpack::OutputFactors> output_factors(const kvpack::ModelShape& shape,
                                                            Bytes& in) {
  const int hidden = in.range(1, 24);
  const float scales[] = {0.1f, 1.0f, 1e3f, 1e37f};
  const float scale = scales[in.u8() % 4];
  try {
    auto g = std::make_shared<kvpack::OutputFactors>(shape);
    Noise noise(in.u32());
    std::vector<float> w(static_cast<std::size_t>(hidden) * std::max(0, shape.q_heads) *
                         std::max(0, shape.head_dim));
    for (int l = 0; l < shape.layers; ++l) {
      for (auto& v : w) v = noise(scale);
      g->set_layer(l, w.data(), hidden);
    }
    return g;
  } catch (const kvpack::error&) {
    return nullptr;
  }
}

/// KVzap's scorer with fuzzed weights (sometimes of the wrong shape or non-finite).
std::shared_ptr<const kvpack::HiddenScorer> hidden_scorer(const kvpack::ModelShape& shape,
                                                          Bytes& in) {
  auto s = std::make_shared<kvpack::HiddenScorer>(shape.layers + (in.u8() < 8 ? 1 : 0),
                                                  std::max(1, shape.kv_heads), in.range(1, 32));
  Noise noise(in.u32());
  const float scales[] = {0.01f, 1.0f, 100.0f, 1e30f};
  const float sigma = scales[in.u8() % 4];
  for (auto& w : s->weight) w = noise(sigma);
  for (auto& b : s->bias) b = noise(sigma);
  if (in.u8() < 8 && !s->bias.empty()) s->bias[0] = std::nanf("");
  return s;
}

/// Head scores in [0, 1] (sometimes of the wrong shape).
std::shared_ptr<const kvpack::HeadScores> head_scores(const kvpack::ModelShape& shape, Bytes& in) {
  auto h = std::make_shared<kvpack::HeadScores>();
  h->layers = shape.layers;
  h->kv_heads = shape.kv_heads + (in.u8() < 8 ? 1 : 0);
  for (int i = 0; i < h->layers * h->kv_heads; ++i) h->score.push_back(in.u8() / 255.0f);
  return h;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Bytes in(data, size);
  const int dims[] = {8, 16, 32, 64, 80, 0, 7};  // 0 and 7 are invalid
  kvpack::ModelShape shape;
  shape.layers = in.range(1, 2);
  shape.kv_heads = in.range(1, 3);
  shape.q_heads = shape.kv_heads * in.range(1, 3) + (in.u8() < 10 ? 1 : 0);
  shape.head_dim = dims[in.u8() % 7];
  shape.rope.style = in.u8() & 1 ? kvpack::RopeStyle::kHalfSplit : kvpack::RopeStyle::kInterleaved;
  const int bits[] = {2, 4, 8, 3};
  const int groups[] = {16, 32, 64, 10};
  const kvpack::Quantize quant(bits[in.u8() % 4], groups[in.u8() % 4], 16 * in.range(0, 3));
  switch (in.u8() % 15) {
    case 0:
      drive(shape, kvpack::Identity{}, in);
      break;
    case 1:
      drive(shape, kvpack::L2NormEvict(budget(in), in.range(0, 2)), in);
      break;
    case 2:
      drive(shape, quant, in);
      break;
    case 3:
      drive(shape, kvpack::ReconstructionEvict(budget(in)), in);
      break;
    case 4:
      drive(shape, kvpack::LazyLayerDrop(in.range(0, 10) / 10.0, in.range(0, 4), in.range(0, 32)),
            in);
      break;
    case 5:
      drive(shape, kvpack::CrossLayerSVD(in.range(1, 3), in.range(0, 12), in.range(0, 12)), in);
      break;
    case 6:
      drive(shape, kvpack::CrossLayerSVD::with_ratio(in.range(1, 3), 1.0 + in.range(0, 12)), in);
      break;
    case 7: {
      using P = kvpack::Compose<kvpack::ReconstructionEvict, kvpack::Quantize>;
      drive(shape, P(kvpack::ReconstructionEvict(budget(in)), quant), in);
      break;
    }
    case 9:
      drive(shape, kvpack::StreamingLLM(budget(in)), in);
      break;
    case 10:
      drive(shape, kvpack::SnapKV(budget(in), in.range(0, 16), 2 * in.range(0, 4) + 1), in);
      break;
    case 11:
      drive(shape, kvpack::ChannelShrink(projections(shape, in), in.range(0, 40)), in);
      break;
    case 12:
      drive(shape, kvpack::HeadLevelEvict(head_scores(shape, in), budget(in)), in);
      break;
    case 13: {
      const kvpack::Budget b = budget(in);
      drive(shape, kvpack::ReconstructionEvict(b, output_factors(shape, in)), in);
      break;
    }
    case 14: {
      const kvpack::Budget b = budget(in);
      kvpack::KVzap p(hidden_scorer(shape, in), b);
      if (in.u8() < 80) p.threshold = in.range(-100, 100) / 4.0;
      drive(shape, p, in);
      break;
    }
    default: {
      using P = kvpack::Compose<kvpack::CrossLayerSVD, kvpack::Quantize>;
      drive(shape,
            P(kvpack::CrossLayerSVD::with_ratio(in.range(1, 3), 2.0 + in.range(0, 8)), quant), in);
      break;
    }
  }
  return 0;
}
