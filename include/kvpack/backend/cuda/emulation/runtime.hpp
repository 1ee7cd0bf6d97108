/// \file backend/cuda/emulation/runtime.hpp
/// \brief The part of the CUDA runtime API kvpack's CUDA backend and its tests use, on the host:
/// one emulated device whose memory is host heap, streams that run work when it is enqueued,
/// and kernel launches on the emulated grid (grid.hpp).
///
/// Declared in the global namespace with the runtime's own names, so the backend's host code
/// (backend/cuda/*.cuh) compiles unchanged in a host build that defines KVPACK_CUDA_EMULATION.
/// Never include it together with <cuda_runtime.h>; include backend/cuda/runtime.hpp, which
/// picks one. Device allocations are registered, so cudaPointerGetAttributes tells device from
/// host memory and a copy whose device side is not inside an allocation fails with
/// cudaErrorInvalidValue, as on a GPU. KVPACK_EMULATED_DEVICE_BYTES (environment, bytes) caps the
/// emulated device memory, so allocation failures can be tested.
#pragma once

#if !defined(KVPACK_CUDA_EMULATION)
#error "kvpack/backend/cuda/emulation/*.hpp are for host builds that define KVPACK_CUDA_EMULATION"
#endif

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>

#include "grid.hpp"

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidDevice = 101,
};
using cudaError = cudaError_t;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaMemoryType {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3,
};

struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

struct cudaDeviceProp {
  char name[256];
  int major;
  int minor;
  int multiProcessorCount;
  std::size_t totalGlobalMem;
};

struct CUstream_st {};
using cudaStream_t = CUstream_st*;
constexpr unsigned cudaStreamNonBlocking = 1;
struct CUevent_st {};
using cudaEvent_t = CUevent_st*;
constexpr unsigned cudaEventDisableTiming = 2;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};

namespace kvpack {
namespace cuda {
namespace emulation {

/// SMs the emulated device reports (sizes split-K grids as a small GPU would).
constexpr int kEmulatedSmCount = 4;

/// The emulated device's allocations (base -> bytes) and the thread's last error.
struct DeviceMemory {
  std::mutex mutex;
  std::map<const unsigned char*, std::size_t> allocations;
  std::size_t used = 0;
  std::size_t limit = 0;

  DeviceMemory() {
    const char* cap = std::getenv("KVPACK_EMULATED_DEVICE_BYTES");
    limit = cap != nullptr ? static_cast<std::size_t>(std::strtoull(cap, nullptr, 10))
                           : (std::size_t{16} << 30);
  }

  /// Bytes from `p` to the end of the allocation holding it; 0 when none holds it.
  std::size_t room(const void* p) {
    const auto* byte = static_cast<const unsigned char*>(p);
    std::lock_guard<std::mutex> lock(mutex);
    auto it = allocations.upper_bound(byte);
    if (it == allocations.begin()) return 0;
    --it;
    const std::size_t offset = static_cast<std::size_t>(byte - it->first);
    return offset < it->second ? it->second - offset : 0;
  }
};

inline DeviceMemory& device_memory() {
  static DeviceMemory memory;
  return memory;
}

inline cudaError_t& last_error() {
  thread_local cudaError_t error = cudaSuccess;
  return error;
}

inline cudaError_t fail(cudaError_t status) {
  last_error() = status;
  return status;
}

/// Host waits for the whole stream or device (cudaStreamSynchronize, cudaDeviceSynchronize) since
/// the program started: tests count them to show that a call does not wait for the device.
inline std::atomic<long long>& synchronizations() {
  static std::atomic<long long> count{0};
  return count;
}

/// Checks that [p, p + bytes) lies in device memory (kDevice) or outside it (kHost).
inline bool in_space(const void* p, std::size_t bytes, bool device) {
  if (bytes == 0) return true;
  const std::size_t room = device_memory().room(p);
  return device ? room >= bytes : room == 0;
}

}  // namespace emulation
}  // namespace cuda
}  // namespace kvpack

inline const char* cudaGetErrorName(cudaError_t status) {
  switch (status) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
  }
  return "cudaErrorUnknown";
}

inline const char* cudaGetErrorString(cudaError_t status) {
  switch (status) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
  }
  return "unknown error";
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t status = kvpack::cuda::emulation::last_error();
  kvpack::cuda::emulation::last_error() = cudaSuccess;
  return status;
}

inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : kvpack::cuda::emulation::fail(cudaErrorInvalidDevice);
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) return kvpack::cuda::emulation::fail(cudaErrorInvalidDevice);
  if (attribute != cudaDevAttrMultiProcessorCount) {
    return kvpack::cuda::emulation::fail(cudaErrorInvalidValue);
  }
  *value = kvpack::cuda::emulation::kEmulatedSmCount;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return kvpack::cuda::emulation::fail(cudaErrorInvalidDevice);
  *prop = cudaDeviceProp{};
  std::strcpy(prop->name, "kvpack emulated grid (CPU)");
  prop->major = 9;
  prop->multiProcessorCount = kvpack::cuda::emulation::kEmulatedSmCount;
  prop->totalGlobalMem = kvpack::cuda::emulation::device_memory().limit;
  return cudaSuccess;
}

