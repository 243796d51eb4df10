// Exceptions of the hiquant core. The core is plain C++ (it is also called from C++ tests);
// the binding layer maps each class to a Python exception from python/hiquant/errors.py.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace hiquant {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A caller passed something malformed (shape, range, option, layout). Maps to
// hiquant.InvalidArgumentError (a ValueError).
struct InvalidArgument : Error {
  using Error::Error;
};
// A caller passed an argument of the wrong type or element type (a float64 array where float32 is
// required). Maps to hiquant.InvalidTypeError (a TypeError).
struct InvalidType : Error {
  using Error::Error;
};
// Non-finite input or a computation that cannot proceed numerically. Maps to ArithmeticError.
struct NumericalError : Error {
  using Error::Error;
};
// No choice of options meets the bit budget. Carries the smallest feasible budget.
struct InfeasibleBudget : Error {
  double min_feasible;
  InfeasibleBudget(const std::string& msg, double min_feasible_)
      : Error(msg), min_feasible(min_feasible_) {}
};
// The run-control hook asked the kernel to stop (Ctrl-C). Maps to KeyboardInterrupt.
struct Interrupted : Error {
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace hiquant

// Checks hold in release builds too: they guard user input, not programmer invariants.
#define HQ_CHECK(cond, ...)                                                   \
  do {                                                                        \
    if (!(cond)) throw ::hiquant::InvalidArgument(::hiquant::detail::concat(__VA_ARGS__)); \
  } while (0)

#define HQ_CHECK_FINITE(cond, ...)                                            \
  do {                                                                        \
    if (!(cond)) throw ::hiquant::NumericalError(::hiquant::detail::concat(__VA_ARGS__)); \
  } while (0)
