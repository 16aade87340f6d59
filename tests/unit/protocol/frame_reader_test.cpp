// FrameReader reassembly from bytes fed directly (no socket).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "protocol/frame.hpp"
#include "protocol/limits.hpp"

namespace companion::protocol {
namespace {

std::vector<uint8_t> raw_header(uint32_t magic, uint32_t size, uint16_t fds, uint16_t flags) {
  std::vector<uint8_t> h(kFrameHeaderBytes);
  for (int i = 0; i < 4; ++i) h[i] = static_cast<uint8_t>(magic >> (8 * i));
  for (int i = 0; i < 4; ++i) h[4 + i] = static_cast<uint8_t>(size >> (8 * i));
  h[8] = static_cast<uint8_t>(fds);
  h[9] = static_cast<uint8_t>(fds >> 8);
  h[10] = static_cast<uint8_t>(flags);
  h[11] = static_cast<uint8_t>(flags >> 8);
  return h;
}

std::vector<uint8_t> payload_of(size_t size, uint8_t seed) {
  std::vector<uint8_t> p(size);
  for (size_t i = 0; i < size; ++i) p[i] = static_cast<uint8_t>(seed + i * 31);
  return p;
}

std::vector<uint8_t> frame_bytes(const std::vector<uint8_t>& payload, uint16_t fds = 0) {
  std::vector<uint8_t> f = encode_frame_header(static_cast<uint32_t>(payload.size()), fds);
  f.insert(f.end(), payload.begin(), payload.end());
  return f;
}

ino_t inode(int fd) {
  struct stat st {};
  EXPECT_EQ(::fstat(fd, &st), 0);
  return st.st_ino;
}

// A pipe's read end (the write end is closed at once); its inode identifies it.
UniqueFd make_fd() {
  int p[2];
  EXPECT_EQ(::pipe(p), 0);
  ::close(p[1]);
  return UniqueFd(p[0]);
}

TEST(FrameHeader, Layout) {
  auto h = encode_frame_header(0x01020304, 0x0506);
  ASSERT_EQ(h.size(), kFrameHeaderBytes);
  EXPECT_EQ(std::vector<uint8_t>(h.begin(), h.begin() + 4),
            (std::vector<uint8_t>{'C', 'P', 'M', '1'}));
  EXPECT_EQ(std::vector<uint8_t>(h.begin() + 4, h.end()),
            (std::vector<uint8_t>{0x04, 0x03, 0x02, 0x01, 0x06, 0x05, 0x00, 0x00}));
  EXPECT_EQ(h, raw_header(kFrameMagic, 0x01020304, 0x0506, 0));
}

TEST(FrameReader, NothingYet) {
  FrameReader r;
  auto f = r.next();
  ASSERT_TRUE(f.ok());
  EXPECT_FALSE(f->has_value());
  EXPECT_EQ(r.buffered_bytes(), 0u);
}

TEST(FrameReader, OneByteAtATime) {
  std::vector<std::vector<uint8_t>> payloads = {
      payload_of(100, 1), {}, payload_of(1, 2), payload_of(4097, 3)};
  std::vector<uint8_t> stream;
  for (const auto& p : payloads) {
    auto f = frame_bytes(p);
    stream.insert(stream.end(), f.begin(), f.end());
  }
  FrameReader r;
  std::vector<Frame> got;
  for (size_t i = 0; i < stream.size(); ++i) {
    r.feed(std::span<const uint8_t>(&stream[i], 1));
    auto f = r.next();
    ASSERT_TRUE(f.ok()) << f.error().to_string();
    if (f->has_value()) got.push_back(std::move(**f));
    auto none = r.next();  // never two frames out of one byte
    ASSERT_TRUE(none.ok());
    EXPECT_FALSE(none->has_value()) << "at byte " << i;
  }
  ASSERT_EQ(got.size(), payloads.size());
  for (size_t i = 0; i < payloads.size(); ++i) {
    EXPECT_EQ(got[i].payload, payloads[i]) << i;
    EXPECT_TRUE(got[i].fds.empty());
  }
  EXPECT_EQ(r.buffered_bytes(), 0u);
}

TEST(FrameReader, EverySplitPointOfTwoFrames) {
  auto a = frame_bytes(payload_of(37, 9));
  auto b = frame_bytes(payload_of(5, 4));
  std::vector<uint8_t> stream = a;
  stream.insert(stream.end(), b.begin(), b.end());
  for (size_t cut1 = 0; cut1 <= stream.size(); ++cut1) {
    for (size_t cut2 = cut1; cut2 <= stream.size(); cut2 += 7) {
      FrameReader r;
      std::vector<Frame> got;
      auto drain = [&] {
        for (;;) {
          auto f = r.next();
          ASSERT_TRUE(f.ok());
          if (!f->has_value()) return;
          got.push_back(std::move(**f));
        }
      };
      r.feed(std::span<const uint8_t>(stream.data(), cut1));
      drain();
      r.feed(std::span<const uint8_t>(stream.data() + cut1, cut2 - cut1));
      drain();
      r.feed(std::span<const uint8_t>(stream.data() + cut2, stream.size() - cut2));
      drain();
      ASSERT_EQ(got.size(), 2u) << cut1 << "/" << cut2;
      EXPECT_EQ(got[0].payload, payload_of(37, 9));
      EXPECT_EQ(got[1].payload, payload_of(5, 4));
    }
  }
}

TEST(FrameReader, SeveralFramesInOneFeed) {
  std::vector<uint8_t> stream;
  for (int i = 0; i < 10; ++i) {
    auto f = frame_bytes(payload_of(static_cast<size_t>(i * 13), static_cast<uint8_t>(i)));
    stream.insert(stream.end(), f.begin(), f.end());
  }
  auto partial = frame_bytes(payload_of(50, 50));
  stream.insert(stream.end(), partial.begin(), partial.begin() + 20);
  FrameReader r;
  r.feed(stream);
  for (int i = 0; i < 10; ++i) {
    auto f = r.next();
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE(f->has_value()) << i;
    EXPECT_EQ((*f)->payload, payload_of(static_cast<size_t>(i * 13), static_cast<uint8_t>(i)));
  }
  auto f = r.next();
  ASSERT_TRUE(f.ok());
  EXPECT_FALSE(f->has_value());
  EXPECT_EQ(r.buffered_bytes(), 20u);
  r.feed(std::span<const uint8_t>(partial.data() + 20, partial.size() - 20));
  f = r.next();
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE(f->has_value());
  EXPECT_EQ((*f)->payload, payload_of(50, 50));
  EXPECT_EQ(r.buffered_bytes(), 0u);
}

void expect_protocol_error(FrameReader& r) {
  auto f = r.next();
  ASSERT_FALSE(f.ok()) << "accepted a bad header";
  EXPECT_EQ(f.error().code, StatusCode::kProtocolError) << f.error().to_string();
}

TEST(FrameReader, BadMagic) {
  for (uint32_t magic :
       {0u, 0x324d5043u /* CPM2 */, 0x43504d31u /* big-endian CPM1 */, 0xffffffffu}) {
    FrameReader r;
    r.feed(raw_header(magic, 0, 0, 0));
    expect_protocol_error(r);
  }
  // Detected as soon as the header is complete, without waiting for the payload.
  FrameReader r;
  r.feed(raw_header(0x50545448 /* "HTTP" */, 1000, 0, 0));
  expect_protocol_error(r);
}

TEST(FrameReader, BadMagicAfterAGoodFrame) {
  FrameReader r;
  auto good = frame_bytes(payload_of(8, 0));
  r.feed(good);
  r.feed(raw_header(0x12345678, 0, 0, 0));
  auto f = r.next();
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE(f->has_value());
  expect_protocol_error(r);
}

TEST(FrameReader, NonzeroFlags) {
  for (uint16_t flags : {uint16_t(1), uint16_t(0x8000), uint16_t(0xffff), uint16_t(0x0100)}) {
    FrameReader r;
    auto h = raw_header(kFrameMagic, 4, 0, flags);
    r.feed(h);
    r.feed(payload_of(4, 0));
    expect_protocol_error(r);
  }
}

TEST(FrameReader, OversizedPayloadRejectedFromTheHeaderAlone) {
  for (uint32_t size : {kMaxPayloadBytes + 1, 0x80000000u, 0xffffffffu}) {
    FrameReader r;
    r.feed(raw_header(kFrameMagic, size, 0, 0));
    expect_protocol_error(r);
  }
  // Exactly the limit is fine: the reader waits for the payload.
  FrameReader r;
  r.feed(raw_header(kFrameMagic, kMaxPayloadBytes, 0, 0));
  auto f = r.next();
  ASSERT_TRUE(f.ok()) << f.error().to_string();
  EXPECT_FALSE(f->has_value());
}

TEST(FrameReader, TooManyFds) {
  for (uint16_t n : {uint16_t(kMaxFdsPerFrame + 1), uint16_t(253), uint16_t(0xffff)}) {
    FrameReader r;
    r.feed(raw_header(kFrameMagic, 100, n, 0));  // rejected before the payload arrives
    expect_protocol_error(r);
  }
}

TEST(FrameReader, AnnouncedFdsThatDidNotArrive) {
  FrameReader r;
  r.feed(raw_header(kFrameMagic, 4, 1, 0));
  r.feed(payload_of(4, 0));
  expect_protocol_error(r);

  FrameReader r2;  // two announced, one arrived
  std::vector<UniqueFd> one;
  one.push_back(make_fd());
  r2.feed(raw_header(kFrameMagic, 0, 2, 0), std::move(one));
  expect_protocol_error(r2);
}

// Descriptors arrive with the first bytes of the frame that announces them (one recvmsg never
// returns the descriptors of two sendmsg calls): fed the same way here.
TEST(FrameReader, FdsGoToTheirFrames) {
  std::vector<UniqueFd> first, third;
  std::vector<ino_t> inodes;
  for (int i = 0; i < 3; ++i) {
    UniqueFd fd = make_fd();
    inodes.push_back(inode(fd.get()));
    (i == 0 ? first : third).push_back(std::move(fd));
  }
  FrameReader r;
  r.feed(frame_bytes(payload_of(3, 1), 1), std::move(first));
  r.feed(frame_bytes(payload_of(3, 2), 0));
  r.feed(frame_bytes(payload_of(3, 3), 2), std::move(third));
  auto f1 = r.next();
  ASSERT_TRUE(f1.ok()) << f1.error().to_string();
  ASSERT_TRUE(f1->has_value());
  EXPECT_EQ((*f1)->payload, payload_of(3, 1));
  ASSERT_EQ((*f1)->fds.size(), 1u);
  EXPECT_EQ(inode((*f1)->fds[0].get()), inodes[0]);
  auto f2 = r.next();
  ASSERT_TRUE(f2.ok()) << f2.error().to_string();
  ASSERT_TRUE(f2->has_value());
  EXPECT_TRUE((*f2)->fds.empty());
  auto f3 = r.next();
  ASSERT_TRUE(f3.ok()) << f3.error().to_string();
  ASSERT_TRUE(f3->has_value());
  ASSERT_EQ((*f3)->fds.size(), 2u);
  EXPECT_EQ(inode((*f3)->fds[0].get()), inodes[1]);
  EXPECT_EQ(inode((*f3)->fds[1].get()), inodes[2]);
}

// A frame split anywhere still gets the descriptors that came with its first byte.
TEST(FrameReader, FdsWithTheFirstByteOfASplitFrame) {
  UniqueFd fd = make_fd();
  const ino_t ino = inode(fd.get());
  auto bytes = frame_bytes(payload_of(40, 6), 1);
  FrameReader r;
  std::vector<UniqueFd> fds;
  fds.push_back(std::move(fd));
  r.feed(std::span<const uint8_t>(bytes.data(), 1), std::move(fds));
  for (size_t i = 1; i < bytes.size(); ++i) {
    auto none = r.next();
    ASSERT_TRUE(none.ok()) << i << ": " << none.error().to_string();
    ASSERT_FALSE(none->has_value());
    r.feed(std::span<const uint8_t>(&bytes[i], 1));
  }
  auto f = r.next();
  ASSERT_TRUE(f.ok()) << f.error().to_string();
  ASSERT_TRUE(f->has_value());
  EXPECT_EQ((*f)->payload, payload_of(40, 6));
  ASSERT_EQ((*f)->fds.size(), 1u);
  EXPECT_EQ(inode((*f)->fds[0].get()), ino);
}

// Descriptors that came with a frame announcing none are not handed to a later frame.
TEST(FrameReader, UnannouncedFdsAreNotGivenToALaterFrame) {
  UniqueFd stray = make_fd();
  UniqueFd real = make_fd();
  const ino_t real_ino = inode(real.get());
  FrameReader r;
  std::vector<UniqueFd> a, b;
  a.push_back(std::move(stray));
  b.push_back(std::move(real));
  r.feed(frame_bytes(payload_of(3, 1), 0), std::move(a));
  r.feed(frame_bytes(payload_of(3, 2), 1), std::move(b));
  auto f1 = r.next();
  if (!f1.ok()) {
    EXPECT_EQ(f1.error().code, StatusCode::kProtocolError);
    return;
  }
  ASSERT_TRUE(f1->has_value());
  EXPECT_TRUE((*f1)->fds.empty());
  auto f2 = r.next();
  if (!f2.ok()) {
    EXPECT_EQ(f2.error().code, StatusCode::kProtocolError);
    return;
  }
  ASSERT_TRUE(f2->has_value());
  ASSERT_EQ((*f2)->fds.size(), 1u);
  EXPECT_EQ(inode((*f2)->fds[0].get()), real_ino) << "got the previous frame's descriptor";
}

// Descriptors arriving in the middle of a frame cannot belong to any frame (a frame's come with
// its first bytes). They must be refused when they arrive, not when the frame completes: else a
// peer announcing a 64 MiB frame and sending it a byte at a time, each byte with 253 descriptors,
// makes the reader hold descriptors without bound.
TEST(FrameReader, FdsInTheMiddleOfAFrameAreRefusedAtOnce) {
  for (uint16_t announced : {uint16_t(0), uint16_t(1)}) {
    SCOPED_TRACE(announced);
    FrameReader r;
    auto bytes = frame_bytes(payload_of(1000, 1), announced);
    std::vector<UniqueFd> own;
    if (announced) own.push_back(make_fd());
    r.feed(std::span<const uint8_t>(bytes.data(), 20), std::move(own));  // header + 8 bytes
    auto f = r.next();
    ASSERT_TRUE(f.ok()) << f.error().to_string();
    ASSERT_FALSE(f->has_value());
    std::vector<UniqueFd> stray;
    stray.push_back(make_fd());
    r.feed(std::span<const uint8_t>(bytes.data() + 20, 10), std::move(stray));
    auto g = r.next();
    ASSERT_FALSE(g.ok()) << "descriptors in the middle of a frame were kept";
    EXPECT_EQ(g.error().code, StatusCode::kProtocolError);
  }
}

TEST(FrameReader, MaxFdsPerFrame) {
  UniqueFd base = make_fd();
  std::vector<UniqueFd> fds;
  for (int i = 0; i < kMaxFdsPerFrame; ++i) fds.emplace_back(::dup(base.get()));
  FrameReader r;
  r.feed(frame_bytes({}, kMaxFdsPerFrame), std::move(fds));
  auto f = r.next();
  ASSERT_TRUE(f.ok()) << f.error().to_string();
  ASSERT_TRUE(f->has_value());
  EXPECT_EQ((*f)->fds.size(), kMaxFdsPerFrame);
}

TEST(FrameReader, RandomSplitsOfManyFrames) {
  std::mt19937 rng(4242);
  std::vector<std::vector<uint8_t>> payloads;
  std::vector<uint8_t> stream;
  for (int i = 0; i < 200; ++i) {
    payloads.push_back(payload_of(rng() % 3000, static_cast<uint8_t>(i)));
    auto f = frame_bytes(payloads.back());
    stream.insert(stream.end(), f.begin(), f.end());
  }
  FrameReader r;
  size_t pos = 0, got = 0;
  while (pos < stream.size()) {
    size_t n = std::min<size_t>(stream.size() - pos, 1 + rng() % 5000);
    r.feed(std::span<const uint8_t>(stream.data() + pos, n));
    pos += n;
    for (;;) {
      auto f = r.next();
      ASSERT_TRUE(f.ok());
      if (!f->has_value()) break;
      ASSERT_LT(got, payloads.size());
      EXPECT_EQ((*f)->payload, payloads[got]) << got;
      ++got;
    }
  }
  EXPECT_EQ(got, payloads.size());
  EXPECT_EQ(r.buffered_bytes(), 0u);
}

}  // namespace
}  // namespace companion::protocol
