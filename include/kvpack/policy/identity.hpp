/// \file policy/identity.hpp
/// \brief The uncompressed reference policy: keeps every token in fp16.
#pragma once

#include "policy_base.hpp"

namespace kvpack {

/// \brief Keeps everything; bytes() equals the dense size of what it stores (K, V, positions).
/// \tparam Storage element type of the stored rows: Half (default) or float.
template <class Storage = Half>
struct BasicIdentity : PolicyBase {
  static_assert(std::is_same_v<Storage, Half> || std::is_same_v<Storage, float>,
                "BasicIdentity stores Half or float rows");
  static constexpr const char* name = "Identity";
  using storage_type = Storage;
};

using Identity = BasicIdentity<Half>;
/// Full-precision reference (fp32 rows), e.g. for attention baselines.
using IdentityF32 = BasicIdentity<float>;

}  // namespace kvpack
