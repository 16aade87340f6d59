// The etcd client, announcer and directory against a real etcd (Debian's etcd-server) started on
// free loopback ports for each test; plus the pure parts (base64, URLs, key ranges).
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/base64.hpp"
#include "common/util.hpp"
#include "registry/etcd_client.hpp"
#include "registry/etcd_registry.hpp"
#include "registry/registry.hpp"

namespace companion::registry {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

template <typename F>
bool eventually(F&& predicate, milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    if (predicate()) return true;
    std::this_thread::sleep_for(milliseconds(50));
  }
  return predicate();
}

// A real etcd process with its data in a directory of its own.
class EtcdProcess {
 public:
  EtcdProcess() : client_port_(free_port()), peer_port_(free_port()) {
    char tmpl[] = "/tmp/companion_etcd_test_XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    start();
  }
  ~EtcdProcess() {
    stop(SIGKILL);
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(client_port_); }
  std::string url() const { return "etcd://127.0.0.1:" + std::to_string(client_port_); }

  void start(bool fresh = false) {
    if (fresh) {
      std::error_code ec;
      fs::remove_all(dir_ + "/data", ec);
    }
    std::string client = endpoint();
    std::string peer = "http://127.0.0.1:" + std::to_string(peer_port_);
    std::string log = dir_ + "/etcd.log";
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      FILE* out = std::freopen(log.c_str(), "a", stdout);
      FILE* err = std::freopen(log.c_str(), "a", stderr);
      (void)out;
      (void)err;
      std::string data = dir_ + "/data";
      std::string cluster = "test=" + peer;
      ::execl("/usr/bin/etcd", "etcd", "--name", "test", "--data-dir", data.c_str(),
              "--listen-client-urls", client.c_str(), "--advertise-client-urls", client.c_str(),
              "--listen-peer-urls", peer.c_str(), "--initial-advertise-peer-urls", peer.c_str(),
              "--initial-cluster", cluster.c_str(), "--log-level", "warn", nullptr);
      ::_exit(127);
    }
    EtcdClient probe({endpoint()}, 500);
    // Any answer will do: with authentication enabled, etcd answers by refusing.
    ready_ = eventually(
        [&] {
          auto r = probe.range_prefix("/probe");
          return r.ok() || r.error().code != StatusCode::kUnavailable;
        },
        milliseconds(20000));
  }

  void stop(int sig = SIGTERM) {
    if (pid_ <= 0) return;
    ::kill(pid_, sig);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  bool ready() const { return ready_; }
  const std::string& dir() const { return dir_; }

 private:
  int client_port_;
  int peer_port_;
  std::string dir_;
  pid_t pid_ = -1;
  bool ready_ = false;
};

class EtcdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::access("/usr/bin/etcd", X_OK) != 0) GTEST_SKIP() << "etcd-server is not installed";
    etcd_ = std::make_unique<EtcdProcess>();
    ASSERT_TRUE(etcd_->ready()) << "etcd did not start";
  }
  std::unique_ptr<EtcdProcess> etcd_;
};

ServerIdentity sample_record(const std::string& id) {
  ServerIdentity r;
  r.instance_id = id;
  r.ns = "unit";
  r.component = "model_server_host";
  r.hostname = hostname();
  r.pid = 1234;
  r.device = "host";
  r.socket_path = "/tmp/" + id + ".sock";
  r.started_at_ms = unix_time_ms();
  return r;
}

// ---- pure parts --------------------------------------------------------------------------------

TEST(Base64, MatchesRfc4648Vectors) {
  const std::pair<const char*, const char*> vectors[] = {{"", ""},
                                                         {"f", "Zg=="},
                                                         {"fo", "Zm8="},
                                                         {"foo", "Zm9v"},
                                                         {"foob", "Zm9vYg=="},
                                                         {"fooba", "Zm9vYmE="},
                                                         {"foobar", "Zm9vYmFy"}};
  for (auto [plain, encoded] : vectors) {
    EXPECT_EQ(base64_encode(plain), encoded);
    EXPECT_EQ(base64_decode(encoded), std::optional<std::string>(plain));
  }
}

