// Host backend: each segment is a memfd. The server maps it read-write while loading, then unmaps
// and seals it (no writes, no resizes), so clients can only ever map it read-only. A published
// slab is written by one client instead (export_writable), which must drop its writable mapping
// (make_read_only or unmap) before the seal can succeed.
#include "memory/host_backend.hpp"

#include <fcntl.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "memory/host_checksum.hpp"

namespace companion::memory {
namespace {

constexpr unsigned int kSeals = F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL;
// Set at allocation: a writer client may fill the memfd but never resize it under the server.
constexpr unsigned int kSizeSeals = F_SEAL_GROW | F_SEAL_SHRINK;

// A new read-only open of the file behind fd (through /proc/self/fd). A MAP_SHARED mapping of a
// read-only open is not a writable mapping: it neither blocks F_SEAL_WRITE nor can be mprotect'ed
// to writable, unlike a PROT_READ mapping of the read-write memfd fd.
Result<UniqueFd> reopen_read_only(int fd) {
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  UniqueFd ro(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!ro) return errno_error(StatusCode::kInternal, "reopen memfd read-only", errno);
  return ro;
}

uint64_t page_size() {
  return static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

struct HostSegment {
  UniqueFd fd;
  uint64_t size = 0;
  void* writable = nullptr;  // mapping used while loading; gone once sealed
};

class HostSlab final : public Slab {
 public:
  ~HostSlab() override { unmap_all(); }

  Result<void> add(uint64_t size, const std::string& label, size_t index) {
    std::string name = "companion:" + label + ":" + std::to_string(index);
    UniqueFd fd(::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
    if (!fd) return errno_error(StatusCode::kOutOfMemory, "memfd_create", errno);
    if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
      return errno_error(StatusCode::kOutOfMemory, "size memfd to " + std::to_string(size), errno);
    if (::fcntl(fd.get(), F_ADD_SEALS, kSizeSeals) != 0)
      return errno_error(StatusCode::kInternal, "seal memfd size", errno);
    void* p = nullptr;
    if (size > 0) {
      p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
      if (p == MAP_FAILED) return errno_error(StatusCode::kOutOfMemory, "mmap memfd", errno);
    }
    segments_.push_back(HostSegment{std::move(fd), size, p});
    return ok_result();
  }

  SegmentKind kind() const noexcept override { return SegmentKind::kHostMemfd; }
  size_t segment_count() const noexcept override { return segments_.size(); }
  uint64_t segment_size(size_t i) const noexcept override {
    return i < segments_.size() ? segments_[i].size : 0;
  }
  void* host_address(size_t i) noexcept override {
    if (i >= segments_.size() || sealed_) return nullptr;
    (void)map_writable(segments_[i]);  // again after a seal() that failed
    return segments_[i].writable;
  }

  Result<void> write(size_t i, uint64_t offset, const void* src, uint64_t bytes) override {
    if (i >= segments_.size() || sealed_ || !map_writable(segments_[i]).ok())
      return make_error(StatusCode::kInternal, "write to a sealed or missing host segment");
    if (offset > segments_[i].size || bytes > segments_[i].size - offset)
      return make_error(StatusCode::kInternal, "write past the end of a host segment");
    std::memcpy(static_cast<char*>(segments_[i].writable) + offset, src, bytes);
    return ok_result();
  }

  Result<void> seal() override {
    if (sealed_) return ok_result();
    // F_SEAL_WRITE is refused while writable shared mappings exist: this process's own go first.
    // Another process's (a writer that kept its mapping) makes it fail with EBUSY: kModelInUse,
    // and the slab stays unsealed so that seal() can be tried again. Segments sealed before the
    // failing one stay sealed (seals cannot be removed); a retry skips them.
    unmap_all();
    for (size_t i = 0; i < segments_.size(); ++i) {
      const int fd = segments_[i].fd.get();
      const int have = ::fcntl(fd, F_GET_SEALS);
      if (have >= 0 && (static_cast<unsigned>(have) & kSeals) == kSeals) continue;
      if (::fcntl(fd, F_ADD_SEALS, kSeals) != 0) {
        const int err = errno;
        if (err == EBUSY) {
          return make_error(StatusCode::kModelInUse,
                            "segment " + std::to_string(i) +
                                " is still mapped writable by a process (the writer must drop "
                                "its writable mapping before the seal)");
        }
        return errno_error(StatusCode::kInternal, "seal memfd", err);
      }
    }
    sealed_ = true;
    return ok_result();
  }

  Result<std::vector<SegmentExport>> export_segments() override {
    if (!sealed_) return make_error(StatusCode::kNotReady, "slab is not sealed yet");
    return duplicate_segments();
  }

  Result<std::vector<SegmentExport>> export_writable() override {
    if (sealed_) {
      return make_error(StatusCode::kInvalidArgument,
                        "host slab is sealed: it cannot be exported writable");
    }
    return duplicate_segments();
  }

  // A fresh descriptor of every segment's memfd: what readers and the writer are sent alike (the
  // seals, not the descriptor, decide what a receiver may do with it).
  Result<std::vector<SegmentExport>> duplicate_segments() const {
    std::vector<SegmentExport> out;
    out.reserve(segments_.size());
    for (const auto& s : segments_) {
      SegmentExport e;
      e.kind = SegmentKind::kHostMemfd;
      e.size = s.size;
      e.fd.reset(::fcntl(s.fd.get(), F_DUPFD_CLOEXEC, 0));
      if (!e.fd) return errno_error(StatusCode::kInternal, "dup memfd", errno);
      out.push_back(std::move(e));
    }
    return out;
  }

  Result<uint64_t> digest(size_t i) override {
    if (i >= segments_.size()) {
      return make_error(StatusCode::kInvalidArgument,
                        "segment " + std::to_string(i) + " out of range");
    }
    const HostSegment& s = segments_[i];
    if (s.size == 0) return host_wsum64(nullptr, 0);
    if (s.writable != nullptr) return host_wsum64(s.writable, s.size);
    // A private read-only mapping: no writable mapping appears (the seal is not disturbed) and
    // it works on a write-sealed memfd too.
    void* p = ::mmap(nullptr, s.size, PROT_READ, MAP_PRIVATE, s.fd.get(), 0);
    if (p == MAP_FAILED) return errno_error(StatusCode::kIoError, "mmap memfd for digest", errno);
    const uint64_t sum = host_wsum64(p, s.size);
    ::munmap(p, s.size);
    return sum;
  }

 private:
  static Result<void> map_writable(HostSegment& s) noexcept {
    if (s.writable != nullptr || s.size == 0) return ok_result();
    void* p = ::mmap(nullptr, s.size, PROT_READ | PROT_WRITE, MAP_SHARED, s.fd.get(), 0);
    if (p == MAP_FAILED) return errno_error(StatusCode::kOutOfMemory, "mmap memfd", errno);
    s.writable = p;
    return ok_result();
  }

  void unmap_all() {
    for (auto& s : segments_) {
      if (s.writable != nullptr) ::munmap(s.writable, s.size);
      s.writable = nullptr;
    }
  }

  std::vector<HostSegment> segments_;
  bool sealed_ = false;
};

// "MemAvailable:   123456 kB" → bytes of the named field of /proc/meminfo (or a memory.stat-like
// "name value" file when kb is false).
std::optional<uint64_t> read_field(const std::string& path, const std::string& name, bool kb) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string key;
    uint64_t value = 0;
    if (!(fields >> key >> value)) continue;
    if (!key.empty() && key.back() == ':') key.pop_back();
    if (key == name) return kb ? value * 1024 : value;
  }
  return std::nullopt;
}

std::optional<uint64_t> read_number(const std::string& path) {
  std::ifstream in(path);
  std::string text;
  if (!(in >> text) || text == "max") return std::nullopt;
  try {
    return static_cast<uint64_t>(std::stoull(text));
  } catch (...) {
    return std::nullopt;
  }
}

// The tightest cgroup memory limit on the way from this process's cgroup to the root, as (room
// left, limit): v2 memory.max, or v1 memory.limit_in_bytes. Page cache is reclaimable and counts
// as room; memfd pages (shmem) do not.
std::optional<MemoryAvailability> cgroup_room() {
  struct Layout {
    std::string mount, limit, usage;
  };
  std::ifstream self("/proc/self/cgroup");
  std::string line;
  std::optional<MemoryAvailability> tightest;
  while (std::getline(self, line)) {
    // "0::/path" (v2) or "4:memory:/path" (v1; the controller list may hold others).
    size_t first = line.find(':');
    size_t second = first == std::string::npos ? first : line.find(':', first + 1);
    if (second == std::string::npos) continue;
    std::string controllers = line.substr(first + 1, second - first - 1);
    std::string path = line.substr(second + 1);
    Layout layout;
    if (line.rfind("0::", 0) == 0) {
      layout = {"/sys/fs/cgroup", "memory.max", "memory.current"};
    } else if (("," + controllers + ",").find(",memory,") != std::string::npos) {
      layout = {"/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"};
    } else {
      continue;
    }
    if (path.empty() || path[0] != '/') continue;
    for (int depth = 0; depth < 64; ++depth) {
      std::string dir = layout.mount + (path == "/" ? std::string() : path);
      auto limit = read_number(dir + "/" + layout.limit);
      auto current = read_number(dir + "/" + layout.usage);
      if (limit && current && *limit < (1ull << 60)) {
        uint64_t reclaimable = read_field(dir + "/memory.stat", "active_file", false).value_or(0) +
                               read_field(dir + "/memory.stat", "inactive_file", false).value_or(0);
        uint64_t used = *current > reclaimable ? *current - reclaimable : 0;
        uint64_t room = *limit > used ? *limit - used : 0;
        if (!tightest || room < tightest->available) tightest = MemoryAvailability{room, *limit};
      }
      if (path == "/") break;
      size_t slash = path.rfind('/');
      path = slash == 0 ? "/" : path.substr(0, slash);
    }
  }
  return tightest;
}

class HostBackend final : public Backend {
 public:
  std::string name() const override { return "host"; }
  uint64_t granularity() const noexcept override { return page_size(); }
  uint64_t max_segment_bytes() const noexcept override { return 64ull << 30; }

