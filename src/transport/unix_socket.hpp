// AF_UNIX stream sockets on filesystem paths (not abstract: they must cross container boundaries
// through a mounted directory).
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "common/unique_fd.hpp"
#include "companion/result.hpp"

namespace companion::transport {

// Who may open the socket file: its mode and group are set after bind() and before listen(), so
// nobody connects through the umask's mode in between.
struct SocketAccess {
  mode_t mode = 0600;
  gid_t group = static_cast<gid_t>(-1);  // -1: the creator's
};

// Binds and listens on `path` (non-blocking, close-on-exec). An existing file at path is replaced.
Result<UniqueFd> listen_unix(const std::string& path, const SocketAccess& access = {},
                             int backlog = 128);
// How long connect_unix waits by default for a server to accept: a listener whose backlog is full
// (stopped, or never accepting) would otherwise hold the caller for ever.
constexpr int kDefaultConnectTimeoutMs = 5000;
// Connects to `path` and returns a blocking, close-on-exec socket. kUnavailable when nobody
// listens; kTimeout when the connection is not accepted within timeout_ms (< 0: no limit).
Result<UniqueFd> connect_unix(const std::string& path, int timeout_ms = kDefaultConnectTimeoutMs);
Result<void> set_nonblocking(int fd);

struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};
Result<PeerCredentials> peer_credentials(int fd);
// The peer's supplementary groups when it connected (SO_PEERGROUPS).
Result<std::vector<gid_t>> peer_groups(int fd);

}  // namespace companion::transport
