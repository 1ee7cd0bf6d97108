// Quantize (KIVI): block format against its scalar reference and bounds, the cache's quantized
// store, and Compose<Eviction, Quantize>.
#include <catch2/catch.hpp>
#include <cstring>
#include <kvpack/kvpack.hpp>
#include <random>
#include <set>

#include "test_util.hpp"

using Catch::Matchers::Contains;
using kvpack::ActivationView;
using kvpack::ModelShape;
using kvpack::QuantBlock;
using kvpack::Quantize;

namespace {

template <int Bits>
void check_block_bounds(const std::vector<float>& x) {
  QuantBlock<Bits, 32> block;
  for (std::size_t g = 0; g + 32 <= x.size(); g += 32) {
    kvpack::quantize_block_ref(x.data() + g, 1, block);
    const float scale = kvpack::to_float(block.scale);
    float decoded[32];
    kvpack::dequantize_block_ref(block, decoded, 1);
    for (int i = 0; i < 32; ++i) {
      REQUIRE(decoded[i] == kvpack::dequantize_ref(block, i));
      // scale / 2, plus the fp32 rounding of code * scale + min.
      REQUIRE(std::fabs(x[g + i] - decoded[i]) <=
              scale / 2 * (1 + 1e-6f) + 1e-7f * std::fabs(x[g + i]) + 1e-30f);
    }
  }
}

template <int Bits>
void check_packing() {
  QuantBlock<Bits, 32> block{};
  for (uint32_t pattern = 0; pattern < 3; ++pattern) {
    std::vector<uint32_t> codes(32);
    for (int i = 0; i < 32; ++i) codes[i] = (i * 7 + pattern * 5) % (1u << Bits);
    for (int i = 0; i < 32; ++i) kvpack::detail::set_code<Bits>(block.codes, i, codes[i]);
    for (int i = 0; i < 32; ++i)
      REQUIRE(kvpack::detail::get_code<Bits>(block.codes, i) == codes[i]);
  }
  // The documented layout: element 0 in the lowest bits of byte 0.
  QuantBlock<Bits, 32> one{};
  kvpack::detail::set_code<Bits>(one.codes, 1, 1);
  REQUIRE(one.codes[0] == (Bits == 8 ? 0 : (1u << Bits)));
}

const ModelShape kShape{2, 9, 3, 64, {}};

/// What the cache must hold for tokens [0, quantized) of one head: the scalar reference applied
/// to the fp16 rows that were appended.
std::vector<float> reference_keys(const kvpack::DenseHead& dense, int64_t quantized, int bits) {
  std::vector<float> out = dense.k;
  kvpack::dispatch_quant(bits, 32, [&](auto b, auto g) {
    constexpr int B = decltype(b)::value, G = decltype(g)::value;
    QuantBlock<B, G> block;
    for (int64_t grp = 0; grp < quantized / G; ++grp) {
      for (int c = 0; c < 64; ++c) {
        kvpack::quantize_block_ref(dense.k.data() + grp * G * 64 + c, 64, block);
        kvpack::dequantize_block_ref(block, out.data() + grp * G * 64 + c, 64);
      }
    }
  });
  return out;
}

std::vector<float> reference_values(const kvpack::DenseHead& dense, int64_t quantized, int bits) {
  std::vector<float> out = dense.v;
  kvpack::dispatch_quant(bits, 32, [&](auto b, auto g) {
    constexpr int B = decltype(b)::value, G = decltype(g)::value;
    QuantBlock<B, G> block;
    for (int64_t t = 0; t < quantized; ++t) {
      for (int c = 0; c < 64 / G; ++c) {
        kvpack::quantize_block_ref(dense.v.data() + t * 64 + c * G, 1, block);
        kvpack::dequantize_block_ref(block, out.data() + t * 64 + c * G, 1);
      }
    }
  });
  return out;
}

}  // namespace

