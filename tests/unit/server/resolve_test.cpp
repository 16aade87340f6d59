// ModelStore::resolve and canonical keys: only absolute paths (or cached hub ids) under the
// model roots, checked specs, keys that name the same thing the same way.
#include <unistd.h>

#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include "common/log.hpp"
#include "server/model_store.hpp"
#include "test_support.hpp"

namespace companion::server {
namespace {

using testing::random_tensor;
using testing::safetensors_file;
using testing::TempDir;

class ResolveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    log::set_level(log::Level::kOff);
    testing::write_file(root / "a/model.safetensors",
                        safetensors_file({random_tensor("w", DType::kF32, {4, 4}, 1)}));
    testing::write_file(outside / "b/model.safetensors",
                        safetensors_file({random_tensor("w", DType::kF32, {4, 4}, 2)}));
    StoreConfig config;
    config.model_roots = {root.path()};
    config.hf_cache = root / "hf";
    config.load_threads = 1;
    store = std::make_unique<ModelStore>(memory::make_host_backend(), config, nullptr);
  }

  static ModelSpec spec(std::string source) {
    ModelSpec s;
    s.source = std::move(source);
    return s;
  }

  void expect_code(const ModelSpec& s, StatusCode code) {
    auto r = store->resolve(s);
    ASSERT_FALSE(r.ok()) << s.describe() << " resolved to " << r->key;
    EXPECT_EQ(r.error().code, code) << s.describe() << ": " << r.error().to_string();
    EXPECT_FALSE(r.error().message.empty());
  }

  TempDir root;
  TempDir outside;
  std::unique_ptr<ModelStore> store;
};

TEST_F(ResolveTest, AbsolutePathUnderRootResolves) {
  auto r = store->resolve(spec(root / "a"));
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->source.path, root / "a");
  EXPECT_EQ(r->key, canonical_key(r->spec, r->source));
  EXPECT_NE(r->key.find("source=" + root / "a"), std::string::npos) << r->key;
  // A single file works as well.
  auto file = store->resolve(spec(root / "a/model.safetensors"));
  ASSERT_TRUE(file.ok()) << file.error().to_string();
  EXPECT_NE(file->key, r->key);
}

TEST_F(ResolveTest, PathOutsideTheRootsIsNotPermitted) {
  expect_code(spec(outside / "b"), StatusCode::kNotPermitted);
  expect_code(spec(outside / "b/model.safetensors"), StatusCode::kNotPermitted);
  expect_code(spec("/"), StatusCode::kNotPermitted);
  // Climbing out with "..", or through a symlink inside the root.
  expect_code(
      spec(root / "a/../../" + std::filesystem::path(outside.path()).filename().string() + "/b"),
      StatusCode::kNotPermitted);
  std::filesystem::create_directory_symlink(outside / "b", root / "link");
  expect_code(spec(root / "link"), StatusCode::kNotPermitted);
}

TEST_F(ResolveTest, MissingIsNotFound) {
  expect_code(spec(root / "nope"), StatusCode::kNotFound);
  expect_code(spec(root / "a/nope.safetensors"), StatusCode::kNotFound);
  // A hub id that is not in the cache.
  expect_code(spec("org/missing"), StatusCode::kNotFound);
}

TEST_F(ResolveTest, RelativePathIsInvalidArgument) {
  expect_code(spec("a"), StatusCode::kInvalidArgument);
  expect_code(spec("./a"), StatusCode::kInvalidArgument);
  expect_code(spec("a/model.safetensors/x"), StatusCode::kInvalidArgument);
  expect_code(spec(""), StatusCode::kInvalidArgument);
}

TEST_F(ResolveTest, TensorParallelShardsResolveToTheirOwnKeys) {
  ModelSpec s = spec(root / "a");
  s.tp_size = 2;
  s.tp_rank = 1;
  auto r1 = store->resolve(s);
  ASSERT_TRUE(r1.ok()) << r1.error().to_string();
  EXPECT_NE(r1->key.find(";tp=1/2"), std::string::npos) << r1->key;
  s.tp_rank = 0;
  auto r0 = store->resolve(s);
  ASSERT_TRUE(r0.ok()) << r0.error().to_string();
  EXPECT_NE(r0->key, r1->key);
  // Shard rules are part of the key, in canonical spelling, escaped so no tag can pose as one.
  s.shard_rules = " *.w = COLUMN ;";
  auto ruled = store->resolve(s);
  ASSERT_TRUE(ruled.ok()) << ruled.error().to_string();
  EXPECT_NE(ruled->key.find(";rules=*.w=column"), std::string::npos) << ruled->key;
  s.shard_rules = "*.w=column";
  EXPECT_EQ(store->resolve(s)->key, ruled->key);
  s.shard_rules = "*.w=column;tag=row";
  EXPECT_NE(store->resolve(s)->key.find("rules=*.w=column%3Btag=row"), std::string::npos);
  s.shard_rules = "*.w=row";
  EXPECT_NE(store->resolve(s)->key, ruled->key);
  s.tp_size = 1;  // one rank: the rules change nothing
  EXPECT_EQ(store->resolve(s)->key.find("rules="), std::string::npos);

  s.shard_rules = "*.w=diagonal";
  expect_code(s, StatusCode::kInvalidArgument);
  s.shard_rules.clear();
  s.tp_size = 1;
  s.tp_rank = 1;
  expect_code(s, StatusCode::kInvalidArgument);
  s.tp_size = 0;
  s.tp_rank = 0;
  expect_code(s, StatusCode::kInvalidArgument);
}

