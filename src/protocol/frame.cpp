#include "protocol/frame.hpp"

#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "common/deadline.hpp"
#include "protocol/limits.hpp"

namespace companion::protocol {
namespace {

void put_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void put_u16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
uint32_t get_u32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}
uint16_t get_u16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | static_cast<uint16_t>(p[1]) << 8);
}

// Sends bytes[offset..] once; attaches fds when non-empty. Returns bytes sent or an errno.
ssize_t send_once(int socket_fd, const uint8_t* data, size_t size, std::span<const int> fds) {
  iovec iov{const_cast<uint8_t*>(data), size};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerFrame)];
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  return ::sendmsg(socket_fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
}

// One recvmsg reads at most this much; it lives on the stack, not in every connection.
constexpr size_t kReadChunkBytes = 64 * 1024;
// A reader keeps at most this much buffer once its frames are consumed.
constexpr size_t kKeptBufferBytes = 64 * 1024;

}  // namespace

std::vector<uint8_t> encode_frame_header(uint32_t size, uint16_t fd_count) {
  std::vector<uint8_t> h(kFrameHeaderBytes);
  put_u32(h.data(), kFrameMagic);
  put_u32(h.data() + 4, size);
  put_u16(h.data() + 8, fd_count);
  put_u16(h.data() + 10, 0);
  return h;
}

void FrameReader::compact() {
  if (consumed_ == 0) return;
  if (consumed_ == buffer_.size()) {
    base_ += consumed_;
    consumed_ = 0;
    // A large frame's buffer is not kept for an idle connection.
    if (buffer_.capacity() > kKeptBufferBytes)
      std::vector<uint8_t>().swap(buffer_);
    else
      buffer_.clear();
  } else if (consumed_ > kKeptBufferBytes) {
    buffer_.erase(buffer_.begin(), buffer_.begin() + static_cast<std::ptrdiff_t>(consumed_));
    base_ += consumed_;
    consumed_ = 0;
  }
}

size_t FrameReader::pending_frame_bytes() const noexcept {
  size_t available = buffer_.size() - consumed_;
  if (available < kFrameHeaderBytes) return available;
  size_t whole = kFrameHeaderBytes + get_u32(buffer_.data() + consumed_ + 4);
  return whole > available ? whole : available;
}

Result<size_t> FrameReader::read_some(int socket_fd) {
  compact();
  // Bytes land on the stack first and are appended: the buffer only ever holds what arrived.
  alignas(16) uint8_t chunk[kReadChunkBytes];
  iovec iov{chunk, sizeof(chunk)};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 253)];
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t n;
  do {
    n = ::recvmsg(socket_fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK)
      return make_error(StatusCode::kUnavailable, "no data yet");
    if (err == ECONNRESET) return make_error(StatusCode::kConnectionClosed, "connection reset");
    return errno_error(StatusCode::kIoError, "recvmsg", err);
  }
  std::vector<UniqueFd> received;  // closed on return unless queued
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        received.emplace_back(fd);
      }
    }
  }
  if (fd_policy_ == FdPolicy::kRefuse && (!received.empty() || (msg.msg_flags & MSG_CTRUNC)))
    return make_error(StatusCode::kProtocolError, "requests must not carry file descriptors");
  size_t old = buffer_.size();
  // Once the frame's header is known, room for the whole frame at once: no copies while it grows,
  // and pages are only touched as bytes arrive.
  size_t pending = pending_frame_bytes();
  if (pending > buffer_.size() - consumed_ && pending <= kFrameHeaderBytes + kMaxPayloadBytes &&
      buffer_.capacity() < consumed_ + pending + static_cast<size_t>(n))
    buffer_.reserve(consumed_ + pending + static_cast<size_t>(n));
  buffer_.insert(buffer_.end(), chunk, chunk + n);
  add_batch(base_ + old, base_ + old + static_cast<uint64_t>(n), std::move(received));
  // No frame carries more than this; a peer piling up descriptors (e.g. a few per byte of a huge
  // frame) is cut off before it can exhaust ours.
  if (queued_fds_ > kMaxFdsPerFrame)
    return make_error(StatusCode::kProtocolError,
                      "peer sent more descriptors than any frame may carry");
  if (msg.msg_flags & MSG_CTRUNC)
    return make_error(StatusCode::kProtocolError, "descriptors truncated (too many in one frame)");
  return static_cast<size_t>(n);
}

