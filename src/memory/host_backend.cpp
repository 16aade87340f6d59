// Host backend: each segment is a memfd. The server maps it read-write while loading, then unmaps
// and seals it (no writes, no resizes), so clients can only ever map it read-only.
#include "memory/host_backend.hpp"

#include <fcntl.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
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
