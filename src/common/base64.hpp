// Standard base64 (RFC 4648, with padding): etcd's JSON gateway carries keys and values this way.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace companion {

std::string base64_encode(std::string_view bytes);
// nullopt for anything that is not canonical padded base64.
std::optional<std::string> base64_decode(std::string_view text);

}  // namespace companion
