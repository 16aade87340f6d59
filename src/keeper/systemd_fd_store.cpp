#include "keeper/systemd_fd_store.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#ifdef COMPANION_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "common/log.hpp"
#include "keeper/fd_store_names.hpp"

namespace companion::keeper {

struct SystemdFdStore::Passed {
  std::map<uint32_t, UniqueFd> segments;
  UniqueFd table;
  UniqueFd catalog;
  bool duplicated = false;  // a name came twice
};

SystemdFdStore::~SystemdFdStore() = default;

namespace {

constexpr size_t kMaxCatalogBytes = 4u << 20;

size_t fdstore_max() {
  const char* text = std::getenv("FDSTORE");
  if (text == nullptr) return 0;
  char* end = nullptr;
  unsigned long long value = std::strtoull(text, &end, 10);
  return end != text && *end == '\0' ? static_cast<size_t>(value) : 0;
}

bool names_ours(const char* names) {
  if (names == nullptr) return false;
  std::string_view all(names);
  while (!all.empty()) {
    size_t colon = all.find(':');
    if (parse_stored_name(all.substr(0, colon))) return true;
    if (colon == std::string_view::npos) break;
    all.remove_prefix(colon + 1);
  }
  return false;
}

Result<std::vector<uint8_t>> read_catalog(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return errno_error(StatusCode::kIoError, "fstat catalog", errno);
  if (st.st_size <= 0 || static_cast<uint64_t>(st.st_size) > kMaxCatalogBytes)
    return make_error(StatusCode::kProtocolError,
                      "its catalog is " + std::to_string(st.st_size) + " bytes");
  std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::pread(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error(StatusCode::kIoError, "read catalog", errno);
    if (n == 0) return make_error(StatusCode::kProtocolError, "its catalog is truncated");
    done += static_cast<size_t>(n);
  }
  return bytes;
}

// The catalog in a memfd sealed against any change: what the next server reads is what was
// written.
Result<UniqueFd> catalog_memfd(const std::vector<uint8_t>& catalog) {
  UniqueFd fd(::memfd_create("companion-catalog", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) return errno_error(StatusCode::kInternal, "memfd_create", errno);
  size_t done = 0;
  while (done < catalog.size()) {
    ssize_t n = ::write(fd.get(), catalog.data() + done, catalog.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return errno_error(StatusCode::kIoError, "write catalog memfd", errno);
    done += static_cast<size_t>(n);
  }
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) != 0)
    return errno_error(StatusCode::kInternal, "seal catalog memfd", errno);
  return fd;
}

}  // namespace

bool systemd_fd_store_built() {
#ifdef COMPANION_HAVE_SYSTEMD
  return true;
#else
  return false;
#endif
}

bool systemd_fd_store_offered() {
  const char* notify = std::getenv("NOTIFY_SOCKET");
  if (notify == nullptr || *notify == '\0') return false;
  return fdstore_max() > 0 || names_ours(std::getenv("LISTEN_FDNAMES"));
}

Result<std::unique_ptr<SystemdFdStore>> SystemdFdStore::open() {
#ifndef COMPANION_HAVE_SYSTEMD
  return make_error(StatusCode::kUnavailable,
                    "this companion was built without libsystemd (libsystemd-dev)");
#else
  const char* notify = std::getenv("NOTIFY_SOCKET");
  if (notify == nullptr || *notify == '\0')
    return make_error(StatusCode::kUnavailable, "NOTIFY_SOCKET is not set: not run by systemd");
  std::unique_ptr<SystemdFdStore> store(new SystemdFdStore());
  store->max_descriptors_ = fdstore_max();
  char** names = nullptr;
  int count = ::sd_listen_fds_with_names(1, &names);
  if (count < 0) return errno_error(StatusCode::kInternal, "sd_listen_fds_with_names", -count);
  for (int i = 0; i < count; ++i) {
    const int fd = SD_LISTEN_FDS_START + i;
    const char* text = names != nullptr ? names[i] : nullptr;
    auto name = text != nullptr ? parse_stored_name(text) : std::nullopt;
    if (!name) {
      log::debug(std::string("systemd passed descriptor ") + std::to_string(fd) + " (" +
                 (text != nullptr ? text : "unnamed") + "): not a kept generation's");
      continue;
    }
    auto& passed = store->passed_[name->id];
    if (!passed) passed = std::make_unique<Passed>();
    store->names_[name->id].push_back(text);
    ++store->stored_;
    UniqueFd owned(fd);
    UniqueFd* slot = name->part == StoredName::Part::kTable     ? &passed->table
                     : name->part == StoredName::Part::kCatalog ? &passed->catalog
                                                                : &passed->segments[name->index];
    if (*slot) passed->duplicated = true;
    *slot = std::move(owned);
  }
  if (names != nullptr) {
    for (int i = 0; i < count; ++i) std::free(names[i]);
    std::free(static_cast<void*>(names));
  }
  return store;
#endif
}

std::string SystemdFdStore::holder() const {
  return "systemd's file-descriptor store";
}

Result<void> SystemdFdStore::send(const std::string& state, std::span<const int> fds) {
#ifdef COMPANION_HAVE_SYSTEMD
  int r =
      ::sd_pid_notify_with_fds(0, 0, state.c_str(), fds.data(), static_cast<unsigned>(fds.size()));
  if (r < 0) return errno_error(StatusCode::kUnavailable, "sd_pid_notify_with_fds", -r);
  if (r == 0) return make_error(StatusCode::kUnavailable, "NOTIFY_SOCKET is not set");
  return ok_result();
#else
  (void)state;
  (void)fds;
  return make_error(StatusCode::kUnavailable, "built without libsystemd");
#endif
}

Result<std::vector<KeptGeneration>> SystemdFdStore::list() {
  std::vector<KeptGeneration> out;
  auto passed = std::move(passed_);
  for (auto& [id, p] : passed) {
    std::string why;
    if (p->duplicated) why = "a name came twice";
    if (why.empty() && !p->catalog) why = "no catalog";
    if (why.empty() && !p->table) why = "no table";
    if (why.empty() &&
        (p->segments.empty() || p->segments.rbegin()->first + 1 != p->segments.size()))
      why = "missing segments";
    std::vector<uint8_t> catalog;
    if (why.empty()) {
      auto read = read_catalog(p->catalog.get());
      if (read.ok())
        catalog = std::move(read).value();
      else
        why = read.error().message;
    }
    if (!why.empty()) {
      // A server stopped while storing it: nothing to adopt, and nothing systemd should keep.
      log::warn("systemd's file-descriptor store: generation " + std::to_string(id) +
                " is not usable (" + why + "); removed from the store");
      COMPANION_TRY(forget(id));
      continue;
    }
    KeptGeneration kept;
    kept.id = id;
    kept.catalog = std::move(catalog);
    for (auto& [index, fd] : p->segments) kept.fds.push_back(std::move(fd));
    kept.fds.push_back(std::move(p->table));
    out.push_back(std::move(kept));
  }
  return out;
}

Result<void> SystemdFdStore::keep(uint64_t id, const std::vector<uint8_t>& catalog,
                                  std::span<const int> fds) {
  if (fds.empty()) return make_error(StatusCode::kInvalidArgument, "nothing to keep");
  const size_t wanted = fds.size() + 1;
  if (max_descriptors_ != 0 && stored_ + wanted > max_descriptors_)
    return make_error(StatusCode::kLimitExceeded, "systemd's file-descriptor store would need " +
                                                      std::to_string(stored_ + wanted) +
                                                      " descriptors; FileDescriptorStoreMax= is " +
                                                      std::to_string(max_descriptors_));
  COMPANION_ASSIGN_OR_RETURN(UniqueFd catalog_fd, catalog_memfd(catalog));
  // The catalog goes last: a generation without one (a server that died mid-way) is dropped.
  std::vector<std::string>& names = names_[id];
  auto store = [&](const StoredName& name, int fd) -> Result<void> {
    std::string text = stored_name(name);
    COMPANION_TRY(send("FDSTORE=1\nFDNAME=" + text, std::span<const int>(&fd, 1)));
    names.push_back(std::move(text));
    ++stored_;
    return ok_result();
  };
  for (size_t i = 0; i + 1 < fds.size(); ++i)
    COMPANION_TRY(store({id, StoredName::Part::kSegment, static_cast<uint32_t>(i)}, fds[i]));
  COMPANION_TRY(store({id, StoredName::Part::kTable, 0}, fds.back()));
  COMPANION_TRY(store({id, StoredName::Part::kCatalog, 0}, catalog_fd.get()));
  return ok_result();
}

Result<void> SystemdFdStore::forget(uint64_t id) {
  auto it = names_.find(id);
  if (it == names_.end()) return ok_result();  // never stored (over the limit)
  std::vector<std::string> names = std::move(it->second);
  names_.erase(it);
  for (const auto& name : names) {
    COMPANION_TRY(send("FDSTOREREMOVE=1\nFDNAME=" + name));
    --stored_;
  }
  return ok_result();
}

size_t SystemdFdStore::forget_all() {
  size_t count = 0;
  passed_.clear();
  while (!names_.empty()) {
    uint64_t id = names_.begin()->first;
    auto forgotten = forget(id);
    if (!forgotten.ok()) {
      log::warn("systemd's file-descriptor store: " + forgotten.error().message);
      break;
    }
    ++count;
  }
  return count;
}

}  // namespace companion::keeper
