#!/usr/bin/env bash
# Configures and builds kvpack (tests, benchmarks, examples) in ${KVPACK_BUILD_DIR:-build}.
# Extra arguments go to the CMake configure step, e.g. -DKVPACK_ENABLE_CUDA=OFF.
# Environment: KVPACK_BUILD_DIR (build), KVPACK_BUILD_TYPE (Release), KVPACK_JOBS (nproc),
# KVPACK_BUILD_TARGETS (space-separated targets; default: everything).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# run_tests.sh and run_demo.sh have run it already.
[ -n "${KVPACK_SETUP_DONE:-}" ] || bash scripts/setup.sh

build_dir=${KVPACK_BUILD_DIR:-build}
configure=(-S . -B "$build_dir" -DCMAKE_BUILD_TYPE="${KVPACK_BUILD_TYPE:-Release}")
# A build directory keeps the generator it was created with; choose one only for a new one.
if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  if command -v ninja >/dev/null 2>&1; then
    configure+=(-G Ninja)
  else
    configure+=(-G "Unix Makefiles")
  fi
fi

cmake "${configure[@]}" "$@"
targets=()
for t in ${KVPACK_BUILD_TARGETS:-}; do targets+=(--target "$t"); done
cmake --build "$build_dir" --parallel "${KVPACK_JOBS:-$(nproc)}" "${targets[@]}"
