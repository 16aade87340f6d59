// The local registry: one record, lock and socket per instance in a runtime directory.
//
// Files per instance: <id>.json (the record), <id>.lock (flock(LOCK_EX) held by the live server
// for its lifetime) and <id>.sock (the server's socket, created by the server). Whoever obtains
// the lock of a record owns its files: the live server, or a cleaner once the server is gone.
// A cleaner removes json, sock and lock in that order, lock last and while holding it, and only
// if the lock path still names the inode it locked, so two cleaners (or a cleaner and a server
// re-registering the same id) never remove each other's files.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/util.hpp"
#include "registry/registry.hpp"

namespace companion::registry {
namespace {

constexpr size_t kMaxRecordBytes = 64 * 1024;
// An unparsable record this old whose lock is free was left by a crash mid-write.
constexpr int64_t kCorruptRecordGraceMs = 10'000;
// A cleaner holds a dead instance's lock for a few unlinks; a register of the same id that
// collides with it retries briefly (backing off 1, 2, 4 ... 32 ms: about 60 ms in all) instead of
// reporting the id as in use.
constexpr int kLockAttempts = 7;
constexpr auto kLockRetryFirstDelay = std::chrono::milliseconds(1);

std::string join(const std::string& dir, const std::string& name) {
  if (!dir.empty() && dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

void unlink_quietly(const std::string& path) {
  // ENOENT is expected when another cleaner got there first; nothing else is actionable here.
  (void)::unlink(path.c_str());
}

// True when `path` (not followed) is the inode `fd` refers to.
bool same_inode(int fd, const std::string& path) {
  struct stat a {};
  struct stat b {};
  if (::fstat(fd, &a) != 0) return false;
  if (::lstat(path.c_str(), &b) != 0) return false;
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

int64_t mtime_ms(const struct stat& st) {
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000 + st.st_mtim.tv_nsec / 1'000'000;
}

// Whether `dir` exists, and if it does, that it is a directory this user owns (a symlink is
// accepted only if the link itself and its target are this user's).
Result<bool> check_dir(const std::string& dir) {
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT) return false;
    return errno_error(StatusCode::kIoError, "stat " + dir, errno);
  }
  const uid_t uid = ::getuid();
  if (S_ISLNK(st.st_mode)) {
    if (st.st_uid != uid)
      return make_error(StatusCode::kNotPermitted,
                        "runtime directory " + dir + " is a symlink owned by another user");
    if (::stat(dir.c_str(), &st) != 0) {
      if (errno == ENOENT) return false;
      return errno_error(StatusCode::kIoError, "stat " + dir, errno);
    }
  }
  if (!S_ISDIR(st.st_mode))
    return make_error(StatusCode::kNotPermitted,
                      "runtime directory " + dir + " exists and is not a directory");
  if (st.st_uid != uid)
    return make_error(StatusCode::kNotPermitted, "runtime directory " + dir + " is owned by uid " +
                                                     std::to_string(st.st_uid) + ", not " +
                                                     std::to_string(uid));
  return true;
}

Result<void> make_dirs(const std::string& dir) {
  // Parents first (mode 0700 too), tolerating ones that exist.
  for (size_t pos = dir.find('/', 1); pos != std::string::npos; pos = dir.find('/', pos + 1)) {
    std::string parent = dir.substr(0, pos);
    if (::mkdir(parent.c_str(), 0700) != 0 && errno != EEXIST)
      return errno_error(StatusCode::kIoError, "mkdir " + parent, errno);
  }
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
    return errno_error(StatusCode::kIoError, "mkdir " + dir, errno);
  return ok_result();
}

class LocalRegistration final : public Registration {
 public:
  LocalRegistration(std::string json_path, std::string sock_path, std::string lock_path,
                    ServerIdentity record, UniqueFd lock)
      : json_path_(std::move(json_path)),
        sock_path_(std::move(sock_path)),
        lock_path_(std::move(lock_path)),
        record_(std::move(record)),
        lock_(std::move(lock)) {}

  ~LocalRegistration() override {
    unlink_quietly(json_path_);
    unlink_quietly(sock_path_);
    // Lock last, while still holding it, and only if it is still ours.
    if (same_inode(lock_.get(), lock_path_)) unlink_quietly(lock_path_);
    lock_.reset();
  }

  const ServerIdentity& record() const noexcept override { return record_; }

 private:
  std::string json_path_;
  std::string sock_path_;
  std::string lock_path_;
  ServerIdentity record_;
  UniqueFd lock_;
};

enum class Liveness { kAlive, kDead };

// Decides whether the instance `id` is alive without blocking. If its lock can be taken the
// instance is dead and its files are removed (json, sock, then lock while holding it). A missing
// lock file means dead too: it is created just to hold it while cleaning, so a server
// re-registering the same id meanwhile is never disturbed. When liveness cannot be determined
// (unexpected errors), the instance is reported alive and nothing is removed.
Liveness check_and_reap(const LocalRegistry& reg, const std::string& id) {
  const std::string lock_path = reg.lock_path_for(id);
  UniqueFd fd(::open(lock_path.c_str(), O_RDONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644));
  if (!fd) return Liveness::kAlive;
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) return Liveness::kAlive;  // held: alive
  // Another cleaner may have removed this inode (and a new instance created a new one) between
  // our open and flock: then those files are not ours to touch, and this record is gone anyway.
  if (!same_inode(fd.get(), lock_path)) return Liveness::kDead;
  unlink_quietly(reg.record_path_for(id));
  unlink_quietly(reg.socket_path_for(id));
  unlink_quietly(lock_path);
  return Liveness::kDead;
}

struct DirCloser {
  void operator()(DIR* d) const noexcept { ::closedir(d); }
};

}  // namespace

std::string default_runtime_dir() {
  if (const char* dir = std::getenv("COMPANION_RUNTIME_DIR"); dir != nullptr && *dir != '\0')
    return dir;
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg != nullptr && *xdg != '\0')
    return join(xdg, "companion");
  return "/tmp/companion-" + std::to_string(::getuid());
}

