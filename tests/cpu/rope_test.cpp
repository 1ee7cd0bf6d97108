#include <catch2/catch.hpp>
#include <cmath>
#include <kvpack/kvpack.hpp>

#include "test_util.hpp"

using kvpack::Rope;
using kvpack::RopeConfig;
using kvpack::RopeStyle;

namespace {
double norm(const std::vector<float>& x) {
  double s = 0;
  for (float v : x) s += static_cast<double>(v) * v;
  return std::sqrt(s);
}
double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}
}  // namespace

TEST_CASE("rope: unrotate inverts rotate at positions up to 1e6", "[rope]") {
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalfSplit}) {
    for (int d : {64, 128}) {
      const Rope rope(RopeConfig{style, 100000.0}, d);
      for (int64_t pos : {int64_t{0}, int64_t{1}, int64_t{17}, int64_t{4095}, int64_t{65537},
                          int64_t{999999}, int64_t{1000000}}) {
        const auto x = kvpack_test::random_values(d, static_cast<uint32_t>(pos + d));
        auto y = x;
        rope.rotate(y.data(), pos);
        REQUIRE(norm(y) == Approx(norm(x)).epsilon(1e-6));
        rope.unrotate(y.data(), pos);
        double err = 0;
        for (int i = 0; i < d; ++i) err = std::max(err, std::fabs(double(y[i]) - x[i]));
        REQUIRE(err < 1e-5 * norm(x));
      }
    }
  }
}

TEST_CASE("rope: matches the closed form for each style", "[rope]") {
  const int d = 8;
  const double theta = 10000.0;
  const int64_t pos = 3;
  const auto x = kvpack_test::random_values(d, 11);
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalfSplit}) {
    auto y = x;
    Rope(RopeConfig{style, theta}, d).rotate(y.data(), pos);
    for (int i = 0; i < d / 2; ++i) {
      const int a = style == RopeStyle::kInterleaved ? 2 * i : i;
      const int b = style == RopeStyle::kInterleaved ? 2 * i + 1 : i + d / 2;
      const double angle = pos * std::pow(theta, -2.0 * i / d);
      REQUIRE(y[a] == Approx(x[a] * std::cos(angle) - x[b] * std::sin(angle)).margin(1e-6));
      REQUIRE(y[b] == Approx(x[a] * std::sin(angle) + x[b] * std::cos(angle)).margin(1e-6));
    }
  }
}

TEST_CASE("rope: q·k depends only on the relative position", "[rope]") {
  const int d = 64;
  const Rope rope(RopeConfig{RopeStyle::kInterleaved, 100000.0}, d);
  const auto q = kvpack_test::random_values(d, 1), k = kvpack_test::random_values(d, 2);
  auto dot_at = [&](int64_t m, int64_t n) {
    auto qm = q, kn = k;
    rope.rotate(qm.data(), m);
    rope.rotate(kn.data(), n);
    return dot(qm, kn);
  };
  REQUIRE(dot_at(10, 3) == Approx(dot_at(507, 500)).epsilon(1e-5));
  REQUIRE(dot_at(100000, 99000) == Approx(dot_at(2000, 1000)).epsilon(1e-4));
}

TEST_CASE("rope: bad configuration is refused", "[rope][errors]") {
  REQUIRE_THROWS_AS(Rope(RopeConfig{RopeStyle::kInterleaved, 10000.0}, 7), kvpack::error);
  REQUIRE_THROWS_AS(Rope(RopeConfig{RopeStyle::kInterleaved, NAN}, 64), kvpack::error);
  REQUIRE_THROWS_AS(Rope(RopeConfig{RopeStyle::kInterleaved, 0.5}, 64), kvpack::error);
}
