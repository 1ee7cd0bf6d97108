// KIVI blocks in pages (docs/page_formats.md, "KIVI blocks"): the documented layout, page-size
// invariance, sequences of one pool, and refusal when the pool runs out.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <kvpack/kvpack.hpp>
#include <memory>
#include <vector>

#include "test_util.hpp"

using namespace kvpack_test;
using kvpack::ActivationView;
using kvpack::Half;
using kvpack::OutputView;
using kvpack::PageOptions;
using kvpack::PagePool;
using kvpack::Quantize;

namespace {

const kvpack::ModelShape kShape{2, 6, 2, 64, {}};  // 2 layers, GQA group 3, head_dim 64

PageOptions page_tokens(int n, std::shared_ptr<PagePool> pool = nullptr) {
  PageOptions o;
  o.page_tokens = n;
  o.pool = std::move(pool);
  return o;
}

/// Output of `cache.attend` for `n` query tokens ending at position `last`.
template <class Cache>
std::vector<float> attend(const Cache& cache, int layer, int64_t n, int64_t last, uint32_t seed) {
  const auto q = random_values(n * kShape.q_heads * kShape.head_dim, seed);
  std::vector<float> out(q.size());
  cache.attend(layer, ActivationView::nhd(q.data(), n, kShape.q_heads, kShape.head_dim),
               iota_positions(n, last - n + 1),
               OutputView::nhd(out.data(), n, kShape.q_heads, kShape.head_dim));
  return out;
}

/// Element i of a block read from its bytes as docs/page_formats.md describes it: fp16 scale at
/// 0, fp16 min at 2, codes from 4 (4-bit: element 2j in the low nibble of byte j).
float block_value4(const uint8_t* block, int i) {
  uint16_t scale, min;
  std::memcpy(&scale, block, 2);
  std::memcpy(&min, block + 2, 2);
  const uint8_t byte = block[4 + i / 2];
  const int code = i % 2 == 0 ? byte & 0x0F : byte >> 4;
  return static_cast<float>(code) * kvpack::to_float(Half{scale}) + kvpack::to_float(Half{min});
}

}  // namespace

TEST_CASE("KIVI pages: an attention written only from docs/page_formats.md matches attend()",
          "[pages][quantize]") {
  // page_tokens 64: two key groups of 32 per page; 300 tokens, residual 64 -> 224 quantized
  // (7 groups: the last page holds one).
  kvpack::KVCache<Quantize> cache(kShape, Quantize(4, 32, 64), page_tokens(64));
  fill_layer(cache, 0, 300, 41);
  cache.compress();
  const auto out = attend(cache, 0, 1, 299, 42);
  const auto q = random_values(kShape.q_heads * kShape.head_dim, 42);
  const int d = kShape.head_dim, g = kShape.group_size();
  const std::size_t block = 4 + 32 * 4 / 8;
  for (int h = 0; h < kShape.kv_heads; ++h) {
    const auto pages = cache.kivi_pages(0, h);
    REQUIRE(pages.page_tokens == 64);
    REQUIRE(pages.quantized == 224);
    REQUIRE(pages.tokens == 300);
    REQUIRE(cache.page_pool()->page_bytes() == 2 * 64 * d / 32 * block);
    const int P = pages.page_tokens, G = pages.group;
    std::vector<float> k(pages.tokens * d), v(pages.tokens * d);
    std::vector<int64_t> key_pos(pages.tokens);
    for (int64_t t = 0; t < pages.quantized; ++t) {
      const auto* page =
          reinterpret_cast<const uint8_t*>(cache.page_pool()->data(pages.page_ids[t / P]));
      for (int c = 0; c < d; ++c) {
        const uint8_t* kb = page + (((t % P) / G) * d + c) * block;
        k[t * d + c] = block_value4(kb, static_cast<int>(t % G));
        const uint8_t* vb = page + ((P / G) * d + (t % P) * (d / G) + c / G) * block;
        v[t * d + c] = block_value4(vb, c % G);
      }
    }
    for (int64_t t = pages.quantized; t < pages.tokens; ++t) {
      for (int c = 0; c < d; ++c) {
        k[t * d + c] = kvpack::to_float(pages.residual_k[(t - pages.quantized) * d + c]);
        v[t * d + c] = kvpack::to_float(pages.residual_v[(t - pages.quantized) * d + c]);
      }
    }
    for (int64_t t = 0; t < pages.tokens; ++t) key_pos[t] = pages.positions[t];
    for (int j = 0; j < g; ++j) {
      const auto ref = reference_attention(q.data() + (h * g + j) * d, k, v, key_pos, 299, d);
      CHECK(max_relative_row_error(out.data() + (h * g + j) * d, ref) < 1e-5);
    }
  }
}

