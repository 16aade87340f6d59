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
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/log.hpp"
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

std::string mode_text(mode_t mode) {
  char text[8];
  std::snprintf(text, sizeof(text), "%04o", static_cast<unsigned>(mode & 07777));
  return text;
}

// Whether `dir` exists, and if it does, that it is a directory of a trusted owner that others
// cannot write to (a symlink is accepted only if the link itself and its target are trusted).
// In a directory others can write, anyone could plant records and sockets, or remove ours.
Result<bool> check_dir(const std::string& dir, const TrustPolicy& trust) {
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT) return false;
    return errno_error(StatusCode::kIoError, "stat " + dir, errno);
  }
  if (S_ISLNK(st.st_mode)) {
    if (!trust.allows(st.st_uid))
      return make_error(StatusCode::kNotPermitted,
                        "runtime directory " + dir + " is a symlink owned by uid " +
                            std::to_string(st.st_uid) + ", not a trusted owner (" +
                            trust.describe() + ")");
    if (::stat(dir.c_str(), &st) != 0) {
      if (errno == ENOENT) return false;
      return errno_error(StatusCode::kIoError, "stat " + dir, errno);
    }
  }
  if (!S_ISDIR(st.st_mode))
    return make_error(StatusCode::kNotPermitted,
                      "runtime directory " + dir + " exists and is not a directory");
  const std::string what = "runtime directory " + dir + " (owner uid " + std::to_string(st.st_uid) +
                           ", mode " + mode_text(st.st_mode) + ")";
  if (!trust.allows(st.st_uid))
    return make_error(StatusCode::kNotPermitted,
                      what + " belongs to a user this process does not trust (" + trust.describe() +
                          "): use a directory of your own (--runtime-dir), or list its owner in "
                          "COMPANION_TRUST_UID");
  if ((st.st_mode & S_IWOTH) != 0)
    return make_error(StatusCode::kNotPermitted,
                      what +
                          " is writable by every user, who could plant records and sockets "
                          "there: make it 0770 or tighter (chmod o-w " +
                          dir + ") or use another --runtime-dir");
  return true;
}

Result<void> make_dirs(const std::string& dir, std::optional<gid_t> group) {
  // Parents first (mode 0700 too), tolerating ones that exist.
  for (size_t pos = dir.find('/', 1); pos != std::string::npos; pos = dir.find('/', pos + 1)) {
    std::string parent = dir.substr(0, pos);
    if (::mkdir(parent.c_str(), 0700) != 0 && errno != EEXIST)
      return errno_error(StatusCode::kIoError, "mkdir " + parent, errno);
  }
  if (::mkdir(dir.c_str(), 0700) != 0) {
    if (errno == EEXIST) return ok_result();  // someone else's: check_dir judges it
    return errno_error(StatusCode::kIoError, "mkdir " + dir, errno);
  }
  // Ours: group first, then the mode, set explicitly since mkdir's follows the umask. Until then
  // it is 0700 at most, so nobody else enters it meanwhile.
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd) return errno_error(StatusCode::kIoError, "open " + dir, errno);
  if (group && ::fchown(fd.get(), static_cast<uid_t>(-1), *group) != 0)
    return errno_error(StatusCode::kIoError, "chgrp " + std::to_string(*group) + " " + dir, errno);
  // Sticky: members of the group may add their own files but not rename or remove the server's
  // record and socket (which would hide it from every client).
  if (::fchmod(fd.get(), 01770) != 0)
    return errno_error(StatusCode::kIoError, "chmod " + dir, errno);
  return ok_result();
}