TEST(Base64, RoundTripsEveryByteAndRefusesMalformedText) {
  std::string bytes;
  for (int i = 0; i < 256; ++i) bytes += static_cast<char>(i);
  for (size_t n = 0; n <= bytes.size(); n += 7)
    EXPECT_EQ(base64_decode(base64_encode(bytes.substr(0, n))), bytes.substr(0, n));
  for (const char* bad : {"Zg=", "Zm9", "Z===", "Zh==", "Zm9v!A==", "=Zm9", "Zm=v"})
    EXPECT_FALSE(base64_decode(bad).has_value()) << bad;
}

TEST(EtcdUrl, ParsesEndpointsAndRefusesTheRest) {
  auto one = parse_etcd_endpoints("etcd://127.0.0.1:2379");
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(*one, std::vector<std::string>{"http://127.0.0.1:2379"});
  auto two = parse_etcd_endpoints("etcd://a.example:2379,[::1]:23790");
  ASSERT_TRUE(two.ok()) << two.error().message;
  EXPECT_EQ(*two, (std::vector<std::string>{"http://a.example:2379", "http://[::1]:23790"}));
  for (const char* bad :
       {"http://x:1", "etcd://", "etcd://host", "etcd://host:", "etcd://:80", "etcd://h:0",
        "etcd://h:65536", "etcd://h:12x", "etcd://h:1,", "etcd://h:1/path", "etcd://user@h:1"})
    EXPECT_EQ(parse_etcd_endpoints(bad).error().code, StatusCode::kInvalidArgument) << bad;
}

TEST(EtcdUrl, PrefixRangeEndCoversThePrefixOnly) {
  EXPECT_EQ(prefix_range_end("/services/"), "/services0");
  EXPECT_EQ(prefix_range_end(std::string("a\xff", 2)), "b");
  EXPECT_EQ(prefix_range_end(std::string("\xff", 1)), std::string(1, '\0'));
}

TEST(RegistryChoice, LocalByDefaultEtcdByUrlOrEnvironment) {
  ::unsetenv("COMPANION_REGISTRY");
  auto local = choose_registry("");
  ASSERT_TRUE(local.ok());
  EXPECT_FALSE(local->is_etcd());
  EXPECT_EQ(local->url, "local");
  EXPECT_FALSE(choose_registry("local")->is_etcd());
  auto etcd = choose_registry("etcd://h:1,g:2");
  ASSERT_TRUE(etcd.ok());
  EXPECT_EQ(etcd->etcd_endpoints.size(), 2u);
  ::setenv("COMPANION_REGISTRY", "etcd://envhost:7", 1);
  EXPECT_EQ(choose_registry("")->etcd_endpoints, std::vector<std::string>{"http://envhost:7"});
  EXPECT_FALSE(choose_registry("local")->is_etcd()) << "an explicit choice wins";
  ::unsetenv("COMPANION_REGISTRY");
  EXPECT_EQ(choose_registry("consul://x:1").error().code, StatusCode::kInvalidArgument);
}

TEST(EtcdKeys, LayoutIsServicesNamespaceComponentInstance) {
  auto r = sample_record("abc123");
  EXPECT_EQ(etcd_key_for(r), "/services/unit/model_server_host/abc123");
  EXPECT_EQ(etcd_namespace_prefix("unit"), "/services/unit/");
}

TEST(EtcdClientOffline, UnreachableEtcdIsUnavailableWithinTheTimeout) {
  EtcdClient etcd({"http://127.0.0.1:" + std::to_string(free_port())}, 300);
  auto t0 = Clock::now();
  auto r = etcd.range_prefix("/x");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kUnavailable);
  EXPECT_NE(r.error().message.find("127.0.0.1"), std::string::npos) << r.error().message;
  EXPECT_LT(Clock::now() - t0, milliseconds(2000));
}

// ---- against etcd ------------------------------------------------------------------------------

TEST_F(EtcdTest, KeyValueOperations) {
  EtcdClient etcd({etcd_->endpoint()});
  ASSERT_TRUE(etcd.put("/t/a", "1").ok());
  ASSERT_TRUE(etcd.put("/t/b", std::string("two\0bytes", 9)).ok());
  ASSERT_TRUE(etcd.put("/u/c", "3").ok());
  auto range = etcd.range_prefix("/t/");
  ASSERT_TRUE(range.ok()) << range.error().message;
  ASSERT_EQ(range->kvs.size(), 2u);
  EXPECT_EQ(range->kvs[0].key, "/t/a");
  EXPECT_EQ(range->kvs[1].value, std::string("two\0bytes", 9));
  EXPECT_GT(range->revision, 0);
  auto got = etcd.get("/u/c");
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_EQ((*got)->value, "3");
  EXPECT_FALSE(etcd.get("/nothing")->has_value());
  EXPECT_EQ(*etcd.delete_key("/t/a"), 1);
  EXPECT_EQ(etcd.range_prefix("/t/")->kvs.size(), 1u);
}

