// Framing over real AF_UNIX stream socket pairs: descriptors, big payloads, full buffers, closed
// peers and timeouts.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "protocol/frame.hpp"
#include "protocol/limits.hpp"

namespace companion::protocol {
namespace {

using Clock = std::chrono::steady_clock;

struct Pair {
  UniqueFd a;
  UniqueFd b;
};

Pair socket_pair() {
  int sv[2] = {-1, -1};
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0) << std::strerror(errno);
  return Pair{UniqueFd(sv[0]), UniqueFd(sv[1])};
}

void set_nonblocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  ASSERT_GE(flags, 0);
  ASSERT_EQ(::fcntl(fd, F_SETFL, flags | O_NONBLOCK), 0);
}

struct FileId {
  dev_t dev = 0;
  ino_t ino = 0;
  bool operator==(const FileId&) const = default;
};

FileId file_id(int fd) {
  struct stat st {};
  EXPECT_EQ(::fstat(fd, &st), 0) << "fd " << fd;
  return FileId{st.st_dev, st.st_ino};
}

UniqueFd memfd_with(const std::string& content) {
  UniqueFd fd(::memfd_create("companion-frame-test", MFD_CLOEXEC));
  EXPECT_TRUE(fd.valid()) << std::strerror(errno);
  EXPECT_EQ(::write(fd.get(), content.data(), content.size()),
            static_cast<ssize_t>(content.size()));
  return fd;
}

std::vector<uint8_t> pattern(size_t size, uint32_t seed) {
  std::vector<uint8_t> p(size);
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < size; ++i) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    p[i] = static_cast<uint8_t>(x);
  }
  return p;
}

TEST(FrameSocket, SendAndReceiveWithFds) {
  Pair s = socket_pair();
  UniqueFd mem = memfd_with("weights live here");
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  UniqueFd pipe_r(p[0]), pipe_w(p[1]);
  std::vector<uint8_t> payload = pattern(1000, 1);
  int fds[] = {mem.get(), pipe_w.get()};
  ASSERT_TRUE(send_frame(s.a.get(), payload, fds).ok());

  FrameReader reader;
  auto f = receive_frame(s.b.get(), reader, 5000);
  ASSERT_TRUE(f.ok()) << f.error().to_string();
  EXPECT_EQ(f->payload, payload);
  ASSERT_EQ(f->fds.size(), 2u);
  EXPECT_NE(f->fds[0].get(), mem.get());  // new descriptors in this process, same files
  EXPECT_EQ(file_id(f->fds[0].get()), file_id(mem.get()));
  EXPECT_EQ(file_id(f->fds[1].get()), file_id(pipe_w.get()));
  // The memfd's content reads through the received descriptor...
  char buf[64] = {};
  ASSERT_EQ(::pread(f->fds[0].get(), buf, sizeof(buf), 0), 17);
  EXPECT_STREQ(buf, "weights live here");
  // ... and the pipe's write end writes into our pipe.
  ASSERT_EQ(::write(f->fds[1].get(), "x", 1), 1);
  char c = 0;
  ASSERT_EQ(::read(pipe_r.get(), &c, 1), 1);
  EXPECT_EQ(c, 'x');
  // Received descriptors are close-on-exec.
  EXPECT_TRUE(::fcntl(f->fds[0].get(), F_GETFD) & FD_CLOEXEC);
  EXPECT_EQ(reader.buffered_bytes(), 0u);
}

TEST(FrameSocket, EmptyPayloadAndNoFds) {
  Pair s = socket_pair();
  ASSERT_TRUE(send_frame(s.a.get(), {}).ok());
  FrameReader reader;
  auto f = receive_frame(s.b.get(), reader, 5000);
  ASSERT_TRUE(f.ok()) << f.error().to_string();
  EXPECT_TRUE(f->payload.empty());
  EXPECT_TRUE(f->fds.empty());
}

