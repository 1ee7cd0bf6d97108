// libFuzzer target: kvpack's checked-file readers (ChannelProjections "KVPKPROJ", HeadScores
// "KVPKHEAD", KVzap's HiddenScorer "KVPKZAPL", a saved KVCache "KVPKCACH") on arbitrary bytes.
// The first byte steers: bit 3 picks the cache reader (bit 4 then picks a KIVI cache or an xKV +
// KIVI cache), else bit 0 picks projections, else bit 5 the scorer, else head scores; bit 1
// prepends the right magic, bit 2 appends the right checksum (so inputs reach the field parser,
// not only the checksum test). A file must be refused with
// kvpack::error, leaving the cache as it was, or load whole, valid and finite.
#include <unistd.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <kvpack/kvpack.hpp>
#include <string>
#include <vector>

namespace {

/// One scratch file per fuzzing process (the readers take a path, as engines use them).
const std::string& scratch_path() {
  static const std::string path = [] {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir ? dir : "/tmp") + "/kvpack_fuzz_" + std::to_string(getpid()) + ".bin";
  }();
  return path;
}

void require_finite(const std::vector<float>& v) {
  for (float x : v) {
    if (!std::isfinite(x)) std::abort();  // load() handed out a value it should have refused
  }
}

/// The shape of the seed caches (tests/fuzz/make_cache_seeds.cpp writes them).
const kvpack::ModelShape kCacheShape{2, 4, 2, 32, {}};

/// Loads `path` into a cache of Policy that holds something else; a refused file must leave it
/// untouched, an accepted one must hold finite values that attend() can use.
template <class Policy>
void load_cache(const std::string& path, const Policy& policy) {
  kvpack::KVCache<Policy> cache(kCacheShape, policy);
  const int d = kCacheShape.head_dim, heads = kCacheShape.kv_heads;
  std::vector<float> k(40 * heads * d), v(k.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = std::sin(0.1f * static_cast<float>(i));
    v[i] = std::cos(0.1f * static_cast<float>(i));
  }
  std::vector<int64_t> pos(40);
  for (int64_t t = 0; t < 40; ++t) pos[t] = t;
  cache.append(0, kvpack::ActivationView::nhd(k.data(), 40, heads, d),
               kvpack::ActivationView::nhd(v.data(), 40, heads, d), pos);
  const std::size_t before = cache.bytes();
  try {
    cache.load(path);
  } catch (const kvpack::error&) {
    if (cache.bytes() != before || cache.tokens(0, 0) != 40) std::abort();  // half-loaded
    return;
  }
  for (int l = 0; l < kCacheShape.layers; ++l) {
    const auto held = cache.materialize(l);
    for (const auto& h : held.heads) {
      require_finite(h.k);
      require_finite(h.v);
      if (h.positions.empty()) continue;
      std::vector<float> q(kCacheShape.q_heads * d, 0.5f), out(q.size());
      cache.attend(l, kvpack::ActivationView::nhd(q.data(), 1, kCacheShape.q_heads, d),
                   std::vector<int64_t>{cache.appended(l) == 0 ? 0 : h.positions.back()},
                   kvpack::OutputView::nhd(out.data(), 1, kCacheShape.q_heads, d));
      require_finite(out);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool cache_file = data[0] & 8;
  const bool projections = !cache_file && (data[0] & 1);
  const bool scorer = !cache_file && !projections && (data[0] & 32);
  std::vector<uint8_t> file;
  if (data[0] & 2) {
    const char* magic = cache_file    ? "KVPKCACH"
                        : projections ? "KVPKPROJ"
                        : scorer      ? "KVPKZAPL"
                                      : "KVPKHEAD";
    file.insert(file.end(), magic, magic + 8);
  }
  file.insert(file.end(), data + 1, data + size);
  if (data[0] & 4) {
    const uint64_t sum = kvpack::detail::fnv1a(file.data(), file.size());
    const auto* b = reinterpret_cast<const uint8_t*>(&sum);
    file.insert(file.end(), b, b + 8);
  }
  const std::string& path = scratch_path();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(file.data(), 1, file.size(), f) != file.size()) std::abort();
  std::fclose(f);
  if (cache_file) {
    using XkvQuant = kvpack::Compose<kvpack::CrossLayerSVD, kvpack::Quantize>;
    if (data[0] & 16) {
      load_cache(path, XkvQuant(kvpack::CrossLayerSVD(2, 8, 8), kvpack::Quantize(4, 32, 32)));
    } else {
      load_cache(path, kvpack::Quantize(4, 32, 32));
    }
    return 0;
  }
  try {
    if (projections) {
      const auto p = kvpack::ChannelProjections::load(path);
      for (int l = 0; l < p.layers; ++l) {
        require_finite(p.pk[l]);
        require_finite(p.pv[l]);
      }
      // What load returns must pass the checks of the policy that uses it.
      const kvpack::ModelShape shape{p.layers, p.kv_heads, p.kv_heads, p.head_dim, {}};
      kvpack::ChannelShrink(std::make_shared<const kvpack::ChannelProjections>(p)).validate(shape);
    } else if (scorer) {
      const auto s = kvpack::HiddenScorer::load(path);
      require_finite(s.weight);
      require_finite(s.bias);
      const kvpack::ModelShape shape{s.layers, s.kv_heads, s.kv_heads, 64, {}};
      kvpack::KVzap(std::make_shared<const kvpack::HiddenScorer>(s), kvpack::Budget{})
          .validate(shape);
    } else {
      const auto s = kvpack::HeadScores::load(path);
      require_finite(s.score);
      const kvpack::ModelShape shape{s.layers, s.kv_heads, s.kv_heads, 64, {}};
      s.validate(shape, "fuzz");
    }
  } catch (const kvpack::error&) {
  }
  return 0;
}
