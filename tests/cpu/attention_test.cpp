#include <catch2/catch.hpp>
#include <kvpack/kvpack.hpp>

#include "test_util.hpp"

using kvpack::ActivationView;
using kvpack::ModelShape;
using kvpack::OutputView;

namespace {

/// attend() of the last `queries` positions against the double reference over materialize().
template <class Policy>
double attention_error(const ModelShape& shape, int64_t n, int64_t queries, bool heads_first,
                       uint32_t seed) {
  kvpack::KVCache<Policy> cache(shape);
  kvpack_test::fill_layer(cache, 0, n, seed, /*chunk=*/n > 100 ? 97 : 0);
  const int d = shape.head_dim, g = shape.group_size();
  const auto q = kvpack_test::random_values(queries * shape.q_heads * d, seed + 7, 2.0f);
  const auto qpos = kvpack_test::iota_positions(queries, n - queries);
  std::vector<float> out(q.size(), -1.0f);
  const auto qv = heads_first ? ActivationView::hnd(q.data(), queries, shape.q_heads, d)
                              : ActivationView::nhd(q.data(), queries, shape.q_heads, d);
  const auto ov = heads_first ? OutputView::hnd(out.data(), queries, shape.q_heads, d)
                              : OutputView::nhd(out.data(), queries, shape.q_heads, d);
  cache.attend(0, qv, qpos, ov);
  const kvpack::DenseLayer dense = cache.materialize(0);
  double worst = 0;
  std::vector<float> qrow(d);
  for (int64_t t = 0; t < queries; ++t) {
    for (int h = 0; h < shape.q_heads; ++h) {
      qv.load(t, h, qrow.data());
      const auto& head = dense.heads[h / g];
      const auto ref =
          kvpack_test::reference_attention(qrow.data(), head.k, head.v, head.positions, qpos[t], d);
      worst = std::max(worst, kvpack_test::max_relative_row_error(ov.row(t, h), ref));
    }
  }
  return worst;
}

}  // namespace

TEST_CASE("attend: matches a double-precision reference (fp32 storage), each instruction set",
          "[attention][isa]") {
  // GQA groups of 1, 3, 8 (two passes of four rows), 2 and 4 (one pass of four rows; head_dim 40
  // ends in an 8-channel value chunk and is no multiple of 16, so AVX-512 runs its AVX2 kernel);
  // head_dim 32, 40, 64 and 128. AVX-512 channel tails: a group of 5 (passes of 3 + 2) at
  // head_dim 80 (4 + 1 and 5 vectors of 16), a group of 2 at head_dim 48 (3 vectors).
  const ModelShape shapes[] = {{1, 4, 4, 64, {}}, {1, 9, 3, 64, {}}, {1, 16, 2, 128, {}},
                               {1, 6, 3, 32, {}}, {1, 8, 2, 40, {}}, {1, 5, 1, 80, {}},
                               {1, 4, 2, 48, {}}};
  for (const kvpack::Isa isa : kvpack_test::supported_isas()) {
    kvpack_test::IsaScope scope(isa);
    INFO("instruction set " << kvpack::isa_name(isa));
    for (const auto& shape : shapes) {
      for (int64_t n : {int64_t{1}, int64_t{37}, int64_t{300}, int64_t{5000}}) {
        // The channel-tail shapes (head_dim 40, 48, 80) need no long sequences.
        if (shape.head_dim % 32 != 0 && n > 300) continue;
        for (int64_t queries : {int64_t{1}, int64_t{40}}) {
          if (queries > n) continue;
          for (bool heads_first : {false, true}) {
            INFO("q_heads " << shape.q_heads << " kv_heads " << shape.kv_heads << " d "
                            << shape.head_dim << " n " << n << " queries " << queries
                            << (heads_first ? " HND" : " NHD"));
            REQUIRE(attention_error<kvpack::IdentityF32>(shape, n, queries, heads_first, 42) <
                    1e-5);
          }
        }
      }
    }
  }
}

TEST_CASE("attend: fp16 storage matches the reference over the stored values, each instruction set",
          "[attention][isa]") {
  const ModelShape shape{1, 9, 3, 64, {}};
  for (const kvpack::Isa isa : kvpack_test::supported_isas()) {
    kvpack_test::IsaScope scope(isa);
    INFO("instruction set " << kvpack::isa_name(isa));
    REQUIRE(attention_error<kvpack::Identity>(shape, 4100, 1, false, 3) < 1e-5);
    REQUIRE(attention_error<kvpack::Identity>(shape, 700, 64, true, 4) < 1e-5);
  }
}