TEST_CASE("quant block: round-trip error within scale/2 on random and edge-case groups",
          "[quantize]") {
  std::vector<float> x = kvpack_test::random_values(32 * 200, 5, 2.0f);
  std::vector<float> edge(32 * 5);
  for (int i = 0; i < 32; ++i) {
    edge[i] = 0.3f;                              // constant group (not fp16-representable)
    edge[32 + i] = i == 7 ? 5.0f : -1.0f;        // one distinct value
    edge[64 + i] = (i % 2 ? 1 : -1) * 65000.0f;  // the edges of the fp16 range
    edge[96 + i] = 1e-6f * i;                    // tiny magnitudes (subnormal fp16 scale)
    edge[128 + i] = 60000.0f + i;                // large, narrow
  }
  x.insert(x.end(), edge.begin(), edge.end());
  check_block_bounds<2>(x);
  check_block_bounds<4>(x);
  check_block_bounds<8>(x);
  // A constant, fp16-representable group is exact.
  std::vector<float> exact(32, -2.5f);
  QuantBlock<2, 32> block;
  kvpack::quantize_block_ref(exact.data(), 1, block);
  for (int i = 0; i < 32; ++i) REQUIRE(kvpack::dequantize_ref(block, i) == -2.5f);
}

TEST_CASE("quant block: packing and unpacking are exact", "[quantize]") {
  check_packing<2>();
  check_packing<4>();
  check_packing<8>();
}

namespace {

/// Random rows with the cases that stress the rounding rule: constant groups (scale 0), signed
/// zeros as the extremes, fp16 subnormals, values at the fp16 limit, exact fp16 values.
std::vector<float> hard_rows(std::size_t n, uint32_t seed) {
  auto x = kvpack_test::random_values(n, seed, 3.0f);
  std::mt19937 rng(seed);
  for (std::size_t i = 0; i < n; ++i) {
    switch (rng() % 16) {
      case 0:
        x[i] = 0.0f;
        break;
      case 1:
        x[i] = -0.0f;
        break;
      case 2:
        x[i] = 3e-7f * (rng() % 2 ? 1.0f : -1.0f);
        break;  // fp16 subnormal range
      case 3:
        x[i] = kvpack::to_float(kvpack::to_half(x[i]));
        break;
      case 4:
        x[i] = rng() % 2 ? 65504.0f : -65504.0f;
        break;
      default:
        break;
    }
  }
  return x;
}

template <int Bits, int G>
void check_cpu_quantizers(int d, uint32_t seed) {
  using Block = QuantBlock<Bits, G>;
  auto same = [](const Block& a, const Block& b) {
    return std::memcmp(&a, &b, sizeof(Block)) == 0;
  };
  for (int variant = 0; variant < 4; ++variant) {
    auto rows = hard_rows(static_cast<std::size_t>(G) * d, seed + variant);
    if (variant == 1) std::fill(rows.begin(), rows.end(), 1.5f);  // every group constant
    if (variant == 2) {  // zeros of both signs as min and max of many groups
      for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = (i % 3 == 0) ? -0.0f : 0.0f;
      rows[5] = 2.0f;
    }
    std::vector<Block> got(d), want(d);
    kvpack::cpu::quantize_key_group<Bits, G>(rows.data(), d, got.data());
    for (int c = 0; c < d; ++c) kvpack::quantize_block_ref(rows.data() + c, d, want[c]);
    for (int c = 0; c < d; ++c) {
      INFO("keys: bits " << Bits << " group " << G << " d " << d << " channel " << c);
      REQUIRE(same(got[c], want[c]));
    }
    // fp16 rows (the cache's tail, read in place): the reference of the rows widened to fp32.
    std::vector<kvpack::Half> half_rows(rows.size());
    std::vector<float> widened(rows.size());
    for (std::size_t i = 0; i < rows.size(); ++i) {
      half_rows[i] = kvpack::to_half(rows[i]);
      widened[i] = kvpack::to_float(half_rows[i]);
    }
    kvpack::cpu::quantize_key_group<Bits, G>(half_rows.data(), d, got.data());
    for (int c = 0; c < d; ++c) {
      kvpack::quantize_block_ref(widened.data() + c, d, want[c]);
      INFO("fp16 keys: bits " << Bits << " group " << G << " d " << d << " channel " << c);
      REQUIRE(same(got[c], want[c]));
    }
    if (d % G != 0) continue;
    {
      const int64_t n = G - 3;
      std::vector<Block> batch(static_cast<std::size_t>(n) * (d / G));
      kvpack::cpu::quantize_value_rows<Bits, G>(half_rows.data(), n, d, batch.data());
      for (int64_t t = 0; t < n; ++t) {
        for (int g = 0; g < d / G; ++g) {
          Block ref;
          kvpack::quantize_block_ref(widened.data() + t * d + g * G, 1, ref);
          INFO("fp16 value rows: bits " << Bits << " group " << G << " d " << d << " token " << t);
          REQUIRE(same(batch[t * (d / G) + g], ref));
        }
      }
    }
    // Batched rows (8 tokens per step, plus a remainder) and single rows.
    for (int64_t n : {int64_t{G}, int64_t{G} - 3}) {
      std::vector<Block> batch(static_cast<std::size_t>(n) * (d / G));
      kvpack::cpu::quantize_value_rows<Bits, G>(rows.data(), n, d, batch.data());
      for (int64_t t = 0; t < n; ++t) {
        for (int g = 0; g < d / G; ++g) {
          Block ref;
          kvpack::quantize_block_ref(rows.data() + t * d + g * G, 1, ref);
          INFO("value rows: bits " << Bits << " group " << G << " d " << d << " token " << t);
          REQUIRE(same(batch[t * (d / G) + g], ref));
        }
      }
    }
    std::vector<Block> vgot(d / G), vwant(d / G);
    for (int t = 0; t < G; ++t) {
      kvpack::cpu::quantize_value_row<Bits, G>(rows.data() + t * d, d, vgot.data());
      for (int g = 0; g < d / G; ++g) {
        kvpack::quantize_block_ref(rows.data() + t * d + g * G, 1, vwant[g]);
        INFO("values: bits " << Bits << " group " << G << " d " << d << " token " << t);
        REQUIRE(same(vgot[g], vwant[g]));
      }
    }
  }
}

}  // namespace

