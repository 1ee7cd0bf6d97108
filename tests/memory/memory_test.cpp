// Memory accounting against the allocator: this program replaces the global operator new/delete
// with ones that count live heap bytes, then checks that a cache's reserved_bytes() equals the
// heap it occupies, exactly, after prefill, decode appends, compress(), truncate(),
// shrink_to_fit() and clear(); that shrink_to_fit() leaves only the page pool's bookkeeping and
// the free pages of its partly used chunks above bytes(); and that a batch's pages are the pool's
// count. Its own executable: a counting operator new would hide ASan's allocation checks in the
// unit tests. Exits non-zero on any mismatch.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <kvpack/kvpack.hpp>
#include <memory>
#include <new>
#include <random>
#include <string>
#include <vector>

namespace {

std::atomic<long long> g_live{0};

// Every block carries its size in front (16 bytes keep the alignment of max_align_t).
constexpr std::size_t kHeader = 16;

void* counted_alloc(std::size_t n) {
  void* p = std::malloc(n + kHeader);
  if (p == nullptr) throw std::bad_alloc();
  *static_cast<std::size_t*>(p) = n;
  g_live += static_cast<long long>(n);
  return static_cast<char*>(p) + kHeader;
}

void counted_free(void* p) {
  if (p == nullptr) return;
  char* block = static_cast<char*>(p) - kHeader;
  g_live -= static_cast<long long>(*reinterpret_cast<std::size_t*>(block));
  std::free(block);
}

// Over-aligned blocks (the page pool's 64-byte pages): the size sits one alignment in front.
void* counted_aligned_alloc(std::size_t n, std::align_val_t al) {
  const std::size_t a = std::max(static_cast<std::size_t>(al), kHeader);
  void* p = std::aligned_alloc(a, (n + 2 * a - 1) / a * a);
  if (p == nullptr) throw std::bad_alloc();
  *static_cast<std::size_t*>(p) = n;
  g_live += static_cast<long long>(n);
  return static_cast<char*>(p) + a;
}

void counted_aligned_free(void* p, std::align_val_t al) {
  if (p == nullptr) return;
  const std::size_t a = std::max(static_cast<std::size_t>(al), kHeader);
  char* block = static_cast<char*>(p) - a;
  g_live -= static_cast<long long>(*reinterpret_cast<std::size_t*>(block));
  std::free(block);
}

}  // namespace

void* operator new(std::size_t n, std::align_val_t a) { return counted_aligned_alloc(n, a); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_aligned_alloc(n, a); }
void operator delete(void* p, std::align_val_t a) noexcept { counted_aligned_free(p, a); }
void operator delete[](void* p, std::align_val_t a) noexcept { counted_aligned_free(p, a); }
void operator delete(void* p, std::size_t, std::align_val_t a) noexcept {
  counted_aligned_free(p, a);
}
void operator delete[](void* p, std::size_t, std::align_val_t a) noexcept {
  counted_aligned_free(p, a);
}
void* operator new(std::size_t n) { return counted_alloc(n); }
void* operator new[](std::size_t n) { return counted_alloc(n); }
void operator delete(void* p) noexcept { counted_free(p); }
void operator delete[](void* p) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_free(p); }

namespace {

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++g_failures;
}

std::vector<float> random_values(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> x(n);
  for (auto& v : x) v = dist(rng);
  return x;
}

/// Heap a low-rank cache occupies outside reserved_bytes(), measured in this program: the RoPE
/// table its heads share (documented as not counted) and, per token basis, the shared_ptr
/// control block that make_shared puts beside the basis (reserved_bytes() counts the basis
/// struct itself). Bases are counted through low_rank_factors(): distinct page tables.
template <class Cache>
long long untracked_low_rank(const Cache& cache) {
  const kvpack::ModelShape& shape = cache.shape();
  long long rope = 0, basis_block = 0;
  {
    const long long before = g_live.load();
    auto probe = std::make_shared<const kvpack::Rope>(shape.rope, shape.head_dim);
    rope = g_live.load() - before;
  }
  {
    const long long before = g_live.load();
    auto probe = std::make_shared<kvpack::detail::LowRankBasis>();
    basis_block = g_live.load() - before - static_cast<long long>(sizeof(*probe));
  }
  std::vector<const int32_t*> bases;
  for (int l = 0; l < shape.layers; ++l) {
    for (int h = 0; h < shape.kv_heads; ++h) {
      const kvpack::LowRankHeadFactors f = cache.low_rank_factors(l, h);
      for (const kvpack::LowRankBasisData& b : {f.key_basis, f.value_basis}) {
        if (b.rank > 0 && std::find(bases.begin(), bases.end(), b.page_ids) == bases.end()) {
          bases.push_back(b.page_ids);
        }
      }
    }
  }
  return rope + static_cast<long long>(bases.size()) * basis_block;
}

