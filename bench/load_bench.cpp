// Load throughput pieces, one JSON line per measurement (bench/run_load_bench.py drives it):
//   load_bench h2d [--device 0] [--total-gib 8] [--copy-mib 256] [--streams 4]
//       pinned host -> device copies through the driver API: the PCIe ceiling
//   load_bench read --file F [--threads N] [--direct] [--chunk-mib 16]
//                   [--row-bytes R --take-bytes P [--take-offset O]]
//       the file read whole by N threads (O_DIRECT or through the page cache); with --row-bytes,
//       only P bytes at O of every R-byte row, one pread each, as a tensor-parallel rank reads
//       its part of a row-split tensor (pages_visited says how many 4 KiB pages that touches)
//   load_bench loader --dir D [--device host|0] [--backend cuda-vmm] [--threads N]
//                     [--chunk-mib 4] [--staging-mib 128] [--streams 4] [--direct auto|on|off]
//                     [--dtype BF16] [--pinned registered|hostalloc] [--keep-staging 1]
//                     [--repeat 1] [--verify] [--tp-size 1 --tp-rank 0] [--shard-rules R]
//       make_load_plan + load_into_slab of a checkpoint (or of one tensor-parallel shard of it, as
//       `companion load --tp-size --tp-rank` would plan it), without a server
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/checkpoint.hpp"
#include "common/unique_fd.hpp"
#include "companion/types.hpp"
#include "loader/loader.hpp"
#include "memory/backend.hpp"
#include "memory/cuda_backend.hpp"
#include "memory/cuda_driver.hpp"
#include "memory/cuda_slab.hpp"
#include "memory/host_backend.hpp"

namespace {

using namespace companion;
using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

double since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double gbps(uint64_t bytes, double seconds) {
  return seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0;
}

// CPU seconds (user + system) of every thread of the process so far: what a load costs, apart
// from waiting (steadier than wall time on a shared machine).
double cpu_seconds() {
  struct rusage u {};
  ::getrusage(RUSAGE_SELF, &u);
  auto s = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec * 1e-6; };
  return s(u.ru_utime) + s(u.ru_stime);
}

int fail(const Error& error) {
  std::cerr << "load_bench: " << error.to_string() << std::endl;
  return 1;
}

size_t default_threads() {
  return std::clamp<size_t>(std::thread::hardware_concurrency(), 1, 16);
}

// ---- h2d ---------------------------------------------------------------------------------------

struct H2dArgs {
  int device = 0;
  double total_gib = 8;
  uint64_t copy_mib = 256;
  size_t streams = 4;
};