TEST_CASE("Quantize: the CPU block quantizers equal the scalar reference bit for bit",
          "[quantize]") {
  for (const kvpack::Isa isa : kvpack_test::supported_isas()) {
    kvpack_test::IsaScope scope(isa);
    INFO("instruction set " << kvpack::isa_name(isa));
    uint32_t seed = 500;
    for (int d : {64, 128, 20}) {
      check_cpu_quantizers<2, 16>(d, seed += 10);
      check_cpu_quantizers<2, 32>(d, seed += 10);
      check_cpu_quantizers<4, 32>(d, seed += 10);
      check_cpu_quantizers<4, 64>(d, seed += 10);
      check_cpu_quantizers<8, 32>(d, seed += 10);
      check_cpu_quantizers<8, 128>(d, seed += 10);
      check_cpu_quantizers<4, 16>(d, seed += 10);
    }
  }
}

TEST_CASE("Quantize: the cache holds exactly the scalar reference's codes, and the bytes it says",
          "[quantize][memory]") {
  for (int bits : {2, 4, 8}) {
    kvpack::KVCache<Quantize> cache(kShape, Quantize(bits, 32, 128));
    kvpack_test::fill_layer(cache, 0, 1000, 11, 300);
    kvpack_test::fill_layer(cache, 1, 100, 12);  // shorter than the residual: stays fp16
    const auto before0 = cache.materialize(0);
    const auto before1 = cache.materialize(1);
    cache.compress();
    const int64_t quantized = (1000 - 128) / 32 * 32;  // 864
    const auto after0 = cache.materialize(0);
    for (int h = 0; h < 3; ++h) {
      REQUIRE(after0.heads[h].k == reference_keys(before0.heads[h], quantized, bits));
      REQUIRE(after0.heads[h].v == reference_values(before0.heads[h], quantized, bits));
      REQUIRE(after0.heads[h].positions == before0.heads[h].positions);
      REQUIRE(cache.materialize(1).heads[h].k == before1.heads[h].k);
    }
    const std::size_t block = 4 + 32 * bits / 8;
    // One KIVI page per group of 32 (page_tokens 16 < group): its key and value blocks (a
    // multiple of 64 bytes: no padding) and its page-table entry (an int32 id and an address).
    const std::size_t page_table = sizeof(int32_t) + sizeof(void*);
    const std::size_t per_head0 = (quantized / 32) * (64 * block + page_table) +
                                  quantized * 2 * block + (1000 - quantized) * 64 * 2 * 2 +
                                  1000 * 4;
    const std::size_t per_head1 = 100 * (64 * 2 * 2 + 4);
    kvpack::KVCache<Quantize> empty(kShape, Quantize(bits));
    REQUIRE(cache.bytes() - empty.bytes() == 3 * (per_head0 + per_head1));
  }
}

