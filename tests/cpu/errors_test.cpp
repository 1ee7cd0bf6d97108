// Bad input: every public call throws kvpack::error naming the argument and leaves the cache as
// it was.
#include <catch2/catch.hpp>
#include <kvpack/kvpack.hpp>

#include "test_util.hpp"

using Catch::Matchers::Contains;
using kvpack::ActivationView;
using kvpack::Budget;
using kvpack::L2NormEvict;
using kvpack::ModelShape;
using kvpack::OutputView;

namespace {

const ModelShape kShape{2, 9, 3, 64, {}};

/// Everything observable about a cache, to prove a failed call changed nothing.
template <class Cache>
std::vector<std::vector<float>> snapshot(const Cache& cache) {
  std::vector<std::vector<float>> s{
      {static_cast<float>(cache.bytes()), static_cast<float>(cache.dense_bytes())}};
  for (int l = 0; l < cache.shape().layers; ++l) {
    for (const auto& h : cache.materialize(l).heads) {
      s.push_back(h.k);
      s.push_back(h.v);
      s.emplace_back(h.positions.begin(), h.positions.end());
    }
  }
  return s;
}

struct Fixture {
  kvpack::KVCache<L2NormEvict> cache{kShape, L2NormEvict(Budget::ratio(0.5), 0)};
  std::vector<float> k = kvpack_test::random_values(8 * 3 * 64, 1);
  std::vector<float> v = kvpack_test::random_values(8 * 3 * 64, 2);
  std::vector<float> q = kvpack_test::random_values(8 * 9 * 64, 3);
  std::vector<float> out = std::vector<float>(8 * 9 * 64);
  Fixture() { kvpack_test::fill_layer(cache, 0, 100, 9); }
  ActivationView kv(const std::vector<float>& x, int64_t n = 8) const {
    return ActivationView::nhd(x.data(), n, 3, 64);
  }
  ActivationView qv(int64_t n = 1) const { return ActivationView::nhd(q.data(), n, 9, 64); }
  OutputView ov(int64_t n = 1) { return OutputView::nhd(out.data(), n, 9, 64); }
};

template <class F>
void require_error_unchanged(Fixture& f, F&& call, const std::string& fragment) {
  const auto before = snapshot(f.cache);
  REQUIRE_THROWS_WITH(call(), Contains(fragment));
  REQUIRE_THROWS_AS(call(), kvpack::error);
  REQUIRE(snapshot(f.cache) == before);
}

}  // namespace

TEST_CASE("errors: bad model shapes", "[errors]") {
  using Cache = kvpack::KVCache<kvpack::Identity>;
  REQUIRE_THROWS_WITH(Cache(ModelShape{2, 9, 4, 64, {}}), Contains("q_heads = 9"));
  REQUIRE_THROWS_WITH(Cache(ModelShape{0, 9, 3, 64, {}}), Contains("layers = 0"));
  REQUIRE_THROWS_WITH(Cache(ModelShape{2, 9, 3, 63, {}}), Contains("head_dim = 63"));
  REQUIRE_THROWS_WITH(Cache(ModelShape{2, 9, 0, 64, {}}), Contains("kv_heads = 0"));
  REQUIRE_THROWS_WITH(Cache(ModelShape{2, 9, 3, 64, {kvpack::RopeStyle::kHalfSplit, -1.0}}),
                      Contains("theta = -1"));
}

TEST_CASE("errors: bad policy knobs", "[errors]") {
  using Cache = kvpack::KVCache<L2NormEvict>;
  REQUIRE_THROWS_WITH(Cache(kShape, L2NormEvict(Budget::ratio(0.0))), Contains("keep_ratio = 0"));
  REQUIRE_THROWS_WITH(Cache(kShape, L2NormEvict(Budget::ratio(1.5))), Contains("keep_ratio = 1.5"));
  REQUIRE_THROWS_WITH(Cache(kShape, L2NormEvict(Budget::ratio(NAN))), Contains("keep_ratio"));
  REQUIRE_THROWS_WITH(Cache(kShape, L2NormEvict(Budget::tokens(-5))), Contains("keep_tokens"));
  REQUIRE_THROWS_WITH(Cache(kShape, L2NormEvict(Budget::ratio(0.5), 3)),
                      Contains("skip_layers = 3"));
  Budget b = Budget::ratio(0.5);
  b.sink_tokens = -1;
  REQUIRE_THROWS_WITH(Cache(kShape, L2NormEvict(b)), Contains("sink_tokens = -1"));
}

