// tests/cuda/linalg_test.cu in a host build with KVPACK_CUDA_EMULATION: the linear algebra
// interface's Eigen implementation against the same double-precision references.
#define KVPACK_CUDA_EMULATION 1
#include "../cuda/linalg_test.cu"
