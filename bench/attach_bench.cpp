// Client-side attach latency: from the request to every tensor usable (segments imported and
// mapped, views built), over many attaches of an already-loaded model. Prints one JSON line.
//   attach_bench --device 0 --model /models/llama --iterations 200
#include <time.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "client/connection.hpp"
#include "client/discovery.hpp"
#include "client/mapped_model_impl.hpp"
#include "companion/client.hpp"
#include "memory/backend.hpp"

namespace {

using namespace companion;
using Ms = std::chrono::duration<double, std::milli>;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// The attach path taken apart with the client's internals: where the time goes.
Result<std::string> time_phases(const ModelSpec& spec, int iterations,
                                const ServerIdentity& server) {
  COMPANION_ASSIGN_OR_RETURN(auto conn,
                             client::Connection::open(server.socket_path, "attach_bench"));
  COMPANION_ASSIGN_OR_RETURN(int ordinal, client::local_ordinal_for(server));
  std::vector<double> rpc, get, import, unmap, release;
  for (int i = 0; i < iterations; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    COMPANION_TRY(conn->call(protocol::Health{}, 10000));
    auto t1 = std::chrono::steady_clock::now();
    std::vector<UniqueFd> fds;
    COMPANION_ASSIGN_OR_RETURN(auto reply,
                               conn->call(protocol::GetParameters{spec, true}, 60000, &fds));
    auto t2 = std::chrono::steady_clock::now();
    auto& params = std::get<protocol::Parameters>(reply.body);
    std::vector<std::unique_ptr<memory::MappedSegment>> mapped;
    for (const auto& seg : params.segments) {
      memory::SegmentExport e;
      e.kind = seg.kind;
      e.size = seg.size;
      e.ipc_handle = seg.ipc_handle;
      if (seg.fd_index >= 0) e.fd = std::move(fds[static_cast<size_t>(seg.fd_index)]);
      COMPANION_ASSIGN_OR_RETURN(auto m, memory::import_segment(std::move(e), {ordinal}));
      mapped.push_back(std::move(m));
    }
    auto t3 = std::chrono::steady_clock::now();
    mapped.clear();
    auto t4 = std::chrono::steady_clock::now();
    COMPANION_TRY(conn->call(protocol::Release{params.lease_id}, 10000));
    auto t5 = std::chrono::steady_clock::now();
    rpc.push_back(Ms(t1 - t0).count());
    get.push_back(Ms(t2 - t1).count());
    import.push_back(Ms(t3 - t2).count());
    unmap.push_back(Ms(t4 - t3).count());
    release.push_back(Ms(t5 - t4).count());
  }
  char out[512];
  std::snprintf(out, sizeof(out),
                "{\"breakdown_ms\": {\"rpc_round_trip\": %.4f, \"get_parameters\": %.4f, "
                "\"import_and_map\": %.4f, \"unmap\": %.4f, \"release\": %.4f}}",
                median(rpc), median(get), median(import), median(unmap), median(release));
  return std::string(out);
}

// One attach taken apart (request, then import + map + views), for many processes started
// together: absolute CLOCK_MONOTONIC times let the driver line up every process's phases.
Result<std::string> time_one_attach(const ModelSpec& spec, client::Connection& conn,
                                    std::shared_ptr<client::Connection> shared, int ordinal) {
  auto now_ns = [] {
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
  };
  long long t0 = now_ns();
  std::vector<UniqueFd> fds;
  COMPANION_ASSIGN_OR_RETURN(auto reply,
                             conn.call(protocol::GetParameters{spec, true}, 60000, &fds));
  long long t1 = now_ns();
  auto& params = std::get<protocol::Parameters>(reply.body);
  COMPANION_ASSIGN_OR_RETURN(
      auto mapped,
      client::map_parameters(std::move(shared), std::move(params), std::move(fds), ordinal));
  const void* last = nullptr;
  for (const auto& t : mapped->tensors()) last = t.data;
  long long t2 = now_ns();
  if (last == nullptr && !mapped->tensors().empty())
    return make_error(StatusCode::kInternal, "no data");
  char out[256];
  std::snprintf(out, sizeof(out),
                "{\"start_ns\": %lld, \"reply_ns\": %lld, \"mapped_ns\": %lld, "
                "\"request_ms\": %.4f, \"map_ms\": %.4f, \"total_ms\": %.4f}",
                t0, t1, t2, (t1 - t0) / 1e6, (t2 - t1) / 1e6, (t2 - t0) / 1e6);
  return std::string(out);
}

// Waits for "go [CLOCK_MONOTONIC ns]" on stdin, then until that instant (0 or none: at once).
bool wait_for_go_line() {
  char line[64];
  if (std::fgets(line, sizeof(line), stdin) == nullptr) return false;
  long long at = 0;
  if (std::sscanf(line, "go %lld", &at) == 1 && at > 0) {
    timespec ts{static_cast<time_t>(at / 1000000000LL), static_cast<long>(at % 1000000000LL)};
    while (::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) == EINTR) {
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace companion;
  CLI::App app{"Companion attach latency"};
  ConnectOptions options;
  std::string model;
  int iterations = 200;
  int warmup = 5;
  app.add_option("--device", options.device)->capture_default_str();
  app.add_option("--namespace", options.ns)->capture_default_str();
  app.add_option("--runtime-dir", options.runtime_dir);
  app.add_option("--registry", options.registry, "local or etcd://host:port");
  app.add_option("--instance", options.instance_id, "Only this instance (no model-aware probes)");
  app.add_option("--model", model)->required();
  app.add_option("--iterations", iterations)->capture_default_str();
  app.add_option("--warmup", warmup)->capture_default_str();
  bool wait_for_go = false;
  app.add_flag("--wait-for-go", wait_for_go,
               "After the warm-up attaches, print \"ready\" and wait for \"go [T]\" on stdin (T: a "
               "CLOCK_MONOTONIC instant in ns to start at) before the timed ones (many processes "
               "started together: concurrent_attach_bench.py). With --breakdown, each timed "
               "attach prints one JSON line of its phases with absolute times instead");
  bool breakdown = false;
  app.add_flag("--breakdown", breakdown,
               "Also time the phases separately: RPC round trip, GetParameters, import, unmap");
  CLI11_PARSE(app, argc, argv);

  auto fail = [](const Error& e) {
    std::fprintf(stderr, "attach_bench: %s\n", e.to_string().c_str());
    return 1;
  };
  auto client = Client::connect(options);
  if (!client.ok()) return fail(client.error());
  ModelSpec spec;
  spec.source = model;
  auto ready = (*client)->wait_for_model_ready(spec, 30, 1800);
  if (!ready.ok()) return fail(ready.error());

  std::vector<double> ms;
  size_t tensors = 0;
  uint64_t bytes = 0;
  size_t segments = 0;
  for (int i = 0; i < warmup + iterations; ++i) {
    if (wait_for_go && i == warmup) {
      std::printf("ready\n");
      std::fflush(stdout);
      if (breakdown) {  // the timed attaches taken apart, on a connection opened beforehand
        auto conn = client::Connection::open((*client)->server().socket_path, "attach_bench");
        if (!conn.ok()) return fail(conn.error());
        auto ordinal = client::local_ordinal_for((*client)->server());
        if (!ordinal.ok()) return fail(ordinal.error());
        if (!wait_for_go_line()) return 1;
        for (int k = 0; k < iterations; ++k) {
          auto one = time_one_attach(spec, **conn, *conn, *ordinal);
          if (!one.ok()) return fail(one.error());
          std::printf("%s\n", one->c_str());
        }
        std::fflush(stdout);
        return 0;
      }
      if (!wait_for_go_line()) return 1;
    }
    auto t0 = std::chrono::steady_clock::now();
    auto mapped = (*client)->get_model_parameters(spec);
    if (!mapped.ok()) return fail(mapped.error());
    // "Usable": every view's pointer is final; touch them so nothing is left lazy.
    const void* last = nullptr;
    for (const auto& t : (*mapped)->tensors()) last = t.data;
    auto t1 = std::chrono::steady_clock::now();
    if (last == nullptr && !(*mapped)->tensors().empty()) return 1;
    tensors = (*mapped)->tensors().size();
    bytes = (*mapped)->mapped_bytes();
    segments = (*mapped)->segment_count();
    if (i >= warmup) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  auto instances = (*client)->instances();
  auto pct = [&](double p) {
    return ms[std::min(ms.size() - 1, static_cast<size_t>(p * ms.size()))];
  };
  std::printf(
      "{\"tensors\": %zu, \"segments\": %zu, \"mapped_bytes\": %llu, \"iterations\": %d, "
      "\"p50_ms\": %.4f, \"p99_ms\": %.4f, \"min_ms\": %.4f, \"max_ms\": %.4f, "
      "\"backend\": \"%s\", \"instances\": %zu}\n",
      tensors, segments, static_cast<unsigned long long>(bytes), iterations, pct(0.50), pct(0.99),
      ms.front(), ms.back(), ready->backend.c_str(),
      instances.ok() ? instances->size() : size_t{0});
  if (breakdown) {
    std::fflush(stdout);
    auto phases = time_phases(spec, iterations, (*client)->server());
    if (!phases.ok()) return fail(phases.error());
    std::printf("%s\n", phases->c_str());
  }
  return 0;
}
