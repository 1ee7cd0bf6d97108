// Built with -mavx2 -mfma -mf16c.
#include "isa_unit.hpp"

std::vector<float> kvpack_isa_flags_avx2() { return kvpack_isa_flags::decode_attend(); }
