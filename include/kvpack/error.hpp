/// \file error.hpp
/// \brief The single exception type of kvpack and the helpers that build its messages.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
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

/// A message part as text: itself, or what it returns when it is a callable (so a part that
/// must be built, e.g. with concat, costs nothing unless the check fails).
template <class Part>
decltype(auto) message_part(const Part& part) {
  if constexpr (std::is_invocable_v<const Part&>) {
    return part();
  } else {
    return (part);
  }
}

/// Throws kvpack::error("<where>: <argument> = <value>, expected <expected>"); each part is a
/// value or a callable returning one (see message_part).
template <class Value, class Argument, class Expected>
[[noreturn]] void throw_arg(const char* where, const Argument& argument, const Value& value,
                            const Expected& expected) {
  throw error(concat(where, ": ", message_part(argument), " = ", message_part(value), ", expected ",
                     message_part(expected)));
}

/// throw_arg unless `ok`. Nothing is formatted or allocated when ok: the checks run on every
/// append and attend, so a part built with concat is passed as a lambda there.
template <class Value, class Argument, class Expected>
void require(bool ok, const char* where, const Argument& argument, const Value& value,
             const Expected& expected) {
  if (!ok) throw_arg(where, argument, value, expected);
}

}  // namespace detail
}  // namespace kvpack
