// Finding the server of a device in the local registry.
#pragma once

#include <string>

#include "companion/client.hpp"
#include "companion/result.hpp"

namespace companion::client {

// The socket path of a live server for options.device in options.ns, waiting up to
// options.discovery_timeout_s for one to appear. kUnavailable when none does.
Result<std::string> discover_socket(const ConnectOptions& options);

// The local CUDA ordinal of the server's GPU (matched by UUID), or -1 for a host server.
Result<int> local_ordinal_for(const ServerIdentity& server);

}  // namespace companion::client
