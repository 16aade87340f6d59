// Files written by the reference safetensors library, checked against make_reference.py's
// manifest: names, dtypes, shapes, offsets and the crc32 of the bytes at each file_offset.
#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "checkpoint/checkpoint.hpp"
#include "checkpoint/source.hpp"
#include "test_support.hpp"

namespace companion::checkpoint {
namespace {

using nlohmann::json;
using testing::crc32;
using testing::expect_error;
using testing::TempDir;

class ReferenceFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::reference_dir();
    ASSERT_FALSE(dir_.empty());
    dir_ = std::filesystem::canonical(dir_).string();
    manifest_ = json::parse(testing::read_file(dir_ + "/manifest.json"));
    roots_ = {dir_};
  }

  // crc32 of the bytes pread at the entry's offset.
  static uint32_t crc_at(const std::string& path, const TensorEntry& tensor) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    EXPECT_GE(fd, 0) << path;
    std::string bytes(tensor.nbytes, '\0');
    ssize_t n = ::pread(fd, bytes.data(), bytes.size(), static_cast<off_t>(tensor.file_offset));
    ::close(fd);
    EXPECT_EQ(n, static_cast<ssize_t>(bytes.size())) << path << " " << tensor.name;
    return crc32(bytes.data(), bytes.size());
  }

  static void expect_matches(const json& expected, const TensorEntry& got, uint64_t data_start,
                             const std::string& path) {
    SCOPED_TRACE(path + " tensor " + got.name);
    EXPECT_EQ(got.name, expected["name"].get<std::string>());
    EXPECT_STREQ(dtype_name(got.dtype), expected["dtype"].get<std::string>().c_str());
    EXPECT_EQ(got.shape, expected["shape"].get<std::vector<int64_t>>());
    EXPECT_EQ(got.file_offset, data_start + expected["data_offsets"][0].get<uint64_t>());
    EXPECT_EQ(got.nbytes, expected["nbytes"].get<uint64_t>());
    EXPECT_EQ(crc_at(path, got), expected["crc32"].get<uint32_t>());
  }

  std::string dir_;
  json manifest_;
  std::vector<std::string> roots_;
};

TEST_F(ReferenceFiles, EveryFileParsesAsTheReferenceWroteIt) {
  ASSERT_GE(manifest_["files"].size(), 10u);
  std::set<std::string> dtypes_seen;
  bool saw_scalar = false, saw_empty = false, saw_rank6 = false;
  for (const auto& [rel, expected] : manifest_["files"].items()) {
    SCOPED_TRACE(rel);
    std::string path = dir_ + "/" + rel;
    auto file = read_safetensors_file(path);
    ASSERT_TRUE(file.ok()) << file.error().to_string();
    EXPECT_EQ(file->path, path);
    EXPECT_EQ(file->file_size, expected["file_size"].get<uint64_t>());
    EXPECT_EQ(file->data_start, 8 + expected["header_bytes"].get<uint64_t>());
    EXPECT_EQ(file->metadata, (expected["metadata"].get<std::map<std::string, std::string>>()));
    const json& tensors = expected["tensors"];
    ASSERT_EQ(file->tensors.size(), tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      const TensorEntry& t = file->tensors[i];
      expect_matches(tensors[i], t, file->data_start, path);
      EXPECT_EQ(t.file_index, 0u);
      dtypes_seen.insert(dtype_name(t.dtype));
      saw_scalar = saw_scalar || t.shape.empty();
      saw_empty = saw_empty || t.nbytes == 0;
      saw_rank6 = saw_rank6 || t.shape.size() == 6;
    }
  }
  // The generator must keep covering what the format can hold, or this test proves less.
  for (const char* dtype :
       {"BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64", "I64", "F64"})
    EXPECT_EQ(dtypes_seen.count(dtype), 1u) << dtype << " not covered by the reference files";
  EXPECT_TRUE(saw_scalar);
  EXPECT_TRUE(saw_empty);
  EXPECT_TRUE(saw_rank6);
}

TEST_F(ReferenceFiles, OpensEveryCheckpointLayout) {
  ASSERT_EQ(manifest_["checkpoints"].size(), 3u);
  for (const auto& [name, expected] : manifest_["checkpoints"].items()) {
    SCOPED_TRACE(name);
    auto checkpoint = open_checkpoint(dir_ + "/" + name, roots_);
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.error().to_string();
    EXPECT_EQ(checkpoint->location, dir_ + "/" + name);
    std::vector<std::string> files;
    for (const auto& rel : expected["files"]) files.push_back(dir_ + "/" + rel.get<std::string>());
    EXPECT_EQ(checkpoint->files, files);
    ASSERT_EQ(checkpoint->tensors.size(), expected["tensors"].get<size_t>());
    EXPECT_EQ(checkpoint->total_bytes, expected["total_bytes"].get<uint64_t>());

    // By file, then by offset; each tensor as the manifest describes it in its own file.
    size_t i = 0;
    for (uint32_t f = 0; f < files.size(); ++f) {
      const json& in_file = manifest_["files"][expected["files"][f].get<std::string>()];
      uint64_t data_start = 8 + in_file["header_bytes"].get<uint64_t>();
      for (const json& tensor : in_file["tensors"]) {
        ASSERT_LT(i, checkpoint->tensors.size());
        const TensorEntry& got = checkpoint->tensors[i++];
        EXPECT_EQ(got.file_index, f);
        expect_matches(tensor, got, data_start, files[f]);
      }
    }
    EXPECT_EQ(i, checkpoint->tensors.size());
  }
}

TEST_F(ReferenceFiles, OpensASingleFileByItsPath) {
  std::string path = dir_ + "/opt_like/model.safetensors";
  auto checkpoint = open_checkpoint(path, roots_);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.error().to_string();
  EXPECT_EQ(checkpoint->location, path);
  EXPECT_EQ(checkpoint->files, std::vector<std::string>{path});
  EXPECT_EQ(checkpoint->tensors.size(), 36u);
}

TEST_F(ReferenceFiles, ShardedIndexMustAgreeWithTheShards) {
  TempDir tmp;
  const std::string sharded = dir_ + "/sharded";
  for (const auto& entry : std::filesystem::directory_iterator(sharded))
    std::filesystem::copy(entry.path(), tmp / entry.path().filename().string());
  const std::string index_path = tmp / "model.safetensors.index.json";
  const json index = json::parse(testing::read_file(index_path));
  const std::vector<std::string> roots = {tmp.path()};
  ASSERT_TRUE(open_checkpoint(tmp.path(), roots).ok());

  {  // A tensor the index assigns to the wrong shard.
    json bad = index;
    bad["weight_map"]["model.decoder.embed_tokens.weight"] = "model-00002-of-00003.safetensors";
    testing::write_file(index_path, bad.dump());
    expect_error(open_checkpoint(tmp.path(), roots), StatusCode::kBadCheckpoint,
                 {"model.decoder.embed_tokens.weight", "model-00001-of-00003.safetensors"});
  }
  {  // A tensor the index promises but no shard holds.
    json bad = index;
    bad["weight_map"]["lm_head.weight"] = "model-00003-of-00003.safetensors";
    testing::write_file(index_path, bad.dump());
    expect_error(open_checkpoint(tmp.path(), roots), StatusCode::kBadCheckpoint,
                 {"lm_head.weight", "model-00003-of-00003.safetensors"});
  }
  {  // Without "weight_map".
    testing::write_file(index_path, R"({"metadata": {}})");
    expect_error(open_checkpoint(tmp.path(), roots), StatusCode::kBadCheckpoint, {"weight_map"});
  }
}

}  // namespace
}  // namespace companion::checkpoint
