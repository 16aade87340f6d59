#include "transport/unix_socket.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

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

Result<UniqueFd> listen_unix(const std::string& path, int backlog) {
  COMPANION_ASSIGN_OR_RETURN(sockaddr_un addr, make_address(path));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) return errno_error(StatusCode::kIoError, "socket", errno);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    return errno_error(StatusCode::kIoError, "remove old socket " + path, errno);
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    return errno_error(StatusCode::kIoError, "bind " + path, errno);
  if (::listen(fd.get(), backlog) != 0)
    return errno_error(StatusCode::kIoError, "listen " + path, errno);
  return fd;
}

Result<UniqueFd> connect_unix(const std::string& path) {
  COMPANION_ASSIGN_OR_RETURN(sockaddr_un addr, make_address(path));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return errno_error(StatusCode::kIoError, "socket", errno);
  int r;
  do {
    r = ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  } while (r != 0 && errno == EINTR);
  if (r != 0) {
    int err = errno;
    if (err == ENOENT || err == ECONNREFUSED)
      return errno_error(StatusCode::kUnavailable, "connect " + path, err);
    return errno_error(StatusCode::kIoError, "connect " + path, err);
  }
  return fd;
}

Result<PeerCredentials> peer_credentials(int fd) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
    return errno_error(StatusCode::kIoError, "SO_PEERCRED", errno);
  return PeerCredentials{cred.pid, cred.uid, cred.gid};
}

}  // namespace companion::transport
