// KVCache::save / load: every policy's compressed state read back bit-identical (bytes, held
// values, attention, and what later appends and compress() calls do), and refused files —
// truncated, corrupted, foreign, another version, another shape or policy, inconsistent
// contents behind a valid checksum — leave the loading cache unchanged.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <kvpack/kvpack.hpp>
#include <string>
#include <vector>

#include "../backend_ops/backend_ops.hpp"
#include "test_util.hpp"

namespace {

using kvpack_test::temp_path;

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

/// Rewrites the trailing FNV-1a checksum so a deliberately altered file passes the checksum and
/// reaches the structural checks.
void reseal(std::vector<uint8_t>& bytes) {
  const uint64_t sum = kvpack::detail::fnv1a(bytes.data(), bytes.size() - 8);
  std::memcpy(bytes.data() + bytes.size() - 8, &sum, 8);
}

/// Everything observable about a cache: bytes, held K/V/positions per layer, and attend()
/// outputs for a decode query and a 3-token prefill block at the end of every layer.
template <class Cache>
struct Snapshot {
  std::size_t bytes = 0;
  std::vector<kvpack::DenseLayer> layers;
  std::vector<std::vector<float>> outputs;

  explicit Snapshot(const Cache& cache) : bytes(cache.bytes()) {
    const auto& s = cache.shape();
    for (int l = 0; l < s.layers; ++l) {
      layers.push_back(cache.materialize(l));
      if (layers.back().heads[0].positions.empty()) continue;  // nothing to attend to
      const int64_t last = layers.back().heads[0].positions.back();
      for (int64_t n : {int64_t{1}, int64_t{3}}) {
        const auto q = kvpack_test::random_values(n * s.q_heads * s.head_dim, 40 + l + n);
        std::vector<float> o(q.size());
        cache.attend(l, kvpack::ActivationView::nhd(q.data(), n, s.q_heads, s.head_dim),
                     kvpack_test::iota_positions(n, last - n + 1),
                     kvpack::OutputView::nhd(o.data(), n, s.q_heads, s.head_dim));
        outputs.push_back(std::move(o));
      }
    }
  }
  bool operator==(const Snapshot& o) const {
    if (bytes != o.bytes || outputs != o.outputs || layers.size() != o.layers.size()) return false;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      for (std::size_t h = 0; h < layers[l].heads.size(); ++h) {
        const auto &a = layers[l].heads[h], &b = o.layers[l].heads[h];
        if (a.k != b.k || a.v != b.v || a.positions != b.positions) return false;
      }
    }
    return true;
  }
};

/// Appends `n` decode tokens to every layer after position `first - 1`, then compresses.
template <class Cache>
void decode_and_compress(Cache& cache, int64_t first, int64_t n, uint32_t seed) {
  kvpack_test::append_decode_tokens(cache, first, n, seed);
  cache.compress();
}

}  // namespace

TEST_CASE("save/load: every policy of the backend-ops table round-trips bit for bit",
          "[save_load]") {
  using namespace kvpack_backend_ops;
  int cases = 0;
  for_each_case([&](const Case& c, const auto& policy) {
    using P = std::decay_t<decltype(policy)>;
    INFO(c.name);
    kvpack::KVCache<P> original(c.shape, policy);
    run_case(c, original);  // appends, observes when the policy needs it, compresses
    decode_and_compress(original, c.tokens, 9, 70);
    const std::string path = temp_path("round_trip");
    original.save(path);

    kvpack::KVCache<P> loaded(c.shape, policy);
    loaded.load(path);
    REQUIRE(Snapshot<kvpack::KVCache<P>>(loaded) == Snapshot<kvpack::KVCache<P>>(original));
    // The state behind the held values (layer positions, scores, observations) came back too:
    // more decoding and another compress() do the same on both.
    decode_and_compress(original, c.tokens + 9, 40, 80);
    decode_and_compress(loaded, c.tokens + 9, 40, 80);
    CHECK(Snapshot<kvpack::KVCache<P>>(loaded) == Snapshot<kvpack::KVCache<P>>(original));
    std::remove(path.c_str());
    ++cases;
  });
  CHECK(cases == 14);
}

TEST_CASE("save/load: compositions and the query-scored policies round-trip", "[save_load]") {
  const kvpack::ModelShape shape{2, 6, 2, 64, {}};
  const auto round_trip = [&](const auto& policy, bool observe) {
    using P = std::decay_t<decltype(policy)>;
    kvpack::KVCache<P> a(shape, policy);
    for (int l = 0; l < shape.layers; ++l) kvpack_test::fill_layer(a, l, 256, 10 + l, 64);
    if (observe) {
      const auto q = kvpack_test::random_values(64 * shape.q_heads * shape.head_dim, 30);
      for (int l = 0; l < shape.layers; ++l) {
        a.observe(l, kvpack::ActivationView::nhd(q.data(), 64, shape.q_heads, shape.head_dim),
                  kvpack_test::iota_positions(64, 192));
      }
    }
    a.compress();
    const std::string path = temp_path("compose");
    a.save(path);
    kvpack::KVCache<P> b(shape, policy);
    b.load(path);
    CHECK(Snapshot<kvpack::KVCache<P>>(b) == Snapshot<kvpack::KVCache<P>>(a));
    std::remove(path.c_str());
  };
  using KvzipQuant = kvpack::Compose<kvpack::ReconstructionEvict, kvpack::Quantize>;
  using XkvQuant = kvpack::Compose<kvpack::CrossLayerSVD, kvpack::Quantize>;
  round_trip(KvzipQuant(kvpack::ReconstructionEvict{}, kvpack::Quantize(4, 32, 32)), true);
  round_trip(XkvQuant(kvpack::CrossLayerSVD(2, 24, 24), kvpack::Quantize(4, 32, 32)), false);
  round_trip(kvpack::SnapKV{}, true);
  round_trip(kvpack::LazyLayerDrop(0.5, 4, 64), true);
}

