/// \file isa.hpp
/// \brief The instruction set the CPU kernels run with, chosen once at run time from the CPU.
///
/// The SIMD kernels are compiled for their instruction set by function target attributes inside
/// the headers, not by the consumer's `-m` flags: a consumer built with the flags `find_package`
/// gives runs the same kernels as a `-march=native` build, and translation units built with
/// different flags agree (every one dispatches the same way, so the linker's choice among their
/// inline copies does not matter). Eigen code (prefill GEMMs, factorizations) still follows the
/// consumer's flags, as Eigen decides its packet size at compile time.
///
/// The choice is the best set the CPU and the OS support, lowered by the environment variable
/// `KVPACK_ISA` (`scalar`, `avx2` or `avx512`) when it is set before the first kernel runs, or by
/// set_cpu_isa() (benchmarks and tests compare the paths in one process).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "error.hpp"

// x86-64 with GCC or Clang: kernels carry target attributes and <immintrin.h> declares every
// intrinsic whatever the flags. nvcc's front end is left out (its host pass compiles the scalar
// path); CUDA translation units use the device backend.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__CUDACC__)
#include <cpuid.h>
#include <immintrin.h>
#define KVPACK_X86_DISPATCH 1
/// Compiles a function for AVX2 + FMA + F16C, whatever the translation unit's flags.
#define KVPACK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
/// Compiles a function for AVX-512 F/BW/VL/DQ (with AVX2 + FMA + F16C), whatever the flags.
#define KVPACK_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
/// KVPACK_TARGET_AVX512 plus VNNI (vpdpbusd) and VBMI (vpermb): the int8-query key kernel.
#define KVPACK_TARGET_AVX512_VNNI                                             \
  __attribute__((                                                             \
      target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2," \
             "fma,f16c")))
#endif

namespace kvpack {

/// Instruction sets of the CPU kernels, in increasing order.
enum class Isa : int {
  kScalar = 0,  ///< portable C++ (compiled with the consumer's flags)
  kAvx2 = 1,    ///< AVX2 + FMA + F16C (x86-64: Intel Haswell / AMD Zen and later)
  /// AVX-512 F + BW + VL + DQ on top of kAvx2 (Intel Skylake-SP / AMD Zen 4 and later). Kernels
  /// without an AVX-512 version run their AVX2 one at this level.
  kAvx512 = 2,
};

/// "scalar", "avx2" or "avx512".
inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "scalar";
}

namespace detail {

/// The best Isa this CPU and OS support (CPUID and XGETBV: the OS must save the YMM state, and
/// for AVX-512 the opmask and ZMM state too).
inline Isa detect_cpu_isa() {
#if defined(KVPACK_X86_DISPATCH)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::kScalar;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
             f16c = c & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return Isa::kScalar;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6u) != 0x6u) return Isa::kScalar;  // XMM and YMM state enabled by the OS
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Isa::kScalar;
  if (!(b & (1u << 5))) return Isa::kScalar;
  // AVX512F (bit 16), DQ (17), BW (30), VL (31); XCR0 bits 5-7: opmask, ZMM0-15 upper, ZMM16-31.
  const unsigned avx512 = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);
  if ((b & avx512) == avx512 && (xcr0_lo & 0xE0u) == 0xE0u) return Isa::kAvx512;
  return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

/// Whether the CPU has AVX-512 VNNI and VBMI (CPUID leaf 7: ECX bits 11 and 1), which the
/// int8-query key kernel needs beyond Isa::kAvx512 (Intel Ice Lake / AMD Zen 4 and later).
/// (CPUID traps to the hypervisor in a VM: asked once.)
inline bool cpu_has_avx512_vnni_vbmi() {
  static const bool has = [] {
#if defined(KVPACK_X86_DISPATCH)
    if (detect_cpu_isa() < Isa::kAvx512) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return (c & (1u << 11)) != 0 && (c & (1u << 1)) != 0;
#else
    return false;
#endif
  }();
  return has;
}

/// The CPU's Isa lowered by KVPACK_ISA; throws kvpack::error for an unknown name.
inline Isa initial_cpu_isa() {
  const Isa best = detect_cpu_isa();
  const char* env = std::getenv("KVPACK_ISA");
  if (env == nullptr || *env == '\0') return best;
  if (std::strcmp(env, "scalar") == 0) return Isa::kScalar;
  if (std::strcmp(env, "avx2") == 0) return std::min(best, Isa::kAvx2);
  if (std::strcmp(env, "avx512") == 0) return std::min(best, Isa::kAvx512);
  throw error(concat("KVPACK_ISA: '", env, "' is not an instruction set kvpack knows ",
                     "(scalar, avx2, avx512)"));
}

/// The process-wide choice (one instance across translation units: an inline function's static).
inline std::atomic<int>& cpu_isa_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_cpu_isa())};
  return slot;
}

}  // namespace detail

/// The instruction set the CPU kernels use now.
inline Isa cpu_isa() {
  return static_cast<Isa>(detail::cpu_isa_slot().load(std::memory_order_relaxed));
}

/// The best instruction set this CPU supports (ignores KVPACK_ISA and set_cpu_isa).
inline Isa cpu_isa_supported() { return detail::detect_cpu_isa(); }

/// Makes the CPU kernels use `isa` from now on and returns the previous choice. Meant for tests
/// and benchmarks; calls running concurrently may use either. Throws kvpack::error when the CPU
/// does not support `isa`.
inline Isa set_cpu_isa(Isa isa) {
  detail::require(
      isa <= cpu_isa_supported(), "set_cpu_isa", "isa", isa_name(isa),
      detail::concat("supported by this CPU (at most ", isa_name(cpu_isa_supported()), ")"));
  return static_cast<Isa>(detail::cpu_isa_slot().exchange(static_cast<int>(isa)));
}

}  // namespace kvpack
