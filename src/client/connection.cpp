#include "client/connection.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
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

// A request that uses a field the server's protocol minor may not know: an older server would
// silently ignore it (loading a second copy instead of answering NOT_READY, a model without its
// shard rules). Refused here, before anything is sent. Fields of 1.0 added after its first
// release (only_if_held, shard rules) are only known for sure from 1.1.
Result<void> check_supported(const protocol::Body& body, uint16_t server_minor) {
  auto refuse = [&](const std::string& what, uint16_t needed) -> Result<void> {
    return make_error(StatusCode::kVersionMismatch,
                      what + " needs a server of protocol 1." + std::to_string(needed) +
                          "; this server speaks 1." + std::to_string(server_minor));
  };
  if (auto* d = std::get_if<protocol::PublishDeclare>(&body); d && d->more && server_minor < 3)
    return refuse("a table declared in parts (more than one frame holds)", 3);
  if (server_minor < 3) {  // an older server would unload instead of offloading
    if (auto* u = std::get_if<protocol::Unload>(&body); u != nullptr && u->to_host)
      return refuse("offload", 3);
    if (auto* l = std::get_if<protocol::Load>(&body); l != nullptr && !l->key.empty())
      return refuse("loading a model by key or id", 3);
  }
  if (server_minor >= 1) return ok_result();
  auto spec_fields = [&](const ModelSpec& spec) -> Result<void> {
    if (!spec.shard_rules.empty()) return refuse("a model spec with shard rules", 1);
    return ok_result();
  };
  if (auto* g = std::get_if<protocol::GetParameters>(&body)) {
    if (g->only_if_held) return refuse("only_if_held", 1);
    if (!g->key.empty() || g->generation != 0 || g->fingerprint || g->or_source)
      return refuse("attaching by key (generation, fingerprint)", 1);
    return spec_fields(g->spec);
  }
  if (auto* st = std::get_if<protocol::StatusSubscribe>(&body)) {
    if (!st->key.empty()) return refuse("following a published key", 1);
    return spec_fields(st->spec);
  }
  if (auto* l = std::get_if<protocol::Load>(&body)) return spec_fields(l->spec);
  if (auto* u = std::get_if<protocol::Unload>(&body)) return spec_fields(u->spec);
  if (std::holds_alternative<protocol::PublishClaim>(body) ||
      std::holds_alternative<protocol::PublishDeclare>(body) ||
      std::holds_alternative<protocol::PublishCommit>(body) ||
      std::holds_alternative<protocol::PublishAbort>(body))
    return refuse("publishing", 1);
  if (std::holds_alternative<protocol::Reload>(body)) return refuse("reload", 1);
  return ok_result();
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
  c->hello_done_ = true;
  return c;
}

Result<uint64_t> Connection::send_request(protocol::Body request, int timeout_ms, bool wait,
                                          bool stream) {
  // Hello itself goes out before the server's minor is known.
  if (hello_done_) COMPANION_TRY(check_supported(request, server_minor_));
  uint64_t id;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (broken_) return *broken_;
    id = next_id_++;
    if (wait)
      waiters_.try_emplace(id);
    else if (stream)
      streams_.insert(id);
    else
      abandoned_.insert(id);
  }
  auto forget = [&] {
    std::lock_guard<std::mutex> lock(mutex_);
    waiters_.erase(id);
    streams_.erase(id);
    abandoned_.erase(id);
  };
  auto payload = protocol::encode(protocol::Message{id, std::move(request)});
  if (!payload.ok()) {
    forget();
    return std::move(payload).error();
  }
  int send_ms = timeout_ms < 0 ? kSendTimeoutMs : std::min(timeout_ms, kSendTimeoutMs);
  Result<void> sent = ok_result();
  {
    std::lock_guard<std::mutex> send_lock(send_mutex_);
    sent = protocol::send_frame(fd_.get(), *payload, {}, send_ms);
  }
  if (!sent.ok()) {
    forget();
    if (sent.error().code == StatusCode::kTimeout) {
      // Part of a frame may be out: nothing sent after it could be parsed. Closing the socket
      // wakes whoever is reading.
      std::lock_guard<std::mutex> lock(mutex_);
      break_locked(sent.error());
      ::shutdown(fd_.get(), SHUT_RDWR);
    }
    return std::move(sent).error();
  }
  return id;
}

Result<uint64_t> Connection::send(protocol::Body request) {
  return send_request(std::move(request), kSendTimeoutMs, /*wait=*/false, /*stream=*/false);
}

Result<uint64_t> Connection::send_stream(protocol::Body request) {
  return send_request(std::move(request), kSendTimeoutMs, /*wait=*/false, /*stream=*/true);
}

void Connection::break_locked(Error e) {
  if (!broken_) broken_ = std::move(e);
  changed_.notify_all();
}

