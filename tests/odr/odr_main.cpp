// ODR test: the program links (the check) and both units see the same library (the run).
#include <cstddef>
#include <cstdio>

std::size_t kvpack_odr_bytes_a();
std::size_t kvpack_odr_bytes_b();

int main() {
  const std::size_t a = kvpack_odr_bytes_a();
  const std::size_t b = kvpack_odr_bytes_b();
  std::printf("empty cache bytes: %zu (unit a), %zu (unit b)\n", a, b);
  return a == b ? 0 : 1;
}