TEST_CASE("Quantize: attend over quantized blocks equals attention over their decoded values",
          "[quantize][attention]") {
  for (int bits : {2, 4}) {
    kvpack::KVCache<Quantize> cache(kShape, Quantize(bits, 32, 32));
    kvpack_test::fill_layer(cache, 0, 2500, 21, 500);
    cache.compress();
    const auto dense = cache.materialize(0);
    const auto q = kvpack_test::random_values(3 * 9 * 64, 22, 2.0f);
    const std::vector<int64_t> qpos{1000, 2000, 2499};  // mid-block causal cut-offs too
    std::vector<float> out(q.size());
    cache.attend(0, ActivationView::nhd(q.data(), 3, 9, 64), qpos,
                 kvpack::OutputView::nhd(out.data(), 3, 9, 64));
    for (int t = 0; t < 3; ++t) {
      for (int h = 0; h < 9; ++h) {
        const auto& head = dense.heads[h / 3];
        const auto ref = kvpack_test::reference_attention(q.data() + (t * 9 + h) * 64, head.k,
                                                          head.v, head.positions, qpos[t], 64);
        REQUIRE(kvpack_test::max_relative_row_error(out.data() + (t * 9 + h) * 64, ref) < 1e-5);
      }
    }
  }
}

TEST_CASE(
    "Quantize: decode attend (dequantization inside the dots) equals attention over the decoded "
    "values for every bit width, group, head_dim and GQA group",
    "[quantize][attention]") {
  struct Shape {
    int q_heads, kv_heads, d;
  };
  // 5000 tokens: decode splits the keys in two at token 2500, inside a group (partial groups).
  const int64_t n = 5000;
  // GQA groups of 3, 1 (MHA), 4 (one pass of four rows) and 5 (passes of 3 + 2).
  for (const Shape& sh :
       {Shape{9, 3, 64}, Shape{4, 4, 64}, Shape{6, 2, 128}, Shape{8, 2, 64}, Shape{10, 2, 64}}) {
    const ModelShape shape{1, sh.q_heads, sh.kv_heads, sh.d, {}};
    for (int bits : {2, 4, 8}) {
      for (int group : {16, 32, 64}) {
        // Groups of four and five rows exercise the pass split, which does not depend on the
        // KIVI group: one group size for them keeps the sanitizer run short.
        if (sh.q_heads / sh.kv_heads >= 4 && group != 32) continue;
        for (int64_t residual : {int64_t{0}, int64_t{128}}) {
          kvpack::KVCache<Quantize> cache(shape, Quantize(bits, group, residual));
          kvpack_test::fill_layer(cache, 0, n, 40 + bits, 1000);
          cache.compress();
          const auto dense = cache.materialize(0);
          const auto q =
              kvpack_test::random_values(static_cast<std::size_t>(sh.q_heads) * sh.d, 41, 2.0f);
          for (int64_t pos : {n - 1, n - 100, int64_t{2600}, int64_t{517}, int64_t{31}}) {
            std::vector<float> out(q.size());
            cache.attend(0, ActivationView::nhd(q.data(), 1, sh.q_heads, sh.d),
                         std::vector<int64_t>{pos},
                         kvpack::OutputView::nhd(out.data(), 1, sh.q_heads, sh.d));
            for (int h = 0; h < sh.q_heads; ++h) {
              const auto& head = dense.heads[h / (sh.q_heads / sh.kv_heads)];
              const auto ref = kvpack_test::reference_attention(q.data() + h * sh.d, head.k, head.v,
                                                                head.positions, pos, sh.d);
              INFO("bits " << bits << " group " << group << " residual " << residual << " d "
                           << sh.d << " position " << pos << " head " << h);
              REQUIRE(kvpack_test::max_relative_row_error(out.data() + h * sh.d, ref) < 1e-5);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("Quantize: compress during decoding quantizes what leaves the window", "[quantize]") {
  kvpack::KVCache<Quantize> cache(kShape, Quantize(4, 32, 64));
  kvpack_test::fill_layer(cache, 0, 100, 31);
  cache.compress();  // 100 - 64 = 36 -> one group of 32 quantized
  const std::size_t b1 = cache.bytes();
  const auto k = kvpack_test::random_values(40 * 3 * 64, 32);
  for (int t = 0; t < 40; ++t) {
    cache.append(0, ActivationView::nhd(k.data() + t * 192, 1, 3, 64),
                 ActivationView::nhd(k.data() + t * 192, 1, 3, 64), std::vector<int64_t>{100 + t});
  }
  cache.compress();  // 140 tokens: 140 - 64 = 76 -> 64 quantized
  // Per head: 8 more fp16 tail rows, one more 4-bit group of 32 tokens (one more page and its
  // page-table entry), 40 more positions.
  const std::size_t per_head =
      8 * 64 * 2 * 2 + (64 + 32 * 2) * 20 + sizeof(int32_t) + sizeof(void*) + 40 * 4;
  REQUIRE(cache.bytes() - b1 == 3 * per_head);
  REQUIRE(cache.tokens(0, 0) == 140);
}

TEST_CASE("Compose<L2NormEvict, Quantize>: keeps L2's tokens, stores them quantized",
          "[quantize][compose]") {
  using Evict = kvpack::L2NormEvict;
  using Both = kvpack::Compose<Evict, Quantize>;
  kvpack::KVCache<Evict> evict_only(kShape, Evict(kvpack::Budget::ratio(0.25), 0));
  kvpack::KVCache<Both> both(kShape,
                             Both(Evict(kvpack::Budget::ratio(0.25), 0), Quantize(2, 32, 32)));
  for (int l = 0; l < 2; ++l) {
    kvpack_test::fill_layer(evict_only, l, 2000, 40 + l);
    kvpack_test::fill_layer(both, l, 2000, 40 + l);
  }
  evict_only.compress();
  both.compress();
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 3; ++h) {
      REQUIRE(both.materialize(l).heads[h].positions ==
              evict_only.materialize(l).heads[h].positions);
    }
  }
  // 500 kept per head: 448 quantized (14 groups, 14 pages and page-table entries), 52 fp16.
  const std::size_t per_head =
      14 * (64 * 12 + sizeof(int32_t) + sizeof(void*)) + 448 * 2 * 12 + 52 * 64 * 4 + 500 * 4;
  kvpack::KVCache<Both> empty(kShape,
                              Both(Evict(kvpack::Budget::ratio(0.25), 0), Quantize(2, 32, 32)));
  REQUIRE(both.bytes() - empty.bytes() == 6 * per_head);
  REQUIRE(static_cast<double>(both.dense_bytes()) / both.bytes() > 13.0);
}

TEST_CASE("Quantize: bad knobs are refused", "[quantize][errors]") {
  using Cache = kvpack::KVCache<Quantize>;
  REQUIRE_THROWS_WITH(Cache(kShape, Quantize(3)), Contains("bits = 3"));
  REQUIRE_THROWS_WITH(Cache(kShape, Quantize(4, 0)), Contains("group = 0"));
  REQUIRE_THROWS_WITH(Cache(kShape, Quantize(4, 48)), Contains("group = 48"));
  REQUIRE_THROWS_WITH(Cache(kShape, Quantize(4, 128, 128)), Contains("divisor of head_dim"));
  REQUIRE_THROWS_WITH(Cache(kShape, Quantize(4, 32, 100)), Contains("residual = 100"));
  REQUIRE_THROWS_WITH(Cache(kShape, Quantize(4, 32, -32)), Contains("residual = -32"));
  // Knobs changed at run time are re-validated by compress(), which then changes nothing.
  Cache cache(kShape, Quantize(4));
  kvpack_test::fill_layer(cache, 0, 300, 1);
  const std::size_t bytes = cache.bytes();
  cache.policy().bits = 5;
  REQUIRE_THROWS_WITH(cache.compress(), Contains("bits = 5"));
  REQUIRE(cache.bytes() == bytes);
}
