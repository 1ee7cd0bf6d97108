// GGUF reader: a hand-written file read back field by field, then truncated and corrupted copies
// that must each end in a GgufError (never a crash or an out-of-bounds read).

#include "gguf.hpp"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "dequant.hpp"
#include "gguf_writer.hpp"
#include "model_fixture.hpp"

using kvpack::llama::GgufError;
using kvpack::llama::GgufFile;
using kvpack::llama::GgufType;
using kvpack::llama::TensorType;
using kvpack::test::GgufWriter;

namespace {

constexpr uint32_t kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
                   kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12;

struct TensorSpec {
  std::string name;
  std::vector<uint64_t> dims;
  uint32_t type;
  std::vector<uint8_t> data;
};

std::vector<uint8_t> f32_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

std::vector<TensorSpec> test_tensors() {
  std::vector<TensorSpec> t;
  t.push_back({"w.f32", {4, 2}, 0, f32_bytes({1, 2, 3, 4, -1, -2, -3, -4})});
  // Q8_0, 2 blocks: d = 0.5 (0x3800), q = i - 16 in block 0, 16 - i in block 1.
  std::vector<uint8_t> q8;
  for (int b = 0; b < 2; ++b) {
    q8.push_back(0x00);
    q8.push_back(0x38);
    for (int i = 0; i < 32; ++i) q8.push_back(static_cast<uint8_t>(b == 0 ? i - 16 : 16 - i));
  }
  t.push_back({"w.q8", {32, 2}, 8, q8});
  // Q4_1, 2 blocks: d = 1 (0x3C00), m = -8 (0xC800), nibbles j and 15 - j.
  std::vector<uint8_t> q41;
  for (int b = 0; b < 2; ++b) {
    q41.insert(q41.end(), {0x00, 0x3C, 0x00, 0xC8});
    for (int j = 0; j < 16; ++j) q41.push_back(static_cast<uint8_t>(j | ((15 - j) << 4)));
  }
  t.push_back({"w.q41", {64}, 3, q41});
  // F16 last, so that the file ends exactly where its data ends.
  t.push_back({"w.f16", {3}, 1, {0x00, 0x3C, 0x00, 0xC0, 0x00, 0x00}});  // 1, -2, 0
  return t;
}

// A valid file holding one value of every metadata type and the tensors above.
GgufWriter make_file(uint64_t alignment, bool alignment_key, uint32_t version = 3) {
  GgufWriter w;
  const std::vector<TensorSpec> tensors = test_tensors();
  w.header(version, tensors.size(), alignment_key ? 16 : 15);
  w.key("general.architecture", kString);
  w.put_string("test");
  w.key("t.u8", kU8);
  w.put<uint8_t>(200);
  w.key("t.i8", kI8);
  w.put<int8_t>(-5);
  w.key("t.u16", kU16);
  w.put<uint16_t>(60000);
  w.key("t.i16", kI16);
  w.put<int16_t>(-30000);
  w.key("t.u32", kU32);
  w.put<uint32_t>(4000000000u);
  w.key("t.i32", kI32);
  w.put<int32_t>(-2000000000);
  w.key("t.f32", kF32);
  w.put<float>(1.5f);
  w.key("t.bool", kBool);
  w.put<uint8_t>(1);
  w.key("t.u64", kU64);
  w.put<uint64_t>(uint64_t{1} << 40);
  w.key("t.i64", kI64);
  w.put<int64_t>(-(int64_t{1} << 40));
  w.key("t.f64", kF64);
  w.put<double>(2.25);
  w.key("t.strings", kArray);
  w.put<uint32_t>(kString);
  w.mark("count:t.strings");
  w.put<uint64_t>(3);
  w.put_string("a");
  w.put_string("");
  w.mark("string:t.strings[2]");
  w.put_string("h\xC3\xA9llo");
  w.key("t.ints", kArray);
  w.put<uint32_t>(kI32);
  w.put<uint64_t>(3);
  for (int32_t v : {1, -2, 3}) w.put<int32_t>(v);
  w.key("t.nested", kArray);
  w.put<uint32_t>(kArray);
  w.put<uint64_t>(2);
  w.put<uint32_t>(kU8);
  w.put<uint64_t>(2);
  w.put<uint8_t>(1);
  w.put<uint8_t>(2);
  w.mark("inner:t.nested[1]");
  w.put<uint32_t>(kU8);
  w.put<uint64_t>(1);
  w.put<uint8_t>(3);
  if (alignment_key) {
    w.key("general.alignment", kU32);
    w.put<uint32_t>(static_cast<uint32_t>(alignment));
  }
  uint64_t offset = 0;
  std::vector<uint64_t> offsets;
  for (const TensorSpec& t : tensors) {
    offset = (offset + alignment - 1) / alignment * alignment;
    offsets.push_back(offset);
    w.tensor_info(t.name, t.dims, t.type, offset);
    offset += t.data.size();
  }
  w.pad_to(alignment);
  w.mark("data");
  const size_t data_start = w.bytes.size();
  for (size_t i = 0; i < tensors.size(); ++i) {
    w.bytes.resize(data_start + offsets[i], 0);
    w.mark("data:" + tensors[i].name);
    w.bytes.insert(w.bytes.end(), tensors[i].data.begin(), tensors[i].data.end());
  }
  return w;
}

GgufFile parse(const std::vector<uint8_t>& bytes) { return GgufFile::parse(bytes); }

// Parses and expects a GgufError whose message contains `needle`.
void expect_error(const std::vector<uint8_t>& bytes, const std::string& needle) {
  try {
    parse(bytes);
    FAIL("parse succeeded; expected an error mentioning '" << needle << "'");
  } catch (const GgufError& e) {
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("gguf: a written file reads back with every metadata type", "[gguf]") {
  for (const uint64_t alignment : {32, 64}) {
    const bool key = alignment != 32;  // 32 is the default: test it without the key
    INFO("alignment " << alignment);
    const GgufWriter w = make_file(alignment, key);
    const GgufFile f = parse(w.bytes);
    CHECK(f.version() == 3);
    CHECK(f.alignment() == alignment);
    CHECK(f.data_offset() == w.marks.at("data"));
    CHECK(f.data_offset() % alignment == 0);
    CHECK(f.metadata().size() == (key ? 16u : 15u));
    CHECK(f.metadata()[0].first == "general.architecture");

    CHECK(f.get_string("general.architecture") == "test");
    CHECK(f.get("t.u8").type == GgufType::kUint8);
    CHECK(f.get_int("t.u8") == 200);
    CHECK(f.get_int("t.i8") == -5);
    CHECK(f.get_int("t.u16") == 60000);
    CHECK(f.get_int("t.i16") == -30000);
    CHECK(f.get_int("t.u32") == 4000000000LL);
    CHECK(f.get_int("t.i32") == -2000000000LL);
    CHECK(f.get_float("t.f32") == 1.5);
    CHECK(f.get_bool("t.bool"));
    CHECK(f.get_int("t.u64") == (int64_t{1} << 40));
    CHECK(f.get_int("t.i64") == -(int64_t{1} << 40));
    CHECK(f.get_float("t.f64") == 2.25);
    CHECK(f.get_float("t.u8") == 200.0);  // integers read as numbers too
    CHECK(f.get_string_array("t.strings") == std::vector<std::string>{"a", "", "h\xC3\xA9llo"});
    CHECK(f.get_int_array("t.ints") == std::vector<int64_t>{1, -2, 3});
    const auto& nested = f.get("t.nested");
    REQUIRE(nested.type == GgufType::kArray);
    REQUIRE(nested.elem_type == GgufType::kArray);
    REQUIRE(nested.items.size() == 2);
    CHECK(nested.items[0].items.size() == 2);
    CHECK(nested.items[1].items[0].u == 3);

    // Wrong-type and missing lookups name the key.
    CHECK_THROWS_WITH(f.get_string("t.u8"), Catch::Contains("t.u8"));
    CHECK_THROWS_WITH(f.get_int("t.f32"), Catch::Contains("t.f32"));
    CHECK_THROWS_WITH(f.get_bool("t.u8"), Catch::Contains("expected bool"));
    CHECK_THROWS_WITH(f.get_int("nope"), Catch::Contains("missing metadata key 'nope'"));
    CHECK_THROWS_WITH(f.get_string_array("t.ints"), Catch::Contains("not an array of strings"));
    CHECK_THROWS_WITH(f.tensor("nope"), Catch::Contains("missing tensor 'nope'"));

    REQUIRE(f.tensors().size() == 4);
    const auto& a = f.tensor("w.f32");
    CHECK(a.dims == std::vector<int64_t>{4, 2});
    CHECK(a.n_elements == 8);
    CHECK(a.row_length() == 4);
    CHECK(a.n_rows() == 2);
    CHECK(a.type == TensorType::kF32);
    CHECK(a.offset % alignment == 0);
    float values[8];
    kvpack::llama::dequantize_row(a.type, f.tensor_data(a), values, 8);
    CHECK(values[0] == 1.0f);
    CHECK(values[7] == -4.0f);

    const auto& q8 = f.tensor("w.q8");
    CHECK(q8.n_bytes == 68);
    CHECK(f.data_offset() + q8.offset == w.marks.at("data:w.q8"));
    float q8v[64];
    kvpack::llama::dequantize_row(q8.type, f.tensor_data(q8), q8v, 64);
    CHECK(q8v[0] == -8.0f);   // (0 - 16) * 0.5
    CHECK(q8v[31] == 7.5f);   // (31 - 16) * 0.5
    CHECK(q8v[32] == 8.0f);   // (16 - 0) * 0.5
    CHECK(q8v[63] == -7.5f);  // (16 - 31) * 0.5

    const auto& q41 = f.tensor("w.q41");
    CHECK(q41.n_bytes == 40);
    float q41v[64];
    kvpack::llama::dequantize_row(q41.type, f.tensor_data(q41), q41v, 64);
    CHECK(q41v[0] == -8.0f);   // nibble 0 * 1 - 8
    CHECK(q41v[15] == 7.0f);   // nibble 15
    CHECK(q41v[16] == 7.0f);   // high nibble of byte 0: 15
    CHECK(q41v[31] == -8.0f);  // high nibble of byte 15: 0

    const auto& f16 = f.tensor("w.f16");
    float hv[3];
    kvpack::llama::dequantize_row(f16.type, f.tensor_data(f16), hv, 3);
    CHECK(hv[0] == 1.0f);
    CHECK(hv[1] == -2.0f);
    CHECK(hv[2] == 0.0f);
  }
}

TEST_CASE("gguf: version 2 is accepted, the file opens from disk", "[gguf]") {
  const GgufWriter w = make_file(32, false, 2);
  CHECK(parse(w.bytes).version() == 2);

  const std::string path = "kvpack_gguf_test_" + std::to_string(::getpid()) + ".gguf";
  {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(w.bytes.data()), w.bytes.size());
  }
  const GgufFile f = GgufFile::open(path);
  CHECK(f.file_size() == w.bytes.size());
  CHECK(f.tensors().size() == 4);
  std::remove(path.c_str());
  CHECK_THROWS_AS(GgufFile::open(path), GgufError);  // gone now
}

TEST_CASE("gguf: every truncation throws", "[gguf]") {
  const GgufWriter w = make_file(64, true);
  // The last tensor ends at the end of the file, so every proper prefix is invalid.
  for (size_t size = 0; size < w.bytes.size(); ++size) {
    INFO("truncated to " << size << " of " << w.bytes.size() << " bytes");
    std::vector<uint8_t> cut(w.bytes.begin(), w.bytes.begin() + size);
    CHECK_THROWS_AS(parse(cut), GgufError);
  }
}

TEST_CASE("gguf: corrupted headers throw errors that say what is wrong", "[gguf]") {
  const GgufWriter base = make_file(64, true);
  auto corrupt = [&](auto&& edit) {
    GgufWriter w = base;
    edit(w);
    return w.bytes;
  };

  expect_error(corrupt([](GgufWriter& w) { w.bytes[0] = 'X'; }), "bad magic");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint32_t>("version", 1); }),
               "unsupported version 1");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint32_t>("version", 4); }),
               "unsupported version 4");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint64_t>("tensor_count", uint64_t{1} << 60); }),
               "tensor count");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint64_t>("kv_count", ~uint64_t{0}); }),
               "metadata count");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint64_t>("key:t.u8", uint64_t{1} << 62); }),
               "string length");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint64_t>("key:t.u8", 1 << 20); }),
               "runs past the end");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint32_t>("type:t.u8", 13); }),
               "unknown value type 13 for key 't.u8'");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint32_t>("value:t.strings", 77); }),
               "unknown array element type 77");
  expect_error(
      corrupt([](GgufWriter& w) { w.patch<uint64_t>("count:t.strings", uint64_t{1} << 58); }),
      "array length");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint64_t>("string:t.strings[2]", 1000000); }),
               "runs past the end");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint8_t>("value:t.bool", 2); }),
               "neither 0 nor 1");
  expect_error(
      corrupt([](GgufWriter& w) { w.patch<uint64_t>("inner:t.nested[1]", uint64_t{1} << 50, 4); }),
      "array length");
  // Duplicate key: rename t.i8 to t.u8 (same length).
  expect_error(corrupt([](GgufWriter& w) { w.bytes[w.marks.at("key:t.i8") + 8 + 2] = 'u'; }),
               "duplicate metadata key 't.u8'");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint32_t>("value:general.alignment", 48); }),
               "not a power of two");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint32_t>("value:general.alignment", 0); }),
               "not a power of two");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint32_t>("type:general.alignment", kI32); }),
               "expected u32");

  expect_error(corrupt([](GgufWriter& w) { w.patch<uint32_t>("n_dims:w.f32", 0); }),
               "tensor 'w.f32' has 0 dimensions");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint32_t>("n_dims:w.f32", 5); }),
               "tensor 'w.f32' has 5 dimensions");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint64_t>("dims:w.f32", 0); }),
               "dimension 0 is 0");
  expect_error(corrupt([](GgufWriter& w) {
                 w.patch<uint64_t>("dims:w.f32", uint64_t{1} << 40);
                 w.patch<uint64_t>("dims:w.f32", uint64_t{1} << 40, 8);
               }),
               "overflows");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint64_t>("dims:w.f32", ~uint64_t{0}); }),
               "expected a positive size");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint32_t>("ttype:w.f32", 4); }),
               "tensor 'w.f32' has unknown type 4");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint32_t>("ttype:w.f32", 1000); }),
               "unknown type 1000");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint64_t>("dims:w.q8", 48); }),
               "not a multiple of the Q8_0 block size");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint64_t>("offset:w.f16", 1 << 20); }),
               "tensor 'w.f16' data");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint64_t>("offset:w.f16", ~uint64_t{0} - 63); }),
               "runs past the end of the data section");
  expect_error(corrupt([](GgufWriter& w) { w.patch<uint64_t>("offset:w.f32", 8); }),
               "not a multiple of the alignment");
  // Duplicate tensor name: rename "w.f32" to "w.q41" in place (same length).
  expect_error(corrupt([](GgufWriter& w) {
                 std::memcpy(w.bytes.data() + w.marks.at("tensor:w.f32") + 8, "w.q41", 5);
               }),
               "duplicate tensor name 'w.q41'");
  // Everything fine but the data section cut short by one byte.
  expect_error(corrupt([](GgufWriter& w) { w.bytes.pop_back(); }), "runs past the end");
}

