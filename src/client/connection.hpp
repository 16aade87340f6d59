// A client's connection to a server: blocking request/reply over the framed protocol.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/deadline.hpp"
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

// Requests from any number of threads share one connection: replies are matched to their
// waiters by request id. Whoever waits and finds nobody reading becomes the reader for a while
// and hands each frame to its waiter, so no request waits behind another's (a release is not
// stuck behind a multi-minute load on the same connection). No lock is held across a wait.
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
  // becomes its Error. A request using a field the server's minor may not know (only_if_held,
  // shard rules, keys, publishing, reload with a 1.0 server) is kVersionMismatch, not sent.
  // Descriptors that came with the reply are moved to *fds.
  Result<protocol::Message> call(protocol::Body request, int timeout_ms,
                                 std::vector<UniqueFd>* fds = nullptr);
  // Sends without waiting for the reply, which is dropped when it comes (a lease in it is
  // released). The server handles a connection's requests in order: a later call sees its effect.
  Result<uint64_t> send(protocol::Body request);
  // Sends a request whose replies (a status stream) receive() returns; returns its id.
  Result<uint64_t> send_stream(protocol::Body request);
  // Next reply to a send_stream request (for streams).
  Result<protocol::Message> receive(int timeout_ms);
  // False once the server has closed its end (it died or dropped us); never blocks.
  bool alive() const noexcept;

  // How long sending one request may wait for the server to take it (a server that does not
  // read is given up on: the connection is then closed).
  static constexpr int kSendTimeoutMs = 30000;

 private:
  struct Waiter {
    std::optional<Result<protocol::Message>> reply;
    std::vector<UniqueFd> fds;
  };

  Connection(UniqueFd fd) : fd_(std::move(fd)) {}
  // Registers the id (waiters_ or streams_ first, so no reply can arrive unclaimed), then sends.
  Result<uint64_t> send_request(protocol::Body request, int timeout_ms, bool wait, bool stream);
  // Waits until done() (checked under mutex_) or the deadline; reads frames for everyone while
  // nobody else does. kTimeout at the deadline, the connection's error once it broke.
  Result<void> wait_until(std::unique_lock<std::mutex>& lock, const Deadline& deadline,
                          const std::function<bool()>& done);
  // Hands one frame to its waiter, stream or (late) nobody. Called with mutex_ held; requests it
  // must send (releasing a late lease) are returned to be sent once the lock is dropped.
  void dispatch(protocol::Frame frame, std::vector<protocol::Body>& to_send);
  // The connection cannot be used any more: every waiter gets `e`.
  void break_locked(Error e);

  mutable std::mutex mutex_;  // everything below except reader_ and fd_'s writes
  std::condition_variable changed_;
  std::mutex send_mutex_;  // one frame is written whole before the next
  UniqueFd fd_;
  protocol::FrameReader reader_;  // used only by the thread that is reading_
  bool reading_ = false;
  std::optional<Error> broken_;
  uint64_t next_id_ = 1;
  std::map<uint64_t, Waiter> waiters_;
  std::set<uint64_t> streams_;
  std::deque<protocol::Message> inbox_;  // stream replies not yet received
  std::set<uint64_t> abandoned_;         // nobody waits for these replies any more
  ServerIdentity server_;
  uint16_t server_minor_ = 0;
  bool hello_done_ = false;  // server_minor_ is known: requests are checked against it
};

}  // namespace companion::client
