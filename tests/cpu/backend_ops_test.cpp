// The cross-backend test table (tests/backend_ops/backend_ops.hpp) on the CPU backend, which
// implements every policy. The CUDA backend runs the same table in tests/cuda/.
#include "../backend_ops/backend_ops.hpp"

#include <catch2/catch.hpp>

TEST_CASE("backend ops: every case on the CPU backend", "[backend_ops]") {
  using namespace kvpack_backend_ops;
  int cases = 0;
  for_each_case([&](const Case& c, const auto& policy) {
    using P = std::decay_t<decltype(policy)>;
    kvpack::KVCache<P, kvpack::backend::Cpu> cache(c.shape, policy);
    check_outcome(c, run_case(c, cache));
    ++cases;
  });
  CHECK(cases == 12);
}
