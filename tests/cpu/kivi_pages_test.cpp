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

TEST_CASE(
    "KIVI pages: Compose<Evict, Quantize> refuses compress() before evicting when the "
    "pool would run out",
    "[pages][quantize][errors]") {
  // The eviction keeps 250 of 500 tokens a head; quantizing them (residual 64: 160 tokens) takes
  // 5 KIVI pages of 32 tokens a head, 20 in all. A caller-memory pool of 19 pages refuses before
  // anything is evicted (the cache answers as before); one of 20 pages is enough, and the result
  // equals a private pool's.
  using Evict = kvpack::Compose<kvpack::L2NormEvict, Quantize>;
  const Evict policy(kvpack::L2NormEvict(kvpack::Budget::ratio(0.5).with_protection(4, 0), 0),
                     Quantize(4, 32, 64));
  const std::size_t page = kvpack::KVCache<Evict>::page_bytes(kShape, policy, 16);
  std::vector<uint8_t> memory(25 * page);
  void* aligned = memory.data() + (64 - reinterpret_cast<uintptr_t>(memory.data()) % 64) % 64;
  kvpack::KVCache<Evict> reference(kShape, policy);
  fill_layer(reference, 0, 500, 91);
  fill_layer(reference, 1, 500, 92);
  reference.compress();
  for (std::size_t pages : {std::size_t{19}, std::size_t{20}}) {
    INFO(pages << " pages");
    auto pool = std::make_shared<PagePool>(aligned, pages * page, page);
    kvpack::KVCache<Evict> cache(kShape, policy, page_tokens(16, pool));
    fill_layer(cache, 0, 500, 91);
    fill_layer(cache, 1, 500, 92);
    const std::size_t bytes = cache.bytes();
    const auto before = attend(cache, 1, 1, 499, 93);
    if (pages == 19) {
      CHECK_THROWS_WITH(cache.compress(), Catch::Contains("pages the pool can hand out = 19") &&
                                              Catch::Contains(">= 20"));
      CHECK(cache.bytes() == bytes);
      CHECK(cache.tokens(1, 1) == 500);
      CHECK(pool->pages_in_use() == 0);
      CHECK(attend(cache, 1, 1, 499, 93) == before);
    } else {
      cache.compress();
      CHECK(pool->pages_in_use() == 20);
      CHECK(cache.bytes() == reference.bytes());
      CHECK(attend(cache, 1, 1, 499, 93) == attend(reference, 1, 1, 499, 93));
    }
  }
}

