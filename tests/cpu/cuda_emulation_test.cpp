// The emulated CUDA grid itself (backend/cuda/emulation/, kernels/exec.cuh): barrier, shared
// memory, warp collective and atomic semantics against host references on seeded random data,
// the block scan the selection kernel uses, and every fault it must refuse as a GPU would.
#define KVPACK_CUDA_EMULATION 1
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <kvpack/backend/cuda/kernels/block_scan.cuh>
#include <kvpack/backend/cuda/kernels/common.cuh>
#include <numeric>
#include <random>
#include <vector>

namespace exec = kvpack::cuda::exec;
using Catch::Matchers::Contains;

namespace {

constexpr int kThreads = 128;

/// out[b * n + t] = in[b * n + (t + shift) % n]: every thread writes shared, the barrier, then
/// every thread reads its neighbour's slot.
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads)
    rotate_kernel(const int* in, int* out, int shift) {
  KVPACK_SHARED_ARRAY(int, slots, kThreads);
  const int t = static_cast<int>(exec::thread_x());
  const int64_t base = static_cast<int64_t>(exec::block_x()) * kThreads;
  slots[t] = in[base + t];
  exec::sync_block();
  out[base + t] = slots[(t + shift) % kThreads];
}

/// Per thread: the warp's sum and max (shfl_xor butterflies), lane 5's value (shfl), the ballot
/// of value > 0.
KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads)
    warp_kernel(const float* in, float* sum, float* max, float* lane5, uint32_t* ballot) {
  const int i = static_cast<int>(exec::block_x() * kThreads + exec::thread_x());
  const float x = in[i];
  sum[i] = kvpack::cuda::warp_sum(x);
  max[i] = kvpack::cuda::warp_max(x);
  lane5[i] = exec::shfl(x, 5);
  ballot[i] = exec::ballot(x > 0.0f);
}

KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads)
    scan_kernel(const int* in, int* offset, int* total) {
  KVPACK_SHARED(kvpack::cuda::BlockScanStorage<kThreads>, storage);
  const int t = static_cast<int>(exec::thread_x());
  kvpack::cuda::block_exclusive_sum<kThreads>(in[t], offset[t], total[t], storage);
}

KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads)
    atomic_kernel(unsigned long long* count, unsigned long long* lowest) {
  const unsigned long long id = exec::block_x() * kThreads + exec::thread_x();
  exec::atomic_add(count, 1ull);
  exec::atomic_min(lowest, id + 7);
}

KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads) read_shared_kernel(uint32_t* out) {
  KVPACK_SHARED_ARRAY(uint32_t, never_written, kThreads);
  out[exec::thread_x()] = never_written[exec::thread_x()];
}

// --- kernels a GPU would hang on, refuse, or leave undefined ---------------------------------

KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads) split_barrier_kernel(int* /*unused*/) {
  if (exec::thread_x() % 2 == 0) {
    exec::sync_block();
  } else {
    exec::sync_warp();
  }
}

KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads) exited_lanes_kernel(float* out) {
  if (exec::thread_x() % 32 >= 16) return;
  out[exec::thread_x()] = kvpack::cuda::warp_sum(1.0f);
}

KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads) mixed_collectives_kernel(uint32_t* out) {
  if (exec::thread_x() % 2 == 0) {
    out[exec::thread_x()] = exec::ballot(true);
  } else {
    out[exec::thread_x()] = exec::shfl(1u, 0);
  }
}

KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(kThreads) oversized_shared_kernel(float* out) {
  KVPACK_SHARED_ARRAY(float, big, 13 * 1024);  // 52 KiB
  big[exec::thread_x()] = 1.0f;
  out[exec::thread_x()] = big[exec::thread_x()];
}

template <class T>
std::vector<T> random_values(std::size_t n, std::mt19937& rng, T lo, T hi) {
  std::vector<T> v(n);
  if constexpr (std::is_integral<T>::value) {
    std::uniform_int_distribution<T> dist(lo, hi);
    for (auto& x : v) x = dist(rng);
  } else {
    std::uniform_real_distribution<T> dist(lo, hi);
    for (auto& x : v) x = dist(rng);
  }
  return v;
}

}  // namespace

