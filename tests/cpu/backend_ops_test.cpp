// The cross-backend test table (tests/backend_ops/backend_ops.hpp) on the CPU backend, which
// implements every policy. The CUDA backend runs the same table in tests/cuda/.
// Every case runs under each instruction set the CPU supports (scalar, AVX2: isa.hpp).
#include "../backend_ops/backend_ops.hpp"

#include <catch2/catch.hpp>

#include "test_util.hpp"

TEST_CASE("backend ops: every case on the CPU backend, under each instruction set",
          "[backend_ops][isa]") {
  using namespace kvpack_backend_ops;
  for (const kvpack::Isa isa : kvpack_test::supported_isas()) {
    kvpack_test::IsaScope scope(isa);
    INFO("instruction set " << kvpack::isa_name(isa));
    int cases = 0;
    for_each_case([&](const Case& c, const auto& policy) {
      using P = std::decay_t<decltype(policy)>;
      kvpack::KVCache<P, kvpack::backend::Cpu> cache(c.shape, policy);
      check_outcome(c, run_case(c, cache));
      ++cases;
    });
    CHECK(cases == 14);
  }
}
