// Host backend: each segment is a memfd. The server maps it read-write while loading, then unmaps
// and seals it (no writes, no resizes), so clients can only ever map it read-only. A published
// slab is written by one client instead (export_writable), which must drop its writable mapping
// (make_read_only or unmap) before the seal can succeed.
//
// A segment's pages are reserved when the slab is created (fallocate), not when the loader first
// writes them: where the kernel reports a shortage (strict overcommit: ENOSPC) it is an error of
// the allocation, which the server reports, instead of a SIGBUS in the middle of a copy, which
// kills it. Under the default heuristic overcommit, or a cgroup limit, the kernel does not refuse
// shmem pages but runs the OOM killer: a slab past RAM + swap is refused before any page is
// taken, and one past what is free is refused by the store's admission (available_bytes()).
#include "memory/host_backend.hpp"

#include <fcntl.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
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

#include "common/util.hpp"
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

// "; MemAvailable 21.3 GiB": what the host had free when an allocation failed, for its message.
std::string mem_available_note() {
  auto available = read_field("/proc/meminfo", "MemAvailable", true);
  return "; MemAvailable " + (available ? format_bytes(*available) : std::string("unknown"));
}

// Pages are reserved in steps of this much: an interrupted fallocate loses (undoes) only the step
// it was in, and the next try resumes there.
constexpr uint64_t kReserveStepBytes = 1ull << 30;

enum class Reserved { kYes, kNotSupported };

// Makes shmem allocate (and zero) every page of the memfd now. fallocate rather than
// MADV_POPULATE_WRITE on the mapping: it needs no mapping (the pages do not count in the server's
// RSS until written, so the OOM killer does not pick the server for them), it reports shmem's
// ENOSPC as such where MADV_POPULATE_WRITE turns it into EFAULT, it undoes what it allocated when
// it fails, and shmem has it since Linux 3.5 (MADV_POPULATE_WRITE: 5.14). EOPNOTSUPP (a kernel or
// shmem without it): kNotSupported, and the pages come as they are written, as they did before.
// EINTR (older kernels stop on any signal, newer ones on a fatal one): the interrupted step was
// undone by the kernel and is tried again.
Result<Reserved> reserve_pages(int fd, uint64_t size, const std::string& what) {
  uint64_t done = 0;
  while (done < size) {
    const uint64_t step = std::min(kReserveStepBytes, size - done);
    if (::fallocate(fd, 0, static_cast<off_t>(done), static_cast<off_t>(step)) == 0) {
      done += step;
      continue;
    }
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EOPNOTSUPP) return Reserved::kNotSupported;
    const StatusCode code = (err == ENOSPC || err == ENOMEM || err == EFBIG)
                                ? StatusCode::kOutOfMemory
                                : StatusCode::kInternal;
    return make_error(code, "cannot reserve the " + format_bytes(size) + " of " + what + " (" +
                                format_bytes(done) + " reserved when fallocate failed: " +
                                std::strerror(err) + ")" + mem_available_note());
  }
  return Reserved::kYes;
}

// Whether fallocate works on a memfd here (one page, tried once per backend).
bool memfd_fallocate_works() {
  UniqueFd fd(::memfd_create("companion:probe", MFD_CLOEXEC));
  if (!fd || ::ftruncate(fd.get(), static_cast<off_t>(page_size())) != 0) return false;
  auto reserved = reserve_pages(fd.get(), page_size(), "a probe");
  return reserved.ok() && *reserved == Reserved::kYes;
}

struct HostSegment {
  UniqueFd fd;
  uint64_t size = 0;
  void* writable = nullptr;  // mapping used while loading; gone once sealed
};

class HostSlab final : public Slab {
 public:
  ~HostSlab() override { unmap_all(); }