LocalRegistry::LocalRegistry(std::string runtime_dir) : dir_(std::move(runtime_dir)) {}

Result<void> LocalRegistry::ensure_dir() const {
  if (dir_.empty()) return make_error(StatusCode::kInvalidArgument, "runtime directory is empty");
  COMPANION_ASSIGN_OR_RETURN(bool exists, check_dir(dir_));
  if (exists) return ok_result();
  COMPANION_TRY(make_dirs(dir_));
  // Re-check: it may have been created concurrently, by someone else.
  COMPANION_ASSIGN_OR_RETURN(exists, check_dir(dir_));
  if (!exists)
    return make_error(StatusCode::kIoError, "runtime directory " + dir_ + " vanished after mkdir");
  return ok_result();
}

std::string LocalRegistry::socket_path_for(const std::string& instance_id) const {
  return join(dir_, instance_id + ".sock");
}

std::string LocalRegistry::record_path_for(const std::string& instance_id) const {
  return join(dir_, instance_id + ".json");
}

std::string LocalRegistry::lock_path_for(const std::string& instance_id) const {
  return join(dir_, instance_id + ".lock");
}

Result<std::unique_ptr<Registration>> LocalRegistry::register_instance(
    const ServerIdentity& record) {
  if (!is_valid_instance_id(record.instance_id))
    return make_error(
        StatusCode::kInvalidArgument,
        "instance id '" + record.instance_id + "' is not 1 to 64 characters of [0-9a-zA-Z_-]");
  ServerIdentity rec = record;
  if (rec.socket_path.empty()) rec.socket_path = socket_path_for(rec.instance_id);
  if (rec.hostname.empty()) rec.hostname = hostname();
  if (rec.pid == 0) rec.pid = static_cast<int64_t>(::getpid());
  if (rec.started_at_ms == 0) rec.started_at_ms = unix_time_ms();
  COMPANION_TRY(validate_record(rec));
  COMPANION_TRY(ensure_dir());

  const std::string lock_path = lock_path_for(rec.instance_id);
  UniqueFd lock;
  auto delay = kLockRetryFirstDelay;
  for (int attempt = 0; attempt < kLockAttempts && !lock; ++attempt) {
    if (attempt > 0) {
      std::this_thread::sleep_for(delay);
      delay *= 2;
    }
    UniqueFd fd(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644));
    if (!fd) return errno_error(StatusCode::kIoError, "open " + lock_path, errno);
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      int err = errno;
      if (err != EWOULDBLOCK) return errno_error(StatusCode::kIoError, "flock " + lock_path, err);
      // Held. Either a live instance has this id, or a cleaner is removing a dead one's files
      // (it holds the lock only for a few unlinks): retry a few times before giving up.
      continue;
    }
    // A cleaner may have unlinked the file between our open and flock: start over.
    if (!same_inode(fd.get(), lock_path)) continue;
    lock = std::move(fd);
  }
  if (!lock)
    return make_error(StatusCode::kUnavailable,
                      "instance id in use: " + rec.instance_id + " (" + lock_path + " is locked)");

  const std::string json_path = record_path_for(rec.instance_id);
  if (auto written = write_file_atomic(json_path, record_to_json(rec), 0644); !written.ok()) {
    unlink_quietly(lock_path);  // still holding it
    return std::move(written).error();
  }
  return std::unique_ptr<Registration>(std::make_unique<LocalRegistration>(
      json_path, socket_path_for(rec.instance_id), lock_path, std::move(rec), std::move(lock)));
}

