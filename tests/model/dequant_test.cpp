// Dequantizers and fp16 conversion against values worked out by hand.

#include "dequant.hpp"

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <vector>

using kvpack::llama::dequantize_row;
using kvpack::llama::fp16_to_fp32;
using kvpack::llama::fp32_to_fp16;
using kvpack::llama::GgufError;
using kvpack::llama::TensorType;

namespace {
float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
}  // namespace

TEST_CASE("fp16 -> fp32 by bit manipulation", "[dequant]") {
  CHECK(fp16_to_fp32(0x3C00) == 1.0f);
  CHECK(fp16_to_fp32(0xC000) == -2.0f);
  CHECK(fp16_to_fp32(0x3800) == 0.5f);
  CHECK(fp16_to_fp32(0x3555) == 0.333251953125f);
  CHECK(fp16_to_fp32(0x7BFF) == 65504.0f);
  CHECK(fp16_to_fp32(0x0400) == std::ldexp(1.0f, -14));            // smallest normal
  CHECK(fp16_to_fp32(0x0001) == std::ldexp(1.0f, -24));            // smallest subnormal
  CHECK(fp16_to_fp32(0x03FF) == 1023.0f * std::ldexp(1.0f, -24));  // largest subnormal
  CHECK(fp16_to_fp32(0x8001) == -std::ldexp(1.0f, -24));
  CHECK(fp16_to_fp32(0x0000) == 0.0f);
  CHECK(std::signbit(fp16_to_fp32(0x8000)));
  CHECK(std::isinf(fp16_to_fp32(0x7C00)));
  CHECK(fp16_to_fp32(0xFC00) < 0.0f);
  CHECK(std::isnan(fp16_to_fp32(0x7E00)));
  CHECK(std::isnan(fp16_to_fp32(0x7C01)));
}

TEST_CASE("fp32 -> fp16 rounds to nearest even", "[dequant]") {
  CHECK(fp32_to_fp16(1.0f) == 0x3C00);
  CHECK(fp32_to_fp16(-2.0f) == 0xC000);
  CHECK(fp32_to_fp16(65504.0f) == 0x7BFF);
  // Halfway between 1 and 1 + 2^-10 goes to the even mantissa (1); 3/2 of the step goes up.
  CHECK(fp32_to_fp16(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);
  CHECK(fp32_to_fp16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);
  CHECK(fp32_to_fp16(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)) == 0x3C01);
  CHECK(fp32_to_fp16(65519.0f) == 0x7BFF);  // below the halfway point to 65536
  CHECK(fp32_to_fp16(65520.0f) == 0x7C00);  // halfway, odd mantissa: rounds up to infinity
  CHECK(fp32_to_fp16(1e10f) == 0x7C00);
  CHECK(fp32_to_fp16(-1e10f) == 0xFC00);
  CHECK(fp32_to_fp16(std::ldexp(1.0f, -24)) == 0x0001);
  CHECK(fp32_to_fp16(std::ldexp(1.0f, -25)) == 0x0000);  // halfway to the first subnormal: even
  CHECK(fp32_to_fp16(std::ldexp(1.5f, -25)) == 0x0001);
  CHECK(fp32_to_fp16(std::ldexp(3.0f, -25)) == 0x0002);  // 1.5 subnormal steps: to even (2)
  CHECK(fp32_to_fp16(std::ldexp(1.0f, -30)) == 0x0000);
  CHECK(fp32_to_fp16(std::ldexp(2047.0f, -25)) == 0x0400);  // rounds up into the normals
  CHECK(fp32_to_fp16(-0.0f) == 0x8000);
  CHECK(fp32_to_fp16(INFINITY) == 0x7C00);
  CHECK((fp32_to_fp16(NAN) & 0x7FFF) > 0x7C00);
  CHECK(fp32_to_fp16(bits_to_float(0x7F7FFFFF)) == 0x7C00);  // FLT_MAX

  // Every finite half survives the round trip exactly.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7C00) == 0x7C00) continue;
    if (fp32_to_fp16(fp16_to_fp32(static_cast<uint16_t>(h))) != h) {
      FAIL("round trip of half 0x" << std::hex << h);
    }
  }
}

