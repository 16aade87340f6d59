// The local registry: registration, listing, liveness and cleanup of dead instances.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.hpp"
#include "common/util.hpp"
#include "registry/registry.hpp"

namespace companion::registry {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/companion_registry_test_XXXXXX";
    const char* made = ::mkdtemp(tmpl);
    if (made != nullptr) path_ = made;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

void touch(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
  ASSERT_TRUE(fd.valid()) << path;
}

void write_text(const std::string& path, const std::string& text) {
  ASSERT_TRUE(write_file_atomic(path, text).ok()) << path;
}

void age_file(const std::string& path, int seconds) {
  struct timespec times[2];
  ::clock_gettime(CLOCK_REALTIME, &times[0]);
  times[0].tv_sec -= seconds;
  times[1] = times[0];
  ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), times, AT_SYMLINK_NOFOLLOW), 0) << path;
}

std::vector<std::string> dir_entries(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  return out;
}

ServerIdentity make_record(const std::string& id, const std::string& ns = "ns",
                           const std::string& component = "model_server_gpu_0",
                           int64_t started_at_ms = 0) {
  ServerIdentity r;
  r.instance_id = id;
  r.ns = ns;
  r.component = component;
  r.device = "GPU-aaaa";
  r.gpu_uuid = "GPU-aaaa";
  r.pci_bus_id = "0000:01:00.0";
  r.device_ordinal = 0;
  r.backends = {"cuda_ipc"};
  r.default_backend = "cuda_ipc";
  r.version = "0.1.0";
  r.started_at_ms = started_at_ms;
  return r;
}

std::vector<std::string> ids_of(const std::vector<ServerIdentity>& records) {
  std::vector<std::string> out;
  for (const auto& r : records) out.push_back(r.instance_id);
  return out;
}

// A Unix socket bound at path (what a server would listen on).
UniqueFd bind_socket(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (!fd || path.size() >= sizeof(addr.sun_path)) return UniqueFd();
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return UniqueFd();
  return fd;
}

// A forked process that registers `record` through the API (and creates its socket file), then
// waits to be killed. Killed with SIGKILL and reaped on destruction.
class ChildHolder {
 public:
  ChildHolder(const std::string& dir, const ServerIdentity& record) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return;
    UniqueFd rd(fds[0]);
    UniqueFd wr(fds[1]);
    const pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ < 0) return;
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(3);
      rd.reset();
      LocalRegistry reg(dir);
      auto registration = reg.register_instance(record);
      char status = 'E';
      if (registration.ok()) {
        static UniqueFd sock;
        sock = bind_socket(reg.socket_path_for(record.instance_id));
        status = sock ? 'R' : 'S';
        // Keep the registration alive: the process never returns from here.
        static std::unique_ptr<Registration> keep;
        keep = std::move(registration).value();
      }
      (void)!::write(wr.get(), &status, 1);
      for (;;) ::pause();
    }
    wr.reset();
    struct pollfd p {
      rd.get(), POLLIN, 0
    };
    if (::poll(&p, 1, 2000) == 1) {
      char status = 0;
      if (::read(rd.get(), &status, 1) == 1) ready_ = status == 'R';
    }
  }
  ~ChildHolder() { kill_and_reap(); }
  ChildHolder(const ChildHolder&) = delete;
  ChildHolder& operator=(const ChildHolder&) = delete;

  bool ready() const { return ready_; }
  pid_t pid() const { return pid_; }
  // SIGKILL: no destructors run, so the child's files stay behind with a free lock.
  void kill_and_reap() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
  bool ready_ = false;
};

class LocalRegistryTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_FALSE(tmp_.path().empty()) << "mkdtemp failed"; }
  std::string path(const std::string& name) const { return tmp_.path() + "/" + name; }

  TempDir tmp_;
  LocalRegistry reg_{tmp_.path()};
};

