/// \file kvpack.hpp
/// \brief Umbrella header: the container, the CPU backend and every policy.
#pragma once

#include "budget.hpp"
#include "cache.hpp"
#include "config.hpp"
#include "error.hpp"
#include "half.hpp"
#include "policy/channel_shrink.hpp"
#include "policy/compose.hpp"
#include "policy/cross_layer_svd.hpp"
#include "policy/head_level_evict.hpp"
#include "policy/identity.hpp"
#include "policy/l2_norm_evict.hpp"
#include "policy/lazy_layer_drop.hpp"
#include "policy/quantize.hpp"
#include "policy/reconstruction_evict.hpp"
#include "policy/score_window.hpp"
#include "quant/quant_block.hpp"
#include "rope.hpp"
#include "shape.hpp"
#include "span.hpp"
#include "view.hpp"
