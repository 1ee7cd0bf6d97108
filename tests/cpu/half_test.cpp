#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <kvpack/kvpack.hpp>

#include "test_util.hpp"

using kvpack::Half;

TEST_CASE("fp16: every half value survives half -> float -> half", "[half]") {
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const Half h{static_cast<uint16_t>(bits)};
    const float f = kvpack::to_float(h);
    const Half back = kvpack::to_half(f);
    if (std::isnan(f)) {
      REQUIRE(std::isnan(kvpack::to_float(back)));
    } else {
      REQUIRE(back.bits == h.bits);
    }
  }
}

TEST_CASE("fp16: float -> half rounds to nearest, ties to even", "[half]") {
  // 1 + 2^-11 is exactly halfway between 1 and 1 + 2^-10: ties to even (1.0).
  REQUIRE(kvpack::to_half(1.0f + std::ldexp(1.0f, -11)).bits == 0x3C00);
  // 1 + 3·2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9 (even): rounds up.
  REQUIRE(kvpack::to_half(1.0f + 3 * std::ldexp(1.0f, -11)).bits == 0x3C02);
  REQUIRE(kvpack::to_half(65504.0f).bits == 0x7BFF);
  REQUIRE(kvpack::to_half(65520.0f).bits == 0x7C00);  // rounds to +inf
  REQUIRE(kvpack::to_half(-1e30f).bits == 0xFC00);
  REQUIRE(kvpack::to_half(std::ldexp(1.0f, -24)).bits == 0x0001);  // smallest subnormal
  REQUIRE(kvpack::to_half(std::ldexp(1.0f, -25)).bits == 0x0000);  // tie to even: zero
  REQUIRE(kvpack::to_half(std::ldexp(1.5f, -25)).bits == 0x0001);
}

TEST_CASE("fp16: rounding error of random floats is at most half an ulp", "[half]") {
  const auto x = kvpack_test::random_values(100000, 7, 100.0f);
  for (float f : x) {
    const float r = kvpack::to_float(kvpack::to_half(f));
    const int e = std::ilogb(std::fabs(f) < 6.1035e-5f ? 6.1035e-5f : f);
    REQUIRE(std::fabs(r - f) <= std::ldexp(1.0f, e - 11));
  }
}

TEST_CASE("bf16: conversion rounds to nearest even and keeps NaN", "[half]") {
  REQUIRE(kvpack::to_float(kvpack::to_bfloat16(1.0f)) == 1.0f);
  REQUIRE(kvpack::to_bfloat16(1.0f + std::ldexp(1.0f, -8)).bits == 0x3F80);  // tie -> even
  REQUIRE(kvpack::to_bfloat16(1.0f + 3 * std::ldexp(1.0f, -8)).bits == 0x3F82);
  REQUIRE(std::isnan(kvpack::to_float(kvpack::to_bfloat16(NAN))));
}
