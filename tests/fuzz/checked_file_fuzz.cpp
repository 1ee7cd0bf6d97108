// libFuzzer target: kvpack's checked-file readers (ChannelProjections "KVPKPROJ", HeadScores
// "KVPKHEAD") on arbitrary bytes. The first byte steers: bit 0 picks the reader, bit 1 prepends
// the right magic, bit 2 appends the right checksum (so inputs reach the field parser, not only
// the checksum test). A file must be refused with kvpack::error or load whole, valid and finite.
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

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool projections = data[0] & 1;
  std::vector<uint8_t> file;
  if (data[0] & 2) {
    const char* magic = projections ? "KVPKPROJ" : "KVPKHEAD";
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
