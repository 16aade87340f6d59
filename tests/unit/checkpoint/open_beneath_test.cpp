// Opening a checkpoint's files beneath the roots: each file opened once and kept as a descriptor;
// FIFOs, sockets and directories refused without blocking; nothing told about what lies outside
// the roots; the header length, tensor count and file count checked before the work they bound.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <future>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/checkpoint.hpp"
#include "checkpoint/index_json.hpp"
#include "checkpoint/open_beneath.hpp"
#include "checkpoint/source.hpp"
#include "test_support.hpp"

namespace companion::checkpoint {
namespace {

using testing::expect_error;
using testing::TempDir;

constexpr StatusCode kBad = StatusCode::kBadCheckpoint;

using testing::file_with;

void make_fifo(const std::string& path) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  ASSERT_EQ(::mkfifo(path.c_str(), 0644), 0) << path;
}

void make_symlink(const std::string& target, const std::string& link) {
  std::filesystem::create_directories(std::filesystem::path(link).parent_path());
  ASSERT_EQ(::symlink(target.c_str(), link.c_str()), 0) << link << " -> " << target;
}

// Runs `open` on a thread of its own. Should it block on `fifo` (the bug this guards against),
// the test fails and the FIFO's write end is opened and closed so that the reader sees the end
// of the file and the test ends instead of hanging.
template <typename Fn>
auto without_hanging(const std::string& fifo, Fn open) -> decltype(open()) {
  auto future = std::async(std::launch::async, open);
  for (int attempt = 0;
       future.wait_for(std::chrono::seconds(attempt == 0 ? 10 : 1)) == std::future_status::timeout;
       ++attempt) {
    if (attempt == 0) ADD_FAILURE() << "opening blocked on the FIFO " << fifo;
    int writer = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (writer >= 0) ::close(writer);
  }
  return future.get();
}

class OpenBeneath : public ::testing::Test {
 protected:
  void put(const std::string& rel, const std::string& bytes) {
    testing::write_file(root_ / rel, bytes);
  }
  Result<Checkpoint> open(const std::string& rel, const CheckpointLimits& limits = {}) {
    return open_checkpoint(root_ / rel, roots_, limits);
  }