TEST_F(LocalRegistryTest, PathsForAnInstance) {
  EXPECT_EQ(reg_.runtime_dir(), tmp_.path());
  EXPECT_EQ(reg_.socket_path_for("abc"), path("abc.sock"));
  EXPECT_EQ(reg_.record_path_for("abc"), path("abc.json"));
  EXPECT_EQ(reg_.lock_path_for("abc"), path("abc.lock"));
}

TEST_F(LocalRegistryTest, RegisterThenListShowsIt) {
  auto r = reg_.register_instance(make_record("inst1"));
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  const ServerIdentity& rec = (*r)->record();
  // Defaults filled in.
  EXPECT_EQ(rec.socket_path, path("inst1.sock"));
  EXPECT_EQ(rec.pid, ::getpid());
  EXPECT_EQ(rec.hostname, hostname());
  EXPECT_GT(rec.started_at_ms, 0);

  EXPECT_TRUE(exists(path("inst1.json")));
  EXPECT_TRUE(exists(path("inst1.lock")));
  struct stat st {};
  ASSERT_EQ(::stat(path("inst1.json").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);

  // The file on disk is the record.
  auto text = read_small_file(path("inst1.json"));
  ASSERT_TRUE(text.ok());
  auto on_disk = record_from_json(*text);
  ASSERT_TRUE(on_disk.ok()) << on_disk.error().to_string();
  EXPECT_EQ(on_disk->instance_id, "inst1");
  EXPECT_EQ(on_disk->socket_path, rec.socket_path);

  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok()) << listed.error().to_string();
  ASSERT_EQ(listed->size(), 1u);
  const ServerIdentity& l = listed->front();
  EXPECT_EQ(l.instance_id, "inst1");
  EXPECT_EQ(l.ns, "ns");
  EXPECT_EQ(l.component, "model_server_gpu_0");
  EXPECT_EQ(l.socket_path, rec.socket_path);
  EXPECT_EQ(l.pid, rec.pid);
  EXPECT_EQ(l.started_at_ms, rec.started_at_ms);
  EXPECT_EQ(l.gpu_uuid, "GPU-aaaa");
  EXPECT_EQ(l.backends, std::vector<std::string>{"cuda_ipc"});
  // Listing a live instance (even from the holder's own process) keeps its files.
  EXPECT_TRUE(exists(path("inst1.json")));
  EXPECT_TRUE(exists(path("inst1.lock")));
  auto again = reg_.list();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->size(), 1u);
}

TEST_F(LocalRegistryTest, KeepsExplicitFields) {
  ServerIdentity want = make_record("explicit", "ns", "c", 12345);
  want.socket_path = "/somewhere/else.sock";
  want.pid = 777;
  want.hostname = "elsewhere";
  auto r = reg_.register_instance(want);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ((*r)->record().socket_path, "/somewhere/else.sock");
  EXPECT_EQ((*r)->record().pid, 777);
  EXPECT_EQ((*r)->record().hostname, "elsewhere");
  EXPECT_EQ((*r)->record().started_at_ms, 12345);
  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ(listed->front().socket_path, "/somewhere/else.sock");
  EXPECT_EQ(listed->front().pid, 777);
}

