/// \file backend/cuda/context.hpp
/// \brief Caller-owned CUDA resources (device, stream, cuBLAS / cuSOLVER handles), error checks
/// that throw kvpack::error, and an RAII device buffer.
///
/// Host API only: this header compiles with any C++17 compiler that sees the CUDA toolkit's
/// include directory (cuda_runtime_api.h, cublas_v2.h, cusolverDn.h); it needs no nvcc. In a
/// host build with KVPACK_CUDA_EMULATION it runs on the emulated device (runtime.hpp) and has no
/// cuBLAS / cuSOLVER handles: linalg.hpp, their one user, calls Eigen there instead.
#pragma once

#if !defined(KVPACK_CUDA_EMULATION)
#include <cublas_v2.h>
#include <cusolverDn.h>
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#include "../../error.hpp"
#include "runtime.hpp"

namespace kvpack {

/// Where the data of a view lives. The CUDA cache accepts host views (copied to the device) and
/// device views (read in place). Positions say where they live themselves (Positions::device;
/// only the query positions of attention and scoring may be on the device).
enum class MemorySpace { kHost, kDevice };

namespace cuda {

/// Throws kvpack::error("<what>: CUDA error <name> (<description>)") unless `status` is success.
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw error(detail::concat(what, ": CUDA error ", cudaGetErrorName(status), " (",
                               cudaGetErrorString(status), ")"));
  }
}

/// Checks the launch of the kernel just enqueued (bad configuration, missing device code).
inline void check_launch(const char* kernel) {
  check_cuda(cudaGetLastError(), detail::concat("launch of ", kernel).c_str());
}

#if !defined(KVPACK_CUDA_EMULATION)
/// Throws kvpack::error("<what>: cuBLAS error <name> (<description>)") unless success.
inline void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw error(detail::concat(what, ": cuBLAS error ", cublasGetStatusName(status), " (",
                               cublasGetStatusString(status), ")"));
  }
}

/// Name of a cuSOLVER status (the library has no string function of its own).
inline const char* cusolver_status_name(cusolverStatus_t status) {
  switch (status) {
    case CUSOLVER_STATUS_SUCCESS:
      return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED:
      return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED:
      return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE:
      return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH:
      return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_MAPPING_ERROR:
      return "CUSOLVER_STATUS_MAPPING_ERROR";
    case CUSOLVER_STATUS_EXECUTION_FAILED:
      return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR:
      return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED:
      return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED:
      return "CUSOLVER_STATUS_NOT_SUPPORTED";
    case CUSOLVER_STATUS_ZERO_PIVOT:
      return "CUSOLVER_STATUS_ZERO_PIVOT";
    case CUSOLVER_STATUS_INVALID_LICENSE:
      return "CUSOLVER_STATUS_INVALID_LICENSE";
    case CUSOLVER_STATUS_INVALID_WORKSPACE:
      return "CUSOLVER_STATUS_INVALID_WORKSPACE";
    default:
      return "CUSOLVER_STATUS_<other>";
  }
}

/// Throws kvpack::error("<what>: cuSOLVER error <name> (code <n>)") unless success.
inline void check_cusolver(cusolverStatus_t status, const char* what) {
  if (status != CUSOLVER_STATUS_SUCCESS) {
    throw error(detail::concat(what, ": cuSOLVER error ", cusolver_status_name(status), " (code ",
                               static_cast<int>(status), ")"));
  }
}

#endif

/// \brief Makes `device` current for a scope and restores the previous device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

