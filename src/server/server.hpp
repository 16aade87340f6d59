// The companion server: one per device. Accepts connections on its Unix socket, answers requests
// on a single event-loop thread, loads models on worker threads, registers itself for discovery.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.hpp"
#include "companion/result.hpp"
#include "companion/types.hpp"
#include "registry/etcd_client.hpp"

namespace companion::server {

// Who may connect, and what one client may hold. Each limit has a `companion serve` flag; a
// refusal is typed (LIMIT_EXCEEDED, or NOT_PERMITTED for the peer policy) and counted in health.
struct ConnectionLimits {
  size_t max_connections = 1024;         // --max-connections: all clients together
  size_t max_connections_per_uid = 256;  // --max-connections-per-uid: one local user
  // --idle-timeout: a connection without requests, leases, subscriptions or waits for this long
  // is closed (clients reconnect on their next request). 0: never.
  double idle_timeout_s = 300;
  double frame_timeout_s = 10;  // --frame-timeout: a started request frame must complete in it
  // --max-pending-frame-bytes: bytes of incomplete request frames, all connections together (a
  // frame counts at the size its header announces).
  size_t max_pending_frame_bytes = 256u << 20;
  // --max-queued-replies: a connection with this many replies it has not read is not read from
  // until it catches up (backpressure).
  size_t max_queued_replies = 256;
  // --max-queued-fds: descriptors in one connection's unread replies; a reply that would pass it
  // is refused (the connection is not read from while at it). One reply carries up to 250.
  size_t max_queued_fds = 1024;
  // --max-queued-fds-total: the same, all connections together (at most half the server's
  // RLIMIT_NOFILE is used, whatever this says).
  size_t max_queued_fds_total = 8192;
  // --max-queued-bytes: bytes of one connection's unread replies; at it the connection is not
  // read from, and one whose queue passes it by more than a whole frame (status events keep
  // coming) is dropped.
  size_t max_queued_bytes = 64u << 20;
  // --max-queued-bytes-total: the same, all connections together; past it a connection with
  // unread replies that is sent another is dropped.
  size_t max_queued_bytes_total = 1u << 30;
  // --max-leases-per-connection: leases one connection may hold at once.
  size_t max_leases_per_connection = 4096;
  // --socket-group: the socket becomes 0660 with this group (a name or a gid), whose members may
  // then connect; "" keeps it 0600.
  std::string socket_group;
  // Peers allowed besides the server's own uid and root (SO_PEERCRED): --allow-uid, --allow-gid.
  std::vector<uid_t> allow_uids;
  std::vector<gid_t> allow_gids;
};

struct ServerOptions {
  std::string device = "host";   // "host", a GPU ordinal, UUID or PCI bus id
  std::string ns = "companion";  // namespace
  std::string backend;           // "" = the device's default (host | cuda-vmm), or cuda-ipc
  std::vector<std::string> model_roots;
  std::string runtime_dir;  // "" = registry default
  // Where else to announce this instance: "" ($COMPANION_REGISTRY, else local only), "local",
  // or "etcd://host:port[,host:port]". The local registry always holds the instance's record.
  std::string registry;
  // etcd TLS (CA, client certificate and key) and user/password-file authentication; empty
  // fields come from $COMPANION_REGISTRY_CA, _CERT, _KEY, _USER, _PASSWORD_FILE.
  registry::EtcdSecurity registry_security;
  int registry_ttl_s = 3;   // etcd lease TTL: a dead instance disappears from etcd within it
  std::string socket_path;  // "" = <runtime_dir>/<instance>.sock
  std::string hf_cache;     // "" = the usual HF environment rules
  size_t load_threads = 2;
  std::string direct_io = "auto";    // O_DIRECT checkpoint reads: auto (per file), on, off
  std::vector<std::string> preload;  // model sources to load at start
  // --max-header-bytes, --max-tensors, --max-checkpoint-files: what one checkpoint may cost.
  checkpoint::CheckpointLimits checkpoint_limits;
  ConnectionLimits connections;
  // Store limits (StoreConfig documents each): a load past one is refused and counted.
  size_t max_models = 1024;             // --max-models: loaded + loading
  size_t max_variants_per_source = 64;  // --max-variants-per-source
  size_t max_generations = 2;           // --max-generations: live generations of one key
  size_t max_error_entries = 256;       // --max-error-entries: failed loads kept
  double error_ttl_s = 300;             // --error-ttl: how long a failed load is kept
  // --memory-reserve: device memory no load may take, in bytes ("1GiB", "512MiB", "4096") or as
  // a share of the device ("10%").
  std::string memory_reserve = "1GiB";
  // --memory-budget: what all models together may hold, as bytes or a share of the device; ""
  // = what is available at start less the reserve.
  std::string memory_budget;
  // --idle-evict: seconds after which a model no client holds is evicted (0: never).
  double idle_evict_s = 0;
  // --host-budget: host memory for offloaded models' copies (the host tier), in bytes or as a
  // share of the host's memory ("25%"); "0" = no host tier.
  std::string host_budget = "0";
  // --shutdown-timeout: how long stopping waits for loads; one stuck longer is left behind.
  double shutdown_timeout_s = 5;
  // --keep: what holds committed memory past this server (restart without reload). kAuto:
  // systemd's file-descriptor store when systemd offers one (NOTIFY_SOCKET with FDSTORE, or
  // descriptors it passed back), else the keeper. kNo (--no-keep): nothing; a keeper an earlier
  // server left for this device, and what systemd passed back, are freed.
  enum class Keep { kAuto, kKeeper, kSystemd, kNo };
  Keep keep = Keep::kAuto;
  // The program run as `PROGRAM keeper ...` (the companion executable); "": no keeper process.
  std::string keeper_program;
  // --metrics: where the Prometheus endpoint listens ("PORT" on loopback, "ADDRESS:PORT",
  // "[IPv6]:PORT"); "" = none.
  std::string metrics;
  // --keep-for: how long the keeper waits for a server to come back before it frees everything.
  double keep_for_s = 600;
};

class Server {
 public:
  static Result<std::unique_ptr<Server>> create(const ServerOptions& options);
  virtual ~Server() = default;
  virtual const ServerIdentity& identity() const = 0;
  // Serves until stop() (from another thread or a signal thread). Unregisters on return.
  virtual Result<void> run() = 0;
  virtual void stop() = 0;
};

}  // namespace companion::server