TEST(FrameSocket, ManyFramesBackToBack) {
  Pair s = socket_pair();
  constexpr int kFrames = 2000;
  UniqueFd mem = memfd_with("m");
  const FileId mem_id = file_id(mem.get());
  std::thread writer([&] {
    std::mt19937 rng(99);
    for (int i = 0; i < kFrames; ++i) {
      auto payload = pattern(rng() % 6000, static_cast<uint32_t>(i));
      std::vector<int> fds;
      if (i % 97 == 0) fds.assign(1 + i % 3, mem.get());
      auto r = send_frame(s.a.get(), payload, fds);
      if (!r.ok()) {
        ADD_FAILURE() << "send " << i << ": " << r.error().to_string();
        return;
      }
    }
  });
  std::mt19937 rng(99);
  FrameReader reader;
  for (int i = 0; i < kFrames; ++i) {
    auto expected = pattern(rng() % 6000, static_cast<uint32_t>(i));
    auto f = receive_frame(s.b.get(), reader, 10000);
    ASSERT_TRUE(f.ok()) << i << ": " << f.error().to_string();
    ASSERT_EQ(f->payload, expected) << i;
    size_t want_fds = i % 97 == 0 ? 1 + i % 3 : 0;
    ASSERT_EQ(f->fds.size(), want_fds) << i;
    for (const auto& fd : f->fds) EXPECT_EQ(file_id(fd.get()), mem_id);
  }
  writer.join();
  EXPECT_EQ(reader.buffered_bytes(), 0u);
}

TEST(FrameSocket, TwentyMebibytePayloadWithReaderThread) {
  Pair s = socket_pair();
  const std::vector<uint8_t> payload = pattern(20u << 20, 7);
  std::vector<uint8_t> received;
  std::string error;
  std::thread reader_thread([&] {
    FrameReader reader;
    auto f = receive_frame(s.b.get(), reader, 60000);
    if (!f.ok()) {
      error = f.error().to_string();
      return;
    }
    received = std::move(f->payload);
  });
  auto sent = send_frame(s.a.get(), payload);
  reader_thread.join();
  ASSERT_TRUE(sent.ok()) << sent.error().to_string();
  ASSERT_EQ(error, "");
  ASSERT_EQ(received.size(), payload.size());
  EXPECT_TRUE(received == payload);
}

TEST(FrameSocket, SendFrameRefusesWhatCannotBeFramed) {
  Pair s = socket_pair();
  std::vector<int> fds(kMaxFdsPerFrame + 1, s.a.get());
  auto r = send_frame(s.a.get(), {}, fds);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument);
  std::vector<uint8_t> huge(size_t{kMaxPayloadBytes} + 1);
  auto r2 = send_frame(s.a.get(), huge);
  ASSERT_FALSE(r2.ok());
  EXPECT_EQ(r2.error().code, StatusCode::kInvalidArgument);
  // Nothing was written.
  set_nonblocking(s.b.get());
  char c;
  EXPECT_EQ(::recv(s.b.get(), &c, 1, 0), -1);
  EXPECT_EQ(errno, EAGAIN);
}

// Reads whatever the socket holds into the reader, collecting complete frames.
void drain(int fd, FrameReader& reader, std::vector<Frame>& frames) {
  for (;;) {
    auto n = reader.read_some(fd);
    if (!n.ok()) {
      ASSERT_EQ(n.error().code, StatusCode::kUnavailable) << n.error().to_string();
      break;
    }
    ASSERT_GT(*n, 0u) << "peer closed";
  }
  for (;;) {
    auto f = reader.next();
    ASSERT_TRUE(f.ok()) << f.error().to_string();
    if (!f->has_value()) break;
    frames.push_back(std::move(**f));
  }
}