TEST_F(ResolveTest, NonFloatDtypeTargetIsUnknownDtype) {
  for (DType d : {DType::kI32, DType::kU8, DType::kF64, DType::kF8E4M3, DType::kBool}) {
    ModelSpec s = spec(root / "a");
    s.dtype = d;
    expect_code(s, StatusCode::kUnknownDtype);
  }
  for (DType d : {DType::kF16, DType::kBF16, DType::kF32}) {
    ModelSpec s = spec(root / "a");
    s.dtype = d;
    EXPECT_TRUE(store->resolve(s).ok()) << dtype_name(d);
  }
}

TEST_F(ResolveTest, HubIdResolvesInTheCache) {
  std::string commit = "0123456789abcdef0123456789abcdef01234567";
  std::string repo = root / "hf/models--org--name";
  testing::write_file(repo + "/refs/main", commit + "\n");
  testing::write_file(repo + "/snapshots/" + commit + "/model.safetensors",
                      safetensors_file({random_tensor("w", DType::kF16, {8}, 3)}));
  auto r = store->resolve(spec("org/name"));
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->source.path, repo + "/snapshots/" + commit);
  EXPECT_EQ(r->source.hf_commit, commit);
  EXPECT_NE(r->key.find(commit), std::string::npos) << r->key;
  // The snapshot asked for by path is the same model.
  auto by_path = store->resolve(spec(repo + "/snapshots/" + commit));
  ASSERT_TRUE(by_path.ok()) << by_path.error().to_string();
  EXPECT_EQ(by_path->key, r->key);
  // The commit named directly gives the same key.
  ModelSpec by_commit = spec("org/name");
  by_commit.revision = commit;
  auto r2 = store->resolve(by_commit);
  ASSERT_TRUE(r2.ok()) << r2.error().to_string();
  EXPECT_EQ(r2->key, r->key);
}

TEST_F(ResolveTest, CanonicalKeyIsStable) {
  auto a = store->resolve(spec(root / "a"));
  ASSERT_TRUE(a.ok());
  // Other spellings of the same directory give the same key.
  for (std::string other :
       {root.path() + "//a", root.path() + "/./a", root.path() + "/a/", root.path() + "/a/../a"}) {
    auto b = store->resolve(spec(other));
    ASSERT_TRUE(b.ok()) << other << ": " << b.error().to_string();
    EXPECT_EQ(b->key, a->key) << other;
  }
  std::filesystem::create_directory_symlink(root / "a", root / "alias");
  auto alias = store->resolve(spec(root / "alias"));
  ASSERT_TRUE(alias.ok());
  EXPECT_EQ(alias->key, a->key);
  EXPECT_EQ(short_id(alias->key), short_id(a->key));

  // The revision means nothing for a path.
  ModelSpec with_rev = spec(root / "a");
  with_rev.revision = "v1";
  auto rev = store->resolve(with_rev);
  ASSERT_TRUE(rev.ok());
  EXPECT_EQ(rev->key, a->key);

  std::string id = short_id(a->key);
  EXPECT_EQ(id.size(), 12u);
  EXPECT_EQ(id.find_first_not_of("0123456789abcdef"), std::string::npos) << id;
  EXPECT_EQ(short_id(a->key), id);
}

TEST_F(ResolveTest, CanonicalKeyDiffersByDtypeAndTag) {
  auto plain = store->resolve(spec(root / "a"));
  ASSERT_TRUE(plain.ok());
  ModelSpec bf16 = spec(root / "a");
  bf16.dtype = DType::kBF16;
  ModelSpec f16 = spec(root / "a");
  f16.dtype = DType::kF16;
  ModelSpec tagged = spec(root / "a");
  tagged.tag = "cfg1";
  ModelSpec tagged2 = spec(root / "a");
  tagged2.tag = "cfg2";
  // The stored dtype spelled out is still a different request from "as stored".
  ModelSpec f32 = spec(root / "a");
  f32.dtype = DType::kF32;
  std::vector<std::string> keys = {plain->key};
  for (const ModelSpec& s : {bf16, f16, tagged, tagged2, f32}) {
    auto r = store->resolve(s);
    ASSERT_TRUE(r.ok()) << r.error().to_string();
    keys.push_back(r->key);
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    for (size_t j = i + 1; j < keys.size(); ++j) {
      EXPECT_NE(keys[i], keys[j]);
      EXPECT_NE(short_id(keys[i]), short_id(keys[j]));
    }
  }
  EXPECT_NE(keys[1].find("dtype=BF16"), std::string::npos) << keys[1];
  EXPECT_NE(keys[3].find("tag=cfg1"), std::string::npos) << keys[3];
  // Same request again: same key.
  auto again = store->resolve(bf16);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->key, keys[1]);
}

}  // namespace
}  // namespace companion::server
