// The run-time choice of the CPU kernels' instruction set (isa.hpp): how it is chosen and
// overridden, and that every kernel family gives the same answer under each choice. The
// per-policy results against the references run under each choice in backend_ops_test.cpp,
// attention_test.cpp and quantize_test.cpp.
#include <catch2/catch.hpp>
#include <cstdlib>
#include <kvpack/kvpack.hpp>
#include <string>

#include "test_util.hpp"

using kvpack::Isa;

namespace {

/// Sets KVPACK_ISA for a scope (unset when `value` is null) and restores it.
class EnvScope {
 public:
  explicit EnvScope(const char* value) {
    if (const char* old = std::getenv("KVPACK_ISA")) old_ = old, had_ = true;
    if (value != nullptr) {
      setenv("KVPACK_ISA", value, 1);
    } else {
      unsetenv("KVPACK_ISA");
    }
  }
  ~EnvScope() {
    if (had_) {
      setenv("KVPACK_ISA", old_.c_str(), 1);
    } else {
      unsetenv("KVPACK_ISA");
    }
  }

 private:
  std::string old_;
  bool had_ = false;
};

/// Output of attend over a cache filled with seeded K/V (decode: 1 query token, 3 q heads per kv
/// head), under instruction set `isa`.
template <class Policy>
std::vector<float> attend_under(Isa isa, const kvpack::ModelShape& shape, int64_t n,
                                const Policy& policy, bool compress) {
  kvpack_test::IsaScope scope(isa);
  kvpack::KVCache<Policy> cache(shape, policy);
  kvpack_test::fill_layer(cache, 0, n, 71, 333);
  if (compress) cache.compress();
  return kvpack_test::attend_decode(cache, n, 72);
}

}  // namespace

TEST_CASE("isa: the choice never exceeds the CPU, set_cpu_isa returns the previous one", "[isa]") {
  const Isa best = kvpack::cpu_isa_supported();
  CHECK(kvpack::cpu_isa() <= best);
  const Isa before = kvpack::cpu_isa();
  CHECK(kvpack::set_cpu_isa(Isa::kScalar) == before);
  CHECK(kvpack::cpu_isa() == Isa::kScalar);
  CHECK(kvpack::set_cpu_isa(before) == Isa::kScalar);
  CHECK(kvpack::cpu_isa() == before);
  if (best < Isa::kAvx2) {
    CHECK_THROWS_WITH(kvpack::set_cpu_isa(Isa::kAvx2),
                      Catch::Contains("supported by this CPU") && Catch::Contains("scalar"));
    CHECK(kvpack::cpu_isa() == before);  // a refused call changes nothing
  }
  CHECK(std::string(kvpack::isa_name(Isa::kScalar)) == "scalar");
  if (best < Isa::kAvx512) {
    CHECK_THROWS_WITH(kvpack::set_cpu_isa(Isa::kAvx512), Catch::Contains("supported by this CPU"));
    CHECK(kvpack::cpu_isa() == before);
  }
  CHECK(std::string(kvpack::isa_name(Isa::kAvx2)) == "avx2");
  CHECK(std::string(kvpack::isa_name(Isa::kAvx512)) == "avx512");
}

TEST_CASE("isa: KVPACK_ISA lowers the choice, an unknown name is refused", "[isa]") {
  const Isa best = kvpack::cpu_isa_supported();
  {
    EnvScope env(nullptr);
    CHECK(kvpack::detail::initial_cpu_isa() == best);
  }
  {
    EnvScope env("scalar");
    CHECK(kvpack::detail::initial_cpu_isa() == Isa::kScalar);
  }
  {
    EnvScope env("avx2");  // never above what the CPU has
    CHECK(kvpack::detail::initial_cpu_isa() == std::min(best, Isa::kAvx2));
  }
  {
    EnvScope env("avx512");
    CHECK(kvpack::detail::initial_cpu_isa() == std::min(best, Isa::kAvx512));
  }
  {
    EnvScope env("avx7");
    CHECK_THROWS_WITH(kvpack::detail::initial_cpu_isa(),
                      Catch::Contains("KVPACK_ISA") && Catch::Contains("avx7") &&
                          Catch::Contains("scalar, avx2, avx512"));
  }
}

TEST_CASE("isa: dense and KIVI decode attention agree across instruction sets",
          "[isa][attention]") {
  const auto isas = kvpack_test::supported_isas();
  if (isas.size() < 2) SUCCEED("this CPU runs the scalar kernels only");
  // head_dim 64 and 128 (the kernels with the dimension fixed), 96 and 80 (AVX-512 channel tails)
  // and 40 (no multiple of 16: AVX2's kernel at AVX-512); 1,000 tokens: tiles, KIVI groups and a
  // ragged tail.
  for (int d : {64, 128, 96, 80, 40}) {
    const kvpack::ModelShape shape{1, 6, 2, d, {}};
    INFO("head_dim " << d);
    // KIVI groups values along channels: group 32, or 16 at head_dim 80; none divides 40.
    const bool kivi = d % 16 == 0;
    const kvpack::Quantize quantize(4, d % 32 == 0 ? 32 : 16, 128);
    const auto dense0 = attend_under(isas.front(), shape, 1000, kvpack::Identity{}, false);
    std::vector<float> quant0;
    if (kivi) quant0 = attend_under(isas.front(), shape, 1000, quantize, true);
    for (std::size_t i = 1; i < isas.size(); ++i) {
      INFO("instruction set " << kvpack::isa_name(isas[i]));
      CHECK(kvpack_test::max_abs_difference(
                dense0, attend_under(isas[i], shape, 1000, kvpack::Identity{}, false)) < 1e-5);
      if (kivi) {
        CHECK(kvpack_test::max_abs_difference(
                  quant0, attend_under(isas[i], shape, 1000, quantize, true)) < 1e-5);
      }
    }
  }
}

TEST_CASE("isa: KVzip scores agree across instruction sets", "[isa][scoring]") {
  const auto isas = kvpack_test::supported_isas();
  const kvpack::ModelShape shape{1, 8, 2, 64, {}};
  std::vector<kvpack::HeadScores> scores;
  for (const Isa isa : isas) {
    kvpack_test::IsaScope scope(isa);
    kvpack::KVCache<kvpack::ReconstructionEvict> cache(shape);
    kvpack_test::fill_layer(cache, 0, 600, 81);
    const auto q = kvpack_test::random_values(600 * shape.q_heads * shape.head_dim, 82);
    cache.observe(0, kvpack::ActivationView::nhd(q.data(), 600, shape.q_heads, shape.head_dim),
                  kvpack_test::iota_positions(600));
    scores.push_back(cache.head_scores());
  }
  for (std::size_t i = 1; i < scores.size(); ++i) {
    REQUIRE(scores[i].score.size() == scores[0].score.size());
    for (std::size_t j = 0; j < scores[0].score.size(); ++j) {
      CHECK(scores[i].score[j] == Approx(scores[0].score[j]).epsilon(1e-5));
    }
  }
}