template <bool kLowRank = false, class Policy>
void check_policy(const char* name, const Policy& policy, bool observe) {
  const kvpack::ModelShape shape{2, 6, 2, 64, {}};
  const int d = shape.head_dim, heads = shape.kv_heads;
  const auto k = random_values(700 * heads * d, 1), v = random_values(700 * heads * d, 2);
  const auto q = random_values(700 * shape.q_heads * d, 3);
  std::vector<int64_t> pos;
  pos.reserve(700);
  // A cache makes its page pool with make_shared: the pool object and its shared_ptr control
  // block are the one allocation reserved_bytes() leaves out (it counts the pool's pages and
  // bookkeeping). Measured here, in this program, rather than assumed.
  long long pool_object = 0;
  {
    const long long before = g_live.load();
    auto probe = std::make_shared<kvpack::PagePool>(64, 1);
    pool_object = g_live.load() - before;
  }
  const long long base = g_live.load();  // from here on, only the cache allocates and keeps
  {
    kvpack::KVCache<Policy> cache(shape, policy);
    auto check = [&](const char* step) {
      long long untracked = 0;
      if constexpr (kLowRank) {
        untracked = untracked_low_rank(cache);
      }
      const long long heap = g_live.load() - base - pool_object - untracked;
      const std::size_t reserved = cache.reserved_bytes(), bytes = cache.bytes();
      expect(heap == static_cast<long long>(reserved) && reserved >= bytes,
             std::string(name) + " after " + step + ": heap " + std::to_string(heap) +
                 ", reserved_bytes " + std::to_string(reserved) + ", bytes " +
                 std::to_string(bytes));
    };
    check("construction");
    for (int64_t t0 = 0; t0 < 600; t0 += 200) {  // prefill in three chunks
      pos.clear();
      for (int64_t t = t0; t < t0 + 200; ++t) pos.push_back(t);
      for (int l = 0; l < shape.layers; ++l) {
        cache.append(l, kvpack::ActivationView::nhd(k.data() + t0 * heads * d, 200, heads, d),
                     kvpack::ActivationView::nhd(v.data() + t0 * heads * d, 200, heads, d), pos);
      }
    }
    check("prefill (3 chunks)");
    if (observe) {
      pos.clear();
      for (int64_t t = 0; t < 600; ++t) pos.push_back(t);
      for (int l = 0; l < shape.layers; ++l) {
        cache.observe(l, kvpack::ActivationView::nhd(q.data(), 600, shape.q_heads, d), pos);
      }
      check("observe");
    }
    cache.compress();
    check("compress");
    for (int64_t t = 600; t < 700; ++t) {  // decode: one token per call
      for (int l = 0; l < shape.layers; ++l) {
        cache.append(l, kvpack::ActivationView::nhd(k.data() + t * heads * d, 1, heads, d),
                     kvpack::ActivationView::nhd(v.data() + t * heads * d, 1, heads, d),
                     kvpack::Positions(&t, 1));
      }
    }
    check("100 decode appends");
    cache.shrink_to_fit();
    check("shrink_to_fit");
    // What stays above bytes(): the private pool's bookkeeping and the free pages of chunks that
    // still hold pages in use (chunks double up to 64 pages); every chunk left empty was freed.
    const auto& pool = cache.page_pool();
    const std::size_t pool_books = pool ? pool->reserved_bytes() - pool->bytes_in_use() : 0;
    expect(cache.reserved_bytes() == cache.bytes() + pool_books &&
               (!pool || pool->release_unused() == 0),
           std::string(name) +
               ": shrink_to_fit leaves reserved_bytes == bytes + pool bookkeeping (" +
               std::to_string(pool_books) + ")");
    cache.truncate(679);
    check("truncate");
    cache.compress();
    check("compress after decoding");
    cache.clear();
    check("clear");
  }
  const long long left = g_live.load() - base;
  expect(left == 0, std::string(name) + ": destruction returns every byte (" +
                        std::to_string(left) + " left)");
}