TEST_CASE("errors: append", "[errors]") {
  Fixture f;
  const auto pos = kvpack_test::iota_positions(8, 100);
  auto& c = f.cache;
  require_error_unchanged(
      f, [&] { c.append(2, f.kv(f.k), f.kv(f.v), pos); }, "layer = 2");
  require_error_unchanged(
      f, [&] { c.append(-1, f.kv(f.k), f.kv(f.v), pos); }, "layer = -1");
  require_error_unchanged(
      f, [&] { c.append(0, ActivationView::nhd(f.k.data(), 8, 3, 32), f.kv(f.v), pos); },
      "k.head_dim = 32");
  require_error_unchanged(
      f, [&] { c.append(0, ActivationView::nhd(f.k.data(), 8, 2, 64), f.kv(f.v), pos); },
      "k.heads = 2");
  require_error_unchanged(
      f, [&] { c.append(0, f.kv(f.k), f.kv(f.v, 7), pos); }, "v.tokens = 7");
  require_error_unchanged(
      f, [&] { c.append(0, f.kv(f.k, 0), f.kv(f.v, 0), {}); }, "k.tokens = 0");
  const auto short_pos = kvpack_test::iota_positions(7, 100);
  require_error_unchanged(
      f, [&] { c.append(0, f.kv(f.k), f.kv(f.v), short_pos); }, "positions.size() = 7");
  auto dup = pos;
  dup[3] = dup[2];
  require_error_unchanged(
      f, [&] { c.append(0, f.kv(f.k), f.kv(f.v), dup); }, "positions[3]");
  const auto old = kvpack_test::iota_positions(8, 50);  // before the layer's last position (99)
  require_error_unchanged(
      f, [&] { c.append(0, f.kv(f.k), f.kv(f.v), old); }, "positions[0] = 50");
  auto negative = kvpack_test::iota_positions(8, 0);
  negative[0] = -3;
  require_error_unchanged(
      f, [&] { c.append(1, f.kv(f.k), f.kv(f.v), negative); }, "positions[0] = -3");
  auto nan_k = f.k;
  nan_k[100] = NAN;
  require_error_unchanged(
      f, [&] { c.append(0, f.kv(nan_k), f.kv(f.v), pos); }, "k[token 0");
  auto inf_v = f.v;
  inf_v[5 * 192 + 7] = -INFINITY;
  require_error_unchanged(
      f, [&] { c.append(0, f.kv(f.k), f.kv(inf_v), pos); }, "v[token 5, head 0, channel 7]");
  auto big = f.k;
  big[0] = 1e6f;  // finite but beyond the fp16 storage range
  require_error_unchanged(
      f, [&] { c.append(0, f.kv(big), f.kv(f.v), pos); }, "|x| <= 65504");
}

TEST_CASE("errors: a refused append hands back the pages it took, the check fused or not",
          "[errors]") {
  // When the pool has the pages free and the page tables room for them, the element check rides
  // on the conversion, so a bad element in the last head's values is found after the other
  // heads' rows were written into new pages; with no page free (pool chunks of one page) the
  // elements are checked first, so the pool never grows for an append it refuses. Either way:
  // the first bad element is reported, the cache and the pool are as before, and the next good
  // append stores exactly what a cache that never saw the bad one stores.
  using Cache = kvpack::KVCache<kvpack::Identity>;
  const ModelShape shape{1, 6, 3, 64, {}};
  const auto k = kvpack_test::random_values(40 * 3 * 64, 11);
  const auto v = kvpack_test::random_values(40 * 3 * 64, 12);
  const auto view = [](const std::vector<float>& x) {
    return ActivationView::nhd(x.data(), 40, 3, 64);
  };
  for (std::size_t chunk : {std::size_t{64}, std::size_t{1}}) {
    INFO("pool chunks of " << chunk << " pages");
    kvpack::PageOptions pages;
    pages.pool = std::make_shared<kvpack::PagePool>(Cache::page_bytes(shape, {}, 16), chunk);
    Cache cache(shape, {}, pages), clean(shape, {}, pages);
    for (Cache* c : {&cache, &clean}) {
      kvpack_test::fill_layer(*c, 0, 100, 13);  // 7 pages a head, then room for 14 in the table
      c->append(0, view(k), view(v), kvpack_test::iota_positions(40, 100));
    }
    const auto pos = kvpack_test::iota_positions(40, 140);  // 2 new pages a head
    const auto before = snapshot(cache);
    const std::size_t reserved = cache.reserved_bytes(), in_use = pages.pool->pages_in_use(),
                      pool_bytes = pages.pool->reserved_bytes();
    for (float bad : {NAN, 7e4f}) {
      auto bad_v = v;
      bad_v[39 * 192 + 2 * 64 + 5] = bad;  // token 39, head 2, channel 5: written last
      REQUIRE_THROWS_WITH(cache.append(0, view(k), view(bad_v), pos),
                          Contains("v[token 39, head 2, channel 5]"));
      CHECK(snapshot(cache) == before);
      CHECK(cache.reserved_bytes() == reserved);
      CHECK(pages.pool->pages_in_use() == in_use);
      CHECK(pages.pool->reserved_bytes() == pool_bytes);
    }
    cache.append(0, view(k), view(v), pos);
    clean.append(0, view(k), view(v), pos);
    CHECK(snapshot(cache) == snapshot(clean));
  }
}

