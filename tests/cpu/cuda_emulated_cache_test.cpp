// tests/cuda/cache_test.cu on the emulated CUDA grid (backend/cuda/emulation/): KVCache<Policy,
// backend::Cuda> against the CPU cache. The same kernel source nvcc compiles runs here on the CPU,
// under this binary's sanitizers, so CPU-only CI executes every CUDA kernel; on a GPU,
// kvpack_cuda_tests runs the file natively.
#define KVPACK_CUDA_EMULATION 1
#include "../cuda/cache_test.cu"
