// Opening files beneath the model roots with openat2(RESOLVE_BENEATH), or, where that cannot be
// used, by checking where an O_PATH descriptor really is before reopening that descriptor.
#include "checkpoint/open_beneath.hpp"

#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdlib>

#include "checkpoint/checkpoint.hpp"
#include "checkpoint/source.hpp"

namespace companion::checkpoint {
namespace {

constexpr int kReadFlags = O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY;
// openat2 answers EAGAIN when a rename raced with a RESOLVE_BENEATH lookup.
constexpr int kRaceRetries = 8;

std::atomic<uint64_t> g_refusals[5];
std::atomic<bool> g_use_openat2{true};

Error outside(const std::string& path) {
  count_refusal(Refusal::kOutsideRoots);
  return make_error(StatusCode::kNotPermitted,
                    path + " is outside the directories this server may read");
}

// Absolute, without empty or "." components; ".." is kept (such a path is under no root
// lexically, and is then judged by its real location).
std::string clean_absolute(const std::string& path) {
  std::string cleaned;
  size_t pos = 1;
  while (pos <= path.size()) {
    size_t next = path.find('/', pos);
    if (next == std::string::npos) next = path.size();
    std::string_view part(path.data() + pos, next - pos);
    if (!part.empty() && part != ".") cleaned.append("/").append(part);
    pos = next + 1;
  }
  return cleaned.empty() ? std::string("/") : cleaned;
}

// The outermost root that holds `path` by name alone; "" when none does.
std::string holding_root(const std::string& path, const std::vector<std::string>& roots) {
  std::string best;
  for (const std::string& root : roots) {
    if (is_under_roots(path, {root}) && (best.empty() || root.size() < best.size())) best = root;
  }
  return best;
}

std::string relative_to(const std::string& path, const std::string& root) {
  if (path.size() <= root.size()) return ".";
  return path.substr(root == "/" ? 1 : root.size() + 1);
}

long openat2_beneath(int dir_fd, const std::string& relative, int flags) {
  struct open_how how {};
  how.flags = static_cast<uint64_t>(flags);
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
  if (!g_use_openat2.load(std::memory_order_relaxed)) {
    errno = ENOSYS;
    return -1;
  }
  for (int attempt = 0;; ++attempt) {
    long fd = ::syscall(SYS_openat2, dir_fd, relative.c_str(), &how, sizeof(how));
    if (fd >= 0 || errno != EAGAIN || attempt == kRaceRetries) return fd;
  }
}

// Kernels before 5.6 (ENOSYS), seccomp filters that refuse it (EPERM) or do not know its
// arguments (E2BIG, EINVAL): open some other way.
bool openat2_unusable(int err) {
  return err == ENOSYS || err == EPERM || err == E2BIG || err == EINVAL;
}

Error open_error(int err, const std::string& path) {
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return make_error(StatusCode::kNotFound, path + " does not exist");
    case EACCES:
      return errno_error(StatusCode::kNotPermitted, "open " + path, err);
    case ENXIO:  // a socket, or a device without its driver
      count_refusal(Refusal::kNotRegular);
      return make_error(StatusCode::kBadCheckpoint,
                        path + " is not a regular file or directory (a socket?)");
    case ELOOP:
      return make_error(StatusCode::kBadCheckpoint, path + ": too many levels of symbolic links");
    default:
      return errno_error(StatusCode::kIoError, "open " + path, err);
  }
}

Result<OpenedFile> finish_open(UniqueFd fd, const std::string& shown) {
  OpenedFile out;
  out.path = shown;
  out.fd = std::move(fd);
  if (::fstat(out.fd.get(), &out.st) != 0)
    return errno_error(StatusCode::kIoError, "stat " + shown, errno);
  // O_NONBLOCK was for the open (a FIFO must not wait for a writer); a regular file's reads do
  // not need it, and some file systems (FUSE) would pass it on.
  if (S_ISREG(out.st.st_mode)) {
    int flags = ::fcntl(out.fd.get(), F_GETFL);
    if (flags < 0 || ::fcntl(out.fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0)
      return errno_error(StatusCode::kIoError, "fcntl " + shown, errno);
  }
  return out;
}

// The fallback: an O_PATH descriptor (which opens nothing: no FIFO, no device) is checked for
// where it really is, then that same descriptor is reopened through /proc/self/fd. When the path
// already led out of the root that names it (`hide_missing`), a missing target is reported as
// outside too: whether something exists out there is none of the caller's business.
Result<OpenedFile> open_checked(const std::string& location, const std::string& shown,
                                const std::vector<std::string>& roots, bool hide_missing) {
  UniqueFd where(::open(location.c_str(), O_PATH | O_CLOEXEC));
  if (!where) {
    int err = errno;
    return hide_missing ? outside(shown) : open_error(err, shown);
  }
  std::string real = descriptor_path(where.get());
  if (real.empty() || !is_under_roots(real, roots)) return outside(shown);
  struct stat st {};
  if (::fstat(where.get(), &st) != 0)
    return errno_error(StatusCode::kIoError, "stat " + shown, errno);
  if (S_ISSOCK(st.st_mode)) return open_error(ENXIO, shown);
  std::string self = "/proc/self/fd/" + std::to_string(where.get());
  UniqueFd fd(::open(self.c_str(), kReadFlags));
  if (!fd) return open_error(errno, shown);
  COMPANION_ASSIGN_OR_RETURN(OpenedFile out, finish_open(std::move(fd), shown));
  if (out.st.st_dev != st.st_dev || out.st.st_ino != st.st_ino)
    return make_error(StatusCode::kIoError, "reopening " + shown + " gave another file");
  return out;
}

// A real path for a path under no root by name (one reached through a symlink elsewhere, or
// with ".." in it), if it lands under one.
Result<std::string> real_location_under_roots(const std::string& location, const std::string& shown,
                                              const std::vector<std::string>& roots) {
  char* resolved = ::realpath(location.c_str(), nullptr);
  if (resolved == nullptr) return outside(shown);
  std::string real(resolved);
  std::free(resolved);
  if (!is_under_roots(real, roots)) return outside(shown);
  return real;
}

}  // namespace

void count_refusal(Refusal kind) {
  g_refusals[static_cast<size_t>(kind)].fetch_add(1, std::memory_order_relaxed);
}

RefusalCounts refusal_counts() {
  auto get = [](Refusal kind) {
    return g_refusals[static_cast<size_t>(kind)].load(std::memory_order_relaxed);
  };
  RefusalCounts counts;
  counts.outside_roots = get(Refusal::kOutsideRoots);
  counts.not_regular = get(Refusal::kNotRegular);
  counts.header_bytes = get(Refusal::kHeaderBytes);
  counts.tensors = get(Refusal::kTensors);
  counts.files = get(Refusal::kFiles);
  return counts;
}

void use_openat2_for_testing(bool enabled) {
  g_use_openat2.store(enabled, std::memory_order_relaxed);
}

std::string descriptor_path(int fd) {
  std::string link = "/proc/self/fd/" + std::to_string(fd);
  char buf[PATH_MAX];
  ssize_t n = ::readlink(link.c_str(), buf, sizeof(buf));
  if (n <= 0 || static_cast<size_t>(n) >= sizeof(buf) || buf[0] != '/') return "";
  return std::string(buf, static_cast<size_t>(n));
}

// The root directory as a descriptor, only if it is still where the canonical root names it: a
// parent renamed or a symlink put in the root's place since start would otherwise move the root.
// An invalid descriptor sends the caller to the checked fallback, which refuses such a move.
namespace {
UniqueFd open_root(const std::string& root) {
  UniqueFd fd(::open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (fd && descriptor_path(fd.get()) != root) fd.reset();
  return fd;
}
}  // namespace

Result<OpenedFile> open_under_roots(const std::string& path,
                                    const std::vector<std::string>& roots) {
  if (path.empty() || path[0] != '/')
    return make_error(StatusCode::kInvalidArgument, "\"" + path + "\" is not an absolute path");
  std::string location = clean_absolute(path);
  std::string root = holding_root(location, roots);
  if (root.empty()) {
    COMPANION_ASSIGN_OR_RETURN(location, real_location_under_roots(location, path, roots));
    root = holding_root(location, roots);
  }
  UniqueFd root_fd = open_root(root);
  if (!root_fd) return open_checked(location, path, roots, false);  // a root that is a file
  long fd = openat2_beneath(root_fd.get(), relative_to(location, root), kReadFlags);
  if (fd >= 0) return finish_open(UniqueFd(static_cast<int>(fd)), path);
  int err = errno;
  // Out of this root: allowed only into another root (checked on the descriptor).
  if (err == EXDEV) return open_checked(location, path, roots, true);
  if (openat2_unusable(err)) return open_checked(location, path, roots, false);
  return open_error(err, path);
}

Result<std::string> real_path_under_roots(const std::string& path,
                                          const std::vector<std::string>& roots) {
  if (path.empty() || path[0] != '/')
    return make_error(StatusCode::kInvalidArgument, "\"" + path + "\" is not an absolute path");
  std::string location = clean_absolute(path);
  std::string root = holding_root(location, roots);
  if (root.empty()) return real_location_under_roots(location, path, roots);
  UniqueFd root_fd = open_root(root);
  long fd = -1;
  int err = ENOSYS;
  if (root_fd) {
    fd = openat2_beneath(root_fd.get(), relative_to(location, root), O_PATH | O_CLOEXEC);
    err = errno;
  }
  UniqueFd where;
  if (fd >= 0) {
    where.reset(static_cast<int>(fd));
  } else if (err == EXDEV) {
    return real_location_under_roots(location, path, roots);
  } else if (openat2_unusable(err) || !root_fd) {
    where.reset(::open(location.c_str(), O_PATH | O_CLOEXEC));
    if (!where) return open_error(errno, path);
  } else {
    return open_error(err, path);
  }
  std::string real = descriptor_path(where.get());
  if (real.empty() || !is_under_roots(real, roots)) return outside(path);
  return real;
}

Result<std::string> read_opened_file(const OpenedFile& file, uint64_t max_bytes) {
  if (!S_ISREG(file.st.st_mode)) {
    count_refusal(Refusal::kNotRegular);
    return make_error(StatusCode::kBadCheckpoint, file.path + " is not a regular file");
  }
  auto size = static_cast<uint64_t>(file.st.st_size);
  if (size > max_bytes)
    return make_error(StatusCode::kBadCheckpoint, file.path + " is " + std::to_string(size) +
                                                      " bytes, over the limit of " +
                                                      std::to_string(max_bytes));
  std::string out(static_cast<size_t>(size), '\0');
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n =
        ::pread(file.fd.get(), out.data() + done, out.size() - done, static_cast<off_t>(done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_error(StatusCode::kIoError, "read " + file.path, errno);
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  out.resize(done);
  return out;
}

}  // namespace companion::checkpoint
