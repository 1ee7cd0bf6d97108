#!/usr/bin/env bash
# The one GPU check: on a machine with an NVIDIA GPU, builds the CUDA tests and the CUDA kernel
# benchmarks for that GPU's architecture, runs both, and prints one summary: tests passed/failed
# and each benchmark's bytes/s as a fraction of the same run's device-to-device copy rate.
# Budget: under 8 minutes on a 16-core machine (the build is most of it).
#
# Without a GPU it says so and exits 77 (the "skipped" code ctest uses) after building nothing.
# Build directory: build-gpu (KVPACK_GPU_BUILD_DIR); the raw outputs stay there
# (cuda_tests.txt, cuda_bench.json).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
build_dir=${KVPACK_GPU_BUILD_DIR:-build-gpu}

# --- Is there a GPU? ---------------------------------------------------------------------------
gpu=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
        head -n 1)
fi
if [ -z "$gpu" ]; then
  why="nvidia-smi not found"
  command -v nvidia-smi >/dev/null 2>&1 && why="nvidia-smi lists no GPU"
  [ -e /dev/nvidia0 ] || why="$why; no /dev/nvidia0"
  echo "gpu_check: no CUDA GPU on this machine ($why): nothing built or run."
  echo "gpu_check: the CUDA kernels still run on the emulated grid in ctest (kvpack_tests," \
       "'CUDA *' cases); see README."
  exit 77
fi
nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
if [ -z "$nvcc" ]; then
  echo "gpu_check: GPU found ($gpu) but no nvcc (CUDA toolkit): install it or put it on PATH" >&2
  exit 1
fi
echo "gpu_check: $gpu; $("$nvcc" --version | tail -n 1)"

# --- Build: the CUDA tests and kernel benchmarks only, optimized, for this GPU -----------------
# No apt-get here: GPU machines are often offline. cmake, Catch2, Eigen and Google Benchmark must
# be present (scripts/setup.sh installs them where a registry is reachable).
generator=()
command -v ninja >/dev/null 2>&1 && [ ! -f "$build_dir/CMakeCache.txt" ] && generator=(-G Ninja)
if ! cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DKVPACK_ENABLE_CUDA=ON -DKVPACK_CUDA_TESTS_COMPILE_ONLY=OFF \
    -DCMAKE_CUDA_ARCHITECTURES=native -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DKVPACK_BUILD_EXAMPLES=OFF -DKVPACK_TOOLS_OPTIMIZE=ON -DKVPACK_SANITIZE_TESTS= \
    >"$build_dir.configure.log" 2>&1; then
  tail -n 30 "$build_dir.configure.log"
  echo "gpu_check: configure failed (log: $build_dir.configure.log)" >&2
  exit 1
fi
if ! cmake --build "$build_dir" --parallel "${KVPACK_JOBS:-$(nproc)}" \
    --target kvpack_cuda_tests kvpack_cuda_bench >"$build_dir/build.log" 2>&1; then
  tail -n 40 "$build_dir/build.log"
  echo "gpu_check: build failed (log: $build_dir/build.log)" >&2
  exit 1
fi
built=$((SECONDS - start))

# --- Tests -------------------------------------------------------------------------------------
"$build_dir/tests/kvpack_cuda_tests" >"$build_dir/cuda_tests.txt" 2>&1
tests_rc=$?
tests_line=$(grep -E "^(All tests passed|test cases:)" "$build_dir/cuda_tests.txt" | tail -n 1)
[ -n "$tests_line" ] || tests_line="no summary (exit $tests_rc; see $build_dir/cuda_tests.txt)"
[ "$tests_rc" = 77 ] && tests_line="skipped: the CUDA runtime found no usable device"

# --- Benchmarks --------------------------------------------------------------------------------
"$build_dir/bench/kvpack_cuda_bench" --benchmark_min_time=0.2s --benchmark_format=console \
  --benchmark_out="$build_dir/cuda_bench.json" --benchmark_out_format=json \
  >"$build_dir/cuda_bench.txt" 2>&1
bench_rc=$?

# --- Summary -----------------------------------------------------------------------------------
echo "gpu_check: summary ($gpu; built in ${built} s, all in $((SECONDS - start)) s)"
echo "  tests: $tests_line (exit $tests_rc)"
if [ -s "$build_dir/cuda_bench.json" ]; then
  python3 - "$build_dir/cuda_bench.json" <<'EOF'
import json, sys
runs = json.load(open(sys.argv[1]))["benchmarks"]
for r in runs:
    if r.get("error_occurred"):
        print(f"  {r['name']}: {r.get('error_message', 'error')}")
        continue
    rate = r.get("bytes_per_second", 0.0)
    frac = r.get("fraction_of_copy", 0.0)
    name = r["name"].replace("/manual_time", "")
    flops = r.get("flops_per_second")
    extra = f"  {flops / 1e12:6.2f} TFLOP/s" if flops else ""
    print(f"  {name:55s} {r['real_time']:10.1f} {r['time_unit']}  "
          f"{rate / 1e9:8.1f} GB/s  {frac:5.2f} of copy{extra}")
EOF
else
  echo "  benchmarks: no results (exit $bench_rc; see $build_dir/cuda_bench.txt)"
fi
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
