// Pages, the page pool, sequences in one batch, batched attention and attention over
// caller-owned page tables (docs/page_formats.md).
#include <catch2/catch.hpp>
#include <cstring>
#include <kvpack/kvpack.hpp>
#include <memory>
#include <vector>

#include "test_util.hpp"

using namespace kvpack_test;
using kvpack::ActivationView;
using kvpack::Half;
using kvpack::OutputView;
using kvpack::PagePool;

namespace {

const kvpack::ModelShape kShape{2, 6, 2, 64, {}};  // 2 layers, GQA group 3, head_dim 64

// Random decode/prefill queries for positions [first, first + n).
struct Queries {
  std::vector<float> q;
  std::vector<int64_t> pos;
  Queries(int64_t n, int64_t first, uint32_t seed)
      : q(random_values(n * kShape.q_heads * kShape.head_dim, seed)),
        pos(iota_positions(n, first)) {}
  ActivationView view() const {
    return ActivationView::nhd(q.data(), static_cast<int64_t>(pos.size()), kShape.q_heads,
                               kShape.head_dim);
  }
  std::size_t out_size() const { return q.size(); }
};

std::vector<float> attend(const kvpack::KVCache<kvpack::Identity>& cache, int layer,
                          const Queries& qs) {
  std::vector<float> out(qs.out_size());
  cache.attend(layer, qs.view(), qs.pos,
               OutputView::nhd(out.data(), static_cast<int64_t>(qs.pos.size()), kShape.q_heads,
                               kShape.head_dim));
  return out;
}

int64_t pages_of(int64_t tokens, int page_tokens) {
  return (tokens + page_tokens - 1) / page_tokens;
}

}  // namespace

TEST_CASE("page pool: allocate, release, reuse, limits", "[pages]") {
  SECTION("owned") {
    PagePool pool(256, 4, 8);
    std::vector<PagePool::Page> pages;
    for (int i = 0; i < 8; ++i) pages.push_back(pool.allocate());
    CHECK(pool.pages_in_use() == 8);
    for (const auto& p : pages) {
      CHECK(reinterpret_cast<std::uintptr_t>(p.data) % PagePool::kAlignment == 0);
      CHECK(pool.data(p.id) == p.data);
      std::memset(p.data, 0x5A, 256);  // every byte of every page is usable (ASan checks)
    }
    const std::size_t reserved = pool.reserved_bytes();
    CHECK_THROWS_WITH(pool.allocate(),
                      Catch::Contains("all 8 pages") && Catch::Contains("max_pages"));
    CHECK(pool.pages_in_use() == 8);
    CHECK(pool.reserved_bytes() == reserved);  // a refused allocate changes nothing
    pool.release(pages[3].id);
    CHECK_THROWS_WITH(pool.release(pages[3].id), Catch::Contains("a page this pool handed out"));
    CHECK_THROWS_WITH(pool.release(-1), Catch::Contains("a page this pool handed out"));
    CHECK_THROWS_WITH(pool.release(99), Catch::Contains("a page this pool handed out"));
    const auto again = pool.allocate();  // LIFO: the page just released
    CHECK(again.id == pages[3].id);
    for (int i = 0; i < 8; ++i) pool.release(pages[i].id);
    CHECK(pool.pages_in_use() == 0);
    CHECK(pool.release_unused() == 8 * 256);
    CHECK(pool.free_pages() == 0);
    CHECK(pool.allocate().data != nullptr);  // grows again after release_unused
  }
  SECTION("owned chunks double from one page up to pages_per_chunk, contiguous inside") {
    PagePool pool(64, 8);
    std::vector<PagePool::Page> pages;
    const auto held = [&] { return pool.pages_in_use() + pool.free_pages(); };
    for (std::size_t n : {1, 3, 7, 15, 23, 31}) {  // chunks 1, 2, 4, 8, 8, 8
      while (pages.size() < n) pages.push_back(pool.allocate());
      CHECK(held() == n);
    }
    for (std::size_t i = 16; i < 23; ++i) CHECK(pages[i].data == pages[15].data + (i - 15) * 64);
    for (std::size_t i = 15; i < 23; ++i) pool.release(pages[i].id);  // the first chunk of 8
    pool.release(pages[23].id);  // one page of the next chunk: that chunk stays
    CHECK(pool.release_unused() == 8 * 64);
    CHECK(held() == 23);
    for (std::size_t i = 15; i < 23; ++i) pages[i] = pool.allocate();  // the freed slot again
    CHECK(held() == 31);
    for (std::size_t i = 15; i < 23; ++i) CHECK(pool.data(pages[i].id) == pages[i].data);
  }
  SECTION("caller memory") {
    alignas(64) static unsigned char memory[5 * 128 + 17];
    PagePool pool(memory, sizeof(memory), 128);
    CHECK(pool.caller_memory());
    CHECK(pool.free_pages() == 5);
    for (int i = 0; i < 5; ++i) {
      const auto p = pool.allocate();
      CHECK(p.data >= reinterpret_cast<std::byte*>(memory));
      CHECK(p.data + 128 <= reinterpret_cast<std::byte*>(memory) + sizeof(memory));
    }
    CHECK_THROWS_WITH(pool.allocate(), Catch::Contains("caller memory"));
    CHECK(pool.release_unused() == 0);
  }
  SECTION("bad arguments") {
    alignas(64) static unsigned char memory[256];
    CHECK_THROWS_WITH(PagePool(100), Catch::Contains("page_bytes = 100"));
    CHECK_THROWS_WITH(PagePool(0), Catch::Contains("page_bytes = 0"));
    CHECK_THROWS_WITH(PagePool(128, 0), Catch::Contains("pages_per_chunk = 0"));
    CHECK_THROWS_WITH(PagePool(memory + 1, 200, 64), Catch::Contains("64-byte aligned"));
    CHECK_THROWS_WITH(PagePool(memory, 63, 64), Catch::Contains("room for 1"));
  }
}

