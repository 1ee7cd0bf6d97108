// ODR test, translation unit b: includes the umbrella header and uses it. Linked with the other
// unit into one program, so a non-inline definition in any header is a multiple-definition error.
#include <cstddef>
#include <kvpack/kvpack.hpp>

std::size_t kvpack_odr_bytes_b() {
  kvpack::ModelShape shape{2, 4, 2, 8, {}};
  kvpack::KVCache<kvpack::Identity> cache(shape);
  return cache.bytes();
}
