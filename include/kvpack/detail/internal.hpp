/// \file detail/internal.hpp
/// \brief Refuses a detail/ header included on its own (as Eigen does): the public headers
/// include config.hpp first, which defines KVPACK_INTERNAL_INCLUDE_OK. Every detail/ header
/// includes this one first.
#pragma once

#ifndef KVPACK_INTERNAL_INCLUDE_OK
#error "kvpack/detail/ headers are internal; include <kvpack/kvpack.hpp> instead"
#endif