TEST_CASE("save/load: refused files name the problem and change nothing", "[save_load][errors]") {
  const kvpack::ModelShape shape{2, 6, 2, 64, {}};
  using Cache = kvpack::KVCache<kvpack::Quantize>;
  Cache source(shape, kvpack::Quantize(4, 32, 32));
  for (int l = 0; l < shape.layers; ++l) kvpack_test::fill_layer(source, l, 200, 50 + l);
  source.compress();
  const std::string path = temp_path("refused"), bad = temp_path("refused_bad");
  source.save(path);
  const std::vector<uint8_t> good = read_bytes(path);

  // The loading cache holds something else; every refusal must leave it exactly so.
  Cache target(shape, kvpack::Quantize(4, 32, 32));
  kvpack_test::fill_layer(target, 0, 77, 60);
  const Snapshot<Cache> before(target);
  const auto refused = [&](const std::vector<uint8_t>& bytes, const char* message) {
    write_bytes(bad, bytes);
    CHECK_THROWS_WITH(target.load(bad), Catch::Contains(message));
    CHECK(Snapshot<Cache>(target) == before);
  };

  refused({good.begin(), good.begin() + good.size() / 2}, "checksum mismatch");
  auto flipped = good;
  flipped[flipped.size() / 3] ^= 0x10;
  refused(flipped, "checksum mismatch");
  auto foreign = good;
  std::memcpy(foreign.data(), "KVPKHEAD", 8);
  refused(foreign, "not a kvpack KV cache file");
  auto version = good;
  version[8] = 2;
  reseal(version);
  refused(version, "version = 2, expected 1");
  // A checksummed file with descending positions (the run 0, 1, 2 of the first head's
  // positions becomes 0, 1, 0): the structural checks refuse it.
  auto lying = good;
  for (std::size_t i = 8; i + 12 < lying.size(); ++i) {
    int32_t run[3];
    std::memcpy(run, &lying[i], 12);
    if (run[0] == 0 && run[1] == 1 && run[2] == 2) {
      const int32_t back = 0;
      std::memcpy(&lying[i + 8], &back, 4);
      break;
    }
  }
  reseal(lying);
  refused(lying, "expected ascending positions");

  // Another shape, another policy, other KIVI knobs: refused by the header.
  kvpack::ModelShape other = shape;
  other.kv_heads = 3;
  other.q_heads = 6;
  Cache wrong_shape(other, kvpack::Quantize(4, 32, 32));
  CHECK_THROWS_WITH(wrong_shape.load(path), Catch::Contains("kv_heads = 2, expected 3"));
  Cache wrong_bits(shape, kvpack::Quantize(2, 32, 32));
  CHECK_THROWS_WITH(wrong_bits.load(path), Catch::Contains("KIVI bits = 4, expected 2"));
  kvpack::KVCache<kvpack::Identity> wrong_policy(shape);
  CHECK_THROWS_WITH(wrong_policy.load(path),
                    Catch::Contains("policy = Quantize, expected Identity"));
  CHECK_THROWS_WITH(target.load(temp_path("missing")), Catch::Contains("cannot read"));
  CHECK(Snapshot<Cache>(target) == before);

  // The good file still loads into the same cache afterwards.
  target.load(path);
  CHECK(Snapshot<Cache>(target) == Snapshot<Cache>(source));
  std::remove(path.c_str());
  std::remove(bad.c_str());
}

TEST_CASE("save/load: a file written from the documented layout alone loads", "[save_load]") {
  // tests/fuzz/make_seeds.py writes this KIVI cache in Python from the layout in cache_io.hpp
  // and the store formats (first byte: the fuzz target's steering byte): layer 0 holds 40 tokens,
  // 32 in blocks of scale 2^-4 and minimum -1, 8 in an fp16 tail in [0.125, 0.25); layer 1 none.
  auto bytes =
      read_bytes(std::string(KVPACK_TEST_SOURCE_DIR) + "/fuzz/corpus/checked_file/kivi_cache");
  REQUIRE(bytes.size() > 1);
  bytes.erase(bytes.begin());
  const std::string path = temp_path("documented");
  write_bytes(path, bytes);
  kvpack::KVCache<kvpack::Quantize> cache({2, 4, 2, 32, {}}, kvpack::Quantize(4, 32, 32));
  cache.load(path);
  std::remove(path.c_str());
  CHECK(cache.tokens(0, 0) == 40);
  CHECK(cache.tokens(0, 1) == 40);
  CHECK(cache.tokens(1, 0) == 0);
  CHECK(cache.appended(0) == 40);
  const auto held = cache.materialize(0);
  for (const auto& h : held.heads) {
    CHECK(h.positions == kvpack_test::iota_positions(40));
    for (int64_t t = 0; t < 40; ++t) {
      for (int i = 0; i < 32; ++i) {
        const float k = h.k[t * 32 + i], v = h.v[t * 32 + i];
        if (t < 32) {  // min + code * scale: 16 levels from -1 in steps of 1/16
          CHECK(k >= -1.0f);
          CHECK(k <= -1.0f + 15.0f / 16.0f);
          CHECK(std::fmod(k + 1.0f, 1.0f / 16.0f) == 0.0f);
          CHECK(v >= -1.0f);
          CHECK(v <= -1.0f + 15.0f / 16.0f);
        } else {
          CHECK(k >= 0.125f);
          CHECK(k < 0.25f);
          CHECK(v >= 0.125f);
          CHECK(v < 0.25f);
        }
      }
    }
  }
}