TEST_F(LocalRegistryTest, LockFdIsCloseOnExecAndHeld) {
  auto r = reg_.register_instance(make_record("cloexec"));
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  // Find our fd that refers to the lock file.
  const std::string lock = fs::canonical(path("cloexec.lock")).string();
  int found = -1;
  for (const auto& e : fs::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    auto target = fs::read_symlink(e.path(), ec);
    if (!ec && target.string() == lock) found = std::atoi(e.path().filename().c_str());
  }
  ASSERT_GE(found, 0) << "no fd holds " << lock;
  int flags = ::fcntl(found, F_GETFD);
  ASSERT_GE(flags, 0);
  EXPECT_TRUE(flags & FD_CLOEXEC);
  // The lock really is held: another open file description cannot take it.
  UniqueFd other(::open(path("cloexec.lock").c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(other.valid());
  EXPECT_NE(::flock(other.get(), LOCK_EX | LOCK_NB), 0);
  EXPECT_EQ(errno, EWOULDBLOCK);
}

TEST_F(LocalRegistryTest, DestructionRemovesAllFiles) {
  {
    auto r = reg_.register_instance(make_record("gone"));
    ASSERT_TRUE(r.ok()) << r.error().to_string();
    touch(path("gone.sock"));  // what the server would have bound
    ASSERT_TRUE(exists(path("gone.json")));
    ASSERT_TRUE(exists(path("gone.lock")));
    ASSERT_TRUE(exists(path("gone.sock")));
  }
  EXPECT_FALSE(exists(path("gone.json")));
  EXPECT_FALSE(exists(path("gone.sock")));
  EXPECT_FALSE(exists(path("gone.lock")));
  EXPECT_TRUE(dir_entries(tmp_.path()).empty());
  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok());
  EXPECT_TRUE(listed->empty());
}

TEST_F(LocalRegistryTest, SameIdTwiceFails) {
  auto first = reg_.register_instance(make_record("dup"));
  ASSERT_TRUE(first.ok()) << first.error().to_string();
  auto second = reg_.register_instance(make_record("dup", "other"));
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().code, StatusCode::kUnavailable);
  // The first one is untouched.
  EXPECT_TRUE(exists(path("dup.json")));
  EXPECT_TRUE(exists(path("dup.lock")));
  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ(listed->front().ns, "ns");

  // Once released, the id can be registered again.
  first->reset();
  auto third = reg_.register_instance(make_record("dup", "other"));
  ASSERT_TRUE(third.ok()) << third.error().to_string();
  listed = reg_.list();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ(listed->front().ns, "other");
}

TEST_F(LocalRegistryTest, SameIdHeldByAnotherProcessFails) {
  ChildHolder child(tmp_.path(), make_record("shared"));
  ASSERT_TRUE(child.ready());
  auto second = reg_.register_instance(make_record("shared"));
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().code, StatusCode::kUnavailable);
}

TEST_F(LocalRegistryTest, RejectsInvalidRecords) {
  for (const std::string& bad_id :
       {std::string(""), std::string("a/b"), std::string(".."), std::string("x.y"),
        std::string(65, 'a'), std::string("sp ace")}) {
    auto r = reg_.register_instance(make_record(bad_id));
    ASSERT_FALSE(r.ok()) << bad_id;
    EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument) << bad_id;
  }
  auto r = reg_.register_instance(make_record("ok", "a/b"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument);
  r = reg_.register_instance(make_record("ok", ""));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument);
  r = reg_.register_instance(make_record("ok", "ns", ""));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument);
  r = reg_.register_instance(make_record("ok", "ns", "gpu/0"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument);
  EXPECT_TRUE(dir_entries(tmp_.path()).empty());
}

