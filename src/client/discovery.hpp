// Mapping a server's GPU to this process's CUDA ordinal.
#pragma once

#include "companion/result.hpp"
#include "companion/types.hpp"

namespace companion::client {

// The local CUDA ordinal of the server's GPU (matched by UUID), or -1 for a host server.
Result<int> local_ordinal_for(const ServerIdentity& server);

}  // namespace companion::client
