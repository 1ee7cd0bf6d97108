/// \file backend/cpu/cache_impl.hpp
/// \brief Out-of-line members of KVCache<Policy, backend::Cpu> that every storage format uses,
/// one file per job. The members of one format only come with its header: kivi_rows.hpp
/// (quantize), low_rank.hpp (factorize, low-rank attention).
#pragma once

#include "cache_attend.hpp"
#include "cache_evict.hpp"
#include "cache_io.hpp"
#include "cache_observe.hpp"