TEST_F(LocalRegistryTest, CreatesDirectoryWithMode1770WhateverTheUmask) {
  const std::string dir = path("a/b/runtime");
  LocalRegistry reg(dir);
  const mode_t old_umask = ::umask(0);  // the mode must not follow it (it gave 0700 before)
  auto listed = reg.list();             // a missing directory lists nothing, and is not created
  ASSERT_TRUE(listed.ok()) << listed.error().to_string();
  EXPECT_TRUE(listed->empty());
  EXPECT_FALSE(exists(dir));

  auto r = reg.register_instance(make_record("x"));
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  struct stat st {};
  ASSERT_EQ(::stat(dir.c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  ::umask(old_umask);
  EXPECT_EQ(st.st_mode & 07777, 01770u);
  EXPECT_TRUE(reg.ensure_dir().ok());
}

TEST_F(LocalRegistryTest, CreatedDirectoryGetsTheGivenGroup) {
  if (::getuid() != 0) GTEST_SKIP() << "changing a directory's group to any group needs root";
  const std::string dir = path("grouped");
  LocalRegistry reg(dir);
  reg.set_dir_group(65534);
  ASSERT_TRUE(reg.ensure_dir().ok());
  struct stat st {};
  ASSERT_EQ(::stat(dir.c_str(), &st), 0);
  EXPECT_EQ(st.st_gid, 65534u);
  EXPECT_EQ(st.st_mode & 07777, 01770u);
}

TEST_F(LocalRegistryTest, RefusesDirectoryWritableByOthers) {
  const std::string dir = path("open");
  ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
  ASSERT_EQ(::chmod(dir.c_str(), 01777), 0);  // like /tmp: sticky or not, anyone may plant files
  LocalRegistry reg(dir);
  auto ensured = reg.ensure_dir();
  ASSERT_FALSE(ensured.ok());
  EXPECT_EQ(ensured.error().code, StatusCode::kNotPermitted);
  // The message names the directory, its owner and mode, and what to do.
  EXPECT_NE(ensured.error().message.find(dir), std::string::npos) << ensured.error().message;
  EXPECT_NE(ensured.error().message.find("mode 1777"), std::string::npos);
  EXPECT_NE(ensured.error().message.find("owner uid " + std::to_string(::getuid())),
            std::string::npos);
  EXPECT_NE(ensured.error().message.find("chmod o-w"), std::string::npos);
  auto listed = reg.list();
  ASSERT_FALSE(listed.ok());
  EXPECT_EQ(listed.error().code, StatusCode::kNotPermitted);
  EXPECT_FALSE(reg.register_instance(make_record("x")).ok());
}

TEST_F(LocalRegistryTest, FifoRecordAndFifoLockNeverBlockAListing) {
  // A FIFO opened for reading waits for a writer: the listing must skip these, not wait.
  ChildHolder alive(tmp_.path(), make_record("alive"));
  ASSERT_TRUE(alive.ready());
  ASSERT_EQ(::mkfifo(path("fifo.json").c_str(), 0644), 0);
  ServerIdentity fifolock = make_record("fifolock");
  fifolock.socket_path = path("fifolock.sock");
  ASSERT_TRUE(write_file_atomic(path("fifolock.json"), record_to_json(fifolock)).ok());
  ASSERT_EQ(::mkfifo(path("fifolock.lock").c_str(), 0644), 0);
  auto started = std::chrono::steady_clock::now();
  auto listed = reg_.list();
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(2));
  ASSERT_TRUE(listed.ok()) << listed.error().to_string();
  EXPECT_EQ(ids_of(*listed), (std::vector<std::string>{"alive"}));
  // Skipped, not removed: they are not the registry's to judge.
  EXPECT_TRUE(exists(path("fifo.json")));
  EXPECT_TRUE(exists(path("fifolock.lock")));
}

TEST_F(LocalRegistryTest, SymlinkedRecordIsSkipped) {
  ASSERT_TRUE(write_file_atomic(path("elsewhere"), record_to_json(make_record("linked"))).ok());
  ASSERT_EQ(::symlink(path("elsewhere").c_str(), path("linked.json").c_str()), 0);
  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok()) << listed.error().to_string();
  EXPECT_TRUE(listed->empty());
}