inline cudaError_t cudaMalloc(void** ptr, std::size_t bytes) {
  auto& memory = kvpack::cuda::emulation::device_memory();
  std::lock_guard<std::mutex> lock(memory.mutex);
  if (bytes > memory.limit - memory.used) {
    return kvpack::cuda::emulation::fail(cudaErrorMemoryAllocation);
  }
  // 256-byte aligned like cudaMalloc; at least one byte so every allocation has its own address.
  void* p = ::operator new (bytes == 0 ? 1 : bytes, std::align_val_t{256}, std::nothrow);
  if (p == nullptr) return kvpack::cuda::emulation::fail(cudaErrorMemoryAllocation);
  memory.allocations.emplace(static_cast<const unsigned char*>(p), bytes);
  memory.used += bytes;
  *ptr = p;
  return cudaSuccess;
}

inline cudaError_t cudaFree(void* ptr) {
  if (ptr == nullptr) return cudaSuccess;
  auto& memory = kvpack::cuda::emulation::device_memory();
  std::lock_guard<std::mutex> lock(memory.mutex);
  auto it = memory.allocations.find(static_cast<const unsigned char*>(ptr));
  if (it == memory.allocations.end()) return kvpack::cuda::emulation::fail(cudaErrorInvalidValue);
  memory.used -= it->second;
  memory.allocations.erase(it);
  ::operator delete (ptr, std::align_val_t{256});
  return cudaSuccess;
}

inline cudaError_t cudaMemGetInfo(std::size_t* free_bytes, std::size_t* total_bytes) {
  auto& memory = kvpack::cuda::emulation::device_memory();
  std::lock_guard<std::mutex> lock(memory.mutex);
  *free_bytes = memory.limit - memory.used;
  *total_bytes = memory.limit;
  return cudaSuccess;
}

inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* ptr) {
  *attributes = cudaPointerAttributes{};
  const bool device = kvpack::cuda::emulation::device_memory().room(ptr) > 0;
  attributes->type = device ? cudaMemoryTypeDevice : cudaMemoryTypeUnregistered;
  attributes->device = device ? 0 : -2;
  attributes->devicePointer = device ? const_cast<void*>(ptr) : nullptr;
  attributes->hostPointer = device ? nullptr : const_cast<void*>(ptr);
  return cudaSuccess;
}

inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  using kvpack::cuda::emulation::in_space;
  bool ok = true;
  switch (kind) {
    case cudaMemcpyHostToDevice:
      ok = in_space(dst, bytes, true) && in_space(src, bytes, false);
      break;
    case cudaMemcpyDeviceToHost:
      ok = in_space(dst, bytes, false) && in_space(src, bytes, true);
      break;
    case cudaMemcpyDeviceToDevice:
      ok = in_space(dst, bytes, true) && in_space(src, bytes, true);
      break;
    case cudaMemcpyHostToHost:
      ok = in_space(dst, bytes, false) && in_space(src, bytes, false);
      break;
    default:
      break;
  }
  if (!ok) return kvpack::cuda::emulation::fail(cudaErrorInvalidValue);
  if (bytes > 0) std::memmove(dst, src, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes,
                                   cudaMemcpyKind kind, cudaStream_t /*stream*/ = nullptr) {
  return cudaMemcpy(dst, src, bytes, kind);
}

inline cudaError_t cudaMemset(void* dst, int value, std::size_t bytes) {
  if (!kvpack::cuda::emulation::in_space(dst, bytes, true)) {
    return kvpack::cuda::emulation::fail(cudaErrorInvalidValue);
  }
  if (bytes > 0) std::memset(dst, value, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaMemsetAsync(void* dst, int value, std::size_t bytes,
                                   cudaStream_t /*stream*/ = nullptr) {
  return cudaMemset(dst, value, bytes);
}

inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned /*flags*/) {
  *stream = new CUstream_st;
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  return cudaStreamCreateWithFlags(stream, 0);
}
inline cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete stream;
  return cudaSuccess;
}
/// Work runs when it is enqueued, so there is nothing to wait for; the wait is counted.
inline cudaError_t cudaStreamSynchronize(cudaStream_t /*stream*/) {
  ++kvpack::cuda::emulation::synchronizations();
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() {
  ++kvpack::cuda::emulation::synchronizations();
  return cudaSuccess;
}

/// Events mark a point of a stream; the work before it is done when it is recorded.
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned /*flags*/) {
  *event = new CUevent_st;
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t /*stream*/ = nullptr) {
  return event != nullptr ? cudaSuccess : kvpack::cuda::emulation::fail(cudaErrorInvalidValue);
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  return event != nullptr ? cudaSuccess : kvpack::cuda::emulation::fail(cudaErrorInvalidValue);
}

/// Page-locked host memory is plain host memory here (outside the device's allocations).
inline cudaError_t cudaMallocHost(void** ptr, std::size_t bytes) {
  *ptr = ::operator new(bytes == 0 ? 1 : bytes, std::nothrow);
  return *ptr != nullptr ? cudaSuccess : kvpack::cuda::emulation::fail(cudaErrorMemoryAllocation);
}
inline cudaError_t cudaFreeHost(void* ptr) {
  ::operator delete(ptr);
  return cudaSuccess;
}