TEST_CASE("CUDA emulation: barriers and shared memory, per block", "[cuda_emulation]") {
  std::mt19937 rng(31);
  const int blocks = 3;
  const auto in = random_values<int>(blocks * kThreads, rng, -1000, 1000);
  std::vector<int> out(in.size(), 0);
  for (int shift : {1, 37, 127}) {
    exec::launch<kThreads>(rotate_kernel, dim3(blocks), dim3(kThreads), nullptr, "rotate_kernel",
                           in.data(), out.data(), shift);
    for (int b = 0; b < blocks; ++b) {
      for (int t = 0; t < kThreads; ++t) {
        REQUIRE(out[b * kThreads + t] == in[b * kThreads + (t + shift) % kThreads]);
      }
    }
  }
}

TEST_CASE("CUDA emulation: warp shuffles and ballots equal per-warp host reductions",
          "[cuda_emulation]") {
  std::mt19937 rng(32);
  const int blocks = 2, n = blocks * kThreads;
  const auto in = random_values<float>(n, rng, -1.0f, 1.0f);
  std::vector<float> sum(n), max(n), lane5(n);
  std::vector<uint32_t> ballot(n);
  exec::launch<kThreads>(warp_kernel, dim3(blocks), dim3(kThreads), nullptr, "warp_kernel",
                         in.data(), sum.data(), max.data(), lane5.data(), ballot.data());
  for (int w = 0; w < n / 32; ++w) {
    double expected_sum = 0.0;
    float expected_max = in[w * 32];
    uint32_t expected_ballot = 0;
    for (int l = 0; l < 32; ++l) {
      expected_sum += in[w * 32 + l];
      expected_max = std::max(expected_max, in[w * 32 + l]);
      if (in[w * 32 + l] > 0.0f) expected_ballot |= 1u << l;
    }
    for (int l = 0; l < 32; ++l) {
      const int i = w * 32 + l;
      REQUIRE(sum[i] == Approx(expected_sum).margin(1e-5));
      REQUIRE(sum[i] == sum[w * 32]);  // a butterfly leaves every lane the same bits
      REQUIRE(max[i] == expected_max);
      REQUIRE(lane5[i] == in[w * 32 + 5]);
      REQUIRE(ballot[i] == expected_ballot);
    }
  }
}

TEST_CASE("CUDA emulation: block_exclusive_sum equals the host exclusive scan",
          "[cuda_emulation]") {
  std::mt19937 rng(33);
  for (int trial = 0; trial < 4; ++trial) {
    const auto in = random_values<int>(kThreads, rng, 0, trial == 0 ? 1 : 50);
    std::vector<int> offset(kThreads, -1), total(kThreads, -1);
    exec::launch<kThreads>(scan_kernel, dim3(1), dim3(kThreads), nullptr, "scan_kernel", in.data(),
                           offset.data(), total.data());
    int running = 0;
    for (int t = 0; t < kThreads; ++t) {
      REQUIRE(offset[t] == running);
      running += in[t];
    }
    for (int t = 0; t < kThreads; ++t) REQUIRE(total[t] == running);
  }
}

TEST_CASE("CUDA emulation: atomics over every block", "[cuda_emulation]") {
  unsigned long long count = 0, lowest = ~0ull;
  exec::launch<kThreads>(atomic_kernel, dim3(5), dim3(kThreads), nullptr, "atomic_kernel", &count,
                         &lowest);
  REQUIRE(count == 5ull * kThreads);
  REQUIRE(lowest == 7);
}

TEST_CASE("CUDA emulation: shared memory starts as garbage, not zeros", "[cuda_emulation]") {
  std::vector<uint32_t> out(kThreads, 0);
  exec::launch<kThreads>(read_shared_kernel, dim3(1), dim3(kThreads), nullptr, "read_shared_kernel",
                         out.data());
  for (uint32_t x : out) REQUIRE(x == 0xFFFFFFFFu);
}

