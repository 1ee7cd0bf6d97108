/// \file policy/score_window.hpp
/// \brief Which cached keys enter the softmax when queries are scored (observe()).
#pragma once

#include <cstdint>
#include <limits>

#include "../config.hpp"

namespace kvpack {

/// \brief Keys by position: sinks (pos < sink_end), a chunk [begin, end) and a tail
/// (pos >= tail_begin); every range is half-open, as everywhere in kvpack. KVzip scores each
/// repeated chunk with a chunk-local softmax over sinks + the chunk + the repeat tokens; the
/// default window is every key.
struct ScoreWindow {
  int64_t sink_end = 0;
  int64_t begin = std::numeric_limits<int64_t>::min();
  int64_t end = std::numeric_limits<int64_t>::max();
  int64_t tail_begin = std::numeric_limits<int64_t>::max();

  /// Every key (the default).
  static ScoreWindow all() { return ScoreWindow{}; }
  /// Sinks [.., sink_end), the chunk [begin, end) and everything from tail_begin on.
  static ScoreWindow chunk(int64_t sink_end, int64_t begin, int64_t end, int64_t tail_begin) {
    return ScoreWindow{sink_end, begin, end, tail_begin};
  }
  /// Whether this is all(): every key, whatever the positions.
  bool is_all() const {
    const ScoreWindow every = all();
    return sink_end == every.sink_end && begin == every.begin && end == every.end &&
           tail_begin == every.tail_begin;
  }
  KVPACK_HOST_DEVICE bool contains(int64_t pos) const {
    return pos < sink_end || (pos >= begin && pos < end) || pos >= tail_begin;
  }
};

}  // namespace kvpack
