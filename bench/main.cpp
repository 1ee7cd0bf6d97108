// Entry point of kvpack_bench: every bench/*.cpp registers its benchmarks with BENCHMARK().
#include <benchmark/benchmark.h>

#include <cstdio>

int main(int argc, char** argv) {
#if defined(KVPACK_TOOLS_UNOPTIMIZED)
  // CI builds the benchmarks at -O0 only to check that they compile and register
  // (KVPACK_TOOLS_OPTIMIZE=OFF): their figures mean nothing.
  std::fprintf(stderr,
               "kvpack_bench: built with KVPACK_TOOLS_OPTIMIZE=OFF (-O0): a compile check, not a "
               "measurement; rebuild with -DKVPACK_TOOLS_OPTIMIZE=ON for figures\n");
#endif
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
