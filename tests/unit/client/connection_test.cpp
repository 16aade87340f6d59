// The client's Connection shared by threads, against a fake server in this process that answers
// some requests at once and parks others: no request waits behind another's.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "client/connection.hpp"
#include "protocol/frame.hpp"
#include "protocol/messages.hpp"
#include "transport/unix_socket.hpp"

namespace companion::client {
namespace {

using Clock = std::chrono::steady_clock;
using protocol::Message;

// Serves one connection: hello with the given minor, List and Release at once, Load parked
// until answer_parked() (or the end).
class FakeServer {
 public:
  explicit FakeServer(uint16_t minor) : minor_(minor) {
    char pattern[] = "/tmp/companion-conn-test-XXXXXX";
    EXPECT_NE(::mkdtemp(pattern), nullptr);
    dir_ = pattern;
    socket_path_ = dir_ + "/fake.sock";
    auto listener = transport::listen_unix(socket_path_);
    EXPECT_TRUE(listener.ok()) << listener.error().to_string();
    listener_ = std::move(*listener);
    thread_ = std::thread([this] { serve(); });
  }
  ~FakeServer() {
    stop_ = true;
    thread_.join();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  const std::string& socket_path() const { return socket_path_; }
  void answer_parked() { answer_parked_ = true; }
  std::vector<std::string> received() {
    std::lock_guard<std::mutex> lock(mutex_);
    return received_;
  }

 private:
  void reply(int fd, const Message& m) {
    auto payload = protocol::encode(m);
    ASSERT_TRUE(payload.ok());
    ASSERT_TRUE(protocol::send_frame(fd, *payload, {}, 5000).ok());
  }
  // A parked request's client may be gone by the time it is answered (its test ended after
  // the other parked reply): a failed send is not an error of the code under test.
  void reply_if_connected(int fd, const Message& m) {
    auto payload = protocol::encode(m);
    ASSERT_TRUE(payload.ok());
    (void)protocol::send_frame(fd, *payload, {}, 5000);
  }

  void serve() {
    UniqueFd conn;
    while (!stop_ && !conn.valid()) {
      pollfd p{listener_.get(), POLLIN, 0};
      if (::poll(&p, 1, 20) > 0) conn = UniqueFd(::accept4(listener_.get(), nullptr, nullptr, 0));
    }
    protocol::FrameReader reader;
    std::vector<uint64_t> parked;
    while (!stop_) {
      if (answer_parked_) {
        for (uint64_t id : parked)
          reply_if_connected(conn.get(), Message{id, protocol::LoadReply{}});
        parked.clear();
      }
      auto frame = protocol::receive_frame(conn.get(), reader, 20);
      if (!frame.ok()) {
        if (frame.error().code == StatusCode::kTimeout) continue;
        return;
      }
      auto m = protocol::decode(std::move(frame->payload));
      ASSERT_TRUE(m.ok());
      {
        std::lock_guard<std::mutex> lock(mutex_);
        received_.push_back(protocol::body_name(m->body));
      }
      if (std::holds_alternative<protocol::Hello>(m->body)) {
        protocol::HelloReply h;
        h.major = kProtocolMajor;
        h.minor = minor_;
        reply(conn.get(), Message{m->request_id, h});
      } else if (std::holds_alternative<protocol::Load>(m->body)) {
        parked.push_back(m->request_id);
      } else if (auto* r = std::get_if<protocol::Release>(&m->body)) {
        reply(conn.get(), Message{m->request_id, protocol::Released{r->lease_id}});
      } else if (std::holds_alternative<protocol::List>(m->body)) {
        reply(conn.get(), Message{m->request_id, protocol::ListReply{}});
      }
    }
  }

  uint16_t minor_;
  std::string dir_;
  std::string socket_path_;
  UniqueFd listener_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> answer_parked_{false};
  std::mutex mutex_;
  std::vector<std::string> received_;
  std::thread thread_;
};

// Thread A waits for a long load; thread B, on the same connection, releases a lease and lists:
// both return at once instead of waiting for A's reply.
TEST(ClientConnection, ReleaseAndCallDoNotWaitBehindAParkedRequest) {
  FakeServer server(kProtocolMinor);
  auto connection = Connection::open(server.socket_path(), "test");
  ASSERT_TRUE(connection.ok()) << connection.error().to_string();
  auto c = *connection;
  std::atomic<bool> a_done{false};
  std::thread a([&] {
    auto r = c->call(protocol::Load{ModelSpec{}, true}, 20000);
    EXPECT_TRUE(r.ok()) << r.error().to_string();
    if (r.ok()) {
      EXPECT_TRUE(std::holds_alternative<protocol::LoadReply>(r->body));
    }
    a_done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // A is waiting (and reading)
  auto start = Clock::now();
  ASSERT_TRUE(c->send(protocol::Release{42}).ok());
  auto listed = c->call(protocol::List{}, 10000);
  auto waited = Clock::now() - start;
  ASSERT_TRUE(listed.ok()) << listed.error().to_string();
  EXPECT_TRUE(std::holds_alternative<protocol::ListReply>(listed->body));
  EXPECT_LT(waited, std::chrono::seconds(2));
  EXPECT_FALSE(a_done);  // A still waits for its own reply
  server.answer_parked();
  a.join();
  EXPECT_TRUE(a_done);
  // The release reached the server, and its late Released reply disturbed nobody.
  auto seen = server.received();
  EXPECT_NE(std::find(seen.begin(), seen.end(), "Release"), seen.end());
  auto again = c->call(protocol::List{}, 5000);
  EXPECT_TRUE(again.ok());
}

// Many threads calling at once each get their own reply.
TEST(ClientConnection, ConcurrentCallsGetTheirOwnReplies) {
  FakeServer server(kProtocolMinor);
  auto connection = Connection::open(server.socket_path(), "test");
  ASSERT_TRUE(connection.ok()) << connection.error().to_string();
  auto c = *connection;
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        uint64_t lease = static_cast<uint64_t>(t * 1000 + i);
        auto r = c->call(protocol::Release{lease}, 5000);
        auto* released = r.ok() ? std::get_if<protocol::Released>(&r->body) : nullptr;
        if (released != nullptr && released->lease_id == lease) ++ok;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 8 * 50);
}

// A call whose deadline passes while another thread reads returns kTimeout on time.
TEST(ClientConnection, TimeoutWhileAnotherThreadReads) {
  FakeServer server(kProtocolMinor);
  auto connection = Connection::open(server.socket_path(), "test");
  ASSERT_TRUE(connection.ok()) << connection.error().to_string();
  auto c = *connection;
  std::thread a([&] { (void)c->call(protocol::Load{ModelSpec{}, true}, 3000); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  auto start = Clock::now();
  auto r = c->call(protocol::Load{ModelSpec{}, true}, 300);
  auto waited = Clock::now() - start;
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kTimeout);
  EXPECT_LT(waited, std::chrono::milliseconds(1500));
  server.answer_parked();
  a.join();
}

// A 1.0 server may not know only_if_held or shard rules and would silently ignore them: such
// requests are refused with kVersionMismatch before they are sent; plain ones still go.
TEST(ClientConnection, FieldsAnOldMinorMayNotKnowAreRefused) {
  FakeServer server(0);
  auto connection = Connection::open(server.socket_path(), "test");
  ASSERT_TRUE(connection.ok()) << connection.error().to_string();
  auto c = *connection;
  EXPECT_EQ(c->server_minor(), 0);
  protocol::GetParameters held;
  held.spec.source = "/m";
  held.only_if_held = true;
  auto r = c->call(held, 2000);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kVersionMismatch) << r.error().to_string();
  EXPECT_NE(r.error().message.find("only_if_held"), std::string::npos) << r.error().message;
  ModelSpec sharded;
  sharded.source = "/m";
  sharded.shard_rules = "*.weight=row";
  auto l = c->call(protocol::Load{sharded, false}, 2000);
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.error().code, StatusCode::kVersionMismatch) << l.error().to_string();
  auto reload = c->call(protocol::Reload{"k", false}, 2000);
  ASSERT_FALSE(reload.ok());
  EXPECT_EQ(reload.error().code, StatusCode::kVersionMismatch);
  // Nothing of the refused requests reached the server; a plain request still works.
  auto listed = c->call(protocol::List{}, 2000);
  ASSERT_TRUE(listed.ok()) << listed.error().to_string();
  auto seen = server.received();
  EXPECT_EQ(std::count(seen.begin(), seen.end(), "GetParameters"), 0);
  EXPECT_EQ(std::count(seen.begin(), seen.end(), "Load"), 0);
  EXPECT_EQ(std::count(seen.begin(), seen.end(), "Reload"), 0);
}

// A server before 1.3 would take an offload for an unload, and a load by key for one by an
// empty spec: both are refused before they are sent.
TEST(ClientConnection, HostTierRequestsNeedMinorThree) {
  FakeServer server(2);
  auto connection = Connection::open(server.socket_path(), "test");
  ASSERT_TRUE(connection.ok()) << connection.error().to_string();
  auto c = *connection;
  protocol::Unload offload;
  offload.key = "5f3a9c";
  offload.to_host = true;
  auto r = c->call(offload, 2000);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kVersionMismatch) << r.error().to_string();
  EXPECT_NE(r.error().message.find("offload"), std::string::npos) << r.error().message;
  protocol::Load by_key;
  by_key.key = "5f3a9c";
  auto l = c->call(by_key, 2000);
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.error().code, StatusCode::kVersionMismatch) << l.error().to_string();
  ASSERT_TRUE(c->call(protocol::List{}, 2000).ok());
  auto seen = server.received();
  EXPECT_EQ(std::count(seen.begin(), seen.end(), "Unload"), 0);
  EXPECT_EQ(std::count(seen.begin(), seen.end(), "Load"), 0);
}

// The same requests go to a current server.
TEST(ClientConnection, ACurrentMinorTakesThem) {
  FakeServer server(kProtocolMinor);
  auto connection = Connection::open(server.socket_path(), "test");
  ASSERT_TRUE(connection.ok()) << connection.error().to_string();
  ModelSpec sharded;
  sharded.source = "/m";
  sharded.shard_rules = "*.weight=row";
  ASSERT_TRUE((*connection)->send(protocol::Load{sharded, false}).ok());
  auto listed = (*connection)->call(protocol::List{}, 2000);
  ASSERT_TRUE(listed.ok());
  auto seen = server.received();
  EXPECT_EQ(std::count(seen.begin(), seen.end(), "Load"), 1);
}

}  // namespace
}  // namespace companion::client