TEST_F(EtcdTest, LeasesKeepKeysAliveUntilRevokedOrExpired) {
  EtcdClient etcd({etcd_->endpoint()});
  auto lease = etcd.grant(2);
  ASSERT_TRUE(lease.ok()) << lease.error().message;
  ASSERT_TRUE(etcd.put("/l/kept", "x", *lease).ok());
  EXPECT_EQ((*etcd.get("/l/kept"))->lease, *lease);
  auto ttl = etcd.keepalive(*lease);
  ASSERT_TRUE(ttl.ok());
  EXPECT_GT(*ttl, 0);
  ASSERT_TRUE(etcd.revoke(*lease).ok());
  EXPECT_FALSE(etcd.get("/l/kept")->has_value()) << "revoking deletes the lease's keys";
  EXPECT_EQ(*etcd.keepalive(*lease), 0) << "a revoked lease is gone";
  EXPECT_EQ(etcd.put("/l/late", "x", *lease).error().code, StatusCode::kNotFound);

  auto short_lease = etcd.grant(1);
  ASSERT_TRUE(etcd.put("/l/expiring", "x", *short_lease).ok());
  EXPECT_TRUE(
      eventually([&] { return !etcd.get("/l/expiring")->has_value(); }, milliseconds(4000)));
}

TEST_F(EtcdTest, RequestsMoveOnToTheNextEndpoint) {
  std::string dead = "http://127.0.0.1:" + std::to_string(free_port());
  EtcdClient etcd({dead, etcd_->endpoint()}, 500);
  ASSERT_TRUE(etcd.put("/e/k", "v").ok());
  EXPECT_EQ(etcd.endpoint(), etcd_->endpoint());
}

TEST_F(EtcdTest, WatchStreamsPutsAndDeletesAndStopsAtOnce) {
  EtcdClient etcd({etcd_->endpoint()});
  auto start = etcd.range_prefix("/w/");
  ASSERT_TRUE(start.ok());
  EtcdWatch watch(etcd_->endpoint(), "/w/", start->revision + 1);
  std::mutex mutex;
  std::vector<EtcdEvent> seen;
  std::atomic<bool> created{false};
  Result<void> result = ok_result();
  std::thread runner([&] {
    result = watch.run(
        [&](const std::vector<EtcdEvent>& events, int64_t) {
          std::lock_guard<std::mutex> lock(mutex);
          seen.insert(seen.end(), events.begin(), events.end());
        },
        [&] { created = true; });
  });
  ASSERT_TRUE(eventually([&] { return created.load(); }, milliseconds(5000)));
  ASSERT_TRUE(etcd.put("/w/a", "1").ok());
  ASSERT_TRUE(etcd.put("/outside", "1").ok());
  ASSERT_TRUE(etcd.delete_key("/w/a").ok());
  ASSERT_TRUE(eventually(
      [&] {
        std::lock_guard<std::mutex> lock(mutex);
        return seen.size() >= 2;
      },
      milliseconds(5000)));
  auto t0 = Clock::now();
  watch.stop();
  runner.join();
  EXPECT_LT(Clock::now() - t0, milliseconds(500)) << "stop() must not wait for a poll timeout";
  EXPECT_TRUE(result.ok());
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_FALSE(seen[0].deleted);
  EXPECT_EQ(seen[0].kv.key, "/w/a");
  EXPECT_EQ(seen[0].kv.value, "1");
  EXPECT_TRUE(seen[1].deleted);
  EXPECT_EQ(seen[1].kv.key, "/w/a");
}