/// \brief Caller-owned CUDA resources: a device, a stream on it, and cuBLAS / cuSOLVER handles
/// bound to that stream (created on first use, so policies that need neither pay nothing).
///
/// Everything kvpack enqueues for a cache runs on this stream: kvpack's own (created here) or the
/// engine's (borrowed). Calls wait for the device only where the host needs a result: a value
/// check of device inputs (device_value_checks()), a host output, allocation decisions that
/// depend on device results (compress). With the checks off, attend(), observe(),
/// attend_observe() and KVCacheBatch::attend() from and to device memory, and append() into
/// allocated capacity, return without waiting; their results are ready in stream order (a device
/// fault is then reported by a later call). The context must outlive every
/// cache that uses it. Not copyable or movable: caches hold its address.
class CudaContext {
 public:
  /// Creates a non-blocking stream on `device`; throws kvpack::error when the device does not
  /// exist or CUDA cannot start.
  explicit CudaContext(int device = 0) : device_(device) {
    start("CudaContext");
    DeviceGuard guard(device_);
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
               "CudaContext: cudaStreamCreateWithFlags");
    owns_stream_ = true;
    read_sm_count();
  }

  /// Runs on the engine's `stream` of `device` (borrowed: never destroyed here; it must outlive
  /// the context). The legacy default stream (nullptr) is refused: it synchronises with every
  /// other blocking stream, which is what an engine's own stream avoids.
  CudaContext(int device, cudaStream_t stream) : device_(device), stream_(stream) {
    start("CudaContext");
    detail::require(stream != nullptr, "CudaContext", "stream", "the default stream (nullptr)",
                    "a stream the engine created on the device");
    read_sm_count();
  }

  /// Whether device views passed in (append, attend, observe) are checked for non-finite or
  /// out-of-range values, as host views always are. On (the default), a bad value gets the host
  /// check's error and changes nothing; the check waits for the device once per checked view
  /// (device positions: once more, for their copy). Off, an
  /// engine that vouches for its tensors runs without that wait, and nothing checks them: a
  /// non-finite query gives a non-finite output; a non-finite key or value is stored and spoils
  /// the attention over it (host views are checked either way).
  bool device_value_checks() const { return device_value_checks_; }
  void set_device_value_checks(bool on) { device_value_checks_ = on; }

  ~CudaContext() {
    int previous = 0;
    const bool restore = cudaGetDevice(&previous) == cudaSuccess;
    cudaSetDevice(device_);
#if !defined(KVPACK_CUDA_EMULATION)
    if (cusolver_ != nullptr) cusolverDnDestroy(cusolver_);
    if (cublas_ != nullptr) cublasDestroy(cublas_);
#endif
    if (owns_stream_ && stream_ != nullptr) cudaStreamDestroy(stream_);
    if (restore) cudaSetDevice(previous);
  }

  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  /// Streaming multiprocessors of the device (sizes the split-K attention grid).
  int sm_count() const { return sm_count_; }

#if !defined(KVPACK_CUDA_EMULATION)
  /// cuBLAS handle bound to stream(); created on first call.
  cublasHandle_t cublas() {
    if (cublas_ == nullptr) {
      DeviceGuard guard(device_);
      cublasHandle_t handle = nullptr;
      check_cublas(cublasCreate(&handle), "CudaContext: cublasCreate");
      const cublasStatus_t status = cublasSetStream(handle, stream_);
      if (status != CUBLAS_STATUS_SUCCESS) cublasDestroy(handle);
      check_cublas(status, "CudaContext: cublasSetStream");
      cublas_ = handle;
    }
    return cublas_;
  }

  /// cuSOLVER dense handle bound to stream(); created on first call.
  cusolverDnHandle_t cusolver() {
    if (cusolver_ == nullptr) {
      DeviceGuard guard(device_);
      cusolverDnHandle_t handle = nullptr;
      check_cusolver(cusolverDnCreate(&handle), "CudaContext: cusolverDnCreate");
      const cusolverStatus_t status = cusolverDnSetStream(handle, stream_);
      if (status != CUSOLVER_STATUS_SUCCESS) cusolverDnDestroy(handle);
      check_cusolver(status, "CudaContext: cusolverDnSetStream");
      cusolver_ = handle;
    }
    return cusolver_;
  }

#endif

  /// Waits for everything enqueued on stream(); throws kvpack::error on an asynchronous fault.
  void synchronize(const char* what = "cudaStreamSynchronize") const {
    check_cuda(cudaStreamSynchronize(stream_), what);
  }

 private:
  void start(const char* where) {
    int count = 0;
    check_cuda(cudaGetDeviceCount(&count), detail::concat(where, ": cudaGetDeviceCount").c_str());
    detail::require(device_ >= 0 && device_ < count, where, "device", device_,
                    detail::concat("in [0, ", count, ") (the CUDA devices present)"));
  }
  void read_sm_count() {
    DeviceGuard guard(device_);
    const cudaError_t status =
        cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_);
    if (status != cudaSuccess) {
      if (owns_stream_) cudaStreamDestroy(stream_);
      check_cuda(status, "CudaContext: cudaDeviceGetAttribute(MultiProcessorCount)");
    }
  }

  int device_ = 0;
  int sm_count_ = 1;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = false;
  bool device_value_checks_ = true;
#if !defined(KVPACK_CUDA_EMULATION)
  cublasHandle_t cublas_ = nullptr;
  cusolverDnHandle_t cusolver_ = nullptr;
#endif
};