TEST_CASE("attend: a row's output does not depend on the rows decoded beside it",
          "[attention][isa]") {
  // Four query tokens of a GQA group of 3 are 12 rows: decoded in passes of four rows that mix
  // tokens; one token alone is one pass of three. Both must give the same bits (fp16 and fp32).
  const ModelShape shape{1, 9, 3, 64, {}};
  kvpack::KVCache<kvpack::Identity> fp16(shape);
  kvpack::KVCache<kvpack::IdentityF32> fp32(shape);
  kvpack_test::fill_layer(fp16, 0, 1000, 81);
  kvpack_test::fill_layer(fp32, 0, 1000, 81);
  const auto q = kvpack_test::random_values(4 * 9 * 64, 82);
  const std::vector<int64_t> pos{400, 650, 998, 999};
  for (const kvpack::Isa isa : kvpack_test::supported_isas()) {
    kvpack_test::IsaScope scope(isa);
    INFO("instruction set " << kvpack::isa_name(isa));
    const auto check = [&](const auto& cache) {
      std::vector<float> together(q.size()), alone(q.size());
      cache.attend(0, ActivationView::nhd(q.data(), 4, 9, 64), pos,
                   OutputView::nhd(together.data(), 4, 9, 64));
      for (int t = 0; t < 4; ++t) {
        cache.attend(0, ActivationView::nhd(q.data() + t * 9 * 64, 1, 9, 64),
                     std::vector<int64_t>{pos[t]},
                     OutputView::nhd(alone.data() + t * 9 * 64, 1, 9, 64));
      }
      REQUIRE(together == alone);
    };
    check(fp16);
    check(fp32);
  }
}

TEST_CASE("attend: fp16 and bf16 query views give the fp32 answer of their values", "[attention]") {
  const ModelShape shape{1, 9, 3, 64, {}};
  kvpack::KVCache<kvpack::IdentityF32> cache(shape);
  kvpack_test::fill_layer(cache, 0, 200, 9);
  const auto q = kvpack_test::random_values(9 * 64, 10);
  std::vector<kvpack::Half> qh(q.size());
  std::vector<kvpack::BFloat16> qb(q.size());
  std::vector<float> qh_f(q.size()), qb_f(q.size());
  for (std::size_t i = 0; i < q.size(); ++i) {
    qh[i] = kvpack::to_half(q[i]);
    qb[i] = kvpack::to_bfloat16(q[i]);
    qh_f[i] = kvpack::to_float(qh[i]);
    qb_f[i] = kvpack::to_float(qb[i]);
  }
  const std::vector<int64_t> pos{199};
  std::vector<float> a(q.size()), b(q.size()), c(q.size()), e(q.size());
  cache.attend(0, ActivationView::nhd(qh.data(), 1, 9, 64), pos,
               OutputView::nhd(a.data(), 1, 9, 64));
  cache.attend(0, ActivationView::nhd(qh_f.data(), 1, 9, 64), pos,
               OutputView::nhd(b.data(), 1, 9, 64));
  cache.attend(0, ActivationView::nhd(qb.data(), 1, 9, 64), pos,
               OutputView::nhd(c.data(), 1, 9, 64));
  cache.attend(0, ActivationView::nhd(qb_f.data(), 1, 9, 64), pos,
               OutputView::nhd(e.data(), 1, 9, 64));
  REQUIRE(a == b);
  REQUIRE(c == e);
}

TEST_CASE("attend: a strided (padded) view reads the same values as a packed one", "[attention]") {
  const ModelShape shape{1, 9, 3, 64, {}};
  kvpack::KVCache<kvpack::IdentityF32> packed(shape), padded(shape);
  const int64_t n = 50;
  const auto k = kvpack_test::random_values(n * 3 * 64, 1),
             v = kvpack_test::random_values(n * 3 * 64, 2);
  const auto pos = kvpack_test::iota_positions(n);
  packed.append(0, ActivationView::nhd(k.data(), n, 3, 64), ActivationView::nhd(v.data(), n, 3, 64),
                pos);
  // Same values laid out with a token stride of 4 heads (one head of padding per token).
  std::vector<float> kp(n * 4 * 64, NAN), vp(n * 4 * 64, NAN);
  for (int64_t t = 0; t < n; ++t) {
    for (int i = 0; i < 3 * 64; ++i) {
      kp[t * 256 + i] = k[t * 192 + i];
      vp[t * 256 + i] = v[t * 192 + i];
    }
  }
  padded.append(0, ActivationView(kp.data(), n, 3, 64, 256, 64),
                ActivationView(vp.data(), n, 3, 64, 256, 64), pos);
  const auto a = packed.materialize(0), b = padded.materialize(0);
  for (int h = 0; h < 3; ++h) {
    REQUIRE(a.heads[h].k == b.heads[h].k);
    REQUIRE(a.heads[h].v == b.heads[h].v);
  }
}
