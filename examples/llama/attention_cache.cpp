#include "attention_cache.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace kvpack::llama {

DenseAttentionCache::DenseAttentionCache(int layers, int q_heads, int kv_heads, int head_dim)
    : q_heads_(q_heads), kv_heads_(kv_heads), head_dim_(head_dim) {
  if (layers <= 0 || kv_heads <= 0 || q_heads <= 0 || q_heads % kv_heads != 0 || head_dim <= 0) {
    throw std::invalid_argument("DenseAttentionCache: bad shape");
  }
  layers_.resize(layers);
}

void DenseAttentionCache::append(int layer, const float* k, const float* v,
                                 const int64_t* positions, int64_t n) {
  Layer& l = layers_.at(layer);
  const size_t row = static_cast<size_t>(kv_heads_) * head_dim_;
  for (int64_t t = 0; t < n; ++t) {
    if (!l.positions.empty() && positions[t] <= l.positions.back()) {
      throw std::invalid_argument("DenseAttentionCache::append: position " +
                                  std::to_string(positions[t]) + " is not increasing");
    }
    l.positions.push_back(positions[t]);
  }
  l.k.insert(l.k.end(), k, k + n * row);
  l.v.insert(l.v.end(), v, v + n * row);
}

void DenseAttentionCache::attend(int layer, const float* q, const int64_t* positions, int64_t n,
                                 float* out) {
  const Layer& l = layers_.at(layer);
  const int d = head_dim_;
  const int group = q_heads_ / kv_heads_;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const int64_t kv_row = static_cast<int64_t>(kv_heads_) * d;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic)
#endif
  for (int64_t item = 0; item < n * q_heads_; ++item) {
    const int64_t t = item / q_heads_;
    const int h = static_cast<int>(item % q_heads_);
    const int kv = h / group;
    const float* qr = q + (t * q_heads_ + h) * d;
    const int64_t visible = std::upper_bound(l.positions.begin(), l.positions.end(), positions[t]) -
                            l.positions.begin();
    std::vector<double> p(static_cast<size_t>(visible));
    double max_score = -INFINITY;
    for (int64_t j = 0; j < visible; ++j) {
      const float* kr = l.k.data() + j * kv_row + kv * d;
      double s = 0.0;
      for (int i = 0; i < d; ++i) s += static_cast<double>(qr[i]) * kr[i];
      p[j] = s * scale;
      max_score = std::max(max_score, p[j]);
    }
    double sum = 0.0;
    for (double& x : p) sum += (x = std::exp(x - max_score));
    float* o = out + (t * q_heads_ + h) * d;
    std::vector<double> acc(d, 0.0);
    for (int64_t j = 0; j < visible; ++j) {
      const float* vr = l.v.data() + j * kv_row + kv * d;
      for (int i = 0; i < d; ++i) acc[i] += p[j] * vr[i];
    }
    for (int i = 0; i < d; ++i) o[i] = visible > 0 ? static_cast<float>(acc[i] / sum) : 0.0f;
  }
}

int64_t DenseAttentionCache::tokens(int layer) const {
  return static_cast<int64_t>(layers_.at(layer).positions.size());
}

void DenseAttentionCache::clear() {
  for (Layer& l : layers_) l = Layer{};
}

}  // namespace kvpack::llama