TEST_CASE("pages: attend is bit-identical for every page size, and pages follow the tokens",
          "[pages]") {
  for (const auto isa : supported_isas()) {
    IsaScope scope(isa);
    std::vector<std::vector<float>> outs;
    for (int pt : {1, 4, 16, 128, 4096}) {
      kvpack::PageOptions options;
      options.page_tokens = pt;
      kvpack::KVCache<kvpack::Identity> cache(kShape, {}, options);
      fill_layer(cache, 0, 3000, 7, 1000);
      const Queries decode(1, 2999, 11), prefill(40, 2960, 12);
      auto a = attend(cache, 0, decode), b = attend(cache, 0, prefill);
      a.insert(a.end(), b.begin(), b.end());
      outs.push_back(a);
      const auto pages = cache.pages(0, 1);
      CHECK(pages.page_tokens == pt);
      CHECK(pages.tokens == 3000);
      CHECK(cache.page_pool()->pages_in_use() ==
            static_cast<std::size_t>(kShape.kv_heads * pages_of(3000, pt)));
    }
    for (std::size_t i = 1; i < outs.size(); ++i) CHECK(outs[i] == outs[0]);
  }
}

TEST_CASE(
    "pages: eviction and truncate return whole pages, and a cache in caller memory refuses "
    "an append it cannot hold and stays as it was",
    "[pages][errors]") {
  kvpack::PageOptions options;
  options.page_tokens = 16;
  auto pool =
      std::make_shared<PagePool>(kvpack::detail::dense_page_bytes<Half>(16, kShape.head_dim), 8);
  options.pool = pool;
  kvpack::KVCache<kvpack::L2NormEvict> cache(
      kShape, kvpack::L2NormEvict(kvpack::Budget::ratio(0.25), 0), options);
  fill_layer(cache, 0, 1000, 3);
  fill_layer(cache, 1, 1000, 4);
  const std::size_t before = pool->pages_in_use();
  CHECK(before == static_cast<std::size_t>(2 * kShape.kv_heads * pages_of(1000, 16)));
  cache.compress();
  std::size_t expected = 0;
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < kShape.kv_heads; ++h) expected += pages_of(cache.tokens(l, h), 16);
  }
  CHECK(pool->pages_in_use() == expected);
  CHECK(expected < before / 3);

  // Caller memory with room for 10 pages: 2 heads × 4 pages fit, then 2 × 2 more do not.
  alignas(64) static unsigned char memory[10 * 4096];
  auto small = std::make_shared<PagePool>(memory, sizeof(memory), 4096);
  options.pool = small;
  kvpack::KVCache<kvpack::Identity> tight(kShape, {}, options);
  fill_layer(tight, 0, 64, 5);
  const auto held = tight.materialize(0);
  const std::size_t bytes = tight.bytes();
  const auto k = random_values(32 * kShape.kv_heads * kShape.head_dim, 6);
  const auto pos = iota_positions(32, 64);
  const auto view = ActivationView::nhd(k.data(), 32, kShape.kv_heads, kShape.head_dim);
  CHECK_THROWS_WITH(tight.append(0, view, view, pos), Catch::Contains("caller memory"));
  CHECK(tight.bytes() == bytes);
  CHECK(tight.appended(0) == 64);
  CHECK(small->pages_in_use() == 8);
  CHECK(tight.materialize(0).heads[1].k == held.heads[1].k);
  tight.truncate(31);  // rollback frees the pages past the cut
  CHECK(small->pages_in_use() == 4);
  tight.append(0, view, view, iota_positions(32, 32));  // and they hold new tokens again
  CHECK(small->pages_in_use() == 8);

  CHECK_THROWS_WITH((kvpack::KVCache<kvpack::Identity>(kShape, {}, {12, nullptr})),
                    Catch::Contains("page_tokens = 12"));
  CHECK_THROWS_WITH((kvpack::KVCache<kvpack::Identity>(kShape, {}, {64, small})),
                    Catch::Contains("pool page_bytes = 4096"));
}