void FrameReader::add_batch(uint64_t begin, uint64_t end, std::vector<UniqueFd> fds) {
  if (fds.empty()) return;
  queued_fds_ += fds.size();
  batches_.push_back(FdBatch{begin, end, std::move(fds)});
}

void FrameReader::feed(std::span<const uint8_t> bytes, std::vector<UniqueFd> fds) {
  uint64_t begin = base_ + buffer_.size();
  buffer_.insert(buffer_.end(), bytes.begin(), bytes.end());
  add_batch(begin, begin + bytes.size(), std::move(fds));
}

Result<std::optional<Frame>> FrameReader::next() {
  size_t available = buffer_.size() - consumed_;
  if (available < kFrameHeaderBytes) return std::optional<Frame>();
  const uint8_t* h = buffer_.data() + consumed_;
  if (get_u32(h) != kFrameMagic)
    return make_error(StatusCode::kProtocolError, "bad frame magic (not a companion peer?)");
  uint32_t size = get_u32(h + 4);
  uint16_t nfds = get_u16(h + 8);
  if (get_u16(h + 10) != 0) return make_error(StatusCode::kProtocolError, "unknown frame flags");
  if (size > kMaxPayloadBytes)
    return make_error(StatusCode::kProtocolError, "frame of " + std::to_string(size) +
                                                      " bytes exceeds the limit of " +
                                                      std::to_string(kMaxPayloadBytes));
  if (nfds > kMaxFdsPerFrame)
    return make_error(StatusCode::kProtocolError, "frame carries too many descriptors");
  // Descriptors that arrived wholly inside this frame, past its first bytes, belong to no frame:
  // refuse them now rather than hold them until the (possibly huge) frame completes.
  uint64_t frame_begin = base_ + consumed_;
  uint64_t frame_end = frame_begin + kFrameHeaderBytes + size;
  for (const auto& b : batches_)
    if (b.begin > frame_begin && b.end <= frame_end)
      return make_error(StatusCode::kProtocolError, "descriptors arrived in the middle of a frame");
  if (available < kFrameHeaderBytes + size) return std::optional<Frame>();
  // Descriptors must arrive with their own frame's first bytes, exactly as many as announced.
  uint64_t start = base_ + consumed_;
  if (!batches_.empty() && batches_.front().end <= start)
    return make_error(StatusCode::kProtocolError,
                      "descriptors arrived with no frame claiming them");
  Frame f;
  if (nfds > 0) {
    if (batches_.empty() || batches_.front().begin > start)
      return make_error(StatusCode::kProtocolError,
                        "frame announces descriptors that did not arrive");
    if (batches_.front().fds.size() != nfds)
      return make_error(StatusCode::kProtocolError,
                        "frame announces " + std::to_string(nfds) + " descriptors but carries " +
                            std::to_string(batches_.front().fds.size()));
    f.fds = std::move(batches_.front().fds);
    queued_fds_ -= f.fds.size();
    batches_.pop_front();
  }
  f.payload.assign(h + kFrameHeaderBytes, h + kFrameHeaderBytes + size);
  consumed_ += kFrameHeaderBytes + size;
  compact();
  return std::optional<Frame>(std::move(f));
}

OutgoingFrame::OutgoingFrame(std::vector<uint8_t> payload, std::vector<UniqueFd> fds)
    : payload_bytes_(payload.size()), fds_(std::move(fds)) {
  bytes_ = encode_frame_header(static_cast<uint32_t>(payload.size()),
                               static_cast<uint16_t>(fds_.size()));
  bytes_.insert(bytes_.end(), payload.begin(), payload.end());
}

