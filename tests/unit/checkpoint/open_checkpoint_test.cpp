// open_checkpoint on layouts built here: errors, duplicate tensors, sharded indexes, roots.
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/checkpoint.hpp"
#include "test_support.hpp"

namespace companion::checkpoint {
namespace {

using testing::expect_error;
using testing::TempDir;

constexpr StatusCode kBad = StatusCode::kBadCheckpoint;

using testing::file_with;

void symlink_or_fail(const std::string& target, const std::string& link) {
  std::filesystem::create_directories(std::filesystem::path(link).parent_path());
  ASSERT_EQ(::symlink(target.c_str(), link.c_str()), 0) << link << " -> " << target;
}

class OpenCheckpoint : public ::testing::Test {
 protected:
  void put(const std::string& rel, const std::string& bytes) {
    testing::write_file(root_ / rel, bytes);
  }
  Result<Checkpoint> open(const std::string& rel) { return open_checkpoint(root_ / rel, roots_); }

  TempDir root_;
  std::vector<std::string> roots_{root_.path()};
};

TEST_F(OpenCheckpoint, MissingPathsAndEmptyDirectories) {
  expect_error(open("nowhere"), StatusCode::kNotFound, {root_ / "nowhere"});
  std::filesystem::create_directories(root_ / "empty");
  expect_error(open("empty"), StatusCode::kNotFound, {"no safetensors files in", root_ / "empty"});
  put("other/config.json", "{}");
  std::filesystem::create_directories(root_ / "other/dir.safetensors");  // a directory: ignored
  expect_error(open("other"), StatusCode::kNotFound, {"no safetensors files in"});
}

TEST_F(OpenCheckpoint, DirectoryOfFilesInNameOrder) {
  put("m/b.safetensors", file_with({"b2", "b1"}));
  put("m/a.safetensors", file_with({"a1"}));
  put("m/notes.txt", "not a checkpoint");
  auto checkpoint = open("m/");
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.error().to_string();
  EXPECT_EQ(checkpoint->location, root_ / "m");
  EXPECT_EQ(checkpoint->files,
            (std::vector<std::string>{root_ / "m/a.safetensors", root_ / "m/b.safetensors"}));
  ASSERT_EQ(checkpoint->tensors.size(), 3u);
  EXPECT_EQ(checkpoint->tensors[0].name, "a1");
  EXPECT_EQ(checkpoint->tensors[0].file_index, 0u);
  EXPECT_EQ(checkpoint->tensors[1].name, "b2");  // offset order within b, not name order
  EXPECT_EQ(checkpoint->tensors[1].file_index, 1u);
  EXPECT_EQ(checkpoint->tensors[2].name, "b1");
  EXPECT_EQ(checkpoint->total_bytes, 12u);
}

TEST_F(OpenCheckpoint, DuplicateTensorAcrossFiles) {
  put("m/a.safetensors", file_with({"x", "shared"}));
  put("m/b.safetensors", file_with({"shared"}));
  expect_error(open("m"), kBad, {"'shared'", "a.safetensors", "b.safetensors"});
}

TEST_F(OpenCheckpoint, ADanglingSymlinkIsAnErrorNotASkip) {
  put("m/a.safetensors", file_with({"x"}));
  symlink_or_fail("../blobs/never-downloaded", root_ / "m/b.safetensors");
  expect_error(open("m"), kBad, {root_ / "m/b.safetensors"});
}

TEST_F(OpenCheckpoint, ABadFileIsNamed) {
  put("m/a.safetensors", file_with({"x"}));
  put("m/b.safetensors", testing::le64(3) + "{}");
  expect_error(open("m"), kBad, {root_ / "m/b.safetensors"});
}

TEST_F(OpenCheckpoint, ShardedIndex) {
  put("s/model-00001-of-00002.safetensors", file_with({"w1", "w0"}));
  put("s/model-00002-of-00002.safetensors", file_with({"w2"}));
  put("s/stray.safetensors", file_with({"w1"}));  // not in the index: never opened
  put("s/model.safetensors.index.json", R"({"metadata":{"total_size":12},"weight_map":{
      "w0":"model-00001-of-00002.safetensors","w1":"model-00001-of-00002.safetensors",
      "w2":"model-00002-of-00002.safetensors"}})");
  auto checkpoint = open("s");
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.error().to_string();
  EXPECT_EQ(checkpoint->files,
            (std::vector<std::string>{root_ / "s/model-00001-of-00002.safetensors",
                                      root_ / "s/model-00002-of-00002.safetensors"}));
  ASSERT_EQ(checkpoint->tensors.size(), 3u);
  EXPECT_EQ(checkpoint->tensors[0].name, "w1");
  EXPECT_EQ(checkpoint->tensors[1].name, "w0");
  EXPECT_EQ(checkpoint->tensors[2].name, "w2");
  EXPECT_EQ(checkpoint->tensors[2].file_index, 1u);
}

