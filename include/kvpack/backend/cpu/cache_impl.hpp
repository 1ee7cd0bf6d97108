/// \file backend/cpu/cache_impl.hpp
/// \brief Out-of-line members of KVCache<Policy, backend::Cpu>, one file per job.
#pragma once

#include "cache_attend.hpp"
#include "cache_evict.hpp"
#include "cache_factorize.hpp"
#include "cache_observe.hpp"
#include "cache_quantize.hpp"