Result<bool> OutgoingFrame::write_some(int socket_fd) {
  if (fds_.size() > kMaxFdsPerFrame || payload_bytes_ > kMaxPayloadBytes)
    return make_error(StatusCode::kInternal, "reply exceeds the protocol's frame limits");
  while (sent_ < bytes_.size()) {
    std::vector<int> raw;
    if (sent_ == 0)
      for (const auto& fd : fds_) raw.push_back(fd.get());
    ssize_t n = send_once(socket_fd, bytes_.data() + sent_, bytes_.size() - sent_, raw);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
      if (errno == EPIPE || errno == ECONNRESET)
        return make_error(StatusCode::kConnectionClosed, "peer went away");
      return errno_error(StatusCode::kIoError, "sendmsg", errno);
    }
    if (sent_ == 0) fds_.clear();  // the kernel holds its own references now
    sent_ += static_cast<size_t>(n);
  }
  return true;
}

Result<void> send_frame(int socket_fd, std::span<const uint8_t> payload, std::span<const int> fds,
                        int timeout_ms) {
  if (payload.size() > kMaxPayloadBytes)
    return make_error(StatusCode::kInvalidArgument, "message too large");
  if (fds.size() > kMaxFdsPerFrame)
    return make_error(StatusCode::kInvalidArgument, "too many descriptors for one frame");
  const Deadline deadline = Deadline::after_ms(timeout_ms);
  std::vector<uint8_t> bytes =
      encode_frame_header(static_cast<uint32_t>(payload.size()), static_cast<uint16_t>(fds.size()));
  bytes.insert(bytes.end(), payload.begin(), payload.end());
  size_t sent = 0;
  while (sent < bytes.size()) {
    ssize_t n = send_once(socket_fd, bytes.data() + sent, bytes.size() - sent,
                          sent == 0 ? fds : std::span<const int>());
    if (n >= 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (errno == EINTR) continue;
    if (errno == EPIPE || errno == ECONNRESET)
      return make_error(StatusCode::kConnectionClosed, "server went away");
    if (errno != EAGAIN && errno != EWOULDBLOCK)
      return errno_error(StatusCode::kIoError, "sendmsg", errno);
    // The server is not reading: wait for room, but not past the deadline.
    if (deadline.expired())
      return make_error(StatusCode::kTimeout, "the server took no more of the request in time (" +
                                                  std::to_string(sent) + " of " +
                                                  std::to_string(bytes.size()) + " bytes sent)");
    pollfd p{socket_fd, POLLOUT, 0};
    int r = ::poll(&p, 1, deadline.remaining_ms());
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno_error(StatusCode::kIoError, "poll", errno);
    }
    if (p.revents & POLLNVAL)
      return make_error(StatusCode::kInvalidArgument, "sending on a descriptor that is not open");
    // POLLHUP: the peer closed both directions; no byte written from now on can arrive.
    if ((p.revents & POLLHUP) && !(p.revents & POLLOUT))
      return make_error(StatusCode::kConnectionClosed, "server went away");
    // POLLERR or room: the next sendmsg reports the error or makes progress.
  }
  return ok_result();
}

Result<Frame> receive_frame(int socket_fd, FrameReader& reader, int timeout_ms) {
  const Deadline deadline = Deadline::after_ms(timeout_ms);
  for (;;) {
    COMPANION_ASSIGN_OR_RETURN(auto frame, reader.next());
    if (frame) return std::move(*frame);
    pollfd p{socket_fd, POLLIN, 0};
    int r = ::poll(&p, 1, deadline.remaining_ms());
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno_error(StatusCode::kIoError, "poll", errno);
    }
    // Nothing arrived in the time left (what was already waiting has been read, even at 0).
    if (r == 0) return make_error(StatusCode::kTimeout, "no reply from the server in time");
    auto n = reader.read_some(socket_fd);
    if (!n.ok()) {
      if (n.error().code == StatusCode::kUnavailable) continue;
      return std::move(n).error();
    }
    if (*n == 0)
      return make_error(StatusCode::kConnectionClosed, "the server closed the connection");
  }
}

}  // namespace companion::protocol
