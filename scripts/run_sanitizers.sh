#!/usr/bin/env bash
# Sanitizer runs of the CPU tests (part of run_tests.sh, so of CI):
#   AddressSanitizer + UndefinedBehaviorSanitizer: every CPU unit test (kvpack_tests), g++ -O1.
#   ThreadSanitizer: tests/cpu/threads_test.cpp (caches written on several threads, then read by
#     concurrent attend() calls), built without OpenMP so that only kvpack's own code is checked
#     (libgomp is not instrumented and would report its own barriers).
# Any report fails the run. Build trees: build-asan/, build-tsan/ (KVPACK_SANITIZE_DIR prefix).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
[ -n "${KVPACK_SETUP_DONE:-}" ] || bash scripts/setup.sh
prefix=${KVPACK_SANITIZE_DIR:-build}
jobs=${KVPACK_JOBS:-$(nproc)}
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)

configure() {  # <dir> <sanitizers> [cmake args...]
  local dir=$1 sanitizers=$2
  shift 2
  [ -f "$dir/CMakeCache.txt" ] || extra=("${generator[@]}")
  cmake -S . -B "$dir" "${extra[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_FLAGS_RELEASE="-O1 -g1" -DKVPACK_SANITIZE="$sanitizers" \
    -DKVPACK_BUILD_EXAMPLES=OFF -DKVPACK_BUILD_BENCHMARKS=OFF -DKVPACK_INSTALL=OFF \
    -DKVPACK_ENABLE_CUDA=OFF "$@" >/dev/null
  extra=()
}
extra=()

echo "run_sanitizers: AddressSanitizer + UndefinedBehaviorSanitizer, CPU unit tests"
configure "$prefix-asan" address,undefined
cmake --build "$prefix-asan" --parallel "$jobs" --target kvpack_tests
# OpenMP's worker threads stay alive at exit: not leaks of kvpack's.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  OMP_NUM_THREADS=2 "$prefix-asan/tests/kvpack_tests" --order decl

echo "run_sanitizers: ThreadSanitizer, concurrent caches"
configure "$prefix-tsan" thread -DKVPACK_USE_OPENMP=OFF
cmake --build "$prefix-tsan" --parallel "$jobs" --target kvpack_thread_tests
TSAN_OPTIONS=halt_on_error=1 "$prefix-tsan/tests/kvpack_thread_tests"

echo "run_sanitizers: clean in $((SECONDS - start)) s"
