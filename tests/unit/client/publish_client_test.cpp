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

#include "client/connection.hpp"
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

// A table larger than one frame holds (200,000 tensors inline) is declared in parts (protocol
// 1.3): 300,000 tensors published, filled, committed and attached, each tensor its own bytes.
TEST_F(ClientPublishTest, ATableOfMoreTensorsThanOneFrameHoldsIsDeclaredInParts) {
  constexpr size_t kCount = 300'000;
  std::vector<TensorDecl> decls;
  decls.reserve(kCount);
  for (size_t i = 0; i < kCount; ++i)
    decls.push_back({"model.layers." + std::to_string(i / 768) + ".mlp.experts." +
                         std::to_string(i % 768) + ".weight",
                     DType::kI32,
                     {1},
                     ""});
  auto client = connect();
  ASSERT_TRUE(client);
  auto p = client->publish("cpp/many", decls, {});
  ASSERT_TRUE(p.ok()) << p.error().to_string();
  ASSERT_EQ((*p)->tensors().size(), kCount);
  for (size_t i = 0; i < kCount; ++i)
    *static_cast<int32_t*>((*p)->tensors()[i].data) = static_cast<int32_t>(i);
  auto committed = (*p)->commit();
  ASSERT_TRUE(committed.ok()) << committed.error().to_string();
  auto m = connect()->attach("cpp/many", {});
  ASSERT_TRUE(m.ok()) << m.error().to_string();
  ASSERT_EQ((*m)->tensors().size(), kCount);
  for (size_t i : {size_t{0}, size_t{199'999}, size_t{200'000}, kCount - 1}) {
    const TensorView* t = (*m)->find(decls[i].name);
    ASSERT_NE(t, nullptr) << decls[i].name;
    EXPECT_EQ(*static_cast<const int32_t*>(t->data), static_cast<int32_t>(i));
  }
}

// Parts of a table are taken only from the connection that claimed the key; a claimed key's
// parts add up to one table.
TEST_F(ClientPublishTest, TablePartsNeedTheClaim) {
  auto conn = client::Connection::open(connect_.socket_path, "parts");
  ASSERT_TRUE(conn.ok()) << conn.error().to_string();
  protocol::PublishDeclare part{"cpp/parts", {{"a", DType::kF32, {4}, ""}}, true};
  auto refused = (*conn)->call(part, 10000);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, StatusCode::kInvalidArgument);
  EXPECT_NE(refused.error().message.find("not claimed"), std::string::npos);

  protocol::PublishClaim claim;
  claim.key = "cpp/parts";
  auto claimed = (*conn)->call(claim, 10000);
  ASSERT_TRUE(claimed.ok()) << claimed.error().to_string();
  auto taken = (*conn)->call(part, 10000);
  ASSERT_TRUE(taken.ok()) << taken.error().to_string();
  EXPECT_TRUE(std::holds_alternative<protocol::Done>(taken->body));
  protocol::PublishDeclare last{"cpp/parts", {{"b", DType::kF32, {4}, "a"}}, false};
  std::vector<UniqueFd> fds;
  auto reply = (*conn)->call(last, 10000, &fds);
  ASSERT_TRUE(reply.ok()) << reply.error().to_string();
  auto* params = std::get_if<protocol::Parameters>(&reply->body);
  ASSERT_NE(params, nullptr);
  EXPECT_TRUE(params->writable);
  EXPECT_EQ(params->model.tensors, 2u);  // "b", an alias of "a" from the earlier part
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