TEST_F(LocalRegistryTest, RecordsOfUntrustedOwnersAreSkippedAndKept) {
  if (::getuid() != 0) GTEST_SKIP() << "files of another owner are made as root";
  ChildHolder alive(tmp_.path(), make_record("alive"));
  ASSERT_TRUE(alive.ready());
  // Another user's live record; and one of ours whose socket belongs to another user. Their
  // locks are held (here: a lock on another open file description conflicts like a server's).
  std::vector<UniqueFd> held;
  for (const char* id : {"foreign", "foreignsock"}) {
    ServerIdentity record = make_record(id);
    record.socket_path = path(std::string(id) + ".sock");
    ASSERT_TRUE(write_file_atomic(path(std::string(id) + ".json"), record_to_json(record)).ok());
    held.emplace_back(
        ::open(path(std::string(id) + ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
    ASSERT_TRUE(held.back());
    ASSERT_EQ(::flock(held.back().get(), LOCK_EX), 0);
  }
  UniqueFd foreign_socket = bind_socket(path("foreignsock.sock"));
  ASSERT_TRUE(foreign_socket);
  UniqueFd own_socket = bind_socket(path("foreign.sock"));
  ASSERT_TRUE(own_socket);
  for (const char* file : {"foreign.json", "foreign.sock", "foreignsock.sock"})
    ASSERT_EQ(::chown(path(file).c_str(), 65534, 65534), 0);
  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok()) << listed.error().to_string();
  EXPECT_EQ(ids_of(*listed), (std::vector<std::string>{"alive"}));
  EXPECT_TRUE(exists(path("foreign.json")));

  // Once that user is trusted, its record is listed; a socket that is not the record owner's
  // is still refused.
  ::setenv("COMPANION_TRUST_UID", "65534", 1);
  auto trust = TrustPolicy::from_environment();
  ::unsetenv("COMPANION_TRUST_UID");
  ASSERT_TRUE(trust.ok());
  EXPECT_TRUE(trust->allows(65534));
  LocalRegistry trusting(tmp_.path(), *trust);
  auto all = trusting.list();
  ASSERT_TRUE(all.ok());
  auto ids = ids_of(*all);
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(ids, (std::vector<std::string>{"alive", "foreign"}));
}

TEST(RegistryTrust, PolicyFromEnvironment) {
  ::setenv("COMPANION_TRUST_UID", "12,34", 1);
  auto trust = TrustPolicy::from_environment({56});
  EXPECT_TRUE(trust.ok());
  if (trust.ok()) {
    EXPECT_TRUE(trust->allows(12));
    EXPECT_TRUE(trust->allows(34));
    EXPECT_TRUE(trust->allows(56));
    EXPECT_TRUE(trust->allows(0));
    EXPECT_TRUE(trust->allows(::getuid()));
    EXPECT_FALSE(trust->allows(78));
  }
  for (const char* bad : {"x", "1,,2", "-1", "99999999999"}) {
    ::setenv("COMPANION_TRUST_UID", bad, 1);
    auto refused = TrustPolicy::from_environment();
    EXPECT_FALSE(refused.ok()) << bad;
    if (!refused.ok()) {
      EXPECT_EQ(refused.error().code, StatusCode::kInvalidArgument);
    }
  }
  ::unsetenv("COMPANION_TRUST_UID");
  EXPECT_FALSE(TrustPolicy().allows(78));
}

TEST_F(LocalRegistryTest, RefusesDirectoryOfAnotherUser) {
  std::string dir;
  if (::getuid() == 0) {
    dir = path("foreign");
    ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
    ASSERT_EQ(::chown(dir.c_str(), 65534, 65534), 0);
  } else {
    dir = "/";  // owned by root
  }
  LocalRegistry reg(dir);
  auto ensured = reg.ensure_dir();
  ASSERT_FALSE(ensured.ok());
  EXPECT_EQ(ensured.error().code, StatusCode::kNotPermitted);
  auto r = reg.register_instance(make_record("x"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kNotPermitted);
  auto listed = reg.list();
  ASSERT_FALSE(listed.ok());
  EXPECT_EQ(listed.error().code, StatusCode::kNotPermitted);
  if (::getuid() == 0) {
    EXPECT_TRUE(dir_entries(dir).empty());
  }

  // A plain file where the directory should be is refused too.
  touch(path("file"));
  LocalRegistry on_file(path("file"));
  auto on_file_ensured = on_file.ensure_dir();
  ASSERT_FALSE(on_file_ensured.ok());
  EXPECT_EQ(on_file_ensured.error().code, StatusCode::kNotPermitted);
}

TEST_F(LocalRegistryTest, KilledHolderIsRecognisedAsStaleAndRemoved) {
  ChildHolder child(tmp_.path(), make_record("victim"));
  ASSERT_TRUE(child.ready());
  ASSERT_TRUE(exists(path("victim.json")));
  ASSERT_TRUE(exists(path("victim.sock")));
  ASSERT_TRUE(exists(path("victim.lock")));

  child.kill_and_reap();  // SIGKILL: the registration's destructor never runs
  // Its files are still there...
  ASSERT_TRUE(exists(path("victim.json")));
  ASSERT_TRUE(exists(path("victim.sock")));
  ASSERT_TRUE(exists(path("victim.lock")));

  // ...until someone lists.
  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok()) << listed.error().to_string();
  EXPECT_TRUE(listed->empty());
  EXPECT_FALSE(exists(path("victim.json")));
  EXPECT_FALSE(exists(path("victim.sock")));
  EXPECT_FALSE(exists(path("victim.lock")));
  EXPECT_TRUE(dir_entries(tmp_.path()).empty());

  // The id is free again.
  auto r = reg_.register_instance(make_record("victim"));
  EXPECT_TRUE(r.ok());
}

TEST_F(LocalRegistryTest, LiveHolderInAnotherProcessIsListedAndKept) {
  ChildHolder child(tmp_.path(), make_record("alive", "ns", "model_server_host"));
  ASSERT_TRUE(child.ready());
  for (int i = 0; i < 3; ++i) {
    auto listed = reg_.list();
    ASSERT_TRUE(listed.ok()) << listed.error().to_string();
    ASSERT_EQ(listed->size(), 1u);
    EXPECT_EQ(listed->front().instance_id, "alive");
    EXPECT_EQ(listed->front().pid, child.pid());
    EXPECT_EQ(listed->front().socket_path, path("alive.sock"));
    EXPECT_TRUE(exists(path("alive.json")));
    EXPECT_TRUE(exists(path("alive.sock")));
    EXPECT_TRUE(exists(path("alive.lock")));
  }
  // A filtered-out listing does not touch it either.
  auto other = reg_.list("other-ns");
  ASSERT_TRUE(other.ok());
  EXPECT_TRUE(other->empty());
  EXPECT_TRUE(exists(path("alive.json")));

  child.kill_and_reap();
  auto after = reg_.list();
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE(after->empty());
  EXPECT_FALSE(exists(path("alive.json")));
}

TEST_F(LocalRegistryTest, DeadRecordsOfOtherNamespacesAreCleanedToo) {
  ChildHolder child(tmp_.path(), make_record("elsewhere", "ns-b"));
  ASSERT_TRUE(child.ready());
  child.kill_and_reap();
  auto listed = reg_.list("ns-a");
  ASSERT_TRUE(listed.ok());
  EXPECT_TRUE(listed->empty());
  EXPECT_FALSE(exists(path("elsewhere.json")));
  EXPECT_FALSE(exists(path("elsewhere.lock")));
}

TEST_F(LocalRegistryTest, FiltersAndOrder) {
  std::vector<std::unique_ptr<Registration>> regs;
  auto add = [&](const char* id, const char* ns, const char* component, int64_t t) {
    auto r = reg_.register_instance(make_record(id, ns, component, t));
    ASSERT_TRUE(r.ok()) << r.error().to_string();
    regs.push_back(std::move(r).value());
  };
  add("a1", "alpha", "model_server_gpu_0", 3000);
  add("a2", "alpha", "model_server_gpu_1", 1000);
  add("a3", "alpha", "model_server_gpu_0", 2000);
  add("b1", "beta", "model_server_gpu_0", 500);
  add("b2", "beta", "model_server_host", 4000);

  auto all = reg_.list();
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(ids_of(*all), (std::vector<std::string>{"b1", "a2", "a3", "a1", "b2"}));

  auto alpha = reg_.list("alpha");
  ASSERT_TRUE(alpha.ok());
  EXPECT_EQ(ids_of(*alpha), (std::vector<std::string>{"a2", "a3", "a1"}));

  auto alpha_gpu0 = reg_.list("alpha", "model_server_gpu_0");
  ASSERT_TRUE(alpha_gpu0.ok());
  EXPECT_EQ(ids_of(*alpha_gpu0), (std::vector<std::string>{"a3", "a1"}));

  auto any_gpu0 = reg_.list("", "model_server_gpu_0");
  ASSERT_TRUE(any_gpu0.ok());
  EXPECT_EQ(ids_of(*any_gpu0), (std::vector<std::string>{"b1", "a3", "a1"}));

  auto host = reg_.list("beta", "model_server_host");
  ASSERT_TRUE(host.ok());
  EXPECT_EQ(ids_of(*host), (std::vector<std::string>{"b2"}));

  auto none = reg_.list("gamma");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  auto none2 = reg_.list("alpha", "model_server_host");
  ASSERT_TRUE(none2.ok());
  EXPECT_TRUE(none2->empty());

  // Releasing one removes it from listings.
  regs.erase(regs.begin());  // a1
  auto after = reg_.list("alpha");
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(ids_of(*after), (std::vector<std::string>{"a2", "a3"}));
}

TEST_F(LocalRegistryTest, CorruptRecordIsSkippedThenRemovedWhenOld) {
  auto live = reg_.register_instance(make_record("good"));
  ASSERT_TRUE(live.ok());
  write_text(path("broken.json"), "{\"instance_id\": \"broken\", ");
  touch(path("broken.lock"));

  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok()) << listed.error().to_string();
  EXPECT_EQ(ids_of(*listed), (std::vector<std::string>{"good"}));
  // Fresh: maybe still being written by someone; left alone.
  EXPECT_TRUE(exists(path("broken.json")));

  // Old and nobody holds its lock: a crash mid-write; removed.
  age_file(path("broken.json"), 20);
  listed = reg_.list();
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(ids_of(*listed), (std::vector<std::string>{"good"}));
  EXPECT_FALSE(exists(path("broken.json")));
  EXPECT_FALSE(exists(path("broken.lock")));
  EXPECT_TRUE(exists(path("good.json")));
}

TEST_F(LocalRegistryTest, OldCorruptRecordWithHeldLockIsKept) {
  write_text(path("held.json"), "not json at all");
  age_file(path("held.json"), 60);
  UniqueFd lock(::open(path("held.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  ASSERT_TRUE(lock.valid());
  ASSERT_EQ(::flock(lock.get(), LOCK_EX | LOCK_NB), 0);
  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok());
  EXPECT_TRUE(listed->empty());
  EXPECT_TRUE(exists(path("held.json")));
  EXPECT_TRUE(exists(path("held.lock")));
}

TEST_F(LocalRegistryTest, RecordWithoutLockFileIsStale) {
  ServerIdentity orphan = make_record("orphan");
  orphan.pid = 1;
  orphan.socket_path = path("orphan.sock");
  write_text(path("orphan.json"), record_to_json(orphan));
  touch(path("orphan.sock"));
  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok()) << listed.error().to_string();
  EXPECT_TRUE(listed->empty());
  EXPECT_FALSE(exists(path("orphan.json")));
  EXPECT_FALSE(exists(path("orphan.sock")));
  EXPECT_FALSE(exists(path("orphan.lock")));
  EXPECT_TRUE(dir_entries(tmp_.path()).empty());
}

TEST_F(LocalRegistryTest, IgnoresTemporariesAndOtherFiles) {
  ServerIdentity rec = make_record("tmpish");
  rec.pid = 1;
  rec.socket_path = path("tmpish.sock");
  const std::string text = record_to_json(rec);
  // A temporary of write_file_atomic, files with other suffixes, a bad id and a directory.
  write_text(path("tmpish.json.tmp.0123456789abcdef"), text);
  write_text(path("tmpish.txt"), text);
  write_text(path("bad id.json"), text);
  write_text(path(".json"), text);
  ASSERT_EQ(::mkdir(path("subdir.json").c_str(), 0700), 0);
  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok()) << listed.error().to_string();
  EXPECT_TRUE(listed->empty());
  EXPECT_TRUE(exists(path("tmpish.json.tmp.0123456789abcdef")));
  EXPECT_TRUE(exists(path("tmpish.txt")));
  EXPECT_TRUE(exists(path("bad id.json")));
  EXPECT_TRUE(exists(path(".json")));
}

TEST_F(LocalRegistryTest, RecordWhoseIdDoesNotMatchItsFileIsSkipped) {
  auto live = reg_.register_instance(make_record("real"));
  ASSERT_TRUE(live.ok());
  // A copy of a live record under another name must not make it appear twice.
  auto text = read_small_file(path("real.json"));
  ASSERT_TRUE(text.ok());
  write_text(path("copy.json"), *text);
  // Even with its own lock held (so it is not simply reaped as dead).
  UniqueFd lock(::open(path("copy.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  ASSERT_TRUE(lock.valid());
  ASSERT_EQ(::flock(lock.get(), LOCK_EX | LOCK_NB), 0);
  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(ids_of(*listed), (std::vector<std::string>{"real"}));
}

TEST_F(LocalRegistryTest, ManyDeadHoldersAllCleaned) {
  std::vector<std::unique_ptr<ChildHolder>> children;
  for (int i = 0; i < 4; ++i) {
    children.push_back(
        std::make_unique<ChildHolder>(tmp_.path(), make_record("dead" + std::to_string(i))));
    ASSERT_TRUE(children.back()->ready());
  }
  ChildHolder survivor(tmp_.path(), make_record("survivor"));
  ASSERT_TRUE(survivor.ready());
  for (auto& c : children) c->kill_and_reap();
  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(ids_of(*listed), (std::vector<std::string>{"survivor"}));
  std::vector<std::string> left = dir_entries(tmp_.path());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"survivor.json", "survivor.lock", "survivor.sock"}));
}

}  // namespace
}  // namespace companion::registry

