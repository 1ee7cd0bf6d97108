// Entry point of kvpack_bench: every bench/*.cpp registers its benchmarks with BENCHMARK().
#include <benchmark/benchmark.h>

BENCHMARK_MAIN();
