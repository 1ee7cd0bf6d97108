// Helpers of the CUDA tests (native on a GPU, or on the emulated grid through the
// tests/cpu/cuda_emulated_*_test.cpp wrappers): device presence and host <-> device copies.
#pragma once

#include <cstddef>
#include <kvpack/backend/cuda.hpp>
#include <kvpack/backend/cuda/runtime.hpp>
#include <vector>

namespace kvpack {
namespace test {

inline bool device_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

/// A device buffer holding a copy of `host`.
template <class T>
cuda::DeviceBuffer<T> upload(const std::vector<T>& host) {
  cuda::DeviceBuffer<T> buffer(host.size(), 0);
  if (!host.empty()) {
    cuda::check_cuda(cudaMemcpy(buffer.data(), host.data(), buffer.bytes(), cudaMemcpyHostToDevice),
                     "test upload");
  }
  return buffer;
}

/// The first `count` elements of `buffer`, on the host.
template <class T>
std::vector<T> download(const cuda::DeviceBuffer<T>& buffer, std::size_t count) {
  std::vector<T> host(count);
  if (count > 0) {
    cuda::check_cuda(
        cudaMemcpy(host.data(), buffer.data(), count * sizeof(T), cudaMemcpyDeviceToHost),
        "test download");
  }
  return host;
}

}  // namespace test
}  // namespace kvpack

#define KVPACK_SKIP_WITHOUT_DEVICE()           \
  do {                                         \
    if (!kvpack::test::device_available()) {   \
      SUCCEED("no CUDA device: test skipped"); \
      return;                                  \
    }                                          \
  } while (0)