  Result<std::unique_ptr<Slab>> allocate(const std::vector<uint64_t>& sizes,
                                         const std::string& label) override {
    auto slab = std::make_unique<HostSlab>();
    for (size_t i = 0; i < sizes.size(); ++i) {
      if (sizes[i] % granularity() != 0)
        return make_error(StatusCode::kInternal, "segment size is not a multiple of the page");
      COMPANION_TRY(slab->add(sizes[i], label, i));
    }
    return std::unique_ptr<Slab>(std::move(slab));
  }

  Result<MemoryAvailability> available_bytes() const override {
    auto available = read_field("/proc/meminfo", "MemAvailable", true);
    auto total = read_field("/proc/meminfo", "MemTotal", true);
    if (!available || !total)
      return make_error(StatusCode::kUnavailable, "no MemAvailable in /proc/meminfo");
    MemoryAvailability out{*available, *total};
    if (auto cgroup = cgroup_room()) {
      out.available = std::min(out.available, cgroup->available);
      out.total = std::min(out.total, cgroup->total);
    }
    return out;
  }
};

class HostMapping final : public MappedSegment {
 public:
  // fd: kept while the mapping is writable, to map the same pages read-only in its place.
  HostMapping(const void* p, uint64_t size, UniqueFd fd = UniqueFd())
      : p_(p), size_(size), fd_(std::move(fd)) {}
  ~HostMapping() override {
    if (p_ != nullptr) ::munmap(const_cast<void*>(p_), size_);
  }
  const void* address() const noexcept override { return p_; }
  uint64_t size() const noexcept override { return size_; }
  bool on_device() const noexcept override { return false; }
  bool writable() const noexcept override { return fd_.valid(); }