namespace companion::registry {
namespace {

// Cleaners racing with a server that re-registers the same id right after its predecessor was
// killed: whatever the interleaving, a live registration's record and lock are never removed.
TEST_F(LocalRegistryTest, ConcurrentCleanersNeverRemoveALiveRegistration) {
  using SteadyClock = std::chrono::steady_clock;
  const auto deadline = SteadyClock::now() + std::chrono::milliseconds(600);
  // Fork the cleaners first, so they inherit no lock of ours.
  std::vector<pid_t> cleaners;
  for (int i = 0; i < 2; ++i) {
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      LocalRegistry reg(tmp_.path());
      while (SteadyClock::now() < deadline + std::chrono::milliseconds(100)) {
        if (!reg.list().ok()) ::_exit(1);
      }
      ::_exit(0);
    }
    cleaners.push_back(pid);
  }

  int held = 0;
  int violations = 0;
  while (SteadyClock::now() < deadline) {
    {
      // (Its registration may itself lose to a cleaner briefly holding a lock: then this round
      // just has no stale files.)
      ChildHolder predecessor(tmp_.path(), make_record("reused"));
    }  // SIGKILLed: stale files for the cleaners
    for (int attempt = 0; attempt < 20; ++attempt) {
      auto r = reg_.register_instance(make_record("reused"));
      if (!r.ok()) {
        ASSERT_EQ(r.error().code, StatusCode::kUnavailable) << r.error().to_string();
        continue;  // a cleaner held the dead one's lock at that moment
      }
      ++held;
      for (int check = 0; check < 5; ++check) {
        UniqueFd probe(::open(path("reused.lock").c_str(), O_RDONLY | O_CLOEXEC));
        bool lock_ok = probe.valid() && ::flock(probe.get(), LOCK_EX | LOCK_NB) != 0;
        auto text = read_small_file(path("reused.json"));
        bool json_ok =
            text.ok() && record_from_json(*text).ok() && record_from_json(*text)->pid == ::getpid();
        if (!lock_ok || !json_ok) ++violations;
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
      break;
    }
  }
  for (pid_t pid : cleaners) {
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "cleaner failed";
  }
  EXPECT_GT(held, 0);
  EXPECT_EQ(violations, 0) << "in " << held << " registrations";
  auto listed = reg_.list();
  ASSERT_TRUE(listed.ok());
  EXPECT_TRUE(listed->empty());
  EXPECT_TRUE(dir_entries(tmp_.path()).empty());
}

}  // namespace
}  // namespace companion::registry