TEST_F(EtcdTest, WatchEndsUnavailableWhenEtcdGoesAway) {
  EtcdWatch watch(etcd_->endpoint(), "/w/", 0);
  std::atomic<bool> created{false};
  Result<void> result = ok_result();
  std::thread runner([&] { result = watch.run([](auto&, int64_t) {}, [&] { created = true; }); });
  ASSERT_TRUE(eventually([&] { return created.load(); }, milliseconds(5000)));
  etcd_->stop(SIGKILL);
  runner.join();
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.error().code, StatusCode::kUnavailable);
}

TEST_F(EtcdTest, AnnouncerRegistersRenewsAndRegistersAgainAfterDataLoss) {
  auto record = sample_record("announced1");
  std::string key = etcd_key_for(record);
  EtcdClient etcd({etcd_->endpoint()});
  {
    EtcdAnnouncer announcer({etcd_->endpoint()}, record, 1);
    ASSERT_TRUE(announcer.wait_registered(milliseconds(5000)));
    auto stored = etcd.get(key);
    ASSERT_TRUE(stored.ok() && stored->has_value());
    EXPECT_EQ(record_from_json((*stored)->value)->instance_id, "announced1");
    EXPECT_EQ((*stored)->lease, announcer.state().lease_id);
    // Renewed: still there after several TTLs.
    std::this_thread::sleep_for(milliseconds(2500));
    EXPECT_TRUE(etcd.get(key)->has_value());
    EXPECT_EQ(announcer.state().registrations, 1u);

    etcd_->stop(SIGKILL);
    EXPECT_TRUE(eventually([&] { return !announcer.state().registered; }, milliseconds(5000)));
    EXPECT_FALSE(announcer.state().last_error.empty());
    etcd_->start(/*fresh=*/true);
    ASSERT_TRUE(etcd_->ready());
    EXPECT_TRUE(eventually([&] { return announcer.state().registered; }, milliseconds(8000)));
    EXPECT_EQ(announcer.state().registrations, 2u);
    EXPECT_TRUE(etcd.get(key)->has_value());
  }
  EXPECT_FALSE(etcd.get(key)->has_value()) << "destruction revokes the lease";
}

TEST_F(EtcdTest, AnnouncerPutsBackARecordDeletedWhileEtcdWasAway) {
  auto record = sample_record("announced2");
  std::string key = etcd_key_for(record);
  EtcdClient etcd({etcd_->endpoint()});
  EtcdAnnouncer announcer({etcd_->endpoint()}, record, 3);
  ASSERT_TRUE(announcer.wait_registered(milliseconds(5000)));
  etcd_->stop(SIGKILL);
  ASSERT_TRUE(eventually([&] { return !announcer.state().registered; }, milliseconds(5000)));
  etcd_->start();
  ASSERT_TRUE(etcd_->ready());
  ASSERT_TRUE(etcd.delete_key(key).ok());
  // Whether the announcer noticed the outage's end before or after the deletion, it puts the
  // record back within a renewal or two.
  EXPECT_TRUE(eventually([&] { return etcd.get(key)->has_value(); }, milliseconds(8000)));
  // The key shows up a moment before the announcer records the success.
  EXPECT_TRUE(eventually([&] { return announcer.state().registered; }, milliseconds(1000)));
}

TEST_F(EtcdTest, DirectoryFollowsTheNamespaceAndKeepsWhatItSawWhileEtcdIsAway) {
  EtcdClient etcd({etcd_->endpoint()});
  auto a = sample_record("dir_a");
  ASSERT_TRUE(etcd.put(etcd_key_for(a), record_to_json(a)).ok());
  ASSERT_TRUE(etcd.put("/services/unit/model_server_host/bad", "not a record").ok());
  auto elsewhere = sample_record("dir_other_ns");
  elsewhere.ns = "other";
  ASSERT_TRUE(etcd.put(etcd_key_for(elsewhere), record_to_json(elsewhere)).ok());

  EtcdDirectory directory({etcd_->endpoint()}, "unit");
  auto snap = directory.snapshot();
  ASSERT_TRUE(snap.synced);
  ASSERT_EQ(snap.records.size(), 1u);
  EXPECT_EQ(snap.records[0].instance_id, "dir_a");

  auto b = sample_record("dir_b");
  ASSERT_TRUE(etcd.put(etcd_key_for(b), record_to_json(b)).ok());
  auto has = [](const std::string& id) {
    return [id](const ServerIdentity& r) { return r.instance_id == id; };
  };
  EXPECT_EQ(directory.wait_for(has("dir_b"), milliseconds(5000)).records.size(), 2u);
  ASSERT_TRUE(etcd.delete_key(etcd_key_for(a)).ok());
  EXPECT_TRUE(
      eventually([&] { return directory.snapshot().records.size() == 1; }, milliseconds(5000)));

  etcd_->stop(SIGKILL);
  EXPECT_TRUE(eventually([&] { return !directory.snapshot().live; }, milliseconds(5000)));
  snap = directory.snapshot();
  ASSERT_EQ(snap.records.size(), 1u) << "the records last seen stay";
  EXPECT_EQ(snap.records[0].instance_id, "dir_b");

  etcd_->start(/*fresh=*/true);
  ASSERT_TRUE(etcd_->ready());
  auto c = sample_record("dir_c");
  ASSERT_TRUE(etcd.put(etcd_key_for(c), record_to_json(c)).ok());
  EXPECT_TRUE(eventually(
      [&] {
        auto s = directory.snapshot();
        return s.live && s.records.size() == 1 && s.records[0].instance_id == "dir_c";
      },
      milliseconds(8000)))
      << "resynced from the new etcd: dir_b is gone with the old data";
}