TEST(FrameSocket, OutgoingFrameOnAFullNonBlockingSocket) {
  Pair s = socket_pair();
  set_nonblocking(s.a.get());
  set_nonblocking(s.b.get());
  int small = 64 * 1024;
  ::setsockopt(s.a.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));

  UniqueFd mem = memfd_with("first");
  const FileId mem_id = file_id(mem.get());
  const auto big = pattern(8u << 20, 3);
  std::vector<UniqueFd> fds;
  fds.emplace_back(::dup(mem.get()));
  OutgoingFrame first(big, std::move(fds));
  auto r = first.write_some(s.a.get());
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_FALSE(*r) << "8 MiB fit into the socket at once";
  // Calling again while still full keeps returning false, not an error.
  auto again = first.write_some(s.a.get());
  ASSERT_TRUE(again.ok()) << again.error().to_string();
  EXPECT_FALSE(*again);

  FrameReader reader;
  std::vector<Frame> frames;
  int rounds = 0;
  for (;;) {
    auto done = first.write_some(s.a.get());
    ASSERT_TRUE(done.ok()) << done.error().to_string();
    if (*done) break;
    drain(s.b.get(), reader, frames);
    ASSERT_TRUE(frames.empty());
    ASSERT_LT(++rounds, 100000);
  }
  EXPECT_GT(rounds, 1);

  // A second frame with a descriptor right behind it.
  UniqueFd mem2 = memfd_with("second");
  std::vector<UniqueFd> fds2;
  fds2.emplace_back(::dup(mem2.get()));
  OutgoingFrame second(pattern(100, 4), std::move(fds2));
  for (int i = 0;; ++i) {
    auto done = second.write_some(s.a.get());
    ASSERT_TRUE(done.ok()) << done.error().to_string();
    if (*done) break;
    drain(s.b.get(), reader, frames);
    ASSERT_LT(i, 100000);
  }
  for (int i = 0; frames.size() < 2 && i < 1000; ++i) {
    drain(s.b.get(), reader, frames);
    if (frames.size() < 2) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(frames.size(), 2u);
  EXPECT_TRUE(frames[0].payload == big);
  ASSERT_EQ(frames[0].fds.size(), 1u);
  EXPECT_EQ(file_id(frames[0].fds[0].get()), mem_id);
  EXPECT_EQ(frames[1].payload, pattern(100, 4));
  ASSERT_EQ(frames[1].fds.size(), 1u);
  EXPECT_EQ(file_id(frames[1].fds[0].get()), file_id(mem2.get()));
}

TEST(FrameSocket, OutgoingFrameToAClosedPeer) {
  Pair s = socket_pair();
  set_nonblocking(s.a.get());
  s.b.reset();
  OutgoingFrame f(pattern(10, 1), {});
  auto r = f.write_some(s.a.get());  // MSG_NOSIGNAL: no SIGPIPE, an error instead
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kConnectionClosed) << r.error().to_string();
  auto r2 = send_frame(s.a.get(), pattern(10, 1));
  ASSERT_FALSE(r2.ok());
  EXPECT_EQ(r2.error().code, StatusCode::kConnectionClosed) << r2.error().to_string();
}

// A peer that never reads: the sender gives up at its deadline instead of retrying for ever.
TEST(FrameSocket, SendToAPeerThatDoesNotReadTimesOut) {
  Pair s = socket_pair();
  std::vector<uint8_t> big(kMaxPayloadBytes / 2, 7);  // far more than a socket buffer holds
  auto start = Clock::now();
  auto r = send_frame(s.a.get(), big, {}, 200);
  auto waited = Clock::now() - start;
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kTimeout) << r.error().to_string();
  EXPECT_GE(waited, std::chrono::milliseconds(190));
  EXPECT_LT(waited, std::chrono::seconds(5));
}

// A peer that goes away while the sender waits for room: the sender learns it at once.
TEST(FrameSocket, SendBlockedOnAFullSocketSeesThePeerClose) {
  Pair s = socket_pair();
  std::vector<uint8_t> big(kMaxPayloadBytes / 2, 7);
  std::thread closer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    s.b.reset();
  });
  auto start = Clock::now();
  auto r = send_frame(s.a.get(), big, {}, 30000);
  auto waited = Clock::now() - start;
  closer.join();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kConnectionClosed) << r.error().to_string();
  EXPECT_LT(waited, std::chrono::seconds(5));
}

