// Discovery: where servers announce themselves and clients find them.
// The local registry (the embedded default) keeps one record per instance in a runtime directory.
// A server always registers there (it owns its socket and proves liveness with a lock); with etcd
// it also announces itself in etcd (etcd_registry.hpp), where clients then look.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/unique_fd.hpp"
#include "companion/result.hpp"
#include "companion/types.hpp"

namespace companion::registry {

// $COMPANION_RUNTIME_DIR, else $XDG_RUNTIME_DIR/companion, else /tmp/companion-<uid>.
std::string default_runtime_dir();

// Which registry servers announce themselves in and clients look in.
struct RegistryChoice {
  std::string url = "local";                // "local" or the etcd URL as given
  std::vector<std::string> etcd_endpoints;  // http://host:port each; empty for local
  bool is_etcd() const noexcept { return !etcd_endpoints.empty(); }
};
// configured: "" (then $COMPANION_REGISTRY, else local), "local", or
// "etcd://host:port[,host:port...]". kInvalidArgument for anything else.
Result<RegistryChoice> choose_registry(const std::string& configured);

// Instance ids become file names: [0-9a-zA-Z_-]{1,64}.
bool is_valid_instance_id(std::string_view id) noexcept;
// What every record must satisfy: a valid instance id, non-empty ns and component without '/',
// a non-empty socket path. kInvalidArgument otherwise.
Result<void> validate_record(const ServerIdentity& record);

// Serialises a ServerIdentity as the record's JSON (and back). Unknown fields are ignored;
// missing required fields (instance_id, ns, component, socket_path, pid), fields of the wrong type
// and records failing validate_record are kInvalidArgument.
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
  // <dir>/<instance_id>.json and <dir>/<instance_id>.lock
  std::string record_path_for(const std::string& instance_id) const;
  std::string lock_path_for(const std::string& instance_id) const;
  // Takes the instance's lock (<dir>/<instance_id>.lock, flock held by the returned object), then
  // writes <dir>/<instance_id>.json atomically. Creates the directory if needed (kNotPermitted if
  // it belongs to another user). Empty/zero socket_path, hostname, pid and started_at_ms are
  // filled in (socket_path_for(id), this host, getpid(), now). An id whose lock is held by a live
  // instance gives kUnavailable (after retrying for about 60 ms, as a cleaner removing a dead
  // instance of the same id holds its lock briefly).
  Result<std::unique_ptr<Registration>> register_instance(const ServerIdentity& record);
  // Records of live instances, optionally filtered (empty filter = any). A record whose lock is
  // not held (its server died) is removed with its socket and lock file; unreadable records are
  // skipped (and removed once older than 10 s with no live lock: a crash mid-write). Ordered by
  // start time, oldest first. A missing directory lists nothing; one owned by another user is
  // kNotPermitted. Never blocks.
  Result<std::vector<ServerIdentity>> list(const std::string& ns = "",
                                           const std::string& component = "") const;

 private:
  std::string dir_;
};

}  // namespace companion::registry