TEST_CASE("pages: an attention written only from docs/page_formats.md matches attend()",
          "[pages]") {
  kvpack::PageOptions options;
  options.page_tokens = 8;
  kvpack::KVCache<kvpack::ReconstructionEvict> cache(kShape, kvpack::ReconstructionEvict{},
                                                     options);
  fill_layer(cache, 0, 300, 21);
  const Queries repeat(300, 0, 22);
  cache.observe(0, repeat.view(), repeat.pos);
  fill_layer(cache, 1, 300, 23);
  cache.observe(1, repeat.view(), repeat.pos);
  cache.compress();  // heads now hold different tokens, in partly filled pages
  const Queries decode(1, 299, 24);
  std::vector<float> out(decode.out_size());
  cache.attend(0, decode.view(), decode.pos,
               OutputView::nhd(out.data(), 1, kShape.q_heads, kShape.head_dim));

  const int d = kShape.head_dim, g = kShape.group_size();
  for (int h = 0; h < kShape.kv_heads; ++h) {
    // The documented layout: page of token t = page_ids[t / page_tokens]; keys at row
    // t % page_tokens, values page_tokens × head_dim elements later, fp16.
    const auto pages = cache.pages(0, h);
    std::vector<float> k(pages.tokens * d), v(pages.tokens * d);
    std::vector<int64_t> key_pos(pages.tokens);
    for (int64_t t = 0; t < pages.tokens; ++t) {
      const auto* page = reinterpret_cast<const uint16_t*>(
          cache.page_pool()->data(pages.page_ids[t / pages.page_tokens]));
      const int64_t row = t % pages.page_tokens;
      for (int i = 0; i < d; ++i) {
        k[t * d + i] = kvpack::to_float(Half{page[row * d + i]});
        v[t * d + i] =
            kvpack::to_float(Half{page[static_cast<int64_t>(pages.page_tokens) * d + row * d + i]});
      }
      key_pos[t] = pages.positions[t];
    }
    CHECK(pages.tokens < 300);
    for (int j = 0; j < g; ++j) {
      const float* q = decode.q.data() + (h * g + j) * d;
      const auto ref = reference_attention(q, k, v, key_pos, 299, d);
      CHECK(max_relative_row_error(out.data() + (h * g + j) * d, ref) < 1e-5);
    }
  }
}

