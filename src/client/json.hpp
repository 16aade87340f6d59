// JSON forms of the client's value types: the documents `companion ... --json` prints and the C
// ABI returns. One definition, so the CLI and libcompanion.so agree on every field name.
#pragma once

#include <nlohmann/json.hpp>

#include "companion/client.hpp"
#include "companion/types.hpp"

namespace companion::client {

nlohmann::json to_json(const ModelStatus& s);
nlohmann::json to_json(const ServerIdentity& s);
nlohmann::json to_json(const HealthInfo& h);
// {"error": {"code": "NOT_FOUND", "message": "..."}}
nlohmann::json to_json(const Error& e);
// A mapped model's facts: {"model": status, "lease_id", "segments", "segment_inodes",
// "mapped_bytes"} (the same field names as `companion attach --json`).
nlohmann::json to_json(const MappedModel& m);

}  // namespace companion::client