TEST_CASE("Q4_1 block: y = nibble * d + m, low nibbles first", "[dequant]") {
  // d = 0.5, m = -1: low nibble of byte j is j, high nibble 15 - j.
  uint8_t block[20] = {0x00, 0x38, 0x00, 0xBC};
  for (int j = 0; j < 16; ++j) block[4 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  float y[32];
  dequantize_row(TensorType::kQ4_1, block, y, 32);
  for (int j = 0; j < 16; ++j) {
    CHECK(y[j] == j * 0.5f - 1.0f);
    CHECK(y[j + 16] == (15 - j) * 0.5f - 1.0f);
  }
  CHECK(y[0] == -1.0f);
  CHECK(y[15] == 6.5f);
  CHECK(y[16] == 6.5f);
  CHECK(y[31] == -1.0f);
}

TEST_CASE("Q8_0 block: y = q * d", "[dequant]") {
  uint8_t block[34] = {0x00, 0x34};  // d = 0.25
  const int8_t q[4] = {-128, -1, 0, 127};
  for (int j = 0; j < 32; ++j) block[2 + j] = static_cast<uint8_t>(q[j % 4]);
  float y[32];
  dequantize_row(TensorType::kQ8_0, block, y, 32);
  for (int j = 0; j < 32; ++j) CHECK(y[j] == q[j % 4] * 0.25f);
  CHECK(y[0] == -32.0f);
  CHECK(y[3] == 31.75f);
}

TEST_CASE("Q4_0 block: y = (nibble - 8) * d", "[dequant]") {
  uint8_t block[18] = {0x00, 0x40};  // d = 2
  for (int j = 0; j < 16; ++j) block[2 + j] = static_cast<uint8_t>(j | (j << 4));
  float y[32];
  dequantize_row(TensorType::kQ4_0, block, y, 32);
  for (int j = 0; j < 16; ++j) {
    CHECK(y[j] == (j - 8) * 2.0f);
    CHECK(y[j + 16] == (j - 8) * 2.0f);
  }
}

TEST_CASE("dequantize_row: several blocks, unaligned source, F16 and F32 rows", "[dequant]") {
  // Two Q4_1 blocks at an odd address: block b has d = 1, m = b.
  std::vector<uint8_t> buf(1 + 40);
  uint8_t* src = buf.data() + 1;
  for (int b = 0; b < 2; ++b) {
    uint8_t* blk = src + 20 * b;
    blk[0] = 0x00;
    blk[1] = 0x3C;
    const uint16_t m = b == 0 ? 0x0000 : 0x3C00;
    std::memcpy(blk + 2, &m, 2);
    for (int j = 0; j < 16; ++j) blk[4 + j] = 0x21;  // low 1, high 2
  }
  float y[64];
  dequantize_row(TensorType::kQ4_1, src, y, 64);
  CHECK(y[0] == 1.0f);
  CHECK(y[16] == 2.0f);
  CHECK(y[32] == 2.0f);
  CHECK(y[48] == 3.0f);

  const uint16_t halves[3] = {0x3C00, 0xB800, 0x7BFF};
  float h[3];
  dequantize_row(TensorType::kF16, reinterpret_cast<const uint8_t*>(halves), h, 3);
  CHECK(h[0] == 1.0f);
  CHECK(h[1] == -0.5f);
  CHECK(h[2] == 65504.0f);

  const float floats[2] = {3.25f, -7.0f};
  float f[2];
  dequantize_row(TensorType::kF32, reinterpret_cast<const uint8_t*>(floats), f, 2);
  CHECK(f[0] == 3.25f);
  CHECK(f[1] == -7.0f);
}

TEST_CASE("dequantize_row rejects unsupported types and partial blocks", "[dequant]") {
  uint8_t block[256] = {};
  float y[256];
  CHECK_THROWS_WITH(dequantize_row(TensorType::kQ6_K, block, y, 256),
                    Catch::Contains("Q6_K is not supported"));
  CHECK_THROWS_WITH(dequantize_row(TensorType::kQ8_0, block, y, 31),
                    Catch::Contains("not a multiple of the Q8_0 block size 32"));
  CHECK_THROWS_AS(dequantize_row(static_cast<TensorType>(99), block, y, 32), GgufError);
  CHECK(kvpack::llama::can_dequantize(TensorType::kQ4_1));
  CHECK_FALSE(kvpack::llama::can_dequantize(TensorType::kQ4_K));
}
