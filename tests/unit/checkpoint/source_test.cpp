// Model sources: the Hugging Face cache layout, hub ids, and root containment.
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>

#include <gtest/gtest.h>

#include "checkpoint/source.hpp"
#include "test_support.hpp"

namespace companion::checkpoint {
namespace {

using testing::expect_error;
using testing::TempDir;

// Sets or unsets an environment variable for one scope, restoring the old value after.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value)
      ::setenv(name, value, 1);
    else
      ::unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_)
      ::setenv(name_.c_str(), old_->c_str(), 1);
    else
      ::unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

ModelSpec spec(const std::string& source, const std::string& revision = "") {
  ModelSpec s;
  s.source = source;
  s.revision = revision;
  return s;
}

TEST(HfHubCacheDir, EnvironmentPrecedence) {
  ScopedEnv hub("HF_HUB_CACHE", "/x/hub-cache");
  ScopedEnv home("HF_HOME", "/y/hf-home");
  ScopedEnv user_home("HOME", "/z/user");
  EXPECT_EQ(hf_hub_cache_dir(), "/x/hub-cache");
  {
    ScopedEnv no_hub("HF_HUB_CACHE", nullptr);
    EXPECT_EQ(hf_hub_cache_dir(), "/y/hf-home/hub");
    ScopedEnv no_home("HF_HOME", nullptr);
    EXPECT_EQ(hf_hub_cache_dir(), "/z/user/.cache/huggingface/hub");
  }
  ScopedEnv empty_hub("HF_HUB_CACHE", "");  // empty counts as unset
  EXPECT_EQ(hf_hub_cache_dir(), "/y/hf-home/hub");
}

TEST(LooksLikeHfId, AcceptsOrgSlashNameOnly) {
  for (const char* id : {"facebook/opt-125m", "org/name.v2", "a/b", "Org_1/Model-2.5B"})
    EXPECT_TRUE(looks_like_hf_id(id)) << id;
  for (const char* id : {"", "opt", "/abs/path", "a/b/c", "../x", "./x", "a/..", "a/.b", "org/",
                         "/name", "a b/c", "a--b/c", "a/b..c", "a/b/", "a\\b/c", ".a/b"})
    EXPECT_FALSE(looks_like_hf_id(id)) << id;
}

TEST(Roots, ComponentWisePrefix) {
  const std::vector<std::string> roots = {"/a/b", "/srv/models/"};
  EXPECT_TRUE(is_under_roots("/a/b", roots));
  EXPECT_TRUE(is_under_roots("/a/b/c/model.safetensors", roots));
  EXPECT_TRUE(is_under_roots("/srv/models/x", roots));
  EXPECT_TRUE(is_under_roots("/srv/models", roots));
  EXPECT_FALSE(is_under_roots("/a/bc", roots));
  EXPECT_FALSE(is_under_roots("/a/bc/d", roots));
  EXPECT_FALSE(is_under_roots("/a", roots));
  EXPECT_FALSE(is_under_roots("/srv/models-old/x", roots));
  EXPECT_FALSE(is_under_roots("/a/b/../../etc/passwd", roots));
  EXPECT_FALSE(is_under_roots("/a/b/..", roots));
  EXPECT_FALSE(is_under_roots("a/b/c", roots));
  EXPECT_FALSE(is_under_roots("/a/b/c", {}));
  EXPECT_TRUE(is_under_roots("/anything/at/all", {"/"}));
}

TEST(Roots, CanonicalRootsResolveAndDropMissing) {
  TempDir tmp;
  std::filesystem::create_directories(tmp / "real");
  ASSERT_EQ(::symlink((tmp / "real").c_str(), (tmp / "alias").c_str()), 0);
  auto roots =
      canonical_roots({tmp / "alias", tmp / "missing", tmp / "real/", tmp / "real/../real"});
  EXPECT_EQ(roots, std::vector<std::string>{tmp / "real"});
}

TEST(ResolveSource, AbsoluteAndRelativePaths) {
  TempDir tmp;
  testing::write_file(tmp / "models/m/model.safetensors", "x");
  ASSERT_EQ(::symlink((tmp / "models/m").c_str(), (tmp / "m-link").c_str()), 0);
  auto resolved = resolve_source(spec(tmp / "m-link"), tmp / "hub");
  ASSERT_TRUE(resolved.ok()) << resolved.error().to_string();
  EXPECT_EQ(resolved->path, tmp / "models/m");
  EXPECT_TRUE(resolved->hf_repo.empty());
  resolved = resolve_source(spec(tmp / "models/./m/model.safetensors"), tmp / "hub");
  ASSERT_TRUE(resolved.ok()) << resolved.error().to_string();
  EXPECT_EQ(resolved->path, tmp / "models/m/model.safetensors");

  expect_error(resolve_source(spec(tmp / "models/absent"), tmp / "hub"), StatusCode::kNotFound,
               {tmp / "models/absent"});
  for (const char* relative : {"models/m/x", "./m", "m", "../m"})
    expect_error(resolve_source(spec(relative), tmp / "hub"), StatusCode::kInvalidArgument,
                 {relative});
}

class HfCache : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::write_file(repo("refs/main"), "abc123\n");
    testing::write_file(repo("refs/dev"), "  def456 ");
    testing::write_file(repo("refs/broken"), "0000ff\n");  // points at no snapshot
    for (const char* commit : {"abc123", "def456", "fff999"})
      testing::write_file(repo(std::string("snapshots/") + commit + "/model.safetensors"), "x");
  }
  std::string repo(const std::string& rel) const { return repo_dir_ + "/" + rel; }
  std::string snapshot(const std::string& commit) const { return repo("snapshots/" + commit); }

  TempDir cache_;
  std::string repo_dir_ = cache_ / "models--org--name";
};

