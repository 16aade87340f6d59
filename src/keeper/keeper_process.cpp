#include "keeper/keeper_process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <map>
#include <optional>
#include <vector>

#include "common/log.hpp"
#include "common/unique_fd.hpp"
#include "keeper/keeper_protocol.hpp"
#include "protocol/frame.hpp"
#include "transport/unix_socket.hpp"

namespace companion::keeper {
namespace {

using Clock = std::chrono::steady_clock;

// How long a new connection has to send its Hello, and a reply may take to go out.
constexpr int kIoTimeoutMs = 5000;

struct Held {
  std::vector<uint8_t> catalog;
  std::vector<UniqueFd> fds;
};

class Keeper {
 public:
  explicit Keeper(KeeperOptions options) : options_(std::move(options)) {}

  int run() {
    if (!start()) return done_ ? 0 : 1;
    log::info("keeper " + std::to_string(::getpid()) + " listening on " + options_.socket_path);
    // Started by a server that opens its session next: until then the keeper waits as if the
    // session had just ended, and with nothing held that is no wait at all beyond the grace.
    deadline_ = Clock::now() + std::chrono::seconds(30);
    while (!done_) {
      std::vector<pollfd> fds = {{listen_.get(), POLLIN, 0}, {signals_.get(), POLLIN, 0}};
      if (session_) fds.push_back({session_.get(), POLLIN, 0});
      int timeout = -1;
      if (!session_ && deadline_) {
        auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(*deadline_ - Clock::now());
        timeout = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(left.count(), 1 << 30)));
      }
      int n = ::poll(fds.data(), fds.size(), timeout);
      if (n < 0 && errno != EINTR) {
        log::error(std::string("keeper: poll: ") + std::strerror(errno));
        break;
      }
      if (fds[1].revents != 0) {
        log::info("keeper: signalled");
        break;
      }
      if (fds.size() > 2 && fds[2].revents != 0) serve_session();
      if (fds[0].revents & POLLIN) accept_one();
      if (!session_ && deadline_ && Clock::now() >= *deadline_) {
        if (!held_.empty())
          log::info("keeper: no server came back within " +
                    std::to_string(options_.keep_for.count() / 1000) + " s");
        break;
      }
    }
    log::info("keeper: exiting; freeing " + std::to_string(held_.size()) + " generations (" +
              std::to_string(descriptors()) + " descriptors)");
    held_.clear();
    ::unlink(options_.socket_path.c_str());
    return 0;
  }

