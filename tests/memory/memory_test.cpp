// Memory accounting against the allocator: this program replaces the global operator new/delete
// with ones that count live heap bytes, then checks that a cache's reserved_bytes() equals the
// heap it occupies, exactly, after prefill, decode appends, compress(), truncate(),
// shrink_to_fit() and clear(); and that shrink_to_fit() makes reserved_bytes() equal bytes().
// Its own executable: a counting operator new would hide ASan's allocation checks in the unit
// tests. Exits non-zero on any mismatch.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <kvpack/kvpack.hpp>
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

}  // namespace

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

template <class Policy>
void check_policy(const char* name, const Policy& policy, bool observe) {
  const kvpack::ModelShape shape{2, 6, 2, 64, {}};
  const int d = shape.head_dim, heads = shape.kv_heads;
  const auto k = random_values(700 * heads * d, 1), v = random_values(700 * heads * d, 2);
  const auto q = random_values(700 * shape.q_heads * d, 3);
  std::vector<int64_t> pos;
  pos.reserve(700);
  const long long base = g_live.load();  // from here on, only the cache allocates and keeps
  {
    kvpack::KVCache<Policy> cache(shape, policy);
    auto check = [&](const char* step) {
      const long long heap = g_live.load() - base;
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
    expect(cache.reserved_bytes() == cache.bytes(),
           std::string(name) + ": shrink_to_fit leaves reserved_bytes == bytes");
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

}  // namespace

int main() {
  kvpack::default_executor();  // the pool's own allocations are not the caches'
  check_policy("Identity", kvpack::Identity{}, false);
  check_policy("IdentityF32", kvpack::IdentityF32{}, false);
  check_policy("L2NormEvict", kvpack::L2NormEvict(kvpack::Budget::ratio(0.5), 0), false);
  check_policy("ReconstructionEvict", kvpack::ReconstructionEvict{}, true);
  check_policy("Quantize", kvpack::Quantize(4, 32, 64), false);
  std::printf("%s\n",
              g_failures == 0 ? "memory accounting: all exact" : "memory accounting: FAILED");
  return g_failures == 0 ? 0 : 1;
}