TEST_F(HfCache, ResolvesRefsAndCommits) {
  struct Case {
    const char* revision;
    const char* commit;
  };
  for (const Case& c : {Case{"", "abc123"}, Case{"main", "abc123"}, Case{"dev", "def456"},
                        Case{"fff999", "fff999"}, Case{"abc123", "abc123"}}) {
    SCOPED_TRACE(c.revision);
    auto resolved = resolve_source(spec("org/name", c.revision), cache_.path());
    ASSERT_TRUE(resolved.ok()) << resolved.error().to_string();
    EXPECT_EQ(resolved->path, snapshot(c.commit));
    EXPECT_EQ(resolved->hf_repo, "org/name");
    EXPECT_EQ(resolved->hf_commit, c.commit);
  }
}

TEST_F(HfCache, MissingModelsAndRevisions) {
  expect_error(resolve_source(spec("org/other"), cache_.path()), StatusCode::kNotFound,
               {"org/other", "not in the local", cache_ / "models--org--other", "never downloads"});
  expect_error(resolve_source(spec("org/name", "v9"), cache_.path()), StatusCode::kNotFound,
               {"org/name@v9", "not in the local", repo_dir_, "never downloads"});
  expect_error(resolve_source(spec("org/name", "broken"), cache_.path()), StatusCode::kNotFound,
               {"org/name@broken"});
  for (const char* revision : {"../../other", "/etc", "main/../dev"})
    expect_error(resolve_source(spec("org/name", revision), cache_.path()),
                 StatusCode::kInvalidArgument, {revision});
}

TEST_F(HfCache, EmptyCacheArgumentMeansTheEnvironmentsCache) {
  ScopedEnv hub("HF_HUB_CACHE", cache_.path().c_str());
  auto resolved = resolve_source(spec("org/name"), "");
  ASSERT_TRUE(resolved.ok()) << resolved.error().to_string();
  EXPECT_EQ(resolved->path, snapshot("abc123"));
}

}  // namespace
}  // namespace companion::checkpoint
