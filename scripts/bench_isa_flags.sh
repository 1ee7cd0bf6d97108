#!/usr/bin/env bash
# Runs the ISA benchmarks (bench/isa_bench.cpp) from the native build (kvpack_bench, built with
# -march=native) and from the baseline-flags build (kvpack_bench_baseline_flags, -march=x86-64: what
# a consumer of find_package gets), one after the other, and prints for each benchmark the time
# of the baseline-flags build over the native one (1.00 = no loss; the issue's bar: <= 1.10).
# Usage: scripts/bench_isa_flags.sh [extra benchmark flags]   (build first: scripts/build.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=${KVPACK_BUILD_DIR:-build}/bench
out=$(mktemp -d)
filter='BM_Isa'
"$dir/kvpack_bench" --benchmark_filter="$filter" --benchmark_format=json \
  --benchmark_repetitions=3 --benchmark_report_aggregates_only=true "$@" >"$out/native.json"
"$dir/kvpack_bench_baseline_flags" --benchmark_filter="$filter" --benchmark_format=json \
  --benchmark_repetitions=3 --benchmark_report_aggregates_only=true "$@" >"$out/baseline.json"
python3 - "$out/native.json" "$out/baseline.json" <<'PY'
import json, sys
def medians(path):
    runs = json.load(open(path))["benchmarks"]
    return {r["run_name"]: r for r in runs if r.get("aggregate_name") == "median"}
native, baseline = medians(sys.argv[1]), medians(sys.argv[2])
ctx = json.load(open(sys.argv[1]))["context"]
print(f"host: {ctx.get('host_name', '?')}, {ctx.get('num_cpus', '?')} CPUs at "
      f"{ctx.get('mhz_per_cpu', '?')} MHz; median of 3 repetitions")
print(f"{'benchmark':50s} {'native':>12s} {'baseline flags':>15s} {'baseline/native':>16s}")
for name, n in native.items():
    b = baseline.get(name)
    if b is None or n.get("error_occurred"):
        continue
    unit = n["time_unit"]
    print(f"{name:50s} {n['real_time']:10.1f}{unit:>2s} {b['real_time']:13.1f}{unit:>2s} "
          f"{b['real_time'] / n['real_time']:16.2f}")
PY
rm -rf "$out"