TEST_F(OpenCheckpoint, BadIndexes) {
  put("s/a.safetensors", file_with({"w"}));
  const std::string index = "s/model.safetensors.index.json";
  auto with_map = [&](const std::string& weight_map) {
    put(index, R"({"metadata":{},"weight_map":)" + weight_map + "}");
    return open("s");
  };
  expect_error(with_map(R"({"w":"missing.safetensors"})"), kBad, {"'w'", "missing.safetensors"});
  put("x.safetensors", file_with({"w"}));  // exists, but outside the checkpoint directory
  expect_error(with_map(R"({"w":"../x.safetensors"})"), kBad, {"'w'", "../x.safetensors"});
  expect_error(with_map(R"({"w":"sub/a.safetensors"})"), kBad, {"sub/a.safetensors"});
  expect_error(with_map(R"({"w":".."})"), kBad, {"\"..\""});
  expect_error(with_map(R"({"w":""})"), kBad, {"'w'"});
  expect_error(with_map(R"({"w":3})"), kBad, {"'w'"});
  expect_error(with_map(R"({"w":"a.safetensors","w":"a.safetensors"})"), kBad, {"'w'", "twice"});
  expect_error(with_map("{}"), kBad, {"weight_map"});
  expect_error(with_map("[]"), kBad, {"weight_map"});
  put(index, "{not json");
  expect_error(open("s"), kBad, {"model.safetensors.index.json", "not valid JSON"});
}

TEST_F(OpenCheckpoint, FilesOutsideTheRootsAreRefused) {
  TempDir outside;
  testing::write_file(outside / "m/model.safetensors", file_with({"w"}));
  expect_error(open_checkpoint(outside / "m/model.safetensors", roots_), StatusCode::kNotPermitted,
               {outside / "m/model.safetensors"});
  expect_error(open_checkpoint(outside / "m", roots_), StatusCode::kNotPermitted, {outside / "m"});
  // Refused before listing, so the answer says nothing about what lies outside.
  std::filesystem::create_directories(outside / "no-models");
  expect_error(open_checkpoint(outside / "no-models", roots_), StatusCode::kNotPermitted,
               {outside / "no-models"});
  // A symlink inside the root leading out (where to is not told: see open_beneath_test).
  symlink_or_fail(outside / "m/model.safetensors", root_ / "link/model.safetensors");
  expect_error(open("link/model.safetensors"), StatusCode::kNotPermitted,
               {root_ / "link/model.safetensors"});
  expect_error(open("link"), StatusCode::kNotPermitted, {root_ / "link/model.safetensors"});
  // A symlinked directory inside the root leading out.
  symlink_or_fail(outside / "m", root_ / "dirlink");
  expect_error(open("dirlink"), StatusCode::kNotPermitted, {root_ / "dirlink"});
  // A root whose name is a prefix of the real directory's name is not its parent.
  testing::write_file(outside / "mx/model.safetensors", file_with({"w"}));
  expect_error(open_checkpoint(outside / "mx/model.safetensors", {outside / "m"}),
               StatusCode::kNotPermitted, {outside / "mx/model.safetensors"});
  ASSERT_TRUE(open_checkpoint(outside / "m/model.safetensors", {outside / "m"}).ok());
  // No roots, nothing readable.
  expect_error(open_checkpoint(outside / "m", {}), StatusCode::kNotPermitted, {outside / "m"});
}

TEST_F(OpenCheckpoint, HuggingFaceSnapshotSymlinksIntoBlobs) {
  // The cache layout: snapshots/<commit>/model.safetensors -> ../../blobs/<hash>.
  put("hub/models--org--name/blobs/0123abcd", file_with({"w"}));
  symlink_or_fail("../../blobs/0123abcd",
                  root_ / "hub/models--org--name/snapshots/c0ffee/model.safetensors");
  auto checkpoint = open("hub/models--org--name/snapshots/c0ffee");
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.error().to_string();
  // Paths as found, not the blobs they point to.
  EXPECT_EQ(
      checkpoint->files,
      std::vector<std::string>{root_ / "hub/models--org--name/snapshots/c0ffee/model.safetensors"});
  EXPECT_EQ(checkpoint->tensors.at(0).name, "w");
}

}  // namespace
}  // namespace companion::checkpoint
