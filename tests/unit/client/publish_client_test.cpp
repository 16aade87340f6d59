// The C++ client's publishing API against a real server running in this process: publish and
// attach, attach_or_publish across threads (one build), a failed build handing the key over.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "common/log.hpp"
#include "companion/client.hpp"
#include "server/server.hpp"

namespace companion {
namespace {

class ClientPublishTest : public ::testing::Test {
 protected:
  void SetUp() override {
    log::set_level(log::Level::kOff);
    char pattern[] = "/tmp/companion-client-test-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    dir_ = pattern;
    server::ServerOptions options;
    options.device = "host";
    options.runtime_dir = dir_;
    options.model_roots = {dir_};
    options.socket_path = dir_ + "/server.sock";
    options.memory_reserve = "0";
    auto created = server::Server::create(options);
    ASSERT_TRUE(created.ok()) << created.error().to_string();
    server_ = std::move(*created);
    thread_ = std::thread([this] { (void)server_->run(); });
    connect_.socket_path = options.socket_path;
  }

  void TearDown() override {
    if (server_) server_->stop();
    if (thread_.joinable()) thread_.join();
    server_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::unique_ptr<Client> connect() {
    auto client = Client::connect(connect_);
    EXPECT_TRUE(client.ok()) << client.error().to_string();
    return client.ok() ? std::move(*client) : nullptr;
  }

  static std::vector<TensorDecl> table() {
    return {{"w", DType::kF32, {256}, ""}, {"tied", DType::kF32, {256}, "w"}};
  }

  static Result<void> fill(Publication& p, float value) {
    const WritableTensor* w = p.find("w");
    if (w == nullptr) return make_error(StatusCode::kInternal, "no tensor w");
    auto* data = static_cast<float*>(w->data);
    for (size_t i = 0; i < 256; ++i) data[i] = value + static_cast<float>(i);
    return ok_result();
  }

  static float first(const MappedModel& m, const char* name) {
    const TensorView* t = m.find(name);
    return t == nullptr ? -1.0f : *static_cast<const float*>(t->data);
  }

  std::string dir_;
  std::unique_ptr<server::Server> server_;
  std::thread thread_;
  ConnectOptions connect_;
};

TEST_F(ClientPublishTest, PublishThenAttachWithTheFingerprint) {
  auto client = connect();
  ASSERT_TRUE(client);
  auto decls = table();
  auto p = client->publish("cpp/basic", decls, {{"engine", "cpp"}});
  ASSERT_TRUE(p.ok()) << p.error().to_string();
  EXPECT_EQ((*p)->generation(), 1u);
  ASSERT_TRUE(fill(**p, 3.0f).ok());
  EXPECT_EQ((*p)->find("tied")->data, (*p)->find("w")->data);
  auto committed = (*p)->commit();
  ASSERT_TRUE(committed.ok()) << committed.error().to_string();
  EXPECT_EQ(first(**committed, "w"), 3.0f);
  EXPECT_TRUE((*committed)->read_only());  // the writer's own mapping, remapped read-only
  EXPECT_FALSE((*p)->commit().ok());       // once

  AttachOptions options;
  options.fingerprint = Fingerprint{{"engine", "cpp"}};
  auto reader = connect();
  auto m = reader->attach("cpp/basic", options);
  ASSERT_TRUE(m.ok()) << m.error().to_string();
  EXPECT_EQ(first(**m, "tied"), 3.0f);
  EXPECT_TRUE((*m)->status().published);
  EXPECT_TRUE((*m)->read_only());
  options.fingerprint = Fingerprint{{"engine", "other"}};
  EXPECT_EQ(reader->attach("cpp/basic", options).error().code, StatusCode::kFingerprintMismatch);
}

TEST_F(ClientPublishTest, AttachOrPublishBuildsOnceAcrossThreads) {
  std::atomic<int> builds{0};
  std::atomic<int> ok{0};
  std::atomic<int> right_bytes{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 6; ++i) {
    threads.emplace_back([&] {
      auto client = connect();
      if (!client) return;
      auto m = client->attach_or_publish(
          "cpp/once", {{"v", "1"}}, [] { return Result<std::vector<TensorDecl>>(table()); },
          [&](Publication& p) {
            ++builds;
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
            return fill(p, 9.0f);
          },
          20);
      if (!m.ok()) return;
      ++ok;
      if (first(**m, "w") == 9.0f && first(**m, "tied") == 9.0f) ++right_bytes;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(builds.load(), 1);
  EXPECT_EQ(ok.load(), 6);
  EXPECT_EQ(right_bytes.load(), 6);
  auto client = connect();
  auto wrong = client->attach_or_publish(
      "cpp/once", {{"v", "2"}}, [] { return Result<std::vector<TensorDecl>>(table()); },
      [](Publication&) { return ok_result(); }, 5);
  EXPECT_EQ(wrong.error().code, StatusCode::kFingerprintMismatch);
}

TEST_F(ClientPublishTest, AFailedBuildGivesTheKeyToTheNextCaller) {
  auto client = connect();
  auto failed = client->attach_or_publish(
      "cpp/retry", {}, [] { return Result<std::vector<TensorDecl>>(table()); },
      [](Publication&) -> Result<void> {
        return make_error(StatusCode::kInternal, "build failed");
      },
      5);
  EXPECT_EQ(failed.error().code, StatusCode::kInternal);
  auto list = client->list();
  ASSERT_TRUE(list.ok());
  EXPECT_TRUE(list->empty());  // the aborted publication left nothing
  auto second = client->attach_or_publish(
      "cpp/retry", {}, [] { return Result<std::vector<TensorDecl>>(table()); },
      [](Publication& p) { return fill(p, 5.0f); }, 5);
  ASSERT_TRUE(second.ok()) << second.error().to_string();
  EXPECT_EQ(first(**second, "w"), 5.0f);
}

}  // namespace
}  // namespace companion
