#!/usr/bin/env bash
# Builds kvpack and runs every test: CPU unit tests, header hygiene, ODR, packaging, benchmark
# smoke, the real-model tests (needs the reference model: scripts/fetch_model.sh), and the CUDA
# tests (always compiled when nvcc is found; they report "Skipped" without a GPU). The CPU unit
# tests are built with ASan + UBSan. Then the concurrency test under TSan
# (scripts/run_sanitizers.sh) and a fuzz smoke of every libFuzzer target (scripts/run_fuzz.sh,
# KVPACK_FUZZ_SECONDS each, default 5: a smoke run; long runs are scripts/run_fuzz.sh's job).
# KVPACK_SANITIZERS=0 skips the last two (quick local runs; CI always runs them).
# Exits non-zero on any failure. Extra arguments go to the CMake configure step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS

bash scripts/setup.sh
export KVPACK_SETUP_DONE=1
if [ -f scripts/fetch_model.sh ]; then
  bash scripts/fetch_model.sh
fi
# CI builds the CUDA tests, which it cannot run, for sm_80 only and up to their device code (nvcc
# -cuda: no host pass, no binary; tests/CMakeLists.txt). It builds with clang, whose sanitized
# test builds take ~0.55 of g++'s time (g++ 12: 174 s for tests/cpu/backend_ops_test.cpp with
# ASan + UBSan at -O1, clang 14: 94-120 s), also as nvcc's host compiler (the CUDA benchmark and
# header checks), and builds the benchmarks and evaluation tools as a compile check only (-O0:
# bench_smoke lists the benchmarks; kvpack-eval's policy registry alone took 304 s at -O3 in
# CI). Anyone else's build keeps the default compilers and optimized benchmarks.
configure=()
if [ -n "${CI:-}" ]; then
  configure+=(-DKVPACK_TOOLS_OPTIMIZE=OFF -DKVPACK_CUDA_TEST_ARCHITECTURES=80
              -DKVPACK_CUDA_TESTS_COMPILE_ONLY=ON)
  if command -v clang++ >/dev/null 2>&1 && [ ! -f "${KVPACK_BUILD_DIR:-build}/CMakeCache.txt" ]; then
    configure+=(-DCMAKE_CXX_COMPILER=clang++)
    # The environment variable, not -DCMAKE_CUDA_HOST_COMPILER: check_language(CUDA) drops the
    # cache variable (CMake 3.25), while the compiler search reads CUDAHOSTCXX.
    export CUDAHOSTCXX=${CUDAHOSTCXX:-clang++}
  fi
fi
bash scripts/build.sh "${configure[@]}" "$@"

build_dir=${KVPACK_BUILD_DIR:-build}
ctest --test-dir "$build_dir" --output-on-failure --no-tests=error -j "${KVPACK_JOBS:-$(nproc)}"
echo "run_tests: ctest passed after $((SECONDS - start)) s"
if [ "${KVPACK_SANITIZERS:-1}" != 0 ] || [ -n "${CI:-}" ]; then
  bash scripts/run_sanitizers.sh
  KVPACK_FUZZ_OPT=${KVPACK_FUZZ_OPT:--O0} bash scripts/run_fuzz.sh "${KVPACK_FUZZ_SECONDS:-5}"
fi
echo "run_tests: all tests passed in $((SECONDS - start)) s"
