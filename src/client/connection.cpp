#include "client/connection.hpp"

#include <poll.h>
#include <unistd.h>

#include <string>

#include "common/deadline.hpp"
#include "transport/unix_socket.hpp"

namespace companion::client {
namespace {

std::string pid_namespace_of(const std::string& proc_entry) {
  char target[128];
  ssize_t n = ::readlink((proc_entry + "/ns/pid").c_str(), target, sizeof(target) - 1);
  return n > 0 ? std::string(target, static_cast<size_t>(n)) : std::string();
}

// True when pid (as this process sees it) is known to live in another pid namespace (a server in
// a container): the pid its record names is then its own view, not comparable with ours. False
// when that cannot be read (another user's process): the pids must then match.
bool in_another_pid_namespace(pid_t pid) {
  std::string ours = pid_namespace_of("/proc/self");
  std::string theirs = pid_namespace_of("/proc/" + std::to_string(pid));
  return !ours.empty() && !theirs.empty() && ours != theirs;
}

}  // namespace

Result<std::shared_ptr<Connection>> Connection::open(const std::string& socket_path,
                                                     const std::string& client_name,
                                                     int connect_timeout_ms,
                                                     const std::optional<ExpectedPeer>& expected) {
  COMPANION_ASSIGN_OR_RETURN(UniqueFd fd, transport::connect_unix(socket_path, connect_timeout_ms));
  if (expected) {
    // The socket file's owner was checked before connecting; the process behind it is checked
    // here, so a socket swapped in meanwhile, or a record naming someone else's pid, is refused.
    COMPANION_ASSIGN_OR_RETURN(transport::PeerCredentials peer,
                               transport::peer_credentials(fd.get()));
    bool pid_matches = !expected->pid || peer.pid == 0 || peer.pid == *expected->pid ||
                       in_another_pid_namespace(peer.pid);
    if (peer.uid != expected->uid || !pid_matches) {
      std::string claim = expected->claimed_by + " claims uid " + std::to_string(expected->uid);
      if (expected->pid) claim += " pid " + std::to_string(*expected->pid);
      return make_error(StatusCode::kNotPermitted,
                        claim + " but the socket " + socket_path + " is served by pid " +
                            std::to_string(peer.pid) + " uid " + std::to_string(peer.uid));
    }
  }
  std::shared_ptr<Connection> c(new Connection(std::move(fd)));
  protocol::Hello hello;
  hello.client_name = client_name;
  hello.pid = ::getpid();
  COMPANION_ASSIGN_OR_RETURN(protocol::Message reply, c->call(hello, 10000));
  auto* h = std::get_if<protocol::HelloReply>(&reply.body);
  if (h == nullptr) return make_error(StatusCode::kProtocolError, "server did not answer hello");
  if (h->major != kProtocolMajor)
    return make_error(StatusCode::kVersionMismatch,
                      "server speaks protocol " + std::to_string(h->major) + ", this client " +
                          std::to_string(kProtocolMajor));
  c->server_ = h->server;
  c->server_minor_ = h->minor;
  return c;
}

Result<uint64_t> Connection::send_locked(protocol::Body request) {
  uint64_t id = next_id_++;
  COMPANION_ASSIGN_OR_RETURN(auto payload,
                             protocol::encode(protocol::Message{id, std::move(request)}));
  COMPANION_TRY(protocol::send_frame(fd_.get(), payload));
  return id;
}

Result<uint64_t> Connection::send(protocol::Body request) {
  std::lock_guard<std::mutex> lock(mutex_);
  return send_locked(std::move(request));
}

Result<protocol::Frame> Connection::receive_frame_locked(int timeout_ms) {
  return protocol::receive_frame(fd_.get(), reader_, timeout_ms);
}

void Connection::discard_late(const protocol::Message& m) {
  if (abandoned_.erase(m.request_id) == 0) return;
  if (auto* p = std::get_if<protocol::Parameters>(&m.body)) {
    // The lease is ours though nobody waits for it any more: give it back.
    auto id = send_locked(protocol::Release{p->lease_id});
    if (id.ok()) abandoned_.insert(*id);
  } else if (std::holds_alternative<protocol::StatusEvent>(m.body)) {
    // A subscription nobody reads any more: end it, or its events would keep coming.
    auto id = send_locked(protocol::StatusUnsubscribe{m.request_id});
    if (id.ok()) abandoned_.insert(*id);
  }
}

std::optional<Error> Connection::connection_refusal() {
  auto frame = receive_frame_locked(0);
  if (!frame.ok()) return std::nullopt;
  auto m = protocol::decode(std::move(frame->payload));
  if (!m.ok() || m->request_id != 0) return std::nullopt;
  if (auto* e = std::get_if<protocol::ErrorReply>(&m->body)) return e->error;
  return std::nullopt;
}

bool Connection::alive() const noexcept {
  pollfd p{fd_.get(), POLLRDHUP, 0};
  if (::poll(&p, 1, 0) < 0) return true;  // cannot tell: let the next request find out
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) == 0;
}

Result<protocol::Message> Connection::call(protocol::Body request, int timeout_ms,
                                           std::vector<UniqueFd>* fds) {
  std::lock_guard<std::mutex> lock(mutex_);
  const Deadline deadline = Deadline::after_ms(timeout_ms);
  auto sent = send_locked(std::move(request));
  if (!sent.ok()) {
    // A server that refused the connection has said why before closing: report that instead.
    if (sent.error().code == StatusCode::kConnectionClosed)
      if (auto refusal = connection_refusal(); refusal) return *refusal;
    return std::move(sent).error();
  }
  uint64_t id = *sent;
  for (;;) {
    auto frame = receive_frame_locked(deadline.remaining_ms());
    if (!frame.ok()) {
      if (frame.error().code == StatusCode::kTimeout) abandoned_.insert(id);
      return std::move(frame).error();
    }
    COMPANION_ASSIGN_OR_RETURN(protocol::Message m, protocol::decode(std::move(frame->payload)));
    // Request id 0 answers no request: the server ends the connection, saying why.
    if (auto* e = std::get_if<protocol::ErrorReply>(&m.body); e && m.request_id == 0)
      return e->error;
    if (m.request_id != id) {
      discard_late(m);
      continue;  // a stale reply or a stream event nobody reads here
    }
    if (auto* e = std::get_if<protocol::ErrorReply>(&m.body)) return e->error;
    if (fds != nullptr) *fds = std::move(frame->fds);
    return m;
  }
}

Result<protocol::Message> Connection::receive(int timeout_ms) {
  std::lock_guard<std::mutex> lock(mutex_);
  COMPANION_ASSIGN_OR_RETURN(protocol::Frame frame, receive_frame_locked(timeout_ms));
  return protocol::decode(std::move(frame.payload));
}

}  // namespace companion::client