// Opens a record or lock file of the runtime directory without ever blocking or following a
// link: a FIFO opened for reading would wait for a writer for ever. Returns the descriptor and
// its stat; kNotPermitted when it is not a regular file or its owner is not trusted.
Result<std::pair<UniqueFd, struct stat>> open_registry_file(const std::string& path, int flags,
                                                            const TrustPolicy& trust) {
  UniqueFd fd(::open(path.c_str(), flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0644));
  if (!fd) {
    int err = errno;
    if (err == ELOOP) return make_error(StatusCode::kNotPermitted, path + " is a symlink");
    return errno_error(err == ENOENT ? StatusCode::kNotFound : StatusCode::kIoError, "open " + path,
                       err);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return errno_error(StatusCode::kIoError, "stat " + path, errno);
  if (!S_ISREG(st.st_mode))
    return make_error(StatusCode::kNotPermitted, path + " is not a regular file");
  if (!trust.allows(st.st_uid))
    return make_error(StatusCode::kNotPermitted,
                      path + " belongs to uid " + std::to_string(st.st_uid) +
                          ", not a trusted owner (" + trust.describe() + ")");
  return std::pair<UniqueFd, struct stat>(std::move(fd), st);
}

// The record's text and its owner; kInvalidArgument when it is too large.
Result<std::pair<std::string, uid_t>> read_record(const std::string& path,
                                                  const TrustPolicy& trust) {
  COMPANION_ASSIGN_OR_RETURN(auto opened, open_registry_file(path, O_RDONLY, trust));
  auto& [fd, st] = opened;
  if (st.st_size > static_cast<off_t>(kMaxRecordBytes))
    return make_error(StatusCode::kInvalidArgument, path + " is larger than 64 KiB");
  std::string text(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = ::read(fd.get(), text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error(StatusCode::kIoError, "read " + path, errno);
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  text.resize(done);
  return std::pair<std::string, uid_t>(std::move(text), st.st_uid);
}

// Says once per path and reason why a record is skipped: listings repeat several times a second.
void report_skipped(const std::string& path, const std::string& why) {
  static std::mutex mutex;
  static std::set<std::string> reported;
  std::lock_guard<std::mutex> lock(mutex);
  if (reported.size() > 1024) return;  // bounded: a flood of planted files says no more
  if (reported.insert(path + '\n' + why).second)
    log::warn("ignoring registry record " + path + ": " + why);
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

enum class Liveness { kAlive, kDead, kUntrusted };

// Decides whether the instance `id` is alive without blocking. If its lock can be taken the
// instance is dead and its files are removed (json, sock, then lock while holding it). A missing
// lock file means dead too: it is created just to hold it while cleaning, so a server
// re-registering the same id meanwhile is never disturbed. When liveness cannot be determined
// (unexpected errors), the instance is reported alive and nothing is removed. A lock file that
// is not a regular file of a trusted owner is kUntrusted: its record is skipped, nothing removed.
Liveness check_and_reap(const LocalRegistry& reg, const std::string& id, const TrustPolicy& trust) {
  const std::string lock_path = reg.lock_path_for(id);
  auto opened = open_registry_file(lock_path, O_RDONLY | O_CREAT, trust);
  if (!opened.ok()) {
    // Not a regular file of a trusted owner: not ours to judge or remove.
    if (opened.error().code == StatusCode::kNotPermitted) return Liveness::kUntrusted;
    return Liveness::kAlive;
  }
  UniqueFd fd = std::move(opened->first);
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

LocalRegistry::LocalRegistry(std::string runtime_dir)
    : LocalRegistry(std::move(runtime_dir), [] {
        auto trust = TrustPolicy::from_environment();
        if (trust.ok()) return std::move(trust).value();
        log::warn(trust.error().message + "; trusting only this user and root");
        return TrustPolicy();
      }()) {}

LocalRegistry::LocalRegistry(std::string runtime_dir, TrustPolicy trust)
    : dir_(std::move(runtime_dir)), trust_(std::move(trust)) {}

Result<void> LocalRegistry::ensure_dir() const {
  if (dir_.empty()) return make_error(StatusCode::kInvalidArgument, "runtime directory is empty");
  COMPANION_ASSIGN_OR_RETURN(bool exists, check_dir(dir_, trust_));
  if (exists) return ok_result();
  COMPANION_TRY(make_dirs(dir_, dir_group_));
  // Re-check: it may have been created concurrently, by someone else.
  COMPANION_ASSIGN_OR_RETURN(exists, check_dir(dir_, trust_));
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
  if (rec.socket_path.front() != '/') {
    // Records name absolute paths: clients run in other directories.
    char cwd[4096];
    if (::getcwd(cwd, sizeof(cwd)) == nullptr)
      return errno_error(StatusCode::kIoError, "getcwd", errno);
    rec.socket_path = join(cwd, rec.socket_path);
  }
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
    COMPANION_ASSIGN_OR_RETURN(auto opened,
                               open_registry_file(lock_path, O_RDWR | O_CREAT, trust_));
    UniqueFd fd = std::move(opened.first);
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
  COMPANION_ASSIGN_OR_RETURN(bool exists, check_dir(dir_, trust_));
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
    auto text = read_record(json_path, trust_);
    if (!text.ok() && text.error().code == StatusCode::kNotPermitted) {
      // Planted by someone we do not trust, or not a file: never read, never removed.
      report_skipped(json_path, text.error().message);
      continue;
    }
    if (!text.ok() && text.error().code != StatusCode::kInvalidArgument) continue;  // gone
    Result<ServerIdentity> parsed =
        text.ok() ? record_from_json(text->first) : Result<ServerIdentity>(std::move(text).error());
    if (parsed.ok() && parsed->instance_id != id)
      parsed = make_error(StatusCode::kInvalidArgument, "record id does not match its file name");
    if (!parsed.ok()) {
      // Unreadable: skip it; once it is old and nobody holds its lock, remove it.
      struct stat st {};
      if (::lstat(json_path.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
          unix_time_ms() - mtime_ms(st) > kCorruptRecordGraceMs)
        (void)check_and_reap(*this, id, trust_);
      continue;
    }
    // Liveness is checked for every record, not only matching ones, so dead ones of any
    // namespace are cleaned up.
    Liveness liveness = check_and_reap(*this, id, trust_);
    if (liveness == Liveness::kUntrusted)
      report_skipped(json_path, "its lock file " + lock_path_for(id) +
                                    " is not a regular file of a trusted owner");
    if (liveness != Liveness::kAlive) continue;
    // The socket must be the record owner's: a record cannot vouch for someone else's server.
    auto socket_owner = trusted_socket_owner(parsed->socket_path, trust_);
    if (!socket_owner.ok() && socket_owner.error().code != StatusCode::kUnavailable) {
      report_skipped(json_path, socket_owner.error().message);
      continue;
    }
    if (socket_owner.ok() && *socket_owner != text->second) {
      report_skipped(json_path, "its socket " + parsed->socket_path + " belongs to uid " +
                                    std::to_string(*socket_owner) + ", the record to uid " +
                                    std::to_string(text->second));
      continue;
    }
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
