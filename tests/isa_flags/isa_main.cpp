// ISA-flags test: two translation units built with different -m flags link into one program and
// agree. The kernels are chosen at run time (isa.hpp), so neither unit's flags decide which
// kernel runs; only code outside the kernels (compiled with each unit's flags, e.g. FMA
// contraction) may differ, by rounding.
#include <cmath>
#include <cstdio>
#include <kvpack/isa.hpp>
#include <vector>

std::vector<float> kvpack_isa_flags_baseline();
std::vector<float> kvpack_isa_flags_avx2();

int main() {
  const std::vector<float> a = kvpack_isa_flags_baseline();
  const std::vector<float> b = kvpack_isa_flags_avx2();
  double worst = 0.0, largest = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    worst = std::fmax(worst, std::fabs(double{a[i]} - b[i]));
    largest = std::fmax(largest, std::fabs(double{b[i]}));
  }
  const bool ok = a.size() == b.size() && !a.empty() && worst <= 1e-6 * std::fmax(largest, 1.0);
  std::printf("kernels: %s; baseline-flags vs avx2-flags unit: max |difference| %.3g (%s)\n",
              kvpack::isa_name(kvpack::cpu_isa()), worst, ok ? "agree" : "DISAGREE");
  return ok ? 0 : 1;
}
