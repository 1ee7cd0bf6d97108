// tests/cuda/low_rank_test.cu in a host build with KVPACK_CUDA_EMULATION: the device
// factorisation (GEMM + eigen-decomposition through linalg.hpp's Eigen implementation).
#define KVPACK_CUDA_EMULATION 1
#include "../cuda/low_rank_test.cu"
