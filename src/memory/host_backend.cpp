// Host backend: each segment is a memfd. The server maps it read-write while loading, then unmaps
// and seals it (no writes, no resizes), so clients can only ever map it read-only.
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

namespace companion::memory {
namespace {

constexpr unsigned int kSeals = F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL;

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
    return i < segments_.size() ? segments_[i].writable : nullptr;
  }

  Result<void> write(size_t i, uint64_t offset, const void* src, uint64_t bytes) override {
    if (i >= segments_.size() || segments_[i].writable == nullptr)
      return make_error(StatusCode::kInternal, "write to a sealed or missing host segment");
    if (offset > segments_[i].size || bytes > segments_[i].size - offset)
      return make_error(StatusCode::kInternal, "write past the end of a host segment");
    std::memcpy(static_cast<char*>(segments_[i].writable) + offset, src, bytes);
    return ok_result();
  }

  Result<void> seal() override {
    if (sealed_) return ok_result();
    // F_SEAL_WRITE is refused while writable shared mappings exist: unmap first.
    unmap_all();
    for (auto& s : segments_) {
      if (::fcntl(s.fd.get(), F_ADD_SEALS, kSeals) != 0)
        return errno_error(StatusCode::kInternal, "seal memfd", errno);
    }
    sealed_ = true;
    return ok_result();
  }

  Result<std::vector<SegmentExport>> export_segments() override {
    if (!sealed_) return make_error(StatusCode::kNotReady, "slab is not sealed yet");
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

 private:
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
  HostMapping(const void* p, uint64_t size) : p_(p), size_(size) {}
  ~HostMapping() override {
    if (p_ != nullptr) ::munmap(const_cast<void*>(p_), size_);
  }
  const void* address() const noexcept override { return p_; }
  uint64_t size() const noexcept override { return size_; }
  bool on_device() const noexcept override { return false; }

 private:
  const void* p_;
  uint64_t size_;
};

}  // namespace

std::unique_ptr<Backend> make_host_backend() {
  return std::make_unique<HostBackend>();
}

Result<std::unique_ptr<MappedSegment>> import_host_segment(UniqueFd fd, uint64_t size) {
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