TEST_CASE("errors: attend and observe", "[errors]") {
  Fixture f;
  auto& c = f.cache;
  const std::vector<int64_t> last{99};
  require_error_unchanged(
      f, [&] { c.attend(1, f.qv(), last, f.ov()); }, "layer");  // empty layer
  require_error_unchanged(
      f, [&] { c.attend(5, f.qv(), last, f.ov()); }, "layer = 5");
  require_error_unchanged(
      f, [&] { c.attend(0, ActivationView::nhd(f.q.data(), 1, 3, 64), last, f.ov()); },
      "q.heads = 3");
  require_error_unchanged(
      f, [&] { c.attend(0, ActivationView::nhd(f.q.data(), 1, 9, 128), last, f.ov()); },
      "q.head_dim = 128");
  const std::vector<int64_t> beyond{100};
  require_error_unchanged(
      f, [&] { c.attend(0, f.qv(), beyond, f.ov()); }, "positions[0] = 100");
  const std::vector<int64_t> two{98, 99};
  require_error_unchanged(
      f, [&] { c.attend(0, f.qv(), two, f.ov()); }, "positions.size() = 2");
  require_error_unchanged(
      f, [&] { c.attend(0, f.qv(), last, OutputView::nhd(f.out.data(), 1, 3, 64)); }, "out shape");
  auto nan_q = f.q;
  nan_q[3] = NAN;
  require_error_unchanged(
      f, [&] { c.attend(0, ActivationView::nhd(nan_q.data(), 1, 9, 64), last, f.ov()); },
      "q[token 0");
  require_error_unchanged(
      f, [&] { c.observe(0, f.qv(), beyond); }, "positions[0] = 100");
  require_error_unchanged(
      f, [&] { c.observe(1, f.qv(), last); }, "empty");
  require_error_unchanged(
      f, [&] { c.observe(0, ActivationView::nhd(f.q.data(), 1, 8, 64), last); }, "q.heads = 8");
}

TEST_CASE("errors: accessors", "[errors]") {
  Fixture f;
  REQUIRE_THROWS_WITH(f.cache.tokens(0, 3), Contains("head = 3"));
  REQUIRE_THROWS_WITH(f.cache.tokens(2, 0), Contains("layer = 2"));
  REQUIRE_THROWS_WITH(f.cache.materialize(-1), Contains("layer = -1"));
  REQUIRE_THROWS_WITH(f.cache.appended(9), Contains("layer = 9"));
}

TEST_CASE("errors: a query before every kept key of a head is refused", "[errors]") {
  const ModelShape shape{1, 3, 3, 64, {}};
  kvpack::KVCache<L2NormEvict> cache(shape,
                                     L2NormEvict(Budget::tokens(1).with_protection(0, 0), 0));
  kvpack_test::fill_layer(cache, 0, 50, 4);
  cache.compress();  // each head keeps one token, likely not position 0
  int64_t first = 0;
  for (int h = 0; h < 3; ++h)
    first = std::max<int64_t>(first, cache.materialize(0).heads[h].positions[0]);
  REQUIRE(first > 0);  // deterministic for this seed
  {
    const auto q = kvpack_test::random_values(3 * 64, 1);
    std::vector<float> out(3 * 64);
    const std::vector<int64_t> pos{first - 1};
    REQUIRE_THROWS_WITH(cache.attend(0, ActivationView::nhd(q.data(), 1, 3, 64), pos,
                                     OutputView::nhd(out.data(), 1, 3, 64)),
                        Contains("no token at or before position"));
  }
}
