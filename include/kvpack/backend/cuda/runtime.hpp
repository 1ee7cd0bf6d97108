/// \file backend/cuda/runtime.hpp
/// \brief The CUDA runtime API for kvpack's CUDA code: the toolkit's <cuda_runtime_api.h>, or,
/// in a host build that defines KVPACK_CUDA_EMULATION, the emulated device of
/// emulation/runtime.hpp (CPU-only CI runs the CUDA backend and its kernels through it).
#pragma once

#if defined(KVPACK_CUDA_EMULATION)
#if defined(__CUDACC__)
#error "KVPACK_CUDA_EMULATION is for host builds; nvcc builds run the kernels on the GPU"
#endif
#include "emulation/runtime.hpp"
#else
#include <cuda_runtime_api.h>
#endif
