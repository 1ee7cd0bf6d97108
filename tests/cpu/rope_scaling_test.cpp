// RoPE frequency scaling (linear, llama3, YaRN) and partial rotary: frequencies against the
// published formulas (Hugging Face's rope_scaling, written out again here in long double),
// rotations against explicit angles, exact inverses, and low-rank caches that un-rotate and
// re-rotate keys of such models.
#include <catch2/catch.hpp>
#include <cmath>
#include <kvpack/kvpack.hpp>
#include <vector>

#include "test_util.hpp"

using kvpack::Rope;
using kvpack::RopeConfig;
using kvpack::RopeScaling;
using kvpack::RopeStyle;

namespace {

using Real = long double;
const Real kPi = 3.141592653589793238462643383279502884L;

/// theta^(-2i/rd), i < rd/2.
std::vector<Real> base_freq(Real theta, int rd) {
  std::vector<Real> f(rd / 2);
  for (int i = 0; i < rd / 2; ++i) f[i] = std::pow(theta, -2.0L * i / rd);
  return f;
}

RopeConfig llama31() {  // Llama-3.1-8B's rope_scaling
  RopeConfig c;
  c.style = RopeStyle::kHalfSplit;
  c.theta = 500000.0;
  c.scaling = RopeScaling::kLlama3;
  c.factor = 8.0;
  c.low_freq_factor = 1.0;
  c.high_freq_factor = 4.0;
  c.original_context = 8192;
  return c;
}

RopeConfig yarn(double factor, int rotary_dim = 0) {  // Qwen2.5-style YaRN
  RopeConfig c;
  c.style = RopeStyle::kHalfSplit;
  c.theta = 1000000.0;
  c.scaling = RopeScaling::kYarn;
  c.factor = factor;
  c.original_context = 32768;
  c.rotary_dim = rotary_dim;
  return c;
}

void check_close(const std::vector<double>& got, const std::vector<Real>& want) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO("frequency " << i);
    CHECK(std::fabs(static_cast<Real>(got[i]) - want[i]) <= 1e-14L * want[i]);
  }
}

}  // namespace

TEST_CASE("rope scaling: frequencies follow the published formulas", "[rope]") {
  SECTION("linear: every frequency / factor") {
    RopeConfig c;
    c.theta = 10000.0;
    c.scaling = RopeScaling::kLinear;
    c.factor = 4.0;
    auto want = base_freq(10000.0L, 64);
    for (auto& f : want) f /= 4.0L;
    check_close(Rope(c, 64).inv_freq(), want);
  }
  SECTION("llama3: long wavelengths / factor, short kept, a linear ramp in 1/wavelength") {
    auto want = base_freq(500000.0L, 128);
    int low = 0, mid = 0, high = 0;
    for (auto& f : want) {
      const Real wavelen = 2 * kPi / f;
      if (wavelen < 8192.0L / 4) {
        ++high;
      } else if (wavelen > 8192.0L / 1) {
        f /= 8;
        ++low;
      } else {
        const Real smooth = (8192.0L / wavelen - 1) / (4 - 1);
        f = (1 - smooth) * f / 8 + smooth * f;
        ++mid;
      }
    }
    REQUIRE(low > 0);  // the case covers all three bands
    REQUIRE(mid > 0);
    REQUIRE(high > 0);
    check_close(Rope(llama31(), 128).inv_freq(), want);
  }
  SECTION("yarn: ramp between the correction dims of beta_fast and beta_slow") {
    for (int rd : {128, 64}) {
      const RopeConfig c = yarn(4.0, rd == 128 ? 0 : rd);
      auto dim = [&](Real rotations) {
        return rd * std::log(32768.0L / (rotations * 2 * kPi)) / (2 * std::log(1000000.0L));
      };
      const Real lo = std::max(0.0L, std::floor(dim(32)));
      const Real hi = std::min(Real(rd - 1), std::ceil(dim(1)));
      auto want = base_freq(1000000.0L, rd);
      for (int i = 0; i < rd / 2; ++i) {
        const Real ramp = std::min(1.0L, std::max(0.0L, (i - lo) / (hi - lo)));
        want[i] = want[i] / 4 * ramp + want[i] * (1 - ramp);
      }
      check_close(Rope(c, 128).inv_freq(), want);
      CHECK(Rope(c, 128).attention_factor() == Approx(0.1 * std::log(4.0) + 1.0).epsilon(1e-15));
    }
  }
}