TEST(EtcdDirectoryOffline, NeverSyncedUntilEtcdAnswers) {
  auto t0 = Clock::now();
  EtcdDirectory directory({"http://127.0.0.1:" + std::to_string(free_port())}, "unit", 300);
  auto snap = directory.snapshot();
  EXPECT_FALSE(snap.synced);
  EXPECT_TRUE(snap.records.empty());
  EXPECT_FALSE(snap.last_error.empty());
  EXPECT_LT(Clock::now() - t0, milliseconds(2000));
}

}  // namespace
}  // namespace companion::registry

namespace companion::registry {
namespace {

// Enables authentication with user root, whose password is the first line of password_file
// (given to etcdctl on stdin: never on a command line).
bool enable_root_auth(const std::string& endpoint, const std::string& password_file) {
  const std::string ctl = "etcdctl --endpoints=" + endpoint + " ";
  for (const std::string& command :
       {ctl + "user add root --interactive=false < " + password_file, ctl + "role add root",
        ctl + "user grant-role root root", ctl + "auth enable"}) {
    if (std::system((command + " > /dev/null 2>&1").c_str()) != 0) return false;
  }
  return true;
}

TEST_F(EtcdTest, AuthenticatesAndAuthenticatesAgainWhenItsTokenIsRefused) {
  if (::access("/usr/bin/etcdctl", X_OK) != 0) GTEST_SKIP() << "etcd-client is not installed";
  const std::string password = etcd_->dir() + "/password";
  const std::string wrong = etcd_->dir() + "/wrong";
  ASSERT_TRUE(write_file_atomic(password, "unit-secret\n", 0600).ok());
  ASSERT_TRUE(write_file_atomic(wrong, "not-it\n", 0600).ok());
  ASSERT_TRUE(enable_root_auth(etcd_->endpoint(), password));

  EtcdSecurity security;
  security.user = "root";
  security.password_file = password;
  EtcdClient etcd({etcd_->endpoint()}, 1500, security);
  ASSERT_TRUE(etcd.put("/auth/a", "1").ok());
  const std::string first_token = etcd.token();
  EXPECT_FALSE(first_token.empty());

  // etcd's simple tokens live in its memory: after a restart the old one is refused, and the
  // client authenticates again by itself.
  etcd_->stop();
  etcd_->start();
  ASSERT_TRUE(etcd_->ready());
  auto got = etcd.get("/auth/a");
  ASSERT_TRUE(got.ok()) << got.error().message;
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->value, "1");
  EXPECT_NE(etcd.token(), first_token);

  // A wrong password, and no user at all: refused, typed.
  EtcdSecurity bad = security;
  bad.password_file = wrong;
  EtcdClient refused({etcd_->endpoint()}, 1500, bad);
  auto r = refused.get("/auth/a");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kNotPermitted);
  EXPECT_NE(r.error().message.find("etcd refused user 'root'"), std::string::npos)
      << r.error().message;
  EtcdClient anonymous({etcd_->endpoint()});
  auto a = anonymous.get("/auth/a");
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.error().code, StatusCode::kNotPermitted) << a.error().message;
}

}  // namespace
}  // namespace companion::registry