 private:
  bool start() {
    // A server that started us had these blocked and SIGPIPE ignored; the keeper wants SIGTERM
    // and SIGINT through its signalfd and SIGPIPE still ignored.
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGTERM);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGHUP);
    ::sigprocmask(SIG_BLOCK, &signals, nullptr);
    std::signal(SIGPIPE, SIG_IGN);
    signals_.reset(::signalfd(-1, &signals, SFD_CLOEXEC | SFD_NONBLOCK));
    // Every generation costs a descriptor per segment: take what the system grants.
    rlimit nofile{};
    if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
      nofile.rlim_cur = nofile.rlim_max;
      (void)::setrlimit(RLIMIT_NOFILE, &nofile);
    }
    // One keeper per socket: a second one started by a racing server leaves at once.
    const std::string lock_path = options_.socket_path + ".lock";
    lock_.reset(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!lock_) {
      log::error("keeper: open " + lock_path + ": " + std::strerror(errno));
      return false;
    }
    if (::flock(lock_.get(), LOCK_EX | LOCK_NB) != 0) {
      log::info("keeper: another keeper holds " + lock_path + "; leaving");
      done_ = true;
      return false;
    }
    auto listening = transport::listen_unix(options_.socket_path);
    if (!listening.ok()) {
      log::error("keeper: " + listening.error().to_string());
      return false;
    }
    listen_ = std::move(listening).value();
    return true;
  }

  size_t descriptors() const {
    size_t n = 0;
    for (const auto& [id, h] : held_) n += h.fds.size();
    return n;
  }

  Result<void> send(int fd, const Message& message, std::span<const int> fds = {}) {
    COMPANION_ASSIGN_OR_RETURN(std::vector<uint8_t> payload, encode(message));
    return protocol::send_frame(fd, payload, fds, kIoTimeoutMs);
  }

  void accept_one() {
    UniqueFd conn(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn) return;
    // Only the keeper's own user: what it holds is that user's memory.
    auto peer = transport::peer_credentials(conn.get());
    if (!peer.ok() || peer->uid != ::geteuid()) {
      log::warn("keeper: refused a connection of uid " +
                (peer.ok() ? std::to_string(peer->uid) : std::string("?")));
      return;
    }
    protocol::FrameReader reader(protocol::FdPolicy::kRefuse);
    auto frame = protocol::receive_frame(conn.get(), reader, kIoTimeoutMs);
    if (!frame.ok()) return;
    auto message = decode(frame->payload);
    if (!message.ok() || !std::holds_alternative<Hello>(*message)) {
      log::warn("keeper: a connection did not start with a Hello");
      return;
    }
    const Hello& hello = std::get<Hello>(*message);
    HelloReply reply;
    reply.keeper_pid = ::getpid();
    // A server restarted right after its predecessor died may get here before the keeper has
    // read the end of the old session: what the old socket has left is read first (its end of
    // file ends that session).
    while (session_) {
      pollfd old{session_.get(), POLLIN, 0};
      if (::poll(&old, 1, 0) <= 0) break;
      serve_session();
    }
    // One server at a time; and a server that runs without a keeper (--no-keep) beside one that
    // has it must not free the other's models.
    if (session_) {
      reply.error = "another server (pid " + std::to_string(session_pid_) + ") holds this keeper";
      (void)send(conn.get(), reply);
      return;
    }
    reply.kept = static_cast<uint32_t>(held_.size());
    reply.descriptors = static_cast<uint32_t>(descriptors());
    if (hello.release_all) {
      log::info("keeper: server " + std::to_string(hello.pid) +
                " runs without a keeper (--no-keep): releasing everything");
      (void)send(conn.get(), reply);
      done_ = true;
      return;
    }
    reply.kept = static_cast<uint32_t>(held_.size());
    reply.descriptors = static_cast<uint32_t>(descriptors());
    if (!send(conn.get(), reply).ok()) return;
    done_ = false;  // a keeper about to leave empty-handed serves the new server instead
    session_ = std::move(conn);
    session_reader_ = protocol::FrameReader(protocol::FdPolicy::kAccept);
    session_pid_ = hello.pid;
    if (hello.keep_for_ms >= 0) options_.keep_for = std::chrono::milliseconds(hello.keep_for_ms);
    deadline_.reset();
    log::info("keeper: session of server " + std::to_string(hello.pid) + " (" +
              std::to_string(held_.size()) + " generations held)");
  }

  void end_session(const std::string& why) {
    session_.reset();
    log::info("keeper: session of server " + std::to_string(session_pid_) + " ended (" + why +
              "); " + std::to_string(held_.size()) + " generations held (" +
              std::to_string(descriptors()) + " descriptors)");
    if (held_.empty()) {
      done_ = true;
      return;
    }
    deadline_ = Clock::now() + options_.keep_for;
  }

  void serve_session() {
    auto got = session_reader_.read_some(session_.get());
    if (!got.ok()) return end_session(got.error().message);
    if (*got == 0) return end_session("closed");
    for (;;) {
      auto frame = session_reader_.next();
      if (!frame.ok()) return end_session(frame.error().message);
      if (!*frame) return;
      auto message = decode((*frame)->payload);
      if (!message.ok()) return end_session(message.error().message);
      if (auto* keep = std::get_if<Keep>(&*message)) {
        if ((*frame)->fds.empty()) {
          log::warn("keeper: Keep " + std::to_string(keep->id) + " without descriptors ignored");
          continue;
        }
        held_[keep->id] = Held{std::move(keep->catalog), std::move((*frame)->fds)};
      } else if (auto* forget = std::get_if<Forget>(&*message)) {
        held_.erase(forget->id);
      } else if (std::holds_alternative<List>(*message)) {
        for (const auto& [id, h] : held_) {
          std::vector<int> fds;
          for (const auto& fd : h.fds) fds.push_back(fd.get());
          if (auto sent = send(session_.get(), Kept{id, h.catalog}, fds); !sent.ok())
            return end_session(sent.error().message);
        }
        if (auto sent = send(session_.get(), ListEnd{static_cast<uint32_t>(held_.size())});
            !sent.ok())
          return end_session(sent.error().message);
      } else {
        return end_session("unexpected message");
      }
    }
  }

  KeeperOptions options_;
  UniqueFd lock_;
  UniqueFd listen_;
  UniqueFd signals_;
  UniqueFd session_;
  protocol::FrameReader session_reader_{protocol::FdPolicy::kAccept};
  int64_t session_pid_ = 0;
  std::optional<Clock::time_point> deadline_;
  std::map<uint64_t, Held> held_;
  bool done_ = false;
};

}  // namespace

int run_keeper(const KeeperOptions& options) {
  Keeper keeper(options);
  return keeper.run();
}

}  // namespace companion::keeper
