/// \file backend/tags.hpp
/// \brief Backend tag types that select an implementation at compile time.
#pragma once

#include <type_traits>

namespace kvpack {
namespace backend {

/// \brief CPU backend: Eigen for dense algebra, plain loops (OpenMP) for the rest.
struct Cpu {};
/// \brief CUDA backend: kernels, cuBLAS and cuSOLVER. Include <kvpack/backend/cuda.hpp> (nvcc).
struct Cuda {};

}  // namespace backend

namespace detail {
/// For static_asserts in primary templates that must not be instantiated.
template <class...>
inline constexpr bool dependent_false = false;
}  // namespace detail
}  // namespace kvpack