TEST_CASE("batch: add, fork, remove, with pages shared and reused", "[pages][batch]") {
  kvpack::KVCacheBatch<kvpack::Identity> batch(kShape);
  auto& a = batch.add(7);
  fill_layer(a, 0, 500, 31);
  fill_layer(a, 1, 500, 32);
  const auto pool = batch.page_pool();
  const std::size_t one = pool->pages_in_use();
  CHECK(one == static_cast<std::size_t>(2 * kShape.kv_heads * pages_of(500, 16)));
  auto& b = batch.fork(7, 3);
  CHECK(pool->pages_in_use() == 2 * one);
  CHECK(b.materialize(1).heads[0].k == a.materialize(1).heads[0].k);
  CHECK(batch.ids() == std::vector<int64_t>{3, 7});
  CHECK_THROWS_WITH(batch.add(7), Catch::Contains("id = 7"));
  CHECK_THROWS_WITH(batch.fork(8, 9), Catch::Contains("sequence = 8"));
  CHECK_THROWS_WITH(batch.remove(9), Catch::Contains("id = 9"));
  CHECK_THROWS_WITH(batch.sequence(9), Catch::Contains("sequence = 9"));
  const std::size_t reserved = pool->reserved_bytes();
  batch.remove(7);
  CHECK(!batch.contains(7));
  CHECK(pool->pages_in_use() == one);
  auto& c = batch.add(11);  // the pages 7 gave back hold 11's tokens: the pool does not grow
  fill_layer(c, 0, 500, 33);
  fill_layer(c, 1, 500, 34);
  CHECK(pool->pages_in_use() == 2 * one);
  CHECK(pool->reserved_bytes() == reserved);
  std::size_t sequences = 0;
  for (int64_t id : batch.ids()) sequences += batch.sequence(id).bytes();
  CHECK(batch.bytes() > sequences);
  CHECK(batch.reserved_bytes() >= batch.bytes());
}

TEST_CASE("batch: a sequence with its own knobs equals a cache of that policy", "[pages][batch]") {
  using kvpack::Budget;
  using kvpack::L2NormEvict;
  const L2NormEvict half(Budget::ratio(0.5).with_protection(0, 0), 0);
  const L2NormEvict quarter(Budget::ratio(0.25).with_protection(0, 0), 0);
  kvpack::KVCacheBatch<L2NormEvict> batch(kShape, half);
  auto& a = batch.add(1);
  auto& b = batch.add(2, quarter);  // a per-request budget
  kvpack::KVCache<L2NormEvict> alone(kShape, quarter);
  for (int l = 0; l < kShape.layers; ++l) {
    for (auto* cache : {&a, &b}) fill_layer(*cache, l, 400, 70 + l);
    fill_layer(alone, l, 400, 70 + l);
  }
  a.compress();
  b.compress();
  alone.compress();
  CHECK(a.tokens(0, 0) == 200);
  CHECK(b.tokens(0, 0) == 100);
  CHECK(b.bytes() == alone.bytes());
  for (int l = 0; l < kShape.layers; ++l) {
    const auto got = b.materialize(l), want = alone.materialize(l);
    for (int h = 0; h < kShape.kv_heads; ++h) {
      CHECK(got.heads[h].positions == want.heads[h].positions);
      CHECK(got.heads[h].k == want.heads[h].k);
      CHECK(got.heads[h].v == want.heads[h].v);
    }
  }
  CHECK_THROWS_WITH(batch.add(3, L2NormEvict(Budget::ratio(0.0))), Catch::Contains("keep_ratio"));
  CHECK(batch.ids() == std::vector<int64_t>{1, 2});

  // KIVI pages are sized by bits and group: a policy whose pages would not fit is refused.
  kvpack::KVCacheBatch<kvpack::Quantize> kivi(kShape, kvpack::Quantize(2, 32, 32));
  kivi.add(1, kvpack::Quantize(2, 32, 64));  // another residual: same pages
  CHECK_THROWS_WITH(kivi.add(2, kvpack::Quantize(8, 32, 32)), Catch::Contains("page_bytes"));
  CHECK(kivi.ids() == std::vector<int64_t>{1});
}

