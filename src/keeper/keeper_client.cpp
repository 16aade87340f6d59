#include "keeper/keeper_client.hpp"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "common/log.hpp"
#include "transport/unix_socket.hpp"

namespace companion::keeper {
namespace {

constexpr int kIoTimeoutMs = 10000;
// How long a keeper just started has to come up on its socket.
constexpr auto kStartTimeout = std::chrono::seconds(5);

// fork, setsid, fork, exec: the keeper is reparented to init (or the nearest subreaper), in a
// session of its own, with no descriptor of the server's but its log.
Result<void> start_keeper(const std::string& socket_path, const KeeperLaunch& launch,
                          std::chrono::milliseconds keep_for) {
  const std::string keep_for_s = std::to_string(static_cast<double>(keep_for.count()) / 1000.0);
  std::vector<std::string> args = {launch.program, "keeper",     "--socket",
                                   socket_path,    "--keep-for", keep_for_s};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t child = ::fork();
  if (child < 0) return errno_error(StatusCode::kInternal, "fork for the keeper", errno);
  if (child == 0) {
    // Only async-signal-safe calls from here to exec.
    ::setsid();
    if (::fork() != 0) ::_exit(0);
    int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    int log = ::open(launch.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (null >= 0) ::dup2(null, 0);
    if (log >= 0) {
      ::dup2(log, 1);
      ::dup2(log, 2);
    } else if (null >= 0) {
      ::dup2(null, 1);
      ::dup2(null, 2);
    }
    ::close_range(3, ~0u, 0);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  int status = 0;
  while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  return ok_result();
}

}  // namespace

Result<void> KeeperSession::send(const Message& message, std::span<const int> fds) {
  COMPANION_ASSIGN_OR_RETURN(std::vector<uint8_t> payload, encode(message));
  return protocol::send_frame(fd_.get(), payload, fds, kIoTimeoutMs);
}

Result<std::unique_ptr<KeeperSession>> KeeperSession::open(const std::string& socket_path,
                                                           const KeeperLaunch& launch,
                                                           std::chrono::milliseconds keep_for) {
  // A keeper that was leaving (its last server gone with nothing held) as this one connected
  // closes the connection: a new keeper is then started. Another server's session is final.
  Result<std::unique_ptr<KeeperSession>> session = make_error(StatusCode::kUnavailable, "");
  for (int attempt = 0; attempt < 3; ++attempt) {
    session = open_once(socket_path, launch, keep_for);
    if (session.ok() || session.error().code == StatusCode::kUnavailable ||
        session.error().code == StatusCode::kNotPermitted)
      break;
  }
  return session;
}

Result<std::unique_ptr<KeeperSession>> KeeperSession::open_once(
    const std::string& socket_path, const KeeperLaunch& launch,
    std::chrono::milliseconds keep_for) {
  auto connected = transport::connect_unix(socket_path);
  if (!connected.ok() && !launch.program.empty()) {
    COMPANION_TRY(start_keeper(socket_path, launch, keep_for));
    auto until = std::chrono::steady_clock::now() + kStartTimeout;
    do {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      connected = transport::connect_unix(socket_path);
    } while (!connected.ok() && std::chrono::steady_clock::now() < until);
  }
  if (!connected.ok()) return connected.error();
  // The keeper holds this user's memory: it must run as this user.
  COMPANION_ASSIGN_OR_RETURN(transport::PeerCredentials peer,
                             transport::peer_credentials(connected->get()));
  if (peer.uid != ::geteuid())
    return make_error(StatusCode::kNotPermitted, "the keeper on " + socket_path + " runs as uid " +
                                                     std::to_string(peer.uid) + ", not this one");
  std::unique_ptr<KeeperSession> session(new KeeperSession());
  session->fd_ = std::move(connected).value();
  COMPANION_TRY(session->send(Hello{::getpid(), keep_for.count(), false}));
  COMPANION_ASSIGN_OR_RETURN(
      protocol::Frame frame,
      protocol::receive_frame(session->fd_.get(), session->reader_, kIoTimeoutMs));
  COMPANION_ASSIGN_OR_RETURN(Message reply, decode(frame.payload));
  auto* hello = std::get_if<HelloReply>(&reply);
  if (hello == nullptr) return make_error(StatusCode::kProtocolError, "keeper: no HelloReply");
  if (!hello->error.empty()) return make_error(StatusCode::kUnavailable, "keeper: " + hello->error);
  session->hello_ = *hello;
  return session;
}

Result<HelloReply> KeeperSession::release(const std::string& socket_path) {
  auto connected = transport::connect_unix(socket_path, 1000);
  if (!connected.ok()) return HelloReply{};
  COMPANION_ASSIGN_OR_RETURN(transport::PeerCredentials peer,
                             transport::peer_credentials(connected->get()));
  if (peer.uid != ::geteuid()) return HelloReply{};  // not ours to release
  COMPANION_ASSIGN_OR_RETURN(std::vector<uint8_t> payload, encode(Hello{::getpid(), 0, true}));
  COMPANION_TRY(protocol::send_frame(connected->get(), payload, {}, kIoTimeoutMs));
  protocol::FrameReader reader(protocol::FdPolicy::kRefuse);
  COMPANION_ASSIGN_OR_RETURN(protocol::Frame frame,
                             protocol::receive_frame(connected->get(), reader, kIoTimeoutMs));
  COMPANION_ASSIGN_OR_RETURN(Message reply, decode(frame.payload));
  auto* hello = std::get_if<HelloReply>(&reply);
  if (hello == nullptr) return make_error(StatusCode::kProtocolError, "keeper: no HelloReply");
  return *hello;
}

Result<std::vector<KeptGeneration>> KeeperSession::list() {
  COMPANION_TRY(send(List{}));
  std::vector<KeptGeneration> out;
  for (;;) {
    COMPANION_ASSIGN_OR_RETURN(protocol::Frame frame,
                               protocol::receive_frame(fd_.get(), reader_, kIoTimeoutMs));
    COMPANION_ASSIGN_OR_RETURN(Message message, decode(frame.payload));
    if (auto* kept = std::get_if<Kept>(&message)) {
      out.push_back(KeptGeneration{kept->id, std::move(kept->catalog), std::move(frame.fds)});
    } else if (std::holds_alternative<ListEnd>(message)) {
      return out;
    } else {
      return make_error(StatusCode::kProtocolError, "keeper: unexpected reply to List");
    }
  }
}

Result<void> KeeperSession::keep(uint64_t id, const std::vector<uint8_t>& catalog,
                                 std::span<const int> fds) {
  return send(Keep{id, catalog}, fds);
}

Result<void> KeeperSession::forget(uint64_t id) {
  return send(Forget{id});
}

}  // namespace companion::keeper
