// Built with the baseline x86-64 flags (no AVX): what a consumer gets from find_package.
#include "isa_unit.hpp"

std::vector<float> kvpack_isa_flags_baseline() { return kvpack_isa_flags::decode_attend(); }