// Sequences of one batch: the heap is the batch's reserved_bytes() (plus the pool object), and
// the pages the sequences hold are what the pool has handed out, through adds, compress(),
// decode appends, a fork and a remove.
void check_batch() {
  const kvpack::ModelShape shape{2, 6, 2, 64, {}};
  const int d = shape.head_dim, heads = shape.kv_heads;
  const auto k = random_values(400 * heads * d, 4), v = random_values(400 * heads * d, 5);
  long long pool_object = 0;
  {
    const long long before = g_live.load();
    auto probe = std::make_shared<kvpack::PagePool>(64, 1);
    pool_object = g_live.load() - before;
  }
  std::vector<int64_t> pos;
  pos.reserve(400);
  const long long base = g_live.load();
  {
    kvpack::KVCacheBatch<kvpack::L2NormEvict> batch(
        shape, kvpack::L2NormEvict(kvpack::Budget::ratio(0.5), 0));
    auto check = [&](const char* step) {
      const long long heap = g_live.load() - base - pool_object;
      std::size_t pages = 0;
      for (int64_t id : batch.ids()) {
        const auto& s = batch.sequence(id);
        for (int l = 0; l < shape.layers; ++l) {
          for (int h = 0; h < heads; ++h) pages += (s.tokens(l, h) + 15) / 16;
        }
      }
      const auto& pool = *batch.page_pool();
      expect(heap == static_cast<long long>(batch.reserved_bytes()) && pages == pool.pages_in_use(),
             std::string("batch after ") + step + ": heap " + std::to_string(heap) +
                 ", reserved_bytes " + std::to_string(batch.reserved_bytes()) + ", pages held " +
                 std::to_string(pages) + ", pool in use " + std::to_string(pool.pages_in_use()));
    };
    check("construction");
    for (int64_t id = 0; id < 3; ++id) {
      auto& s = batch.add(id);
      const int64_t n = 100 + 100 * id;
      pos.resize(n);
      for (int64_t t = 0; t < n; ++t) pos[t] = t;
      for (int l = 0; l < shape.layers; ++l) {
        s.append(l, kvpack::ActivationView::nhd(k.data(), n, heads, d),
                 kvpack::ActivationView::nhd(v.data(), n, heads, d), pos);
      }
    }
    check("3 sequences");
    batch.sequence(1).compress();
    check("compress of one");
    batch.fork(2, 5);
    check("fork");
    batch.remove(0);
    check("remove");
    for (int64_t t = 300; t < 340; ++t) {
      for (int l = 0; l < shape.layers; ++l) {
        batch.sequence(5).append(l,
                                 kvpack::ActivationView::nhd(k.data() + t * heads * d, 1, heads, d),
                                 kvpack::ActivationView::nhd(v.data() + t * heads * d, 1, heads, d),
                                 kvpack::Positions(&t, 1));
      }
    }
    check("40 decode appends");
  }
  const long long left = g_live.load() - base;
  expect(left == 0, "batch: destruction returns every byte (" + std::to_string(left) + " left)");
}

}  // namespace

int main() {
  kvpack::default_executor();  // the pool's own allocations are not the caches'
  check_policy("Identity", kvpack::Identity{}, false);
  check_policy("IdentityF32", kvpack::IdentityF32{}, false);
  check_policy("L2NormEvict", kvpack::L2NormEvict(kvpack::Budget::ratio(0.5), 0), false);
  check_policy("ReconstructionEvict", kvpack::ReconstructionEvict{}, true);
  check_policy("Quantize", kvpack::Quantize(4, 32, 64), false);
  check_policy<true>("CrossLayerSVD", kvpack::CrossLayerSVD(2, 20, 30), false);
  check_policy<true>("Compose<CrossLayerSVD, Quantize>",
                     kvpack::Compose<kvpack::CrossLayerSVD, kvpack::Quantize>(
                         kvpack::CrossLayerSVD(2, 20, 30), kvpack::Quantize(4, 32, 0)),
                     false);
  {
    const std::vector<std::vector<float>> k(2, random_values(300 * 2 * 64, 7)),
        v(2, random_values(300 * 2 * 64, 8));
    check_policy<true>(
        "ChannelShrink",
        kvpack::ChannelShrink(std::make_shared<const kvpack::ChannelProjections>(
                                  kvpack::ChannelProjections::calibrate(k, v, 2, 64, 24, 40)),
                              32),
        false);
  }
  check_batch();
  std::printf("%s\n",
              g_failures == 0 ? "memory accounting: all exact" : "memory accounting: FAILED");
  return g_failures == 0 ? 0 : 1;
}