TEST_CASE("KIVI pages: attend is bit-identical for every page size, and pages hold whole groups",
          "[pages][quantize]") {
  struct Case {
    int bits, group;
  };
  for (const Case c : {Case{4, 32}, Case{2, 64}, Case{8, 16}}) {
    INFO("bits " << c.bits << " group " << c.group);
    // The decode kernel's tiles hold 128 tokens: pages of 16 to 64 tokens (P = max(page_tokens,
    // group)) put a tile in several pages, whose value blocks are copied into one run; pages of
    // 1,024 hold whole tiles but where the key split of a 4,500-token decode (2,250 each) cuts
    // one. The results must not differ.
    std::vector<float> first_decode, first_prefill;
    for (int pt : {16, 1, 256, 1024}) {
      INFO("page_tokens " << pt);
      kvpack::KVCache<Quantize> cache(kShape, Quantize(c.bits, c.group, 128), page_tokens(pt));
      fill_layer(cache, 1, 4500, 52);
      cache.compress();
      const int64_t quantized = (4500 - 128) / c.group * c.group;
      const int64_t P = std::max(pt, c.group);
      CHECK(cache.kivi_pages(1, 1).quantized == quantized);
      CHECK(cache.page_pool()->pages_in_use() ==
            static_cast<std::size_t>(2 * ((quantized + P - 1) / P)));
      const auto decode = attend(cache, 1, 1, 4499, 53);
      const auto prefill = attend(cache, 1, 5, 4499, 54);
      if (first_decode.empty()) {
        first_decode = decode;
        first_prefill = prefill;
      } else {
        CHECK(decode == first_decode);
        CHECK(prefill == first_prefill);
      }
      cache.truncate(quantized / 2 / c.group * c.group - 1);  // drops whole groups and pages
      const int64_t kept = quantized / 2 / c.group * c.group;
      CHECK(cache.page_pool()->pages_in_use() ==
            static_cast<std::size_t>(2 * ((kept + P - 1) / P)));
    }
  }
}

TEST_CASE("KIVI pages: sequences of one batch share the pool and reuse what others free",
          "[pages][quantize][batch]") {
  kvpack::KVCacheBatch<Quantize> batch(kShape, Quantize(4, 32, 64));
  auto& a = batch.add(1);
  fill_layer(a, 0, 500, 61);
  fill_layer(a, 1, 500, 62);
  a.compress();  // 436 -> 416 quantized per head: 13 pages of 32 tokens
  const auto pool = batch.page_pool();
  CHECK(pool->pages_in_use() == 4 * 13);
  auto& b = batch.fork(1, 2);
  CHECK(pool->pages_in_use() == 2 * 4 * 13);
  CHECK(attend(b, 1, 1, 499, 63) == attend(a, 1, 1, 499, 63));
  const std::size_t reserved = pool->reserved_bytes();
  batch.remove(1);
  CHECK(pool->pages_in_use() == 4 * 13);
  auto& c = batch.add(3);
  fill_layer(c, 0, 500, 64);
  fill_layer(c, 1, 500, 65);
  c.compress();
  CHECK(pool->pages_in_use() == 2 * 4 * 13);
  CHECK(pool->reserved_bytes() == reserved);  // 3 took the pages 1 gave back
}

TEST_CASE("KIVI pages: a pool that runs out refuses compress() and changes nothing",
          "[pages][quantize][errors]") {
  const std::size_t page = kvpack::KVCache<Quantize>::page_bytes(kShape, Quantize(4, 32, 64), 16);
  // Room for 5 pages; one layer of 500 tokens needs 2 heads x 13.
  std::vector<uint8_t> memory(6 * page);
  void* aligned = memory.data() + (64 - reinterpret_cast<uintptr_t>(memory.data()) % 64) % 64;
  auto pool = std::make_shared<PagePool>(aligned, 5 * page, page);
  kvpack::KVCache<Quantize> cache(kShape, Quantize(4, 32, 64), page_tokens(16, pool));
  fill_layer(cache, 0, 500, 71);
  const std::size_t bytes = cache.bytes();
  const auto before = attend(cache, 0, 1, 499, 72);
  CHECK_THROWS_AS(cache.compress(), kvpack::error);
  CHECK(cache.bytes() == bytes);
  CHECK(pool->pages_in_use() == 0);
  CHECK(attend(cache, 0, 1, 499, 72) == before);
  CHECK(cache.kivi_pages(0, 0).quantized == 0);
  // A pool whose pages are too small for this format is refused up front.
  auto small = std::make_shared<PagePool>(page - 64, 1);
  CHECK_THROWS_WITH(
      (kvpack::KVCache<Quantize>(kShape, Quantize(4, 32, 64), page_tokens(16, small))),
      Catch::Contains("pool page_bytes"));
}
