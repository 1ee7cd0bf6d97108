// Shared helpers of the CPU tests: seeded random activations and slow, obviously-right references.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <kvpack/kvpack.hpp>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace kvpack_test {

/// A file name under $TMPDIR (else /tmp) unique to this process: kvpack_<name>_<pid>.kvc.
inline std::string temp_path(const std::string& name) {
  return (std::string(std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp")) + "/kvpack_" + name +
         "_" + std::to_string(::getpid()) + ".kvc";
}

/// The instruction sets this CPU can run, scalar first: tests run their kernels under each.
inline std::vector<kvpack::Isa> supported_isas() {
  std::vector<kvpack::Isa> isas{kvpack::Isa::kScalar};
  for (const kvpack::Isa isa : {kvpack::Isa::kAvx2, kvpack::Isa::kAvx512}) {
    if (kvpack::cpu_isa_supported() >= isa) isas.push_back(isa);
  }
  return isas;
}

/// Sets the CPU kernels' instruction set for a scope and restores the previous one.
class IsaScope {
 public:
  explicit IsaScope(kvpack::Isa isa) : previous_(kvpack::set_cpu_isa(isa)) {}
  ~IsaScope() { kvpack::set_cpu_isa(previous_); }
  IsaScope(const IsaScope&) = delete;
  IsaScope& operator=(const IsaScope&) = delete;

 private:
  kvpack::Isa previous_;
};

/// Gaussian values with a fixed seed; `scale` sets the spread.
inline std::vector<float> random_values(std::size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> x(n);
  for (auto& v : x) v = dist(rng);
  return x;
}

/// bytes() of what one (layer, kv head) of a dense rows cache holds (docs/page_formats.md): whole
/// pages of page_tokens fp16 K and V rows (rounded up to 64 bytes), the page table (an int32 id
/// and two addresses per page) and an int32 position per token.
inline std::size_t paged_head_bytes(int64_t tokens, int head_dim = 64, int page_tokens = 16,
                                    std::size_t element_bytes = 2) {
  const std::size_t pages = static_cast<std::size_t>((tokens + page_tokens - 1) / page_tokens);
  const std::size_t page = (2 * page_tokens * head_dim * element_bytes + 63) / 64 * 64;
  return pages * (page + sizeof(int32_t) + 2 * sizeof(void*)) +
         static_cast<std::size_t>(tokens) * sizeof(int32_t);
}

/// Queries [2][q_heads][head_dim] over the first `keys` keys of `dense` (a layer of `shape`): per
/// query head, token 0 equals key 0 of its kv head, token 1 is a multiple of key `dominant` whose
/// logit (after 1/sqrt(head_dim)) leads every other key's by `lead`: 1 − p of that key near
/// (keys − 1) · e^−lead, where KVzip+'s displacement weight is ill-conditioned.
inline std::vector<float> dominant_key_queries(const kvpack::DenseLayer& dense,
                                               const kvpack::ModelShape& shape, int64_t keys,
                                               int64_t dominant, double lead) {
  const int d = shape.head_dim, g = shape.group_size();
  std::vector<float> q(2 * shape.q_heads * d);
  for (int qh = 0; qh < shape.q_heads; ++qh) {
    const auto& head = dense.heads[qh / g];
    auto dot = [&](int64_t a, int64_t b) {
      double acc = 0;
      for (int i = 0; i < d; ++i) acc += double{head.k[a * d + i]} * head.k[b * d + i];
      return acc;
    };
    double runner_up = -INFINITY;
    for (int64_t j = 0; j < keys; ++j) {
      if (j != dominant) runner_up = std::max(runner_up, dot(dominant, j));
    }
    const double scale =
        lead * std::sqrt(static_cast<double>(d)) / (dot(dominant, dominant) - runner_up);
    for (int i = 0; i < d; ++i) {
      q[qh * d + i] = head.k[i];
      q[(shape.q_heads + qh) * d + i] = static_cast<float>(scale * head.k[dominant * d + i]);
    }
  }
  return q;
}

inline std::vector<int64_t> iota_positions(int64_t n, int64_t first = 0) {
  std::vector<int64_t> p(n);
  std::iota(p.begin(), p.end(), first);
  return p;
}

/// Double-precision attention of one query row over dense rows k, v (n × d) at `key_pos`,
/// causal: keys with position > query_pos are ignored.
inline std::vector<double> reference_attention(const float* q, const std::vector<float>& k,
                                               const std::vector<float>& v,
                                               const std::vector<int64_t>& key_pos,
                                               int64_t query_pos, int d) {
  const int64_t n = static_cast<int64_t>(key_pos.size());
  std::vector<double> scores;
  double max_score = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    if (key_pos[t] > query_pos) continue;
    double s = 0;
    for (int i = 0; i < d; ++i) s += static_cast<double>(q[i]) * k[t * d + i];
    s /= std::sqrt(static_cast<double>(d));
    scores.push_back(s);
    max_score = std::max(max_score, s);
  }
  std::vector<double> out(d, 0.0);
  double sum = 0;
  int64_t j = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (key_pos[t] > query_pos) continue;
    const double p = std::exp(scores[j++] - max_score);
    sum += p;
    for (int i = 0; i < d; ++i) out[i] += p * v[t * d + i];
  }
  for (auto& o : out) o /= sum;
  return out;
}

