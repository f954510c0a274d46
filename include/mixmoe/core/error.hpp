// Errors that say where and what: every failed check throws mixmoe::Error whose
// message starts with "[op]" and names the offending shapes or values.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace mixmoe {

/// The one exception type thrown by mixmoe for bad input or misuse.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Args>
[[noreturn]] void fail(const char* where, Args&&... args) {
  std::ostringstream os;
  os << '[' << where << "] ";
  (os << ... << std::forward<Args>(args));
  throw Error(os.str());
}

}  // namespace detail
}  // namespace mixmoe

/// MIXMOE_CHECK(cond, "op", parts...): throws mixmoe::Error("[op] parts...") when
/// cond is false. The parts are streamed, so shapes and numbers can be passed as-is.
#define MIXMOE_CHECK(cond, where, ...)                         \
  do {                                                         \
    if (!(cond)) [[unlikely]]                                  \
      ::mixmoe::detail::fail(where, __VA_ARGS__);              \
  } while (0)