TEST_CASE("gguf: random byte corruption never crashes", "[gguf]") {
  const GgufWriter base = make_file(32, false);
  const size_t header_end = base.marks.at("data");
  std::mt19937 rng(12345);
  int parsed = 0, rejected = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::vector<uint8_t> bytes = base.bytes;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) {
      const size_t at = rng() % header_end;
      bytes[at] = static_cast<uint8_t>(rng() % 3 == 0 ? 0xFF : rng());
    }
    try {
      const GgufFile f = parse(bytes);
      // Whatever parsed must describe tensors that lie inside the file.
      for (const auto& t : f.tensors()) {
        CHECK(f.data_offset() + t.offset + t.n_bytes <= f.file_size());
      }
      ++parsed;
    } catch (const GgufError&) {
      ++rejected;
    }
  }
  CHECK(parsed + rejected == 3000);
  CHECK(rejected > 0);
}

TEST_CASE("gguf: the reference model file", "[gguf][real-model]") {
  const GgufFile* f = kvpack::test::reference_gguf();
  if (!f) return;
  CHECK(f->version() == 3);
  CHECK(f->tensors().size() == 272);
  CHECK(f->metadata().size() == 33);
  CHECK(f->get_string("general.architecture") == "llama");
  CHECK(f->get_int("llama.block_count") == 30);
  CHECK(f->get_int("llama.attention.head_count") == 9);
  CHECK(f->get_int("llama.attention.head_count_kv") == 3);
  CHECK(f->get_float("llama.rope.freq_base") == 100000.0);
  CHECK(f->get_string("tokenizer.ggml.pre") == "smollm");
  CHECK(f->get_string_array("tokenizer.ggml.tokens").size() == 49152);
  // The types this file uses, all of which the loader dequantizes.
  int f32 = 0, q41 = 0, q80 = 0;
  for (const auto& t : f->tensors()) {
    f32 += t.type == TensorType::kF32;
    q41 += t.type == TensorType::kQ4_1;
    q80 += t.type == TensorType::kQ8_0;
    CHECK(kvpack::llama::can_dequantize(t.type));
  }
  CHECK(f32 == 61);
  CHECK(q41 == 210);
  CHECK(q80 == 1);
  CHECK(f->tensor("token_embd.weight").type == TensorType::kQ8_0);
  CHECK(f->find_tensor("output.weight") == nullptr);  // tied to the embedding
}