Result<json> run_h2d(const H2dArgs& a) {
  namespace cuda = memory::cuda;
  COMPANION_ASSIGN_OR_RETURN(const cuda::DriverApi* api, cuda::driver());
  COMPANION_TRY(cuda::make_current(a.device));
  const uint64_t copy = a.copy_mib << 20;
  const size_t streams = std::max<size_t>(1, a.streams);
  // Pinned allocation speed too: staging buffers are allocated inside every first load.
  auto t_alloc = Clock::now();
  std::vector<cuda::PinnedHostBuffer> host;
  std::vector<cuda::Stream> stream;
  for (size_t i = 0; i < streams; ++i) {
    COMPANION_ASSIGN_OR_RETURN(auto buffer, cuda::PinnedHostBuffer::allocate(a.device, copy));
    std::memset(buffer.data(), static_cast<int>(i), copy);
    host.push_back(std::move(buffer));
  }
  double alloc_s = since(t_alloc);
  // The other way to pin staging memory (huge pages + cuMemHostRegister), same bytes.
  auto t_register = Clock::now();
  double register_gbps = 0;
  {
    std::vector<cuda::RegisteredHostBuffer> registered;
    for (size_t i = 0; i < streams; ++i) {
      auto buffer = cuda::RegisteredHostBuffer::allocate(a.device, copy);
      if (!buffer.ok()) break;
      registered.push_back(std::move(buffer).value());
    }
    if (registered.size() == streams) register_gbps = gbps(copy * streams, since(t_register));
  }
  for (size_t i = 0; i < streams; ++i) {
    COMPANION_ASSIGN_OR_RETURN(auto s, cuda::Stream::create(a.device));
    stream.push_back(std::move(s));
  }
  memory::cu::CUdeviceptr device = 0;
  COMPANION_TRY(COMPANION_CU(*api, cuMemAlloc, &device, copy * streams));
  auto copies = [&](uint64_t total) -> Result<void> {
    for (uint64_t done = 0, i = 0; done < total; done += copy, ++i) {
      size_t s = i % streams;
      COMPANION_TRY(stream[s].copy_to_device_async(device + s * copy, host[s].data(), copy));
    }
    for (auto& s : stream) COMPANION_TRY(s.synchronize());
    return ok_result();
  };
  auto measured = copies(copy * streams);  // warm-up
  uint64_t total = static_cast<uint64_t>(a.total_gib * (1ull << 30)) / copy * copy;
  auto start = Clock::now();
  if (measured.ok()) measured = copies(total);
  double seconds = since(start);
  (void)api->cuMemFree(device);
  COMPANION_TRY(measured);
  return json{{"measure", "h2d_pinned"},
              {"device", a.device},
              {"bytes", total},
              {"copy_bytes", copy},
              {"streams", streams},
              {"seconds", seconds},
              {"gbps", gbps(total, seconds)},
              {"pinned_alloc_gbps", gbps(copy * streams, alloc_s)},
              {"pinned_register_gbps", register_gbps}};
}

// ---- read --------------------------------------------------------------------------------------

struct ReadArgs {
  std::string file;
  size_t threads = 0;
  bool direct = false;
  uint64_t chunk_mib = 16;
  uint64_t row_bytes = 0;  // 0: whole chunks
  uint64_t take_bytes = 0;
  uint64_t take_offset = 0;
};

// Distinct 4 KiB pages that [offset, offset + bytes) touches.
uint64_t pages_touched(uint64_t offset, uint64_t bytes) {
  return bytes == 0 ? 0 : (offset + bytes - 1) / 4096 - offset / 4096 + 1;
}

