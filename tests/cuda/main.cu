// Catch2 v2 main for the CUDA unit tests (tests/cuda/*.cu).
//
// Without a usable CUDA device the tests are skipped, not failed: the program prints why and
// returns 77, which CTest reports as "Skipped" (SKIP_RETURN_CODE in tests/CMakeLists.txt).
// Listing the test cases (--list-*, -l, -t, -h) works without a device.
#define CATCH_CONFIG_RUNNER
#include <cuda_runtime.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <cstring>

namespace {

constexpr int kSkipReturnCode = 77;

bool only_lists_or_helps(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const char* arg = argv[i];
    if (std::strncmp(arg, "--list", 6) == 0 || std::strcmp(arg, "-l") == 0 ||
        std::strcmp(arg, "-t") == 0 || std::strcmp(arg, "-h") == 0 || std::strcmp(arg, "-?") == 0 ||
        std::strcmp(arg, "--help") == 0) {
      return true;
    }
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (!only_lists_or_helps(argc, argv)) {
    int device_count = 0;
    const cudaError_t status = cudaGetDeviceCount(&device_count);
    if (status != cudaSuccess || device_count == 0) {
      std::printf("no CUDA device; CUDA tests skipped (cudaGetDeviceCount: %s, %d devices)\n",
                  status == cudaSuccess ? "ok" : cudaGetErrorString(status), device_count);
      return kSkipReturnCode;
    }
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
      std::printf("CUDA device 0: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
    }
  }
  return Catch::Session().run(argc, argv);
}
