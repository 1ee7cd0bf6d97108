#!/usr/bin/env bash
# The sanitizer run that needs its own build (part of run_tests.sh, so of CI):
#   ThreadSanitizer: tests/cpu/threads_test.cpp (caches written on several threads, then read by
#     concurrent attend() calls), built without OpenMP so that only kvpack's own code is checked
#     (libgomp is not instrumented and would report its own barriers).
# AddressSanitizer + UndefinedBehaviorSanitizer need none: the CPU unit tests (kvpack_tests) are
# always built with them (tests/CMakeLists.txt, KVPACK_SANITIZE_TESTS).
# --asan also builds and runs the unit tests at -O1 under ASan + UBSan in build-asan/ (slower;
# what CI did before the main test build carried the sanitizers).
# Any report fails the run. Build trees: build-tsan/, build-asan/ (KVPACK_SANITIZE_DIR prefix).
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
  # A new tree takes clang when there is one: its TSan build compiles faster than g++'s.
  if [ ! -f "$dir/CMakeCache.txt" ]; then
    extra=("${generator[@]}")
    if command -v clang++ >/dev/null 2>&1; then extra+=(-DCMAKE_CXX_COMPILER=clang++); fi
  fi
  cmake -S . -B "$dir" "${extra[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_FLAGS_RELEASE="-O1 -g1" -DKVPACK_SANITIZE="$sanitizers" \
    -DKVPACK_BUILD_EXAMPLES=OFF -DKVPACK_BUILD_BENCHMARKS=OFF -DKVPACK_INSTALL=OFF \
    -DKVPACK_ENABLE_CUDA=OFF "$@" >/dev/null
  extra=()
}
extra=()

if [ "${1:-}" = "--asan" ]; then
  echo "run_sanitizers: AddressSanitizer + UndefinedBehaviorSanitizer, CPU unit tests at -O1"
  configure "$prefix-asan" address,undefined
  cmake --build "$prefix-asan" --parallel "$jobs" --target kvpack_tests
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    OMP_NUM_THREADS=2 "$prefix-asan/tests/kvpack_tests" --order decl
fi

echo "run_sanitizers: ThreadSanitizer, concurrent caches"
configure "$prefix-tsan" thread -DKVPACK_USE_OPENMP=OFF
cmake --build "$prefix-tsan" --parallel "$jobs" --target kvpack_thread_tests
TSAN_OPTIONS=halt_on_error=1 "$prefix-tsan/tests/kvpack_thread_tests"

echo "run_sanitizers: clean in $((SECONDS - start)) s"
