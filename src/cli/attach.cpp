// `companion attach`: maps a model zero-copy into this process and reports what it sees. A
// diagnostic for "can this process use the shared weights?", and the demo's client.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <thread>

#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "common/checksum.hpp"
#include "common/util.hpp"
#include "memory/cuda_checksum.hpp"

namespace companion::cli {
namespace {

// VmRSS and RssShmem (kB) of this process: shows that mapping a model copies nothing.
std::pair<uint64_t, uint64_t> resident_kb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  uint64_t rss = 0, shmem = 0;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) rss = std::stoull(line.substr(6));
    if (line.rfind("RssShmem:", 0) == 0) shmem = std::stoull(line.substr(9));
  }
  return {rss, shmem};
}

std::string shape_text(std::span<const int64_t> shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

// Tries to write through a mapping that must be read-only. True when the write was refused.
bool write_refused(const MappedModel& m) {
  const TensorView& t = m.tensors()[0];
  if (!t.on_device) return true;  // host mappings are PROT_READ: a write would fault, not fail
  auto checker = memory::DeviceChecksum::create(t.device_ordinal);
  if (!checker.ok()) return false;
  return !(*checker)->try_write(reinterpret_cast<uint64_t>(t.data)).ok();
}

}  // namespace

int run_attach(const CommonArgs& args, const ModelSpec& spec, const AttachOptions& opts) {
  auto fail = [&](const Error& e) {
    if (args.json)
      std::cout << json_text(to_json(e)) << std::endl;
    else
      std::fprintf(stderr, "companion attach: %s\n", printable_text(e.to_string()).c_str());
    return 1;
  };
  auto t0 = std::chrono::steady_clock::now();
  auto client = Client::connect(args.connect);
  if (!client.ok()) return fail(client.error());
  Result<std::shared_ptr<MappedModel>> model = make_error(StatusCode::kInternal, "");
  auto t1 = std::chrono::steady_clock::now();
  if (opts.published) {
    companion::AttachOptions attach;
    attach.generation = opts.generation;
    attach.timeout_s = opts.loading_timeout_s;
    if (!opts.fingerprint.empty()) {
      Fingerprint fingerprint;
      for (const auto& field : opts.fingerprint) {
        auto eq = field.find('=');
        if (eq == std::string::npos || eq == 0)
          return fail(make_error(StatusCode::kInvalidArgument,
                                 "--fingerprint takes NAME=VALUE, not '" + field + "'"));
        fingerprint[field.substr(0, eq)] = field.substr(eq + 1);
      }
      attach.fingerprint = std::move(fingerprint);
    }
    model = (*client)->attach(spec.source, attach);
  } else {
    auto ready =
        (*client)->wait_for_model_ready(spec, opts.initial_timeout_s, opts.loading_timeout_s);
    if (!ready.ok()) return fail(ready.error());
    t1 = std::chrono::steady_clock::now();
    model = (*client)->get_model_parameters(spec, opts.loading_timeout_s);
  }
  if (!model.ok()) return fail(model.error());
  auto t2 = std::chrono::steady_clock::now();
  double wait_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
  double attach_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
  const MappedModel& m = **model;

  // Host tensors: CRC-32 on the CPU. GPU tensors: wsum64 computed by the GPU on the mapping.
  std::unique_ptr<memory::DeviceChecksum> gpu_sum;
  auto checksums = [&]() -> Result<std::vector<uint64_t>> {
    std::vector<uint64_t> out;
    for (const auto& t : m.tensors()) {
      if (!t.on_device) {
        out.push_back(crc32(t.data, t.nbytes));
        continue;
      }
      if (!gpu_sum) {
        COMPANION_ASSIGN_OR_RETURN(gpu_sum, memory::DeviceChecksum::create(t.device_ordinal));
      }
      COMPANION_ASSIGN_OR_RETURN(uint64_t sum,
                                 gpu_sum->run(reinterpret_cast<uint64_t>(t.data), t.nbytes));
      out.push_back(sum);
    }
    return out;
  };
  std::vector<uint64_t> sums;
  if (opts.verify || opts.reverify) {
    auto r = checksums();
    if (!r.ok()) return fail(r.error());
    sums = std::move(*r);
  }
  auto [rss_kb, shmem_kb] = resident_kb();

  if (args.json) {
    nlohmann::json j;
    j["pid"] = ::getpid();
    j["server"] = to_json((*client)->server());
    j["model"] = to_json(m.status());
    j["lease_id"] = m.lease_id();
    j["wait_ms"] = wait_ms;
    j["attach_ms"] = attach_ms;
    j["segments"] = m.segment_count();
    j["segment_inodes"] = m.segment_inodes();
    j["mapped_bytes"] = m.mapped_bytes();
    j["read_only"] = m.read_only();
    j["rss_kb"] = rss_kb;
    j["rss_shmem_kb"] = shmem_kb;
    auto& tensors = j["tensors"] = nlohmann::json::array();
    size_t i = 0;
    for (const auto& t : m.tensors()) {
      nlohmann::json tj = {{"name", t.name},
                           {"dtype", dtype_name(t.dtype)},
                           {"shape", std::vector<int64_t>(t.shape.begin(), t.shape.end())},
                           {"nbytes", t.nbytes},
                           {"on_device", t.on_device}};
      if (opts.verify) tj[t.on_device ? "wsum64" : "crc32"] = sums[i];
      tensors.push_back(std::move(tj));
      ++i;
    }
    if (opts.try_write && !m.tensors().empty()) j["write_refused"] = write_refused(m);
    std::cout << json_text(j) << std::endl;
  } else {
    const ModelStatus& s = m.status();
    uint64_t tensor_bytes = 0;
    for (const auto& t : m.tensors()) tensor_bytes += t.nbytes;
    std::string what = s.published ? "published " + printable_text(s.key) + " generation " +
                                         std::to_string(s.generation)
                                   : s.source;
    std::printf("pid %d attached %s (%s) in %.3f ms, lease %llu\n", static_cast<int>(::getpid()),
                s.id.c_str(), what.c_str(), attach_ms,
                static_cast<unsigned long long>(m.lease_id()));
    std::printf("  %zu tensors, %s in %zu segment(s), backend %s, mapped %s\n", m.tensors().size(),
                format_bytes(tensor_bytes).c_str(), m.segment_count(), s.backend.c_str(),
                m.read_only() ? "read-only" : "read-write (legacy CUDA IPC: do not write)");
    auto inodes = m.segment_inodes();
    // Mapping reads nothing: pages of the shared memfd become resident in this process as its
    // tensors are read, so without --verify none are yet (and RssShmem says 0).
    if (!inodes.empty() && (opts.verify || opts.reverify))
      std::printf(
          "  shared memfd inode %llu; this process: RSS %s, of it %s shared pages it read "
          "(no copy)\n",
          static_cast<unsigned long long>(inodes[0]), format_bytes(rss_kb * 1024).c_str(),
          format_bytes(shmem_kb * 1024).c_str());
    else if (!inodes.empty())
      std::printf(
          "  shared memfd inode %llu, not read yet (--verify reads every tensor); this "
          "process: RSS %s\n",
          static_cast<unsigned long long>(inodes[0]), format_bytes(rss_kb * 1024).c_str());
    std::vector<std::vector<std::string>> rows;
    size_t shown = 0;
    for (const auto& t : m.tensors()) {
      if (shown++ == opts.show) break;
      std::vector<std::string> row = {std::string(t.name), dtype_name(t.dtype), shape_text(t.shape),
                                      format_bytes(t.nbytes)};
      if (opts.verify) {
        char hex[24];
        std::snprintf(hex, sizeof(hex), t.on_device ? "%016llx" : "%08llx",
                      static_cast<unsigned long long>(sums[shown - 1]));
        row.push_back(hex);
      }
      rows.push_back(std::move(row));
    }
    std::vector<std::string> header = {"  TENSOR", "DTYPE", "SHAPE", "BYTES"};
    if (opts.verify)
      header.push_back(m.tensors().empty() || !m.tensors()[0].on_device ? "CRC32" : "WSUM64 (GPU)");
    for (auto& r : rows) r[0] = "  " + r[0];
    std::cout << render_table(header, rows);
    if (m.tensors().size() > opts.show)
      std::printf("  ... and %zu more\n", m.tensors().size() - opts.show);
  }
  std::fflush(stdout);
  if (opts.hold_s > 0)
    std::this_thread::sleep_for(
        std::chrono::milliseconds(static_cast<int64_t>(opts.hold_s * 1000)));
  if (opts.reverify) {
    // Still the same bytes after the hold (during which the server may have died).
    auto again = checksums();
    if (!again.ok()) return fail(again.error());
    bool same = *again == sums;
    if (args.json)
      std::cout << nlohmann::json{{"reverified", same}}.dump() << std::endl;
    else
      std::printf("re-verified after %.1f s: %s\n", opts.hold_s, same ? "same bytes" : "CHANGED");
    if (!same) return 1;
  }
  return 0;
}

}  // namespace companion::cli