TEST_CASE("attend_paged (KIVI): caller-owned pages of a batch match attend()",
          "[pages][quantize][batch]") {
  using Evict = kvpack::Compose<kvpack::L2NormEvict, Quantize>;
  // Exact key scores, then from an int8 query (Quantize::int8_query = PagedKivi::int8_query).
  for (const bool int8 : {false, true}) {
    const auto policy = [int8](double keep) {
      Quantize quantize(4, 32, 32);
      quantize.int8_query = int8;
      return Evict(kvpack::L2NormEvict(kvpack::Budget::ratio(keep).with_protection(4, 0), 0),
                   quantize);
    };
    const int d = kShape.head_dim, kvh = kShape.kv_heads, layer = 1;
    // Sequence 0 keeps everything (positions 0..699), 1 loses half (positions with gaps), 2 holds
    // residual tokens only; 1 is asked with a 20-token chunk (the dequantizing path), the others
    // with one decode row (the fused kernels).
    const std::vector<int64_t> lengths{700, 300, 20}, rows{1, 20, 1};
    for (const auto isa : supported_isas()) {
      INFO("int8_query " << int8 << ", instruction set " << kvpack::isa_name(isa));
      IsaScope scope(isa);
      kvpack::KVCacheBatch<Evict> batch(kShape, policy(1.0));
      for (int b = 0; b < 3; ++b) {
        auto& s = batch.add(b, policy(b == 1 ? 0.5 : 1.0));
        for (int l = 0; l < kShape.layers; ++l) fill_layer(s, l, lengths[b], 80 + 2 * b + l);
        s.compress();
      }
      const auto evicted = batch.sequence(1).kivi_pages(layer, 0);
      REQUIRE(evicted.tokens == 150);
      REQUIRE(evicted.positions[149] != 149);  // gaps

      // The caller's copy of every list's pages, stored in reverse order (ids are arbitrary).
      const auto& pool = *batch.page_pool();
      std::vector<const uint8_t*> sources;
      std::vector<int32_t> indptr{0}, indices;
      std::vector<int64_t> quantized, residual;
      std::vector<const Half*> rk, rv;
      std::vector<const int32_t*> positions;
      for (int b = 0; b < 3; ++b) {
        for (int h = 0; h < kvh; ++h) {
          const auto p = batch.sequence(b).kivi_pages(layer, h);
          for (int64_t j = 0; j * p.page_tokens < p.quantized; ++j) {
            sources.push_back(reinterpret_cast<const uint8_t*>(pool.data(p.page_ids[j])));
          }
          indptr.push_back(static_cast<int32_t>(sources.size()));
          quantized.push_back(p.quantized);
          residual.push_back(p.tokens - p.quantized);
          rk.push_back(p.residual_k);
          rv.push_back(p.residual_v);
          positions.push_back(p.positions);
        }
      }
      const std::size_t page_bytes = pool.page_bytes();
      std::vector<uint8_t> memory(sources.size() * page_bytes);
      for (std::size_t j = 0; j < sources.size(); ++j) {
        const std::size_t slot = sources.size() - 1 - j;
        std::memcpy(memory.data() + slot * page_bytes, sources[j], page_bytes);
        indices.push_back(static_cast<int32_t>(slot));
      }
      kvpack::PagedKivi kv;
      kv.data = memory.data();
      kv.page_bytes = page_bytes;
      kv.num_pages = static_cast<int64_t>(sources.size());
      kv.bits = 4;
      kv.group = 32;
      kv.page_tokens = batch.sequence(0).kivi_pages(layer, 0).page_tokens;
      kv.kv_heads = kvh;
      kv.head_dim = d;
      kv.batch = 3;
      kv.indptr = indptr.data();
      kv.indices = indices.data();
      kv.quantized = quantized.data();
      kv.residual_tokens = residual.data();
      kv.residual_k = rk.data();
      kv.residual_v = rv.data();
      kv.positions = positions.data();
      kv.int8_query = int8;

      std::vector<float> q, expected;
      std::vector<int64_t> qpos;
      std::vector<int32_t> qo{0};
      for (int b = 0; b < 3; ++b) {
        const auto part = random_values(rows[b] * kShape.q_heads * d, 90 + b);
        q.insert(q.end(), part.begin(), part.end());
        const auto want = attend(batch.sequence(b), layer, rows[b], lengths[b] - 1, 90 + b);
        expected.insert(expected.end(), want.begin(), want.end());
        const auto p = iota_positions(rows[b], lengths[b] - rows[b]);
        qpos.insert(qpos.end(), p.begin(), p.end());
        qo.push_back(qo.back() + static_cast<int32_t>(rows[b]));
      }
      const int64_t total = qo.back();
      const auto qv = ActivationView::nhd(q.data(), total, kShape.q_heads, d);
      std::vector<float> out(expected.size(), 0.0f);
      const auto ov = OutputView::nhd(out.data(), total, kShape.q_heads, d);
      kvpack::cpu::attend_paged(kv, qo.data(), qv, qpos, ov);
      CHECK(max_abs_difference(out, expected) < 1e-5);

      // Without positions key t sits at position t: right for sequence 0 alone.
      kvpack::PagedKivi first = kv;
      first.batch = 1;
      first.positions = nullptr;
      std::vector<int32_t> qo0{0, 1};
      std::vector<float> out0(static_cast<std::size_t>(kShape.q_heads) * d);
      kvpack::cpu::attend_paged(
          first, qo0.data(), ActivationView::nhd(q.data(), 1, kShape.q_heads, d),
          kvpack::Positions(qpos.data(), 1), OutputView::nhd(out0.data(), 1, kShape.q_heads, d));
      CHECK(std::equal(out0.begin(), out0.end(), out.begin()));

      // A bad table is refused and nothing is written.
      std::fill(out.begin(), out.end(), 0.0f);
      const auto refused = [&](kvpack::PagedKivi broken) {
        return kvpack::cpu::attend_paged(broken, qo.data(), qv, qpos, ov);
      };
      kvpack::PagedKivi broken = kv;
      std::vector<int32_t> bad_indices = indices;
      bad_indices[0] = static_cast<int32_t>(kv.num_pages);
      broken.indices = bad_indices.data();
      CHECK_THROWS_WITH(refused(broken), Catch::Contains("page id"));
      broken = kv;
      std::vector<int64_t> bad_quantized = quantized;
      bad_quantized[0] += 1;
      broken.quantized = bad_quantized.data();
      CHECK_THROWS_WITH(refused(broken), Catch::Contains("quantized"));
      bad_quantized[0] = quantized[0] + 10 * 32 * 32;  // more blocks than the list's pages hold
      CHECK_THROWS_WITH(refused(broken), Catch::Contains("quantized"));
      broken = kv;
      broken.page_bytes = kv.format_page_bytes() - 64;
      CHECK_THROWS_WITH(refused(broken), Catch::Contains("page_bytes"));
      broken = kv;
      broken.bits = 3;
      CHECK_THROWS_WITH(refused(broken), Catch::Contains("bits/group = 3/32"));
      broken = kv;
      std::vector<const Half*> no_residual = rk;
      no_residual[0] = nullptr;
      broken.residual_k = no_residual.data();
      CHECK_THROWS_WITH(refused(broken), Catch::Contains("residual"));
      std::vector<int64_t> early = qpos;
      early[0] = -1;
      CHECK_THROWS_WITH(kvpack::cpu::attend_paged(kv, qo.data(), qv, early, ov),
                        Catch::Contains("q position"));
      // Positions tagged as device memory are never read on the host.
      CHECK_THROWS_WITH(
          kvpack::cpu::attend_paged(kv, qo.data(), qv,
                                    kvpack::Positions::device(qpos.data(), qpos.size()), ov),
          Catch::Contains("device memory"));
      CHECK(std::all_of(out.begin(), out.end(), [](float x) { return x == 0.0f; }));
    }
  }
}