/// Output of one seeded decode query (spread q_scale, all q_heads) at position n − 1 over layer 0
/// of `cache`: q_heads × head_dim floats.
template <class Cache>
std::vector<float> attend_decode(const Cache& cache, int64_t n, uint32_t q_seed,
                                 float q_scale = 1.0f) {
  const auto& s = cache.shape();
  const auto q = random_values(static_cast<std::size_t>(s.q_heads) * s.head_dim, q_seed, q_scale);
  std::vector<float> out(q.size());
  cache.attend(0, kvpack::ActivationView::nhd(q.data(), 1, s.q_heads, s.head_dim),
               std::vector<int64_t>{n - 1},
               kvpack::OutputView::nhd(out.data(), 1, s.q_heads, s.head_dim));
  return out;
}

/// Max over i of |a[i] − b[i]| (a and b of equal size), in double.
inline double max_abs_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(double{a[i]} - b[i]));
  return worst;
}

/// Max over rows of ‖a − b‖ / ‖b‖ (relative error of each output row).
inline double max_relative_row_error(const float* a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

/// Fills a cache layer with random K/V (NHD fp32) and returns nothing; positions 0..n-1.
template <class Cache>
void fill_layer(Cache& cache, int layer, int64_t n, uint32_t seed, int64_t chunk = 0) {
  const auto& s = cache.shape();
  const auto k = random_values(n * s.kv_heads * s.head_dim, seed);
  const auto v = random_values(n * s.kv_heads * s.head_dim, seed + 1000);
  if (chunk <= 0) chunk = n;
  for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    const int64_t tn = std::min(chunk, n - t0);
    const auto pos = iota_positions(tn, t0);
    const int64_t off = t0 * s.kv_heads * s.head_dim;
    cache.append(layer, kvpack::ActivationView::nhd(k.data() + off, tn, s.kv_heads, s.head_dim),
                 kvpack::ActivationView::nhd(v.data() + off, tn, s.kv_heads, s.head_dim), pos);
  }
}

/// Appends `n` decode tokens (one call each) after the last position of every layer.
template <class Cache>
void append_decode_tokens(Cache& cache, int64_t first_position, int64_t n, uint32_t seed) {
  const auto& s = cache.shape();
  for (int64_t t = 0; t < n; ++t) {
    const auto k = random_values(s.kv_heads * s.head_dim, seed + 2 * t);
    const auto v = random_values(s.kv_heads * s.head_dim, seed + 2 * t + 1);
    for (int l = 0; l < s.layers; ++l) {
      cache.append(l, kvpack::ActivationView::nhd(k.data(), 1, s.kv_heads, s.head_dim),
                   kvpack::ActivationView::nhd(v.data(), 1, s.kv_heads, s.head_dim),
                   std::vector<int64_t>{first_position + t});
    }
  }
}

/// Checks every query row of `out` (tokens × q_heads × d) against double-precision attention
/// over what materialize() returns for `layer`; returns the largest relative row error.
template <class Cache>
double attention_error(const Cache& cache, int layer, const std::vector<float>& q,
                       const std::vector<int64_t>& query_positions, const std::vector<float>& out) {
  const auto& s = cache.shape();
  const auto dense = cache.materialize(layer);
  double worst = 0.0;
  for (std::size_t t = 0; t < query_positions.size(); ++t) {
    for (int h = 0; h < s.q_heads; ++h) {
      const auto& head = dense.heads[h / s.group_size()];
      const std::size_t row = (t * s.q_heads + h) * s.head_dim;
      const auto ref = reference_attention(q.data() + row, head.k, head.v, head.positions,
                                           query_positions[t], s.head_dim);
      worst = std::max(worst, max_relative_row_error(out.data() + row, ref));
    }
  }
  return worst;
}

/// Runs attend for `query_positions` and returns the worst relative row error.
template <class Cache>
double attend_error(const Cache& cache, int layer, const std::vector<int64_t>& query_positions,
                    uint32_t seed) {
  const auto& s = cache.shape();
  const int64_t n = static_cast<int64_t>(query_positions.size());
  const auto q = random_values(n * s.q_heads * s.head_dim, seed);
  std::vector<float> out(q.size());
  cache.attend(layer, kvpack::ActivationView::nhd(q.data(), n, s.q_heads, s.head_dim),
               query_positions, kvpack::OutputView::nhd(out.data(), n, s.q_heads, s.head_dim));
  return attention_error(cache, layer, q, query_positions, out);
}

}  // namespace kvpack_test
