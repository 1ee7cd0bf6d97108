// tests/cuda/kivi_test.cu on the emulated CUDA grid (backend/cuda/emulation/): the KIVI quantize
// kernels against the CPU quantizer and KIVI attention against a double-precision reference, the
// kernel source nvcc compiles run on the CPU under this binary's sanitizers.
#define KVPACK_CUDA_EMULATION 1
#include "../cuda/kivi_test.cu"
