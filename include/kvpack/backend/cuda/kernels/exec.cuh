/// \file backend/cuda/kernels/exec.cuh
/// \brief The execution layer every kvpack kernel is written against: thread and block indices,
/// shared memory, block barriers, warp shuffles / votes, atomics and the launch itself.
///
/// Under nvcc each call is the CUDA built-in it names. In a host build that defines
/// KVPACK_CUDA_EMULATION the same kernel source runs on the emulated grid
/// (backend/cuda/emulation/grid.hpp): blocks one after another, threads as fibers with real
/// barrier semantics, warp collectives exchanged among the 32 lanes, 48 KiB of static shared
/// memory per block. Kernels name no CUDA built-in directly, so CPU-only CI executes them.
///
/// Kernels declare themselves `KVPACK_GLOBAL void KVPACK_LAUNCH_BOUNDS(n) name(...)`, declare
/// shared memory with KVPACK_SHARED / KVPACK_SHARED_ARRAY, and are launched with
/// exec::launch<n>(kernel, grid, block, stream, args...), where n is the launch bound.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../../../config.hpp"
#include "../runtime.hpp"

#if defined(__CUDACC__)
#define KVPACK_GLOBAL __global__
#define KVPACK_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
/// Declares a block-shared object `name` of type `type`.
#define KVPACK_SHARED(type, name) __shared__ type name
/// Declares a block-shared array `name` of `count` elements of `type`.
#define KVPACK_SHARED_ARRAY(type, name, count) __shared__ type name[count]
#elif defined(KVPACK_CUDA_EMULATION)
#include <functional>
#include <tuple>
#define KVPACK_GLOBAL inline
#define KVPACK_LAUNCH_BOUNDS(threads)
// The address of a function-local static tells declaration sites (and template instances)
// apart, so every thread of a block gets the same storage for the same declaration.
#define KVPACK_SHARED(type, name)           \
  static const char name##_shared_site = 0; \
  type& name = *static_cast<type*>(         \
      ::kvpack::cuda::emulation::shared_storage(&name##_shared_site, sizeof(type), alignof(type)))
#define KVPACK_SHARED_ARRAY(type, name, count)                                     \
  static const char name##_shared_site = 0;                                        \
  type* const name = static_cast<type*>(::kvpack::cuda::emulation::shared_storage( \
      &name##_shared_site, sizeof(type) * static_cast<std::size_t>(count), alignof(type)))
#else
#error \
    "kvpack/backend/cuda/kernels/*.cuh contain CUDA kernels: compile them with nvcc, or in a " \
    "host build that defines KVPACK_CUDA_EMULATION (the emulated grid)"
#endif

namespace kvpack {
namespace cuda {
namespace exec {

constexpr int kWarpSize = 32;

#if defined(__CUDACC__)

KVPACK_DEVICE unsigned thread_x() { return threadIdx.x; }
KVPACK_DEVICE unsigned block_x() { return blockIdx.x; }
KVPACK_DEVICE unsigned block_y() { return blockIdx.y; }
KVPACK_DEVICE unsigned block_z() { return blockIdx.z; }
KVPACK_DEVICE unsigned block_threads() { return blockDim.x; }
KVPACK_DEVICE unsigned grid_x() { return gridDim.x; }
KVPACK_DEVICE unsigned grid_y() { return gridDim.y; }

KVPACK_DEVICE void sync_block() { __syncthreads(); }
KVPACK_DEVICE void sync_warp() { __syncwarp(); }

/// Value of lane (this lane ^ mask) of the warp; every lane of the warp must call it.
template <class T>
KVPACK_DEVICE T shfl_xor(T x, int mask) {
  return __shfl_xor_sync(0xFFFFFFFFu, x, mask);
}
/// Value of lane `src` of the warp; every lane of the warp must call it.
template <class T>
KVPACK_DEVICE T shfl(T x, int src) {
  return __shfl_sync(0xFFFFFFFFu, x, src);
}
/// Bit l set when lane l's predicate holds; every lane of the warp must call it.
KVPACK_DEVICE uint32_t ballot(bool predicate) { return __ballot_sync(0xFFFFFFFFu, predicate); }

template <class T>
KVPACK_DEVICE T atomic_add(T* address, T value) {
  return atomicAdd(address, value);
}
template <class T>
KVPACK_DEVICE T atomic_min(T* address, T value) {
  return atomicMin(address, value);
}

/// Enqueues kernel<<<grid, block, 0, stream>>>(args...); `Bound` is the kernel's launch bound.
template <int Bound, class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
            const char* /*name*/, Args&&... args) {
  kernel<<<grid, block, 0, stream>>>(static_cast<Params>(args)...);
}

#else  // KVPACK_CUDA_EMULATION

inline const emulation::Fiber& fiber() { return emulation::self(); }
inline unsigned thread_x() { return fiber().thread_idx.x; }
inline unsigned block_x() { return emulation::current_block()->block_idx.x; }
inline unsigned block_y() { return emulation::current_block()->block_idx.y; }
inline unsigned block_z() { return emulation::current_block()->block_idx.z; }
inline unsigned block_threads() { return emulation::current_block()->block_dim.x; }
inline unsigned grid_x() { return emulation::current_block()->grid_dim.x; }
inline unsigned grid_y() { return emulation::current_block()->grid_dim.y; }

inline void sync_block() { emulation::sync_block(); }
inline void sync_warp() { emulation::warp_collective(emulation::WarpOp::kSync, 0, 0); }

template <class T>
uint64_t to_lane_bits(T x) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "warp shuffles move values of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &x, sizeof(T));
  return bits;
}
template <class T>
T from_lane_bits(uint64_t bits) {
  T x;
  std::memcpy(&x, &bits, sizeof(T));
  return x;
}

template <class T>
T shfl_xor(T x, int mask) {
  return from_lane_bits<T>(
      emulation::warp_collective(emulation::WarpOp::kShuffleXor, to_lane_bits(x), mask));
}
template <class T>
T shfl(T x, int src) {
  return from_lane_bits<T>(
      emulation::warp_collective(emulation::WarpOp::kShuffle, to_lane_bits(x), src));
}
inline uint32_t ballot(bool predicate) {
  return static_cast<uint32_t>(
      emulation::warp_collective(emulation::WarpOp::kBallot, predicate ? 1 : 0, 0));
}

// Blocks run one at a time and a fiber is never switched inside a call, so a plain
// read-modify-write is atomic here.
template <class T>
T atomic_add(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <class T>
T atomic_min(T* address, T value) {
  const T old = *address;
  if (value < old) *address = value;
  return old;
}

template <int Bound, class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t /*stream*/,
            const char* name, Args&&... args) {
  // Arguments are converted and copied once, as a launch copies them to the device.
  std::tuple<std::decay_t<Params>...> copied(static_cast<Params>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, copied); };
  emulation::launch(name, emulation::Dim3{grid.x, grid.y, grid.z},
                    emulation::Dim3{block.x, block.y, block.z}, Bound, body);
}

#endif

}  // namespace exec
}  // namespace cuda
}  // namespace kvpack
