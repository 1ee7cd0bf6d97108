// tests/cuda/batch_test.cu on the emulated CUDA grid (backend/cuda/emulation/): the CUDA
// KVCacheBatch's one-launch attend against each sequence's attend and the CPU batch, and fork.
#define KVPACK_CUDA_EMULATION 1
#include "../cuda/batch_test.cu"