void Connection::dispatch(protocol::Frame frame, std::vector<protocol::Body>& to_send) {
  auto decoded = protocol::decode(std::move(frame.payload));
  if (!decoded.ok()) {
    break_locked(std::move(decoded).error());  // the stream can no longer be trusted
    return;
  }
  protocol::Message& m = *decoded;
  // Request id 0 answers no request: the server ends the connection, saying why.
  if (auto* e = std::get_if<protocol::ErrorReply>(&m.body); e && m.request_id == 0) {
    break_locked(e->error);
    return;
  }
  if (auto w = waiters_.find(m.request_id); w != waiters_.end()) {
    // A subscription's later events may follow its first before the waiter takes it: the first
    // is the reply, the rest go nowhere (as after the waiter is gone).
    if (w->second.reply) return;
    if (auto* e = std::get_if<protocol::ErrorReply>(&m.body))
      w->second.reply.emplace(e->error);
    else
      w->second.reply.emplace(std::move(m));
    w->second.fds = std::move(frame.fds);
    changed_.notify_all();
    return;
  }
  if (streams_.count(m.request_id) != 0) {
    inbox_.push_back(std::move(m));
    changed_.notify_all();
    return;
  }
  if (abandoned_.erase(m.request_id) == 0) return;  // e.g. a status event after unsubscribing
  if (auto* p = std::get_if<protocol::Parameters>(&m.body)) {
    // The lease is ours though nobody waits for it any more: give it back.
    to_send.push_back(protocol::Release{p->lease_id});
  } else if (std::holds_alternative<protocol::StatusEvent>(m.body)) {
    // A subscription nobody reads any more: end it, or its events would keep coming.
    to_send.push_back(protocol::StatusUnsubscribe{m.request_id});
  }
}

Result<void> Connection::wait_until(std::unique_lock<std::mutex>& lock, const Deadline& deadline,
                                    const std::function<bool()>& done) {
  for (;;) {
    if (done()) return ok_result();
    if (broken_) return *broken_;
    if (reading_) {
      // Another thread reads; it hands us our reply, or hands reading over when it is done.
      if (deadline.unlimited())
        changed_.wait(lock);
      else if (changed_.wait_for(lock, std::chrono::milliseconds(deadline.remaining_ms())) ==
                   std::cv_status::timeout &&
               !done() && !broken_)
        return make_error(StatusCode::kTimeout, "no reply from the server in time");
      continue;
    }
    // Nobody reads: this thread does, for everyone, until its own wait is over (past the deadline
    // one last look at what has already arrived).
    reading_ = true;
    lock.unlock();
    auto frame = protocol::receive_frame(fd_.get(), reader_, deadline.remaining_ms());
    std::vector<protocol::Body> to_send;
    lock.lock();
    reading_ = false;
    changed_.notify_all();  // someone else may read now
    if (!frame.ok()) {
      if (frame.error().code == StatusCode::kTimeout) {
        if (done()) return ok_result();
        return std::move(frame).error();
      }
      break_locked(std::move(frame).error());
      continue;
    }
    dispatch(std::move(*frame), to_send);
    if (!to_send.empty()) {
      lock.unlock();
      for (auto& body : to_send) (void)send(std::move(body));
      lock.lock();
    }
  }
}

bool Connection::alive() const noexcept {
  pollfd p{fd_.get(), POLLRDHUP, 0};
  if (::poll(&p, 1, 0) < 0) return true;  // cannot tell: let the next request find out
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) == 0;
}

Result<protocol::Message> Connection::call(protocol::Body request, int timeout_ms,
                                           std::vector<UniqueFd>* fds) {
  const Deadline deadline = Deadline::after_ms(timeout_ms);
  auto sent = send_request(std::move(request), timeout_ms, /*wait=*/true, /*stream=*/false);
  std::unique_lock<std::mutex> lock(mutex_);
  if (!sent.ok()) {
    // A server that refused the connection has said why before closing: report that instead.
    if (sent.error().code == StatusCode::kConnectionClosed) {
      auto nothing = [] { return false; };
      auto refusal = wait_until(lock, Deadline::after_ms(0), nothing);
      if (!refusal.ok() && refusal.error().code != StatusCode::kTimeout) return refusal.error();
    }
    return std::move(sent).error();
  }
  const uint64_t id = *sent;
  auto waited = wait_until(lock, deadline, [&] { return waiters_.at(id).reply.has_value(); });
  Waiter w = std::move(waiters_.at(id));
  waiters_.erase(id);
  if (!w.reply) {
    abandoned_.insert(id);  // a late reply is dropped (its lease released)
    return std::move(waited).error();
  }
  if (fds != nullptr) *fds = std::move(w.fds);
  return std::move(*w.reply);
}

Result<protocol::Message> Connection::receive(int timeout_ms) {
  const Deadline deadline = Deadline::after_ms(timeout_ms);
  std::unique_lock<std::mutex> lock(mutex_);
  COMPANION_TRY(wait_until(lock, deadline, [&] { return !inbox_.empty(); }));
  protocol::Message m = std::move(inbox_.front());
  inbox_.pop_front();
  return m;
}

}  // namespace companion::client
