#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz, clang++ with ASan + UBSan) and runs each one.
# Usage: scripts/run_fuzz.sh [SECONDS_EACH] [TARGET...]   (targets: gguf checked_file tasks
#        cache_api; default all). run_tests.sh runs the smoke size (KVPACK_FUZZ_SECONDS, 5 s);
#        long runs: scripts/run_fuzz.sh 3600 cache_api, or -runs=N through KVPACK_FUZZ_ARGS.
# Seeds come from tests/fuzz/corpus/<target>/ (read only); what the fuzzer finds goes to
# build-fuzz/corpus/<target>/, crashes to build-fuzz/findings/. Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -n "${KVPACK_SETUP_DONE:-}" ] || bash scripts/setup.sh
seconds=${1:-${KVPACK_FUZZ_SECONDS:-30}}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf checked_file tasks cache_api)
dir=${KVPACK_FUZZ_DIR:-build-fuzz}

# KVPACK_FUZZ_OPT: the optimisation level (-O2; run_tests.sh's smoke run builds -O0: the four
# targets built and ran 10 s each in 137 s at -O0 against 219 s at -O1 in CI, 2 cores; a smoke
# run gains little from faster code: cache_api ran 923 inputs instead of ~6,900).
configure=(-S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++
           -DCMAKE_CXX_FLAGS_RELEASE="${KVPACK_FUZZ_OPT:--O2} -g1" -DKVPACK_BUILD_FUZZERS=ON
           -DKVPACK_SANITIZE=address,undefined -DKVPACK_BUILD_TESTS=OFF
           -DKVPACK_BUILD_BENCHMARKS=OFF -DKVPACK_BUILD_EXAMPLES=OFF -DKVPACK_INSTALL=OFF
           -DKVPACK_ENABLE_CUDA=OFF -DKVPACK_USE_OPENMP=OFF)
if [ ! -f "$dir/CMakeCache.txt" ] && command -v ninja >/dev/null 2>&1; then
  configure+=(-G Ninja)
fi
cmake "${configure[@]}" >/dev/null
build=()
for t in "${targets[@]}"; do build+=(--target "kvpack_fuzz_$t"); done
cmake --build "$dir" --parallel "${KVPACK_JOBS:-$(nproc)}" "${build[@]}"

mkdir -p "$dir/findings"
for t in "${targets[@]}"; do
  mkdir -p "$dir/corpus/$t"
  echo "run_fuzz: $t for ${seconds} s"
  log="$dir/$t.log"
  # -timeout: one input may take 10 s (a hang past that is a finding); -rss_limit_mb: a leak or
  # an allocation past 2 GiB is one too.
  if ! "$dir/tests/fuzz/kvpack_fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$dir/findings/$t-" ${KVPACK_FUZZ_ARGS:-} \
      "$dir/corpus/$t" "tests/fuzz/corpus/$t" >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "run_fuzz: $t found a failure (input in $dir/findings/)" >&2
    exit 1
  fi
  # The final stats line; in -fork mode the last "#N:" progress line carries the count.
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' ||
         grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#' || echo '?')
  echo "run_fuzz: $t clean, $runs inputs"
done