TEST_CASE("batch: one attend over mixed decode and prefill entries equals per-sequence calls",
          "[pages][batch]") {
  for (const auto isa : supported_isas()) {
    IsaScope scope(isa);
    kvpack::ThreadPool threads(3);
    kvpack::KVCacheBatch<kvpack::Identity> batch(kShape);
    batch.set_executor(&threads);
    const std::vector<int64_t> lengths{4100, 37, 900, 2500, 1};
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      auto& s = batch.add(static_cast<int64_t>(10 * i));
      fill_layer(s, 1, lengths[i], static_cast<uint32_t>(40 + i), 300);
    }
    std::vector<Queries> queries;
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      const int64_t n = i % 2 == 0 ? 1 : std::min<int64_t>(lengths[i], 20);  // decode / prefill
      queries.emplace_back(n, lengths[i] - n, static_cast<uint32_t>(60 + i));
    }
    std::vector<std::vector<float>> outs(lengths.size());
    std::vector<kvpack::BatchQuery> entries;
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      outs[i].assign(queries[i].out_size(), 0.0f);
      entries.push_back(
          {static_cast<int64_t>(10 * i), queries[i].view(), queries[i].pos,
           OutputView::nhd(outs[i].data(), static_cast<int64_t>(queries[i].pos.size()),
                           kShape.q_heads, kShape.head_dim)});
    }
    batch.attend(1, entries);
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      const auto single = attend(batch.sequence(static_cast<int64_t>(10 * i)), 1, queries[i]);
      CHECK(outs[i] == single);
    }

    // A bad entry is named and nothing is written.
    std::fill(outs[0].begin(), outs[0].end(), -1.0f);
    const std::vector<float> before = outs[0];
    auto bad = entries;
    bad[3].sequence = 99;
    CHECK_THROWS_WITH(batch.attend(1, bad), Catch::Contains("entry 3") && Catch::Contains("99"));
    bad = entries;
    bad[1].positions = queries[0].pos;  // 1 position for a 20-token entry
    CHECK_THROWS_WITH(batch.attend(1, bad), Catch::Contains("entry 1"));
    CHECK(outs[0] == before);
  }
}

TEST_CASE("attend_paged: caller-owned NHD and HND page tables match the container", "[pages]") {
  const int d = kShape.head_dim, kvh = kShape.kv_heads, ps = 16;
  const std::vector<int64_t> lengths{700, 33, 1};
  for (const auto isa : supported_isas()) {
    IsaScope scope(isa);
    for (const auto layout : {kvpack::PageLayout::kNHD, kvpack::PageLayout::kHND}) {
      // Pages handed out in a scrambled order, as an engine's allocator would.
      std::vector<int32_t> indptr{0}, indices, last;
      int64_t total_pages = 0;
      for (int64_t n : lengths) total_pages += pages_of(n, ps);
      std::vector<int32_t> order(total_pages);
      for (int64_t i = 0; i < total_pages; ++i)
        order[i] = static_cast<int32_t>((i * 7) % total_pages);
      std::vector<Half> kp(total_pages * ps * kvh * d), vp(kp.size());
      std::vector<kvpack::KVCache<kvpack::Identity>> caches;
      std::vector<float> q, expected;
      std::vector<int64_t> qpos;
      std::vector<int32_t> qo{0};
      int64_t next = 0;
      for (std::size_t b = 0; b < lengths.size(); ++b) {
        const int64_t n = lengths[b];
        const auto k = random_values(n * kvh * d, 80 + b), v = random_values(n * kvh * d, 90 + b);
        caches.emplace_back(kShape);
        caches.back().append(0, ActivationView::nhd(k.data(), n, kvh, d),
                             ActivationView::nhd(v.data(), n, kvh, d), iota_positions(n));
        for (int64_t p = 0; p < pages_of(n, ps); ++p) indices.push_back(order[next++]);
        indptr.push_back(static_cast<int32_t>(indices.size()));
        last.push_back(static_cast<int32_t>(n - (pages_of(n, ps) - 1) * ps));
        for (int64_t t = 0; t < n; ++t) {
          const int64_t page = indices[indptr[b] + t / ps], row = t % ps;
          for (int h = 0; h < kvh; ++h) {
            const int64_t at =
                page * ps * kvh * d +
                (layout == kvpack::PageLayout::kNHD ? (row * kvh + h) * d : (h * ps + row) * d);
            for (int i = 0; i < d; ++i) {
              kp[at + i] = kvpack::to_half(k[(t * kvh + h) * d + i]);
              vp[at + i] = kvpack::to_half(v[(t * kvh + h) * d + i]);
            }
          }
        }
        const Queries qs(b == 0 ? 3 : 1, n - (b == 0 ? 3 : 1), 100 + b);
        q.insert(q.end(), qs.q.begin(), qs.q.end());
        qpos.insert(qpos.end(), qs.pos.begin(), qs.pos.end());
        qo.push_back(static_cast<int32_t>(qpos.size()));
        const auto out = attend(caches.back(), 0, qs);
        expected.insert(expected.end(), out.begin(), out.end());
      }
      kvpack::PagedKV<Half> kv;
      kv.k_data = kp.data();
      kv.v_data = vp.data();
      kv.layout = layout;
      kv.page_size = ps;
      kv.kv_heads = kvh;
      kv.head_dim = d;
      kv.batch = static_cast<int>(lengths.size());
      kv.indptr = indptr.data();
      kv.indices = indices.data();
      kv.last_page_len = last.data();
      kv.num_pages = total_pages;
      const int64_t rows = static_cast<int64_t>(qpos.size());
      std::vector<float> out(expected.size());
      const auto qv = ActivationView::nhd(q.data(), rows, kShape.q_heads, d);
      const auto ov = OutputView::nhd(out.data(), rows, kShape.q_heads, d);
      kvpack::cpu::attend_paged(kv, qo.data(), qv, qpos, ov);
      CHECK(max_abs_difference(out, expected) < 1e-6);

      auto broken = kv;
      std::vector<int32_t> bad_indices = indices;
      bad_indices[1] = static_cast<int32_t>(total_pages);
      broken.indices = bad_indices.data();
      std::fill(out.begin(), out.end(), 0.0f);
      CHECK_THROWS_WITH(kvpack::cpu::attend_paged(broken, qo.data(), qv, qpos, ov),
                        Catch::Contains("page id"));
      broken = kv;
      std::vector<int32_t> bad_last = last;
      bad_last[0] = ps + 1;
      broken.last_page_len = bad_last.data();
      CHECK_THROWS_WITH(kvpack::cpu::attend_paged(broken, qo.data(), qv, qpos, ov),
                        Catch::Contains("last_page_len"));
      broken = kv;
      broken.page_size = 12;
      CHECK_THROWS_WITH(kvpack::cpu::attend_paged(broken, qo.data(), qv, qpos, ov),
                        Catch::Contains("page_size = 12"));
      CHECK(std::all_of(out.begin(), out.end(), [](float x) { return x == 0.0f; }));
    }
  }
}

