// tests/cuda/backend_ops_test.cu on the emulated CUDA grid (backend/cuda/emulation/): the
// cross-backend test table on the CUDA backend. The same kernel source nvcc compiles runs here on
// the CPU, under this binary's sanitizers, so CPU-only CI executes every CUDA kernel; on a GPU,
// kvpack_cuda_tests runs the file natively.
#define KVPACK_CUDA_EMULATION 1
#include "../cuda/backend_ops_test.cu"
