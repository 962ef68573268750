#pragma once
// Typed errors for I/O, API and user-input boundaries. Every message is one line that names what is wrong
// (the file, tensor or field) and, where it helps, a hint. The CLI prints `error: <what>` and exits 1; the
// server turns them into HTTP errors. Assertions (DSV3_CHECK) are for broken invariants only.
#include <stdexcept>
#include <string>
#include <fmt/format.h>

namespace dsv3 {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Malformed or inconsistent input data (files, configs, arguments).
struct InputError : Error {
  using Error::Error;
};

template <typename... Args>
[[noreturn]] inline void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw InputError(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace dsv3

#define DSV3_CHECK(cond, ...)                                                                       \
  do {                                                                                              \
    if (!(cond)) throw ::dsv3::Error(fmt::format("internal check failed at {}:{}: {} ({})", __FILE__, \
                                                 __LINE__, #cond, fmt::format(__VA_ARGS__)));       \
  } while (0)