TEST(FrameSocket, SendOnAClosedDescriptorFails) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  ::close(fds[0]);
  ::close(fds[1]);
  auto r = send_frame(fds[1], pattern(10, 1), {}, 1000);
  EXPECT_FALSE(r.ok());
}

TEST(FrameSocket, PeerClosedIsConnectionClosed) {
  Pair s = socket_pair();
  s.a.reset();
  FrameReader reader;
  auto f = receive_frame(s.b.get(), reader, 5000);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.error().code, StatusCode::kConnectionClosed) << f.error().to_string();
}

TEST(FrameSocket, PeerClosedMidFrame) {
  Pair s = socket_pair();
  auto header = encode_frame_header(1000, 0);
  ASSERT_EQ(::send(s.a.get(), header.data(), header.size(), 0), 12);
  ASSERT_EQ(::send(s.a.get(), "0123456789", 10, 0), 10);
  s.a.reset();
  FrameReader reader;
  auto f = receive_frame(s.b.get(), reader, 5000);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.error().code, StatusCode::kConnectionClosed) << f.error().to_string();
}

TEST(FrameSocket, FramesBeforeCloseAreDelivered) {
  Pair s = socket_pair();
  ASSERT_TRUE(send_frame(s.a.get(), pattern(10, 1)).ok());
  ASSERT_TRUE(send_frame(s.a.get(), pattern(20, 2)).ok());
  s.a.reset();
  FrameReader reader;
  auto f1 = receive_frame(s.b.get(), reader, 5000);
  ASSERT_TRUE(f1.ok()) << f1.error().to_string();
  EXPECT_EQ(f1->payload, pattern(10, 1));
  auto f2 = receive_frame(s.b.get(), reader, 5000);
  ASSERT_TRUE(f2.ok()) << f2.error().to_string();
  EXPECT_EQ(f2->payload, pattern(20, 2));
  auto f3 = receive_frame(s.b.get(), reader, 5000);
  ASSERT_FALSE(f3.ok());
  EXPECT_EQ(f3.error().code, StatusCode::kConnectionClosed);
}

TEST(FrameSocket, ReceiveTimeout) {
  Pair s = socket_pair();
  FrameReader reader;
  auto start = Clock::now();
  auto f = receive_frame(s.b.get(), reader, 150);
  auto elapsed = Clock::now() - start;
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.error().code, StatusCode::kTimeout) << f.error().to_string();
  EXPECT_GE(elapsed, std::chrono::milliseconds(140));
  EXPECT_LT(elapsed, std::chrono::seconds(3));

  // A partial frame does not end the wait early either; the rest then completes it.
  auto header = encode_frame_header(4, 0);
  ASSERT_EQ(::send(s.a.get(), header.data(), header.size(), 0), 12);
  auto partial = receive_frame(s.b.get(), reader, 100);
  ASSERT_FALSE(partial.ok());
  EXPECT_EQ(partial.error().code, StatusCode::kTimeout);
  ASSERT_EQ(::send(s.a.get(), "abcd", 4, 0), 4);
  auto whole = receive_frame(s.b.get(), reader, 5000);
  ASSERT_TRUE(whole.ok()) << whole.error().to_string();
  EXPECT_EQ(whole->payload, (std::vector<uint8_t>{'a', 'b', 'c', 'd'}));
}

// "Waits at most timeout_ms": with 0 it must not wait, but a frame already sitting in the socket
// is still returned (StatusStream::next(0) and calls whose deadline ran out rely on it).
TEST(FrameSocket, ZeroTimeoutStillReadsWhatIsAvailable) {
  Pair s = socket_pair();
  ASSERT_TRUE(send_frame(s.a.get(), pattern(30, 5)).ok());
  FrameReader reader;
  auto f = receive_frame(s.b.get(), reader, 0);
  ASSERT_TRUE(f.ok()) << f.error().to_string();
  EXPECT_EQ(f->payload, pattern(30, 5));
  auto none = receive_frame(s.b.get(), reader, 0);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.error().code, StatusCode::kTimeout);
}