  // A new segment of `size` bytes, its pages reserved when `reserve`. On an error nothing of it
  // is left (its descriptor closes, which frees whatever pages it had).
  Result<void> add(uint64_t size, const std::string& label, size_t index, bool reserve) {
    std::string name = "companion:" + label + ":" + std::to_string(index);
    UniqueFd fd(::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
    if (!fd) return errno_error(StatusCode::kOutOfMemory, "memfd_create", errno);
    if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
      return errno_error(StatusCode::kOutOfMemory, "size memfd to " + std::to_string(size), errno);
    if (::fcntl(fd.get(), F_ADD_SEALS, kSizeSeals) != 0)
      return errno_error(StatusCode::kInternal, "seal memfd size", errno);
    if (reserve && size > 0) {
      COMPANION_TRY(reserve_pages(fd.get(), size, "host segment " + std::to_string(index)));
    }
    void* p = nullptr;
    if (size > 0) {
      p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
      if (p == MAP_FAILED) return errno_error(StatusCode::kOutOfMemory, "mmap memfd", errno);
    }
    segments_.push_back(HostSegment{std::move(fd), size, p});
    return ok_result();
  }

  // A segment of an earlier server's slab: a memfd that must still carry every seal.
  Result<void> adopt(UniqueFd fd, uint64_t size, size_t index) {
    const int seals = ::fcntl(fd.get(), F_GET_SEALS);
    if (seals < 0 || (static_cast<unsigned>(seals) & kSeals) != kSeals)
      return make_error(StatusCode::kProtocolError,
                        "kept segment " + std::to_string(index) + " is not a sealed memfd");
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0 || static_cast<uint64_t>(st.st_size) != size)
      return make_error(StatusCode::kProtocolError,
                        "kept segment " + std::to_string(index) + " is not of its catalog's size");
    segments_.push_back(HostSegment{std::move(fd), size, nullptr});
    sealed_ = true;
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

  // pread of the memfd: works sealed or not, and maps nothing.
  Result<void> read(size_t i, uint64_t offset, void* dst, uint64_t bytes) override {
    if (i >= segments_.size() || offset > segments_[i].size || bytes > segments_[i].size - offset)
      return make_error(StatusCode::kInternal, "read past the end of a host segment");
    auto* out = static_cast<char*>(dst);
    while (bytes > 0) {
      const ssize_t n = ::pread(segments_[i].fd.get(), out, bytes, static_cast<off_t>(offset));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0)
        return errno_error(StatusCode::kIoError, "read host segment", n < 0 ? errno : EIO);
      out += n;
      offset += static_cast<uint64_t>(n);
      bytes -= static_cast<uint64_t>(n);
    }
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
    uint64_t total = 0;
    for (uint64_t size : sizes) {
      if (size % granularity() != 0)
        return make_error(StatusCode::kInternal, "segment size is not a multiple of the page");
      total = size > std::numeric_limits<uint64_t>::max() - total
                  ? std::numeric_limits<uint64_t>::max()
                  : total + size;
    }
    // More than all of RAM and swap can never be held. shmem takes its pages one by one, and the
    // kernel's overcommit heuristic (which refuses one allocation past RAM + swap) looks at each
    // page alone: a reservation this large would not fail, it would run the machine into the OOM
    // killer. The kernel's own figures (sysinfo), not /proc/meminfo, which a container may
    // replace.
    struct sysinfo info {};
    if (::sysinfo(&info) == 0) {
      const uint64_t unit = info.mem_unit == 0 ? 1 : info.mem_unit;
      const uint64_t ram = static_cast<uint64_t>(info.totalram) * unit;
      const uint64_t swap = static_cast<uint64_t>(info.totalswap) * unit;
      if (total > ram + swap) {
        return make_error(StatusCode::kOutOfMemory,
                          "a host slab of " + format_bytes(total) +
                              " is more than this machine's memory (" + format_bytes(ram) +
                              " RAM + " + format_bytes(swap) + " swap)" + mem_available_note());
      }
    }
    auto slab = std::make_unique<HostSlab>();
    for (size_t i = 0; i < sizes.size(); ++i) {
      // An error frees the segments made so far with the slab.
      COMPANION_TRY(slab->add(sizes[i], label, i, reserves_pages_));
    }
    return std::unique_ptr<Slab>(std::move(slab));
  }

  bool handles_outlive_process() const noexcept override { return true; }
  Result<std::unique_ptr<Slab>> adopt(std::vector<SegmentExport> segments,
                                      const std::string&) const override {
    auto slab = std::make_unique<HostSlab>();
    for (size_t i = 0; i < segments.size(); ++i) {
      if (segments[i].kind != SegmentKind::kHostMemfd || !segments[i].fd)
        return make_error(StatusCode::kProtocolError, "kept segment is not a host memfd");
      COMPANION_TRY(slab->adopt(std::move(segments[i].fd), segments[i].size, i));
    }
    return std::unique_ptr<Slab>(std::move(slab));
  }

  // Pages reserved at allocation show in MemAvailable from then on.
  bool allocation_is_resident() const noexcept override { return reserves_pages_; }

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

 private:
  // False where memfds have no fallocate: pages are then taken as the loader writes them.
  const bool reserves_pages_ = memfd_fallocate_works();
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