  TempDir root_;
  std::vector<std::string> roots_{root_.path()};
};

TEST_F(OpenBeneath, TheCheckpointHoldsOneOpenDescriptorPerFile) {
  put("hub/blobs/aa", file_with({"a"}));
  put("hub/blobs/bb", file_with({"b"}));
  make_symlink("../blobs/aa", root_ / "hub/snap/a.safetensors");
  make_symlink("../blobs/bb", root_ / "hub/snap/b.safetensors");
  auto checkpoint = open("hub/snap");
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.error().to_string();
  EXPECT_EQ(checkpoint->directory, root_ / "hub/snap");
  ASSERT_EQ(checkpoint->fds.size(), 2u);
  ASSERT_EQ(checkpoint->files.size(), 2u);
  EXPECT_EQ(descriptor_path(checkpoint->fds[0]->get()), root_ / "hub/blobs/aa");
  EXPECT_EQ(descriptor_path(checkpoint->fds[1]->get()), root_ / "hub/blobs/bb");
  // Descriptors never leak into children.
  EXPECT_TRUE(::fcntl(checkpoint->fds[0]->get(), F_GETFD) & FD_CLOEXEC);
  // Opened without blocking; read as any file.
  EXPECT_FALSE(::fcntl(checkpoint->fds[0]->get(), F_GETFL) & O_NONBLOCK);

  put("single/model.safetensors", file_with({"w"}));
  auto single = open("single/model.safetensors");
  ASSERT_TRUE(single.ok()) << single.error().to_string();
  EXPECT_EQ(single->directory, root_ / "single");
  ASSERT_EQ(single->fds.size(), 1u);
}

TEST_F(OpenBeneath, AFifoNamedAsTheIndexIsRefusedWithoutBlocking) {
  put("s/a.safetensors", file_with({"w"}));
  make_fifo(root_ / "s/model.safetensors.index.json");
  auto result =
      without_hanging(root_ / "s/model.safetensors.index.json", [&] { return open("s"); });
  expect_error(result, kBad, {root_ / "s/model.safetensors.index.json", "not a regular file"});
}

TEST_F(OpenBeneath, AFifoAsAShardIsRefusedNotSkipped) {
  put("m/a.safetensors", file_with({"w"}));
  make_fifo(root_ / "m/b.safetensors");
  auto listed = without_hanging(root_ / "m/b.safetensors", [&] { return open("m"); });
  expect_error(listed, kBad, {root_ / "m/b.safetensors", "not a regular file"});

  put("s/a.safetensors", file_with({"w"}));
  make_fifo(root_ / "s/b.safetensors");
  put("s/model.safetensors.index.json",
      R"({"weight_map":{"w":"a.safetensors","v":"b.safetensors"}})");
  auto indexed = without_hanging(root_ / "s/b.safetensors", [&] { return open("s"); });
  expect_error(indexed, kBad, {root_ / "s/b.safetensors", "not a regular file"});

  make_fifo(root_ / "direct.safetensors");
  auto direct =
      without_hanging(root_ / "direct.safetensors", [&] { return open("direct.safetensors"); });
  expect_error(direct, kBad, {root_ / "direct.safetensors"});
}

TEST_F(OpenBeneath, ASocketAsAShardIsRefused) {
  put("m/a.safetensors", file_with({"w"}));
  std::string path = root_ / "m/b.safetensors";
  int sock = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(sock, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  ASSERT_LT(path.size(), sizeof(addr.sun_path));
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  ASSERT_EQ(::bind(sock, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(sock, 1), 0);
  expect_error(open("m"), kBad, {root_ / "m/b.safetensors"});
  ::close(sock);
}

TEST_F(OpenBeneath, AFifoAsConfigJsonIsRefusedWithoutBlocking) {
  put("m/model.safetensors", file_with({"w"}));
  auto checkpoint = open("m");
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.error().to_string();
  auto absent = read_checkpoint_side_file(*checkpoint, "config.json", roots_, 1 << 20);
  ASSERT_TRUE(absent.ok()) << absent.error().to_string();
  EXPECT_FALSE(absent->has_value());

  put("m/config.json", R"({"architectures":["X"]})");
  auto present = read_checkpoint_side_file(*checkpoint, "config.json", roots_, 1 << 20);
  ASSERT_TRUE(present.ok()) << present.error().to_string();
  EXPECT_EQ(present->value(), R"({"architectures":["X"]})");
  expect_error(read_checkpoint_side_file(*checkpoint, "config.json", roots_, 4), kBad,
               {"config.json", "over the limit"});

  std::filesystem::remove(root_ / "m/config.json");
  make_fifo(root_ / "m/config.json");
  auto fifo = without_hanging(root_ / "m/config.json", [&] {
    return read_checkpoint_side_file(*checkpoint, "config.json", roots_, 1 << 20);
  });
  expect_error(fifo, kBad, {root_ / "m/config.json", "not a regular file"});
}

TEST_F(OpenBeneath, NothingIsToldAboutFilesOutsideTheRoots) {
  TempDir outside;
  testing::write_file(outside / "m/model.safetensors", file_with({"w"}));
  auto expect_outside = [&](const Result<Checkpoint>& result, const std::string& path) {
    expect_error(result, StatusCode::kNotPermitted, {path});
    if (!result.ok()) {
      EXPECT_EQ(result.error().message, path + " is outside the directories this server may read");
    }
  };
  // The same code and the same words whether the path exists or not.
  for (const std::string& path :
       {outside / "m/model.safetensors", outside / "m/missing.safetensors", outside / "m",
        outside / "missing/dir",
        root_ / "../" + std::filesystem::path(outside.path()).filename().string() + "/m"}) {
    SCOPED_TRACE(path);
    expect_outside(open_checkpoint(path, roots_), path);
    ModelSpec spec;
    spec.source = path;
    auto resolved = resolve_source(spec, root_ / "hub", roots_);
    ASSERT_FALSE(resolved.ok());
    EXPECT_EQ(resolved.error().code, StatusCode::kNotPermitted) << resolved.error().to_string();
    EXPECT_EQ(resolved.error().message, path + " is outside the directories this server may read");
  }
  // Symlinks inside the root leading out: to something, or to nothing.
  make_symlink(outside / "m/model.safetensors", root_ / "to-file.safetensors");
  make_symlink(outside / "m/absent.safetensors", root_ / "to-nothing.safetensors");
  make_symlink("../../" + std::filesystem::path(outside.path()).filename().string() +
                   "/m/absent.safetensors",
               root_ / "d/relative-to-nothing.safetensors");
  for (const char* name :
       {"to-file.safetensors", "to-nothing.safetensors", "d/relative-to-nothing.safetensors"}) {
    SCOPED_TRACE(name);
    expect_outside(open(name), root_ / name);
    auto real = real_path_under_roots(root_ / name, roots_);
    ASSERT_FALSE(real.ok());
    EXPECT_EQ(real.error().code, StatusCode::kNotPermitted) << real.error().to_string();
  }
  // Inside a root, a missing file is simply missing.
  expect_error(open("absent"), StatusCode::kNotFound, {root_ / "absent"});
  ModelSpec inside;
  inside.source = root_ / "absent";
  expect_error(resolve_source(inside, root_ / "hub", roots_), StatusCode::kNotFound,
               {root_ / "absent"});
}

TEST_F(OpenBeneath, ASymlinkIntoAnotherRootIsFollowed) {
  TempDir other;
  testing::write_file(other / "blob", file_with({"w"}));
  make_symlink(other / "blob", root_ / "m/model.safetensors");
  auto checkpoint = open_checkpoint(root_ / "m", {root_.path(), other.path()});
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.error().to_string();
  EXPECT_EQ(descriptor_path(checkpoint->fds.at(0)->get()), other / "blob");
  expect_error(open("m"), StatusCode::kNotPermitted, {root_ / "m/model.safetensors"});
}

TEST_F(OpenBeneath, TheHeaderLengthLimitIsCheckedBeforeTheHeaderIsRead) {
  // Sparse: only the length prefix is written; reading the header would fail on its zeros.
  std::string path = root_ / "big.safetensors";
  testing::write_file(path, testing::le64(4096));
  ASSERT_EQ(::truncate(path.c_str(), 8 + 4096), 0);
  CheckpointLimits limits;
  limits.max_header_bytes = 1024;
  uint64_t before = refusal_counts().header_bytes;
  expect_error(open("big.safetensors", limits), StatusCode::kLimitExceeded,
               {path, "4096", "1024", "--max-header-bytes"});
  EXPECT_EQ(refusal_counts().header_bytes, before + 1);
}

TEST_F(OpenBeneath, TheTensorCountIsCheckedBeforeTheHeaderIsParsed) {
  CheckpointLimits limits;
  limits.max_tensors = 10;
  std::vector<std::string> names;
  for (int i = 0; i < 11; ++i) names.push_back("t" + std::to_string(i));
  put("eleven.safetensors", file_with(names));
  uint64_t before = refusal_counts().tensors;
  expect_error(open("eleven.safetensors", limits), StatusCode::kLimitExceeded,
               {"more tensors", "10", "--max-tensors"});
  EXPECT_EQ(refusal_counts().tensors, before + 1);
  names.pop_back();
  put("ten.safetensors", file_with(names));
  EXPECT_TRUE(open("ten.safetensors", limits).ok());

  // Counting stops at the limit: what follows the eleventh name is never looked at (here it is
  // not even JSON), so nothing is built for a header of millions of entries.
  std::string header = R"({"__metadata__":{"a":"b"})";
  for (int i = 0; i < 11; ++i)
    header += ",\"t" + std::to_string(i) + R"(":{"dtype":"U8","shape":[0],"data_offsets":[0,0]})";
  header += ", this is not JSON";
  put("prefix.safetensors", testing::le64(header.size()) + header);
  expect_error(open("prefix.safetensors", limits), StatusCode::kLimitExceeded, {"--max-tensors"});

  // The limit is for the whole checkpoint, all its files together.
  put("m/a.safetensors", file_with({"a0", "a1", "a2", "a3", "a4"}));
  put("m/b.safetensors", file_with({"b0", "b1", "b2", "b3", "b4"}));
  EXPECT_TRUE(open("m", limits).ok());
  put("m/c.safetensors", file_with({"c0"}));
  before = refusal_counts().tensors;
  expect_error(open("m", limits), StatusCode::kLimitExceeded,
               {root_ / "m/c.safetensors", "--max-tensors"});
  // Once, though the headers are parsed ahead on threads of their own.
  EXPECT_EQ(refusal_counts().tensors, before + 1);
  // Past the limit in the first file: that file is the one named.
  put("n/a.safetensors",
      file_with({"a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9", "a10"}));
  put("n/b.safetensors", file_with({"b0"}));
  before = refusal_counts().tensors;
  expect_error(open("n", limits), StatusCode::kLimitExceeded,
               {root_ / "n/a.safetensors", "--max-tensors"});
  EXPECT_EQ(refusal_counts().tensors, before + 1);
}

TEST_F(OpenBeneath, AnErrorInAnEarlierFileIsReportedWhateverTheLaterOnesHold) {
  // Headers are parsed ahead, several at once; the error reported is still the first file's.
  put("m/a.safetensors", testing::le64(4) + "nope");
  put("m/b.safetensors", file_with({"b"}));
  put("m/c.safetensors", testing::le64(5) + "{\"x\":");
  expect_error(open("m"), kBad, {root_ / "m/a.safetensors", "not valid JSON"});
  put("m/a.safetensors", file_with({"a"}));
  expect_error(open("m"), kBad, {root_ / "m/c.safetensors", "not valid JSON"});
  put("m/c.safetensors", file_with({"b"}));
  expect_error(open("m"), kBad, {"'b'", "appears in both", "b.safetensors", "c.safetensors"});
}

TEST_F(OpenBeneath, TheIndexEntriesAreCountedBeforeTheIndexIsParsed) {
  CheckpointLimits limits;
  limits.max_tensors = 10;
  put("s/a.safetensors", file_with({"w"}));
  std::string weight_map = R"("w":"a.safetensors")";
  for (int i = 0; i < 10; ++i) weight_map += ",\"t" + std::to_string(i) + R"(":"a.safetensors")";
  // The eleventh entry is enough: what follows is not even JSON.
  put("s/model.safetensors.index.json",
      R"({"metadata":{"a":1,"b":2,"c":3},"weight_map":{)" + weight_map + ", not JSON");
  uint64_t before = refusal_counts().tensors;
  expect_error(open("s", limits), StatusCode::kLimitExceeded,
               {"model.safetensors.index.json", "10", "--max-tensors"});
  EXPECT_EQ(refusal_counts().tensors, before + 1);
}

TEST(EntryCounting, OnlyTheKeysOfWeightMapCount) {
  const std::string index =
      R"({"metadata":{"k":1,"l":2,"m":3},"weight_map":{"a":"f","b":{"n":{"o":1}},"c":"f"},"z":{}})";
  // Within the cap the entry for 'b' is what is wrong; one below it, the count is.
  expect_error(parse_index_json(index, "index", 3), kBad, {"'b'", "file name string"});
  expect_error(parse_index_json(index, "index", 2), StatusCode::kLimitExceeded,
               {"index", "more than 2"});
  // A syntax error met before the count passes the cap is reported; one after it is never read.
  expect_error(parse_index_json(R"({"weight_map":{"a":"f",)", "index", 5), kBad,
               {"not valid JSON"});
  expect_error(parse_index_json(R"({"weight_map":{"a":"f","b":"f", oops)", "index", 1),
               StatusCode::kLimitExceeded, {"more than 1"});
  // Nor does a repeated key stop the count (the count comes first, as if made on its own).
  expect_error(parse_index_json(R"({"weight_map":{"a":"f","a":"f","c":"f"}})", "index", 2),
               StatusCode::kLimitExceeded, {"more than 2"});
}

TEST_F(OpenBeneath, OnlyTopLevelKeysButMetadataCountAsTensors) {
  CheckpointLimits limits;
  limits.max_tensors = 2;
  const std::string empty = R"({"dtype":"U8","shape":[0],"data_offsets":[0,0]})";
  std::string header =
      R"({"a":)" + empty + R"(,"__metadata__":{"k":"v","l":"w","m":"x"},"b":)" + empty + "}";
  put("two.safetensors", testing::le64(header.size()) + header);
  EXPECT_TRUE(open("two.safetensors", limits).ok());
  limits.max_tensors = 1;
  expect_error(open("two.safetensors", limits), StatusCode::kLimitExceeded, {"--max-tensors"});
}

TEST_F(OpenBeneath, TheFileCountIsCheckedBeforeFilesAreOpened) {
  CheckpointLimits limits;
  limits.max_files = 2;
  put("m/a.safetensors", file_with({"a"}));
  put("m/b.safetensors", file_with({"b"}));
  EXPECT_TRUE(open("m", limits).ok());
  put("m/c.safetensors", file_with({"c"}));
  uint64_t before = refusal_counts().files;
  expect_error(open("m", limits), StatusCode::kLimitExceeded,
               {root_ / "m", "more than 2", "--max-checkpoint-files"});
  EXPECT_EQ(refusal_counts().files, before + 1);
  put("m/model.safetensors.index.json",
      R"({"weight_map":{"a":"a.safetensors","b":"b.safetensors","c":"c.safetensors"}})");
  expect_error(open("m", limits), StatusCode::kLimitExceeded,
               {"model.safetensors.index.json", "--max-checkpoint-files"});
}

// Kernels without openat2 (before 5.6, or seccomp filters that refuse it): the O_PATH descriptor
// is checked for where it really is before that descriptor is reopened.
class OpenWithoutOpenat2 : public OpenBeneath {
 protected:
  void SetUp() override { use_openat2_for_testing(false); }
  void TearDown() override { use_openat2_for_testing(true); }
};

TEST_F(OpenWithoutOpenat2, TheSameFilesAreOpenedAndRefused) {
  put("hub/blobs/aa", file_with({"a"}));
  make_symlink("../blobs/aa", root_ / "hub/snap/model.safetensors");
  auto snapshot = open("hub/snap");
  ASSERT_TRUE(snapshot.ok()) << snapshot.error().to_string();
  EXPECT_EQ(descriptor_path(snapshot->fds.at(0)->get()), root_ / "hub/blobs/aa");

  TempDir outside;
  testing::write_file(outside / "secret", file_with({"a"}));
  make_symlink(outside / "secret", root_ / "out/model.safetensors");
  expect_error(open("out"), StatusCode::kNotPermitted, {root_ / "out/model.safetensors"});
  expect_error(open_checkpoint(outside / "secret", roots_), StatusCode::kNotPermitted,
               {outside / "secret"});
  expect_error(open_checkpoint(outside / "absent", roots_), StatusCode::kNotPermitted,
               {outside / "absent"});
  auto other_root = open_checkpoint(root_ / "out", {root_.path(), outside.path()});
  EXPECT_TRUE(other_root.ok()) << other_root.error().to_string();

  put("s/a.safetensors", file_with({"w"}));
  make_fifo(root_ / "s/model.safetensors.index.json");
  auto fifo = without_hanging(root_ / "s/model.safetensors.index.json", [&] { return open("s"); });
  expect_error(fifo, kBad, {root_ / "s/model.safetensors.index.json", "not a regular file"});
}

TEST(CheckpointLimits, OutOfRangeValuesAreRefused) {
  EXPECT_TRUE(check_limits(CheckpointLimits{}).ok());
  CheckpointLimits limits;
  limits.max_header_bytes = kMaxHeaderBytes + 1;
  expect_error(check_limits(limits), StatusCode::kInvalidArgument, {"--max-header-bytes"});
  limits = {};
  limits.max_tensors = 0;
  expect_error(check_limits(limits), StatusCode::kInvalidArgument, {"--max-tensors"});
  limits = {};
  limits.max_files = 0;
  expect_error(check_limits(limits), StatusCode::kInvalidArgument, {"--max-checkpoint-files"});
}

}  // namespace
}  // namespace companion::checkpoint