TEST_CASE("append: fp32 NHD, HND and one-token views go into the pages as their fp16 values",
          "[pages][inputs]") {
  // fp32 rows are converted from the caller's buffer in place (no staging copy): every layout,
  // block size and page boundary must store exactly to_half(x).
  const kvpack::ModelShape shape{1, 6, 3, 64, {}};
  const int64_t n = 70;  // 4 full pages of 16 and a partial one
  const auto k = random_values(n * 3 * 64, 71);
  const auto v = random_values(n * 3 * 64, 72);
  std::vector<float> k_hnd(k.size()), v_hnd(v.size());
  for (int64_t t = 0; t < n; ++t) {
    for (int h = 0; h < 3; ++h) {
      for (int i = 0; i < 64; ++i) {
        k_hnd[(h * n + t) * 64 + i] = k[(t * 3 + h) * 64 + i];
        v_hnd[(h * n + t) * 64 + i] = v[(t * 3 + h) * 64 + i];
      }
    }
  }
  std::vector<int64_t> pos(n);
  for (int64_t t = 0; t < n; ++t) pos[t] = 2 * t;
  kvpack::KVCache<kvpack::Identity> nhd(shape), hnd(shape), single(shape);
  nhd.append(0, ActivationView::nhd(k.data(), n, 3, 64), ActivationView::nhd(v.data(), n, 3, 64),
             pos);
  hnd.append(0, ActivationView::hnd(k_hnd.data(), n, 3, 64),
             ActivationView::hnd(v_hnd.data(), n, 3, 64), pos);
  for (int64_t t = 0; t < n; ++t) {
    single.append(0, ActivationView::nhd(k.data() + t * 192, 1, 3, 64),
                  ActivationView::nhd(v.data() + t * 192, 1, 3, 64), std::vector<int64_t>{pos[t]});
  }
  for (const auto* cache : {&nhd, &hnd, &single}) {
    const auto layer = cache->materialize(0);
    for (int h = 0; h < 3; ++h) {
      REQUIRE(layer.heads[h].positions == pos);
      for (int64_t t = 0; t < n; ++t) {
        for (int i = 0; i < 64; ++i) {
          const std::size_t src = (t * 3 + h) * 64 + i, dst = t * 64 + i;
          REQUIRE(layer.heads[h].k[dst] == kvpack::to_float(kvpack::to_half(k[src])));
          REQUIRE(layer.heads[h].v[dst] == kvpack::to_float(kvpack::to_half(v[src])));
        }
      }
    }
  }
}
