// A writer's publication of a key, on a connection of its own (the key's writer lock).
#pragma once

#include <memory>
#include <string>

#include "client/connection.hpp"
#include "companion/client.hpp"

namespace companion::client {

// Claims `key` on `connection` (a connection for this publication alone). nullptr when mode is
// kIfUnpublished and a generation is committed (its fingerprint matched).
Result<std::unique_ptr<Publication>> claim_publication(std::shared_ptr<Connection> connection,
                                                       int ordinal, const std::string& key,
                                                       const Fingerprint& fingerprint,
                                                       ClaimMode mode, int timeout_ms);

// The same tensor as a read-only view (what it is once committed).
TensorView read_only_view(const WritableTensor& tensor);

// kVersionMismatch when the server predates publishing (protocol 1.1).
Result<void> require_publishing(const ServerIdentity& server, uint16_t server_minor);

}  // namespace companion::client