/// \brief Owning, move-only device allocation of `size()` elements of T (cudaMalloc/cudaFree).
///
/// An empty buffer holds no allocation. Freeing synchronises with the device (cudaFree), so
/// owners drop buffers only when no enqueued work still reads them or after a stream sync.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  /// Allocates `size` elements on `device` (uninitialised); throws kvpack::error on failure.
  DeviceBuffer(std::size_t size, int device) : size_(size), device_(device) {
    if (size_ == 0) return;
    DeviceGuard guard(device_);
    void* ptr = nullptr;
    const cudaError_t status = cudaMalloc(&ptr, size_ * sizeof(T));
    if (status != cudaSuccess) {
      cudaGetLastError();  // clear the (non-sticky) allocation error
      throw error(detail::concat("DeviceBuffer: cudaMalloc of ", size_ * sizeof(T),
                                 " bytes failed: ", cudaGetErrorName(status), " (",
                                 cudaGetErrorString(status), ")"));
    }
    data_ = static_cast<T*>(ptr);
  }
  ~DeviceBuffer() { release(); }

  DeviceBuffer(DeviceBuffer&& other) noexcept { swap(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      release();
      swap(other);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::size_t bytes() const { return size_ * sizeof(T); }
  bool empty() const { return size_ == 0; }

  /// Frees the allocation (if any); the buffer becomes empty.
  void release() noexcept {
    if (data_ != nullptr) {
      int previous = 0;
      const bool restore = cudaGetDevice(&previous) == cudaSuccess && previous != device_;
      if (restore) cudaSetDevice(device_);
      cudaFree(data_);
      if (restore) cudaSetDevice(previous);
    }
    data_ = nullptr;
    size_ = 0;
  }

  void swap(DeviceBuffer& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(device_, other.device_);
  }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
  int device_ = 0;
};

/// A call's device workspace: `buffer`, first grown (geometrically) to at least `bytes`. Calls
/// that return without waiting leave kernels reading the old buffer, so a growth waits for the
/// context's stream before it frees that one (rare: geometric).
inline unsigned char* grown_workspace(DeviceBuffer<unsigned char>& buffer, std::size_t bytes,
                                      CudaContext& context, const char* where) {
  if (buffer.size() < bytes) {
    const std::size_t capacity = std::max(bytes, buffer.size() * 2);
    context.synchronize(where);
    buffer.release();
    buffer = DeviceBuffer<unsigned char>(capacity, context.device());
  }
  return buffer.data();
}

/// \brief Page-locked host memory for one packed upload per call (queries, positions, head
/// tables), reused from call to call without waiting for the device.
///
/// upload() enqueues the copy and records an event behind it; the next acquire() waits for that
/// event only - for the copy, never for the kernels after it - before the host writes the memory
/// again. (A pageable buffer would leave it to the driver whether cudaMemcpyAsync waits.)
class PinnedStaging {
 public:
  PinnedStaging() = default;
  ~PinnedStaging() { release(); }
  PinnedStaging(const PinnedStaging&) = delete;
  PinnedStaging& operator=(const PinnedStaging&) = delete;

  /// At least `bytes` of zero-filled host memory, once the previous upload has read it; throws
  /// kvpack::error when page-locked memory or the event cannot be had.
  unsigned char* acquire(std::size_t bytes) {
    if (pending_) {
      check_cuda(cudaEventSynchronize(uploaded_), "PinnedStaging: wait for the last upload");
      pending_ = false;
    }
    if (capacity_ < bytes) {
      void* grown = nullptr;
      const std::size_t capacity = std::max(bytes, capacity_ * 2);
      check_cuda(cudaMallocHost(&grown, capacity), "PinnedStaging: cudaMallocHost");
      if (data_ != nullptr) cudaFreeHost(data_);
      data_ = static_cast<unsigned char*>(grown);
      capacity_ = capacity;
    }
    if (bytes > 0) std::memset(data_, 0, bytes);
    return data_;
  }

  /// Enqueues the copy of the first `bytes` to `device` on `stream`.
  void upload(void* device, std::size_t bytes, cudaStream_t stream, const char* what) {
    if (bytes == 0) return;
    if (uploaded_ == nullptr) {
      check_cuda(cudaEventCreateWithFlags(&uploaded_, cudaEventDisableTiming), what);
    }
    check_cuda(cudaMemcpyAsync(device, data_, bytes, cudaMemcpyHostToDevice, stream), what);
    check_cuda(cudaEventRecord(uploaded_, stream), what);
    pending_ = true;
  }

  /// Page-locked bytes held.
  std::size_t bytes() const { return capacity_; }

  /// Frees the memory and the event (after the last upload has read it).
  void release() noexcept {
    if (pending_) cudaEventSynchronize(uploaded_);
    if (uploaded_ != nullptr) cudaEventDestroy(uploaded_);
    if (data_ != nullptr) cudaFreeHost(data_);
    uploaded_ = nullptr;
    data_ = nullptr;
    capacity_ = 0;
    pending_ = false;
  }

 private:
  unsigned char* data_ = nullptr;
  std::size_t capacity_ = 0;
  cudaEvent_t uploaded_ = nullptr;
  bool pending_ = false;
};

}  // namespace cuda
}  // namespace kvpack