Result<json> run_read(const ReadArgs& a) {
  int flags = O_RDONLY | O_CLOEXEC | (a.direct ? O_DIRECT : 0);
  UniqueFd fd(::open(a.file.c_str(), flags));
  if (!fd) return errno_error(StatusCode::kIoError, "open " + a.file, errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0)
    return errno_error(StatusCode::kIoError, "stat " + a.file, errno);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  const bool rows = a.row_bytes > 0;
  if (rows && (a.direct || a.take_bytes == 0 || a.take_offset + a.take_bytes > a.row_bytes))
    return make_error(StatusCode::kInvalidArgument,
                      "--row-bytes needs 0 < --take-offset + --take-bytes <= --row-bytes, and no "
                      "--direct");
  // Rows mode: each chunk holds whole rows.
  uint64_t chunk = std::max<uint64_t>(1, a.chunk_mib) << 20;
  if (rows) chunk = std::max<uint64_t>(1, chunk / a.row_bytes) * a.row_bytes;
  const uint64_t chunks = (size + chunk - 1) / chunk;
  const size_t threads = std::min<size_t>(a.threads == 0 ? default_threads() : a.threads,
                                          std::max<uint64_t>(1, chunks));
  std::atomic<uint64_t> next{0};
  std::atomic<uint64_t> bytes{0};
  std::atomic<uint64_t> pages{0};
  std::atomic<uint64_t> calls{0};
  std::atomic<int> error{0};
  auto start = Clock::now();
  double cpu0 = cpu_seconds();
  std::vector<std::thread> pool;
  for (size_t t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      char* buffer = static_cast<char*>(std::aligned_alloc(4096, chunk));
      if (buffer == nullptr) {
        error = ENOMEM;
        return;
      }
      auto read_exactly = [&](char* out, uint64_t want, uint64_t offset) -> uint64_t {
        uint64_t got = 0;
        while (got < want) {
          // O_DIRECT: whole blocks (the last read runs past the end of the file and stops there).
          uint64_t ask = a.direct ? (want - got + 4095) / 4096 * 4096 : want - got;
          ssize_t n = ::pread(fd.get(), out + got, ask, static_cast<off_t>(offset + got));
          if (n < 0 && errno == EINTR) continue;
          if (n <= 0) {
            error = n < 0 ? errno : EIO;
            break;
          }
          got += static_cast<uint64_t>(n);
        }
        return std::min(got, want);
      };
      uint64_t my_pages = 0, my_calls = 0;
      for (uint64_t i; (i = next.fetch_add(1)) < chunks && error.load() == 0;) {
        uint64_t offset = i * chunk;
        uint64_t want = std::min(chunk, size - offset);
        if (!rows) {
          bytes += read_exactly(buffer, want, offset);
          my_pages += pages_touched(offset, want);
          ++my_calls;
          continue;
        }
        // The chunk's rows (chunks are whole rows), the part of each packed into the buffer.
        uint64_t packed = 0;
        for (uint64_t row = offset; row + a.row_bytes <= offset + want && error.load() == 0;
             row += a.row_bytes) {
          packed += read_exactly(buffer + packed, a.take_bytes, row + a.take_offset);
          my_pages += pages_touched(row + a.take_offset, a.take_bytes);
          ++my_calls;
        }
        bytes += packed;
      }
      pages += my_pages;
      calls += my_calls;
      std::free(buffer);
    });
  }
  for (auto& t : pool) t.join();
  double seconds = since(start);
  double cpu = cpu_seconds() - cpu0;
  if (error.load() != 0) return errno_error(StatusCode::kIoError, "read " + a.file, error.load());
  json out{{"measure", rows ? "read_rows" : "read"},
           {"file", a.file},
           {"direct", a.direct},
           {"threads", threads},
           {"chunk_bytes", chunk},
           {"bytes", bytes.load()},
           {"calls", calls.load()},
           {"pages_visited", pages.load()},
           {"seconds", seconds},
           {"cpu_seconds", cpu},
           {"gbps", gbps(bytes.load(), seconds)},
           {"pages_visited_per_cpu_second", cpu > 0 ? static_cast<double>(pages.load()) / cpu : 0}};
  if (rows) {
    out["row_bytes"] = a.row_bytes;
    out["take_bytes"] = a.take_bytes;
    out["take_offset"] = a.take_offset;
  }
  return out;
}

// ---- loader ------------------------------------------------------------------------------------

struct LoaderArgs {
  std::string dir;
  std::string device = "host";
  std::string backend = "cuda-vmm";
  size_t threads = 0;
  uint64_t chunk_mib = loader::LoadOptions{}.chunk_bytes >> 20;
  uint64_t staging_mib = loader::LoadOptions{}.staging_bytes >> 20;
  size_t streams = loader::LoadOptions{}.copy_streams;
  std::string direct = "auto";
  std::string dtype;
  std::string pinned = "registered";
  int keep_staging = 1;
  uint64_t bridge_kib = loader::LoadOptions{}.bridged_gap_bytes >> 10;
  int repeat = 1;
  bool verify = false;
  uint32_t tp_size = 1;
  uint32_t tp_rank = 0;
  std::string shard_rules;
};

// The slab's bytes of one segment range, on the host.
Result<void> read_slab(memory::Slab& slab, size_t segment, uint64_t offset, void* out,
                       uint64_t bytes) {
  if (void* host = slab.host_address(segment)) {
    std::memcpy(out, static_cast<char*>(host) + offset, bytes);
    return ok_result();
  }
  namespace cuda = memory::cuda;
  COMPANION_ASSIGN_OR_RETURN(uint64_t base, memory::cuda_segment_device_pointer(slab, segment));
  COMPANION_ASSIGN_OR_RETURN(int ordinal, memory::cuda_slab_device_ordinal(slab));
  COMPANION_ASSIGN_OR_RETURN(const cuda::DriverApi* api, cuda::driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, cuda::ScopedContext::enter(ordinal));
  return COMPANION_CU(*api, cuMemcpyDtoH, out, base + offset, bytes);
}

