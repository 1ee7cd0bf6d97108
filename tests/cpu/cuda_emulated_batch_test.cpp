// tests/cuda/batch_test.cu on the emulated CUDA grid (backend/cuda/emulation/): KVCacheBatch<Policy,
// backend::Cuda>'s one-launch attend against each sequence's attend and the CPU batch.
#define KVPACK_CUDA_EMULATION 1
#include "../cuda/batch_test.cu"
