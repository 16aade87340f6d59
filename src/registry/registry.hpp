// Discovery: where servers announce themselves and clients find them.
// The local registry (the embedded default) keeps one record per instance in a runtime directory.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "common/unique_fd.hpp"
#include "companion/result.hpp"
#include "companion/types.hpp"

namespace companion::registry {

// $COMPANION_RUNTIME_DIR, else $XDG_RUNTIME_DIR/companion, else /tmp/companion-<uid>.
std::string default_runtime_dir();

// Serialises a ServerIdentity as the record's JSON (and back). Unknown fields are ignored;
// missing required fields (instance_id, ns, component, socket_path, pid) are kInvalidArgument.
std::string record_to_json(const ServerIdentity& record);
Result<ServerIdentity> record_from_json(const std::string& json);

// A live registration: holds the instance's lock for as long as it exists. Destruction removes
// the record, the lock file and the socket path.
class Registration {
 public:
  virtual ~Registration() = default;
  virtual const ServerIdentity& record() const noexcept = 0;
};

class LocalRegistry {
 public:
  explicit LocalRegistry(std::string runtime_dir);
  const std::string& runtime_dir() const noexcept { return dir_; }

  // Creates the runtime directory (mode 0700) if needed.
  Result<void> ensure_dir() const;
  // The socket path a new instance should listen on: <dir>/<instance_id>.sock
  std::string socket_path_for(const std::string& instance_id) const;
  // Takes the instance's lock (<dir>/<instance_id>.lock, flock held by the returned object), then
  // writes <dir>/<instance_id>.json atomically.
  Result<std::unique_ptr<Registration>> register_instance(const ServerIdentity& record);
  // Records of live instances, optionally filtered (empty filter = any). A record whose lock is
  // not held (its server died) is removed with its socket and lock file; unreadable records are
  // skipped. Ordered by start time, oldest first.
  Result<std::vector<ServerIdentity>> list(const std::string& ns = "",
                                           const std::string& component = "") const;

 private:
  std::string dir_;
};

}  // namespace companion::registry
