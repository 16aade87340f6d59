// The keeper's messages and catalog (round trips, malformed input refused), and a real keeper
// process driven through KeeperSession: keep, list, forget, one session at a time, and its exit
// rules.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>

#include "keeper/keeper_client.hpp"
#include "keeper/keeper_process.hpp"
#include "keeper/keeper_protocol.hpp"

namespace companion::keeper {
namespace {

CatalogEntry sample_catalog() {
  CatalogEntry e;
  e.store_key = "source=/m/opt;dtype=BF16;tp=0/1";
  e.spec.source = "/m/opt";
  e.spec.dtype = DType::kBF16;
  e.spec.tag = "t";
  e.source_path = "/m/opt";
  e.number = 3;
  e.fingerprint = {{"engine", "x"}};
  e.digests = {0x1234, 0xabcdef};
  e.files = "1:2:3:4.5;";
  e.created_at_ms = 99;
  e.segment_kind = memory::SegmentKind::kCudaVmmFd;
  e.segment_sizes = {2 << 20, 4 << 20};
  e.table_bytes = 4096;
  return e;
}

TEST(KeeperProtocol, MessagesRoundTrip) {
  auto hello = encode(Hello{42, 600000, true});
  ASSERT_TRUE(hello.ok());
  auto back = decode(*hello);
  ASSERT_TRUE(back.ok());
  const auto& h = std::get<Hello>(*back);
  EXPECT_EQ(h.pid, 42);
  EXPECT_EQ(h.keep_for_ms, 600000);
  EXPECT_TRUE(h.release_all);

  auto keep = encode(Keep{7, {1, 2, 3}});
  ASSERT_TRUE(keep.ok());
  auto k = decode(*keep);
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(std::get<Keep>(*k).id, 7u);
  EXPECT_EQ(std::get<Keep>(*k).catalog, (std::vector<uint8_t>{1, 2, 3}));

  auto reply = decode(*encode(HelloReply{5, 2, 6, "busy"}));
  ASSERT_TRUE(reply.ok());
  EXPECT_EQ(std::get<HelloReply>(*reply).error, "busy");
  EXPECT_EQ(std::get<ListEnd>(*decode(*encode(ListEnd{4}))).count, 4u);
}

TEST(KeeperProtocol, CatalogRoundTrips) {
  auto back = decode_catalog(encode_catalog(sample_catalog()));
  ASSERT_TRUE(back.ok()) << back.error().to_string();
  CatalogEntry want = sample_catalog();
  EXPECT_EQ(back->store_key, want.store_key);
  EXPECT_EQ(back->spec.dtype, want.spec.dtype);
  EXPECT_EQ(back->spec.tag, "t");
  EXPECT_EQ(back->number, 3u);
  EXPECT_EQ(back->fingerprint, want.fingerprint);
  EXPECT_EQ(back->digests, want.digests);
  EXPECT_EQ(back->files, want.files);
  EXPECT_EQ(back->segment_kind, memory::SegmentKind::kCudaVmmFd);
  EXPECT_EQ(back->segment_sizes, want.segment_sizes);
  EXPECT_EQ(back->table_bytes, 4096u);
}

TEST(KeeperProtocol, MalformedInputIsAProtocolError) {
  std::vector<uint8_t> garbage(64, 0xff);
  auto m = decode(garbage);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.error().code, StatusCode::kProtocolError);
  auto c = decode_catalog(garbage);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().code, StatusCode::kProtocolError);
  // Truncations of a valid catalog are refused, never read past (the last few bytes may be
  // alignment padding, which a catalog can do without).
  auto bytes = encode_catalog(sample_catalog());
  for (size_t n = 0; n + 8 < bytes.size(); n += 7) {
    std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_FALSE(decode_catalog(cut).ok()) << n;
  }
  // A digest per segment, or the catalog is refused.
  CatalogEntry short_digests = sample_catalog();
  short_digests.digests.pop_back();
  EXPECT_FALSE(decode_catalog(encode_catalog(short_digests)).ok());
  CatalogEntry no_table = sample_catalog();
  no_table.table_bytes = 0;
  EXPECT_FALSE(decode_catalog(encode_catalog(no_table)).ok());
}

