/// \file error.hpp
/// \brief The single exception type of kvpack and the helpers that build its messages.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace kvpack {

/// \brief Thrown by every public entry on bad input or failure. The message names the argument,
/// the value received and what was expected. A call that throws leaves the cache unchanged.
class error : public std::runtime_error {
 public:
  explicit error(const std::string& what) : std::runtime_error("kvpack: " + what) {}
};

namespace detail {

template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  return os.str();
}

/// Throws kvpack::error("<where>: <argument> = <value>, expected <expected>").
template <class Value>
[[noreturn]] void throw_arg(const char* where, const char* argument, const Value& value,
                            const std::string& expected) {
  throw error(concat(where, ": ", argument, " = ", value, ", expected ", expected));
}

template <class Value>
void require(bool ok, const char* where, const char* argument, const Value& value,
             const std::string& expected) {
  if (!ok) throw_arg(where, argument, value, expected);
}

}  // namespace detail
}  // namespace kvpack
