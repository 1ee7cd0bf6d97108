// The cross-backend test table (tests/backend_ops/backend_ops.hpp) on the CUDA backend. Cases
// whose policy backend::Cuda does not implement are reported as skipped, by policy name.
#include <catch2/catch.hpp>
#include <kvpack/backend/cuda.hpp>
#include <set>
#include <string>

#include "../backend_ops/backend_ops.hpp"

TEST_CASE("backend ops: every case on the CUDA backend", "[backend_ops][cuda]") {
  using namespace kvpack_backend_ops;
  std::set<std::string> skipped;
  int ran = 0;
  for_each_case([&](const Case& c, const auto& policy) {
    using P = std::decay_t<decltype(policy)>;
    if constexpr (kvpack::cuda::supports_policy_v<P>) {
      kvpack::KVCache<P, kvpack::backend::Cuda> cache(c.shape, policy);
      check_outcome(c, run_case(c, cache));
      ++ran;
    } else {
      skipped.insert(c.policy);
    }
  });
  std::string names;
  for (const auto& n : skipped) names += (names.empty() ? "" : ", ") + n;
  if (names.empty()) names = "none";
  WARN("backend ops on CUDA: " << ran
                               << " cases ran; skipped (no CUDA implementation yet): " << names);
  CHECK(ran > 0);
}