TEST(FrameSocket, BadHeaderFromTheSocket) {
  Pair s = socket_pair();
  const char junk[] = "GET / HTTP/1.1\r\n\r\n";
  ASSERT_EQ(::send(s.a.get(), junk, sizeof(junk) - 1, 0), static_cast<ssize_t>(sizeof(junk) - 1));
  FrameReader reader;
  auto f = receive_frame(s.b.get(), reader, 5000);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.error().code, StatusCode::kProtocolError) << f.error().to_string();
}

// Sends bytes with descriptors attached, whatever the header in those bytes says.
void send_raw(int fd, const std::vector<uint8_t>& bytes, const std::vector<int>& fds) {
  iovec iov{const_cast<uint8_t*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  ASSERT_EQ(::sendmsg(fd, &msg, MSG_NOSIGNAL), static_cast<ssize_t>(bytes.size()))
      << std::strerror(errno);
}

// A peer that attaches descriptors to a frame whose header announces none must not get them
// handed to a later frame in their place (nor have them pile up unannounced): either the reader
// refuses the stream, or every frame gets exactly its own descriptors.
TEST(FrameSocket, UnannouncedFdsAreNotGivenToALaterFrame) {
  Pair s = socket_pair();
  UniqueFd stray = memfd_with("stray");
  UniqueFd real = memfd_with("real");
  std::vector<uint8_t> first = encode_frame_header(3, 0);
  first.insert(first.end(), {1, 2, 3});
  std::vector<uint8_t> second = encode_frame_header(3, 1);
  second.insert(second.end(), {4, 5, 6});
  send_raw(s.a.get(), first, {stray.get()});
  send_raw(s.a.get(), second, {real.get()});

  FrameReader reader;
  auto f1 = receive_frame(s.b.get(), reader, 5000);
  if (!f1.ok()) {
    EXPECT_EQ(f1.error().code, StatusCode::kProtocolError) << f1.error().to_string();
    return;
  }
  EXPECT_TRUE(f1->fds.empty());
  auto f2 = receive_frame(s.b.get(), reader, 5000);
  if (!f2.ok()) {
    EXPECT_EQ(f2.error().code, StatusCode::kProtocolError) << f2.error().to_string();
    return;
  }
  ASSERT_EQ(f2->fds.size(), 1u);
  EXPECT_EQ(file_id(f2->fds[0].get()), file_id(real.get()))
      << "the second frame got the first frame's unannounced descriptor";
}

// The kernel truncates SCM_RIGHTS when the receiver may not open more descriptors (MSG_CTRUNC):
// that frame cannot be trusted. Run in a child whose descriptor limit is lowered.
TEST(FrameSocket, TruncatedDescriptorsAreAProtocolError) {
  Pair s = socket_pair();
  UniqueFd mem = memfd_with("x");
  int fds[] = {mem.get(), mem.get(), mem.get(), mem.get()};
  ASSERT_TRUE(send_frame(s.a.get(), pattern(8, 1), fds).ok());
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    int lowest_free = ::dup(0);  // every descriptor below it is taken
    ::close(lowest_free);
    rlimit lim{};
    ::getrlimit(RLIMIT_NOFILE, &lim);
    lim.rlim_cur = static_cast<rlim_t>(lowest_free);  // no room for any new descriptor
    if (::setrlimit(RLIMIT_NOFILE, &lim) != 0) ::_exit(3);
    FrameReader reader;
    auto f = receive_frame(s.b.get(), reader, 5000);
    ::_exit(!f.ok() && f.error().code == StatusCode::kProtocolError ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "child died: status " << status;
  EXPECT_EQ(WEXITSTATUS(status), 0) << "a frame whose descriptors were truncated was accepted";
}

}  // namespace
}  // namespace companion::protocol