// Every tensor stored as in the file (no cast): compares the slab with the file, 64 MiB at a time.
Result<uint64_t> verify(const loader::LoadPlan& plan, memory::Slab& slab) {
  std::vector<char> want(64 << 20);
  std::vector<char> got(64 << 20);
  uint64_t checked = 0;
  for (const auto& t : plan.tensors) {
    if (t.source.dtype != t.target_dtype) continue;
    UniqueFd fd(::open(plan.files[t.source.file_index].c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) return errno_error(StatusCode::kIoError, "open", errno);
    for (const auto& e : t.extents) {
      for (uint64_t pos = 0; pos < e.bytes; pos += want.size()) {
        uint64_t n = std::min<uint64_t>(want.size(), e.bytes - pos);
        if (::pread(fd.get(), want.data(), n, static_cast<off_t>(e.file_offset + pos)) !=
            static_cast<ssize_t>(n))
          return make_error(StatusCode::kIoError, "short read while verifying");
        COMPANION_TRY(read_slab(slab, t.placement.segment, t.placement.offset + e.dst_offset + pos,
                                got.data(), n));
        if (std::memcmp(want.data(), got.data(), n) != 0)
          return make_error(StatusCode::kInternal, "tensor " + t.source.name + " differs at byte " +
                                                       std::to_string(e.dst_offset + pos));
        checked += n;
      }
    }
  }
  return checked;
}

Result<std::vector<json>> run_loader(const LoaderArgs& a) {
  auto t0 = Clock::now();
  std::unique_ptr<memory::Backend> backend;
  if (a.device == "host") {
    backend = memory::make_host_backend();
  } else {
    auto ordinal = memory::cuda::parse_gpu_ordinal(a.device);
    if (!ordinal) return make_error(StatusCode::kInvalidArgument, "--device: host or an ordinal");
    if (a.backend == "cuda-ipc") {
      COMPANION_ASSIGN_OR_RETURN(backend, memory::make_cuda_ipc_backend(*ordinal));
    } else {
      COMPANION_ASSIGN_OR_RETURN(backend, memory::make_cuda_vmm_backend(*ordinal));
    }
  }
  double init_s = since(t0);

  loader::LoadOptions options;
  options.reader_threads = a.threads;
  options.chunk_bytes = a.chunk_mib << 20;
  options.staging_bytes = a.staging_mib << 20;
  options.copy_streams = a.streams;
  options.bridged_gap_bytes = a.bridge_kib << 10;
  if (a.direct == "on") {
    options.direct_io = loader::DirectIo::kOn;
  } else if (a.direct == "off") {
    options.direct_io = loader::DirectIo::kOff;
  } else if (a.direct != "auto") {
    return make_error(StatusCode::kInvalidArgument, "--direct: auto, on or off");
  }
  options.keep_staging = a.keep_staging != 0;
  if (a.pinned == "hostalloc") {
    options.pinned_memory = loader::PinnedMemory::kHostAlloc;
  } else if (a.pinned != "registered") {
    return make_error(StatusCode::kInvalidArgument, "--pinned: hostalloc or registered");
  }
  std::optional<DType> cast;
  if (!a.dtype.empty()) {
    COMPANION_ASSIGN_OR_RETURN(DType d, parse_dtype(a.dtype));
    cast = d;
  }
  loader::LoadStats stats;
  options.stats = &stats;

  auto t1 = Clock::now();
  std::error_code missing;
  std::string dir = std::filesystem::canonical(a.dir, missing).string();
  if (missing)
    return make_error(StatusCode::kNotFound, "checkpoint " + a.dir + ": " + missing.message());
  COMPANION_ASSIGN_OR_RETURN(auto ckpt, checkpoint::open_checkpoint(dir, {dir}));
  double checkpoint_open_s = since(t1);
  loader::ShardOptions shard;
  shard.tp_size = a.tp_size;
  shard.tp_rank = a.tp_rank;
  if (shard.tp_size > 1) {
    // What the server does: the spec's rules, then the preset config.json names (or the tensor
    // names suggest).
    shard.rules = a.shard_rules;
    COMPANION_ASSIGN_OR_RETURN(shard.config_json, checkpoint::read_checkpoint_side_file(
                                                      ckpt, "config.json", {dir}, 16ull << 20));
  }
  COMPANION_ASSIGN_OR_RETURN(auto plan, loader::make_load_plan(ckpt, cast, *backend, shard));
  double open_s = since(t1);
  auto t2 = Clock::now();
  COMPANION_ASSIGN_OR_RETURN(auto slab, backend->allocate(plan.segment_sizes, "load_bench"));
  double alloc_s = since(t2);
  std::atomic<bool> cancel{false};
  std::vector<json> lines;
  for (int rep = 0; rep < std::max(1, a.repeat); ++rep) {
    auto t3 = Clock::now();
    double cpu0 = cpu_seconds();
    COMPANION_TRY(loader::load_into_slab(plan, *slab, nullptr, cancel, options));
    double load_s = since(t3);
    double load_cpu_s = cpu_seconds() - cpu0;
    json out{{"measure", "loader"},
             {"repeat", rep},
             {"dir", a.dir},
             {"device", a.device},
             {"backend", backend->name()},
             {"direct", a.direct},
             {"pinned", a.pinned},
             {"keep_staging", options.keep_staging},
             {"threads_asked", a.threads},
             {"chunk_bytes", options.chunk_bytes},
             {"staging_bytes", options.staging_bytes},
             {"tp_size", a.tp_size},
             {"tp_rank", a.tp_rank},
             {"tensors", plan.tensors.size()},
             {"segments", plan.segment_sizes.size()},
             {"bytes", plan.bytes_to_read},
             {"seconds", load_s},
             {"cpu_seconds", load_cpu_s},
             {"gbps", gbps(plan.bytes_to_read, load_s)},
             {"open_plan_seconds", open_s},
             {"open_seconds", checkpoint_open_s},
             {"plan_seconds", open_s - checkpoint_open_s},
             {"alloc_seconds", alloc_s},
             {"backend_init_seconds", init_s},
             {"end_to_end_gbps", gbps(plan.bytes_to_read, open_s + alloc_s + load_s)},
             {"stats",
              {{"sink", stats.sink},
               {"reader_threads", stats.reader_threads},
               {"work_items", stats.work_items},
               {"direct_io", stats.direct_io},
               {"direct_reads", stats.direct_reads},
               {"buffered_reads", stats.buffered_reads},
               {"gathered_reads", stats.gathered_reads},
               {"staging_buffer_bytes", stats.staging_buffer_bytes},
               {"staging_buffers_max", stats.staging_buffers_max},
               {"staging_buffers", stats.staging_buffers},
               {"staging_buffers_reused", stats.staging_buffers_reused},
               {"staging_buffers_peak", stats.staging_buffers_peak},
               {"staging_alloc_seconds", stats.staging_alloc_seconds},
               {"readers_started_seconds", stats.readers_started_seconds},
               {"items_made_seconds", stats.items_made_seconds},
               {"reader_busy_seconds", stats.reader_busy_seconds},
               {"readers_first_done_seconds", stats.readers_first_done_seconds},
               {"readers_last_done_seconds", stats.readers_last_done_seconds}}}};
    if (a.verify) {
      auto t4 = Clock::now();
      COMPANION_ASSIGN_OR_RETURN(uint64_t checked, verify(plan, *slab));
      out["verified_bytes"] = checked;
      out["verify_seconds"] = since(t4);
    }
    lines.push_back(std::move(out));
  }
  return lines;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Load throughput measurements (one JSON line each)"};
  app.require_subcommand(1);

  H2dArgs h2d;
  auto* h2d_cmd = app.add_subcommand("h2d", "Pinned host-to-device copy bandwidth");
  h2d_cmd->add_option("--device", h2d.device, "GPU ordinal")->capture_default_str();
  h2d_cmd->add_option("--total-gib", h2d.total_gib, "Bytes to copy")->capture_default_str();
  h2d_cmd->add_option("--copy-mib", h2d.copy_mib, "Bytes per copy")->capture_default_str();
  h2d_cmd->add_option("--streams", h2d.streams, "Streams")->capture_default_str();

  ReadArgs read;
  auto* read_cmd = app.add_subcommand("read", "Read a file whole with several threads");
  read_cmd->add_option("--file", read.file, "File")->required();
  read_cmd->add_option("--threads", read.threads, "Threads (0: min(16, cores))")
      ->capture_default_str();
  read_cmd->add_flag("--direct", read.direct, "O_DIRECT (past the page cache)");
  read_cmd->add_option("--chunk-mib", read.chunk_mib, "Bytes per read")->capture_default_str();
  read_cmd->add_option("--row-bytes", read.row_bytes, "Read only part of every row this long");
  read_cmd->add_option("--take-bytes", read.take_bytes, "Bytes of each row to read");
  read_cmd->add_option("--take-offset", read.take_offset, "Where in each row they start");

  LoaderArgs ld;
  auto* loader_cmd = app.add_subcommand("loader", "make_load_plan + load_into_slab");
  loader_cmd->add_option("--dir", ld.dir, "Checkpoint (directory or .safetensors)")->required();
  loader_cmd->add_option("--device", ld.device, "host or a GPU ordinal")->capture_default_str();
  loader_cmd->add_option("--backend", ld.backend, "cuda-vmm or cuda-ipc")->capture_default_str();
  loader_cmd->add_option("--threads", ld.threads, "Reader threads (0: default)")
      ->capture_default_str();
  loader_cmd->add_option("--chunk-mib", ld.chunk_mib, "Work item size")->capture_default_str();
  loader_cmd->add_option("--staging-mib", ld.staging_mib, "Staging bound")->capture_default_str();
  loader_cmd->add_option("--streams", ld.streams, "Copy streams")->capture_default_str();
  loader_cmd
      ->add_option("--bridge-kib", ld.bridge_kib,
                   "Row shards: gaps read and dropped within one preadv (at most 1024)")
      ->capture_default_str();
  loader_cmd->add_option("--direct", ld.direct, "O_DIRECT: auto, on or off")->capture_default_str();
  loader_cmd->add_option("--dtype", ld.dtype, "Cast floating tensors to this dtype");
  loader_cmd->add_option("--pinned", ld.pinned, "Staging memory: registered or hostalloc")
      ->capture_default_str();
  loader_cmd
      ->add_option("--keep-staging", ld.keep_staging, "Keep pinned staging between loads (0/1)")
      ->capture_default_str();
  loader_cmd->add_option("--repeat", ld.repeat, "Loads into the same slab, one JSON line each")
      ->capture_default_str();
  loader_cmd->add_flag("--verify", ld.verify, "Compare the slab with the file afterwards");
  loader_cmd->add_option("--tp-size", ld.tp_size, "Tensor-parallel shards (1: the whole model)")
      ->capture_default_str();
  loader_cmd->add_option("--tp-rank", ld.tp_rank, "Which shard to load")->capture_default_str();
  loader_cmd->add_option("--shard-rules", ld.shard_rules,
                         "Shard rules 'pattern=rule;...' tried before the architecture's preset");

  CLI11_PARSE(app, argc, argv);

  Result<std::vector<json>> out = make_error(StatusCode::kInternal, "no subcommand");
  auto one = [](Result<json> r) -> Result<std::vector<json>> {
    if (!r.ok()) return std::move(r).error();
    return std::vector<json>{std::move(r).value()};
  };
  if (*h2d_cmd) out = one(run_h2d(h2d));
  if (*read_cmd) out = one(run_read(read));
  if (*loader_cmd) out = run_loader(ld);
  if (!out.ok()) return fail(out.error());
  for (const auto& line : *out) std::cout << line.dump() << std::endl;
  return 0;
}
