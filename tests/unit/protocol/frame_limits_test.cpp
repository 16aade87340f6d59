// What a FrameReader costs and keeps: descriptors refused by a server's reader, a buffer that
// grows with what arrives and is given back once the frame is consumed.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "protocol/frame.hpp"
#include "protocol/limits.hpp"

namespace companion::protocol {
namespace {

struct Pair {
  UniqueFd a;
  UniqueFd b;
};

Pair socket_pair() {
  int sv[2] = {-1, -1};
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv), 0)
      << std::strerror(errno);
  return Pair{UniqueFd(sv[0]), UniqueFd(sv[1])};
}

size_t open_fds() {
  size_t n = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    (void)entry;
    ++n;
  }
  return n;
}

// Sends `bytes` with `count` copies of fd attached.
void send_with_fds(int socket_fd, const std::vector<uint8_t>& bytes, int fd, int count) {
  iovec iov{const_cast<uint8_t*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<int> fds(static_cast<size_t>(count), fd);
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  ASSERT_EQ(::sendmsg(socket_fd, &msg, 0), static_cast<ssize_t>(bytes.size()))
      << std::strerror(errno);
}

TEST(FrameLimits, RefusingReaderClosesDescriptorsAtOnce) {
  Pair s = socket_pair();
  UniqueFd null(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  size_t before = open_fds();
  // A frame header that announces none, with 200 descriptors on it.
  send_with_fds(s.a.get(), encode_frame_header(100, 0), null.get(), 200);
  FrameReader reader(FdPolicy::kRefuse);
  auto n = reader.read_some(s.b.get());
  ASSERT_FALSE(n.ok());
  EXPECT_EQ(n.error().code, StatusCode::kProtocolError) << n.error().to_string();
  EXPECT_EQ(open_fds(), before);
}

TEST(FrameLimits, RefusingReaderRefusesDescriptorsWithoutAnyFrame) {
  Pair s = socket_pair();
  UniqueFd null(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  size_t before = open_fds();
  send_with_fds(s.a.get(), {0}, null.get(), 10);
  FrameReader reader(FdPolicy::kRefuse);
  auto n = reader.read_some(s.b.get());
  ASSERT_FALSE(n.ok());
  EXPECT_EQ(open_fds(), before);
}

TEST(FrameLimits, RefusingReaderStillReadsPlainFrames) {
  Pair s = socket_pair();
  std::vector<uint8_t> payload(1000, 7);
  ASSERT_TRUE(send_frame(s.a.get(), payload).ok());
  FrameReader reader(FdPolicy::kRefuse);
  auto f = receive_frame(s.b.get(), reader, 5000);
  ASSERT_TRUE(f.ok()) << f.error().to_string();
  EXPECT_EQ(f->payload, payload);
}

TEST(FrameLimits, BufferHoldsOnlyWhatArrived) {
  Pair s = socket_pair();
  auto header = encode_frame_header(1000, 0);
  ASSERT_EQ(::send(s.a.get(), header.data(), 6, 0), 6);
  FrameReader reader(FdPolicy::kRefuse);
  auto n = reader.read_some(s.b.get());
  ASSERT_TRUE(n.ok()) << n.error().to_string();
  EXPECT_EQ(*n, 6u);
  EXPECT_LE(reader.buffer_capacity(), 4096u);
  EXPECT_EQ(reader.pending_frame_bytes(), 6u);
}

TEST(FrameLimits, PendingBytesAreWhatTheHeaderAnnounces) {
  FrameReader reader;
  auto header = encode_frame_header(1'000'000, 0);
  reader.feed(header);
  EXPECT_EQ(reader.pending_frame_bytes(), kFrameHeaderBytes + 1'000'000);
  std::vector<uint8_t> part(5000, 1);
  reader.feed(part);
  EXPECT_EQ(reader.pending_frame_bytes(), kFrameHeaderBytes + 1'000'000);
}

TEST(FrameLimits, LargeBufferIsGivenBackOnceConsumed) {
  Pair s = socket_pair();
  std::vector<uint8_t> payload(8u << 20, 3);
  FrameReader reader(FdPolicy::kRefuse);
  std::thread sender([&] {
    int fd = s.a.get();
    int flags = ::fcntl(fd, F_GETFL);
    ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    EXPECT_TRUE(send_frame(fd, payload).ok());
  });
  auto f = receive_frame(s.b.get(), reader, 20000);
  sender.join();
  ASSERT_TRUE(f.ok()) << f.error().to_string();
  EXPECT_EQ(f->payload.size(), payload.size());
  EXPECT_EQ(reader.buffered_bytes(), 0u);
  EXPECT_LE(reader.buffer_capacity(), 64u * 1024);
  EXPECT_EQ(reader.pending_frame_bytes(), 0u);
}

}  // namespace
}  // namespace companion::protocol
