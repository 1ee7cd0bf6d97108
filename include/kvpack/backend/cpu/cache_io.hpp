/// \file backend/cpu/cache_io.hpp
/// \brief Out-of-line members of KVCache<Policy, backend::Cpu>: save() and load(), the cache's
/// whole state in one versioned, checksummed file (detail/checked_file.hpp).
///
/// Layout (version 1, little-endian): magic "KVPKCACH", u32 version, the policy's name, u32
/// storage format, u32 element type (DType), u32 KIVI bits and group (0 when not quantized), the
/// shape (u32 layers, q_heads, kv_heads, head_dim) and its RopeConfig field by field, u32
/// observed flag, per layer i64 appended / first / last position, the LazyLayerDrop statistics
/// (u64 count; f64 mass, i64 rows, i32 decision each), the format's shared state (low-rank
/// bases), then every (layer, kv head) store, layer-major (store_io.hpp and the format's
/// *_store_io.hpp), and the u64 FNV-1a checksum of every preceding byte.
#pragma once

// clang-format off
#include "../../config.hpp"  // first: detail/ headers check the macro it defines
// clang-format on

#include <string>
#include <utility>
#include <vector>

#include "../../detail/checked_file.hpp"
#include "cache.hpp"
#include "store_io.hpp"

namespace kvpack {
namespace detail {

inline constexpr char kCacheMagic[9] = "KVPKCACH";
inline constexpr uint32_t kCacheFileVersion = 1;

template <class P, class = void>
struct has_policy_name : std::false_type {};
template <class P>
struct has_policy_name<P, std::void_t<decltype(P::name)>> : std::true_type {};

/// The policy's `name` ("Compose<A,B>" for compositions); "unnamed" for a policy without one.
template <class P>
struct PolicyName {
  static std::string get() {
    if constexpr (has_policy_name<P>::value) {
      return P::name;
    } else {
      return "unnamed";
    }
  }
};
template <class A, class B>
struct PolicyName<Compose<A, B>> {
  static std::string get() {
    return "Compose<" + PolicyName<A>::get() + "," + PolicyName<B>::get() + ">";
  }
};

/// The RoPE fields a saved cache must share with the cache that loads it.
inline std::vector<double> rope_fields(const RopeConfig& r) {
  return {static_cast<double>(r.style),
          r.theta,
          static_cast<double>(r.scaling),
          r.factor,
          static_cast<double>(r.original_context),
          r.low_freq_factor,
          r.high_freq_factor,
          r.beta_fast,
          r.beta_slow,
          r.attention_factor,
          static_cast<double>(r.rotary_dim)};
}

}  // namespace detail

template <class Policy>
void KVCache<Policy, backend::Cpu>::save(const std::string& path) const {
  detail::CheckedFileWriter w(detail::kCacheMagic);
  w.put_u32(detail::kCacheFileVersion);
  w.put_string(detail::PolicyName<Policy>::get());
  w.put_u32(static_cast<uint32_t>(Selection::storage_format));
  w.put_u32(static_cast<uint32_t>(detail::DTypeOf<storage_type>::value));
  w.put_u32(kQuantized ? static_cast<uint32_t>(Stages::quant_knobs(policy_)->bits) : 0);
  w.put_u32(kQuantized ? static_cast<uint32_t>(Stages::quant_knobs(policy_)->group) : 0);
  // (Not a range-for over a braced list: nvcc 13's front end rejects one here.)
  w.put_u32(static_cast<uint32_t>(shape_.layers));
  w.put_u32(static_cast<uint32_t>(shape_.q_heads));
  w.put_u32(static_cast<uint32_t>(shape_.kv_heads));
  w.put_u32(static_cast<uint32_t>(shape_.head_dim));
  for (double f : detail::rope_fields(shape_.rope)) w.put_f64(f);
  w.put_u32(observed_ ? 1 : 0);
  for (const auto& l : layers_) {
    w.put_i64(l.appended);
    w.put_i64(l.first_position);
    w.put_i64(l.last_position);
  }
  w.put_u64(observations_.size());
  for (const auto& o : observations_) {
    w.put_f64(o.mass);
    w.put_i64(o.rows);
    w.put_i64(o.lazy);
  }
  // Unqualified: found by argument-dependent lookup where the cache is instantiated, after every
  // storage format's *_store_io.hpp has been included.
  const auto shared = write_shared(w, heads_);
  for (const auto& head : heads_) write_store(w, head, shared);
  w.write(path, "KVCache::save");
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::load(const std::string& path) {
  detail::CheckedFileReader r(path, detail::kCacheMagic, "KVCache::load", "KV cache");
  const std::string& where = r.where();
  r.expect_version(detail::kCacheFileVersion);
  const auto expect = [&](const char* field, auto got, auto want) {
    if (got != want) {
      throw error(
          detail::concat(where, ": ", field, " = ", got, ", expected ", want, " (this cache's)"));
    }
  };
  expect("policy", r.get_string(256, "policy name"), detail::PolicyName<Policy>::get());
  expect("storage format", r.get_u32(), static_cast<uint32_t>(Selection::storage_format));
  expect("element type", r.get_u32(), static_cast<uint32_t>(detail::DTypeOf<storage_type>::value));
  const int bits = kQuantized ? Stages::quant_knobs(policy_)->bits : 0;
  const int group = kQuantized ? Stages::quant_knobs(policy_)->group : 0;
  expect("KIVI bits", r.get_u32(), static_cast<uint32_t>(bits));
  expect("KIVI group", r.get_u32(), static_cast<uint32_t>(group));
  expect("layers", r.get_u32(), static_cast<uint32_t>(shape_.layers));
  expect("q_heads", r.get_u32(), static_cast<uint32_t>(shape_.q_heads));
  expect("kv_heads", r.get_u32(), static_cast<uint32_t>(shape_.kv_heads));
  expect("head_dim", r.get_u32(), static_cast<uint32_t>(shape_.head_dim));
  for (double want : detail::rope_fields(shape_.rope)) expect("a RoPE field", r.get_f64(), want);
  const uint32_t observed = r.get_u32();
  if (observed > 1) expect("observed flag", observed, 1u);

  std::vector<detail::LayerState> layers(shape_.layers);
  for (int l = 0; l < shape_.layers; ++l) {
    auto& s = layers[l];
    s.appended = r.get_i64();
    s.first_position = r.get_i64();
    s.last_position = r.get_i64();
    const bool empty = s.appended == 0 && s.first_position == -1 && s.last_position == -1;
    const bool held = s.appended > 0 && s.first_position >= 0 &&
                      s.last_position >= s.first_position && s.last_position < (int64_t{1} << 31);
    if (!empty && !held) {
      throw error(detail::concat(where, ": layer ", l, " state (appended ", s.appended, ", first ",
                                 s.first_position, ", last ", s.last_position,
                                 ") is not a valid sequence"));
    }
  }
  const uint64_t observation_count = r.get_u64();  // checked before anything is allocated
  expect("LazyLayerDrop statistics", observation_count, uint64_t{observations_.size()});
  std::vector<LayerObservation> observations(observations_.size());
  for (auto& o : observations) {
    o.mass = r.get_f64();
    o.rows = r.get_i64();
    o.lazy = static_cast<int>(r.get_i64());
    if (!std::isfinite(o.mass) || o.mass < 0 || o.rows < 0 || o.lazy < -1 || o.lazy > 1) {
      throw error(where + ": LazyLayerDrop statistics out of range");
    }
  }

  // Into a fresh set of stores; the cache changes only once all of them have passed.
  std::vector<Store> heads(heads_.size());
  detail::StoreLimits limits;
  limits.head_dim = shape_.head_dim;
  limits.bits = bits;
  limits.group = group;
  limits.where = where;
  for (std::size_t i = 0; i < heads.size(); ++i) {
    if constexpr (kQuantizedRows) {
      heads[i].bits = bits;
      heads[i].group = group;
      heads[i].int8_query = heads_[i].int8_query;  // the policy's, not the file's
    }
    if constexpr (kLowRank) heads[i].rope = heads_[i].rope;
    heads[i].set_pages(pool_, page_tokens_, shape_.head_dim);
  }
  const auto shared = read_shared(r, heads, limits);
  for (int l = 0; l < shape_.layers; ++l) {
    for (int h = 0; h < shape_.kv_heads; ++h) {
      limits.first_position = layers[l].first_position;
      limits.last_position = layers[l].last_position;
      limits.where = detail::concat(where, ": layer ", l, " kv head ", h);
      Store& head = heads[static_cast<std::size_t>(l) * shape_.kv_heads + h];
      read_store(r, head, limits, shared);
      if (head.size() > layers[l].appended) {
        throw error(detail::concat(limits.where, ": holds ", head.size(), " tokens, more than the ",
                                   layers[l].appended, " appended to its layer"));
      }
    }
  }
  r.finish();
  heads_.swap(heads);
  layers_.swap(layers);
  observations_.swap(observations);
  observed_ = observed == 1;
}

}  // namespace kvpack
