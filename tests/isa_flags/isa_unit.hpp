// The body of the two translation units of the ISA-flags test: a decode attend over a seeded fp16
// cache, compiled once with the baseline x86-64 flags and once with AVX2 + FMA + F16C.
#pragma once

#include <cstdint>
#include <kvpack/kvpack.hpp>
#include <random>
#include <vector>

namespace kvpack_isa_flags {

inline std::vector<float> decode_attend() {
  const kvpack::ModelShape shape{1, 6, 2, 64, {}};
  const int64_t n = 2000;
  std::mt19937 rng(7);
  std::normal_distribution<float> dist;
  std::vector<float> k(n * shape.kv_heads * shape.head_dim), v(k.size());
  std::vector<float> q(shape.q_heads * shape.head_dim), out(q.size());
  for (auto* x : {&k, &v, &q}) {
    for (float& e : *x) e = dist(rng);
  }
  std::vector<int64_t> positions(n);
  for (int64_t t = 0; t < n; ++t) positions[t] = t;
  kvpack::KVCache<kvpack::Identity> cache(shape);
  cache.append(0, kvpack::ActivationView::nhd(k.data(), n, shape.kv_heads, shape.head_dim),
               kvpack::ActivationView::nhd(v.data(), n, shape.kv_heads, shape.head_dim), positions);
  cache.attend(0, kvpack::ActivationView::nhd(q.data(), 1, shape.q_heads, shape.head_dim),
               std::vector<int64_t>{n - 1},
               kvpack::OutputView::nhd(out.data(), 1, shape.q_heads, shape.head_dim));
  return out;
}

}  // namespace kvpack_isa_flags
