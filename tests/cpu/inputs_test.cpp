// What an engine hands in as it holds it: fp16 as uint16_t bits or _Float16, bf16 bits through
// an explicit DType, int32 positions. Each must give the cache exactly what the typed input
// (kvpack::Half / BFloat16, int64 positions) gives.
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <kvpack/kvpack.hpp>
#include <vector>

#include "test_util.hpp"

namespace {

const kvpack::ModelShape kShape{2, 8, 2, 64, {}};

/// Appends the same tokens through `make_view` (k, v) and `positions`, then returns what the
/// cache holds and one attend() output, for comparison across input types.
template <class MakeView, class Pos>
std::pair<kvpack::DenseLayer, std::vector<float>> run(MakeView&& make_view, const Pos& positions,
                                                      const std::vector<int64_t>& qpos) {
  kvpack::KVCache<kvpack::L2NormEvict> cache(kShape,
                                             kvpack::L2NormEvict(kvpack::Budget::ratio(0.5), 0));
  for (int l = 0; l < kShape.layers; ++l) {
    cache.append(l, make_view(l, true), make_view(l, false), positions);
  }
  cache.compress();
  const auto q = kvpack_test::random_values(8 * 64, 77);
  std::vector<float> out(q.size());
  cache.attend(1, kvpack::ActivationView::nhd(q.data(), 1, 8, 64), qpos,
               kvpack::OutputView::nhd(out.data(), 1, 8, 64));
  return {cache.materialize(1), out};
}

void check_same(const std::pair<kvpack::DenseLayer, std::vector<float>>& a,
                const std::pair<kvpack::DenseLayer, std::vector<float>>& b) {
  for (int h = 0; h < kShape.kv_heads; ++h) {
    CHECK(a.first.heads[h].positions == b.first.heads[h].positions);
    CHECK(a.first.heads[h].k == b.first.heads[h].k);
    CHECK(a.first.heads[h].v == b.first.heads[h].v);
  }
  CHECK(a.second == b.second);
}

/// The same bits in another 16-bit element type (what an engine's buffer holds).
template <class To, class From>
std::vector<std::vector<To>> bit_copies(const std::vector<std::vector<From>>& from) {
  static_assert(sizeof(To) == sizeof(From), "16-bit elements");
  std::vector<std::vector<To>> out(from.size());
  for (std::size_t i = 0; i < from.size(); ++i) {
    out[i].resize(from[i].size());
    std::memcpy(out[i].data(), from[i].data(), from[i].size() * sizeof(From));
  }
  return out;
}

/// nhd views of buffers[2 · layer + (k ? 0 : 1)], tokens × 2 kv heads × 64.
template <class T>
auto views_of(const std::vector<std::vector<T>>& buffers, int64_t n) {
  return [&buffers, n](int l, bool k) {
    return kvpack::ActivationView::nhd(buffers[2 * l + (k ? 0 : 1)].data(), n, 2, 64);
  };
}

}  // namespace

TEST_CASE("inputs: fp16 as uint16_t bits or _Float16, bf16 bits, int32 positions", "[inputs]") {
  const int64_t n = 40;
  const std::size_t size = static_cast<std::size_t>(n) * 2 * 64;
  std::vector<std::vector<kvpack::Half>> half(4);
  std::vector<std::vector<kvpack::BFloat16>> bf(4);
  for (int i = 0; i < 4; ++i) {
    const auto x = kvpack_test::random_values(size, 10 + i);
    for (float v : x) {
      half[i].push_back(kvpack::to_half(v));
      bf[i].push_back(kvpack::to_bfloat16(v));
    }
  }
  const auto pos64 = kvpack_test::iota_positions(n, 1000);
  const std::vector<int32_t> pos32(pos64.begin(), pos64.end());
  const std::vector<int64_t> qpos{1000 + n - 1};
  const auto typed = views_of(half, n);
  const auto reference = run(typed, pos64, qpos);

  SECTION("uint16_t fp16 bits") {
    const auto bits = bit_copies<uint16_t>(half);
    check_same(run(views_of(bits, n), pos64, qpos), reference);
  }
#if defined(__FLT16_MANT_DIG__)
  SECTION("_Float16") {
    const auto f16 = bit_copies<_Float16>(half);
    check_same(run(views_of(f16, n), pos64, qpos), reference);
  }
#endif
  SECTION("int32 positions, from a vector and from a pointer") {
    check_same(run(typed, pos32, qpos), reference);
    check_same(run(typed, kvpack::Positions(pos32.data(), pos32.size()), qpos), reference);
  }
  SECTION("bf16 bits through DType::kBF16 equal BFloat16 elements") {
    const auto bits = bit_copies<uint16_t>(bf);
    auto raw = [&](int l, bool k) {
      return kvpack::ActivationView(bits[2 * l + (k ? 0 : 1)].data(), kvpack::DType::kBF16, n, 2,
                                    64, 2 * 64, 64);
    };
    check_same(run(raw, pos64, qpos), run(views_of(bf, n), pos64, qpos));
  }
  SECTION("fp16 output: the fp32 output rounded to fp16, in any fp16 element type") {
    kvpack::KVCache<kvpack::Identity> cache(kShape);
    cache.append(0, typed(0, true), typed(0, false), pos32);
    const auto q = kvpack_test::random_values(3 * 8 * 64, 78);
    const auto qv = kvpack::ActivationView::nhd(q.data(), 3, 8, 64);
    const std::vector<int64_t> at{1000 + n - 3, 1000 + n - 2, 1000 + n - 1};
    std::vector<float> f32(q.size());
    cache.attend(0, qv, at, kvpack::OutputView::nhd(f32.data(), 3, 8, 64));
    std::vector<kvpack::Half> f16(q.size());
    cache.attend(0, qv, at, kvpack::OutputView::hnd(f16.data(), 3, 8, 64));
    std::vector<uint16_t> bits(q.size());
    cache.attend(0, qv, at, kvpack::OutputView::nhd(bits.data(), 3, 8, 64));
    for (int64_t t = 0; t < 3; ++t) {
      for (int64_t h = 0; h < 8; ++h) {
        for (int64_t i = 0; i < 64; ++i) {
          const uint16_t want = kvpack::to_half(f32[(t * 8 + h) * 64 + i]).bits;
          CHECK(f16[(h * 3 + t) * 64 + i].bits == want);  // hnd layout
          CHECK(bits[(t * 8 + h) * 64 + i] == want);
        }
      }
    }
  }
  SECTION("int32 positions are checked like int64 ones") {
    kvpack::KVCache<kvpack::Identity> cache(kShape);
    std::vector<int32_t> bad = pos32;
    bad[5] = bad[4];
    REQUIRE_THROWS_WITH(cache.append(0, typed(0, true), typed(0, false), bad),
                        Catch::Contains("positions[5] = 1004"));
    CHECK(cache.appended(0) == 0);
  }
}
