// Discovery: where servers announce themselves and clients find them.
// The local registry (the embedded default) keeps one record per instance in a runtime directory.
// A server always registers there (it owns its socket and proves liveness with a lock); with etcd
// it also announces itself in etcd (etcd_registry.hpp), where clients then look.
#pragma once

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/unique_fd.hpp"
#include "companion/result.hpp"
#include "companion/types.hpp"
#include "registry/etcd_client.hpp"

namespace companion::registry {

// $COMPANION_RUNTIME_DIR, else $XDG_RUNTIME_DIR/companion, else /tmp/companion-<uid>.
std::string default_runtime_dir();

// The owners whose runtime directory, records and sockets a process trusts: itself, root (who
// can subvert it anyway), and the uids listed in $COMPANION_TRUST_UID (comma-separated), plus
// any given. An environment variable rather than a field, so that the C ABI and Python clients
// take it without changes to their option structs.
class TrustPolicy {
 public:
  TrustPolicy();  // this process's uid and root only
  // kInvalidArgument when $COMPANION_TRUST_UID is not a list of uids.
  static Result<TrustPolicy> from_environment(const std::vector<uint32_t>& extra = {});
  bool allows(uid_t uid) const noexcept;
  // "uid 0, 1000" for messages.
  std::string describe() const;

 private:
  std::vector<uid_t> uids_;
};

// Fills the empty fields of `given` from $COMPANION_REGISTRY_CA, _CERT, _KEY, _USER and
// _PASSWORD_FILE.
EtcdSecurity etcd_security_from_environment(EtcdSecurity given = {});

// Which registry servers announce themselves in and clients look in.
struct RegistryChoice {
  std::string url = "local";  // "local" or the etcd URL as given
  // http://host:port (etcd://) or https://host:port (etcds:// or https://) each; empty for local
  std::vector<std::string> etcd_endpoints;
  EtcdSecurity etcd_security;
  bool is_etcd() const noexcept { return !etcd_endpoints.empty(); }
};
// configured: "" (then $COMPANION_REGISTRY, else local), "local", or
// "etcd://host:port[,host:port...]" (plain HTTP), "etcds://..." or "https://..." (TLS).
// security: TLS and authentication settings; empty fields come from the environment
// (etcd_security_from_environment). kInvalidArgument for anything else, or for a certificate
// without its key.
Result<RegistryChoice> choose_registry(const std::string& configured,
                                       const EtcdSecurity& security = {});

// Instance ids become file names: [0-9a-zA-Z_-]{1,64}.
bool is_valid_instance_id(std::string_view id) noexcept;
// The longest socket path a record may name (sockaddr_un's sun_path, less its NUL).
constexpr size_t kMaxSocketPathBytes = 107;
// What every record must satisfy: a valid instance id, non-empty ns and component without '/',
// an absolute socket path of at most kMaxSocketPathBytes without NUL bytes. kInvalidArgument
// otherwise.
Result<void> validate_record(const ServerIdentity& record);

// Serialises a ServerIdentity as the record's JSON (and back). Unknown fields are ignored;
// missing required fields (instance_id, ns, component, socket_path, pid), fields of the wrong type
// and records failing validate_record are kInvalidArgument.
std::string record_to_json(const ServerIdentity& record);
Result<ServerIdentity> record_from_json(const std::string& json);

// The owner of the socket at `path`, which must be a socket (not followed through a symlink)
// owned by an owner `trust` allows: kNotPermitted otherwise, kUnavailable when it is missing.
Result<uid_t> trusted_socket_owner(const std::string& path, const TrustPolicy& trust);

// A live registration: holds the instance's lock for as long as it exists. Destruction removes
// the record, the lock file and the socket path.
class Registration {
 public:
  virtual ~Registration() = default;
  virtual const ServerIdentity& record() const noexcept = 0;
};

class LocalRegistry {
 public:
  // Trusting TrustPolicy::from_environment() (this uid and root where that is malformed).
  explicit LocalRegistry(std::string runtime_dir);
  LocalRegistry(std::string runtime_dir, TrustPolicy trust);
  const std::string& runtime_dir() const noexcept { return dir_; }
  // The group given a runtime directory this registry creates (for --socket-group): members
  // may then reach the sockets in it. None: the creator's group.
  void set_dir_group(std::optional<gid_t> group) { dir_group_ = group; }

  // Creates the runtime directory if needed, with mode 0770 whatever the umask (and group
  // set_dir_group's). An existing one must be a directory owned by a trusted owner and not
  // writable by others (anyone could plant records and sockets there): kNotPermitted with what to
  // do otherwise.
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
  // skipped (and removed once older than 10 s with no live lock: a crash mid-write). Records and
  // lock files that are not regular files, or belong to an owner the trust policy does not
  // allow, and records whose socket is not a socket of the record's owner, are skipped and left
  // alone. Ordered by start time, oldest first. A missing directory lists nothing; one owned by
  // an untrusted user or writable by others is kNotPermitted. Never blocks.
  Result<std::vector<ServerIdentity>> list(const std::string& ns = "",
                                           const std::string& component = "") const;

 private:
  std::string dir_;
  TrustPolicy trust_;
  std::optional<gid_t> dir_group_;
};

}  // namespace companion::registry