Result<std::vector<ServerIdentity>> LocalRegistry::list(const std::string& ns,
                                                        const std::string& component) const {
  std::vector<ServerIdentity> out;
  if (dir_.empty()) return make_error(StatusCode::kInvalidArgument, "runtime directory is empty");
  COMPANION_ASSIGN_OR_RETURN(bool exists, check_dir(dir_));
  if (!exists) return out;

  std::vector<std::string> ids;
  {
    std::unique_ptr<DIR, DirCloser> d(::opendir(dir_.c_str()));
    if (!d) {
      if (errno == ENOENT) return out;
      return errno_error(StatusCode::kIoError, "opendir " + dir_, errno);
    }
    constexpr std::string_view kSuffix = ".json";
    while (const dirent* entry = ::readdir(d.get())) {
      std::string_view name(entry->d_name);
      // "<id>.json" only: temporaries ("<id>.json.tmp.<hex>") and anything else are ignored.
      if (name.size() <= kSuffix.size() || !name.ends_with(kSuffix)) continue;
      std::string_view id = name.substr(0, name.size() - kSuffix.size());
      if (!is_valid_instance_id(id)) continue;
      ids.emplace_back(id);
    }
  }

  for (const std::string& id : ids) {
    const std::string json_path = record_path_for(id);
    auto text = read_small_file(json_path, kMaxRecordBytes);
    if (!text.ok() && text.error().code != StatusCode::kInvalidArgument) continue;  // gone
    Result<ServerIdentity> parsed =
        text.ok() ? record_from_json(*text) : Result<ServerIdentity>(std::move(text).error());
    if (parsed.ok() && parsed->instance_id != id)
      parsed = make_error(StatusCode::kInvalidArgument, "record id does not match its file name");
    if (!parsed.ok()) {
      // Unreadable: skip it; once it is old and nobody holds its lock, remove it.
      struct stat st {};
      if (::stat(json_path.c_str(), &st) == 0 &&
          unix_time_ms() - mtime_ms(st) > kCorruptRecordGraceMs)
        (void)check_and_reap(*this, id);
      continue;
    }
    // Liveness is checked for every record, not only matching ones, so dead ones of any
    // namespace are cleaned up.
    if (check_and_reap(*this, id) != Liveness::kAlive) continue;
    if (!ns.empty() && parsed->ns != ns) continue;
    if (!component.empty() && parsed->component != component) continue;
    out.push_back(std::move(parsed).value());
  }

  std::sort(out.begin(), out.end(), [](const ServerIdentity& a, const ServerIdentity& b) {
    if (a.started_at_ms != b.started_at_ms) return a.started_at_ms < b.started_at_ms;
    return a.instance_id < b.instance_id;
  });
  return out;
}

}  // namespace companion::registry
