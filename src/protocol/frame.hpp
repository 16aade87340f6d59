// Framing on a stream socket: a 12-byte header (magic, payload length, fd count, flags) then the
// payload. File descriptors ride on the frame's first bytes with SCM_RIGHTS.
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <vector>

#include "common/unique_fd.hpp"
#include "companion/result.hpp"

namespace companion::protocol {

struct Frame {
  std::vector<uint8_t> payload;
  std::vector<UniqueFd> fds;
};

// Header bytes for a payload of `size` bytes carrying `fd_count` descriptors.
std::vector<uint8_t> encode_frame_header(uint32_t size, uint16_t fd_count);

// What a reader does with descriptors that arrive on its socket.
enum class FdPolicy {
  kAccept,  // queue them for the frame that announces them (clients: replies carry memory)
  kRefuse,  // close them at once and fail the read (servers: requests never carry any)
};

// Reassembles frames from a socket. Owns descriptors received but not yet claimed by a frame.
// Its buffer starts empty and grows with what arrives (at most one frame plus one read), so an
// idle or barely started connection costs almost nothing.
class FrameReader {
 public:
  explicit FrameReader(FdPolicy fd_policy = FdPolicy::kAccept) : fd_policy_(fd_policy) {}
  // Reads what is available (one recvmsg). Returns bytes read; 0 means the peer closed.
  // A would-block read returns kUnavailable. Received descriptors are queued, or with
  // FdPolicy::kRefuse closed and the read fails with kProtocolError.
  Result<size_t> read_some(int socket_fd);
  // The next complete frame, if any. Malformed headers (bad magic, oversized payload, too many
  // fds, reserved flags set, fds missing) are kProtocolError; the connection is then unusable.
  Result<std::optional<Frame>> next();
  // Feeds bytes and descriptors directly (tests).
  void feed(std::span<const uint8_t> bytes, std::vector<UniqueFd> fds = {});
  size_t buffered_bytes() const noexcept { return buffer_.size() - consumed_; }
  // Bytes the incomplete frame at the front will need: its whole size once its header has
  // arrived (what the peer announced), else what is buffered. 0 when nothing is pending.
  size_t pending_frame_bytes() const noexcept;
  // Bytes allocated for the buffer (tests: an idle reader holds no large buffer).
  size_t buffer_capacity() const noexcept { return buffer_.capacity(); }

 private:
  // Descriptors from one recvmsg, which covered stream bytes [begin, end). The kernel ends a
  // read after the message that carried them, so they belong to a frame starting in that range.
  struct FdBatch {
    uint64_t begin = 0;
    uint64_t end = 0;
    std::vector<UniqueFd> fds;
  };
  void add_batch(uint64_t begin, uint64_t end, std::vector<UniqueFd> fds);
  void compact();

  FdPolicy fd_policy_;
  std::vector<uint8_t> buffer_;
  size_t consumed_ = 0;
  uint64_t base_ = 0;  // stream offset of buffer_[0]
  size_t queued_fds_ = 0;
  std::deque<FdBatch> batches_;
};

// A frame queued for a non-blocking socket; flushed in pieces.
class OutgoingFrame {
 public:
  OutgoingFrame(std::vector<uint8_t> payload, std::vector<UniqueFd> fds);
  // Writes as much as the socket takes. Ok(true) when fully sent; kUnavailable never escapes
  // (a full socket returns Ok(false)); a dead peer is kConnectionClosed.
  Result<bool> write_some(int socket_fd);
  size_t payload_bytes() const noexcept { return payload_bytes_; }
  // Descriptors this process still holds for it (0 once its first bytes are sent).
  size_t held_fds() const noexcept { return fds_.size(); }

 private:
  size_t payload_bytes_ = 0;
  std::vector<uint8_t> bytes_;  // header + payload
  std::vector<UniqueFd> fds_;   // sent with the first byte, then closed
  size_t sent_ = 0;
};

// Blocking helpers for clients (socket in blocking mode).
// Sends one whole frame, waiting for room at most timeout_ms (negative: forever) in all:
// kTimeout when a peer that does not read leaves it unsent (the stream is then cut mid-frame
// and unusable), kConnectionClosed when the peer is gone.
Result<void> send_frame(int socket_fd, std::span<const uint8_t> payload,
                        std::span<const int> fds = {}, int timeout_ms = -1);
// Waits at most timeout_ms (negative: forever) for a whole frame.
Result<Frame> receive_frame(int socket_fd, FrameReader& reader, int timeout_ms);

}  // namespace companion::protocol