TEST_CASE("CUDA emulation: what a GPU hangs on or leaves undefined is an error",
          "[cuda_emulation][errors]") {
  std::vector<float> f(kThreads);
  std::vector<uint32_t> u(kThreads);
  REQUIRE_THROWS_WITH(exec::launch<kThreads>(split_barrier_kernel, dim3(1), dim3(kThreads), nullptr,
                                             "split_barrier_kernel", nullptr),
                      Contains("deadlock") && Contains("split_barrier_kernel") &&
                          Contains("thread 0 at sync_block") && Contains("thread 1 at sync_warp"));
  REQUIRE_THROWS_WITH(exec::launch<kThreads>(exited_lanes_kernel, dim3(1), dim3(kThreads), nullptr,
                                             "exited_lanes_kernel", f.data()),
                      Contains("full-mask shfl_xor after 16 lanes of the warp exited"));
  REQUIRE_THROWS_WITH(
      exec::launch<kThreads>(mixed_collectives_kernel, dim3(1), dim3(kThreads), nullptr,
                             "mixed_collectives_kernel", u.data()),
      Contains("lanes of one warp at different warp collectives (ballot and shfl)"));
  REQUIRE_THROWS_WITH(exec::launch<kThreads>(oversized_shared_kernel, dim3(1), dim3(kThreads),
                                             nullptr, "oversized_shared_kernel", f.data()),
                      Contains("53248 bytes of static shared memory, over the 49152-byte limit"));
  // The launch that failed left no block behind: the next one runs.
  std::vector<int> in(kThreads, 3), out(kThreads, 0);
  exec::launch<kThreads>(rotate_kernel, dim3(1), dim3(kThreads), nullptr, "rotate_kernel",
                         in.data(), out.data(), 1);
  REQUIRE(out == in);
  REQUIRE_THROWS_WITH(exec::thread_x(), Contains("a device function ran outside a kernel"));
}

TEST_CASE("CUDA emulation: launch configurations a GPU refuses are refused",
          "[cuda_emulation][errors]") {
  std::vector<int> in(4096, 1), out(4096, 0);
  auto launch = [&](dim3 grid, dim3 block) {
    exec::launch<kThreads>(rotate_kernel, grid, block, nullptr, "rotate_kernel", in.data(),
                           out.data(), 1);
  };
  REQUIRE_THROWS_WITH(launch(dim3(0), dim3(kThreads)), Contains("an empty grid or block"));
  REQUIRE_THROWS_WITH(launch(dim3(1), dim3(0)), Contains("an empty grid or block"));
  REQUIRE_THROWS_WITH(launch(dim3(1), dim3(2048)), Contains("more than 1024 threads per block"));
  REQUIRE_THROWS_WITH(launch(dim3(1), dim3(256)),
                      Contains("more threads per block than the kernel's launch bound"));
  REQUIRE_THROWS_WITH(launch(dim3(1), dim3(48)), Contains("not whole warps"));
  REQUIRE_THROWS_WITH(
      launch(dim3(1, 70000), dim3(kThreads)),
      Contains("a grid extent over the device limits") && Contains("grid (1, 70000, 1)"));
  REQUIRE(std::all_of(out.begin(), out.end(), [](int x) { return x == 0; }));  // nothing ran
}

TEST_CASE("CUDA emulation: device memory is told from host memory", "[cuda_emulation]") {
  void* device = nullptr;
  REQUIRE(cudaMalloc(&device, 64) == cudaSuccess);
  std::vector<unsigned char> host(64, 7);
  cudaPointerAttributes attributes{};
  REQUIRE(cudaPointerGetAttributes(&attributes, static_cast<unsigned char*>(device) + 63) ==
          cudaSuccess);
  REQUIRE(attributes.type == cudaMemoryTypeDevice);
  REQUIRE(cudaPointerGetAttributes(&attributes, host.data()) == cudaSuccess);
  REQUIRE(attributes.type == cudaMemoryTypeUnregistered);
  REQUIRE(cudaMemcpy(device, host.data(), 64, cudaMemcpyHostToDevice) == cudaSuccess);
  // Directions that do not match the pointers, and a copy past the allocation, fail as on a GPU.
  REQUIRE(cudaMemcpy(host.data(), device, 64, cudaMemcpyHostToDevice) == cudaErrorInvalidValue);
  REQUIRE(cudaGetLastError() == cudaErrorInvalidValue);
  REQUIRE(cudaGetLastError() == cudaSuccess);  // read and cleared
  REQUIRE(cudaMemcpy(device, host.data(), 65, cudaMemcpyHostToDevice) == cudaErrorInvalidValue);
  REQUIRE(cudaMemset(host.data(), 0, 4) == cudaErrorInvalidValue);
  std::vector<unsigned char> back(64, 0);
  REQUIRE(cudaMemcpy(back.data(), device, 64, cudaMemcpyDeviceToHost) == cudaSuccess);
  REQUIRE(back == host);
  REQUIRE(cudaFree(device) == cudaSuccess);
  REQUIRE(cudaFree(device) == cudaErrorInvalidValue);  // freed twice
  std::size_t free_bytes = 0, total_bytes = 0;
  REQUIRE(cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess);
  REQUIRE(free_bytes <= total_bytes);
}
