/// \file config.hpp
/// \brief Version, host/device annotation macro and CUDA availability switch.
#pragma once

#define KVPACK_VERSION_MAJOR 0
#define KVPACK_VERSION_MINOR 1
#define KVPACK_VERSION_PATCH 0

// KVPACK_HOST_DEVICE marks per-element / per-tile logic shared by the CPU backend and the CUDA
// kernels. Without nvcc it degrades to `inline`, so the CPU tests exercise the same functions.
#if defined(__CUDACC__)
#define KVPACK_HOST_DEVICE __host__ __device__ inline
#define KVPACK_DEVICE __device__ inline
#else
#define KVPACK_HOST_DEVICE inline
#define KVPACK_DEVICE inline  // host builds of the kernels: the emulated grid
#endif

// KVPACK_HAS_CUDA only says whether the CUDA backend headers may be included; it never changes
// what KVCache<P, backend::Cpu> means.
#if !defined(KVPACK_HAS_CUDA)
#if defined(__CUDACC__)
#define KVPACK_HAS_CUDA 1
#else
#define KVPACK_HAS_CUDA 0
#endif
#endif

// Lets detail headers refuse direct inclusion with a message that names the public header.
#define KVPACK_INTERNAL_INCLUDE_OK 1
