// Error and Result<T>: what every internal and C++ API call returns.
#pragma once

#include <cassert>
#include <string>
#include <utility>
#include <variant>

#include "companion/status_codes.h"

namespace companion {

enum class StatusCode : int {
#define COMPANION_X(cname, name, value, text) k##name = value,
  COMPANION_STATUS_CODES(COMPANION_X)
#undef COMPANION_X
};

// The short fixed description of a code ("model not found").
const char* status_code_text(StatusCode code) noexcept;
// The code's identifier ("NOT_FOUND").
const char* status_code_name(StatusCode code) noexcept;
// Maps a wire integer back to a code; unknown values become kInternal.
StatusCode status_code_from_int(int value) noexcept;

struct Error {
  StatusCode code = StatusCode::kInternal;
  std::string message;

  // "model not found: /models/x has no safetensors files"
  std::string to_string() const;
};

inline Error make_error(StatusCode code, std::string message) {
  return Error{code, std::move(message)};
}

// Error from errno, with context: "open /x: No such file or directory".
Error errno_error(StatusCode code, const std::string& context, int err);

// A value or an Error. Deliberately small: the subset of std::expected the project uses.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit by design
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT

  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }

  T& value() & {
    assert(ok());
    return std::get<0>(v_);
  }
  const T& value() const& {
    assert(ok());
    return std::get<0>(v_);
  }
  T&& value() && {
    assert(ok());
    return std::get<0>(std::move(v_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  const Error& error() const& {
    assert(!ok());
    return std::get<1>(v_);
  }
  Error&& error() && {
    assert(!ok());
    return std::get<1>(std::move(v_));
  }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), ok_(false) {}  // NOLINT

  bool ok() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }
  void value() const { assert(ok_); }
  const Error& error() const& {
    assert(!ok_);
    return error_;
  }
  Error&& error() && {
    assert(!ok_);
    return std::move(error_);
  }

 private:
  Error error_;
  bool ok_ = true;
};

inline Result<void> ok_result() {
  return Result<void>();
}

}  // namespace companion

// Propagates an error from an expression returning Result<...>.
#define COMPANION_TRY(expr)                                                           \
  do {                                                                                \
    auto companion_try_result_ = (expr);                                              \
    if (!companion_try_result_.ok()) return std::move(companion_try_result_).error(); \
  } while (0)

#define COMPANION_CONCAT_INNER_(a, b) a##b
#define COMPANION_CONCAT_(a, b) COMPANION_CONCAT_INNER_(a, b)
// COMPANION_ASSIGN_OR_RETURN(auto x, f()) : assigns the value or returns the error.
#define COMPANION_ASSIGN_OR_RETURN(lhs, expr) \
  COMPANION_ASSIGN_OR_RETURN_IMPL_(COMPANION_CONCAT_(companion_r_, __LINE__), lhs, expr)
#define COMPANION_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                     \
  if (!tmp.ok()) return std::move(tmp).error();          \
  lhs = std::move(tmp).value()