  Result<void> make_read_only() override {
    if (!fd_) return ok_result();
    if (p_ != nullptr) {
      // Mapped from a read-only open of the memfd: the new mapping is not writable in the
      // kernel's eyes (VM_MAYWRITE clear), so the server's F_SEAL_WRITE no longer sees it.
      COMPANION_ASSIGN_OR_RETURN(UniqueFd ro, reopen_read_only(fd_.get()));
      void* p =
          ::mmap(const_cast<void*>(p_), size_, PROT_READ, MAP_SHARED | MAP_FIXED, ro.get(), 0);
      if (p == MAP_FAILED) {
        return errno_error(StatusCode::kIoError, "map the segment again read-only", errno);
      }
    }
    fd_.reset();
    return ok_result();
  }

 private:
  const void* p_;
  uint64_t size_;
  UniqueFd fd_;
};

// The writer's half: an unsealed memfd mapped read-write.
Result<std::unique_ptr<MappedSegment>> import_writable_host_segment(UniqueFd fd, uint64_t size) {
  int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0) return make_error(StatusCode::kProtocolError, "segment fd is not a memfd");
  if ((static_cast<unsigned>(seals) & F_SEAL_WRITE) != 0)
    return make_error(StatusCode::kInvalidArgument, "segment is sealed: it cannot be written");
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return errno_error(StatusCode::kIoError, "fstat segment", errno);
  if (static_cast<uint64_t>(st.st_size) != size)
    return make_error(StatusCode::kProtocolError, "segment size does not match its memfd");
  if (size == 0) {
    return std::unique_ptr<MappedSegment>(std::make_unique<HostMapping>(nullptr, 0, std::move(fd)));
  }
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return errno_error(StatusCode::kIoError, "mmap segment writable", errno);
  return std::unique_ptr<MappedSegment>(std::make_unique<HostMapping>(p, size, std::move(fd)));
}

}  // namespace

std::unique_ptr<Backend> make_host_backend() {
  return std::make_unique<HostBackend>();
}

Result<std::unique_ptr<MappedSegment>> import_host_segment(UniqueFd fd, uint64_t size,
                                                           Access access) {
  if (access == Access::kReadWrite) return import_writable_host_segment(std::move(fd), size);
  // Refuse anything that is not a sealed memfd of the announced size: a client must never map
  // memory the server could still change under it.
  int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0 || (static_cast<unsigned>(seals) & (F_SEAL_WRITE | F_SEAL_SHRINK)) !=
                       (F_SEAL_WRITE | F_SEAL_SHRINK))
    return make_error(StatusCode::kProtocolError, "segment fd is not a sealed memfd");
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return errno_error(StatusCode::kIoError, "fstat segment", errno);
  if (static_cast<uint64_t>(st.st_size) != size)
    return make_error(StatusCode::kProtocolError, "segment size does not match its memfd");
  if (size == 0) return std::unique_ptr<MappedSegment>(std::make_unique<HostMapping>(nullptr, 0));
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return errno_error(StatusCode::kIoError, "mmap segment", errno);
  return std::unique_ptr<MappedSegment>(std::make_unique<HostMapping>(p, size));
}

}  // namespace companion::memory
