#include "transport/unix_socket.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/deadline.hpp"

namespace companion::transport {
namespace {

Result<sockaddr_un> make_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path))
    return make_error(
        StatusCode::kInvalidArgument,
        "socket path must be 1.." + std::to_string(sizeof(addr.sun_path) - 1) + " bytes: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

}  // namespace

Result<void> set_nonblocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0)
    return errno_error(StatusCode::kIoError, "fcntl O_NONBLOCK", errno);
  return ok_result();
}

Result<UniqueFd> listen_unix(const std::string& path, const SocketAccess& access, int backlog) {
  COMPANION_ASSIGN_OR_RETURN(sockaddr_un addr, make_address(path));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) return errno_error(StatusCode::kIoError, "socket", errno);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    return errno_error(StatusCode::kIoError, "remove old socket " + path, errno);
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    return errno_error(StatusCode::kIoError, "bind " + path, errno);
  // The file's mode followed the umask; until listen() nobody can connect, so fix it now.
  if (access.group != static_cast<gid_t>(-1) &&
      ::lchown(path.c_str(), static_cast<uid_t>(-1), access.group) != 0)
    return errno_error(StatusCode::kIoError, "set the group of " + path, errno);
  // Never through a symlink planted in its place (that would change the mode of its target).
  if (::fchmodat(AT_FDCWD, path.c_str(), access.mode, AT_SYMLINK_NOFOLLOW) != 0)
    return errno_error(StatusCode::kIoError, "set the mode of " + path, errno);
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode) ||
      (st.st_mode & 07777) != access.mode)
    return make_error(StatusCode::kIoError, path + " changed under us after bind");
  if (::listen(fd.get(), backlog) != 0)
    return errno_error(StatusCode::kIoError, "listen " + path, errno);
  return fd;
}

namespace {

Result<void> set_send_timeout(int fd, int timeout_ms) {
  timeval tv{};
  if (timeout_ms > 0) {
    tv.tv_sec = timeout_ms / 1000;
    tv.tv_usec = (timeout_ms % 1000) * 1000;
  }
  if (::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0)
    return errno_error(StatusCode::kIoError, "SO_SNDTIMEO", errno);
  return ok_result();
}

}  // namespace

Result<UniqueFd> connect_unix(const std::string& path, int timeout_ms) {
  COMPANION_ASSIGN_OR_RETURN(sockaddr_un addr, make_address(path));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return errno_error(StatusCode::kIoError, "socket", errno);
  // A Unix socket's connect waits while the listener's backlog is full, for as long as the send
  // timeout allows (and fails with EAGAIN after it). A non-blocking connect would fail at once
  // instead, and poll() cannot wait for room in a backlog: the send timeout is the bounded wait.
  const Deadline deadline = Deadline::after_ms(timeout_ms);
  int r = -1;
  int err = 0;
  for (;;) {
    // 0 is no send timeout at all: a limited wait is at least 1 ms.
    const int wait = deadline.unlimited() ? 0 : std::max(deadline.remaining_ms(), 1);
    COMPANION_TRY(set_send_timeout(fd.get(), wait));
    r = ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    err = r == 0 ? 0 : errno;
    if (err != EINTR) break;
    if (deadline.expired()) {
      err = EAGAIN;
      break;
    }
  }
  if (err != 0) {
    if (err == EAGAIN || err == EWOULDBLOCK || err == EINPROGRESS)
      return make_error(StatusCode::kTimeout, "connect " + path + ": not accepted within " +
                                                  std::to_string(timeout_ms) +
                                                  " ms (the server is stuck or overloaded)");
    if (err == ENOENT || err == ECONNREFUSED)
      return errno_error(StatusCode::kUnavailable, "connect " + path, err);
    return errno_error(StatusCode::kIoError, "connect " + path, err);
  }
  COMPANION_TRY(set_send_timeout(fd.get(), 0));  // sends block as before
  return fd;
}

Result<PeerCredentials> peer_credentials(int fd) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
    return errno_error(StatusCode::kIoError, "SO_PEERCRED", errno);
  return PeerCredentials{cred.pid, cred.uid, cred.gid};
}

Result<std::vector<gid_t>> peer_groups(int fd) {
  std::vector<gid_t> groups(64);
  for (int attempt = 0; attempt < 2; ++attempt) {
    socklen_t len = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &len) == 0) {
      groups.resize(len / sizeof(gid_t));
      return groups;
    }
    if (errno != ERANGE) return errno_error(StatusCode::kIoError, "SO_PEERGROUPS", errno);
    groups.resize(len / sizeof(gid_t) + 1);  // len now says how much is needed
  }
  return make_error(StatusCode::kIoError, "SO_PEERGROUPS: the group list keeps growing");
}

}  // namespace companion::transport
