#include <cstring>

#include "companion/result.hpp"

namespace companion {

const char* status_code_text(StatusCode code) noexcept {
  switch (code) {
#define COMPANION_X(cname, name, value, text) \
  case StatusCode::k##name:                   \
    return text;
    COMPANION_STATUS_CODES(COMPANION_X)
#undef COMPANION_X
  }
  return "unknown status";
}

const char* status_code_name(StatusCode code) noexcept {
  switch (code) {
#define COMPANION_X(cname, name, value, text) \
  case StatusCode::k##name:                   \
    return #cname;
    COMPANION_STATUS_CODES(COMPANION_X)
#undef COMPANION_X
  }
  return "UNKNOWN";
}

StatusCode status_code_from_int(int value) noexcept {
  switch (value) {
#define COMPANION_X(cname, name, v, text) \
  case v:                                 \
    return StatusCode::k##name;
    COMPANION_STATUS_CODES(COMPANION_X)
#undef COMPANION_X
  }
  return StatusCode::kInternal;
}

std::string Error::to_string() const {
  std::string out = status_code_text(code);
  if (!message.empty()) {
    out += ": ";
    out += message;
  }
  return out;
}

Error errno_error(StatusCode code, const std::string& context, int err) {
  return Error{code, context + ": " + std::strerror(err)};
}

}  // namespace companion
