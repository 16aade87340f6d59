// A client's connection to a server: blocking request/reply over the framed protocol.
#pragma once

#include <sys/types.h>

#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/unique_fd.hpp"
#include "companion/result.hpp"
#include "protocol/frame.hpp"
#include "protocol/messages.hpp"
#include "transport/unix_socket.hpp"

namespace companion::client {

// Who must be serving the socket a client connects to, checked against the server's
// SO_PEERCRED before anything is sent.
struct ExpectedPeer {
  uid_t uid = 0;
  // The pid the record names (none for a socket given directly). A server in another pid
  // namespace (a peer pid of 0: one this process cannot see; or /proc says so) has its own view
  // of its pid: only the uid is checked then.
  std::optional<pid_t> pid;
  std::string claimed_by;  // "record <path>", for messages
};

class Connection {
 public:
  // Connects to the socket (waiting at most connect_timeout_ms to be accepted), checks the
  // server's peer credentials against `expected` (kNotPermitted on a mismatch) and exchanges
  // hello (at most 10 s).
  static Result<std::shared_ptr<Connection>> open(
      const std::string& socket_path, const std::string& client_name,
      int connect_timeout_ms = transport::kDefaultConnectTimeoutMs,
      const std::optional<ExpectedPeer>& expected = std::nullopt);

  const ServerIdentity& server() const noexcept { return server_; }
  // The protocol minor version the server spoke in hello (1: publishing, generations).
  uint16_t server_minor() const noexcept { return server_minor_; }

  // Sends a request and waits (timeout_ms < 0: forever) for the reply with its id. An ErrorReply
  // becomes its Error. Descriptors that came with the reply are moved to *fds.
  Result<protocol::Message> call(protocol::Body request, int timeout_ms,
                                 std::vector<UniqueFd>* fds = nullptr);
  // Sends without waiting; returns the request id.
  Result<uint64_t> send(protocol::Body request);
  // Next message of any id (for streams).
  Result<protocol::Message> receive(int timeout_ms);
  // False once the server has closed its end (it died or dropped us); never blocks.
  bool alive() const noexcept;

 private:
  Connection(UniqueFd fd) : fd_(std::move(fd)) {}
  Result<uint64_t> send_locked(protocol::Body request);
  Result<protocol::Frame> receive_frame_locked(int timeout_ms);
  // The error a refusing server sent before closing, if it is already here.
  std::optional<Error> connection_refusal();
  // Replies to requests we gave up on; a late lease is released at once.
  void discard_late(const protocol::Message& m);

  std::mutex mutex_;
  UniqueFd fd_;
  protocol::FrameReader reader_;
  uint64_t next_id_ = 1;
  std::set<uint64_t> abandoned_;
  ServerIdentity server_;
  uint16_t server_minor_ = 0;
};

}  // namespace companion::client