TEST_CASE("rope scaling: rotations by the scaled angles, partial rotary, exact inverse", "[rope]") {
  const int d = 128;
  for (const RopeConfig& config : {llama31(), yarn(4.0), yarn(2.0, 64)}) {
    const Rope rope(config, d);
    for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalfSplit}) {
      RopeConfig styled = config;
      styled.style = style;
      const Rope r(styled, d);
      for (int64_t pos : {int64_t{0}, int64_t{5}, int64_t{40000}, int64_t{131071}}) {
        const auto x = kvpack_test::random_values(d, static_cast<uint32_t>(pos + 7));
        auto y = x;
        r.rotate(y.data(), pos);
        // Explicit reference: pair i of the first rotary_dim channels turns by pos · inv_freq_i
        // and is scaled by the attention factor; the other channels are untouched.
        const int rd = r.rotary_dim();
        const double m = r.attention_factor();
        for (int i = 0; i < rd / 2; ++i) {
          const int a = style == RopeStyle::kInterleaved ? 2 * i : i;
          const int b = style == RopeStyle::kInterleaved ? 2 * i + 1 : i + rd / 2;
          const double angle = static_cast<double>(pos) * r.inv_freq()[i];
          CHECK(y[a] == Approx(m * (x[a] * std::cos(angle) - x[b] * std::sin(angle))).margin(1e-5));
          CHECK(y[b] == Approx(m * (x[a] * std::sin(angle) + x[b] * std::cos(angle))).margin(1e-5));
        }
        for (int i = rd; i < d; ++i) CHECK(y[i] == x[i]);
        r.unrotate(y.data(), pos);
        for (int i = 0; i < d; ++i) CHECK(y[i] == Approx(x[i]).margin(1e-5));
      }
    }
  }
}

TEST_CASE("rope scaling: bad knobs are refused by name", "[rope][errors]") {
  auto refused = [](RopeConfig c, const char* what) {
    REQUIRE_THROWS_WITH(Rope(c, 64), Catch::Contains(what));
    kvpack::ModelShape shape{1, 2, 1, 64, c};
    REQUIRE_THROWS_WITH(kvpack::KVCache<kvpack::Identity>(shape), Catch::Contains(what));
  };
  RopeConfig c = yarn(0.5);
  refused(c, "factor = 0.5");
  c = yarn(2.0, 63);
  refused(c, "rotary_dim = 63");
  c = yarn(2.0, 66);
  refused(c, "rotary_dim = 66");
  c = yarn(2.0);
  c.beta_fast = 0.5;
  refused(c, "beta_fast = 0.5");
  c = llama31();
  c.high_freq_factor = 1.0;
  refused(c, "high_freq_factor = 1");
  c = llama31();
  c.original_context = 0;
  refused(c, "original_context = 0");
}

TEST_CASE("rope scaling: low-rank caches un-rotate and re-rotate scaled / partial keys",
          "[rope][lowrank]") {
  // Full-rank CrossLayerSVD keeps every key up to the fp16 basis: what materialize() rebuilds
  // (re-rotated) must match the post-RoPE keys appended, whatever the RoPE config.
  for (const RopeConfig& config : {llama31(), yarn(4.0), yarn(2.0, 32)}) {
    const kvpack::ModelShape shape{2, 4, 2, 64, config};
    const int64_t n = 96;
    kvpack::KVCache<kvpack::CrossLayerSVD> cache(shape, kvpack::CrossLayerSVD(1, 96, 96));
    std::vector<std::vector<float>> keys;
    for (int l = 0; l < shape.layers; ++l) {
      keys.push_back(kvpack_test::random_values(n * 2 * 64, 40 + l));
      const auto v = kvpack_test::random_values(n * 2 * 64, 50 + l);
      // Positions past the original context, where the scalings differ from plain RoPE.
      const auto pos = kvpack_test::iota_positions(n, 100000);
      cache.append(l, kvpack::ActivationView::nhd(keys[l].data(), n, 2, 64),
                   kvpack::ActivationView::nhd(v.data(), n, 2, 64), pos);
    }
    cache.compress();
    for (int l = 0; l < shape.layers; ++l) {
      const auto held = cache.materialize(l);
      for (int h = 0; h < 2; ++h) {
        double num = 0, den = 0;
        for (int64_t t = 0; t < n; ++t) {
          for (int i = 0; i < 64; ++i) {
            const double want = kvpack::to_float(kvpack::to_half(keys[l][(t * 2 + h) * 64 + i]));
            const double got = held.heads[h].k[t * 64 + i];
            num += (got - want) * (got - want);
            den += want * want;
          }
        }
        INFO("layer " << l << " head " << h);
        CHECK(std::sqrt(num / den) < 2e-3);
      }
    }
  }
}
