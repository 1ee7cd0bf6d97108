// The smallest program a kvpack user writes: include the umbrella header, build an empty cache.
#include <cstddef>
#include <cstdio>
#include <kvpack/kvpack.hpp>

int main() {
  kvpack::ModelShape shape{2, 4, 2, 8, {}};
  kvpack::KVCache<kvpack::Identity> cache(shape);
  // kvpack/config.hpp defines it to 0 unless kvpack::cuda (or nvcc) sets it.
  const char* cuda = KVPACK_HAS_CUDA ? "yes" : "no";
  std::printf("kvpack consumer: cache.bytes() = %zu, KVPACK_HAS_CUDA: %s\n",
              static_cast<std::size_t>(cache.bytes()), cuda);
  return 0;
}