// A keeper in a child process, on a socket in a directory of the test's own.
class KeeperProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir_template[] = "/tmp/keeper-test-XXXXXX";
    ASSERT_NE(::mkdtemp(dir_template), nullptr);
    dir_ = dir_template;
    socket_ = dir_ + "/k.sock";
  }
  void TearDown() override {
    if (child_ > 0) {
      ::kill(child_, SIGKILL);
      ::waitpid(child_, nullptr, 0);
    }
    std::filesystem::remove_all(dir_);
  }
  void start(double keep_for_s) {
    child_ = ::fork();
    ASSERT_GE(child_, 0);
    if (child_ == 0) {
      KeeperOptions options;
      options.socket_path = socket_;
      options.keep_for = std::chrono::milliseconds(static_cast<int64_t>(keep_for_s * 1000));
      ::_exit(run_keeper(options));
    }
  }
  std::unique_ptr<KeeperSession> open(std::chrono::milliseconds keep_for) {
    for (int i = 0; i < 500; ++i) {
      auto session = KeeperSession::open(socket_, {}, keep_for);
      if (session.ok()) return std::move(session).value();
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ADD_FAILURE() << "no keeper on " << socket_;
    return nullptr;
  }
  // The keeper's exit status once it has exited.
  int wait_exit() {
    int status = 0;
    EXPECT_EQ(::waitpid(child_, &status, 0), child_);
    child_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

  std::string dir_;
  std::string socket_;
  pid_t child_ = -1;
};

UniqueFd memfd_with(const std::string& text) {
  UniqueFd fd(::memfd_create("keeper-test", MFD_CLOEXEC));
  EXPECT_EQ(::write(fd.get(), text.data(), text.size()), static_cast<ssize_t>(text.size()));
  return fd;
}

ino_t inode(int fd) {
  struct stat st {};
  ::fstat(fd, &st);
  return st.st_ino;
}

TEST_F(KeeperProcessTest, HoldsListsAndForgetsDescriptorsAndLeavesWhenEmpty) {
  start(60);
  auto session = open(std::chrono::seconds(60));
  ASSERT_TRUE(session);
  EXPECT_EQ(session->hello().kept, 0u);
  UniqueFd a = memfd_with("segment"), t = memfd_with("table");
  int fds[] = {a.get(), t.get()};
  ASSERT_TRUE(session->keep(7, {9, 9}, fds).ok());
  // One session at a time: a second server is told who holds it.
  auto second = KeeperSession::open(socket_, {}, std::chrono::seconds(1));
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().code, StatusCode::kUnavailable);
  EXPECT_NE(second.error().message.find("another server"), std::string::npos);
  // Nor may a server without a keeper (--no-keep) free what the session's server keeps.
  auto release = KeeperSession::release(socket_);
  ASSERT_TRUE(release.ok());
  EXPECT_NE(release->error.find("another server"), std::string::npos);

  auto listed = session->list();
  ASSERT_TRUE(listed.ok()) << listed.error().to_string();
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].id, 7u);
  EXPECT_EQ((*listed)[0].catalog, (std::vector<uint8_t>{9, 9}));
  ASSERT_EQ((*listed)[0].fds.size(), 2u);
  EXPECT_EQ(inode((*listed)[0].fds[0].get()), inode(a.get()));  // the same memory, not a copy
  EXPECT_EQ(inode((*listed)[0].fds[1].get()), inode(t.get()));

  ASSERT_TRUE(session->forget(7).ok());
  listed = session->list();
  ASSERT_TRUE(listed.ok());
  EXPECT_TRUE(listed->empty());
  session.reset();  // the server goes, nothing is held: the keeper leaves at once
  EXPECT_EQ(wait_exit(), 0);
}

TEST_F(KeeperProcessTest, KeepsForTheNextSessionThenExpires) {
  start(60);
  auto session = open(std::chrono::seconds(60));
  ASSERT_TRUE(session);
  UniqueFd a = memfd_with("segment"), t = memfd_with("table");
  int fds[] = {a.get(), t.get()};
  ASSERT_TRUE(session->keep(1, {1}, fds).ok());
  session.reset();  // the server dies; the keeper waits up to 60 s for the next one
  // The next server asks for no wait at all (its --keep-for 0) once it is gone in turn.
  auto next = open(std::chrono::milliseconds(0));
  ASSERT_TRUE(next);
  EXPECT_EQ(next->hello().kept, 1u);
  EXPECT_EQ(next->hello().descriptors, 2u);
  next.reset();
  EXPECT_EQ(wait_exit(), 0);  // expired: it freed everything and left
  EXPECT_FALSE(std::filesystem::exists(socket_));
}

TEST_F(KeeperProcessTest, ReleaseAllEndsTheKeeper) {
  start(60);
  auto session = open(std::chrono::seconds(60));
  ASSERT_TRUE(session);
  UniqueFd a = memfd_with("segment");
  int fds[] = {a.get()};
  ASSERT_TRUE(session->keep(1, {1}, fds).ok());
  session.reset();
  auto released = KeeperSession::release(socket_);
  ASSERT_TRUE(released.ok());
  // Released, not refused: the session that just ended is over even if the keeper had not
  // read its end yet when the release came.
  EXPECT_EQ(released->error, "");
  EXPECT_EQ(released->kept, 1u);
  EXPECT_EQ(wait_exit(), 0);
}

}  // namespace
}  // namespace companion::keeper
